"""The leader's CPU with hosts reporting to it directly vs through a voter that relays (docs/cluster.md,
"Reports through a voter"), with real agents.

    .venv/bin/python benchmarks/relay.py [--hosts 256,1024] [--interval 1] [--seconds 20] [--repeats 2]

Three real voters (`agentd serve`, AGENTD_VOTERS) pinned to CPU 0 with taskset; one simulator process pinned
to CPU 1 opens HOSTS Agent/ReportStream streams (the real host-side ReportStream client; a full first message
with a simulated 8-GPU inventory, then a bare renewal every INTERVAL seconds, spread over the interval):
`direct` to the leader, `relayed` to a voter that does not lead, which relays them on one RelayReports
stream. psutil reads each voter's CPU over `--seconds` after a warm-up; the figure is % of one core,
with the load average beside it (this machine is shared).

This one isolates the report path (no joins, no watch streams, insecure). The issue-16 figures at 2,048
hosts, relayed as watchers report by default, with mTLS, joins and watch streams, come from
benchmarks/fleet.py (`--report relay,direct` compares the two paths there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.testing.localcluster import LocalCluster, simulated_host  # noqa: E402

VOTERS = ("v1", "v2", "v3")


async def simulate(target: str, hosts: int, interval: float, seconds: float) -> None:
    import grpc

    from agentd.api.report_stream import ReportStream
    from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION

    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, hosts // 128))]
    version = (AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, "")
    failures = 0

    async def host(i: int) -> None:
        nonlocal failures
        name = f"sim{i:05d}"
        inventory = json.dumps(simulated_host(name, gpus=8, gpu_gib=80))
        stream = ReportStream(name, f"127.0.0.2:{10000 + i}", timeout=10.0)
        await asyncio.sleep(interval * i / hosts)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                await stream.send(channels[i % len(channels)], target, inventory_json=inventory, instances=[],
                                  version=version, wall_time=time.time())
            except Exception:
                failures += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t)))

    await asyncio.gather(*(host(i) for i in range(hosts)))
    print(json.dumps({"failures": failures}), flush=True)


def cpu_percent(procs: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    before = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
    time.sleep(seconds)
    return {n: round(100 * (sum(p.cpu_times()[:2]) - before[n]) / seconds, 1) for n, p in procs.items()}


def run(hosts: int, mode: str, interval: float, seconds: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="agentd-relay-bench-"))
    c = LocalCluster(root / "c", hosts=[simulated_host(n, gpus=1) for n in VOTERS], max_voters=3,
                     extra_env={"AGENTD_VOTERS": ",".join(VOTERS)})
    taskset = shutil.which("taskset")
    sim = None
    try:
        c.start(timeout=120)
        c.wait_for_members(3, 60, voters=True)
        leader = c.wait_for_leader(30)[0]
        if taskset:
            for a in c.agents.values():
                subprocess.run([taskset, "-a", "-p", "-c", "0", str(a.proc.pid)], capture_output=True)
        target = c.agents[leader if mode == "direct" else next(v for v in VOTERS if v != leader)].listen
        warm = 20.0
        argv = [sys.executable, __file__, "--simulate", target, "--hosts", str(hosts), "--interval", str(interval),
                "--seconds", str(warm + seconds + 5)]
        if taskset:
            argv = [taskset, "-c", "1", *argv]
        sim = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        time.sleep(warm)
        procs = {n: psutil.Process(a.proc.pid) for n, a in c.agents.items()}
        cpu = cpu_percent(procs, seconds)
        with c.agents[leader].client(timeout=10) as client:
            nodes = client.nodes()
        up = sum(1 for n in nodes if n.name.startswith("sim") and n.state == "up")
        via = sorted({n.reports_via for n in nodes if n.name.startswith("sim")})
        out, _ = sim.communicate(timeout=60)
        return {"hosts": hosts, "mode": mode, "interval_s": interval, "leader": leader,
                "leader_cpu_pct": cpu[leader], "voters_cpu_pct": cpu, "sim_up": up, "reports_via": via,
                "load_avg": round(os.getloadavg()[0], 1),
                **(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})}
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
        c.stop(drain=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="256,1024")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="direct,relayed")
    ap.add_argument("--simulate", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.simulate:
        asyncio.run(simulate(args.simulate, int(args.hosts), args.interval, args.seconds))
        return
    for hosts in (int(h) for h in args.hosts.split(",")):
        for _ in range(args.repeats):
            for mode in args.modes.split(","):
                print(json.dumps(run(hosts, mode, args.interval, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
