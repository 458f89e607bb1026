"""The leader's cost per host, with voters and watchers: real voters, simulated watcher hosts.

    .venv/bin/python benchmarks/fleet.py [--hosts 0,256,1024,2048] [--report-every 5] [--measure 30]

Three real `agentd serve` voters (max_voters 3, no standby learners, insecure)
pinned to CPU 0 with taskset; a simulator process pinned to CPU 1 runs HOSTS
simulated hosts in one asyncio loop, each with the real code a watcher host
runs: a Raft Join that makes it a watcher, agentd.cluster.raft.watch.Watcher
following a voter's Watch stream into its own ClusterState, and a Report to
the leader every --report-every seconds with an 8-GPU simulated inventory:
on one Agent/ReportStream per host with the daemon's client
(agentd/api/report_stream.py; a bare lease renewal once the first message
carried the inventory), or with --report unary one Agent/Report call per report
(how agentd 0.1.0 and this release before the stream reported); --report both
runs each at every size.

For each size: the leader's CPU (% of one core, psutil over --measure seconds
of steady state, --repeats windows, the median and all of them), every voter's
CPU, the load average, and how many simulated hosts the leader counts as up.
--secure gives every simulated host its own certificate from the cluster CA
and its own TLS connections (the issue's figures are with mTLS). --spawns N
deploys N one-replica deployments pinned to random up hosts and times from
Deploy's reply (the entry committed and applied on the leader) to the target
host's watcher applying its assignment (the simulator has no supervisor: that
is the moment a daemon would spawn). --profile S samples the leader with
py-spy after the CPU windows. With --kill-leader it then kills -9 the leader
and reports the time until every simulated watcher follows the new leader's
state (its commit index applied) and the survivors' peak CPU.
--v010-hosts runs the v0.1.0 design first (every host a Raft learner: v0.1.0's
own RaftNode per simulated host, from a git worktree of the tag, insecure,
unary reports). Everything started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agentd.errors import AgentdError
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb

SIMULATOR = r'''
import asyncio, json, os, sys, time
import grpc
from agentd.api.report_stream import ReportStream, StreamEnded
from agentd.cluster.state import ClusterState
from agentd.cluster.raft.watch import Watcher
from agentd.v1 import control_pb2 as pb, control_pb2_grpc as pb_grpc, raft_pb2 as rpb, raft_pb2_grpc as rpb_grpc
from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION

seeds, n, every, out = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
mode = sys.argv[5] if len(sys.argv) > 5 else "stream"
tls_dir = sys.argv[6] if len(sys.argv) > 6 else ""  # the CA's directory: every host gets its own certificate
targets_file = out + ".targets"  # the benchmark names hosts here; their watchers time the assignments they see
targets, seen = set(), {}  # host -> {deployment: monotonic time its watcher applied the assignment}

class TimedState(ClusterState):
    """The host's replicated state; for a target host, when an assignment to it was applied (the moment a
    daemon's supervisor would spawn it: this simulator has none)."""
    name = ""
    def apply(self, index, term, command):
        r = super().apply(index, term, command)
        if self.name in targets:
            mine = seen.setdefault(self.name, {})
            for a in self.assignments_on(self.name):
                if a.deployment not in mine:
                    mine[a.deployment] = time.monotonic()
        return r

def credentials(name):
    if not tls_dir:
        return None
    from pathlib import Path
    from agentd.security.ca import ROLE_NODE, issue_identity, load_ca
    from agentd.security.tls import TlsIdentity, channel_credentials
    global _ca
    if "_ca" not in globals():
        _ca = load_ca(Path(tls_dir), need_key=True)
    ident = issue_identity(_ca, name, role=ROLE_NODE, addresses=["127.0.0.2"])
    return channel_credentials(TlsIdentity(ident.ca_pem, ident.cert_pem, ident.key_pem, name, ROLE_NODE))

def open_channel(creds, address):
    if creds is None:
        return grpc.aio.insecure_channel(address)
    from agentd.security.tls import channel_options
    return grpc.aio.secure_channel(address, creds, options=channel_options())

def inventory(name):
    g = 80 * 2**30
    return json.dumps({"name": name, "cpu_count": 64, "memory_total": 2**40, "memory_available": 2**39,
        "gpus": [{"index": i, "uuid": f"GPU-{name}-{i}", "name": "NVIDIA H100 80GB HBM3 (simulated)",
                  "memory_total": g, "memory_used": 0, "compute_capability": "9.0"} for i in range(8)]})

async def host(i, channels, stats):
    try:
        await _host(i, channels, stats)
    except Exception as exc:
        stats["errors"].append(f"sim-{i:05d}: {exc!r}"[:300])

