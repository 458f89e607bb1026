"""Finding devices for a `LayerSplit` shape (llama.cpp / llama-box with rpc-servers).

llama.cpp puts whole layers on devices in order: the first `cpu_layers`
stay in host RAM, then contiguous blocks go to each device, RPC devices
first (in `--rpc` order) and the main server's own GPUs last; the output
layer goes to the very last device. So the main server's GPUs hold the
*last* layers and the output, and we fill backwards: the main server's GPUs
first (the one that loses least by holding the output takes it), then
rpc-server GPUs from the largest down, each taking as many of the remaining
layers as fit. Whatever is left
stays on the CPU (partial offload) or the candidate fails (full offload).

Every host is a main-server candidate. Candidates rank by fewer
rpc-servers, fewer hosts, fewer CPU layers, the plugins' scores, then the
strategy; the best one that passes the layout constraints wins, and on a
failure every candidate's rejection is kept for the diagnosis.

Cost: the GPUs are sorted once. A main server's own fill depends only on
its GPUs' free memory, and the rpc fill only on the layers left and the
host's RAM, so both are cached; a candidate whose host's GPUs the cached
rpc fill did not touch reuses it as is. That keeps a candidate at O(GPUs
per host) in the common case, and the whole search at about n log n in GPUs.
Greedy largest-first minimises the rpc-server count when layers are of
equal size; with uneven layers it is a good heuristic, not an optimum.

Hosts without GPUs (candidates only when the runtime declares
RuntimeInfo.host_memory and the deployment allows CPU offload: `ram`) offer
their RAM as one rpc device each, after every GPU, in partial offload only
(where the main server's own RAM is tried before them): a remote CPU is the
last resort for layers, and a GPU-only fill never looks at them. Such a device
books its bytes in the host's RAM (`PartLayout.ram`), as does a main server
on a host without GPUs, so another deployment does not get the same RAM.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agentd.placement.constraints import Rejection
from agentd.placement.demand import LayerDemand
from agentd.placement.layout import Layout, PartLayout
from agentd.placement.shapes import LayerSplit
from agentd.placement.sharded import Candidates
from agentd.placement.snapshot import GpuView, HostView
from agentd.placement.strategy import Strategy
from agentd.placement.units import gib
from agentd.plugins.api import RAM_INDEX

Validate = Callable[[Layout], Rejection | None]
Score = Callable[[Layout], float]

SUBJECT = "main-server candidate"

# One device's share: (gpu, lo, hi) holds layers [lo, hi).
Block = tuple[GpuView, int, int]


@dataclass(frozen=True)
class _MainFill:
    """The main server's own GPUs: blocks in fill order (the output device first when fully offloaded)."""

    blocks: tuple[Block, ...]
    lo: int  # layers [0, lo) are left for rpc-servers or the CPU
    output: GpuView | None  # the GPU holding the output layer (full offload)


