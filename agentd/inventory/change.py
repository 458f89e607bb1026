"""What counts as a material change between two inventories, in sentences.

Utilization, load and a few MiB of allocator churn change at every refresh;
publishing each of those would wake the daemon and the coordinator every 5 s
for nothing. A change is material when it can change a placement decision:
GPUs appearing or leaving, memory moving by a meaningful step, processes
starting or stopping on a GPU, warnings, or the host's identity and labels.
The latest inventory is still available to heartbeats, so nothing is hidden;
only the events are thinned.
"""

from __future__ import annotations

from agentd.types import GiB, GpuInfo, HostInventory, MiB

GPU_MEMORY_STEP = 128 * MiB  # a GPU's used memory moving by this much is news
HOST_MEMORY_STEP = 1 * GiB  # host RAM available, at least this ...
HOST_MEMORY_FRACTION = 0.05  # ... and at least this share of the total


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def material_changes(old: HostInventory | None, new: HostInventory, *, gpu_memory_step: int = GPU_MEMORY_STEP,
                     host_memory_step: int = HOST_MEMORY_STEP) -> list[str]:
    """Sentences describing each material change; empty when nothing material changed."""
    if old is None:
        return [f"first inventory: {len(new.gpus)} GPU(s), {new.cpu_count} CPU(s), "
                f"{_gib(new.memory_total)} RAM" + (" (simulated)" if new.simulated else "")]
    out: list[str] = []
    if old.gpu_links != new.gpu_links:
        out.append(f"GPU topology changed ({len(old.gpu_links)} -> {len(new.gpu_links)} GPU pair(s) reported)")
    for attr in ("name", "address", "labels", "cpu_count", "memory_total", "simulated"):
        if getattr(old, attr) != getattr(new, attr):
            out.append(f"host {attr} changed from {getattr(old, attr)!r} to {getattr(new, attr)!r}")
    if old.foreign_ports != new.foreign_ports:
        out.append(f"ports held by other processes: {_ports(old.foreign_ports)} -> {_ports(new.foreign_ports)}")
    if _catalog(old) != _catalog(new):
        out.append(f"models: {len(old.models)} -> {len(new.models)} reported, "
                   f"{sum(1 for m in new.models if m.usable)} usable")
    step = max(host_memory_step, int(new.memory_total * HOST_MEMORY_FRACTION))
    if abs(old.memory_available - new.memory_available) >= step:
        out.append(f"host memory available {_gib(old.memory_available)} -> {_gib(new.memory_available)}")
    before = {g.uuid: g for g in old.gpus}
    after = {g.uuid: g for g in new.gpus}
    for uuid in before.keys() - after.keys():
        out.append(f"GPU {before[uuid].index} ({uuid}) is gone")
    for uuid in after.keys() - before.keys():
        out.append(f"GPU {after[uuid].index} ({uuid}) appeared")
    for uuid in sorted(before.keys() & after.keys(), key=lambda u: after[u].index):
        out.extend(_gpu_changes(before[uuid], after[uuid], gpu_memory_step))
    for w in new.warnings:
        if w not in old.warnings:
            out.append(f"new warning: {w}")
    for w in old.warnings:
        if w not in new.warnings:
            out.append(f"warning cleared: {w}")
    return out


def _gpu_changes(a: GpuInfo, b: GpuInfo, step: int) -> list[str]:
    out = []
    label = f"GPU {b.index}"
    for attr in ("index", "name", "memory_total", "compute_capability", "pci_bus_id", "mig", "parent_uuid",
                 "simulated"):
        if getattr(a, attr) != getattr(b, attr):
            out.append(f"{label} {attr} changed from {getattr(a, attr)!r} to {getattr(b, attr)!r}")
    if abs(a.memory_used - b.memory_used) >= step:
        out.append(f"{label} memory used {_gib(a.memory_used)} -> {_gib(b.memory_used)}")
    pa = {p.pid: p.owned for p in a.processes}
    pb = {p.pid: p.owned for p in b.processes}
    for pid in sorted(pb.keys() - pa.keys()):
        out.append(f"{label} process {pid} started ({_owner(pb[pid])})")
    for pid in sorted(pa.keys() - pb.keys()):
        out.append(f"{label} process {pid} ended ({_owner(pa[pid])})")
    for pid in sorted(pid for pid in pa.keys() & pb.keys() if pa[pid] != pb[pid]):
        out.append(f"{label} process {pid} is now {_owner(pb[pid])}")
    return out


def _ports(ports: tuple[int, ...]) -> str:
    return ", ".join(map(str, ports)) or "none"


def _owner(owned: bool) -> str:
    return "agentd's" if owned else "external"


def _catalog(inv: HostInventory) -> set[tuple[str, str, str, bool, str]]:
    return {(m.name, m.path, m.digest, m.complete, m.broken) for m in inv.models}
