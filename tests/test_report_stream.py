"""Liveness by lease (issue 16 item 2), with real agents: a host's reports travel on one Agent/ReportStream.

* Reports on the stream keep the hosts up over many grace periods: each host opened one stream to the leader,
  and nothing else (no second stream while its agent lives).
* kill -9 of a host: the leader marks it down after the grace (the lease expired); restarted, it opens a new
  stream and is up again.
* Mixed releases: an agentd 0.1.0 host (from the v0.1.0 tag) still reports with the unary Agent/Report to a
  leader of this release; and a host of this release whose leader is 0.1.0 (UNIMPLEMENTED) falls back to it.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GRACE = 4.0
T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except Exception as exc:  # an agent between lives: ask again
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r})")


def log_of(c: LocalCluster, name: str) -> list[dict]:
    return [json.loads(line) for line in c.agents[name].log_file.read_text().splitlines() if line.startswith("{")]


def streams_opened(c: LocalCluster, leader: str, node: str) -> int:
    return sum(1 for e in log_of(c, leader) if e.get("msg") == "report stream opened" and e.get("node") == node)


def node_states(c: LocalCluster, via: str) -> dict[str, str]:
    with c.agents[via].client(timeout=5) as client:
        return {n.name: n.state for n in client.call("ListNodes", pb.ListNodesRequest()).nodes}


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1) for n in ("a", "b", "c")],
                     node_down_grace=f"{GRACE:g}s")
    try:
        yield c.start()
    finally:
        c.stop(drain=False)


def test_reports_on_one_stream_keep_hosts_up_and_a_killed_host_goes_down_and_comes_back_on_a_new_stream(cluster):
    c = cluster
    leader = c.wait_for_leader(30)[0]
    others = [n for n in c.agents if n != leader]
    wait_for(lambda: all(streams_opened(c, leader, n) == 1 for n in others), 30, "a report stream from each host")
    wait_for(lambda: all(s == "up" for s in node_states(c, leader).values()), 30, "every host up")
    time.sleep(3 * GRACE)  # three leases long: bare renewals on the stream keep them up
    assert set(node_states(c, leader).values()) == {"up"}
    assert [streams_opened(c, leader, n) for n in others] == [1, 1], "one stream per host for its whole life"

    victim = others[0]
    c.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: node_states(c, leader)[victim] == "down", 3 * GRACE + 10, f"{victim} marked down")
    assert time.monotonic() - t0 >= GRACE - 1.5, "marked down before its lease could have expired"
    said = [e for e in log_of(c, leader) if "marked down" in e.get("msg", "") and victim in e.get("msg", "")]
    assert said, "the coordinator says why it marked the host down"
    assert node_states(c, leader)[others[1]] == "up"

    c.start_agent(victim)
    wait_for(lambda: node_states(c, leader)[victim] == "up", 60, f"{victim} up again")
    assert streams_opened(c, leader, victim) == 2, "the restarted agent reports on a new stream"


# ---------------------------------------------------------------------- mixed releases


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def release_0_1_0(tmp_path_factory) -> Iterator[Path]:
    """A worktree of v0.1.0 (as tests/test_upgrade.py makes it), run with this venv's packages."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the v0.1.0 code is not at hand")
    ref = "v0.1.0" if _git("rev-parse", "-q", "--verify", "refs/tags/v0.1.0").returncode == 0 else "b6539ee"
    path = tmp_path_factory.mktemp("release") / "v0.1.0"
    added = _git("worktree", "add", "--detach", str(path), ref)
    assert added.returncode == 0, added.stderr
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))
        _git("worktree", "prune")


def old_code(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{root}:{root / 'plugins' / 'llamabox'}:{root / 'plugins' / 'vllm'}"}


def test_a_0_1_0_host_reports_with_the_unary_call_and_a_new_host_falls_back_to_it_under_a_0_1_0_leader(
        tmp_path, release_0_1_0):
    # "old" bootstraps and leads (0.1.0); "new" runs this release; then "old2" (0.1.0) joins.
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1) for n in ("old", "new", "old2")],
                     node_down_grace=f"{GRACE:g}s", agent_env={"old": old_code(release_0_1_0),
                                                                "old2": old_code(release_0_1_0)})
    try:
        c.start()
        assert c.wait_for_leader(30)[0] == "old"
        # This release's host under a 0.1.0 leader: the stream is UNIMPLEMENTED there, so it reports with
        # Agent/Report, and stays up past several leases.
        wait_for(lambda: any("no report stream" in e.get("msg", "") for e in log_of(c, "new")), 30,
                 "the new host to fall back to the unary report")
        time.sleep(2 * GRACE)
        assert node_states(c, "old") == {"old": "up", "new": "up", "old2": "up"}

        # Leadership moves to a host of this release: the 0.1.0 host keeps reporting with the unary call.
        c.kill("old", signal.SIGTERM)
        c.agent_env["old"] = {}
        c.start_agent("old")  # upgraded in place
        if wait_for(lambda: c.leader(), 60, "a leader")[0] == "old2":  # the 0.1.0 host won: hand over
            c.kill("old2", signal.SIGTERM)
            c.start_agent("old2")
        lead = wait_for(lambda: (c.leader() or ("",))[0] in ("old", "new") and c.leader()[0], 60,
                        "a host of this release to lead")
        other = "new" if lead == "old" else "old"
        wait_for(lambda: streams_opened(c, lead, other) >= 1, 60, "a stream from the other host of this release")
        wait_for(lambda: node_states(c, lead).get("old2") == "up", 60, "the 0.1.0 host up under the new leader")
        time.sleep(2 * GRACE)
        assert node_states(c, lead) == {"old": "up", "new": "up", "old2": "up"}
        assert streams_opened(c, lead, "old2") == 0, "agentd 0.1.0 has no report stream: it used Agent/Report"
    finally:
        c.stop(drain=False)