class LayerSplitSearch:
    def __init__(self, candidates: Candidates, strategy: Strategy, exact: tuple[tuple[str, int], ...] | None = None,
                 pinned: dict[str, tuple[int, ...]] | None = None, ram: bool = False):
        self.candidates = candidates
        self.ram = ram
        self._ram_pool: list[GpuView] | None = None
        self.strategy = strategy
        self.exact = exact
        self.pinned = pinned or {}
        self._host_rank = {hv.name: self._host_key(hv) for hv, _ in candidates.hosts}
        self._orders: list[list[GpuView]] | None = None
        self._pool: _Pool | None = None
        self._by_host_order: list[tuple[str, list[GpuView]]] | None = None

    @property
    def orders(self) -> list[list[GpuView]]:
        """Each candidate host's GPUs in fill order: most free first, ties highest index first.

        The main server fills its GPUs in this order (so the device order, its
        reverse, lists tied GPUs ascending), and the pool merges these lists.
        Hosts' GPUs are in index order, so a stable sort of the reversed list
        by free memory, descending, gives exactly that.
        """
        if self._orders is None:
            self._orders = [sorted(reversed(gpus), key=_free, reverse=True) for _, gpus in self.candidates.hosts]
        return self._orders

    @property
    def pool(self) -> _Pool:
        """Every candidate GPU, largest first: built only when some main server needs rpc-servers.

        Ties are grouped by host in strategy order (fewer hosts) and, within a
        host, highest index first so that the device order (the reverse of the
        fill order) lists a host's GPUs ascending. Produced lazily: a fill
        walks only the head of it.
        """
        if self._pool is None:
            rank = self._host_rank
            by_rank = sorted(range(len(self.candidates.hosts)), key=lambda i: rank[self.candidates.hosts[i][0].name])
            self._pool = _Pool([(r, self.orders[i]) for r, i in enumerate(by_rank)])
        return self._pool

    @property
    def ram_pool(self) -> list[GpuView]:
        """One RAM device per candidate host without GPUs (`ram`), most RAM left first, then strategy order."""
        if self._ram_pool is None:
            rank = self._host_rank
            views = [_ram_device(hv) for hv, gpus in self.candidates.hosts
                     if self.ram and not hv.gpus and (hv.ram_available or 0) > 0]
            views.sort(key=lambda g: (-g.free, rank[g.host]))
            self._ram_pool = views
        return self._ram_pool

    @property
    def _by_host(self) -> list[tuple[str, list[GpuView]]]:
        if self._by_host_order is None:
            rank = self._host_rank
            rows = [(-sum(g.free for g in order), rank[hv.name], hv.name, order)
                    for (hv, _), order in zip(self.candidates.hosts, self.orders, strict=True)]
            rows.sort(key=_two)
            self._by_host_order = [(name, order) for _, _, name, order in rows]
        return self._by_host_order

    def _host_key(self, hv: HostView) -> tuple:
        return self.strategy.host_key(hv)

    # ------------------------------------------------------------------ search

    def find(self, shape: LayerSplit, demand: LayerDemand, validate: Validate,
             score: Score | None) -> Layout | list[Rejection]:
        ctx = _Ctx(demand, shape.offload == "full")
        if self.exact is not None:
            return self._find_exact(shape, ctx, validate)
        rejections: list[Rejection] = []
        # One row per viable main server: (rank key, host, its GPUs in fill order, main fill, rpc blocks).
        # Plain tuples: the candidate objects and facts are built only for the rows that get validated.
        entries: list[tuple] = []
        main_cache: dict[tuple[int, ...], tuple | None] = {}
        rpc_cache: dict[tuple[int, int | None], tuple[tuple[Block, ...] | None, int, frozenset[str], int]] = {}
        rank = self._host_rank
        for (hv, gpus), order in zip(self.candidates.hosts, self.orders, strict=True):
            frees = tuple(g.free for g in order)
            plan = main_cache.get(frees, _MISSING)
            if plan is _MISSING:
                plan = main_cache[frees] = _fill_main(ctx, frees)
            if plan is None or not plan[3]:
                main = None if plan is None else _main_fill(order, plan)
                why = self._empty_main(shape, ctx, hv, main, self._facts(ctx, gpus), validate)
                if why is not None:
                    rejections.append(why)
                    continue
                if plan is None:
                    continue
            lo = plan[1]
            rpc, left, hosts = self._rpc(ctx, hv, lo, rpc_cache)
            if rpc is None:
                rejections.append(self._short(ctx, hv, left, self._facts(ctx, gpus)))
                continue
            cpu = rpc[-1][1] if rpc else lo
            entries.append(((len(rpc), hosts, cpu, *rank[hv.name]), hv, order, plan, rpc))
        if score is not None:  # plugins' scores rank candidates equal on rpc-servers, hosts and CPU layers
            scored = []
            for key, hv, order, plan, rpc in entries:
                layout = self._layout(shape, ctx, hv, _main_fill(order, plan), rpc)
                scored.append(((*key[:3], -score(layout), *key[3:]), hv, order, plan, rpc))
            entries = scored
        if not entries:
            return rejections
        # Keys are unique (they end with the host name): the smallest is the first in sorted order,
        # and usually valid, so the full sort is only paid when it is not.
        first = min(entries, key=_first)
        layout = self._layout(shape, ctx, first[1], _main_fill(first[2], first[3]), first[4])
        why = validate(layout)
        if why is None:
            return layout
        rejections.append(why)
        entries.sort(key=_first)
        for _, hv, order, plan, rpc in entries[1:]:
            layout = self._layout(shape, ctx, hv, _main_fill(order, plan), rpc)
            why = validate(layout)
            if why is None:
                return layout
            rejections.append(why)
        return rejections

    # ------------------------------------------------------------------ the main server

    def _main(self, ctx: _Ctx, gpus: Sequence[GpuView], cache: dict) -> _MainFill | None:
        order = sorted(gpus, key=lambda g: (-g.free, -g.index))  # ties: ascending CUDA order in the plan
        frees = tuple(g.free for g in order)
        if frees not in cache:
            cache[frees] = _fill_main(ctx, frees)
        plan = cache[frees]
        return None if plan is None else _main_fill(order, plan)

    def _facts(self, ctx: _Ctx, gpus: Sequence[GpuView]) -> dict[str, float]:
        largest = max((g.free for g in gpus), default=0)
        # With two GPUs or more the output layer can sit on another GPU than the first layer.
        need = ctx.d + ctx.last + (ctx.out if len(gpus) <= 1 else 0)
        return {"main_layer_need": need, "main_largest_free": largest}

    def _empty_main(self, shape: LayerSplit, ctx: _Ctx, hv: HostView, main: _MainFill | None, facts,
                    validate: Validate) -> Rejection | None:
        """A main server holding no layer: the layout constraints say why; without one, full offload
        still needs the output layer on the main server."""
        # main_gpus 0: a host without GPUs (admitted for a CPU deployment), whose RAM is its device.
        empty = Layout(shape, (PartLayout(hv.name, "main", (), (), layers=0, cpu_layers=ctx.layers),),
                       ctx.demand, {**facts, "main_gpus": len(hv.gpus)})
        why = validate(empty)
        if why is not None or main is not None:
            return why
        largest = facts["main_largest_free"]
        return Rejection(SUBJECT, "cannot hold the output layer",
                         f"needs {gib(ctx.d + ctx.out)}, largest free {gib(largest)}",
                         {"needs": ctx.d + ctx.out, "largest_free": largest}, where=hv.name,
                         closeness=largest / (ctx.d + ctx.out))

    def _short(self, ctx: _Ctx, hv: HostView, left: int, facts) -> Rejection:
        if ctx.full:
            return Rejection(SUBJECT, "cannot fit all layers on GPUs (CPU offload not allowed)",
                             f"{left} of {ctx.layers} layers ({gib(ctx.prefix[left])}) left over with the main "
                             f"server on {hv.name}",
                             {"layers_left": left, "bytes_left": ctx.prefix[left], "host": hv.name, **facts},
                             where=hv.name, closeness=1 - left / ctx.layers)
        ram = hv.ram_available or 0
        need = ctx.demand.ram_for(left, cpu_features=hv.info.cpu_features)
        return Rejection(SUBJECT, "has too little RAM for the layers left on the CPU",
                         f"{left} layers need {gib(need)} of RAM, {gib(ram)} available on {hv.name}",
                         {"cpu_layers": left, "ram_needed": need, "ram_available": ram, "host": hv.name},
                         where=hv.name, closeness=min(1.0, ram / need) if need else 0.0)

    # ------------------------------------------------------------------ rpc-servers

    def _rpc(self, ctx: _Ctx, hv: HostView, hi: int, cache: dict) -> tuple[tuple[Block, ...] | None, int, int]:
        """rpc-server blocks (fill order) for layers [.., hi), or None and the layers left over; and the
        number of hosts the layout then spans (the main's included).

        Cached per (hi, RAM, CPU features); the cached fill is reused unless it used this host's GPUs.
        """
        ram = None if ctx.full else hv.ram_available
        features = hv.info.cpu_features
        key = (hi, ram, features)
        hit = cache.get(key)
        if hit is None:
            blocks, left, seen = self._fill_rpc(ctx, None, hi, ram, features)
            hit = cache[key] = (blocks, left, seen, 1 + len({g.host for g, _, _ in blocks or ()}))
        blocks, left, seen, hosts = hit
        if hv.name not in seen:
            return blocks, left, hosts
        blocks, left, _ = self._fill_rpc(ctx, hv.name, hi, ram, features)
        return blocks, left, 1 + len({g.host for g, _, _ in blocks or ()})

    def _fill_rpc(self, ctx: _Ctx, main_host: str | None, hi: int, ram: int | None, features: tuple[str, ...]):
        """(blocks or None, layers left, hosts whose GPUs the walks looked at)."""

        def done(lo: int) -> bool:
            if ctx.full:
                return lo == 0
            return ram is None or ctx.demand.ram_for(lo, cpu_features=features) <= ram

        if done(hi):
            return (), hi, frozenset()
        seen: set[str] = set()
        partial: list[Block] = []
        greedy, left = _walk(ctx, (g for g in self.pool if g.host != main_host), hi, done, seen, sorted_=True,
                             blocks=partial)
        if greedy is None and not ctx.full and self.ram_pool:  # what no GPU holds: hosts' RAM (host_memory)
            greedy, left = _walk(ctx, (g for g in self.ram_pool if g.host != main_host), left, done, seen,
                                 sorted_=True, blocks=partial)
        if greedy is None:
            return None, left, frozenset(seen)
        grouped, _ = _walk(ctx, self._grouped(main_host), hi, done, seen, limit=len(greedy))
        options = [f for f in (greedy, grouped) if f is not None]
        best = min(options, key=lambda f: (len(f), len({g.host for g, _, _ in f})))
        return tuple(best), 0, frozenset(seen)

    def _grouped(self, main_host: str | None) -> Iterable[GpuView]:
        """Other hosts' GPUs host by host (most free first): fewer hosts for the same rpc count."""
        for host, gpus in self._by_host:
            if host != main_host:
                yield from gpus

    # ------------------------------------------------------------------ pinned

    def _find_exact(self, shape: LayerSplit, ctx: _Ctx, validate: Validate) -> Layout | list[Rejection]:
        """Pinned GPUs: the first pin is the main server; every pinned GPU gets at least one layer."""
        assert self.exact is not None
        by_host = {hv.name: (hv, gpus) for hv, gpus in self.candidates.hosts}
        main_name = self.exact[0][0]
        if main_name not in by_host or len(by_host[main_name][1]) != self.exact[0][1]:
            return []  # a pinned GPU was rejected by a device filter; that rejection explains it
        hv, main_gpus = by_host[main_name]
        order = sorted(main_gpus, key=lambda g: (-g.free, -g.index))
        rpc: list[GpuView] = []
        for host, count in self.exact[1:]:
            if host not in by_host or len(by_host[host][1]) != count:
                return []
            index_order = {i: n for n, i in enumerate(self.pinned.get(host, ()))}
            rpc += sorted(by_host[host][1], key=lambda g: index_order.get(g.index, g.index))
        devices = order + rpc
        facts = self._facts(ctx, main_gpus)
        main_only = self._main(ctx, main_gpus, {})
        if main_only is None or not any(hi > lo for _, lo, hi in main_only.blocks):
            why = self._empty_main(shape, ctx, hv, main_only, facts, validate)
            if why is not None:
                return [why]
        counts = _balanced(ctx, devices) if ctx.full else None
        if ctx.full and len(devices) == 1 and devices[0].free >= ctx.single + ctx.prefix[-1]:
            counts = [ctx.layers]  # one device runs no pipeline: its own (smaller) overhead
        if counts is None:
            counts = _greedy_reserved(ctx, devices)
        if counts is None:
            return [Rejection("pinned layout", "cannot give every pinned GPU a layer",
                              f"{len(devices)} pinned GPUs, {ctx.layers} layers", {"gpus": len(devices)},
                              where=main_name)]
        blocks, hi = [], ctx.layers
        for g, n in zip(devices, counts, strict=True):
            blocks.append((g, hi - n, hi))
            hi -= n
        if (ctx.full and hi) or (not ctx.full and not _ram_ok(ctx, hv, hi)):
            return [self._short(ctx, hv, hi, facts)]
        main = _MainFill(tuple(blocks[:len(order)]), blocks[len(order) - 1][1], order[0] if ctx.full else None)
        layout = self._layout(shape, ctx, hv, main, tuple(blocks[len(order):]), facts)
        why = validate(layout)
        return [why] if why else layout

    # ------------------------------------------------------------------ result

    def _layout(self, shape: LayerSplit, ctx: _Ctx, hv: HostView, main: _MainFill, rpc: Sequence[Block],
                facts: dict | None = None) -> Layout:
        cpu_layers = rpc[-1][1] if rpc else main.lo
        kept = [(g, lo, hi) for g, lo, hi in main.blocks if hi > lo or g is main.output]
        # Device order is the reverse of fill order: CUDA_VISIBLE_DEVICES lists the main GPUs so the
        # GPU holding the output layer comes last, and rpc parts come in --rpc order.
        dev = list(reversed(kept))
        # The last device takes llama.cpp's output slot: the whole output layer in full offload, only
        # its norm in partial offload (the weight stays in RAM; demand.py has the rule).
        last = len(dev) - 1
        pipeline = ctx.full and len(dev) + len(rpc) > 1  # llama.cpp's pipeline parallelism
        if ctx.full and not pipeline:
            mem = tuple(ctx.prefix[hi] - ctx.prefix[lo] + ctx.single for g, lo, hi in dev)
        else:
            mem = tuple(ctx.prefix[hi] - ctx.prefix[lo] + ctx.d + (ctx.out if k == last else 0)
                        for k, (g, lo, hi) in enumerate(dev))
        ram_needed = ctx.demand.ram_for(cpu_layers, pipeline=pipeline, cpu_features=hv.info.cpu_features)
        main_part = PartLayout(
            hv.name, "main", tuple(g.index for g, _, _ in dev), mem,
            layers=sum(hi - lo for _, lo, hi in dev), layer_split=tuple(hi - lo for _, lo, hi in dev),
            cpu_layers=cpu_layers,
            ram=0 if hv.gpus else ram_needed,  # without GPUs its layers are in RAM: booked like a device's
            cpu_features=hv.info.cpu_features)
        rpc_parts = tuple(_rpc_part(g, ctx.prefix[hi] - ctx.prefix[lo] + ctx.d, hi - lo) for g, lo, hi in reversed(rpc))
        facts = {**(facts or self._facts(ctx, [g for g, _, _ in main.blocks])),
                 "n_gpu_layers": ctx.layers - cpu_layers + (1 if ctx.full else 0), "main_gpus": len(hv.gpus),
                 "ram_needed": ram_needed}
        return Layout(shape, (main_part, *rpc_parts), ctx.demand, facts)


