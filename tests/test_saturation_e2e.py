"""Saturation with a real agent and a real llama-server (issue 21 item 3): every slot busy, then a burst.

agentd launches llama-server with 4 slots (`--parallel 4`, pinned: placement
books that many). Four long streaming generations sent straight to it (no
proxy counted them) take every slot; the proxy reads that from /slots. With
`proxy_replica_max_queue = 0` the only replica is full, so of a burst of six
requests through the agent two wait in line (`proxy_saturation_queue = 2`) and
four get 429 with Retry-After at once. When the long generations are cut off,
the two waiting ones are sent and answered.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)


def wait_for(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def post(url: str, body: dict, timeout: float = 180) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def busy_slots(endpoint: str) -> int:
    with urllib.request.urlopen(f"http://{endpoint}/slots", timeout=5) as r:
        return sum(1 for s in json.loads(r.read()) if s.get("is_processing"))


def test_every_slot_busy_some_requests_wait_and_succeed_the_rest_get_429(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "slow.gguf", n_layers=8, hidden=256, ffn=512, ctx=16384)
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host("a", gpus=1, gpu_gib=8)],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s",
                                "AGENTD_PROXY_REPLICA_MAX_QUEUE": "0", "AGENTD_PROXY_SATURATION_QUEUE": "2",
                                "AGENTD_PROXY_SATURATION_WAIT": "120s"})
    streams: list[http.client.HTTPConnection] = []
    try:
        c.start()
        c.wait_for_inventories()
        with c.any_client(timeout=60) as cl:
            cl.call("Deploy", pb.DeployRequest(spec=pb.DeploymentSpec(
                name="s", model=str(model), runtime="llamabox", replicas=1, selector={},
                options=pb.RuntimeOptions(ctx_size=16384))))

            def running() -> pb.Instance | None:
                rows = cl.call("ListInstances", pb.ListInstancesRequest(deployment="s")).instances
                return rows[0] if rows and rows[0].state == "RUNNING" else None

            server = wait_for(running, 90, "the replica RUNNING").endpoint
        url = f"http://{c.agents['a'].http_listen}/v1/completions"
        assert post(url, {"model": "s", "prompt": "Hi", "max_tokens": 1})[0] == 200  # the proxy polls it now
        host, port = server.rsplit(":", 1)
        for _ in range(4):  # every slot: long streaming generations that no proxy counts
            conn = http.client.HTTPConnection(host, int(port), timeout=300)
            conn.request("POST", "/completion", json.dumps({"prompt": "Once", "n_predict": 12000, "ignore_eos": True,
                                                            "stream": True}), {"Content-Type": "application/json"})
            streams.append(conn)
        wait_for(lambda: busy_slots(server) == 4, 30, "all 4 slots busy")
        time.sleep(1.5)  # three poll periods: the proxy has read them

        answers: list[tuple[int, dict, dict]] = []
        lock = threading.Lock()

        def one() -> None:
            got = post(url, {"model": "s", "prompt": "Hello", "max_tokens": 2})
            with lock:
                answers.append(got)

        burst = [threading.Thread(target=one, daemon=True) for _ in range(6)]
        for t in burst:
            t.start()
        wait_for(lambda: len(answers) >= 4, 30, "the refusals")
        time.sleep(1.0)
        assert busy_slots(server) == 4, "a long generation ended too soon for this test"
        refused = list(answers)
        assert len(refused) == 4, refused  # two are waiting in line
        for status, headers, body in refused:
            assert status == 429 and int(headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "model_at_capacity" and "a" not in body["error"]["message"].split()
        for conn in streams:  # cut the long generations off: llama-server frees their slots
            conn.close()
        for t in burst:
            t.join(120)
        late = [a for a in answers if a not in refused]
        assert [a[0] for a in late] == [200, 200], late
        assert all(isinstance(a[2]["choices"][0]["text"], str) for a in late)
        with urllib.request.urlopen(f"http://{c.agents['a'].http_listen}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'agentd_proxy_rejected_total{model="s",reason="queue_full"} 4.0' in text
        assert 'agentd_proxy_queue_wait_seconds_count{model="s"} 2.0' in text
    finally:
        for conn in streams:
            conn.close()
        c.stop()
