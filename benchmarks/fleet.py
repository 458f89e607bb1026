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
of steady state), and how many simulated hosts the leader counts as up. With
--kill-leader it then kills -9 the leader and reports the time until every
simulated watcher follows the new leader's state (its commit index applied).
The v0.1.0 design (every host a Raft learner) is not run here: it is the
design the issue measured at 0.16-0.33 % of a core per host.
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
from agentd.testing.localcluster import LocalCluster, simulated_host
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

async def _host(i, channels, stats):
    name = f"sim-{i:05d}"
    req = rpb.RaftJoinRequest(node_id=name, address=f"127.0.0.2:{20000 + i}", agent_version=AGENT_VERSION,
                              state_format=STATE_FORMAT, can_watch=True)
    for attempt in range(60):  # as RaftNode._join: a follower names the leader, ask each in turn
        try:
            reply = await rpb_grpc.RaftStub(channels[(i + attempt) % len(channels)]).Join(req, timeout=60)
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    assert reply.watcher, reply
    state = ClusterState()
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
    channels = [grpc.aio.insecure_channel(a) for a in seeds]
    stats = {"reports": 0, "failed": 0, "watchers": [], "errors": []}
    tasks = []
    for i in range(n):
        tasks.append(asyncio.get_running_loop().create_task(host(i, channels, stats)))
        if i % 64 == 63:
            await asyncio.sleep(0.5)  # joins in waves: each is a committed entry
    while True:
        ws = stats["watchers"]
        with open(out + ".tmp", "w") as f:
            json.dump({"joined": len(ws), "reports": stats["reports"], "failed": stats["failed"],
                       "errors": stats["errors"][:5],
                       "applied": sorted(w.last_applied for w in ws),
                       "leaders": sorted({w.leader_id or "" for w in ws})}, f)
        os.replace(out + ".tmp", out)
        await asyncio.sleep(0.25)

asyncio.run(main())
'''


def leader_of(c: LocalCluster) -> str:
    return c.wait_for_leader(60)[0]


def cpu_percent(pid: int, seconds: float) -> float:
    p = psutil.Process(pid)
    t0, c0 = time.monotonic(), sum(p.cpu_times()[:2])
    time.sleep(seconds)
    return 100.0 * (sum(p.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def one_size(root: Path, hosts: int, every: float, measure: float, kill_leader: bool, report: str = "stream") -> dict:
    taskset = shutil.which("taskset")
    c = LocalCluster(root, hosts=[simulated_host(n, gpus=8, gpu_gib=80) for n in ("v1", "v2", "v3")],
                     max_voters=3, standby_learners=0, extra_env={"AGENTD_LOG_LEVEL": "warning"})
    sim = None
    try:
        c.start()
        if taskset:
            for a in c.agents.values():
                subprocess.run([taskset, "-a", "-p", "-c", "0", str(a.proc.pid)], capture_output=True)
        out = root / "sim.json"
        seeds = [a.listen for a in c.agents.values()]
        if hosts:
            argv = [sys.executable, "-c", SIMULATOR, json.dumps(seeds), str(hosts), str(every), str(out), report]
            if taskset:
                argv = [taskset, "-c", "1", *argv]
            sim = subprocess.Popen(argv, stderr=open(root / "sim.log", "wb"), env={**os.environ})  # noqa: SIM115
            deadline = time.monotonic() + 600
            while read(out).get("joined", 0) < hosts:
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"simulator stopped: {(root / 'sim.log').read_text()[-2000:]}")
                time.sleep(1)
        time.sleep(max(2 * every, 5))  # steady state: every host reported at least twice
        leader = leader_of(c)
        cpu = cpu_percent(c.agents[leader].proc.pid, measure)
        for attempt in range(5):  # a loaded leader may have lost an election meanwhile: ask the one there is
            try:
                with c.agents[leader_of(c)].client(timeout=30) as client:
                    nodes = client.call("ListNodes", pb.ListNodesRequest()).nodes
                break
            except AgentdError:
                if attempt == 4:
                    raise
                time.sleep(2)
        row = {"hosts": hosts, "report": report, "leader_cpu_percent": round(cpu, 1),
               "hosts_up": sum(1 for n in nodes if n.state == "up" and n.name.startswith("sim-")),
               "report_failures": read(out).get("failed", 0) if hosts else 0}
        if kill_leader and hosts:
            t0 = time.monotonic()
            c.kill(leader, signal.SIGKILL)
            new = c.wait_for_leader(30, not_=leader)[0]
            with c.agents[new].client(timeout=10) as client:
                commit = client.status().commit_index
            while True:
                s = read(out)
                if s.get("applied") and min(s["applied"]) >= commit and s.get("leaders") == [new]:
                    break
                if time.monotonic() - t0 > 120:
                    break
                time.sleep(0.1)
            row["all_watchers_follow_new_leader_s"] = round(time.monotonic() - t0, 2)
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
    ap.add_argument("--report", default="stream",
                    help="stream (Agent/ReportStream, this release), unary (Agent/Report, as agentd 0.1.0), "
                         "or both, one after the other at each size")
    args = ap.parse_args()
    rows = []
    modes = ["unary", "stream"] if args.report == "both" else [args.report]
    with tempfile.TemporaryDirectory() as d:
        for n in (int(x) for x in args.hosts.split(",")):
            for mode in modes:
                rows.append(one_size(Path(d) / f"n{n}-{mode}", n, args.report_every, args.measure,
                                     args.kill_leader, mode))
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