class _Ctx:
    """Prefix sums and per-device costs of one demand, so a device's share is one bisect."""

    def __init__(self, demand: LayerDemand, full: bool):
        self.demand = demand
        self.full = full
        self.layers = demand.layers
        self.d = demand.device_overhead
        # What the last device holds besides its layers (demand.py: the output rule).
        self.out = demand.output_bytes + demand.output_overhead if full else demand.output_norm_bytes
        # Full offload onto one device runs no pipeline: its overhead is the demand's single-device one
        # (at most d + out, so a fill that fits the one with d + out fits this too).
        self.single = demand.output_bytes + demand.single_overhead if full else 0
        # Partial offload keeps at least one layer on the CPU: with none there, llama.cpp (and the
        # act phase) would put the output weight on the last GPU, and this layout did not book it.
        self.floor = 0 if full else min(1, self.layers)
        prefix = [0]
        for b in demand.layer_bytes:
            prefix.append(prefix[-1] + b)
        self.prefix = prefix
        self.last = demand.layer_bytes[-1] if demand.layer_bytes else 0

    def take(self, free: int, hi: int) -> int:
        """The lowest `lo` (not below the floor) such that layers [lo, hi) fit a device with `free`
        bytes (hi if none fits)."""
        room = free - self.d
        if hi <= self.floor or room < self.prefix[hi] - self.prefix[hi - 1]:
            return hi
        return bisect.bisect_left(self.prefix, self.prefix[hi] - room, self.floor, hi)


