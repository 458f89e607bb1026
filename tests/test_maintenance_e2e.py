"""Cordon and drain with real agents and real llama-servers, while a client keeps asking.

Three agents on loopback; two replicas of the tiny model both on a. `agentd drain a`
moves them to b and c while a client sends a completion every 100 ms through c:
no request fails, and the deployment never has fewer than two ready replicas.
A stream begun before a drain runs to its last token on the replaced replica.
The records and decisions behind it are tested without processes in
tests/test_maintenance.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
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


def cli(c: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run([sys.executable, "-m", "agentd", *args, "--server", c.agents["c"].listen],
                          capture_output=True, text=True, env=env, timeout=timeout)


def one_gpu_hosts(root: Path, names: str, ports: int = 100) -> LocalCluster:
    """An unstarted cluster of simulated one-GPU hosts, their model servers on a free block of `ports` ports."""
    base = free_port_block()
    return LocalCluster(root, hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in names],
                        extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + ports - 1}]",
                                   "AGENTD_RUNTIME_STOP_GRACE": "1s"})


def ready_replicas(c: LocalCluster, name: str) -> int:
    with c.agents["c"].client(timeout=5) as client:
        rows = client.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances
    by_instance: dict[str, list[str]] = {}
    for i in rows:
        by_instance.setdefault(i.instance_id, []).append(i.state)
    return sum(1 for states in by_instance.values() if all(s == "RUNNING" for s in states))


def hosts_of(c: LocalCluster, name: str) -> list[str]:
    with c.agents["c"].client(timeout=5) as client:
        d = client.call("Get", pb.GetRequest(name=name))
    return sorted(p["host"] for a in json.loads(d.assignments_json) for p in a["plan"]["parts"])


def servers_on(root: Path, host: str) -> list[int]:
    """llama-server processes whose working directory is under agent `host`'s data dir."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "llama-server" in cmd and str(root / host) in (p.info["cwd"] or ""):
            out.append(p.pid)
    return out


class Client(threading.Thread):
    """One completion every 100 ms through agent c's /v1/, until stopped; counts what fails."""

    def __init__(self, url: str, model: str):
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.sent, self.failed, self.errors = 0, 0, []
        self.halt = threading.Event()

    def run(self) -> None:
        body = json.dumps({"model": self.model, "prompt": "Hi", "max_tokens": 2}).encode()
        while not self.halt.is_set():
            self.sent += 1
            try:
                req = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert isinstance(json.loads(r.read())["choices"][0]["text"], str)
            except Exception as exc:
                self.failed += 1
                self.errors.append(repr(exc)[:200])
            self.halt.wait(0.1)


