"""RaftNode over real gRPC on loopback: several nodes in one process, state on disk.

Few and fast: elections here are quick because a stopped leader's streams
break and the followers campaign at once (the fast-failover hint).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import grpc
import pytest

from agentd.cluster.raft import RaftNode, RaftOptions
from agentd.cluster.raft.storage import FileStorage
from agentd.cluster.raft.types import AppendResponse, Role, VoteResponse
from agentd.errors import InvalidInput, NotAvailable
from agentd.testing.partition import cut
from agentd.v1 import raft_pb2 as pb

FAST = RaftOptions(heartbeat_interval=0.05, election_timeout_min=0.4, election_timeout_max=0.8,
                   propose_timeout=5.0, catch_up_timeout=5.0, join_timeout=10.0)


class ListMachine:
    """A deterministic state machine: a list of commands."""

    def __init__(self):
        self.items: list[bytes] = []
        self.last_index = self.last_term = 0  # what a watcher and a voter's watch feed read

    def apply(self, index, term, command):
        self.items.append(command)
        self.last_index, self.last_term = index, term
        return len(self.items)

    def snapshot(self):
        return json.dumps([c.decode() for c in self.items]).encode()

    def restore(self, data):
        self.items = [c.encode() for c in json.loads(data)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tmp_path: Path, options: RaftOptions = FAST):
        self.dir = tmp_path
        self.options = options
        self.addr: dict[str, str] = {}
        self.nodes: dict[str, RaftNode] = {}

    async def start(self, name: str, join: list[str] | None = None, **kw) -> RaftNode:
        self.addr.setdefault(name, f"127.0.0.1:{free_port()}")
        node = RaftNode(name, self.addr[name], self.dir / name, ListMachine(), options=self.options,
                        join=join or [], **kw)
        await node.start()
        self.nodes[name] = node
        return node

    async def three(self) -> RaftNode:
        first = await self.start("n1")
        await self.start("n2", join=[self.addr["n1"]])
        await self.start("n3", join=[self.addr["n1"]])
        await self.until(lambda: len(first.members) == 3 and all(m.voter for m in first.members.values()))
        return first

    def alive(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if not n._stopping]

    def leader(self) -> RaftNode | None:
        leaders = [n for n in self.alive() if n.is_leader]
        return leaders[0] if len(leaders) == 1 else None

    async def until(self, cond, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def wait_leader(self, timeout: float = 10.0) -> RaftNode:
        await self.until(lambda: self.leader() is not None and self.leader().core.committed_in_term(),
                         timeout, "a leader")
        return self.leader()

    async def close(self) -> None:
        for n in self.alive():
            await n.stop(graceful=False)


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    await c.close()


async def test_single_node_bootstraps_leads_and_restarts_from_disk(cluster):
    node = await cluster.start("solo")
    assert node.is_leader and node.leader_id == "solo" and node.leader_address == cluster.addr["solo"]
    assert await node.propose(b"a") == 1
    assert await node.propose(b"b") == 2
    assert await node.read_barrier() == node.commit_index
    await node.stop()
    again = await cluster.start("solo")
    assert again.is_leader and again.term > 2
    await cluster.until(lambda: again.sm.items == [b"a", b"b"], what="replay from disk")
    assert await again.propose(b"c") == 3


async def test_three_nodes_join_replicate_and_redirect(cluster):
    leader = await cluster.three()
    assert leader.is_leader
    assert await leader.propose(b"x") == 1
    await cluster.until(lambda: all(n.sm.items == [b"x"] for n in cluster.nodes.values()), what="replication")
    follower = cluster.nodes["n2"]
    with pytest.raises(NotAvailable, match=f"not leader; leader is n1 at {cluster.addr['n1']}"):
        await follower.propose(b"y")
    with pytest.raises(NotAvailable, match="leader is n1"):
        await follower.read_barrier()
    assert await leader.read_barrier() == leader.commit_index
    assert {m: (v.address, v.voter) for m, v in follower.members.items()} == {
        n: (cluster.addr[n], True) for n in ("n1", "n2", "n3")}


async def test_leader_loss_elects_a_new_leader_with_every_committed_entry(tmp_path):
    # Election timeouts far longer than the test may wait: a new leader can only
    # appear because the followers saw the dead leader's streams break.
    c = Cluster(tmp_path, RaftOptions(**{**FAST.__dict__, "election_timeout_min": 60.0,
                                         "election_timeout_max": 90.0}))
    try:
        leader = await c.three()
        for k in range(10):
            await leader.propose(f"c{k}".encode())
        changes = []
        c.nodes["n2"].subscribe(changes.append)
        await leader.stop(graceful=False)  # its server and streams go away, as with kill -9
        new = await c.wait_leader(timeout=10)
        assert new.id != "n1" and new.term > leader.term
        assert new.sm.items == [f"c{k}".encode() for k in range(10)]
        assert await new.propose(b"after") == 11
        assert any(ch.leader_id == new.id for ch in changes)
        # The old leader comes back from its disk and catches up as a follower.
        old = await c.start("n1")
        await c.until(lambda: old.sm.items[-1:] == [b"after"], what="catch-up")
        assert not old.is_leader and old.leader_id == new.id
    finally:
        await c.close()


async def test_graceful_stop_hands_leadership_over(cluster):
    leader = await cluster.three()
    await leader.propose(b"x")
    await leader.stop()
    new = cluster.leader()
    assert new is not None and new.id != "n1", "leadership should have moved before the stop returned"
    assert await new.propose(b"y") == 2


async def test_restart_of_every_node_keeps_the_state(cluster):
    leader = await cluster.three()
    for k in range(5):
        await leader.propose(f"c{k}".encode())
    await cluster.until(lambda: all(n.last_applied == leader.last_applied for n in cluster.nodes.values()))
    for n in list(cluster.nodes.values()):
        await n.stop(graceful=False)
    for name in ("n1", "n2", "n3"):
        await cluster.start(name)  # no --join: they know the cluster from disk
    new = await cluster.wait_leader()
    assert await new.propose(b"after") == 6
    await cluster.until(lambda: all(n.sm.items == [*[f"c{k}".encode() for k in range(5)], b"after"]
                                    for n in cluster.nodes.values()), what="same state everywhere")


async def test_minority_leader_cannot_commit_and_steps_down(cluster):
    leader = await cluster.three()
    await leader.propose(b"before")
    others = [n for n in cluster.nodes.values() if n is not leader]
    cut(leader, [n.id for n in others])
    for n in others:
        cut(n, [leader.id])
    with pytest.raises(NotAvailable):
        await leader.propose(b"lost", timeout=0.5)
    await cluster.until(lambda: any(n.is_leader and n.core.committed_in_term() for n in others), timeout=5,
                        what="a leader on the majority side")
    new = next(n for n in others if n.is_leader)
    await new.propose(b"majority")
    await cluster.until(lambda: not leader.is_leader, timeout=5, what="check-quorum step-down")
    cut(leader, [])
    for n in others:
        cut(n, [])
    await cluster.until(lambda: leader.sm.items == [b"before", b"majority"], what="healed")
    assert all(b"lost" not in n.sm.items for n in cluster.nodes.values())


async def test_a_stalled_loop_neither_steps_the_leader_down_nor_starts_an_election(cluster):
    """Three voters whose loop froze for three election timeouts (one starved core; here one shared event loop):
    on resuming, each reads what is queued before it judges anyone's silence, so the leader and term stay."""
    leader = await cluster.three()
    await leader.propose(b"before")
    await cluster.until(lambda: all(n.sm.items == [b"before"] for n in cluster.nodes.values()), what="replication")
    term = leader.term
    time.sleep(3 * FAST.election_timeout_max)  # blocks every node's loop, sockets stay open
    await asyncio.sleep(3 * FAST.election_timeout_max)
    assert [(n.id, n.term, n.leader_id) for n in cluster.nodes.values()] == [
        (n, term, leader.id) for n in ("n1", "n2", "n3")]
    assert leader.is_leader
    await leader.propose(b"after")