def _ram_device(hv: HostView) -> GpuView:
    """A host's RAM as one rpc device: a GpuView with index RAM_INDEX whose free memory is the RAM left."""
    v = object.__new__(GpuView)
    v.info = None  # type: ignore[assignment]
    v.host = hv.name
    v.index = RAM_INDEX
    v.total = hv.info.memory_total
    v.foreign = v.assigned = 0
    v.free = hv.ram_available or 0
    return v


def _rpc_part(g: GpuView, mem: int, layers: int) -> PartLayout:
    if g.index == RAM_INDEX:  # an rpc-server on the host's CPU backend: no GPUs, its bytes booked in RAM
        return PartLayout(g.host, "rpc", (), (), layers=layers, layer_split=(layers,), ram=mem)
    return PartLayout(g.host, "rpc", (g.index,), (mem,), layers=layers, layer_split=(layers,))


def _ram_ok(ctx: _Ctx, hv: HostView, cpu_layers: int) -> bool:
    ram = hv.ram_available
    return ram is None or ctx.demand.ram_for(cpu_layers, cpu_features=hv.info.cpu_features) <= ram


def _fill_main(ctx: _Ctx, frees: tuple[int, ...]) -> tuple[tuple[tuple[int, int, int], ...], int, int, bool] | None:
    """Fill GPUs with these free sizes (largest first): (spans (position, lo, hi), lo, output position,
    whether any GPU got a layer).

    In full offload one GPU must also hold the output layer. We try it on each
    GPU that can hold it (a host has a handful) and keep the fill that places
    the most layers, preferring the larger GPU on a tie; the others fill
    largest first. None when no GPU can hold the output layer.
    """
    if not ctx.full:
        spans, lo = _fill_order(ctx, frees, range(len(frees)), -1)
        return spans, lo, -1, any(hi > lo for _, lo, hi in spans)
    if frees and ctx.layers and frees[0] >= ctx.single + ctx.prefix[-1]:
        return ((0, 0, ctx.layers),), 0, 0, True  # the whole model on the largest GPU: no pipeline
    best = None
    for out, free in enumerate(frees):
        if free < ctx.d + ctx.out or (out and free == frees[out - 1]):
            continue  # cannot hold it, or the same size as one already tried
        order = [out] + [i for i in range(len(frees)) if i != out]
        spans, lo = _fill_order(ctx, frees, order, out)
        if best is None or lo < best[1]:
            best = (spans, lo, out)
            if lo == 0:
                break  # every layer placed: a later GPU could only tie, and ties keep the larger
    if best is None:
        return None
    spans = best[0]
    return spans, best[1], best[2], any(hi > lo for _, lo, hi in spans)


