"""Inventory cost: CPU for one 8-GPU inventory, and the refresher's idle footprint.

    .venv/bin/python benchmarks/inventory.py [--iterations 300] [--duration 10] [--period 5]

Targets (issue 5): one 8-GPU inventory < 50 ms of CPU; the refresher's idle
footprint < 1% of one core at the default 5 s period.

GPUs come from agentd.inventory.fakenvml (the same NVML calls, one per device
per fact, as the real path makes: `nvml calls` below), host facts and process
lookups from real psutil. What this cannot include is the driver's own time
inside each real NVML call (an ioctl each; tens of microseconds on a healthy
driver): run `scripts/gpu-check` plus this on a GPU host for that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.inventory import Collector, InventoryRefresher, NvmlReader, collect_inventory  # noqa: E402
from agentd.inventory.fakenvml import eight_gpu_host  # noqa: E402


def cpu_seconds() -> float:
    """CPU of this process, all threads (the refresher collects in a worker thread)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def per_call(fn, iterations: int) -> tuple[float, float, float]:
    """(mean CPU ms, p50 wall ms, p99 wall ms) over `iterations` calls, after a warm-up."""
    for _ in range(5):
        fn()
    walls = []
    cpu0 = time.process_time()
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / iterations
    walls.sort()
    return cpu * 1e3, statistics.median(walls) * 1e3, walls[int(len(walls) * 0.99) - 1] * 1e3


def bench_collect(iterations: int) -> list[tuple[str, str, str]]:
    rows = []
    owned = {os.getpid()}

    nv = eight_gpu_host()
    one_off = per_call(lambda: collect_inventory(node_name="bench", nvml=nv, owned_pids=lambda: owned), iterations)
    calls_per_inventory = (sum(nv.calls.values())) / (iterations + 5)
    rows.append(("8 GPUs, one-off (init + read + shutdown)", f"{one_off[0]:.2f}",
                 f"{one_off[1]:.2f} / {one_off[2]:.2f}"))

    kept_nv = eight_gpu_host()
    reader = NvmlReader(kept_nv)
    kept = per_call(lambda: collect_inventory(node_name="bench", nvml=reader, owned_pids=lambda: owned),
                    iterations)
    reader.close()
    # The daemon keeps NVML open and the GPU topology (read once: 8 + 2 x 28 calls on 8 GPUs).
    kept_calls = sum(kept_nv.calls.values()) / (iterations + 5)
    rows.append(("8 GPUs, NVML kept open (the daemon)", f"{kept[0]:.2f}", f"{kept[1]:.2f} / {kept[2]:.2f}"))

    sim = ROOT / "examples" / "hosts" / "8xa100.json"
    simulated = per_call(lambda: collect_inventory(node_name="bench", simulate=sim), iterations)
    rows.append(("8 GPUs, simulated file", f"{simulated[0]:.2f}", f"{simulated[1]:.2f} / {simulated[2]:.2f}"))

    none = per_call(lambda: collect_inventory(node_name="bench"), iterations)
    rows.append(("real pynvml, no driver here (psutil only)", f"{none[0]:.2f}", f"{none[1]:.2f} / {none[2]:.2f}"))
    return rows, (calls_per_inventory, kept_calls), max(one_off[0], kept[0])


async def idle_footprint(duration: float, period: float) -> tuple[float, int]:
    """% of one core used by an otherwise idle daemon loop running the refresher."""
    collector = Collector(node_name="bench", nvml=eight_gpu_host(), owned_pids=lambda: {os.getpid()})
    events: asyncio.Queue = asyncio.Queue()
    refresher = InventoryRefresher(collector, period, events)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    task = asyncio.create_task(refresher.run())
    await asyncio.sleep(duration)
    refresher.stop()
    await task
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    collector.close()
    return 100.0 * cpu / wall, refresher.refreshes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of idle refreshing to measure")
    ap.add_argument("--period", type=float, default=5.0, help="refresh period for the idle measurement")
    args = ap.parse_args()

    rows, calls, worst_ms = bench_collect(args.iterations)
    print(f"one inventory ({args.iterations} iterations, NVML calls per 8-GPU inventory: {calls[0]:.0f} one-off "
          f"with the topology, {calls[1]:.0f} with NVML and the topology kept)")
    print(f"{'case':<44} {'CPU ms':>8}   {'wall p50 / p99 ms':>18}")
    for case, cpu, wall in rows:
        print(f"{case:<44} {cpu:>8}   {wall:>18}")
    print(f"target < 50 ms CPU: {'PASS' if worst_ms < 50 else 'FAIL'} (worst {worst_ms:.2f} ms)")

    print()
    pct, n = asyncio.run(idle_footprint(args.duration, args.period))
    fast_duration = min(2.0, args.duration)
    fast_pct, fast_n = asyncio.run(idle_footprint(fast_duration, 0.05))
    per_refresh_ms = fast_pct / 100 * fast_duration / max(fast_n, 1) * 1e3
    projected = per_refresh_ms / 1e3 / args.period * 100
    print("refresher idle footprint (8 fake GPUs + real psutil)")
    print(f"{'measurement':<44} {'% of a core':>12} {'refreshes':>10}")
    print(f"{f'measured: {args.duration:g} s at a {args.period:g} s period':<44} {pct:>12.3f} {n:>10}")
    print(f"{f'stress: {fast_duration:g} s at a 0.05 s period':<44} {fast_pct:>12.3f} {fast_n:>10}")
    print(f"{f'projected from stress: {per_refresh_ms:.2f} ms/refresh / {args.period:g} s':<44} {projected:>12.3f}")
    print(f"target < 1% of a core: {'PASS' if max(pct, projected) < 1 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
