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

A what-if (`find(..., explain=False)`) asks only whether a shape fits, not
why it does not. A share larger than the largest GPU on any host needs no
host looked at; otherwise the hosts are scanned in the strategy's order and
the device filters judge each one only when the scan reaches it, until
enough qualify: the hosts _choose_hosts would pick, in the same order.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Any

from agentd.placement.constraints import Rejection
from agentd.placement.demand import ShardDemand
from agentd.placement.layout import Layout, PartLayout
from agentd.placement.links import links_of
from agentd.placement.shapes import Sharded
from agentd.placement.snapshot import GpuView, HostView
from agentd.placement.strategy import Strategy
from agentd.placement.units import gib


class Candidates:
    """Hosts that passed the host filters, each with its GPUs that pass the device filters (by index).

    A placement judges every host up front: the rejections explain a failure. A what-if asks only
    whether a layout fits, so its hosts are judged when a search first looks at them (`eligible`,
    with `judge`); `hosts` judges the rest.
    """

    def __init__(self, rows: list[tuple[HostView, tuple[GpuView, ...] | None]], unjudged: int, max_memory: int,
                 judge: Callable[[int], tuple[GpuView, ...]]):
        self.rows = rows  # (host, its GPUs that pass the device filters; None until judged)
        self.unjudged = unjudged  # rows still None
        self.max_memory = max_memory  # the largest GPU on these hosts: no GPU can hold more
        self._judge = judge

    def eligible(self, i: int) -> tuple[GpuView, ...]:
        hv, gpus = self.rows[i]
        if gpus is None:
            gpus = self._judge(i)
            self.rows[i] = (hv, gpus)
            self.unjudged -= 1
        return gpus

    @cached_property
    def hosts(self) -> tuple[tuple[HostView, tuple[GpuView, ...]], ...]:
        """Every host with a GPU that passes the device filters, and the hosts without GPUs that are
        candidates (their RAM the runtime's device: only when the request allows it)."""
        self.judge_all()
        return tuple((hv, gpus) for hv, gpus in self.rows if gpus or not hv.gpus)

    def judge_all(self) -> None:
        for i in range(len(self.rows)) if self.unjudged else ():
            self.eligible(i)


