"""Serving on demand with real agents and real llama-servers (issue 21 items 1-2, docs/on-demand.md).

Three agents on loopback, each with one simulated GPU that holds one copy of the
small model and no more. A deployment with `--idle-unload 2s`:
- stays loaded while another host's proxy keeps sending it requests (the
  coordinator hears every proxy through the reports);
- once idle, is unloaded: its llama-server is gone, `agentd ls` says IDLE, and its
  GPU takes another deployment that did not fit before;
- 20 concurrent requests through all three agents, some streaming, wake it with
  exactly one placement, on a host that has room now (not its old one), and all
  20 get real completions;
- idle again with no room anywhere, a request gets 503 in OpenAI's error format
  with no host named, and nothing is left running.
The decisions behind it are tested without processes in tests/test_ondemand.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host, wait_for
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)

HOSTS = ("alpha", "beta", "gamma")


def cli(c: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run([sys.executable, "-m", "agentd", *args, "--server", c.agents["gamma"].listen],
                          capture_output=True, text=True, env=env, timeout=timeout)


def hosts_of(c: LocalCluster, name: str) -> list[str]:
    with c.agents["gamma"].client(timeout=5) as client:
        d = client.call("Get", pb.GetRequest(name=name))
    return sorted(p["host"] for a in json.loads(d.assignments_json) for p in a["plan"]["parts"])


def deployment(c: LocalCluster, name: str) -> pb.Deployment:
    with c.agents["gamma"].client(timeout=5) as client:
        return client.call("Get", pb.GetRequest(name=name))


def servers_of(root: Path) -> list[int]:
    """llama-server processes of this test's agents (their working directory is under an agent's data dir)."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "llama-server" in cmd and str(root) in (p.info["cwd"] or ""):
            out.append(p.pid)
    return out