async def test_a_watcher_keeps_its_stream_to_its_voter_when_the_leader_changes(tmp_path):
    """A change of leader reaches a watcher as one leader event on the stream it has; only its own voter going
    away makes it re-attach (at 2,048 hosts, every stream re-opening at once starved the new leader)."""
    c = Cluster(tmp_path, RaftOptions(**{**FAST.__dict__, "can_watch": True, "max_voters": 3, "standby_learners": 0}))
    try:
        leader = await c.three()
        w = await c.start("w", join=[c.addr["n1"]])
        assert w.watcher is not None
        # The join reply's admission index, named on its calls to voters (agentd.security.auth): the leader's last
        # log index when it answered, the voters' config entries at least.
        assert 3 <= w.admitted_index == w.watcher.admitted_index <= leader.core.log.last_index()
        await leader.propose(b"x")
        await c.until(lambda: w.sm.items == [b"x"] and w.leader_id == leader.id, what="the watcher follows")
        source = w.watcher.source
        voter = next(n for n in c.nodes.values() if n.address == source)
        assert voter is not leader  # a watcher streams from a voter that does not lead
        streams: list[str] = []
        follow = w.watcher._follow

        async def counted(address: str) -> None:
            streams.append(address)
            await follow(address)

        w.watcher._follow = counted  # any re-attach from now on goes through here
        other = next(n for n in c.nodes.values() if n not in (leader, voter, w))
        for target, data in ((other, b"y"), (voter, b"z")):
            current = c.leader()
            await current.transfer_leadership(target.id)
            await target.propose(data)
            await c.until(lambda t=target, d=data: w.leader_id == t.id and w.term == t.term and w.sm.items[-1:] == [d],
                          what=f"the watcher hears of leader {target.id}")
        assert streams == [] and w.watcher.source == source
        assert w.sm.items == [b"x", b"y", b"z"]
    finally:
        await c.close()


