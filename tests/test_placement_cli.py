"""`agentd plan`, run as a user runs it: the JSON shape, exit codes, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from agentd.cli.plan import deployment_name
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
BUSY = "examples/clusters/a100-one-busy-gpu.json"
AWQ = "tests/scenarios/models/Llama-3.1-405B-Instruct-AWQ-INT4"


def test_plan_json_has_the_documented_shape():
    r = run_cli("plan", "--cluster", BUSY, "--model", AWQ, "--runtime", "vllm", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert list(data) == ["placed", "runtime", "replicas", "diagnosis"]
    assert data["placed"] is True and data["runtime"] == "vllm" and data["diagnosis"] is None
    rp = data["replicas"][0]
    assert (rp["tensor_parallel"], rp["pipeline_parallel"]) == (4, 1)
    part = rp["parts"][0]
    assert {k: part[k] for k in ("host", "gpus", "role", "layers")} == {
        "host": "gpu-node-1", "gpus": [1, 2, 3, 4], "role": "main", "layers": 126}
    assert "cpu_layers" not in part and part["env"] == {"CUDA_VISIBLE_DEVICES": "1,2,3,4"}
    assert rp["args"][:2] == ["--tensor-parallel-size", "4"]


def test_unplaceable_exits_3_with_the_diagnosis_as_json_and_as_text():
    args = ("plan", "--cluster", BUSY, "--model", AWQ, "--runtime", "vllm", "--pin", "gpu-node-1:0,1,2,3,4,5,6,7")
    r = run_cli(*args, "--json")
    assert r.returncode == 3
    data = json.loads(r.stdout)
    assert data["placed"] is False and data["replicas"] == []
    d = data["diagnosis"]
    assert d["message"].startswith("0/1 hosts can run llama-3-1-405b-instruct-awq-int4 (vllm): 1 GPU had less free")
    assert d["reasons"][0]["count"] == 1 and d["reasons"][0]["details"]["foreign"] == 72 * 1024**3
    assert "free GPU 0 on gpu-node-1 (72.0 GiB used by pid 4121)" in d["suggestions"]
    text = run_cli(*args, "--log-level", "warning")
    assert text.returncode == 3
    assert "to fix: use 4 GPUs: TP=4 (TP=4 on gpu-node-1 GPUs 1-4)" in text.stdout.splitlines()


def test_llamabox_plan_of_a_header_only_gguf():
    r = run_cli("plan", "--cluster", "examples/clusters/gpustack-deepseek-r1.json", "--model",
                "tests/scenarios/models/DeepSeek-R1-BF16.gguf", "--runtime", "llamabox", "--name", "deepseek-r1",
                "--log-level", "warning")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "placed deepseek-r1 (llamabox): 1 replica"
    assert lines[1] == "replica 0: TP=1 PP=1, 13 parts on 3 hosts"
    assert lines[3].split()[:5] == ["main", "gpu-a100-1", "0,1,2,3,4,5,6,7", "24", "0"]


def test_bad_inputs_are_one_line_errors_with_exit_2(tmp_path):
    bad = tmp_path / "cluster.json"
    bad.write_text('{"hosts": [{"name": "a", "gpus": [{"index": 0, "uuid": "x", "memory_total": -1, '
                   '"memory_used": 0}]}]}')
    r = run_cli("plan", "--cluster", str(bad), "--model", AWQ, "--runtime", "vllm")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"agentd: error: {bad}: hosts.0.gpus.0.memory_total: Input should be greater than or equal to 0"]
    r = run_cli("plan", "--cluster", BUSY, "--model", AWQ, "--runtime", "vllm", "--pin", "gpu-node-1:x")
    assert r.returncode == 2 and "--pin GPU indices must be numbers" in r.stderr
    r = run_cli("plan", "--cluster", BUSY, "--model", AWQ, "--runtime", "llamabox")
    assert r.returncode == 2 and "runtime 'llamabox' serves gguf models, not safetensors" in r.stderr


def test_deployment_names_come_from_the_model_file():
    assert deployment_name(Path("/m/DeepSeek-R1-BF16-00001-of-00030.gguf")) == "deepseek-r1-bf16"
    assert deployment_name(Path("/m/Llama-3.1-8B-Instruct/config.json")) == "llama-3-1-8b-instruct"
    assert deployment_name(Path("/m/__")) == "model"


def test_the_readme_example_output_is_what_agentd_prints():
    r = run_cli("plan", "--cluster", "examples/clusters/small.json", "--model",
                "tests/fixtures/hf/Llama-3.1-8B-Instruct", "--runtime", "vllm", "--ctx-size", "16384",
                "--log-level", "warning")
    assert r.returncode == 0, r.stderr
    readme = (ROOT / "README.md").read_text()
    assert r.stdout.strip() in readme
