"""Routing by the replicas' own load (issue 21 item 3), with real agents and real llama-servers.

Two replicas of a model on two hosts. A long generation sent straight to one
replica's llama-server (not through any agent, so no proxy counted it) keeps
its slot busy; the proxy reads that from llama-server's /slots (the llamabox
plugin's agentd_load_path / agentd_read_load) and sends every next request to
the other replica. Round-robin alone would have sent every second one there.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host, wait_for
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)


def post(url: str, body: dict, timeout: float = 120) -> tuple[dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read()), dict(r.headers)


def slots_busy(endpoint: str) -> bool:
    with urllib.request.urlopen(f"http://{endpoint}/slots", timeout=5) as r:
        return any(s.get("is_processing") for s in json.loads(r.read()))


def test_a_replica_busy_with_a_long_generation_gets_no_new_requests(tmp_path):
    # Slow enough to stay busy for seconds: 8 layers of 256, and room for thousands of tokens.
    model = write_tiny_llama_gguf(tmp_path / "slow.gguf", n_layers=8, hidden=256, ffn=512, ctx=16384)
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in ("a", "b", "c")],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    try:
        c.start()
        c.wait_for_inventories()
        with c.any_client(timeout=60) as cl:
            cl.call("Deploy", pb.DeployRequest(spec=pb.DeploymentSpec(
                name="r", model=str(model), runtime="llamabox", replicas=2, strategy="spread",
                selector={}, options=pb.RuntimeOptions(ctx_size=16384))))

            def running() -> list[pb.Instance]:
                rows = cl.call("ListInstances", pb.ListInstancesRequest(deployment="r")).instances
                return [i for i in rows if i.state == "RUNNING"] if len(rows) == 2 else []

            busy, idle = wait_for(lambda: len(running()) == 2 and running(), 90, "2 replicas RUNNING")
        url = f"http://{c.agents['c'].http_listen}/v1/completions"
        post(url, {"model": "r", "prompt": "Hi", "max_tokens": 1})  # the proxy routes to r: it polls its replicas
        post(url, {"model": "r", "prompt": "Hi", "max_tokens": 1})

        def generate() -> None:
            try:
                post(f"http://{busy.endpoint}/completion", {"prompt": "Once", "n_predict": 12000, "ignore_eos": True},
                     timeout=300)
            except OSError:
                pass  # the cluster stopped under it

        long = threading.Thread(target=generate, daemon=True)
        long.start()
        wait_for(lambda: slots_busy(busy.endpoint), 10, "the long generation holding a slot")
        time.sleep(1.5)  # three poll periods: the proxy has read the busy slot

        def routed_to_idle() -> bool:  # a slow machine may take a poll or two more: wait until it shows
            _, headers = post(url, {"model": "r", "prompt": "Hello", "max_tokens": 2})
            return headers["X-Agentd-Instance"] == idle.instance_id

        wait_for(routed_to_idle, 10, "the proxy to route around the busy replica")
        chosen = []
        for _ in range(6):
            # One poll period apart: a poll that caught the idle replica's slot busy with the previous (short)
            # request would otherwise tie the two replicas for the next one.
            time.sleep(0.6)
            assert slots_busy(busy.endpoint), "the long generation ended too soon for this test"
            body, headers = post(url, {"model": "r", "prompt": "Hello", "max_tokens": 2})
            assert isinstance(body["choices"][0]["text"], str)
            chosen.append(headers["X-Agentd-Instance"])
        assert chosen == [idle.instance_id] * 6, (chosen, busy.instance_id)
    finally:
        c.stop()