async def test_lagging_node_catches_up_through_a_chunked_snapshot(tmp_path):
    c = Cluster(tmp_path, RaftOptions(**{**FAST.__dict__, "snapshot_threshold": 20}))
    try:
        leader = await c.three()
        await c.nodes["n3"].stop(graceful=False)
        big = b"z" * 40_000
        for k in range(30):  # ~1.2 MB of state: several 512 KiB chunks
            await leader.propose(big + str(k).encode())
        assert leader.core.log.snap_index > 0, "the leader should have compacted its log"
        back = await c.start("n3")
        await c.until(lambda: len(back.sm.items) == 30, what="snapshot install")
        assert back.sm.items == leader.sm.items
        assert (tmp_path / "n3" / "raft" / "raft.snap").exists()
    finally:
        await c.close()


async def test_replies_leave_only_after_their_state_is_durable(cluster, monkeypatch):
    """Every vote granted and every append acknowledged was fsynced before it was sent."""
    durable: dict[str, tuple] = {}
    original_save = FileStorage.save

    def save(self, rd):
        original_save(self, rd)
        hs = self._state.hard_state
        durable[self.node_id] = (hs.term, hs.vote, self._state.last_index())

    monkeypatch.setattr(FileStorage, "save", save)
    violations, checked = [], []

    def watch(node: RaftNode):
        send = node.transport.send

        def checked_send(msgs):
            msgs = list(msgs)
            for m in msgs:
                term, vote, last = durable.get(node.id, (0, None, 0))
                if isinstance(m, VoteResponse) and m.granted and not m.pre_vote:
                    checked.append(m)
                    if (term, vote) != (m.term, m.to):
                        violations.append((node.id, m, durable.get(node.id)))
                if isinstance(m, AppendResponse) and m.success:
                    checked.append(m)
                    if last < m.index:
                        violations.append((node.id, m, durable.get(node.id)))
            send(msgs)

        node.transport.send = checked_send

    leader = await cluster.three()
    for n in cluster.nodes.values():
        watch(n)
    for k in range(5):
        await leader.propose(f"c{k}".encode())
    await leader.stop(graceful=False)
    new = await cluster.wait_leader()
    await new.propose(b"after")
    assert any(isinstance(m, VoteResponse) for m in checked) and any(isinstance(m, AppendResponse) for m in checked)
    assert violations == []


