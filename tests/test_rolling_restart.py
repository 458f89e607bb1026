"""Rolling restart without dropping a request (issue 20 item 6).

Each agent of a 3-agent cluster is restarted in turn as `systemctl restart`
does it (SIGTERM, no drain: its model servers keep running and are adopted),
with a deploy between restarts, while a client sends a `/v1/completions`
request every 100 ms, always to an agent that is not restarting at that moment.
Not one request may fail, against a real llama-server replica. Run twice: this
release restarted onto itself, and an agentd 0.1.0 cluster (from its git tag)
upgraded host by host onto this release.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, status, wait_for
from agentd.testing.releases import code_env
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

if not llama_cpp_present():  # was inherited from importing tests/test_upgrade.py, which skips so
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)

INTERVAL = 0.1  # one request every 100 ms
QUIET = 0.5  # after an agent is taken out of rotation, before its SIGTERM: requests already sent to it finish


@dataclass
class Client:
    """Sends one completion every INTERVAL to an agent not in `avoid`, round-robin, and records each outcome."""

    cluster: LocalCluster
    model: str
    avoid: set[str] = field(default_factory=set)
    results: list[tuple[float, str, str]] = field(default_factory=list)  # (time, agent, "200" or the error)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        names = sorted(self.cluster.agents)
        turn = 0
        while not self.stop.is_set():
            started = time.monotonic()
            with self.lock:
                choices = [n for n in names if n not in self.avoid]
            target = choices[turn % len(choices)]
            turn += 1
            self.results.append((started, target, self._one(target)))
            self.stop.wait(max(0.0, INTERVAL - (time.monotonic() - started)))

    def _one(self, agent: str) -> str:
        req = urllib.request.Request(
            f"http://{self.cluster.agents[agent].http_listen}/v1/completions", method="POST",
            data=json.dumps({"model": self.model, "prompt": "Hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.loads(r.read())
                return str(r.status) if body.get("choices") else f"{r.status} without choices: {body}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}: {exc.read()[:300]!r}"
        except Exception as exc:  # refused, reset, timeout: every one is a failed request
            return f"{type(exc).__name__}: {exc}"

    def out_of_rotation(self, agent: str) -> None:
        with self.lock:
            self.avoid.add(agent)

    def back(self, agent: str) -> None:
        with self.lock:
            self.avoid.discard(agent)


def _ready(c: LocalCluster, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{c.agents[name].http_listen}/readyz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _restart_cluster_host_by_host(c: LocalCluster, model: Path, tmp_path: Path, new_env: dict[str, str]) -> None:
    client = Client(c, "tiny")
    thread = threading.Thread(target=client.run, daemon=True)
    events: list[tuple[float, str]] = []  # what the test did when, for the failure message
    thread.start()
    try:
        # The documented order (docs/operations.md, "Upgrades"): the followers first, the leader last.
        lead = c.wait_for_leader(30)[0]
        for turn, name in enumerate([*sorted(n for n in c.agents if n != lead), lead]):
            client.out_of_rotation(name)
            time.sleep(QUIET)
            events.append((time.monotonic(), f"SIGTERM {name}"))
            c.kill(name, signal.SIGTERM)  # systemctl restart: SIGTERM, no drain file
            c.agent_env[name] = new_env
            events.append((time.monotonic(), f"{name} exited; starting it"))
            c.start_agent(name)
            wait_for(lambda n=name: status(c, n).leader_id, 60, f"{name} to follow a leader after its restart")
            wait_for(lambda n=name: _ready(c, n), 60, f"{name}'s /readyz after its restart")
            events.append((time.monotonic(), f"{name} ready (leader {c.leader()})"))
            client.back(name)
            # A deploy between restarts, through whichever agent leads now.
            lead = c.wait_for_leader(30)[0]
            with c.agents[lead].client(timeout=60) as cl:
                cl.deploy(pb.DeploymentSpec(name=f"extra{turn}", model=str(model), runtime="llamabox", replicas=1,
                                            options=pb.RuntimeOptions(ctx_size=256)))
            wait_for(lambda t=turn, ld=lead: running(c, ld, f"extra{t}"), 90, f"extra{turn} running")
        time.sleep(1.0)
    finally:
        client.stop.set()
        thread.join(timeout=60)
    t0 = client.results[0][0]
    failed = [(round(t - t0, 2), agent, what) for t, agent, what in client.results if what != "200"]
    assert not failed, (f"{len(failed)} of {len(client.results)} requests failed: {failed[:3]} ... {failed[-1:]}; "
                        f"events: {[(round(t - t0, 2), e) for t, e in events]}; logs in {c.root}")
    assert len(client.results) >= 50  # the client really ran throughout
    (tmp_path / "requests.json").write_text(json.dumps(client.results))


def _cluster(root: Path, agent_env: dict[str, dict[str, str]] | None = None) -> LocalCluster:
    base = free_port_block()
    return LocalCluster(root, hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "abc"],
                        extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 49}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"},
                        agent_env=agent_env or {})


@pytest.fixture
def model(tmp_path) -> Path:
    return write_tiny_llama_gguf(tmp_path / "tiny.gguf")


def _serve_tiny(c: LocalCluster, model: Path) -> int:
    """The replica on a, the first agent, which leads: the last to be restarted, with the leader's restart."""
    c.start()
    c.wait_for_inventories()
    with c.agents["a"].client(timeout=60) as cl:
        cl.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1,
                                    options=pb.RuntimeOptions(ctx_size=256), pin=[pb.GpuPin(host="a")]))
    (row,) = wait_for(lambda: running(c, "a", "tiny"), 90, "tiny running")
    return row.pid


def test_a_rolling_restart_of_every_agent_fails_no_request(tmp_path, model):
    c = _cluster(tmp_path / "c")
    try:
        pid = _serve_tiny(c, model)
        _restart_cluster_host_by_host(c, model, tmp_path, {})
        (row,) = running(c, c.wait_for_leader(30)[0], "tiny")
        assert row.pid == pid  # adopted by its restarted agent, never restarted
    finally:
        c.stop()


def test_a_0_1_0_cluster_upgraded_host_by_host_fails_no_request(tmp_path, model, release_0_1_0):
    old = code_env(release_0_1_0)
    c = _cluster(tmp_path / "c", agent_env={n: dict(old) for n in "abc"})
    try:
        pid = _serve_tiny(c, model)
        _restart_cluster_host_by_host(c, model, tmp_path, {})
        lead = c.wait_for_leader(30)[0]
        (row,) = running(c, lead, "tiny")
        assert row.pid == pid
        assert {status(c, n).agent_version for n in "abc"} == {status(c, lead).agent_version} != {""}
    finally:
        c.stop()
