import io
import json
import logging

from agentd.logs import fields, setup_logging


def test_json_lines_carry_fields():
    buf = io.StringIO()
    setup_logging("json", "info", stream=buf)
    logging.getLogger("agentd.test").info("placed deployment", extra=fields(deployment="x", hosts=2))
    logging.getLogger("agentd.test").debug("hidden")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["msg"] == "placed deployment" and rec["deployment"] == "x" and rec["hosts"] == 2
    assert rec["level"] == "info" and rec["logger"] == "agentd.test"


def test_text_lines_are_single_line_key_values():
    buf = io.StringIO()
    setup_logging("text", "debug", stream=buf)
    logging.getLogger("agentd.test").warning("gpu lost", extra=fields(gpu=3, reason="xid 79"))
    (line,) = buf.getvalue().splitlines()
    assert "WARNING" in line and "gpu=3" in line and 'reason="xid 79"' in line
