"""Failover, deploy latency and coordinator load, with real `agentd serve` processes on loopback.

    .venv/bin/python benchmarks/failover.py [--runs 10] [--members 500] [--cpu-seconds 20] [--skip-cpu]
    .venv/bin/python benchmarks/failover.py --only e --hung-timeouts 1s,default   # before/after a change
    .venv/bin/python benchmarks/failover.py --soak 600 --soak-hosts 200 [--soak-burn 1]   # not part of a default run

(a) SIGKILL of the leader -> a new leader ACCEPTS a Deploy: Deploy calls are
    sent round-robin to the two survivors (each with a 1 s deadline, a fresh
    name per attempt) from the moment the signal is sent; measured to the
    first successful reply. Three agents, default timeouts (election timeout
    1-2 s, heartbeat 100 ms). The killed agent is restarted (with its disk)
    before the next run, so every run kills a leader of a whole cluster.
(b) Deploy latency on a healthy cluster: the client-observed Deploy RPC, sent
    to the leader and to a follower (which forwards it); and from the call
    until a follower has applied the entry to its own copy of the state
    (its Status.last_applied reaches the reply's index, polled every 2 ms).
    A follower's `Get` is answered by the leader (reads are forwarded), so
    it shows the assignment as soon as the Deploy returns. With llama-server
    installed, also Deploy -> the replica RUNNING (ListInstances, 10 ms polls).
(c) (a) again with `--election-timeout 500ms`.
(e) Like (a) and (c), but the leader is frozen with SIGSTOP instead of killed:
    its sockets stay open, so no follower sees its stream break and the new
    leader is found by the election timeout (then SIGCONT; it rejoins). Once
    with each `--hung-timeouts` setting (`default`, or an --election-timeout
    such as `1s`, which is 1-2 s: the defaults before agentd 0.2). Also shown:
    when the new leader was elected (its "became leader" log line).
(f) Stalls: no election from a pause that no follower outlived. `--runs`
    times each, one agent or all three are frozen with SIGSTOP, then resumed;
    3 s later the term is compared with the one before. The leader alone for
    0.5 s (under the election timeout) and all three for 1.5 s (a frozen
    machine or VM: nobody ran, so nobody may judge anyone) must not change
    it; the leader alone for 3 s must (the followers ran and elected). Also
    counted from the logs: leaders' step-downs for want of a quorum.
(s) `--soak SECONDS`: no spurious election. Three agents with the default
    timeouts (or `--soak-timeout`) run for SECONDS while `--soak-hosts`
    simulated hosts report to the leader every `--soak-report-interval`
    seconds (the Report path of (d)), and `--soak-burn` processes spin on the
    CPUs. Every second each agent's Status is read; any change of term or
    leader is an election that nothing provoked. Also counted from the logs:
    elections started, leaders' step-downs for want of a quorum.
(d) The leader's CPU with `--members` simulated hosts heartbeating every
    second: one agent leads a one-node cluster; a separate process sends
    Agent.Report for each member once a second (spread evenly over the
    second; distinct names, 8-GPU H100 inventories, one running instance
    each). psutil samples the agent's CPU every second for `--cpu-seconds`
    after a warm-up (the first tick commits every new host as up).

Deployments use the llamabox runtime and the tiny GGUF, one replica, and are
deleted after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

NAMES = ("a", "b", "c")


def _spec(model: Path, name: str) -> pb.DeploymentSpec:
    return pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=1,
                             options=pb.RuntimeOptions(ctx_size=256))


class Bench:
    """A LocalCluster plus one cached channel per agent."""

    def __init__(self, root: Path, election_timeout: str = ""):
        base = free_port_block()
        self.c = LocalCluster(root, hosts=[simulated_host(n, gpus=2, gpu_gib=24) for n in NAMES],
                              election_timeout=election_timeout,
                              extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]"})
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, name: str) -> pb_grpc.ControlStub:
        if name not in self._channels:
            self._channels[name] = grpc.insecure_channel(self.c.agents[name].listen)
        return pb_grpc.ControlStub(self._channels[name])

    def status(self, name: str) -> pb.StatusReply:
        return self.stub(name).Status(pb.StatusRequest(), timeout=2)

    def whole(self, timeout: float = 60) -> str:
        """All agents alive, agreeing on one leader, and caught up; returns the leader."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen = {(s.leader_id, s.term) for s in (self.status(n) for n in NAMES)}
                if len(seen) == 1:
                    leader = next(iter(seen))[0]
                    if leader:
                        commit = self.status(leader).commit_index
                        if all(self.status(n).last_applied >= commit for n in NAMES):
                            return leader
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"the cluster did not come together within {timeout:g}s; logs in {self.c.root}")

    def delete_all(self, leader: str) -> None:
        stub = self.stub(leader)
        for d in stub.List(pb.ListRequest(), timeout=10).deployments:
            stub.Delete(pb.DeleteRequest(name=d.spec.name), timeout=10)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self.c.stop()


