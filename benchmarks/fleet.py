"""The leader's cost per host, with voters and watchers: real voters, simulated watcher hosts (issue 16).

The issue-16 measurement, one command (about 12-15 minutes on a quiet 2-core machine):

    .venv/bin/python benchmarks/fleet.py --hosts 2048 --secure --spawns 50 --kill-leader

Three real `agentd serve` voters (max_voters 3, no standby learners) pinned to CPU 0 with taskset; the
simulated hosts live in --sim-procs processes (default: one per 512 hosts), all pinned to CPU 1. Hosts
join at --join-rate per second, all processes together (each join is a committed entry that every watcher
receives); the row says how long joining took (`join_s`), when the leader counted every host up
(`all_up_s`), and how many were up then and after the CPU windows.

What is real, per simulated host: its Raft Join (it is told to watch); its own mTLS identity (a
certificate from the cluster CA) and its own connections to the voters; the real
`agentd.cluster.raft.watch.Watcher` on a real Raft/Watch stream, which decodes every event, checks every
index (a repeated entry is skipped, a gap makes it ask again: both counted, `repeats`/`gaps`), follows
leader changes and moves to another voter when its voter dies; its reports on the daemon's default path
(agentd/agent/reporter.py): the real `ReportStream` client to the voter it watches from, chosen by the real
`RelayChoice` (the voter relays them to the leader on Agent/RelayReports), to another voter or the leader
directly when that fails, after the daemon's random wait (RelayTimings.jitter); a report every
--report-every seconds (default 5 s, the issue's condition; the daemon sends one a second, REPORT_INTERVAL,
which the relaying voters absorb: the leader hears each voter once a second either way) with an 8-GPU
simulated inventory. --report direct sends the stream to the leader; unary one Agent/Report call per report
(agentd 0.1.0).

What is shared: the *apply*. A real host applies every committed entry to its own ClusterState on its own
CPU, which costs the voters nothing; 2,048 copies in a few processes made the simulator quadratic (1.2 GB
and 80 % of a core at 1,483 hosts), so it fell behind and its hosts' leases lapsed. Here each watcher's
state machine is a `HostState` (its own last index and term) over one `SharedLog` per process: the first
watcher to deliver an index applies it to the process's one ClusterState; every other delivery of that
index is checked against it (term and CRC of the command; a mismatch is counted, `divergent`). A snapshot
further on than the shared state is restored into it. So the spawn timing is still per host: the moment
the target host's own watcher applied the entry that newly assigns it the deployment (the simulator has no
supervisor: that is when a daemon would spawn). `sim CPU%/host` and `sim KB/host` are the simulators'
own cost (CPU over the same windows as the voters', RSS after them).

For each size: the leader's CPU (% of one core, /proc times via psutil over --measure seconds, --repeats
windows: the median and all of them), every voter's CPU in the same windows, the load average, the hosts
the leader counts up, which voter each host's reports came through (`reports_via`), and what the hosts'
report streams did: `fallbacks` (a voter failed a report), `inventories_sent` (messages that carried the
whole inventory) and `inventories_named` (new streams whose receiver held the inventory: only its digest
crossed), and how inventories reached the leader, relayed or direct (`leader_inventories`, from the agents'
agentd_report_inventories_total: whole, named, asked). --spawns N
deploys N one-replica deployments pinned to random up hosts, one at a time, and times from Deploy's reply
(the entry committed and applied on the leader; this can be negative: a follower's watcher may apply it
before the reply reaches the client) and from the call's start, to the target host's watcher applying its
assignment. --kill-leader then kills -9 the leader and reports the time until every simulated watcher
names the new leader and applied its commit index, and the survivors' peak CPU (0.25 s windows); then,
2 × RelayChoice.AVOID + --report-every seconds on, the new leader's CPU over that time and the report
counters since the kill (`after_failover`, `after_failover_leader_inventories`).
--profile S samples the leader with py-spy after the CPU windows. --v010-hosts runs the v0.1.0 design
first (every host a Raft learner: v0.1.0's own RaftNode per simulated host, one process, from a git
worktree of the tag, insecure, unary reports). A table of every row is printed last. Everything started is
stopped on exit, Ctrl-C included. FLEET_KEEP_DIR=dir keeps the agents' logs there; FLEET_LOG_LEVEL=info.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from agentd.agent.reporter import REPORT_INTERVAL
from agentd.errors import AgentdError
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.testing.releases import code_env as release_env
from agentd.testing.releases import release_worktree
from agentd.v1 import control_pb2 as pb

# ---------------------------------------------------------------------------------------------- the simulator
# Runs in a child process (`fleet.py --sim-child CONFIG`), several of them, each pinned to CPU 1.


class SharedLog:
    """One ClusterState per simulator process: each committed index is applied once, by the first simulated
    watcher whose stream delivers it; every other watcher's delivery of that index is checked against it
    (term and a CRC of the command: a divergent entry is counted). It is always at least as far as every
    watcher of the process (a snapshot further on than it is restored into it), so an entry a watcher
    delivers is at most one past it. For the hosts the benchmark times (`targets`) it notes which index
    newly assigned them which deployment."""

    def __init__(self) -> None:
        from agentd.cluster.state import ClusterState
        self.state = ClusterState()
        self.applied = 0  # the highest index applied or restored (config entries included)
        self.checks: dict[int, tuple[int, int]] = {}  # index -> (term, crc32 of the command)
        self.assigned: dict[int, list[tuple[str, str]]] = {}  # index -> (host, deployment) it newly assigned
        self.targets: set[str] = set()
        self.divergent = 0
        self.applies = 0

    def entry(self, index: int, term: int, data: bytes) -> None:
        import zlib
        key = (term, zlib.crc32(data))
        old = self.checks.setdefault(index, key)
        if old != key:
            self.divergent += 1
        if len(self.checks) > 2 * 4096 + 1024:  # keep the last window's
            for k in sorted(self.checks)[:1024]:
                del self.checks[k]
        if index <= self.applied:
            return
        st = self.state
        before = {h: {a.deployment for a in st.assignments_on(h)} for h in self.targets}
        st.apply(index, term, data)
        self.applied = index
        self.applies += 1
        new = [(h, a.deployment) for h in self.targets for a in st.assignments_on(h) if a.deployment not in before[h]]
        if new:
            self.assigned[index] = new

    def config(self, index: int) -> None:
        self.applied = max(self.applied, index)

    def restore(self, index: int, data: bytes) -> None:
        if index > self.applied:
            self.state.restore(data)
            self.applied = index


class HostState:
    """One simulated watcher's state machine (agentd.cluster.raft.watch.Applier): its own last index and term,
    the entries applied in the shared one. For a timed host, when its watcher applied the entry that assigns
    it a deployment (the moment a daemon's supervisor would spawn it: the simulator has none)."""

    def __init__(self, name: str, shared: SharedLog, seen: dict):
        self.name, self.shared, self.seen = name, shared, seen
        self.last_index = self.last_term = 0
        self.snapshot_index = 0  # set by the watcher before restore(): the index of the snapshot it carries

    def apply(self, index: int, term: int, command: bytes) -> None:
        self.shared.entry(index, term, command)
        self.last_index, self.last_term = index, term
        for host, dep in self.shared.assigned.get(index, ()):
            if host == self.name:
                self.seen.setdefault(host, {}).setdefault(dep, time.monotonic())

    def snapshot(self) -> bytes:
        return self.shared.state.snapshot()

    def restore(self, data: bytes) -> None:
        self.shared.restore(self.snapshot_index, data)
        self.last_index = self.snapshot_index


def _watcher_class():  # imported in the child only
    from agentd.cluster.raft.watch import EntryKind, Watcher, _Gap

    class CountingWatcher(Watcher):
        """The real Watcher; it counts what its stream repeated (skipped) or lost (a gap: it asks again), and
        tells the shared state about config entries (which the Watcher does not hand to its state machine)."""

        repeats = gaps = 0

        def _restore(self, s):
            self.sm.snapshot_index = s.index
            super()._restore(s)

        def _apply(self, e):
            if e.index <= self.last_applied:
                self.repeats += 1
            try:
                super()._apply(e)
            except _Gap:
                self.gaps += 1
                raise
            if e.kind != EntryKind.NORMAL and self.last_applied == e.index:
                self.sm.shared.config(e.index)

    return CountingWatcher


class _RaftView:
    """What RelayChoice.target reads of a host's Raft side, from its watcher."""

    def __init__(self, w):
        self.watcher = w

    @property
    def members(self):
        return self.watcher.members

    @property
    def leader_address(self):
        return self.watcher.leader_address


def sim_inventory(name: str) -> str:
    g = 80 * 2**30
    return json.dumps({"name": name, "cpu_count": 64, "memory_total": 2**40, "memory_available": 2**39,
                       "gpus": [{"index": i, "uuid": f"GPU-{name}-{i}", "name": "NVIDIA H100 80GB HBM3 (simulated)",
                                 "memory_total": g, "memory_used": 0, "compute_capability": "9.0"}
                                for i in range(8)]})


async def _simulate(cfg: dict) -> None:
    import asyncio
    import random
    import re

    import grpc

    from agentd.api.report_stream import ReportStream, StreamEnded
    from agentd.cluster.relay import RelayChoice
    from agentd.v1 import control_pb2_grpc as pb_grpc
    from agentd.v1 import raft_pb2 as rpb
    from agentd.v1 import raft_pb2_grpc as rpb_grpc
    from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION

    seeds, first, count, every = cfg["seeds"], cfg["first"], cfg["count"], cfg["every"]
    out, mode, tls_dir, rate = Path(cfg["out"]), cfg["mode"], cfg["tls"], cfg["join_rate"]
    targets_file = Path(cfg["targets"])
    Watcher = _watcher_class()
    shared, seen = SharedLog(), {}
    stats = {"reports": 0, "failed": 0, "relayed": 0, "direct": 0, "fallbacks": 0, "errors": [], "report_errors": {}}
    watchers: list = []
    streams: list = []  # every host's ReportStream: its count of inventories sent whole and named by digest
    version = (AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, "")
    ca = None

    def credentials(name: str):
        nonlocal ca
        if not tls_dir:
            return None
        from agentd.security.ca import ROLE_NODE, issue_identity, load_ca
        from agentd.security.tls import TlsIdentity, channel_credentials
        if ca is None:
            ca = load_ca(Path(tls_dir), need_key=True)
        ident = issue_identity(ca, name, role=ROLE_NODE, addresses=["127.0.0.2"])
        return channel_credentials(TlsIdentity(ident.ca_pem, ident.cert_pem, ident.key_pem, name, ROLE_NODE))

    def open_channel(creds, address: str):
        if creds is None:
            return grpc.aio.insecure_channel(address)
        from agentd.security.channel import channel_options
        return grpc.aio.secure_channel(address, creds, options=channel_options())

    common: dict[str, grpc.aio.Channel] = {}  # insecure: the process's connections, shared by its hosts

    async def host(i: int) -> None:
        name = f"sim-{i:05d}"
        try:
            await _host(i, name)
        except Exception as exc:
            stats["errors"].append(f"{name}: {exc!r}"[:300])

    async def _host(i: int, name: str) -> None:
        creds = credentials(name)
        # With mTLS each host has its own connections (its own certificate), as real hosts do.
        mine: dict[str, grpc.aio.Channel] = common if creds is None else {}

        def channel(address: str):
            ch = mine.get(address)
            if ch is None:
                ch = mine[address] = open_channel(creds, address)
            return ch

        address = f"127.0.0.2:{20000 + i}"
        req = rpb.RaftJoinRequest(node_id=name, address=address, agent_version=AGENT_VERSION,
                                  state_format=STATE_FORMAT, can_watch=True)
        reply = None
        for attempt in range(120):  # as RaftNode._join: a follower names the leader, ask each in turn
            try:
                reply = await rpb_grpc.RaftStub(channel(seeds[(i + attempt) % len(seeds)])).Join(req, timeout=60)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
        if reply is None or not reply.watcher:
            raise RuntimeError(f"not joined as a watcher: {reply}")
        w = Watcher(name, reply.cluster_id, HostState(name, shared, seen), list(seeds), channel)
        w.admitted_index = reply.admitted_index  # as RaftNode._join: named on its Watch calls
        watchers.append(w)
        asyncio.get_running_loop().create_task(w.run())
        inv, view, choice = sim_inventory(name), _RaftView(w), RelayChoice(name)
        rs = ReportStream(name, address)  # the daemon's report client, its default reply timeout
        rs.admitted_index = reply.admitted_index  # as the reporter does (RaftNode.admitted_index)
        streams.append(rs)
        await asyncio.sleep(every * random.random())  # spread the reports over the period
        while True:
            t = time.monotonic()
            leader = w.leader_address
            if leader:
                # As agentd/agent/reporter.py: through the voter it watches from, else to the leader.
                relay = choice.target(view) if mode == "relay" else ""
                try:
                    if mode == "unary":  # agentd 0.1.0's report: one call per report, the whole inventory
                        from agentd.v1 import control_pb2 as cpb
                        await pb_grpc.AgentStub(channel(leader)).Report(cpb.ReportRequest(
                            node=name, address=address, inventory_json=inv, agent_version=AGENT_VERSION,
                            state_format=STATE_FORMAT, wire_version=WIRE_VERSION), timeout=5)
                    else:
                        target = relay or leader
                        await rs.send(channel(target), target, inventory_json=inv, instances=[], version=version,
                                      wall_time=time.time())
                    stats["reports"] += 1
                    stats["relayed" if relay else "direct"] += 1
                    choice.served()
                except (grpc.aio.AioRpcError, StreamEnded, TimeoutError) as exc:
                    stats["failed"] += 1
                    rpc = isinstance(exc, grpc.aio.AioRpcError)
                    why = f"{exc.code().name} {exc.details()}" if rpc else type(exc).__name__
                    why = re.sub(r"sim-\d+", "sim-N", f"{'relay' if relay else 'leader'}: {why}")[:120]
                    stats["report_errors"][why] = stats["report_errors"].get(why, 0) + 1
                    if relay:  # as the daemon: avoid that voter, another voter or the leader after the jitter
                        wait = choice.failed(relay, view)
                        stats["fallbacks"] += 1
                        await asyncio.sleep(wait)
                        continue
            await asyncio.sleep(max(0.0, every - (time.monotonic() - t)))

    def dump() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "joined": len(watchers), "joined_at": joined_at, **{k: v for k, v in stats.items() if k != "errors"},
            "inventories_sent": sum(r.inventories_sent for r in streams),
            "inventories_named": sum(r.inventories_named for r in streams),
            "errors": stats["errors"][:5], "n_errors": len(stats["errors"]),
            "repeats": sum(w.repeats for w in watchers), "gaps": sum(w.gaps for w in watchers),
            "divergent": shared.divergent, "shared_applies": shared.applies,
            "applied": [w.last_applied for w in watchers], "by_leader": [w.leader_id or "" for w in watchers],
            "seen": seen}))
        os.replace(tmp, out)

    loop = asyncio.get_running_loop()
    joined_at = None
    t0 = time.monotonic()
    pending = []
    for k in range(count):  # joins at a bounded rate: each is a committed entry every watcher receives
        pending.append(loop.create_task(host(first + k)))
        await asyncio.sleep(max(0.0, t0 + (k + 1) / rate - time.monotonic()))
        if k % 64 == 0:
            dump()
    while True:
        if joined_at is None and len(watchers) >= count:
            joined_at = round(time.monotonic() - t0, 1)
        try:
            shared.targets.update(json.loads(targets_file.read_text()))
        except (OSError, ValueError):
            pass
        dump()
        await asyncio.sleep(0.25)