def test_drain_moves_every_replica_without_a_failed_request(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    c = one_gpu_hosts(tmp_path / "c", "abc")
    try:
        c.start()
        c.wait_for_inventories()
        for h in "bc":
            assert cli(c, "cordon", h).returncode == 0
        r = cli(c, "deploy", "m", "--model", str(model), "--runtime", "llamabox", "--replicas", "2",
                "--ctx-size", "256", "--wait", "60")
        assert r.returncode == 0, r.stderr
        assert hosts_of(c, "m") == ["a", "a"]
        nodes = cli(c, "nodes").stdout
        assert [ln.split()[2] for ln in nodes.splitlines()[1:]] == ["up", "up,cordoned", "up,cordoned"], nodes
        for h in "bc":
            assert cli(c, "uncordon", h).returncode == 0

        client = Client(f"http://{c.agents['c'].http_listen}/v1/completions", "m")
        lowest = [2]
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                try:
                    lowest[0] = min(lowest[0], ready_replicas(c, "m"))
                except Exception:
                    pass
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        client.start()
        watcher.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        r = cli(c, "drain", "a", "--timeout", "120")
        took = time.monotonic() - t0
        time.sleep(1.0)
        client.halt.set()
        watching.set()
        client.join(15)
        watcher.join(5)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "a drained in" in r.stdout and "2 replica(s) left to move" in r.stdout
        assert client.failed == 0 and client.sent > 10, (client.sent, client.errors[:5])
        assert lowest[0] >= 2, f"ready replicas fell to {lowest[0]} during the drain ({took:.1f}s)"
        assert "a" not in hosts_of(c, "m")
        wait_for(lambda: not servers_on(c.root, "a"), 20, "a's llama-servers to stop")
        # Each old replica answered what it held before it stopped (agentd/agent/handoff.py), and the drain
        # waited for that.
        log = (c.root / "a.log").read_text()
        assert all(f"m-r{r}-g1: stopping, its requests answered" in log for r in (0, 1)), log[-3000:]

        # a stays cordoned: a new replica goes elsewhere, and the reason is in the diagnosis when nothing else fits.
        assert cli(c, "scale", "m", "3").returncode == 0
        assert "a" not in hosts_of(c, "m")
        r = cli(c, "uncordon", "a")
        assert r.returncode == 0 and "a uncordoned" in r.stdout
        # Bad input: a clear error, exit 2, nothing changed.
        r = cli(c, "cordon", "nosuch")
        assert r.returncode == 2 and "no host or GPU named 'nosuch'" in r.stderr
        r = cli(c, "drain", "a:5")
        assert r.returncode == 2 and "host a has no GPU 5" in r.stderr
    finally:
        c.stop()


def test_nodes_rm_re_places_leaves_raft_and_keeps_the_host_out(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    c = one_gpu_hosts(tmp_path / "c", "abc", ports=50)
    try:
        c.start()
        c.wait_for_inventories()
        leader = c.wait_for_leader()[0]
        gone = next(n for n in "ab" if n != leader)  # a follower other than c, which the CLI talks to
        for h in "abc":
            if h != gone:
                assert cli(c, "cordon", h).returncode == 0
        r = cli(c, "deploy", "m", "--model", str(model), "--runtime", "llamabox", "--ctx-size", "256",
                "--wait", "60")
        assert r.returncode == 0, r.stderr
        for h in "abc":
            if h != gone:
                assert cli(c, "uncordon", h).returncode == 0
        assert hosts_of(c, "m") == [gone]
        c.kill(gone)  # the host died for good
        r = cli(c, "nodes", "rm", gone)
        assert r.returncode == 0, r.stderr
        assert f"{gone} removed: 1 replica(s)" in r.stdout and "left Raft" in r.stdout
        wait_for(lambda: hosts_of(c, "m") != [gone] and ready_replicas(c, "m") == 1, 30, "m re-placed")
        with c.agents["c"].client(timeout=5) as client:
            assert gone not in {m.id for m in client.status().members}
        assert re.search(rf"^{gone}\s.*removed", cli(c, "nodes").stdout, re.M)
        # Back with its old data directory: nothing it says is taken, and it gets no work.
        c.start_agent(gone)
        time.sleep(3)
        assert re.search(rf"^{gone}\s.*removed", cli(c, "nodes").stdout, re.M)
        r = cli(c, "nodes", "rm", gone)
        assert r.returncode == 2 and "removed already" in r.stderr
        r = cli(c, "nodes", "rm", "nosuch")
        assert r.returncode == 2 and "no host named 'nosuch'" in r.stderr
    finally:
        c.stop()


def test_a_stream_running_when_its_replica_is_replaced_runs_to_its_end(tmp_path):
    """The old replica of a drain answers what it holds before it stops (agentd/agent/handoff.py): a stream of
    1,800 tokens, begun before `agentd drain`, still runs when the successor is promoted (the model is big
    enough to take several seconds), and ends with its last token, not cut."""
    model = write_tiny_llama_gguf(tmp_path / "medium.gguf", n_layers=8, hidden=768, heads=8, kv_heads=8, ffn=2048,
                                  ctx=2048, dtype="f16")
    c = one_gpu_hosts(tmp_path / "c", "ac")
    try:
        c.start()
        c.wait_for_inventories()
        assert cli(c, "cordon", "c").returncode == 0
        r = cli(c, "deploy", "m", "--model", str(model), "--runtime", "llamabox", "--ctx-size", "2048",
                "--wait", "90")
        assert r.returncode == 0, r.stderr
        assert hosts_of(c, "m") == ["a"]
        assert cli(c, "uncordon", "c").returncode == 0

        chunks: list[dict] = []
        ended: list[str] = []

        def stream() -> None:
            body = json.dumps({"model": "m", "prompt": "Hi", "max_tokens": 1800, "ignore_eos": True,
                               "stream": True}).encode()
            req = urllib.request.Request(f"http://{c.agents['c'].http_listen}/v1/completions", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    for line in resp:
                        if line.startswith(b"data: [DONE]"):
                            ended.append("done")
                        elif line.startswith(b"data: "):
                            chunks.append(json.loads(line[6:]))
            except Exception as exc:
                ended.append(repr(exc)[:300])

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        wait_for(lambda: len(chunks) >= 20 or ended, 30, "the stream to begin")
        r = cli(c, "drain", "a", "--timeout", "120")
        assert r.returncode == 0, r.stdout + r.stderr
        assert hosts_of(c, "m") == ["c"]
        reader.join(120)
        assert ended == ["done"], (ended, len(chunks))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(chunks) > 1000 and chunks[-1].get("usage", {}).get("completion_tokens") == 1800, chunks[-1]
        assert "waiting: m-r0-g1 answers the requests it holds" in r.stdout, r.stdout
        log = (c.root / "a.log").read_text()
        answered = re.search(r"m-r0-g1: stopping, its requests answered after ([0-9.]+)s", log)
        assert answered and float(answered.group(1)) > 1.5, log[-3000:]
        assert not servers_on(c.root, "a")  # the drain returned once it stopped
    finally:
        c.stop()