def request(c: LocalCluster, via: str, model: str, *, stream: bool = False,
            timeout: float = 120) -> tuple[int, dict | str]:
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 4, "stream": stream}).encode()
    req = urllib.request.Request(f"http://{c.agents[via].http_listen}/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            return r.status, (raw if stream else json.loads(raw))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def woken_lines(c: LocalCluster, name: str) -> int:
    return sum(text.count(f"deployment {name} woken") for _, text in c.logs())


def idle(c: LocalCluster, name: str) -> bool:
    return deployment(c, name).idle


def test_idle_unload_then_wake_on_request_anywhere(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "small.gguf")  # one copy fits a 0.272 GiB GPU, two do not
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=0.272) for n in HOSTS],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    try:
        c.start()
        c.wait_for_inventories()
        for h in ("beta", "gamma"):
            assert cli(c, "cordon", h).returncode == 0
        r = cli(c, "deploy", "m", "--model", str(model), "--runtime", "llamabox", "--ctx-size", "256",
                "--idle-unload", "2s", "--wait", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        # Traffic through another host's proxy keeps it loaded well past its idle time.
        halt = threading.Event()
        answered: list[int] = []

        def keep_busy() -> None:
            while not halt.is_set():
                answered.append(request(c, "gamma", "m")[0])
                halt.wait(0.5)

        busy = threading.Thread(target=keep_busy, daemon=True)
        busy.start()
        assert hosts_of(c, "m") == ["alpha"]
        for h in ("beta", "gamma"):
            assert cli(c, "uncordon", h).returncode == 0
        first = json.loads(deployment(c, "m").assignments_json)[0]
        assert deployment(c, "m").spec.idle_unload == 2.0
        time.sleep(4)
        halt.set()
        busy.join(30)
        assert answered and set(answered) == {200}, answered
        assert not idle(c, "m")
        assert json.loads(deployment(c, "m").assignments_json)[0]["generation"] == first["generation"]

        # Idle: unloaded. Its llama-server is gone, ls says IDLE, and its GPU takes what did not fit before.
        wait_for(lambda: idle(c, "m"), 30, "m unloaded after 2s without requests")
        assert not json.loads(deployment(c, "m").assignments_json)
        wait_for(lambda: not servers_of(c.root), 20, "m's llama-server to stop")
        ls = cli(c, "ls")
        assert ls.returncode == 0 and "IDLE" in ls.stdout, ls.stdout
        assert json.loads(cli(c, "ls", "--json").stdout)["deployments"][0]["idle"] is True
        r = cli(c, "deploy", "n", "--model", str(model), "--runtime", "llamabox", "--ctx-size", "256",
                "--pin", "alpha", "--wait", "60")
        assert r.returncode == 0, r.stdout + r.stderr

        # 20 concurrent requests through every agent wake it once, on a host with room now, and all get answers.
        assert woken_lines(c, "m") == 0
        t0 = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(request, c, HOSTS[k % 3], "m", stream=k % 4 == 0) for k in range(20)]
            results = [f.result(timeout=180) for f in futures]
        took = time.monotonic() - t0
        for k, (status, body) in enumerate(results):
            assert status == 200, (k, body)
            if k % 4 == 0:
                assert "data: " in body and "[DONE]" in body, body
            else:
                assert isinstance(body["choices"][0]["text"], str), body
        assert woken_lines(c, "m") == 1, "one placement for all 20 requests"
        assert not idle(c, "m")
        assert hosts_of(c, "m") in (["beta"], ["gamma"]), hosts_of(c, "m")
        assert json.loads(deployment(c, "m").assignments_json)[0]["generation"] != first["generation"]
        print(f"20 held requests answered in {took:.2f}s")

        # Idle again, with no room anywhere: 503 in OpenAI's format, no host named, nothing left running.
        wait_for(lambda: idle(c, "m"), 30, "m unloaded again")
        for h in ("beta", "gamma"):
            assert cli(c, "cordon", h).returncode == 0
        wait_for(lambda: len(servers_of(c.root)) == 1, 20, "only n's llama-server left")
        status, body = request(c, "beta", "m")
        assert status == 503, body
        err = body["error"]
        assert err["code"] == "model_unavailable" and err["type"] == "service_unavailable", err
        assert not any(h in err["message"] for h in HOSTS), err["message"]
        assert idle(c, "m") and not json.loads(deployment(c, "m").assignments_json)
        assert len(servers_of(c.root)) == 1
        assert any("could not wake an idle deployment" in text and "cordoned" in text for _, text in c.logs())
        # ... and to the operator in `agentd ps` and `agentd ls`: the leader's note, hosts and reasons included.
        ps = cli(c, "ps")
        assert ps.returncode == 0 and "m: last wake failed" in ps.stdout and "cordoned" in ps.stdout, ps.stdout
        ls = cli(c, "ls")
        assert "m: last wake failed" in ls.stdout, ls.stdout
        listed = {d["name"]: d for d in json.loads(cli(c, "ls", "--json").stdout)["deployments"]}
        assert "cordoned" in listed["m"]["wake_error"] and "wake_error" not in listed["n"]
    finally:
        c.stop()


def test_in_a_secure_cluster_a_follower_wakes_it_with_its_node_certificate(tmp_path):
    """With TLS and authentication on, the follower's proxy calls Control/Wake on the leader as a node."""
    from agentd.v1 import security_pb2 as spb

    model = write_tiny_llama_gguf(tmp_path / "small.gguf")
    base = free_port_block()
    c = LocalCluster(tmp_path / "s", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in HOSTS], secure=True,
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 49}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    try:
        c.start()
        c.wait_for_inventories()
        leader = c.wait_for_leader()[0]
        via = next(h for h in HOSTS if h != leader)
        with c.agents[leader].client() as cl:
            key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="default")).key
            cl.call("Deploy", pb.DeployRequest(spec=pb.DeploymentSpec(
                name="m", model=str(model), runtime="llamabox", replicas=1, idle_unload=2.0,
                options=pb.RuntimeOptions(ctx_size=256))))
            wait_for(lambda: cl.call("Get", pb.GetRequest(name="m")).idle, 60, "m unloaded")
        body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(f"http://{c.agents[via].http_listen}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and isinstance(json.loads(r.read())["choices"][0]["text"], str)
        assert woken_lines(c, "m") == 1
    finally:
        c.stop()
