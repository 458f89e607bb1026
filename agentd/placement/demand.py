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
    holds layers also needs `device_overhead` (compute buffer, CUDA context).

    The output layer follows one rule, shared with the act phase
    (agentd_llamabox/process.py): its weight is on the last device exactly
    when every layer is (full offload: `output_bytes` + `output_overhead`
    there). In partial offload at least one layer stays in RAM, the output
    weight stays in RAM with it (`cpu_output_bytes`), and only what is left
    of the output layer, `output_norm_bytes`, goes to the last device.
    """

    layer_bytes: tuple[int, ...]  # weights + KV cache of each repeating layer, in model order
    output_bytes: int = 0  # output (lm_head) + output_norm, on the last device in full offload
    device_overhead: int = 0  # per device holding layers: compute buffer + runtime context
    output_overhead: int = 0  # extra on the device holding the output layer (logits buffer)
    cpu_fixed_bytes: int = 0  # host RAM the main always needs (token embeddings stay on CPU)
    cpu_layer_bytes: tuple[int, ...] = ()  # RAM per layer kept on CPU; empty = layer_bytes
    breakdown: Mapping[str, int] = field(default_factory=dict)
    output_norm_bytes: int = 0  # the part of output_bytes on the last device in partial offload
    cpu_output_bytes: int = 0  # RAM the output weight takes in partial offload (0 if it shares another tensor)
    # Full offload onto one device: llama.cpp runs no pipeline, so that device's overhead (compute buffer with
    # the logits, runtime context) is this instead of device_overhead + output_overhead (None: the same).
    single_device_overhead: int | None = None
    pipeline_cpu_bytes: int = 0  # host RAM added when a full offload spans several devices (pipeline copies)

    @property
    def layers(self) -> int:
        return len(self.layer_bytes)

    def __post_init__(self):
        if self.single_device_overhead is not None and \
                self.single_device_overhead > self.device_overhead + self.output_overhead:
            # The search fits a one-device full offload with either figure; it must never book more than it fit.
            raise ValueError("single_device_overhead must not exceed device_overhead + output_overhead")

    @property
    def single_overhead(self) -> int:
        """The overhead of the only device of a full offload."""
        both = self.device_overhead + self.output_overhead
        return both if self.single_device_overhead is None else self.single_device_overhead

    def ram_for(self, cpu_layers: int, pipeline: bool = False) -> int:
        """Host RAM of the main process with the first `cpu_layers` layers on the CPU (and, when
        there are any, the output weight with them); `pipeline`: a full offload over several devices."""
        per = self.cpu_layer_bytes or self.layer_bytes
        return (self.cpu_fixed_bytes + (self.cpu_output_bytes if cpu_layers > 0 else 0) + sum(per[:cpu_layers])
                + (self.pipeline_cpu_bytes if pipeline else 0))


Demand = ShardDemand | LayerDemand