def _main_fill(order: Sequence[GpuView], plan: tuple) -> _MainFill:
    spans, lo, out = plan[0], plan[1], plan[2]
    return _MainFill(tuple((order[i], a, b) for i, a, b in spans), lo, order[out] if out >= 0 else None)


class _Pool:
    """The hosts' fill orders merged into one, largest first, produced as far as a walk reads it."""

    def __init__(self, ranked: list[tuple[int, list[GpuView]]]):
        heap = [(-gpus[0].free, r, -gpus[0].index, 0, gpus) for r, gpus in ranked if gpus]
        heapq.heapify(heap)
        self._heap = heap
        self._done: list[GpuView] = []

    def __iter__(self) -> Iterator[GpuView]:
        done, heap = self._done, self._heap
        i = 0
        while True:
            if i == len(done):
                if not heap:
                    return
                _, r, _, j, gpus = heap[0]
                done.append(gpus[j])
                j += 1
                if j < len(gpus):
                    g = gpus[j]
                    heapq.heapreplace(heap, (-g.free, r, -g.index, j, gpus))
                else:
                    heapq.heappop(heap)
            yield done[i]
            i += 1


_MISSING = object()


def _free(g: GpuView) -> int:
    return g.free


def _first(row: tuple) -> Any:
    return row[0]