def sim_child(config: str) -> None:
    import asyncio
    asyncio.run(_simulate(json.loads(config)))


# The v0.1.0 design: every host is a Raft learner. Run with the v0.1.0 code on PYTHONPATH (a worktree of the
# tag): each simulated host is v0.1.0's own RaftNode (its own gRPC server on loopback, its log on disk, v0.1.0's
# ClusterState), joined through the voters as agentd 0.1.0 joins, plus its unary Report every `every` seconds.
SIMULATOR_010 = r'''
import asyncio, json, os, sys, time
import grpc
from agentd.cluster.raft.node import RaftNode, RaftOptions
from agentd.cluster.state import ClusterState
from agentd.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc

seeds, n, every, out = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
base_port, data = int(sys.argv[5]), sys.argv[6]

def inventory(name):
    g = 80 * 2**30
    return json.dumps({"name": name, "cpu_count": 64, "memory_total": 2**40, "memory_available": 2**39,
        "gpus": [{"index": i, "uuid": f"GPU-{name}-{i}", "name": "NVIDIA H100 80GB HBM3 (simulated)",
                  "memory_total": g, "memory_used": 0, "compute_capability": "9.0"} for i in range(8)]})

async def host(i, nodes, stats):
    name, address = f"sim-{i:05d}", f"127.0.0.1:{base_port + i}"
    try:
        node = RaftNode(name, address, os.path.join(data, name), ClusterState(),
                        options=RaftOptions(max_voters=3), join=seeds)
        await node.start()
    except Exception as exc:
        stats["errors"].append(f"{name}: {exc!r}"[:300])
        return
    nodes.append(node)
    inv, channels = inventory(name), {}
    await asyncio.sleep(every * (i / n))
    while True:
        target = node.leader_address
        if target:
            ch = channels.get(target) or channels.setdefault(target, grpc.aio.insecure_channel(target))
            try:
                await pb_grpc.AgentStub(ch).Report(pb.ReportRequest(node=name, address=address,
                                                                    inventory_json=inv), timeout=5)
                stats["reports"] += 1
            except grpc.aio.AioRpcError:
                stats["failed"] += 1
        await asyncio.sleep(every)

async def main():
    nodes, stats = [], {"reports": 0, "failed": 0, "errors": []}
    for i in range(n):
        asyncio.get_running_loop().create_task(host(i, nodes, stats))
        if i % 32 == 31:
            await asyncio.sleep(1.0)  # joins in waves: each is a membership change
    while True:
        with open(out + ".tmp", "w") as f:
            json.dump({"joined": len(nodes), "reports": stats["reports"], "failed": stats["failed"],
                       "errors": stats["errors"][:5], "applied": [x.last_applied for x in nodes],
                       "by_leader": [x.leader_id or "" for x in nodes],
                       "leaders": sorted({x.leader_id or "" for x in nodes})}, f)
        os.replace(out + ".tmp", out)
        await asyncio.sleep(0.5)

asyncio.run(main())
'''


