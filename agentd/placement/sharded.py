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
from typing import Any

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
        self._caps: dict[float | None, list[tuple[HostView, list[int], tuple[GpuView, ...]]]] = {}
        self._kth: dict[tuple, list[int]] = {}  # per (budget fraction, g): g-th largest capacities, ascending
        self._largest: dict[float | None, int] = {}

    # ------------------------------------------------------------------ capacities

    def _host_caps(self, demand: ShardDemand) -> list[tuple[HostView, list[int], tuple[GpuView, ...]]]:
        """Per host: its capacities, largest first, and its GPUs. Cached per budget fraction.

        Capacities are plain ints: GPUs are only looked at again on the hosts a layout chooses.
        """
        key = demand.budget_fraction
        rows = self._caps.get(key)
        if rows is None:
            rows = []
            f = demand.budget_fraction
            cache = self._cache
            for hv, gpus in self.candidates.hosts:
                hit = cache.get((id(hv), f))
                if hit is None or hit[0] is not gpus:
                    caps = [g.free for g in gpus] if f is None else [int(f * g.total) for g in gpus]
                    caps.sort(reverse=True)
                    hit = cache[(id(hv), f)] = (gpus, caps, hv)
                rows.append((hv, hit[1], gpus))
            self._caps[key] = rows
        return rows

    def _kth_sorted(self, demand: ShardDemand, g: int) -> list[int]:
        """The g-th largest capacity of every host having g usable GPUs, ascending."""
        key = (demand.budget_fraction, g)
        arr = self._kth.get(key)
        if arr is None:
            i = g - 1
            arr = self._kth[key] = sorted([caps[i] for _, caps, _ in self._host_caps(demand) if len(caps) > i])
        return arr

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
        f = demand.budget_fraction
        for i, (hv, gpus) in enumerate(hosts):
            if f is None:
                fitting = [gv for gv in gpus if gv.free >= need]
            else:
                fitting = [gv for gv in gpus if int(f * gv.total) >= need]
            chosen = self._choose_gpus(fitting, g)
            memory = tuple(demand.reservation(gv.total) for gv in chosen)
            layers = sum(stages) if shape.hosts == 1 else stages[i]
            parts.append(PartLayout(hv.name, "main" if i == 0 else "worker", tuple(gv.index for gv in chosen),
                                    memory, layers=layers))
        return Layout(shape, tuple(parts), demand)

    def _host_key(self, hv: HostView) -> tuple:
        return self.strategy.host_key(hv)

    def _choose_hosts(self, demand: ShardDemand, g: int, n: int) -> list[tuple[HostView, tuple[GpuView, ...]]]:
        need = demand.per_gpu
        i = g - 1
        key = self._host_key
        rows = [(key(hv), hv, gpus) for hv, caps, gpus in self._host_caps(demand) if len(caps) > i and caps[i] >= need]
        best = heapq.nsmallest(n, rows, key=_first)
        return [(hv, gpus) for _, hv, gpus in best]

    def _choose_gpus(self, fitting: Sequence[GpuView], g: int) -> list[GpuView]:
        if self.strategy.binpack:  # the fullest GPUs that still fit: keep empty ones whole
            ranked = sorted(fitting, key=_free_then_index)
        else:
            ranked = sorted(fitting, key=_most_free_then_index)
        return sorted(ranked[:g], key=_index)

    # ------------------------------------------------------------------ explanations

    def _why_not(self, shape: Sharded, demand: ShardDemand, qualifying: int) -> Rejection:
        need = demand.per_gpu
        rows = self._host_caps(demand)
        extra = {} if demand.budget_fraction is None else {"budget_fraction": demand.budget_fraction}
        if demand.budget_fraction not in self._largest:
            self._largest[demand.budget_fraction] = max((caps[0] for _, caps, _ in rows if caps), default=0)
        largest = self._largest[demand.budget_fraction]
        if largest < need:
            r = layout_rejection(
                "did not fit: the per-GPU share exceeds every GPU's memory", shape,
                f"{shape.label} needs {gib(need)} per GPU, largest {gib(largest)}",
                needs=need, largest=largest, **extra, **dict(demand.breakdown))
            return r._replace(closeness=largest / need if need else 0.0, list_where=False)
        g = shape.gpus_per_host
        best_n = next((k for k in range(g - 1, 0, -1) if (arr := self._kth_sorted(demand, k)) and arr[-1] >= need), 0)
        best_host = next((hv.name for hv, caps, _ in rows if len(caps) >= best_n and caps[best_n - 1] >= need),
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


def _first(row: tuple) -> Any:
    return row[0]


def _index(gv: GpuView) -> int:
    return gv.index


def _free_then_index(gv: GpuView) -> tuple[int, int]:
    return (gv.free, gv.index)


def _most_free_then_index(gv: GpuView) -> tuple[int, int]:
    return (-gv.free, gv.index)