async def test_bad_peer_input_gets_status_codes_and_the_node_carries_on(cluster):
    node = await cluster.start("n1")
    channel = grpc.aio.insecure_channel(cluster.addr["n1"])
    raw_send = channel.stream_unary("/agentd.v1.Raft/Send")
    raw_join = channel.unary_unary("/agentd.v1.Raft/Join")

    async def send(*messages: bytes) -> grpc.aio.AioRpcError:
        call = raw_send()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            for m in messages:
                await call.write(m)
            await call.done_writing()
            await call
        return exc.value

    def msg(**kw) -> bytes:
        base = dict(sender="evil", to="n1", term=99, cluster_id=node.cluster_id)
        base.update(kw)
        return pb.RaftMessage(**base).SerializeToString()

    err = await send(b"\xff\xff garbage \x00")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()
    err = await send(msg(to="someone-else", heartbeat=pb.RaftHeartbeat()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "reached node 'n1'" in err.details()
    err = await send(msg(cluster_id="another-cluster", heartbeat=pb.RaftHeartbeat()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "another-cluster" in err.details()
    err = await send(msg())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no body" in err.details()
    gap = pb.AppendEntries(prev_log_index=1, prev_log_term=1, entries=[pb.RaftEntry(index=5, term=1)])
    err = await send(msg(append_entries=gap))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not consecutive" in err.details()
    bad_cfg = pb.AppendEntries(entries=[pb.RaftEntry(index=1, term=1, kind=pb.RAFT_ENTRY_CONFIG, data=b"{")])
    err = await send(msg(append_entries=bad_cfg))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await send(msg(install_snapshot=pb.InstallSnapshot(last_included_index=5, last_included_term=1,
                                                             total_size=1 << 40, offset=0)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in err.details()
    err = await send(b"\x0a" + b"\x80\x80\x80\x04" + b"a" * (9 << 20))  # a 9 MiB message
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await raw_join(b"\x12garbage")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await raw_join(pb.RaftJoinRequest(node_id="", address="x:1").SerializeToString())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()
    # none of it reached the core: same term, still leading, still committing
    assert node.is_leader and node.term == 2
    assert await node.propose(b"still fine") == 1


async def test_membership_api(cluster):
    leader = await cluster.three()
    with pytest.raises(InvalidInput):
        await leader.remove_member("nobody")
    n4 = await cluster.start("n4", join=[cluster.addr["n2"]])  # through a follower: forwarded to the leader
    assert "n4" in leader.members
    # it joined as a learner; the leader promotes it once it caught up (4 voters <= max_voters 5)
    await cluster.until(lambda: leader.members["n4"].voter and n4.members["n4"].voter, what="promotion")
    await leader.remove_member("n4")
    assert "n4" not in leader.members
    await cluster.nodes["n4"].stop(graceful=False)
    assert await leader.propose(b"ok") == 1


async def test_learner_when_the_voter_quota_is_full(tmp_path):
    c = Cluster(tmp_path, RaftOptions(**{**FAST.__dict__, "max_voters": 1}))
    try:
        first = await c.start("n1")
        second = await c.start("n2", join=[c.addr["n1"]])
        await asyncio.sleep(0.3)  # a promotion, if any, would have happened by now
        assert first.members["n2"].voter is False
        await first.propose(b"x")
        await c.until(lambda: second.sm.items == [b"x"], what="learner replication")
        assert second.role == Role.FOLLOWER
    finally:
        await c.close()


async def test_node_restarted_on_a_new_address_is_readdressed(cluster):
    leader = await cluster.three()
    await leader.propose(b"x")
    await cluster.nodes["n3"].stop(graceful=False)
    cluster.addr["n3"] = f"127.0.0.1:{free_port()}"
    moved = await cluster.start("n3")
    await cluster.until(lambda: leader.members["n3"].address == cluster.addr["n3"], what="new address recorded")
    await leader.propose(b"y")
    await cluster.until(lambda: moved.sm.items == [b"x", b"y"], what="replication to the new address")


async def test_a_state_machine_that_snapshots_later_is_compacted_off_the_loop_and_restarts_from_it(tmp_path):
    """ClusterState serialises its snapshot in a worker thread (10,000 deployments take seconds): the log is
    compacted once that finishes, at the index taken, and a restart reads the state back from it."""
    from agentd.cluster.state import ClusterState, node_command

    opts = RaftOptions(**{**FAST.__dict__, "snapshot_threshold": 20})
    addr = f"127.0.0.1:{free_port()}"
    st = ClusterState()
    node = RaftNode("n1", addr, tmp_path, st, options=opts)
    await node.start()
    try:
        await node.wait_for_leader(10)
        for i in range(45):
            await node.propose(node_command(f"h{i}", "up"))
        for _ in range(100):
            if node.core.log.snap_index >= 20:
                break
            await asyncio.sleep(0.05)
        assert node.core.log.snap_index >= 20 and not node._compacting
    finally:
        await node.stop(graceful=False)
    again = ClusterState()
    node = RaftNode("n1", addr, tmp_path, again, options=opts)
    await node.start()
    try:
        for _ in range(100):
            if len(again.nodes) == 45:
                break
            await asyncio.sleep(0.05)
        assert sorted(again.nodes) == sorted(st.nodes)
    finally:
        await node.stop(graceful=False)