def leader_of(c: LocalCluster) -> str:
    return c.wait_for_leader(60)[0]


def code_env(code: Path | None) -> dict[str, str]:
    """PYTHONPATH for another release's code (as tests/test_upgrade.py runs v0.1.0); {} for this tree's."""
    return {} if code is None else release_env(code)


def cpu_percent(pid: int, seconds: float) -> float:
    p = psutil.Process(pid)
    t0, c0 = time.monotonic(), sum(p.cpu_times()[:2])
    time.sleep(seconds)
    return 100.0 * (sum(p.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


class _CpuSampler:
    """The peak CPU (% of one core over 0.5 s windows) of each process, from a thread, until stop()."""

    def __init__(self, procs: list[psutil.Process], peak: dict[str, float]):
        import threading
        self.procs, self.peak, self._stop = procs, peak, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = {p.pid: (time.monotonic(), sum(p.cpu_times()[:2])) for p in self.procs}
        while True:
            stopping = self._stop.wait(0.25)  # a last window up to the stop: a quick failover has one
            for p in self.procs:
                try:
                    t, c = time.monotonic(), sum(p.cpu_times()[:2])
                except psutil.Error:
                    continue
                t0, c0 = last[p.pid]
                last[p.pid] = (t, c)
                key = str(p.pid)
                self.peak[key] = max(self.peak.get(key, 0.0), round(100.0 * (c - c0) / (t - t0), 1))
            if stopping:
                return


def profile_leader(pid: int, seconds: float, out: Path) -> list[str]:
    """py-spy's top functions (own time) in the leader over `seconds`, pinned to the simulators' core.
    Run after the CPU window: sampling stops the process briefly and would count in its CPU."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return ["py-spy is not installed: .venv/bin/pip install py-spy"]
    argv = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50", "-f", "raw", "-o", str(out),
            "--nonblocking"]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "1", *argv]
    subprocess.run(argv, capture_output=True, timeout=seconds + 60)
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    busy = 0
    try:
        lines = out.read_text().splitlines()
    except OSError:
        return ["py-spy wrote nothing"]
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if "select (selectors.py" in frames[-1] or frames[-1].startswith(("wait (threading.py", "_wait_for_tstate")):
            continue  # idle: the event loop waiting for I/O, a worker thread waiting for work
        busy += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for f in set(frames):
            incl[f] = incl.get(f, 0) + int(count)
    def top(d: dict[str, int], n: int, mark: str) -> list[str]:
        return [f"{mark} {100 * v / max(busy, 1):5.1f}% {k}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]
    # Percentages are of the leader's busy samples; `own` is time in the function itself, `incl` with callees.
    return [f"busy samples: {busy}", *top(own, 15, "own"), *top(incl, 40, "incl")]


def commit_to_watcher(c: LocalCluster, sims: Sims, up: list[str], spawns: int, model: Path) -> dict:
    """Deploy `spawns` one-replica deployments one at a time, each pinned to a different simulated host, and
    time from Deploy's reply (the entry committed and applied on the leader) to that host's watcher applying
    the entry that assigns it; also from the Deploy call's start (which adds placement and the commit)."""
    import random
    rng = random.Random(len(up))
    names = rng.sample(sorted(up), min(spawns, len(up)))  # hosts the leader counts as up: it places on those
    sims.targets.write_text(json.dumps(names))
    time.sleep(1.0)  # the simulators read the targets every 0.25 s
    sent: dict[str, tuple[str, float, float]] = {}
    failed: list[str] = []
    give_up = time.monotonic() + 60 + 3 * len(names)  # a starved leader must not hold the whole run
    for k, host in enumerate(names):
        name = f"spawn{k}"
        if time.monotonic() > give_up:
            failed.append(f"{name}: not tried (the spawn step ran out of time)")
            continue
        spec = pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=1,
                                 pin=[pb.GpuPin(host=host, gpus=[0])])
        t1 = None
        for attempt in range(3):  # an election under load: ask the next leader
            try:
                with c.agents[leader_of(c)].client(timeout=15) as client:
                    client.status()  # the channel is up (TLS handshake done) before the clock starts
                    t0 = time.monotonic()
                    client.call("Deploy", pb.DeployRequest(spec=spec))
                    t1 = time.monotonic()
                break
            except AgentdError as exc:  # the host went down meanwhile, say: counted as not placed
                if attempt == 2 or "already exists" in str(exc):
                    failed.append(f"{name}: {exc}"[:200])
                    break
                time.sleep(2)
        if t1 is None:
            continue
        sent[name] = (host, t0, t1)
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = sims.read().get("seen", {})
        if all(d in seen.get(h, {}) for d, (h, _, _) in sent.items()):
            break
        time.sleep(0.25)
    seen = sims.read().get("seen", {})
    from_reply, from_call, missing = [], [], []
    for d, (h, t0, t1) in sent.items():
        t = seen.get(h, {}).get(d)
        if t is None:
            missing.append(d)
            continue
        from_reply.append(1000 * (t - t1))
        from_call.append(1000 * (t - t0))
    return {"spawn_n": len(from_reply), "spawn_missing": missing, "spawn_not_placed": failed,
            "reply_to_watcher_ms_p50": pct(from_reply, 0.5), "reply_to_watcher_ms_p99": pct(from_reply, 0.99),
            "reply_to_watcher_ms_max": pct(from_reply, 1.0),
            "call_to_watcher_ms_p50": pct(from_call, 0.5), "call_to_watcher_ms_p99": pct(from_call, 0.99),
            "call_to_watcher_ms_max": pct(from_call, 1.0)}


def pct(xs: list[float], q: float) -> float | None:
    return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Sims:
    """The simulator processes of one run, their hosts split into contiguous slices, and their merged output.
    All monotonic times are the machine's CLOCK_MONOTONIC, so the parent compares them with its own."""

    SUMS = ("joined", "reports", "failed", "relayed", "direct", "fallbacks", "repeats", "gaps", "divergent",
            "shared_applies", "n_errors", "inventories_sent", "inventories_named")
    REPORTS = ("reports", "failed", "relayed", "direct", "fallbacks", "inventories_sent", "inventories_named")

    def __init__(self, root: Path, seeds: list[str], hosts: int, procs: int, *, every: float, mode: str, tls: str,
                 join_rate: float):
        self.root, self.procs, self.hosts = root, [], hosts
        self.targets = root / "targets.json"
        self.outs = [root / f"sim{k}.json" for k in range(procs)]
        taskset = shutil.which("taskset")
        for k in range(procs):
            first, last = hosts * k // procs, hosts * (k + 1) // procs
            cfg = {"seeds": seeds, "first": first, "count": last - first, "every": every, "out": str(self.outs[k]),
                   "mode": mode, "tls": tls, "join_rate": join_rate / procs, "targets": str(self.targets)}
            argv = [sys.executable, str(Path(__file__).resolve()), "--sim-child", json.dumps(cfg)]
            if taskset:
                argv = [taskset, "-c", "1", *argv]
            self.procs.append(subprocess.Popen(argv, stderr=open(root / f"sim{k}.log", "wb"), cwd=root))  # noqa: SIM115

    def check(self) -> None:
        for k, p in enumerate(self.procs):
            if p.poll() is not None:
                raise SystemExit(f"simulator {k} stopped: {(self.root / f'sim{k}.log').read_text()[-2000:]}")

    def read(self) -> dict:
        parts = [read(o) for o in self.outs]
        m: dict = {k: sum(p.get(k, 0) for p in parts) for k in self.SUMS}
        m["applied"] = [a for p in parts for a in p.get("applied", [])]
        m["by_leader"] = [x for p in parts for x in p.get("by_leader", [])]
        m["leaders"] = sorted(set(m["by_leader"]))
        m["errors"] = [e for p in parts for e in p.get("errors", [])][:5]
        ats = [p.get("joined_at") for p in parts]
        m["joined_at"] = max(ats) if ats and all(a is not None for a in ats) else None
        m["seen"], m["report_errors"] = {}, {}
        for p in parts:
            for k, v in p.get("report_errors", {}).items():
                m["report_errors"][k] = m["report_errors"].get(k, 0) + v
            m["seen"].update(p.get("seen", {}))
        return m

    def psutil(self) -> list[psutil.Process]:
        out = []
        for p in self.procs:  # the python child under taskset (taskset execs it: same pid)
            try:
                out.append(psutil.Process(p.pid))
            except psutil.Error:
                pass
        return out

    def rss_mb(self) -> float:
        return round(sum(p.memory_info().rss for p in self.psutil()) / 2**20, 1)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def cpu_window(procs: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    """Each process's CPU over the same window, % of one core."""
    def used(p: psutil.Process) -> float:
        try:
            return sum(p.cpu_times()[:2])
        except psutil.Error:
            return float("nan")
    t0, c0 = time.monotonic(), {n: used(p) for n, p in procs.items()}
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {n: round(100.0 * (used(p) - c0[n]) / dt, 1) for n, p in procs.items()}


def list_nodes(c: LocalCluster) -> list:
    for attempt in range(3):  # a loaded leader may have lost an election meanwhile: ask the one there is
        try:
            with c.agents[leader_of(c)].client(timeout=30) as client:
                return client.nodes()
        except AgentdError:
            if attempt == 2:
                raise
            time.sleep(2)
    return []


def up_hosts(nodes: list) -> list[str]:
    return [n.name for n in nodes if n.state == "up" and n.name.startswith("sim-")]


def one_size(root: Path, hosts: int, every: float, measure: float, kill_leader: bool, report: str = "relay", *,
             secure: bool = False, repeats: int = 1, spawns: int = 0, model: Path | None = None,
             profile: float = 0.0, code: Path | None = None, sim_procs: int = 0, join_rate: float = 16.0) -> dict:
    taskset = shutil.which("taskset")
    env = {"AGENTD_LOG_LEVEL": os.environ.get("FLEET_LOG_LEVEL", "warning"), **code_env(code)}
    seats: dict = {"max_voters": 3, "standby_learners": 0}
    if code is not None:  # agentd 0.1.0 reads max_voters only from its TOML file (its env parsing refuses "3")
        root.mkdir(parents=True, exist_ok=True)
        (root / "v010.toml").write_text("max_voters = 3\n")
        env["AGENTD_CONFIG"] = str(root / "v010.toml")
        seats = {}
    c = LocalCluster(root, hosts=[simulated_host(n, gpus=8, gpu_gib=80) for n in ("v1", "v2", "v3")],
                     extra_env=env, secure=secure, **seats)
    sim010 = None
    sims: Sims | None = None
    row: dict = {"hosts": hosts, "design": "v0.1.0 (learners)" if code else "voters + watchers",
                 "report": "unary" if code else report, "secure": secure, "report_every_s": every}
    try:
        c.start()
        if taskset:
            for a in c.agents.values():
                subprocess.run([taskset, "-a", "-p", "-c", "0", str(a.proc.pid)], capture_output=True)
        seeds = [a.listen for a in c.agents.values()]
        t_join = time.monotonic()
        if hosts and code is not None:  # the v0.1.0 design: learners, one simulator process
            out = root / "sim.json"
            (root / "learners").mkdir()
            argv = [sys.executable, "-c", SIMULATOR_010, json.dumps(seeds), str(hosts), str(every), str(out),
                    str(free_port_block(hosts)), str(root / "learners")]
            if taskset:
                argv = [taskset, "-c", "1", *argv]
            sim010 = subprocess.Popen(argv, stderr=open(root / "sim.log", "wb"),  # noqa: SIM115
                                      env={**os.environ, **code_env(code)}, cwd=root)
            deadline = time.monotonic() + 600
            while read(out).get("joined", 0) < hosts:
                if sim010.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"simulator stopped: {(root / 'sim.log').read_text()[-2000:]}")
                time.sleep(1)
        elif hosts:
            procs = sim_procs or max(1, -(-hosts // 512))
            row["sim_procs"] = procs
            sims = Sims(root, seeds, hosts, procs, every=every, mode=report,
                        tls=str(c.agents["v1"].tls_dir) if secure else "", join_rate=join_rate)
            deadline = time.monotonic() + max(300.0, 3 * hosts / join_rate)  # then measure the ones that joined
            last_print = 0.0
            while (s := sims.read())["joined"] < hosts:
                sims.check()
                if time.monotonic() > deadline:
                    if s["joined"] < 0.9 * hosts:
                        raise SystemExit(f"joining stopped at {s['joined']} of {hosts}: {s['errors']}")
                    break  # measure the ones there are: the row says how many joined

                if time.monotonic() - last_print > 15:
                    last_print = time.monotonic()
                    print(f"# {hosts} hosts: {s['joined']} joined after {time.monotonic() - t_join:.0f} s, "
                          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                time.sleep(1)
            row["joined"] = s["joined"]
            row["join_s"] = round(time.monotonic() - t_join, 1)
            deadline = time.monotonic() + 180  # every host reported: the leader counts it up
            while len(up := up_hosts(list_nodes(c))) < s["joined"] and time.monotonic() < deadline:
                sims.check()
                time.sleep(5)
            row["all_up_s"] = round(time.monotonic() - t_join, 1) if len(up) >= s["joined"] else None
            row["hosts_up_after_join"] = len(up)
        time.sleep(max(2 * every, 5))  # steady state: every host reported at least twice
        procs_cpu = {n: psutil.Process(a.proc.pid) for n, a in c.agents.items()}
        for k, p in enumerate(sims.psutil() if sims else []):
            procs_cpu[f"sim{k}"] = p
        windows, leaders = [], []
        for _ in range(repeats):
            leaders.append(leader_of(c))
            windows.append(cpu_window(procs_cpu, measure))
        leader = leader_of(c)
        cpus = [w[ld] for w, ld in zip(windows, leaders, strict=True)]
        nodes = list_nodes(c)
        row.update({
            "leader_cpu_percent": sorted(cpus)[len(cpus) // 2], "leader_cpu_runs": cpus,
            "leaders": sorted(set(leaders)) if len(set(leaders)) > 1 else leader,
            "voter_cpu_percent": {n: sorted(w[n] for w in windows)[len(windows) // 2] for n in c.agents},
            "loadavg": [round(x, 2) for x in os.getloadavg()], "hosts_up": len(up_hosts(nodes)),
            "leader_inventories": leader_inventories(c)})
        if sims is not None:
            s = sims.read()
            sim_cpu = sorted(sum(v for n, v in w.items() if n.startswith("sim")) for w in windows)[len(windows) // 2]
            rss = sims.rss_mb()
            via: dict[str, int] = {}
            for n in nodes:
                if n.name.startswith("sim-"):
                    via[n.reports_via or "leader"] = via.get(n.reports_via or "leader", 0) + 1
            row.update({"sim_cpu_percent": round(sim_cpu, 1), "sim_cpu_percent_per_host": round(sim_cpu / hosts, 4),
                        "sim_rss_mb": rss, "sim_rss_kb_per_host": round(1024 * rss / hosts, 1),
                        "reports_via": via,
                        **{k: s[k] for k in (*Sims.REPORTS, "repeats", "gaps", "divergent", "shared_applies",
                                             "n_errors")},
                        "sim_errors": s["errors"], "report_errors": s["report_errors"]})
        if profile and hosts:
            row["profile"] = profile_leader(c.agents[leader_of(c)].proc.pid, profile, root / "leader-profile.txt")
        print(json.dumps(row), flush=True)  # what is measured so far, should a later step fail
        if spawns and sims is not None and model is not None:
            row.update(commit_to_watcher(c, sims, up_hosts(nodes), spawns, model))
            print(json.dumps(row), flush=True)
        if kill_leader and sims is not None:
            row.update(failover(c, sims, sims.read()["joined"], every))
        return row
    finally:
        if sim010 is not None:
            sim010.kill()
            sim010.wait()
        if sims is not None:
            sims.stop()
        c.stop()


def leader_inventories(c: LocalCluster, names: set[str] | None = None) -> dict[str, int]:
    """How host inventories reached the agents (all, or `names`) as leader: agentd_report_inventories_total by
    `how` (whole, named, asked), summed over those that answer /metrics."""
    out = {"whole": 0, "named": 0, "asked": 0}
    for n, a in c.agents.items():
        if (names is not None and n not in names) or a.proc.poll() is not None:
            continue
        try:
            with urllib.request.urlopen(f"http://{a.http_listen}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            continue
        for how, n in re.findall(r'^agentd_report_inventories_total\{how="(\w+)"\} (\S+)$', text, re.M):
            out[how] = out.get(how, 0) + int(float(n))
    return out


def failover(c: LocalCluster, sims: Sims, hosts: int, every: float) -> dict:
    """kill -9 the leader; the time until every simulated watcher applied the new leader's commit index and
    names it leader, and the survivors' peak CPU meanwhile. Then, over the next 2 × AVOID + `every` seconds
    (hosts that left a voter come back to it), what the hosts' reports did since the kill (`after_failover`:
    fallbacks, inventories sent whole and named by digest) and the new leader's CPU."""
    from agentd.cluster.relay import RelayChoice

    row: dict = {}
    before = sims.read()
    leader = leader_of(c)
    survivors = [psutil.Process(a.proc.pid) for n, a in c.agents.items() if n != leader]
    received = leader_inventories(c, set(c.agents) - {leader})
    peak: dict[str, float] = {}
    t0 = time.monotonic()
    c.kill(leader, signal.SIGKILL)
    sampler = _CpuSampler(survivors, peak)
    sampler.start()
    try:
        new = c.wait_for_leader(60, not_=leader)[0]
    except AgentdError as exc:
        sampler.stop()
        return {"failover": f"no new leader: {exc}"}
    row["new_leader_s"] = round(time.monotonic() - t0, 2)
    with c.agents[new].client(timeout=10) as client:
        commit = client.status().commit_index
    done = False
    while time.monotonic() - t0 < 120:
        s = sims.read()
        if s["applied"] and min(s["applied"]) >= commit and s["leaders"] == [new] and len(s["applied"]) >= hosts:
            done = True
            break
        time.sleep(0.1)
    sampler.stop()
    row["all_watchers_follow_new_leader_s"] = round(time.monotonic() - t0, 2) if done else None
    s = sims.read()
    pairs = zip(s["applied"], s["by_leader"], strict=False)
    row["watchers_following_new_leader"] = sum(1 for a, ld in pairs if a >= commit and ld == new)
    names = {str(a.proc.pid): n for n, a in c.agents.items()}
    row["voters_peak_cpu_percent_during_failover"] = {names.get(k, k): v for k, v in peak.items()}
    row["failover_repeats_gaps_divergent"] = [s["repeats"], s["gaps"], s["divergent"]]
    settle = 2 * RelayChoice.AVOID + every
    row["new_leader_cpu_percent_after_failover"] = round(cpu_percent(c.agents[new].proc.pid, settle), 1)
    s = sims.read()
    row["after_failover"] = {k: s[k] - before[k] for k in Sims.REPORTS}
    # the survivors' counts since the kill: how the new leader learnt the hosts' inventories
    now = leader_inventories(c, set(c.agents) - {leader})
    row["after_failover_leader_inventories"] = {k: now[k] - received.get(k, 0) for k in now}
    row["after_failover_s"] = round(time.monotonic() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    cols = [("hosts", lambda r: r["hosts"]), ("report", lambda r: r.get("report")),
            ("tls", lambda r: "mTLS" if r.get("secure") else "-"), ("sims", lambda r: r.get("sim_procs", "")),
            ("join s", lambda r: r.get("join_s", "")),
            ("up", lambda r: r.get("hosts_up", str(r.get("failed", ""))[:40])),
            ("leader CPU % (windows)", lambda r: f"{r.get('leader_cpu_percent')} {r.get('leader_cpu_runs')}"),
            ("voters CPU %", lambda r: r.get("voter_cpu_percent", "")),
            ("load", lambda r: (r.get("loadavg") or [""])[0]),
            ("sim CPU%/host", lambda r: r.get("sim_cpu_percent_per_host", "")),
            ("sim KB/host", lambda r: r.get("sim_rss_kb_per_host", "")),
            ("spawn p50/p99 ms from reply; from call", lambda r: f"{r['reply_to_watcher_ms_p50']}/"
             f"{r['reply_to_watcher_ms_p99']}; {r['call_to_watcher_ms_p50']}/{r['call_to_watcher_ms_p99']} "
             f"(n={r['spawn_n']})" if "reply_to_watcher_ms_p50" in r else ""),
            ("failover s", lambda r: r.get("all_watchers_follow_new_leader_s", "")),
            ("peak CPU %", lambda r: r.get("voters_peak_cpu_percent_during_failover", "")),
            ("fallbacks, inventories whole/named", lambda r: f"{r.get('fallbacks', '')}, "
             f"{r.get('inventories_sent', '')}/{r.get('inventories_named', '')}"),
            ("leader got inventories whole/named/asked", lambda r: "{whole}/{named}/{asked}"
             .format(**r["leader_inventories"]) if "leader_inventories" in r else ""),
            ("after failover: hosts' fallbacks, whole/named; leader got whole/named/asked; its CPU %",
             lambda r: "{fallbacks}, {inventories_sent}/{inventories_named}; ".format(**r["after_failover"])
             + "{whole}/{named}/{asked}; ".format(**r["after_failover_leader_inventories"])
             + f"{r['new_leader_cpu_percent_after_failover']}" if "after_failover" in r else ""),
            ("rep/gap/div", lambda r: f"{r.get('repeats', '')}/{r.get('gaps', '')}/{r.get('divergent', '')}")]
    cells = [[h for h, _ in cols]] + [[str(f(r)) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join(" | ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--sim-child":
        sim_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="2048")
    ap.add_argument("--report-every", type=float, default=5.0,
                    help="seconds between a host's reports (default 5, the issue's condition; the daemon sends "
                         f"one every {REPORT_INTERVAL:g} s, which the voters relay: try --report-every "
                         f"{REPORT_INTERVAL:g})")
    ap.add_argument("--measure", type=float, default=30.0)
    ap.add_argument("--kill-leader", action="store_true")
    ap.add_argument("--secure", action="store_true", help="mutual TLS: every simulated host has its own "
                    "certificate from the cluster CA and its own connections (the issue's figures are secure)")
    ap.add_argument("--repeats", type=int, default=3, help="CPU windows of --measure seconds; the median is the row's")
    ap.add_argument("--spawns", type=int, default=0, help="deployments pinned to random simulated hosts, timed "
                    "from the commit to the target host's watcher applying its assignment")
    ap.add_argument("--sim-procs", type=int, default=0, help="simulator processes (default: one per 512 hosts)")
    ap.add_argument("--join-rate", type=float, default=16.0, help="hosts joining per second, all simulators together")
    ap.add_argument("--v010-hosts", default="", help="also run the v0.1.0 design (every host a Raft learner, "
                    "from a git worktree of the v0.1.0 tag, insecure, unary reports) at these sizes, e.g. 256,512; "
                    "compare with the same sizes of this design run insecure")
    ap.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy on the leader after the CPU "
                    "windows; the top entries go in the row")
    ap.add_argument("--report", default="relay",
                    help="comma-separated, each run at every size: relay (the daemon's default: a watcher's "
                         "ReportStream to the voter it watches from, which relays; to the leader if that fails), "
                         "direct (ReportStream to the leader), unary (one Agent/Report call per report, as 0.1.0)")
    args = ap.parse_args()
    rows = []
    modes = args.report.split(",")
    keep = os.environ.get("FLEET_KEEP_DIR")  # for debugging: the agents' logs stay there
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="agentd-fleet-")) as d:
        model = write_tiny_llama_gguf(Path(d) / "tiny.gguf") if args.spawns else None
        if args.v010_hosts:
            with release_worktree(Path(d) / "v0.1.0") as code:  # the tag, or its commit in a clone without tags
                for n in (int(x) for x in args.v010_hosts.split(",")):
                    try:
                        rows.append(one_size(Path(d) / f"n{n}-v010", n, 5.0, args.measure, False,
                                             repeats=args.repeats, code=code))
                    except (SystemExit, AgentdError) as exc:  # did not survive this size
                        rows.append({"hosts": n, "design": "v0.1.0 (learners)", "failed": str(exc)[-500:]})
                    print(json.dumps(rows[-1]), flush=True)
        for n in (int(x) for x in args.hosts.split(",") if x):
            for mode in modes:
                try:
                    rows.append(one_size(Path(d) / f"n{n}-{mode}", n, args.report_every, args.measure,
                                         args.kill_leader, mode, secure=args.secure, repeats=args.repeats,
                                         spawns=args.spawns, model=model, profile=args.profile,
                                         sim_procs=args.sim_procs, join_rate=args.join_rate))
                except (SystemExit, AgentdError) as exc:
                    rows.append({"hosts": n, "report": mode, "secure": args.secure, "failed": str(exc)[-500:]})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
