"""The cluster as placement sees it: per-GPU memory that agentd may still give out.

A GPU's `memory_used` counts everything on it, agentd's own instances
included. Placement must not count agentd's instances twice (once as used,
once as assigned), yet must count every byte other jobs hold, because vLLM
and llama.cpp refuse to start when that memory is missing. So:

    foreign  = max(0, memory_used - memory of processes agentd owns)
    assigned = sum of Part.memory that existing assignments (and replicas
               placed earlier in the same plan) put on this GPU
    free     = max(0, memory_total - foreign - assigned)

Memory of a process agentd owns but no assignment names (an instance being
stopped) is treated as released. A part that lists a GPU without planned
memory (`Part.memory` empty) is taken to hold the whole GPU: unknown is full.

Host RAM is booked the same way where a part serves from it (`Part.ram`: a
llama.cpp main or rpc-server on a host without GPUs). The inventory does not
say how much RAM agentd's own processes hold, so a host's RAM left is

    ram_available = min(memory_available, memory_total - booked)

which counts a booked part once whether it has started yet or not (other
jobs' RAM is then only seen while nothing booked is missing from
memory_available: an estimate on the generous side, documented in
docs/placement.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agentd.placement.units import gib
from agentd.plugins.api import RAM_INDEX
from agentd.types import Assignment, ClusterInventory, GpuInfo, GpuProcess, HostInventory, ReplicaPlan


class GpuView:
    """One GPU with the memory agentd may still give out. Immutable by convention (slots, no setters)."""

    __slots__ = ("assigned", "foreign", "free", "host", "index", "info", "total")

    def __init__(self, info: GpuInfo, host: str, assigned: int = 0):
        d = info.__dict__  # one lookup instead of one per field: this runs for every GPU of the cluster
        procs = d["processes"]
        owned = sum(p.memory_used for p in procs if p.owned) if procs else 0
        self.info = info
        self.host = host
        self.index = d["index"]
        self.total = total = d["memory_total"]
        foreign = d["memory_used"] - owned
        self.foreign = foreign = foreign if foreign > 0 else 0
        self.assigned = assigned
        free = total - foreign - assigned
        self.free = free if free > 0 else 0

    @property
    def uuid(self) -> str:
        return self.info.uuid

    def without_foreign(self) -> GpuView:
        """This GPU as if the processes agentd does not own had exited (a what-if of the diagnosis)."""
        v = object.__new__(GpuView)
        v.info, v.host, v.index, v.total, v.assigned = self.info, self.host, self.index, self.total, self.assigned
        v.foreign = 0
        v.free = max(0, self.total - self.assigned)
        return v

    @property
    def label(self) -> str:
        return f"GPU {self.index} on {self.host}"

    @property
    def foreign_processes(self) -> tuple[GpuProcess, ...]:
        return tuple(p for p in self.info.processes if not p.owned)

    def describe_foreign(self) -> str:
        """Who holds the memory agentd does not own: "72.0 GiB used by pid 4121"."""
        procs = sorted(self.foreign_processes, key=lambda p: (-p.memory_used, p.pid))
        if not procs:
            return f"{gib(self.foreign)} used by other processes"
        pids = ", ".join(str(p.pid) for p in procs[:3]) + (", ..." if len(procs) > 3 else "")
        return f"{gib(self.foreign)} used by {'pid' if len(procs) == 1 else 'pids'} {pids}"

    def __repr__(self) -> str:
        return f"GpuView({self.host}:{self.index} free={gib(self.free)} of {gib(self.total)})"


class HostView:
    """One host and its GPUs (by index). Immutable by convention."""

    __slots__ = ("gpus", "info", "name", "ram_booked", "used_fraction")

    def __init__(self, name: str, info: HostInventory, gpus: tuple[GpuView, ...], ram_booked: int = 0):
        self.name = name
        self.info = info
        self.gpus = gpus
        self.ram_booked = ram_booked
        total = free = 0
        for g in gpus:
            total += g.total
            free += g.free
        # How full the host's GPUs are (0 = empty): what binpack packs onto and spread avoids.
        self.used_fraction = 1.0 - free / total if total else 1.0

    @property
    def labels(self) -> Mapping[str, str]:
        return self.info.labels

    @property
    def ram_available(self) -> int | None:
        """Host RAM free for a llama.cpp main process or a RAM rpc-server (less what parts already book),
        or None when the inventory does not report RAM."""
        info = self.info
        if info.memory_total <= 0:
            return None
        if not self.ram_booked:
            return info.memory_available
        return max(0, min(info.memory_available, info.memory_total - self.ram_booked))

    def __repr__(self) -> str:
        return f"HostView({self.name}, {len(self.gpus)} GPUs)"


class _FreedHostView(HostView):
    """A host as if the processes agentd does not own had exited (Snapshot.without_foreign). Its
    GPUs are worked out when first read: the what-if that uses it often decides without them."""

    __slots__ = ("_freed", "_source")

    def __init__(self, source: HostView):  # not HostView.__init__: that works the GPUs out now
        self.name = source.name
        self.info = source.info
        self.ram_booked = source.ram_booked
        self._source = source
        self._freed: tuple[tuple[GpuView, ...], float] | None = None

    def _gpus_and_used(self) -> tuple[tuple[GpuView, ...], float]:
        if self._freed is None:
            self._freed = _freed_gpus(self._source)
        return self._freed

    @property  # type: ignore[override]
    def gpus(self) -> tuple[GpuView, ...]:
        return self._gpus_and_used()[0]

    @property  # type: ignore[override]
    def used_fraction(self) -> float:
        return self._gpus_and_used()[1]


@dataclass(frozen=True)
class Snapshot:
    """Hosts sorted by name, each GPU with its effective free memory."""

    hosts: tuple[HostView, ...]

    @classmethod
    def build(cls, cluster: ClusterInventory, existing: Iterable[Assignment | ReplicaPlan] = ()) -> Snapshot:
        assigned = _assigned_memory(cluster, existing)
        by_host: dict[str, dict[int, int]] = {}
        for (host, index), mem in assigned.items():
            by_host.setdefault(host, {})[index] = mem
        return cls(tuple(_host_view(h, by_host.get(h.name)) for h in sorted(cluster.hosts, key=_name)))

    def without_foreign(self) -> Snapshot:
        """The cluster as if every process agentd does not own had exited (hosts without any shared)."""
        return Snapshot(tuple(_without_foreign(hv) for hv in self.hosts))

    def reserve(self, reservations: Mapping[tuple[str, int], int]) -> Snapshot:
        """A new snapshot with more memory assigned on some GPUs; untouched hosts are shared."""
        if not reservations:
            return self
        touched = {host for host, _ in reservations}
        hosts = []
        for hv in self.hosts:
            if hv.name not in touched:
                hosts.append(hv)
                continue
            gpus = tuple(
                GpuView(g.info, hv.name, g.assigned + reservations.get((hv.name, g.index), 0)) for g in hv.gpus
            )
            ram = hv.ram_booked + reservations.get((hv.name, RAM_INDEX), 0)
            hosts.append(HostView(hv.name, hv.info, gpus, ram))
        return Snapshot(tuple(hosts))


def _name(h: HostInventory) -> str:
    return h.name


def _host_view(h: HostInventory, assigned: Mapping[int, int] | None) -> HostView:
    """GpuView.__init__ and HostView.__init__ inlined: this runs once per GPU of the cluster on every
    placement, and the calls and the second pass over the GPUs were a third of a placement's cost."""
    name = h.name
    new = object.__new__
    views = []
    total_sum = free_sum = 0
    last = -1
    ordered = True
    for info in h.gpus:
        d = info.__dict__  # one lookup instead of one per field
        owned = 0
        procs = d["processes"]
        if procs:
            for p in procs:
                if p.owned:
                    owned += p.memory_used
        v = new(GpuView)
        v.info = info
        v.host = name
        v.index = index = d["index"]
        v.total = total = d["memory_total"]
        foreign = d["memory_used"] - owned if owned else d["memory_used"]
        v.foreign = foreign = foreign if foreign > 0 else 0
        v.assigned = mine = assigned.get(index, 0) if assigned else 0
        free = total - foreign - mine if mine else total - foreign
        v.free = free = free if free > 0 else 0
        views.append(v)
        total_sum += total
        free_sum += free
        if index < last:
            ordered = False
        last = index
    if not ordered:
        views.sort(key=_index)
    hv = new(HostView)
    hv.name = name
    hv.info = h
    hv.gpus = tuple(views)
    hv.ram_booked = assigned.get(RAM_INDEX, 0) if assigned else 0
    hv.used_fraction = 1.0 - free_sum / total_sum if total_sum else 1.0
    return hv


