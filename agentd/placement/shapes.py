"""Layout shapes: what a runtime can run, before any GPU is chosen.

A runtime plugin proposes shapes in its order of preference
(`agentd_propose`); the core finds GPUs for each in turn. Two families cover
the runtimes we know:

* `Sharded` - every GPU holds an equal share (vLLM, SGLang): tensor parallel
  `tp` inside a host, pipeline parallel `pp` stages, either all on one host
  (`hosts == 1`) or one stage per host (`hosts == pp`, TP = GPUs per host).
  A sharded shape may ask for GPUs joined by one kind of link (`link="nvlink"`:
  every pair of its GPUs connected by NVLink; `"pcie"`: every pair by PCIe
  only), which the host inventories' `gpu_links` tell. Such a shape is a
  preference, not a rule: the runtime proposes the plain shape too, and a
  linked shape that does not fit is not a rejection the diagnosis counts.
* `LayerSplit` - whole layers spread over the main server's GPUs and remote
  rpc-servers in proportion to their memory (llama.cpp / llama-box), with
  `partial` offload leaving the first layers in the main host's RAM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Link = Literal["any", "nvlink", "pcie"]


@dataclass(frozen=True, order=True)
class Sharded:
    tp: int
    pp: int = 1
    hosts: int = 1
    link: Link = "any"  # the link every pair of the layout's GPUs must have (one host only)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.hosts not in (1, self.pp):
            raise ValueError(f"invalid sharded shape tp={self.tp} pp={self.pp} hosts={self.hosts}")
        if self.link not in ("any", "nvlink", "pcie") or (self.link != "any" and self.hosts != 1):
            raise ValueError(f"invalid link {self.link!r} for a sharded shape on {self.hosts} host(s)")

    @property
    def plain(self) -> Sharded:
        """The same split on any GPUs: what memory and the runtime's rules depend on."""
        return self if self.link == "any" else replace(self, link="any")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def gpus_per_host(self) -> int:
        return self.gpus if self.hosts == 1 else self.tp

    @property
    def label(self) -> str:
        parts = [f"TP={self.tp}"] if self.tp > 1 or self.pp == 1 else []
        if self.pp > 1:
            parts.append(f"PP={self.pp}")
        text = " ".join(parts)
        return f"{text} across {self.hosts} hosts" if self.hosts > 1 else text


@dataclass(frozen=True)
class LayerSplit:
    offload: Literal["full", "partial"] = "full"

    @property
    def label(self) -> str:
        return f"{self.offload} offload"


Shape = Sharded | LayerSplit


@dataclass(frozen=True)
class ShapeLimits:
    """What the hardware that passed host filters could hold, so proposals stay finite.

    Counts include GPUs that device filters rejected: a proposal such as TP=8
    on a host with one busy GPU is still made, so the diagnosis can say what
    freeing that GPU would give.
    """

    hosts: int = 0  # hosts with at least one GPU
    max_gpus_per_host: int = 0
    gpus: int = 0
    max_gpu_memory: int = 0  # the largest memory_total among those GPUs
    # When every pin names GPU indices, the layout must use exactly those GPUs:
    # ((host, gpu count), ...) in pin order. None otherwise.
    exact: tuple[tuple[str, int], ...] | None = None
    # The most GPUs of one host that are all joined by NVLink / all by PCIe only (from `gpu_links`;
    # an upper bound): 0 when no host reports such a pair, so a runtime proposes linked shapes only
    # where they can exist.
    nvlink_gpus: int = 0
    pcie_gpus: int = 0