async def _host(i, shared, stats):
    name = f"sim-{i:05d}"
    creds = credentials(name)
    # With mTLS each host has its own connections, as real hosts do; insecure ones share the simulator's.
    channels = shared if creds is None else [open_channel(creds, a) for a in seeds]
    req = rpb.RaftJoinRequest(node_id=name, address=f"127.0.0.2:{20000 + i}", agent_version=AGENT_VERSION,
                              state_format=STATE_FORMAT, can_watch=True)
    for attempt in range(60):  # as RaftNode._join: a follower names the leader, ask each in turn
        try:
            reply = await rpb_grpc.RaftStub(channels[(i + attempt) % len(channels)]).Join(req, timeout=60)
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    assert reply.watcher, reply
    state = TimedState()
    state.name = name
    w = Watcher(name, reply.cluster_id, state, list(seeds), lambda a: channels[seeds.index(a) % len(channels)])
    stats["watchers"].append(w)
    asyncio.get_running_loop().create_task(w.run())
    inv = inventory(name)
    rs = ReportStream(name, f"127.0.0.2:{20000 + i}", timeout=5.0)  # the daemon's report client
    await asyncio.sleep(every * (i / n))  # spread the reports over the period
    while True:
        if w.leader_address:
            ch = channels[seeds.index(w.leader_address) % len(channels)] if w.leader_address in seeds else None
            if ch is not None:
                try:
                    if mode == "unary":  # agentd 0.1.0's report: one call per report, the whole inventory each time
                        await pb_grpc.AgentStub(ch).Report(pb.ReportRequest(node=name,
                            address=f"127.0.0.2:{20000 + i}", inventory_json=inv, agent_version=AGENT_VERSION,
                            state_format=STATE_FORMAT, wire_version=WIRE_VERSION), timeout=5)
                    else:
                        await rs.send(ch, w.leader_address, inventory_json=inv, instances=[],
                                      version=(AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, ""), wall_time=time.time())
                    stats["reports"] += 1
                except (grpc.aio.AioRpcError, StreamEnded, TimeoutError):
                    stats["failed"] += 1
        await asyncio.sleep(every)

async def main():
    channels = [open_channel(None, a) for a in seeds]
    stats = {"reports": 0, "failed": 0, "watchers": [], "errors": []}
    tasks = []
    for i in range(n):
        tasks.append(asyncio.get_running_loop().create_task(host(i, channels, stats)))
        if i % 64 == 63:
            await asyncio.sleep(0.5)  # joins in waves: each is a committed entry
    while True:
        ws = stats["watchers"]
        try:
            with open(targets_file) as f:
                targets.update(json.load(f))
        except (OSError, ValueError):
            pass
        with open(out + ".tmp", "w") as f:
            json.dump({"joined": len(ws), "reports": stats["reports"], "failed": stats["failed"],
                       "errors": stats["errors"][:5],
                       "applied": [w.last_applied for w in ws],
                       "by_leader": [w.leader_id or "" for w in ws],
                       "leaders": sorted({w.leader_id or "" for w in ws}), "seen": seen}, f)
        os.replace(out + ".tmp", out)
        await asyncio.sleep(0.25)

