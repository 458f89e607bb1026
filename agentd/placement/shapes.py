"""Layout shapes: what a runtime can run, before any GPU is chosen.

A runtime plugin proposes shapes in its order of preference
(`agentd_propose`); the core finds GPUs for each in turn. Two families cover
the runtimes we know:

* `Sharded` - every GPU holds an equal share (vLLM, SGLang): tensor parallel
  `tp` inside a host, pipeline parallel `pp` stages, either all on one host
  (`hosts == 1`) or one stage per host (`hosts == pp`, TP = GPUs per host).
* `LayerSplit` - whole layers spread over the main server's GPUs and remote
  rpc-servers in proportion to their memory (llama.cpp / llama-box), with
  `partial` offload leaving the first layers in the main host's RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, order=True)
class Sharded:
    tp: int
    pp: int = 1
    hosts: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.hosts not in (1, self.pp):
            raise ValueError(f"invalid sharded shape tp={self.tp} pp={self.pp} hosts={self.hosts}")

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
