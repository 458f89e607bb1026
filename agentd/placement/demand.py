"""Memory estimates a runtime plugin returns from `agentd_estimate`, one per shape family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardDemand:
    """Each GPU of a `Sharded` shape must hold `per_gpu` bytes.

    `budget_fraction` models runtimes that take a fixed fraction of every GPU
    (vLLM's gpu_memory_utilization): the share must fit in fraction x total,
    and that whole budget is what gets booked. Without it, the share must fit
    in the GPU's free memory and exactly the share is booked.
    """

    per_gpu: int
    budget_fraction: float | None = None
    stage_layers: tuple[int, ...] = ()  # model layers per pipeline stage
    breakdown: Mapping[str, int] = field(default_factory=dict)  # weights, kv_cache, activation, overhead

    def capacity(self, total: int, free: int) -> int:
        return int(self.budget_fraction * total) if self.budget_fraction is not None else free

    def reservation(self, total: int) -> int:
        return int(self.budget_fraction * total) if self.budget_fraction is not None else self.per_gpu


@dataclass(frozen=True)
class LayerDemand:
    """Per-layer memory for a `LayerSplit` shape (llama.cpp's layer split).

    Layers are placed whole, in order: the first `cpu_layers` stay in the main
    host's RAM, then contiguous blocks go to each device. Every device that
    holds layers also needs `device_overhead` (compute buffer, CUDA context);
    the last device additionally holds the output layer when fully offloaded.
    """

    layer_bytes: tuple[int, ...]  # weights + KV cache of each repeating layer, in model order
    output_bytes: int = 0  # output (lm_head) + output_norm, on the last device in full offload
    device_overhead: int = 0  # per device holding layers: compute buffer + runtime context
    output_overhead: int = 0  # extra on the device holding the output layer (logits buffer)
    cpu_fixed_bytes: int = 0  # host RAM the main always needs (token embeddings stay on CPU)
    cpu_layer_bytes: tuple[int, ...] = ()  # RAM per layer kept on CPU; empty = layer_bytes
    breakdown: Mapping[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.layer_bytes)

    def ram_for(self, cpu_layers: int) -> int:
        per = self.cpu_layer_bytes or self.layer_bytes
        return self.cpu_fixed_bytes + sum(per[:cpu_layers])


Demand = ShardDemand | LayerDemand