asyncio.run(main())
'''


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
    if code is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join(str(p) for p in (code, code / "plugins" / "llamabox",
                                                           code / "plugins" / "vllm"))}


def release_worktree(ref: str, where: Path) -> Path:
    """A git worktree of `ref` (a tag) under `where`; removed by the caller with remove_worktree."""
    repo = Path(__file__).resolve().parent.parent
    path = where / ref
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(path), ref], check=True,
                   capture_output=True, timeout=120)
    return path


def remove_worktree(path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True,
                   timeout=120)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, timeout=120)


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


def commit_to_watcher(c: LocalCluster, out: Path, up: list[str], spawns: int, model: Path) -> dict:
    """Deploy `spawns` one-replica deployments one at a time, each pinned to a different simulated host, and
    time from Deploy's reply (the entry committed and applied on the leader) to that host's watcher applying
    the assignment that targets it; also from the Deploy call's start (which adds placement and the commit)."""
    import random
    rng = random.Random(len(up))
    names = rng.sample(sorted(up), min(spawns, len(up)))  # hosts the leader counts as up: it places on those
    Path(str(out) + ".targets").write_text(json.dumps(names))
    time.sleep(1.0)  # the simulator reads the targets every 0.25 s
    sent: dict[str, tuple[str, float, float]] = {}
    failed: list[str] = []
    for k, host in enumerate(names):
        name = f"spawn{k}"
        spec = pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=1,
                                 pin=[pb.GpuPin(host=host, gpus=[0])])
        try:
            with c.agents[leader_of(c)].client(timeout=30) as client:
                client.status()  # the channel is up (TLS handshake done) before the clock starts
                t0 = time.monotonic()
                client.call("Deploy", pb.DeployRequest(spec=spec))
                t1 = time.monotonic()
        except AgentdError as exc:  # the host went down meanwhile, say: counted as not placed
            failed.append(f"{name}: {exc}"[:200])
            continue
        sent[name] = (host, t0, t1)
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = read(out).get("seen", {})
        if all(d in seen.get(h, {}) for d, (h, _, _) in sent.items()):
            break
        time.sleep(0.25)
    seen = read(out).get("seen", {})
    from_reply, from_call, missing = [], [], []
    for d, (h, t0, t1) in sent.items():
        t = seen.get(h, {}).get(d)
        if t is None:
            missing.append(d)
            continue
        from_reply.append(1000 * (t - t1))
        from_call.append(1000 * (t - t0))

    def pct(xs: list[float], q: float) -> float | None:
        return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None
    return {"spawn_n": len(from_reply), "spawn_missing": missing, "spawn_not_placed": failed,
            "reply_to_watcher_ms_p50": pct(from_reply, 0.5), "reply_to_watcher_ms_p99": pct(from_reply, 0.99),
            "reply_to_watcher_ms_max": pct(from_reply, 1.0),
            "call_to_watcher_ms_p50": pct(from_call, 0.5), "call_to_watcher_ms_p99": pct(from_call, 0.99),
            "call_to_watcher_ms_max": pct(from_call, 1.0)}


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def one_size(root: Path, hosts: int, every: float, measure: float, kill_leader: bool, report: str = "stream", *,
             secure: bool = False, repeats: int = 1, spawns: int = 0, model: Path | None = None,
             profile: float = 0.0, code: Path | None = None) -> dict:
    taskset = shutil.which("taskset")
    env = {"AGENTD_LOG_LEVEL": "warning", **code_env(code)}
    seats: dict = {"max_voters": 3, "standby_learners": 0}
    if code is not None:  # agentd 0.1.0 reads max_voters only from its TOML file (its env parsing refuses "3")
        root.mkdir(parents=True, exist_ok=True)
        (root / "v010.toml").write_text("max_voters = 3\n")
        env["AGENTD_CONFIG"] = str(root / "v010.toml")
        seats = {}
    c = LocalCluster(root, hosts=[simulated_host(n, gpus=8, gpu_gib=80) for n in ("v1", "v2", "v3")],
                     extra_env=env, secure=secure, **seats)
    sim = None
    try:
        c.start()
        if taskset:
            for a in c.agents.values():
                subprocess.run([taskset, "-a", "-p", "-c", "0", str(a.proc.pid)], capture_output=True)
        out = root / "sim.json"
        seeds = [a.listen for a in c.agents.values()]
        if hosts:
            tls = str(c.agents["v1"].tls_dir) if secure else ""
            argv = [sys.executable, "-c", SIMULATOR, json.dumps(seeds), str(hosts), str(every), str(out), report, tls]
            if code is not None:  # the v0.1.0 design: learners
                (root / "learners").mkdir()
                argv = [sys.executable, "-c", SIMULATOR_010, json.dumps(seeds), str(hosts), str(every), str(out),
                        str(free_port_block(hosts)), str(root / "learners")]
            if taskset:
                argv = [taskset, "-c", "1", *argv]
            sim = subprocess.Popen(argv, stderr=open(root / "sim.log", "wb"),  # noqa: SIM115
                                   env={**os.environ, **code_env(code)}, cwd=root)
            deadline = time.monotonic() + 600
            while read(out).get("joined", 0) < hosts:
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"simulator stopped: {(root / 'sim.log').read_text()[-2000:]}")
                time.sleep(1)
        time.sleep(max(2 * every, 5))  # steady state: every host reported at least twice
        leader = leader_of(c)
        cpus = [cpu_percent(c.agents[leader].proc.pid, measure) for _ in range(repeats)]
        cpu = sorted(cpus)[len(cpus) // 2]
        for attempt in range(5):  # a loaded leader may have lost an election meanwhile: ask the one there is
            try:
                with c.agents[leader_of(c)].client(timeout=30) as client:
                    nodes = client.call("ListNodes", pb.ListNodesRequest()).nodes
                break
            except AgentdError:
                if attempt == 4:
                    raise
                time.sleep(2)
        row = {"hosts": hosts, "design": "v0.1.0 (learners)" if code else "voters + watchers",
               "report": "unary" if code else report, "secure": secure, "leader_cpu_percent": round(cpu, 1),
               "leader_cpu_runs": [round(x, 1) for x in cpus],
               "voter_cpu_percent": {n: round(cpu_percent(a.proc.pid, 5), 1) for n, a in c.agents.items()},
               "loadavg": [round(x, 2) for x in os.getloadavg()],
               "hosts_up": sum(1 for n in nodes if n.state == "up" and n.name.startswith("sim-")),
               "report_failures": read(out).get("failed", 0) if hosts else 0}
        if profile and hosts:
            row["profile"] = profile_leader(c.agents[leader_of(c)].proc.pid, profile, root / "leader-profile.txt")
        if spawns and hosts and model is not None:
            print(json.dumps(row), flush=True)  # what is measured so far, should a later step fail
            up = [n.name for n in nodes if n.state == "up" and n.name.startswith("sim-")]
            row.update(commit_to_watcher(c, out, up, spawns, model))
            print(json.dumps(row), flush=True)
        if kill_leader and hosts:
            leader = leader_of(c)
            survivors = [psutil.Process(a.proc.pid) for n, a in c.agents.items() if n != leader]
            peak: dict[str, float] = {}
            t0 = time.monotonic()
            c.kill(leader, signal.SIGKILL)
            sampler = _CpuSampler(survivors, peak)
            sampler.start()
            try:
                new = c.wait_for_leader(60, not_=leader)[0]
            except AgentdError as exc:
                sampler.stop()
                row["failover"] = f"no new leader: {exc}"
                return row
            with c.agents[new].client(timeout=10) as client:
                commit = client.status().commit_index
            while True:
                s = read(out)
                if s.get("applied") and min(s["applied"]) >= commit and s.get("leaders") == [new] \
                        and len(s["applied"]) == hosts:
                    break
                if time.monotonic() - t0 > 120:
                    break
                time.sleep(0.1)
            sampler.stop()
            row["all_watchers_follow_new_leader_s"] = round(time.monotonic() - t0, 2)
            s = read(out)
            pairs = zip(s.get("applied", []), s.get("by_leader", []), strict=False)
            row["watchers_following_new_leader"] = sum(1 for a, ld in pairs if a >= commit and ld == new)
            row["watchers_leaders_at_end"] = s.get("leaders")
            names = {str(a.proc.pid): n for n, a in c.agents.items()}
            row["voters_peak_cpu_percent_during_failover"] = {names.get(k, k): v for k, v in peak.items()}
        return row
    finally:
        if sim is not None:
            sim.kill()
            sim.wait()
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="0,256,1024,2048")
    ap.add_argument("--report-every", type=float, default=5.0)
    ap.add_argument("--measure", type=float, default=30.0)
    ap.add_argument("--kill-leader", action="store_true")
    ap.add_argument("--secure", action="store_true", help="mutual TLS: every simulated host has its own "
                    "certificate from the cluster CA and its own connections (the issue's figures are secure)")
    ap.add_argument("--repeats", type=int, default=3, help="CPU windows of --measure seconds; the median is the row's")
    ap.add_argument("--spawns", type=int, default=0, help="deployments pinned to random simulated hosts, timed "
                    "from the commit to the target host's watcher applying its assignment")
    ap.add_argument("--v010-hosts", default="", help="also run the v0.1.0 design (every host a Raft learner, "
                    "from a git worktree of the v0.1.0 tag, insecure, unary reports) at these sizes, e.g. 256,512; "
                    "compare with the same sizes of this design run insecure")
    ap.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy on the leader after the CPU "
                    "windows; the top entries go in the row")
    ap.add_argument("--report", default="stream",
                    help="stream (Agent/ReportStream, this release), unary (Agent/Report, as agentd 0.1.0), "
                         "or both, one after the other at each size")
    args = ap.parse_args()
    rows = []
    modes = ["unary", "stream"] if args.report == "both" else [args.report]
    with tempfile.TemporaryDirectory(prefix="agentd-fleet-") as d:
        model = write_tiny_llama_gguf(Path(d) / "tiny.gguf") if args.spawns else None
        if args.v010_hosts:
            code = release_worktree("v0.1.0", Path(d))
            try:
                for n in (int(x) for x in args.v010_hosts.split(",")):
                    try:
                        rows.append(one_size(Path(d) / f"n{n}-v010", n, args.report_every, args.measure, False,
                                             repeats=args.repeats, code=code))
                    except (SystemExit, AgentdError) as exc:  # did not survive this size
                        rows.append({"hosts": n, "design": "v0.1.0 (learners)", "failed": str(exc)[-500:]})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                remove_worktree(code)
        for n in (int(x) for x in args.hosts.split(",") if x):
            for mode in modes:
                rows.append(one_size(Path(d) / f"n{n}-{mode}", n, args.report_every, args.measure,
                                     args.kill_leader, mode, secure=args.secure, repeats=args.repeats,
                                     spawns=args.spawns, model=model, profile=args.profile))
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
