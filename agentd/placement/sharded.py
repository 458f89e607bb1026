"""Finding GPUs for a `Sharded` shape: sort once, then greedy per shape.

Every GPU of a sharded layout holds the same share, so a GPU either can
hold it or not, independently of the others. A host qualifies for a shape
needing g GPUs per host when its g-th largest capacity is at least the
share; a shape fits when enough hosts qualify. For each g we keep the
hosts' g-th largest capacities sorted, so checking a shape is one binary
search, and choosing GPUs is a scan of the qualifying hosts. Nothing
enumerates combinations of GPUs, and greedy is exact here: any qualifying
host and any qualifying GPUs on it are as good as any other for fitting,
so the strategy alone picks among them.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from agentd.placement.constraints import Rejection, layout_rejection
from agentd.placement.demand import ShardDemand
from agentd.placement.layout import Layout, PartLayout
from agentd.placement.shapes import Sharded
from agentd.placement.snapshot import GpuView, HostView
from agentd.placement.strategy import Strategy
from agentd.placement.units import gib


@dataclass(frozen=True)
class Candidates:
    """Hosts that passed host filters, each with its GPUs that passed device filters (by index)."""

    hosts: tuple[tuple[HostView, tuple[GpuView, ...]], ...]


class ShardedSearch:
    def __init__(self, candidates: Candidates, strategy: Strategy, cache: dict | None = None):
        self.candidates = candidates
        self.strategy = strategy
        self._cache = cache if cache is not None else {}  # per (host view, budget fraction): sorted capacities
        self._caps: dict[float | None, list[tuple[HostView, list[tuple[int, GpuView]]]]] = {}
        self._kth: dict[tuple, list[int]] = {}  # per (budget fraction, g): g-th largest capacities, ascending
        self._largest: dict[float | None, int] = {}

    # ------------------------------------------------------------------ capacities

    def _host_caps(self, demand: ShardDemand) -> list[tuple[HostView, list[tuple[int, GpuView]]]]:
        """Per host: (capacity, gpu) sorted by capacity, largest first. Cached per budget fraction."""
        key = demand.budget_fraction
        if key not in self._caps:
            rows = []
            f = demand.budget_fraction
            cache = self._cache
            for hv, gpus in self.candidates.hosts:
                hit = cache.get((id(hv), f))
                if hit is None or hit[0] is not gpus:
                    if f is None:
                        caps = sorted((-g.free, g.index, g) for g in gpus)
                    else:
                        caps = sorted((-int(f * g.total), g.index, g) for g in gpus)
                    hit = cache[(id(hv), f)] = (gpus, [(-c, g) for c, _, g in caps], hv)
                rows.append((hv, hit[1]))
            self._caps[key] = rows
        return self._caps[key]

    def _kth_sorted(self, demand: ShardDemand, g: int) -> list[int]:
        """The g-th largest capacity of every host having g usable GPUs, ascending."""
        key = (demand.budget_fraction, g)
        if key not in self._kth:
            self._kth[key] = sorted(caps[g - 1][0] for _, caps in self._host_caps(demand) if len(caps) >= g)
        return self._kth[key]

    # ------------------------------------------------------------------ search

    def find(self, shape: Sharded, demand: ShardDemand) -> Layout | Rejection:
        need = demand.per_gpu
        g = shape.gpus_per_host
        arr = self._kth_sorted(demand, g)
        qualifying = len(arr) - bisect.bisect_left(arr, need)
        if qualifying < shape.hosts:
            return self._why_not(shape, demand, qualifying)
        hosts = self._choose_hosts(demand, g, shape.hosts)
        parts = []
        stages = demand.stage_layers or (0,) * shape.pp
        for i, (hv, caps) in enumerate(hosts):
            gpus = self._choose_gpus([cg for cg in caps if cg[0] >= need], g)
            memory = tuple(demand.reservation(gv.total) for gv in gpus)
            layers = sum(stages) if shape.hosts == 1 else stages[i]
            parts.append(PartLayout(hv.name, "main" if i == 0 else "worker", tuple(gv.index for gv in gpus),
                                    memory, layers=layers))
        return Layout(shape, tuple(parts), demand)

    def _host_key(self, hv: HostView) -> tuple:
        return self.strategy.host_key(hv)

    def _choose_hosts(self, demand: ShardDemand, g: int, n: int) -> list[tuple[HostView, list[tuple[int, GpuView]]]]:
        need = demand.per_gpu
        rows = [(self._host_key(hv), hv, caps) for hv, caps in self._host_caps(demand)
                if len(caps) >= g and caps[g - 1][0] >= need]
        best = heapq.nsmallest(n, rows, key=lambda r: r[0])
        return [(hv, caps) for _, hv, caps in best]

    def _choose_gpus(self, fitting: Sequence[tuple[int, GpuView]], g: int) -> list[GpuView]:
        if self.strategy.binpack:  # the fullest GPUs that still fit: keep empty ones whole
            ranked = sorted(fitting, key=lambda cg: (cg[1].free, cg[1].index))
        else:
            ranked = sorted(fitting, key=lambda cg: (-cg[1].free, cg[1].index))
        return sorted((cg[1] for cg in ranked[:g]), key=lambda gv: gv.index)

    # ------------------------------------------------------------------ explanations

    def _why_not(self, shape: Sharded, demand: ShardDemand, qualifying: int) -> Rejection:
        need = demand.per_gpu
        rows = self._host_caps(demand)
        extra = {} if demand.budget_fraction is None else {"budget_fraction": demand.budget_fraction}
        if demand.budget_fraction not in self._largest:
            self._largest[demand.budget_fraction] = max((caps[0][0] for _, caps in rows if caps), default=0)
        largest = self._largest[demand.budget_fraction]
        if largest < need:
            r = layout_rejection(
                "did not fit: the per-GPU share exceeds every GPU's memory", shape,
                f"{shape.label} needs {gib(need)} per GPU, largest {gib(largest)}",
                needs=need, largest=largest, **extra, **dict(demand.breakdown))
            return r._replace(closeness=largest / need if need else 0.0, list_where=False)
        g = shape.gpus_per_host
        best_n = next((k for k in range(g - 1, 0, -1) if (arr := self._kth_sorted(demand, k)) and arr[-1] >= need), 0)
        best_host = next((hv.name for hv, caps in rows if len(caps) >= best_n and caps[best_n - 1][0] >= need),
                         "") if best_n else ""
        if shape.hosts == 1:
            detail = f"{shape.label} needs {g} GPUs with {gib(need)} on one host, most found {best_n}"
            if best_host:
                detail += f" on {best_host}"
            closeness = best_n / g
        else:
            detail = (f"{shape.label} needs {shape.hosts} hosts with {g} GPUs of {gib(need)} each, "
                      f"found {qualifying}")
            closeness = qualifying / shape.hosts
        r = layout_rejection("did not fit: too few GPUs with room for a share", shape, detail,
                             needs=need, gpus_per_host=g, hosts=shape.hosts, qualifying_hosts=qualifying,
                             best_host=best_host, best_host_gpus=best_n, **extra)
        # Slightly below a memory miss of the same ratio: a missing GPU is the harder fix.
        return r._replace(closeness=closeness * 0.999, list_where=False)