def _two(row: tuple) -> tuple:
    return row[0], row[1]


def _fill_order(ctx: _Ctx, frees: tuple[int, ...], order: Iterable[int], out: int):
    """Fill in `order`; GPU `out` holds the output layer (full offload). In partial offload (out < 0)
    the first GPU that takes layers holds the top ones, so it is the last device: it keeps room for
    the output norm."""
    hi, spans = ctx.layers, []
    pending = ctx.out if out < 0 else 0
    floor = ctx.floor
    for i in order:
        lo = ctx.take(frees[i] - (ctx.out if i == out else pending), hi)
        if lo < hi:
            spans.append((i, lo, hi))
            pending = 0
        elif i == out:
            spans.append((i, lo, hi))
        hi = lo
        if hi <= floor:
            break
    return tuple(spans), hi


def _walk(ctx: _Ctx, gpus: Iterable[GpuView], hi: int, done: Callable[[int], bool], seen: set[str],
          sorted_: bool = False, limit: int | None = None,
          blocks: list[Block] | None = None) -> tuple[list[Block] | None, int]:
    """Give each GPU in turn the most remaining layers it holds; `seen` collects the hosts looked at.
    `blocks`, when given, is extended in place (a failed walk leaves what it placed there)."""
    if blocks is None:
        blocks = []
    skip_host = None
    for g in gpus:
        if g.host == skip_host:
            continue
        seen.add(g.host)
        lo = ctx.take(g.free, hi)
        if lo == hi:
            if sorted_:
                break  # GPUs come largest first: none after this one takes the next layer either
            skip_host = g.host  # a host's GPUs come largest first too
            continue
        blocks.append((g, lo, hi))
        hi = lo
        if done(hi):
            return blocks, hi
        if limit is not None and len(blocks) >= limit:
            break
    return None, hi


