"""Replicas by load (issue 21 item 4) with real agents and real llama-servers (docs/on-demand.md).

Three agents on loopback, one simulated GPU each with room for one copy of a small
model. A deployment with `--min-replicas 1 --max-replicas 3 --target-queue 1` and
short windows (settings): a load generator keeps several long-ish requests in flight
through two agents' proxies, and the coordinator adds replicas; once the load
stops, it drains them away again down to one replica, never below, and every
request of the run is answered. The scale events are in the leader's log and in
its /metrics. The decision itself is tested without processes in tests/test_autoscale.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)

HOSTS = ("alpha", "beta", "gamma")
T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def cli(c: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run([sys.executable, "-m", "agentd", *args, "--server", c.agents["gamma"].listen],
                          capture_output=True, text=True, env=env, timeout=timeout)


def replicas(c: LocalCluster) -> tuple[int, int]:
    """(the spec's replica count, assignments) of deployment m, as the replicated state has them."""
    with c.agents["gamma"].client(timeout=5) as client:
        d = client.call("Get", pb.GetRequest(name="m"))
    return d.spec.replicas, len(json.loads(d.assignments_json))


def request(c: LocalCluster, via: str, max_tokens: int) -> int:
    body = json.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://{c.agents[via].http_listen}/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_scales_up_under_load_and_back_down_to_min_after_it(tmp_path):
    # 4 layers of 256: a 40-token generation takes a noticeable while, and one copy fits a 0.5 GiB GPU.
    model = write_tiny_llama_gguf(tmp_path / "m.gguf", n_layers=4, hidden=256, ffn=512, ctx=2048)
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=0.5) for n in HOSTS],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s",
                                "AGENTD_AUTOSCALE_UP_AFTER": "1s", "AGENTD_AUTOSCALE_DOWN_AFTER": "3s",
                                "AGENTD_AUTOSCALE_COOLDOWN": "2s", "AGENTD_SCALE_DOWN_TIMEOUT": "60s"})
    try:
        c.start()
        c.wait_for_inventories()
        r = cli(c, "deploy", "m", "--model", str(model), "--runtime", "llamabox", "--ctx-size", "1024",
                "--min-replicas", "1", "--max-replicas", "3", "--target-queue", "1", "--wait", "90")
        assert r.returncode == 0, r.stdout + r.stderr
        assert replicas(c) == (1, 1)
        scale = cli(c, "scale", "m", "2")
        assert scale.returncode != 0 and "--min-replicas N --max-replicas M" in scale.stderr, scale.stderr

        # Load: 6 clients, each always with one request in flight, through two agents' proxies.
        halt = threading.Event()
        statuses: list[int] = []

        def client(via: str) -> None:
            while not halt.is_set():
                statuses.append(request(c, via, 40))

        threads = [threading.Thread(target=client, args=(via,), daemon=True) for via in ("alpha", "beta") * 3]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: replicas(c)[1] >= 2, 90, "a second replica under load")
            wait_until(lambda: replicas(c)[1] == 3, 90, "the third replica (max_replicas) under load")
            time.sleep(3)
            assert replicas(c)[1] == 3, "never above max_replicas"
        finally:
            halt.set()
            for t in threads:
                t.join(150)

        # No load: down by one per window, draining, to min_replicas and never below.
        seen: list[int] = []

        def at_min() -> bool:
            seen.append(replicas(c)[1])
            return seen[-1] == 1

        wait_until(at_min, 120, "scale-down to min_replicas 1")
        deadline = time.monotonic() + 8  # well over down_after + cooldown: it stays at 1
        while time.monotonic() < deadline:
            seen.append(replicas(c)[1])
            time.sleep(0.25)
        assert min(seen) == 1 and seen[-1] == 1, seen
        assert replicas(c) == (1, 1)
        assert statuses and set(statuses) == {200}, f"every request answered while scaling: {sorted(set(statuses))}"
        assert request(c, "gamma", 4) == 200

        # The scale events: one line per decision in the leader's log, and its metrics.
        logs = "\n".join(text for _, text in c.logs())
        assert re.search(r"deployment m: queue [\d.]+ per replica above target 1 for [\d.]+s: scale 1 -> [23]", logs)
        assert "takes no new requests and stops once they are answered" in logs
        assert re.search(r"deployment m: m-r\d-g\d+ removed \(its requests answered\)", logs), logs[-3000:]
        leader, _ = c.wait_for_leader()
        with urllib.request.urlopen(f"http://{c.agents[leader].http_listen}/metrics", timeout=10) as m:
            metrics = m.read().decode()
        up = re.search(r'agentd_scale_events_total\{direction="up",model="m",reason="queue"\} ([\d.]+)', metrics)
        down = re.search(r'agentd_scale_events_total\{direction="down",model="m",reason="queue"\} ([\d.]+)', metrics)
        assert up and int(float(up.group(1))) >= 1, metrics[-2000:]
        assert down and int(float(down.group(1))) >= 2
        assert re.search(r'agentd_replicas_desired\{model="m"\} 1\.0', metrics)
        assert re.search(r'agentd_replicas_actual\{model="m"\} 1\.0', metrics)

        # New bounds through `agentd scale`: a higher floor applies at once, with no load and no window.
        r = cli(c, "scale", "m", "--min-replicas", "2")
        assert r.returncode == 0 and "replicas between 2 and 3" in r.stdout, r.stdout + r.stderr
        wait_until(lambda: replicas(c) == (2, 2), 60, "min_replicas 2 applied")
        ls = cli(c, "ls")
        assert "[2-3]" in ls.stdout, ls.stdout
    finally:
        c.stop()