def _without_foreign(hv: HostView) -> HostView:
    """The host with other jobs' memory freed: the same view when no GPU holds any."""
    for g in hv.gpus:
        if g.foreign:
            return _FreedHostView(hv)
    return hv


def _freed_gpus(hv: HostView) -> tuple[tuple[GpuView, ...], float]:
    """The GPUs of `hv` with other jobs' memory freed, and the used fraction: GpuView.without_foreign
    and HostView.__init__ inlined, as in _host_view. GPUs without foreign memory keep their views."""
    new = object.__new__
    views = []
    total_sum = free_sum = 0
    for g in hv.gpus:
        total = g.total
        total_sum += total
        if not g.foreign:
            views.append(g)
            free_sum += g.free
            continue
        v = new(GpuView)
        v.info, v.host, v.index, v.total, v.assigned = g.info, g.host, g.index, total, g.assigned
        v.foreign = 0
        free = total - g.assigned
        v.free = free = free if free > 0 else 0
        views.append(v)
        free_sum += free
    return tuple(views), 1.0 - free_sum / total_sum if total_sum else 1.0


def _index(v: GpuView) -> int:
    return v.index


def _parts_of(item: Assignment | ReplicaPlan) -> Sequence:
    return item.plan.parts if isinstance(item, Assignment) else item.parts


def _assigned_memory(
    cluster: ClusterInventory, existing: Iterable[Assignment | ReplicaPlan]
) -> dict[tuple[str, int], int]:
    hosts: dict[str, HostInventory] | None = None
    out: dict[tuple[str, int], int] = {}
    for item in existing:
        for part in _parts_of(item):
            if hosts is None:
                hosts = {h.name: h for h in cluster.hosts}
            host = hosts.get(part.host)
            if host is None:  # a host that left the cluster holds nothing here
                continue
            ram = part.ram
            if ram:
                out[(part.host, RAM_INDEX)] = out.get((part.host, RAM_INDEX), 0) + ram
            for i, index in enumerate(part.gpus):
                gpu = next((g for g in host.gpus if g.index == index), None)
                if gpu is None:
                    continue
                mem = part.memory[i] if i < len(part.memory) else gpu.memory_total
                out[(part.host, index)] = out.get((part.host, index), 0) + mem
    return out