def _balanced(ctx: _Ctx, devices: Sequence[GpuView]) -> list[int] | None:
    """Layers in proportion to each device's room, at least one each; None if rounding leaves layers over."""
    rooms = [max(0, g.free - ctx.d - (ctx.out if i == 0 else 0)) for i, g in enumerate(devices)]
    left_room = sum(rooms)
    hi, counts = ctx.layers, []
    for i, g in enumerate(devices):
        rest = len(devices) - i - 1
        most = min(hi - ctx.take(g.free - (ctx.out if i == 0 else 0), hi), hi - rest)
        if most < 1:
            return None
        share = round(hi * rooms[i] / left_room) if left_room else 1
        n = max(1, min(most, share))
        counts.append(n)
        hi -= n
        left_room -= rooms[i]
    return counts if hi == 0 else None


def _greedy_reserved(ctx: _Ctx, devices: Sequence[GpuView]) -> list[int] | None:
    """As many layers as fit on each device in turn, keeping one for each device after it."""
    hi, counts = ctx.layers, []
    for i, g in enumerate(devices):
        rest = len(devices) - i - 1
        most = min(hi - ctx.take(g.free - (ctx.out if i == 0 else 0), hi), hi - rest)
        if most < 1:
            return None
        counts.append(most)
        hi -= most
    return counts
