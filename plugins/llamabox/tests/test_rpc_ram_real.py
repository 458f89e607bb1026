"""A ggml-rpc-server on a host without GPUs, for real (issue 17 item 4): two agents without GPUs, neither with
the RAM for the whole model; llama-server on one keeps some layers in its RAM and offloads the rest to a
ggml-rpc-server on the other (its CPU backend), and a completion goes through the OpenAI-compatible API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agentd.demo import get_json, model_servers, post_json, run_cli
from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)

# 8 layers of 65 MiB at f32 (hidden 1024, ffn 4096): about 540 MiB in RAM for all of them, more than either
# host has left (0.9 x 0.52 GiB = 480 MiB); a ggml-rpc-server takes 3 layers and its buffers (466 MiB).
SHAPE = {"n_layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 8, "ffn": 4096}
RAM_GIB = 0.52


def test_a_cpu_only_host_serves_layers_through_its_rpc_server(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "models" / "tiny-1024.gguf", **SHAPE)
    low = free_port_block()
    high = low + 99
    cluster = LocalCluster(tmp_path / "cluster",
                           hosts=[simulated_host(n, gpus=0, memory_gib=RAM_GIB) for n in ("a", "b")],
                           extra_env={"AGENTD_PORT_RANGE": f"[{low},{high}]"})
    try:
        cluster.start()
        cluster.wait_for_inventories()
        server = next(iter(cluster.agents.values())).listen
        r = run_cli("deploy", "tiny", "--model", str(model), "--runtime", "llamabox", "--ctx-size", "256",
                    "--allow-cpu-offload", "--arg=-lv", "--arg=4", "--wait", "180", "--json", server=server,
                    timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        (a,) = json.loads(r.stdout)["deployment"]["assignments"]
        parts = a["plan"]["parts"]
        main, rpc = parts
        assert [(p["role"], p["gpus"]) for p in parts] == [("main", []), ("rpc", [])]
        assert {main["host"], rpc["host"]} == {"a", "b"}
        assert main["cpu_layers"] >= 1 and main["cpu_layers"] + rpc["layers"] == SHAPE["n_layers"]
        assert main["ram"] > 0 and rpc["ram"] > 0  # both hosts' RAM booked
        servers = {p.name(): p for p in model_servers(tmp_path)}
        assert set(servers) == {"llama-server", "ggml-rpc-server"}
        argv = servers["ggml-rpc-server"].cmdline()
        assert argv[argv.index("-d") + 1] == "CPU"
        log = run_cli("logs", "tiny-r0", server=cluster.agents[rpc["host"]].listen).stdout
        # llama.cpp's own account: the rpc device got the layers placement gave it (the output layer counts)
        assert f"offloaded {rpc['layers'] + 1}/{SHAPE['n_layers'] + 1} layers to GPU" in log, log[-3000:]
        assert "RPC0[" in log and "model buffer size" in log
        via = cluster.agents[rpc["host"]]  # through the other agent's proxy
        deadline = time.monotonic() + 30
        while not any(m.get("id") == "tiny" for m in get_json(f"http://{via.http_listen}/v1/models")["data"]):
            assert time.monotonic() < deadline, "the deployment never showed up in /v1/models"
            time.sleep(0.5)
        out = post_json(f"http://{via.http_listen}/v1/completions",
                        {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4}, timeout=120)
        assert out["usage"]["completion_tokens"] >= 1 and isinstance(out["choices"][0]["text"], str)
    finally:
        cluster.stop(drain=False)
        deadline = time.monotonic() + 15
        while model_servers(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in model_servers(tmp_path):  # only this test's servers (run from under tmp_path)
            p.kill()
    assert Path(model).exists()