def failover_runs(root: Path, model: Path, runs: int, election_timeout: str,
                  sig: signal.Signals = signal.SIGKILL, elected: list[float] | None = None) -> list[float]:
    """(a) / (c) / (e): seconds from the signal to the leader to the first accepted Deploy.

    `elected` gets, per run, the seconds from the signal to the new leader's "became leader" log line.
    """
    b = Bench(root, election_timeout)
    times = []
    try:
        b.c.start()
        b.c.wait_for_inventories()
        for run in range(runs):
            leader = b.whole()
            survivors = [n for n in NAMES if n != leader]
            for n in survivors:  # connections up before the clock starts
                b.status(n)
            t0, wall0 = time.perf_counter(), time.time()
            b.c.agents[leader].proc.send_signal(sig)
            attempt = 0
            while True:
                via = survivors[attempt % 2]
                attempt += 1
                try:
                    b.stub(via).Deploy(pb.DeployRequest(spec=_spec(model, f"fo{run}-{attempt}")), timeout=1.0)
                    break
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise SystemExit(f"unexpected answer from {via}: {exc.code().name}: {exc.details()}") from None
                if time.perf_counter() - t0 > 30:
                    raise SystemExit(f"no Deploy accepted within 30 s; logs in {root}")
            times.append(time.perf_counter() - t0)
            if elected is not None:
                new = _leader_of(b, survivors)
                seen = [t for t in _log_times(b.c.agents[new].log_file, "became leader") if t >= wall0]
                if seen:
                    elected.append(seen[0] - wall0)
            if sig == signal.SIGSTOP:
                b.delete_all(_leader_of(b, survivors))
                b.c.agents[leader].proc.send_signal(signal.SIGCONT)
                continue
            b.c.agents[leader].proc.wait(timeout=10)
            b.delete_all(_leader_of(b, survivors))
            b.c.start_agent(leader)
        b.delete_all(b.whole())
    finally:
        b.close()
    return times


