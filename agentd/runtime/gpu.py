"""After a stop: did the GPU memory come back?

A process can be gone from the process table while the driver still holds
its memory (a hung context teardown, a leaked child). The next instance
placed on that GPU would then fail to load. So after stopping a process that
used GPUs, the supervisor reads NVML until none of the stopped pids holds
memory on those GPUs, and says so in the stop reason either way.

The reader is injected: anything with `read()` returning an object with
`gpus` (GpuInfo with `processes`) and `warnings`, i.e. the inventory's
NvmlReader. Without one (no NVIDIA driver, CI) the check is skipped with a
note, never an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from agentd.types import GiB


def _held(reading: Any, gpus: set[int], pids: set[int]) -> list[str]:
    out = []
    for g in reading.gpus:
        if g.index not in gpus:
            continue
        for p in g.processes:
            if p.pid in pids:
                out.append(f"GPU {g.index} still holds {p.memory_used / GiB:.1f} GiB for pid {p.pid}")
    return out


async def verify_gpu_release(reader: Any | None, gpus: Iterable[int], pids: Iterable[int], *,
                             timeout: float = 10.0, poll: float = 0.5) -> str:
    """A sentence for the stop reason: released, still held (which GPU, how much), or not verified."""
    gpu_set, pid_set = set(gpus), set(pids)
    if not gpu_set:
        return ""
    if reader is None:
        return "GPU memory release not verified (NVML not present)"
    deadline = time.monotonic() + timeout
    while True:
        try:
            reading = await asyncio.to_thread(reader.read)
        except Exception as exc:  # a driver error must not turn a stop into a failure
            return f"GPU memory release not verified (NVML read failed: {exc})"
        if not reading.gpus and reading.warnings:
            return f"GPU memory release not verified ({reading.warnings[0]})"
        held = _held(reading, gpu_set, pid_set)
        if not held:
            return f"GPU memory released on GPU {', '.join(map(str, sorted(gpu_set)))}"
        if time.monotonic() >= deadline:
            return "; ".join(held) + f" {timeout:g}s after stop"
        await asyncio.sleep(poll)