# ---------------------------------------------------------------------- the protocol, against a real leader


def inventory(name: str, rack: str = "a") -> str:
    return json.dumps(simulated_host(name, gpus=1, labels={"rack": rack}))


def first(name: str, rack: str = "a") -> pb.ReportUpdate:
    return pb.ReportUpdate(node=name, inventory_json=inventory(name, rack), agent_version=AGENT_VERSION,
                           state_format=STATE_FORMAT, wire_version=WIRE_VERSION, instances_changed=True)


def node_of(c: LocalCluster, name: str) -> pb.Node | None:
    with c.agents["a"].client(timeout=5) as client:
        return next((n for n in client.call("ListNodes", pb.ListNodesRequest()).nodes if n.name == name), None)


class Sender:
    """One Agent/ReportStream call from this test, a message at a time (a queue feeds the request iterator)."""

    def __init__(self, ch: grpc.Channel):
        self.q: queue.Queue = queue.Queue()
        self.replies = ch.stream_stream("/agentd.v1.Agent/ReportStream",
                                        request_serializer=lambda m: m if isinstance(m, bytes)
                                        else m.SerializeToString(),
                                        response_deserializer=pb.ReportReply.FromString)(iter(self.q.get, None),
                                                                                          timeout=120)

    def send(self, m: pb.ReportUpdate | bytes) -> pb.ReportReply:
        self.q.put(m)
        return next(self.replies)

    def close(self) -> None:
        self.q.put(None)
        self.replies.cancel()


def refused(m1: pb.ReportUpdate | bytes, *more: pb.ReportUpdate, ch: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    s = Sender(ch)
    try:
        for m in (m1, *more):
            s.send(m)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    finally:
        s.close()
    return grpc.StatusCode.OK, ""


def test_the_leader_keeps_a_lease_on_bare_renewals_takes_changes_and_lets_a_silent_lease_expire(tmp_path):
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host("a", gpus=1)], node_down_grace=f"{GRACE:g}s")
    try:
        c.start()
        with grpc.insecure_channel(c.agents["a"].listen) as ch:
            s = Sender(ch)
            reply = s.send(first("ghost"))
            assert (reply.leader_id, reply.agent_version, reply.state_format) == ("a", AGENT_VERSION, STATE_FORMAT)
            assert reply.cluster_time == 0.0  # the message said no wall time
            wait_for(lambda: node_of(c, "ghost") and node_of(c, "ghost").state == "up", 15, "ghost up")
            for _ in range(int(3 * GRACE)):  # three leases of bare renewals
                time.sleep(1.0)
                s.send(pb.ReportUpdate(wall_time=time.time()))
            node = node_of(c, "ghost")
            assert node.state == "up" and json.loads(node.inventory_json)["labels"] == {"rack": "a"}
            s.send(pb.ReportUpdate(inventory_json=inventory("ghost", rack="b")))  # a change, on the same stream
            assert json.loads(node_of(c, "ghost").inventory_json)["labels"] == {"rack": "b"}
            other = Sender(ch)  # another stream for the same host records its report...
            other.send(first("ghost", rack="c"))
            assert json.loads(node_of(c, "ghost").inventory_json)["labels"] == {"rack": "c"}
            other.close()
            s.send(pb.ReportUpdate())  # ...and a bare renewal on the first writes what that one knows again
            assert json.loads(node_of(c, "ghost").inventory_json)["labels"] == {"rack": "b"}
            t0 = time.monotonic()  # the stream stays open but says nothing: the lease runs out
            wait_for(lambda: node_of(c, "ghost").state == "down", 3 * GRACE + 10, "ghost marked down")
            assert time.monotonic() - t0 >= GRACE - 1.5
            s.send(pb.ReportUpdate())  # renewed on the same stream: up again
            wait_for(lambda: node_of(c, "ghost").state == "up", 15, "ghost up again")
            s.close()

            bad = grpc.StatusCode.INVALID_ARGUMENT
            code, why = refused(pb.ReportUpdate(node="ghost"), ch=ch)
            assert code == bad and "first message" in why, why
            code, why = refused(first("ghost"), pb.ReportUpdate(node="other"), ch=ch)
            assert code == bad and "speaks for 'ghost', not 'other'" in why, why
            code, why = refused(first("ghost"), b"\xff\xff\xff", ch=ch)
            assert code == bad and "not a valid agentd.v1.ReportUpdate" in why, why
            code, why = refused(first("ghost"), pb.ReportUpdate(inventory_json=inventory("other")), ch=ch)
            assert code == bad and "carries the inventory of 'other'" in why, why
            code, why = refused(first("ghost"), pb.ReportUpdate(inventory_json="{}"), ch=ch)
            assert code == bad and "not a host inventory" in why, why
            assert node_of(c, "ghost").state == "up"  # garbage changed nothing
    finally:
        c.stop(drain=False)