def _log_times(path: Path, msg: str) -> list[float]:
    """Wall-clock times of an agent's JSON log lines whose message is `msg`."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"msg":"{msg}"' not in line:
            continue
        try:
            ts = json.loads(line)["ts"]
        except (ValueError, KeyError):
            continue
        out.append(datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
                   .replace(tzinfo=datetime.UTC).timestamp())
    return out


def _leader_of(b: Bench, names: list[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            s = b.status(names[0])
            if s.leader_id in names:
                return s.leader_id
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    raise SystemExit("survivors have no leader")


def deploy_latency(root: Path, model: Path, runs: int) -> dict[str, list[float]]:
    """(b): Deploy RPC on the leader and via a follower; until a follower applied it; until RUNNING."""
    b = Bench(root)
    out: dict[str, list[float]] = {"leader": [], "follower": [], "applied": [], "running": []}
    try:
        b.c.start()
        b.c.wait_for_inventories()
        leader = b.whole()
        follower = next(n for n in NAMES if n != leader)
        other = next(n for n in NAMES if n not in (leader, follower))
        for run in range(runs):
            for via, key in ((leader, "leader"), (follower, "follower")):
                name = f"lat{run}-{key}"
                t0 = time.perf_counter()
                reply = b.stub(via).Deploy(pb.DeployRequest(spec=_spec(model, name)), timeout=30)
                out[key].append(time.perf_counter() - t0)
                while b.status(other).last_applied < reply.index:
                    time.sleep(0.002)
                out["applied"].append(time.perf_counter() - t0)
                deadline = time.perf_counter() + 20
                while time.perf_counter() < deadline:
                    inst = b.stub(leader).ListInstances(pb.ListInstancesRequest(deployment=name), timeout=5).instances
                    if inst and all(i.state == "RUNNING" for i in inst):
                        out["running"].append(time.perf_counter() - t0)
                        break
                    if any(i.state == "FATAL" for i in inst):
                        break  # no llama-server here: not measured
                    time.sleep(0.01)
                b.stub(leader).Delete(pb.DeleteRequest(name=name), timeout=10)
    finally:
        b.close()
    return out


# ---------------------------------------------------------------------- (d) coordinator load


def member_inventory(i: int) -> dict[str, Any]:
    inv = simulated_host(f"sim-{i:04d}", gpus=8, gpu_gib=80, gpu_name="NVIDIA H100 80GB HBM3",
                         memory_gib=2048, labels={"rack": f"r{i // 40}", "zone": "z1"})
    inv["address"] = f"10.{i // 250}.{i % 250}.1:7070"
    inv["cpu_count"] = 224
    for g in inv["gpus"]:
        g["memory_used"] = 62 * 2**30 if g["index"] < 4 else 512 * 2**20
        g["utilization"] = 0.87 if g["index"] < 4 else 0.0
        g["pci_bus_id"] = f"00000000:{0x18 + g['index']:02X}:00.0"
    return inv


async def send_reports(address: str, members: int, seconds: float, interval: float = 1.0) -> dict[str, Any]:
    """Every member reports once per `interval` seconds, spread evenly; returns latencies and errors."""
    reqs = []
    for i in range(members):
        inv = member_inventory(i)
        inst = pb.Instance(instance_id=f"m{i}-r0-g1", deployment=f"m{i}", replica=0, generation=1, part=0,
                           host=inv["name"], gpus=[0, 1, 2, 3], role="main", state="RUNNING",
                           reason="ready after 41.2s", endpoint=f"{inv['address'].split(':')[0]}:40000", term=2,
                           pid=10000 + i)
        reqs.append(pb.ReportRequest(node=inv["name"], address=inv["address"], inventory_json=json.dumps(inv),
                                     instances=[inst]))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.AgentStub(ch)

        async def one(req: pb.ReportRequest) -> None:
            t = time.perf_counter()
            try:
                await stub.Report(req, timeout=5)
                latencies.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        loop = asyncio.get_running_loop()
        start = loop.time()
        period = interval / members
        tasks: set[asyncio.Task] = set()
        k = 0
        while loop.time() - start < seconds:
            due = start + k * period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(reqs[k % members]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        await asyncio.gather(*tasks)
    return {"sent": k, "seconds": seconds, "latencies": latencies, "errors": errors}


def coordinator_cpu(root: Path, members: int, seconds: float, warmup: float) -> dict[str, Any]:
    c = LocalCluster(root, hosts=[simulated_host("leader", gpus=8, gpu_gib=80)])
    try:
        c.start()
        c.wait_for_inventories()
        proc = psutil.Process(c.agents["leader"].proc.pid)
        proc.cpu_percent(None)
        idle = []
        for _ in range(5):
            time.sleep(1)
            idle.append(proc.cpu_percent(None))
        sender = subprocess.Popen(
            [sys.executable, __file__, "--_send", c.agents["leader"].listen, str(members), str(warmup + seconds)],
            stdout=subprocess.PIPE, text=True)
        time.sleep(warmup)
        proc.cpu_percent(None)
        samples = []
        for _ in range(int(seconds)):
            time.sleep(1)
            samples.append(proc.cpu_percent(None))
        out, _ = sender.communicate(timeout=120)
        sent = json.loads(out)
        with c.any_client(timeout=10) as cl:
            nodes = cl.call("ListNodes", pb.ListNodesRequest()).nodes
            status = cl.status()
        rss = proc.memory_info().rss
    finally:
        c.stop()
    return {"idle": idle, "busy": samples, "sent": sent, "nodes": len(nodes), "commit_index": status.commit_index,
            "rss": rss}


# ---------------------------------------------------------------------- (f) stalls


STALLS = (("the leader for 0.5 s", False, 0.5, False), ("all three for 1.5 s", True, 1.5, False),
          ("the leader for 3 s", False, 3.0, True))  # (what, every agent, seconds frozen, a new term expected)


def stall_runs(root: Path, runs: int, resumed: list[float]) -> tuple[dict[str, int], int]:
    """(f): per kind of stall, in how many of `runs` the term changed; and the check-quorum step-downs.

    `resumed` gets, per run where a frozen leader was deposed, the seconds from its SIGCONT to its
    "stepped down" log line."""
    b = Bench(root)
    changed: dict[str, int] = {}
    try:
        b.c.start()
        b.c.wait_for_inventories()
        wall0 = time.time()
        for what, everyone, seconds, _ in STALLS:
            changed[what] = 0
            for _ in range(runs):
                leader = b.whole()
                term = b.status(leader).term
                frozen = list(NAMES) if everyone else [leader]
                for n in frozen:
                    b.c.agents[n].proc.send_signal(signal.SIGSTOP)
                time.sleep(seconds)
                cont = time.time()
                for n in frozen:
                    b.c.agents[n].proc.send_signal(signal.SIGCONT)
                time.sleep(3.0)
                changed[what] += b.status(b.whole()).term != term
                down = [t for t in _log_times(b.c.agents[leader].log_file, "stepped down") if t >= cont]
                if down and not everyone:
                    resumed.append(down[0] - cont)
        stepdowns = sum(sum(1 for t in _log_times(b.c.agents[n].log_file, "cannot hear a quorum of voters")
                            if t >= wall0) for n in NAMES)
    finally:
        b.close()
    return changed, stepdowns


# ---------------------------------------------------------------------- (s) soak: no spurious election


def soak(root: Path, seconds: float, hosts: int, report_interval: float, burn: int,
         election_timeout: str) -> dict[str, Any]:
    """(s): three agents left alone (but loaded) for `seconds`; every leader or term change is counted."""
    b = Bench(root, election_timeout)
    burners: list[subprocess.Popen] = []
    sender = None
    try:
        b.c.start()
        b.c.wait_for_inventories()
        leader = b.whole()
        term = b.status(leader).term
        wall0 = time.time()
        if hosts:
            sender = subprocess.Popen(
                [sys.executable, __file__, "--_send", b.c.agents[leader].listen, str(hosts), str(seconds),
                 str(report_interval)], stdout=subprocess.PIPE, text=True)
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burn)]
        changes: list[str] = []
        polls = failed = 0
        procs = {n: psutil.Process(b.c.agents[n].proc.pid) for n in NAMES}
        for p in procs.values():
            p.cpu_percent(None)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            for n in NAMES:
                polls += 1
                try:
                    s = b.status(n)
                except grpc.RpcError:
                    failed += 1
                    continue
                if (s.leader_id, s.term) != (leader, term):
                    changes.append(f"{time.time() - wall0:.0f}s: {n} sees leader {s.leader_id or '-'} term {s.term}")
                    leader, term = (s.leader_id or leader), max(term, s.term)
        cpu = {n: p.cpu_percent(None) for n, p in procs.items()}
        sent = json.loads(sender.communicate(timeout=120)[0]) if sender else None
        counts = {
            what: sum(sum(1 for t in _log_times(b.c.agents[n].log_file, msg) if t >= wall0) for n in NAMES)
            for what, msg in (("leaders elected", "became leader"),
                              ("step-downs without a quorum", "cannot hear a quorum of voters"),
                              ("fast-failover campaigns", "leader connection lost; campaigning soon"))}
    finally:
        for p in burners:
            p.kill()
            p.wait()
        if sender and sender.poll() is None:
            sender.kill()
        b.close()
    return {"changes": changes, "polls": polls, "failed_polls": failed, "counts": counts, "sent": sent,
            "cpu": cpu, "load": os.getloadavg()}


# ---------------------------------------------------------------------- report


def _ms(xs: list[float]) -> tuple[str, str]:
    if not xs:
        return "-", "-"
    return f"{statistics.median(xs) * 1000:.0f} ms", f"{max(xs) * 1000:.0f} ms"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_send":
        address, members, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        interval = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
        result = asyncio.run(send_reports(address, members, seconds, interval))
        print(json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs of (a), (b) and (c)")
    ap.add_argument("--members", type=int, default=500, help="simulated hosts for (d)")
    ap.add_argument("--cpu-seconds", type=float, default=20.0, help="measurement window for (d)")
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds of reports before (d) measures")
    ap.add_argument("--skip-cpu", action="store_true", help="skip (d)")
    ap.add_argument("--only", choices=["a", "b", "c", "d", "e", "f"], action="append", help="run only these parts")
    ap.add_argument("--hung-timeouts", default="default,500ms", metavar="T,T,...",
                    help="(e): election timeouts to run, 'default' or an --election-timeout (default: default,500ms)")
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                    help="run only (s), the no-spurious-election soak, for SECONDS (e.g. 600)")
    ap.add_argument("--soak-hosts", type=int, default=200, help="(s): simulated hosts reporting (default 200)")
    ap.add_argument("--soak-report-interval", type=float, default=5.0, help="(s): seconds between a host's reports")
    ap.add_argument("--soak-burn", type=int, default=0, help="(s): processes spinning on the CPUs meanwhile")
    ap.add_argument("--soak-timeout", default="", help="(s): an --election-timeout instead of the default")
    args = ap.parse_args()
    if args.soak:
        return _report_soak(args)
    parts = set(args.only or ["a", "b", "c", "d", "e", "f"]) - ({"d"} if args.skip_cpu else set())
    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="agentd-failover-") as tmp:
        root = Path(tmp)
        model = write_tiny_llama_gguf(root / "tiny.gguf")
        if "a" in parts:
            t = failover_runs(root / "a", model, args.runs, "")
            rows.append(("(a) SIGKILL leader -> Deploy accepted, defaults", str(len(t)), *_ms(t)))
        if "b" in parts:
            lat = deploy_latency(root / "b", model, args.runs)
            rows.append(("(b) Deploy RPC, on the leader", str(len(lat["leader"])), *_ms(lat["leader"])))
            rows.append(("(b) Deploy RPC, via a follower (forwarded)", str(len(lat["follower"])),
                         *_ms(lat["follower"])))
            rows.append(("(b) Deploy call -> a follower applied it", str(len(lat["applied"])), *_ms(lat["applied"])))
            rows.append(("(b) Deploy call -> replica RUNNING", str(len(lat["running"])), *_ms(lat["running"])))
        if "c" in parts:
            t = failover_runs(root / "c", model, args.runs, "500ms")
            rows.append(("(c) SIGKILL leader -> Deploy accepted, 500ms", str(len(t)), *_ms(t)))
        if "e" in parts:
            for i, timeout in enumerate(args.hung_timeouts.split(",")):
                elected: list[float] = []
                t = failover_runs(root / f"e{i}", model, args.runs, "" if timeout == "default" else timeout,
                                  signal.SIGSTOP, elected)
                label = "defaults" if timeout == "default" else f"--election-timeout {timeout}"
                rows.append((f"(e) SIGSTOP leader -> Deploy accepted, {label}", str(len(t)), *_ms(t)))
                rows.append((f"(e) SIGSTOP leader -> new leader elected, {label}", str(len(elected)),
                             *_ms(elected)))
        if "d" in parts:
            d = coordinator_cpu(root / "d", args.members, args.cpu_seconds, args.warmup)
            sent = d["sent"]
            rows.append(("(d) leader CPU, idle (1 s samples)", str(len(d["idle"])),
                         f"{statistics.median(d['idle']):.1f} %", f"{max(d['idle']):.1f} %"))
            rows.append((f"(d) leader CPU, {args.members} members x 1 report/s", str(len(d["busy"])),
                         f"{statistics.median(d['busy']):.1f} %", f"{max(d['busy']):.1f} %"))
            lat = sorted(sent["latencies"])
            rows.append(("(d) Report RPC latency", str(len(lat)), *_ms(lat)))
            p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
            notes.append(f"(d) sent {sent['sent']} reports in {sent['seconds']:g} s "
                         f"({sent['sent'] / sent['seconds']:.0f}/s), errors {sent['errors'] or 'none'}, "
                         f"p99 {p99:.1f} ms; leader knows {d['nodes']} nodes, commit index {d['commit_index']}, "
                         f"RSS {d['rss'] / 2**20:.0f} MiB")
        if "f" in parts:
            resumed: list[float] = []
            changed, stepdowns = stall_runs(root / "f", args.runs, resumed)
            rows.append(("(f) SIGCONT of a deposed leader -> it steps down", str(len(resumed)), *_ms(resumed)))
            for what, _, _, expected in STALLS:
                notes.append(f"(f) SIGSTOP {what}: the term changed in {changed[what]} of {args.runs} runs "
                             f"(expected: {'every' if expected else 'none'})")
            notes.append(f"(f) leaders' step-downs for want of a quorum: {stepdowns}")
    if rows:
        width = max(len(r[0]) for r in rows)
        print(f"{'measure':<{width}}  {'n':>3}  {'median':>9}  {'max':>9}")
        for name, n, med, mx in rows:
            print(f"{name:<{width}}  {n:>3}  {med:>9}  {mx:>9}")
    for note in notes:
        print(note)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    return 0


def _report_soak(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="agentd-soak-") as tmp:
        r = soak(Path(tmp), args.soak, args.soak_hosts, args.soak_report_interval, args.soak_burn, args.soak_timeout)
    print(f"(s) soak: 3 agents, election timeout {args.soak_timeout or 'default'}, {args.soak:g} s, "
          f"{args.soak_hosts} simulated hosts reporting every {args.soak_report_interval:g} s, "
          f"{args.soak_burn} CPU burners")
    print(f"    leader/term changes seen by Status polls: {len(r['changes'])} ({r['polls']} polls, "
          f"{r['failed_polls']} failed)")
    for line in r["changes"]:
        print(f"      {line}")
    print("    from the logs: " + ", ".join(f"{k} {v}" for k, v in r["counts"].items()))
    if r["sent"]:
        lat = sorted(r["sent"]["latencies"])
        p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
        print(f"    reports: {r['sent']['sent']} sent, errors {r['sent']['errors'] or 'none'}, p99 {p99:.1f} ms")
    print("    agents' CPU (mean over the soak): " + ", ".join(f"{n} {c:.1f} %" for n, c in r["cpu"].items()))
    print(f"machine: {os.cpu_count()} CPUs, load average {r['load'][0]:.2f} {r['load'][1]:.2f} {r['load'][2]:.2f}")
    return 1 if r["changes"] or r["counts"]["leaders elected"] else 0


if __name__ == "__main__":
    sys.exit(main())
