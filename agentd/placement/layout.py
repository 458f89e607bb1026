"""A concrete candidate: which GPUs of which hosts hold what. Built by the core, judged by constraints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agentd.placement.demand import Demand
from agentd.placement.shapes import Shape
from agentd.placement.units import index_list

Role = Literal["main", "worker", "rpc"]


@dataclass(frozen=True)
class PartLayout:
    host: str
    role: Role
    gpus: tuple[int, ...]
    memory: tuple[int, ...]  # bytes booked on each of `gpus`
    layers: int = 0
    layer_split: tuple[int, ...] = ()  # layers on each of `gpus`
    cpu_layers: int | None = None


@dataclass(frozen=True)
class Layout:
    shape: Shape
    parts: tuple[PartLayout, ...]
    demand: Demand
    # Numbers the engine learned while building this candidate, for constraints
    # and messages: e.g. main_layer_need and main_largest_free for a layer split.
    facts: Mapping[str, float] = field(default_factory=dict)

    @property
    def main(self) -> PartLayout:
        return self.parts[0]

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.host for p in self.parts))

    @property
    def rpc_servers(self) -> int:
        return sum(1 for p in self.parts if p.role == "rpc")

    @property
    def gpu_count(self) -> int:
        return sum(len(p.gpus) for p in self.parts)

    @property
    def gpu_layers(self) -> int:
        return sum(p.layers for p in self.parts)

    @property
    def cpu_layers(self) -> int:
        return sum(p.cpu_layers or 0 for p in self.parts)

    @property
    def label(self) -> str:
        by_host: dict[str, list[int]] = {}
        for p in self.parts:
            by_host.setdefault(p.host, []).extend(p.gpus)
        where = "; ".join(f"{h} GPU{'s' if len(g) != 1 else ''} {index_list(g)}" for h, g in by_host.items())
        return f"{self.shape.label} on {where}"

    def reservations(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for p in self.parts:
            for index, mem in zip(p.gpus, p.memory, strict=True):
                out[(p.host, index)] = out.get((p.host, index), 0) + mem
        return out


@dataclass(frozen=True)
class LaunchParams:
    """What `agentd_layout_args` returns: launch arguments for the main process, env for each part."""

    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, str], ...] = ()  # one mapping per part, same order as Layout.parts
