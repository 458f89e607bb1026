"""How a host's GPUs are joined (NVLink or PCIe only), read from its inventory's `gpu_links`.

A runtime may ask for a layout whose GPUs are all joined by one kind of
link (`Sharded(..., link="nvlink")`): vLLM runs tensor parallel over NVLink
and pipeline stages over PCIe. A pair the inventory does not list is
unknown, and unknown is neither kind: such a pair never satisfies a link
requirement, so hosts without topology get the plain shapes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from agentd.types import HostInventory

KINDS = ("nvlink", "pcie")
T = TypeVar("T")


class HostLinks:
    """One host's links by kind: who is adjacent to whom, and the largest connected group."""

    __slots__ = ("adjacent", "bounds", "largest")

    def __init__(self, info: HostInventory):
        self.adjacent: dict[str, dict[int, set[int]]] = {k: {} for k in KINDS}
        for link in info.gpu_links:
            adj = self.adjacent.get(link.link)
            if adj is not None:
                a, b = link.gpus
                adj.setdefault(a, set()).add(b)
                adj.setdefault(b, set()).add(a)
        self.largest = {k: _largest_component(adj) for k, adj in self.adjacent.items()}
        self.bounds = bounds(info, {})

    def choose(self, kind: str, ranked: Sequence[T], g: int, index=lambda x: x.index) -> list[T] | None:
        """`g` of `ranked` (most preferred first) with every pair joined by `kind`, or None.

        Greedy: from each GPU in turn, add the next preferred GPUs adjacent to all chosen so far.
        Exact when the links of a kind form cliques (NVSwitch, NVLink bridges in pairs, one PCIe
        tree), which is what hosts have; on a partial mesh it may miss a set that exists.
        """
        if g <= 1:
            return list(ranked[:g]) if len(ranked) >= g else None
        adj = self.adjacent[kind]
        if self.largest[kind] < g:
            return None
        for start in ranked:
            near = adj.get(index(start))
            if not near or len(near) < g - 1:
                continue
            pick = [start]
            for other in ranked:
                i = index(other)
                if i in near and all(i in adj[index(p)] for p in pick[1:]):
                    pick.append(other)
                    if len(pick) == g:
                        return pick
        return None


def _largest_component(adj: dict[int, set[int]]) -> int:
    seen: set[int] = set()
    best = 0
    for start in adj:
        if start in seen:
            continue
        stack, size = [start], 0
        seen.add(start)
        while stack:
            node = stack.pop()
            size += 1
            for n in adj[node]:
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        best = max(best, size)
    return best


def bounds(info: HostInventory, cache: dict[int, tuple[HostInventory, Any]]) -> tuple[int, int]:
    """An upper bound on the most GPUs of the host all joined by NVLink, and all by PCIe only: the largest
    k whose k(k-1)/2 pairs the host lists of that kind, at most its GPU count. Counting is cheap enough to
    run on every host of every placement (building HostLinks is not); cached per inventory object."""
    hit = cache.get(id(info))
    if hit is not None and hit[0] is info:
        return hit[1] if isinstance(hit[1], tuple) else hit[1].bounds
    nvlink = pcie = 0
    for link in info.gpu_links:
        kind = link.link
        if kind == "nvlink":
            nvlink += 1
        elif kind == "pcie":
            pcie += 1
    n = len(info.gpus)
    out = (min(n, _clique_bound(nvlink)), min(n, _clique_bound(pcie)))
    cache[id(info)] = (info, out)
    return out


def _clique_bound(pairs: int) -> int:
    """The largest k with k(k-1)/2 <= pairs (0 without pairs)."""
    if not pairs:
        return 0
    k = int((1 + math.sqrt(1 + 8 * pairs)) / 2)
    while k * (k - 1) // 2 > pairs:
        k -= 1
    return k


def links_of(info: HostInventory, cache: dict[int, tuple[HostInventory, HostLinks]]) -> HostLinks | None:
    """The host's links (None without any), built once per inventory object."""
    if not info.gpu_links:
        return None
    hit = cache.get(id(info))
    if hit is None or hit[0] is not info or isinstance(hit[1], tuple):
        hit = cache[id(info)] = (info, HostLinks(info))
    return hit[1]
