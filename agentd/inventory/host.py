"""Host facts and process lookups through psutil.

Kept behind a small probe interface so the GPU reader and the collector can
be tested with a fixed host (and fake pids) while the daemon uses psutil.
Nothing here raises for an unreadable /proc: a fact that cannot be read
becomes a warning, because a host with unknown load can still serve models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import psutil


@dataclass(frozen=True)
class HostFacts:
    cpu_count: int = 1
    memory_total: int = 0
    memory_available: int = 0
    load_average: float | None = None
    cpu_features: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


# CPU feature flags some runtime's launch or memory depends on, as /proc/cpuinfo names them: llama.cpp's CPU
# backend puts weights in AMX buffers on a CPU with AMX (agentd_llamabox.memory).
CPU_FEATURES = frozenset({"amx_bf16", "amx_int8", "amx_tile"})


def cpu_features(cpuinfo: str) -> tuple[str, ...]:
    """The CPU_FEATURES flags that every CPU in a /proc/cpuinfo text has, sorted."""
    common: set[str] | None = None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags = CPU_FEATURES & set(value.split())
            common = flags if common is None else common & flags
    return tuple(sorted(common or ()))


@functools.cache
def _this_cpu_features() -> tuple[tuple[str, ...], str]:
    """This host's CPU_FEATURES and a warning ("" when read): read once, the CPU does not change under us."""
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_features(f.read()), ""
    except FileNotFoundError:
        return (), ""  # not Linux: no flags to read, none reported
    except OSError as exc:
        return (), f"cannot read the CPU's feature flags ({exc})"


class HostProbe(Protocol):
    def facts(self) -> HostFacts: ...

    def parent_pid(self, pid: int) -> int | None: ...

    def process_name(self, pid: int) -> str: ...


class PsutilProbe:
    """The real host, read through psutil."""

    def facts(self) -> HostFacts:
        warnings: list[str] = []
        cpu_count = psutil.cpu_count(logical=True) or 1
        total = available = 0
        try:
            vm = psutil.virtual_memory()
            total, available = int(vm.total), int(vm.available)
        except (OSError, RuntimeError) as exc:
            warnings.append(f"cannot read host memory ({exc}); reporting 0 bytes")
        load: float | None = None
        try:
            load = round(float(psutil.getloadavg()[0]), 2)
        except (OSError, AttributeError) as exc:
            warnings.append(f"cannot read the load average ({exc})")
        features, why = _this_cpu_features()
        if why:
            warnings.append(why)
        return HostFacts(cpu_count=cpu_count, memory_total=total, memory_available=available,
                         load_average=load, cpu_features=features, warnings=tuple(warnings))

    def parent_pid(self, pid: int) -> int | None:
        try:
            return psutil.Process(pid).ppid()
        except (psutil.Error, OSError):
            return None

    def process_name(self, pid: int) -> str:
        try:
            return psutil.Process(pid).name()
        except (psutil.Error, OSError):
            return ""


class Ownership:
    """Answers "did agentd launch this pid, or a process that started it?".

    vLLM and Ray put the GPU memory in worker processes that are children of
    the process agentd started, so checking the pid alone would count
    agentd's own model as a foreign tenant. Ancestors are walked through
    `parent_pid` and memoised for one inventory pass.
    """

    MAX_DEPTH = 64  # deeper than any real process tree; guards against pid-reuse cycles

    def __init__(self, owned: Iterable[int], parent_pid: Callable[[int], int | None]):
        self._owned = frozenset(owned)
        self._parent_pid = parent_pid
        self._memo: dict[int, bool] = {}

    def __call__(self, pid: int) -> bool:
        if not self._owned:
            return False
        chain: list[int] = []
        current: int | None = pid
        result = False
        while current is not None and current > 1 and len(chain) < self.MAX_DEPTH:
            if current in self._memo:
                result = self._memo[current]
                break
            if current in self._owned:
                result = True
                break
            chain.append(current)
            parent = self._parent_pid(current)
            current = parent if parent != current else None
        for p in chain:
            self._memo[p] = result
        return result


@dataclass(frozen=True)
class StaticProbe:
    """A host with fixed facts and a fixed process tree: for tests and benchmarks that need no /proc."""

    host: HostFacts = HostFacts(cpu_count=8, memory_total=64 * 1024**3, memory_available=48 * 1024**3,
                                load_average=0.5)
    parents: tuple[tuple[int, int], ...] = ()  # (pid, parent pid)
    names: tuple[tuple[int, str], ...] = ()

    def facts(self) -> HostFacts:
        return self.host

    def parent_pid(self, pid: int) -> int | None:
        return dict(self.parents).get(pid)

    def process_name(self, pid: int) -> str:
        return dict(self.names).get(pid, "")