class ShardedSearch:
    def __init__(self, candidates: Candidates, strategy: Strategy, cache: dict | None = None,
                 links: dict | None = None):
        self.candidates = candidates
        self.strategy = strategy
        self._cache = cache if cache is not None else {}  # per (host view, budget fraction): sorted capacities
        self._links = links if links is not None else {}  # per host inventory: its HostLinks
        self._caps: dict[float | None, list[tuple[HostView, list[int], tuple[GpuView, ...]]]] = {}
        self._kth: dict[tuple, list[int]] = {}  # per (budget fraction, g): g-th largest capacities, ascending
        self._top: dict[float | None, int] = {}  # per budget fraction: the largest capacity

    # ------------------------------------------------------------------ capacities

    def _host_caps(self, demand: ShardDemand) -> list[tuple[HostView, list[int], tuple[GpuView, ...]]]:
        """Per host: its capacities, largest first, and its GPUs. Cached per budget fraction.

        Capacities are plain ints: GPUs are only looked at again on the hosts a layout chooses.
        """
        key = demand.budget_fraction
        rows = self._caps.get(key)
        if rows is None:
            rows = self._caps[key] = self._caps_of(self.candidates.hosts, key)
        return rows

    def _caps_of(self, hosts: Iterable[tuple[HostView, tuple[GpuView, ...]]],
                 f: float | None) -> list[tuple[HostView, list[int], tuple[GpuView, ...]]]:
        """Each host's capacities, largest first; cached per host view and budget fraction."""
        rows = []
        cache = self._cache
        for hv, gpus in hosts:
            hit = cache.get((id(hv), f))
            if hit is None or hit[0] is not gpus:
                caps = [g.free for g in gpus] if f is None else [int(f * g.total) for g in gpus]
                caps.sort(reverse=True)
                hit = cache[(id(hv), f)] = (gpus, caps, hv)
            rows.append((hv, hit[1], gpus))
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

    def find(self, shape: Sharded, demand: ShardDemand, explain: bool = True) -> Layout | Rejection | None:
        """The layout, or why there is none. A what-if (not `explain`) gets None instead of the why."""
        need = demand.per_gpu
        g = shape.gpus_per_host
        top = self.candidates.max_memory
        if shape.link != "any":  # a preference: a miss is no rejection (the plain shape explains it)
            return self._find_linked(shape, demand) if demand.capacity(top, top) >= need else None
        if demand.capacity(top, top) < need:  # no GPU could hold a share, whatever the device filters say
            return self._why_not(shape, demand, 0) if explain else None
        if self.candidates.unjudged:
            hosts = self._first_fitting(demand, g, shape.hosts)
            if hosts is None:
                return None
        else:
            arr = self._kth_sorted(demand, g)
            qualifying = len(arr) - bisect.bisect_left(arr, need)
            if qualifying < shape.hosts:
                return self._why_not(shape, demand, qualifying) if explain else None
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

    def _find_linked(self, shape: Sharded, demand: ShardDemand) -> Layout | None:
        """One host's GPUs, every pair joined by `shape.link`: the first host in the strategy's order that
        has them (the host _choose_hosts would prefer among those that do), its preferred GPUs among
        them. Hosts without links are passed over before their GPUs are looked at."""
        need = demand.per_gpu
        g = shape.gpus
        f = demand.budget_fraction
        candidates = self.candidates
        if not candidates.unjudged:  # no host has g GPUs that can hold a share: nothing to scan
            arr = self._kth_sorted(demand, g)
            if not arr or arr[-1] < need:
                return None
        kind = shape.link
        cache = self._links
        for i in self._order:
            hv = candidates.rows[i][0]
            if len(hv.gpus) < g or not hv.info.gpu_links:
                continue
            gpus = candidates.eligible(i)
            caps = self._caps_of(((hv, gpus),), f)[0][1]
            if len(caps) < g or caps[g - 1] < need:
                continue
            links = links_of(hv.info, cache)
            if links is None or links.largest[kind] < g:
                continue
            if f is None:
                fitting = [gv for gv in gpus if gv.free >= need]
            else:
                fitting = [gv for gv in gpus if int(f * gv.total) >= need]
            chosen = links.choose(kind, self._rank_gpus(fitting), g)
            if chosen is None:
                continue
            chosen = sorted(chosen, key=_index)
            memory = tuple(demand.reservation(gv.total) for gv in chosen)
            layers = sum(demand.stage_layers or (0,))
            part = PartLayout(hv.name, "main", tuple(gv.index for gv in chosen), memory, layers=layers)
            return Layout(shape, (part,), demand)
        return None

    def _choose_hosts(self, demand: ShardDemand, g: int, n: int) -> list[tuple[HostView, tuple[GpuView, ...]]]:
        need = demand.per_gpu
        i = g - 1
        key = self.strategy.host_key
        rows = [(key(hv), hv, gpus) for hv, caps, gpus in self._host_caps(demand) if len(caps) > i and caps[i] >= need]
        best = heapq.nsmallest(n, rows, key=_first)
        return [(hv, gpus) for _, hv, gpus in best]

    def _first_fitting(self, demand: ShardDemand, g: int, n: int) -> list[tuple[HostView, tuple[GpuView, ...]]] | None:
        """What _choose_hosts picks (the first n hosts in the strategy's order with g GPUs that can hold
        a share), judging hosts only as far as the scan goes; None if fewer than n can. A scan that
        fails has judged nearly every host, so it judges the rest: the next shape bisects."""
        need = demand.per_gpu
        f = demand.budget_fraction
        candidates = self.candidates
        chosen = []
        for i in self._order:
            hv = candidates.rows[i][0]
            if len(hv.gpus) < g:
                continue
            gpus = candidates.eligible(i)
            caps = self._caps_of(((hv, gpus),), f)[0][1]
            if len(caps) >= g and caps[g - 1] >= need:
                chosen.append((hv, gpus))
                if len(chosen) == n:
                    return chosen
        candidates.judge_all()
        return None

    @cached_property
    def _order(self) -> list[int]:
        """The candidate hosts (their rows) in the strategy's order."""
        key = self.strategy.host_key
        keys = [key(hv) for hv, _ in self.candidates.rows]
        return sorted(range(len(keys)), key=keys.__getitem__)

    def _choose_gpus(self, fitting: Sequence[GpuView], g: int) -> list[GpuView]:
        return sorted(self._rank_gpus(fitting)[:g], key=_index)

    def _rank_gpus(self, fitting: Sequence[GpuView]) -> list[GpuView]:
        if self.strategy.binpack:  # the fullest GPUs that still fit: keep empty ones whole
            return sorted(fitting, key=_free_then_index)
        return sorted(fitting, key=_most_free_then_index)

    # ------------------------------------------------------------------ explanations

    def _largest(self, demand: ShardDemand) -> int:
        """The largest capacity of an eligible GPU. Cached per budget fraction."""
        f = demand.budget_fraction
        if f not in self._top:
            hosts = self.candidates.hosts
            if f is None:
                self._top[f] = max((g.free for _, gpus in hosts for g in gpus), default=0)
            else:  # the GPU with the most memory: usually one of the largest size passed, found at once
                top = self.candidates.max_memory
                if not any(g.total == top for _, gpus in hosts for g in gpus):
                    top = max((g.total for _, gpus in hosts for g in gpus), default=0)
                self._top[f] = int(f * top)
        return self._top[f]

    def _why_not(self, shape: Sharded, demand: ShardDemand, qualifying: int) -> Rejection:
        need = demand.per_gpu
        extra = {} if demand.budget_fraction is None else {"budget_fraction": demand.budget_fraction}
        largest = self._largest(demand)
        if largest < need:
            return _miss("did not fit: the per-GPU share exceeds every GPU's memory", shape,
                         f"{shape.label} needs {gib(need)} per GPU, largest {gib(largest)}",
                         largest / need if need else 0.0, needs=need, largest=largest, **extra, **demand.breakdown)
        rows = self._host_caps(demand)
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
        # Slightly below a memory miss of the same ratio: a missing GPU is the harder fix.
        return _miss("did not fit: too few GPUs with room for a share", shape, detail, closeness * 0.999,
                     needs=need, gpus_per_host=g, hosts=shape.hosts, qualifying_hosts=qualifying,
                     best_host=best_host, best_host_gpus=best_n, **extra)


def _miss(reason: str, shape: Sharded, detail: str, closeness: float, **details: Any) -> Rejection:
    """A shape that did not fit: layout_rejection's fields, ranked by closeness and not listing where."""
    label = shape.label
    return Rejection("layout", reason, detail, {"shape": label, **details}, where=label, closeness=closeness)


def _first(row: tuple) -> Any:
    return row[0]


def _index(gv: GpuView) -> int:
    return gv.index


def _free_then_index(gv: GpuView) -> tuple[int, int]:
    return (gv.free, gv.index)


def _most_free_then_index(gv: GpuView) -> tuple[int, int]:
    return (-gv.free, gv.index)
