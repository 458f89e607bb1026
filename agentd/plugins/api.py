"""The plugin API: everything a runtime plugin imports from agentd, in one module.

A runtime plugin imports this module and `agentd.types` (the values of the
cluster: ModelInfo, DeploymentSpec, Assignment, ...) and nothing else of
agentd: placement, the runtime supervisor and the daemon may be refactored
freely, and a plugin written against this module keeps working as long as its
`API_VERSION` major matches (docs/plugins.md, "Versioning").

What is here, in the order a deployment meets it:

* describe: `hookimpl` (the marker for hook implementations), `RuntimeInfo`;
* declare / propose / filter / score (placement, pure and synchronous):
  shapes (`Sharded`, `LayerSplit`, `ShapeLimits`), memory estimates
  (`ShardDemand`, `LayerDemand`), candidates (`Layout`, `PartLayout`),
  constraints and their rejections (`Constraint`, `Rejection`, the shared
  rules such as `TensorParallelDivisibility`), and `LaunchParams`;
* explain (since 1.1): `explain_sharded` and `ShardedReasons`, the sentence
  `agentd_explain` returns for a sharded layout and --parallelism;
* act (processes, may be async): `ProcessSpec`, `Endpoint`, `HttpProbe`,
  `TcpProbe`, `ProbeResult`, `HealthVerdict`, `LaunchContext`,
  `ReservedLaunch`, `find_binary`, and (since 1.1) `has_flag`, `cuda_env`,
  `spans_hosts`, `main_part_index`;
* errors: `InvalidInput` (a request you cannot run), `BinaryNotUsable`.

The hook specifications themselves (names, arguments, types, call order) are
in `agentd.plugins.hookspecs` and docs/plugins.md. This module imports only
the standard library, pluggy, pydantic, `agentd.types` and `agentd.errors`
(tests/test_layering.py), so the placement core and the runtime build on it,
never the other way round.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol

import pluggy
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentd.errors import AgentdError, BinaryNotUsable, InvalidInput, PluginError
from agentd.types import Assignment, GiB, Part

__all__ = [
    "API_VERSION", "PARALLELISM_MODES", "AgentdError", "BinaryNotUsable", "Constraint", "CpuFeatureRam", "Demand",
    "Endpoint", "Gpu", "HealthVerdict", "HttpProbe", "InstalledRuntime", "InvalidInput", "LaunchContext",
    "LaunchParams", "LayerDemand", "LayerSplit", "Layout", "Link", "MinFreeFraction", "MinLayersOnMain", "PartLayout",
    "PipelineStages", "PluginError", "ProbeResult", "ProcessSpec", "QuantGroupAlignment", "Rejection", "ReservedLaunch",
    "Role", "RuntimeInfo", "Scorer", "Shape", "ShapeLimits", "ShardDemand", "Sharded", "ShardedReasons", "TcpProbe",
    "TensorParallelDivisibility", "cuda_env", "explain_sharded", "find_binary", "gib", "has_flag", "hookimpl",
    "index_list", "layout_rejection", "main_part_index", "spans_hosts",
]

API_VERSION = "1.2"
"""The plugin API this agentd offers, "MAJOR.MINOR".

A plugin declares the version it was written for with a module-level
`AGENTD_PLUGIN_API = "1.2"` (and the keyword `agentd-plugin-api=1.2` in its
package metadata, which `agentd version` reads without importing it). The
loader refuses a plugin whose major differs, naming the plugin and both
versions; a plugin for a newer minor loads with a warning (it may implement
hooks or use values this agentd does not have yet). Minor versions only add:
hooks, optional hook arguments, optional fields, new exports.
"""

PROJECT = "agentd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a hook implementation: `@hookimpl def agentd_runtime(): ...` (module- or class-level)."""


# --------------------------------------------------------------------------- describe


@dataclass(frozen=True)
class RuntimeInfo:
    """What `agentd_runtime()` returns: the runtime's unique name and the model formats it serves."""

    name: str
    formats: tuple[str, ...]
    description: str = ""
    # The runtime can use a host's RAM as its device (llama.cpp on CPUs): hosts without GPUs become
    # candidates when the deployment allows CPU offload (`allow_cpu_offload`). Layer-split layouts only:
    # such a main server holds its layers in RAM (`cpu_layers`), rpc-servers on other hosts' GPUs take the rest.
    host_memory: bool = False


@dataclass(frozen=True)
class InstalledRuntime:
    """What `agentd_installed(settings)` returns: this host has the runtime's program (version "" if unknown).

    Each agent reports its installed runtimes in its inventory (HostInventory.runtimes), and placement
    never puts a runtime on a host that reports runtimes without it.
    """

    name: str
    version: str = ""


# --------------------------------------------------------------------------- messages


def gib(n: float) -> str:
    """Bytes as GiB with one decimal ("72.0 GiB"): the unit every reason uses, so texts compare."""
    return f"{n / GiB:.1f} GiB"


def index_list(indices: Iterable[int]) -> str:
    """GPU indices as ranges: (0, 1, 2, 3, 6) -> "0-3,6"."""
    out: list[str] = []
    items = sorted(set(indices))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


# --------------------------------------------------------------------------- shapes


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


# --------------------------------------------------------------------------- memory estimates


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
    # Host RAM the runtime adds on a main host whose CPU has a feature (HostInventory.cpu_features).
    cpu_feature_ram: tuple[CpuFeatureRam, ...] = ()

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

    def ram_for(self, cpu_layers: int, pipeline: bool = False, cpu_features: Iterable[str] = ()) -> int:
        """Host RAM of the main process with the first `cpu_layers` layers on the CPU (and, when
        there are any, the output weight with them); `pipeline`: a full offload over several devices;
        `cpu_features`: the main host's (HostInventory.cpu_features)."""
        per = self.cpu_layer_bytes or self.layer_bytes
        ram = (self.cpu_fixed_bytes + (self.cpu_output_bytes if cpu_layers > 0 else 0) + sum(per[:cpu_layers])
               + (self.pipeline_cpu_bytes if pipeline else 0))
        if self.cpu_feature_ram and cpu_layers > 0:
            has = frozenset(cpu_features)
            ram += sum(f.bytes for f in self.cpu_feature_ram if f.feature in has)
        return ram


@dataclass(frozen=True)
class CpuFeatureRam:
    """Host RAM a runtime adds when it keeps layers on a CPU with `feature` (a HostInventory.cpu_features
    flag): llama.cpp copies a tied output weight into its AMX buffers."""

    feature: str
    bytes: int  # added when any layer is on the CPU


Demand = ShardDemand | LayerDemand


# --------------------------------------------------------------------------- candidates


Role = Literal["main", "worker", "rpc"]
# The "GPU index" under which Layout.reservations and Snapshot.reserve carry a host's booked RAM.
RAM_INDEX = -1


@dataclass(frozen=True)
class PartLayout:
    host: str
    role: Role
    gpus: tuple[int, ...]
    memory: tuple[int, ...]  # bytes booked on each of `gpus`
    layers: int = 0
    layer_split: tuple[int, ...] = ()  # layers on each of `gpus`
    cpu_layers: int | None = None
    # Bytes booked in the host's RAM: a main server's layers on a host without GPUs, or an rpc-server
    # serving that RAM as its device (RuntimeInfo.host_memory). 0 elsewhere (RAM is not booked there).
    ram: int = 0
    cpu_features: tuple[str, ...] = ()  # the host's HostInventory.cpu_features (set on a layer split's main part)


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
            if p.ram:
                out[(p.host, RAM_INDEX)] = out.get((p.host, RAM_INDEX), 0) + p.ram
        return out


@dataclass(frozen=True)
class LaunchParams:
    """What `agentd_layout_args` returns: launch arguments for the main process, env for each part."""

    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, str], ...] = ()  # one mapping per part, same order as Layout.parts


class Scorer(Protocol):
    """What `agentd_scorers` returns: ranks valid candidates of one shape (higher is better).

    `weight` is optional (1.0 when absent); the core adds the weighted scores.
    """

    def score(self, layout: Layout) -> float: ...


# --------------------------------------------------------------------------- explain (agentd_explain)
# For runtimes with sharded layouts (TP x PP) and --parallelism: the sentence `agentd_explain` returns.

PARALLELISM_MODES = ("auto", "gpus", "latency")
_LINK_TEXT = {"nvlink": " (NVLink)", "pcie": " (PCIe only)"}


@dataclass(frozen=True)
class ShardedReasons:
    """Why a policy chose a sharded layout, in words a runtime may change where its own advice differs
    (vLLM: "tensor parallel over NVLink, as vLLM advises inside a host")."""

    tp_nvlink: str = "tensor parallel over NVLink inside a host"
    pp_pcie: str = "pipeline stages over PCIe, for GPUs without NVLink"
    across_hosts: str = "no single host holds it: one pipeline stage per host, TP = GPUs per host"

    def reason(self, shape: Sharded, mode: str, limits: ShapeLimits) -> str:
        """Why `shape` under --parallelism `mode`, on hardware `limits`."""
        if limits.exact is not None:
            return "the pinned GPUs"
        if shape.gpus == 1:
            return "one GPU holds it"
        if mode == "gpus":
            return "the fewest GPUs that fit"
        if mode == "latency":
            return "the largest tensor-parallel size that fits"
        if shape.link == "nvlink":
            if shape.pp == 1:
                return self.tp_nvlink
            return ("pipeline stages inside the host: no tensor-parallel-only layout on NVLink-connected GPUs "
                    "fits or passes the heads rule")
        if shape.link == "pcie":
            if shape.pp == 1:
                return "tensor parallel over PCIe: no layout with pipeline stages fits or is supported for this model"
            return self.pp_pcie
        if shape.hosts > 1:
            return self.across_hosts
        if limits.nvlink_gpus > 1 or limits.pcie_gpus > 1:
            return "no GPUs all joined by NVLink, or all by PCIe only, hold it: the fewest GPUs that fit"
        return "GPU interconnect unknown: the fewest GPUs that fit"


def explain_sharded(layout: Layout, mode: str, limits: ShapeLimits,
                    find: Callable[[Sequence[Sharded]], Layout | None],
                    shapes_for: Callable[[str], Sequence[Sharded]],
                    reasons: ShardedReasons = ShardedReasons()) -> str:
    """The layout, why --parallelism `mode` chose it, and what each other --parallelism would run instead where
    that differs: "TP=4 on n1 GPUs 1-4 (NVLink): tensor parallel over NVLink inside a host; PP=3 would use 3
    GPUs: --parallelism gpus". `find` is agentd_explain's own argument; `shapes_for(other)` is what the runtime
    proposes under --parallelism `other` (its agentd_shapes answer for the same model and limits)."""
    shape = layout.shape
    if not isinstance(shape, Sharded):
        raise TypeError(f"explain_sharded takes a Sharded layout, not {shape!r}")
    text = f"{layout.label}{_LINK_TEXT.get(shape.link, '')}: {reasons.reason(shape, mode, limits)}"
    if limits.exact is not None:
        return text
    linked = limits.nvlink_gpus > 1 or limits.pcie_gpus > 1
    seen = {(shape.tp, shape.pp, shape.hosts)}
    for other in PARALLELISM_MODES:
        if other == mode or (not linked and {mode, other} == {"auto", "gpus"}):  # the same order without links
            continue
        alt = find(shapes_for(other))
        if alt is None or not isinstance(alt.shape, Sharded):
            continue
        key = (alt.shape.tp, alt.shape.pp, alt.shape.hosts)
        if key in seen:
            continue
        seen.add(key)
        n = alt.gpu_count
        uses = f"{alt.shape.label} would use {n} GPU{'s' if n != 1 else ''}"
        text += f"; {uses if alt.shape.hosts == 1 else f'{uses} on {alt.shape.hosts} hosts'}: --parallelism {other}"
    return text if len(seen) > 1 else f"{text}; the same with any --parallelism"


# --------------------------------------------------------------------------- constraints


class Rejection(NamedTuple):
    """Why one host, GPU, shape or candidate was turned down.

    A NamedTuple rather than a frozen dataclass: a check may reject thousands
    of GPUs, and a tuple is several times cheaper to build.
    """

    subject: str  # singular noun for what was rejected: "GPU", "host", "layout", "main-server candidate"
    reason: str  # stable text, no numbers that vary between instances: "cannot hold one layer"
    # This instance's numbers: "needs 21.9 GiB, largest free 11.0 GiB". May be a callable returning
    # the text, so a check that rejects thousands of GPUs only formats the ones a diagnosis shows.
    detail: str | Callable[[], str] = ""
    details: Mapping[str, Any] = MappingProxyType({})
    where: str = ""  # which one: "gpu-node-3", "GPU 0 on gpu-node-3", "TP=7"
    closeness: float = 0.0  # 0..1, how near it came to fitting: ranks the near-miss
    fix: str | Callable[[], str] = ""  # an action that would remove this rejection, if one is known
    list_where: bool = False  # the message lists the `where` of every instance (shapes)
    subject_plural: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.reason)

    def detail_text(self) -> str:
        return self.detail() if callable(self.detail) else self.detail

    def fix_text(self) -> str:
        return self.fix() if callable(self.fix) else self.fix


class Gpu(Protocol):
    """One GPU as `Constraint.check_device` sees it (the placement core's view of a reported GPU).

    Sizes are in bytes. `free` is what agentd may still give out: the total
    less the memory of processes agentd does not own (`foreign`) and what its
    own plans already booked (`assigned`).
    """

    host: str
    index: int
    total: int
    free: int
    foreign: int
    assigned: int
    info: Any  # the reported agentd.types.GpuInfo

    @property
    def label(self) -> str: ...  # "GPU 0 on gpu-node-3"

    def describe_foreign(self) -> str: ...  # who holds the memory agentd does not own


class Constraint:
    """Base class: override the levels you check. Every level defaults to "fine"."""

    name = ""  # shown in errors; defaults to the class name

    def check_static(self) -> Rejection | None:
        return None

    def check_device(self, gpu: Gpu) -> Rejection | None:
        return None

    def check_shape(self, shape: Shape) -> Rejection | None:
        return None

    def check_layout(self, layout: Layout) -> Rejection | None:
        return None


def layout_rejection(reason: str, shape: Shape, detail: str, **details: Any) -> Rejection:
    label = shape.label
    return Rejection("layout", reason, detail, {"shape": label, **details}, where=label, list_where=True)


# --------------------------------------------------------------------------- shape rules


@dataclass(frozen=True)
class TensorParallelDivisibility(Constraint):
    """Attention heads split evenly over TP ranks; KV heads split evenly or are replicated evenly.

    Mirrors vLLM's ModelConfig.verify_with_parallel_config (heads % TP) and
    QKVParallelLinear (KV heads % TP == 0 when TP <= KV heads, otherwise
    TP % KV heads == 0 so that each KV head is replicated the same number of times).
    """

    heads: int
    kv_heads: int
    name = "TensorParallelDivisibility"

    def check_shape(self, shape: Shape) -> Rejection | None:
        if not isinstance(shape, Sharded) or shape.tp == 1:
            return None
        tp = shape.tp
        if self.heads % tp:
            return layout_rejection(
                "rejected: attention heads not divisible by the tensor parallel size", shape,
                f"{self.heads} attention heads", heads=self.heads, tp=tp)
        if (self.kv_heads % tp) if tp <= self.kv_heads else (tp % self.kv_heads):
            return layout_rejection(
                "rejected: KV heads and tensor parallel size do not divide each other", shape,
                f"{self.kv_heads} KV heads", kv_heads=self.kv_heads, tp=tp)
        return None


@dataclass(frozen=True)
class PipelineStages(Constraint):
    """Each pipeline stage needs at least one layer, and the runtime must support PP for the model."""

    max: int
    supported: bool = True
    why_unsupported: str = ""
    name = "PipelineStages"

    def check_shape(self, shape: Shape) -> Rejection | None:
        if not isinstance(shape, Sharded) or shape.pp == 1:
            return None
        if not self.supported:
            return layout_rejection("rejected: pipeline parallel is not supported for this model", shape,
                                    self.why_unsupported or "the runtime does not support it")
        if shape.pp > self.max:
            return layout_rejection("rejected: more pipeline stages than layers", shape,
                                    f"{self.max} layers", layers=self.max, pp=shape.pp)
        return None


@dataclass(frozen=True)
class QuantGroupAlignment(Constraint):
    """GPTQ/AWQ: each TP rank's slice of the MLP input must hold whole quantization groups.

    vLLM's GPTQ and AWQ linear methods refuse a row-parallel layer whose
    input_size_per_partition (intermediate_size / TP) is not a multiple of
    the group size ("The input size is not aligned with the quantized weight shape").
    """

    intermediate_size: int
    group_size: int
    method: str = "gptq"
    name = "QuantGroupAlignment"

    def check_shape(self, shape: Shape) -> Rejection | None:
        if not isinstance(shape, Sharded) or shape.tp == 1 or self.group_size <= 0:
            return None
        tp = shape.tp
        if self.intermediate_size % tp == 0 and (self.intermediate_size // tp) % self.group_size == 0:
            return None
        return layout_rejection(
            "rejected: quantization groups not aligned with the tensor parallel size", shape,
            f"{self.method.upper()} group size {self.group_size}, intermediate size {self.intermediate_size}",
            intermediate_size=self.intermediate_size, group_size=self.group_size, tp=tp)


# --------------------------------------------------------------------------- device rules


@dataclass(frozen=True)
class MinFreeFraction(Constraint):
    """A GPU is usable only if `fraction` x its total memory is free for agentd.

    vLLM's startup check: it refuses a GPU whose free memory is below
    gpu_memory_utilization x total. Memory held by processes agentd does not
    own counts as used (see snapshot.py for the free-memory formula).
    """

    fraction: float
    option: str = "gpu_memory_utilization"
    name = "MinFreeFraction"

    def check_device(self, gpu: Gpu) -> Rejection | None:
        need = self.fraction * gpu.total
        free = gpu.free
        if free >= need:
            return None
        # A big cluster rejects thousands of GPUs per placement and a diagnosis reads a few of
        # them: the numbers and texts are worked out when read (see _Shortfall).
        short = _Shortfall(gpu, need, self)
        return Rejection("GPU", self._reason, short, short, f"GPU {gpu.index} on {gpu.host}",
                         free / need if need else 1.0, short.fix if gpu.foreign else "")

    @cached_property
    def _reason(self) -> str:
        return f"had less free memory than {self.option} requires"


class _Shortfall(Mapping):
    """`MinFreeFraction`'s rejection numbers (Rejection.details) and detail text (calling it), made
    when read."""

    __slots__ = ("c", "gpu", "need")

    def __init__(self, gpu: Gpu, need: float, c: MinFreeFraction):
        self.gpu = gpu
        self.need = need
        self.c = c

    def _dict(self) -> dict[str, Any]:
        g = self.gpu
        return {"needs": int(self.need), "free": g.free, "foreign": g.foreign, "assigned": g.assigned,
                "fraction": self.c.fraction, "total": g.total}

    def __getitem__(self, key: str) -> Any:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return 6

    def __contains__(self, key: object) -> bool:
        return key in ("needs", "free", "foreign", "assigned", "fraction", "total")

    def __call__(self) -> str:
        g, c = self.gpu, self.c
        held = []
        if g.foreign:
            held.append(g.describe_foreign())
        if g.assigned:
            held.append(f"{gib(g.assigned)} assigned to agentd instances")
        text = f"needs {gib(self.need)} ({c.option} {c.fraction:g} x {gib(g.total)}), has {gib(g.free)}"
        return text + (": " + ", ".join(held) if held else "")

    def fix(self) -> str:
        return f"free {self.gpu.label} ({self.gpu.describe_foreign()})"


# --------------------------------------------------------------------------- layout rules


@dataclass(frozen=True)
class MinLayersOnMain(Constraint):
    """The main server must hold at least `layers` model layers on its own devices: its GPUs, or its RAM
    on a host without GPUs where the deployment allows CPU offload (RuntimeInfo.host_memory).

    A main server that offloads everything to rpc-servers is the GPUStack
    failure this exists for: it starts, then crawls or crashes. Layer-split
    layouts only; the engine gives the main server's GPUs layers first, so a
    candidate fails here only when its GPUs truly cannot hold them.
    """

    layers: int = 1
    name = "MinLayersOnMain"

    def check_layout(self, layout: Layout) -> Rejection | None:
        if not isinstance(layout.shape, LayerSplit) or layout.main.layers >= self.layers:
            return None
        if layout.facts.get("main_gpus") == 0 and (layout.main.cpu_layers or 0) >= self.layers:
            return None  # a host without GPUs (the engine admits one only for a CPU deployment): RAM is its device
        need = layout.facts.get("main_layer_need", 0)
        largest = layout.facts.get("main_largest_free", 0)
        what = "one layer" if self.layers == 1 else f"{self.layers} layers"
        return Rejection(
            "main-server candidate", f"cannot hold {what}",
            f"needs {gib(need)}, largest free {gib(largest)}",
            {"needs": int(need), "largest_free": int(largest), "host": layout.main.host, "min_layers": self.layers},
            where=layout.main.host, closeness=min(1.0, largest / need) if need else 0.0)


# --------------------------------------------------------------------------- processes


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Endpoint(_Value):
    """A TCP address; `host` as peers reach it."""

    host: str
    port: int = Field(ge=1, le=65535)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class HttpProbe(_Value):
    """Readiness/liveness over HTTP GET on a fresh connection (never a pooled one)."""

    kind: Literal["http"] = "http"
    host: str
    port: int = Field(ge=1, le=65535)
    path: str = "/health"


class TcpProbe(_Value):
    """Readiness as "accepts a TCP connection", for servers without HTTP (rpc-server, Ray GCS).

    Used only until the process is ready: ggml-rpc-server serves one client
    at a time, so probing it while llama-server is connected would queue in
    its backlog and look like an outage.
    """

    kind: Literal["tcp"] = "tcp"
    host: str
    port: int = Field(ge=1, le=65535)


class ProcessSpec(_Value):
    """One process a part needs on this host."""

    name: str  # unique within the instance: "main", "rpc", "ray-head", ...
    argv: tuple[str, ...]
    env: dict[str, str] = Field(default_factory=dict)  # added to (and overriding) the agent's environment
    env_remove_prefixes: tuple[str, ...] = ()  # inherited variables to drop, e.g. "LLAMA_ARG_"
    cwd: str | None = None
    part_index: int = 0
    role: str = "main"
    listen: Endpoint | None = None  # where it serves (what dependents wait for)
    ports: tuple[Endpoint, ...] = ()  # every address:port it binds: checked free before launch
    ready: HttpProbe | TcpProbe | None = Field(default=None, discriminator="kind")
    wait_for: tuple[Endpoint, ...] = ()  # must accept TCP before launch; a local one restarting restarts this
    gpus: tuple[int, ...] = ()  # host GPU indices it uses: checked released after stop
    startup_timeout: float | None = Field(default=None, gt=0)  # None: the supervisor's setting
    stop_signal: Literal["SIGTERM", "SIGINT", "SIGQUIT"] = "SIGTERM"
    stop_grace: float | None = Field(default=None, ge=0)  # None: the supervisor's setting

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError(f"process name {v!r} must be lowercase letters, digits, '.', '_' or '-'")
        return v

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or not v[0]:
            raise ValueError("argv must name a program")
        return v


class HealthVerdict(_Value):
    """A plugin's reading of one probe answer (`agentd_health`).

    `ready`: serving. `alive`: not ready but not failing either (a model still
    loading answers 503 by design). Neither: a failure that counts toward
    liveness.
    """

    ready: bool
    alive: bool = True
    detail: str = ""


class ProbeResult(_Value):
    """What a probe saw, before any plugin interprets it."""

    ok: bool  # connected and got a 2xx (HTTP) / connected (TCP)
    status: int | None = None  # HTTP status code
    body: str = ""  # the first bytes of the body
    error: str = ""  # connection refused, timed out, ...
    timed_out: bool = False

    @property
    def detail(self) -> str:
        if self.error:
            return self.error
        if self.status is not None:
            return f"HTTP {self.status} {self.body[:120]}".strip()
        return "ok" if self.ok else "failed"


@dataclass(frozen=True)
class LaunchContext:
    """What a plugin may know about the host when it builds specs.

    `port(key)` hands out a free local port from the configured range (the
    same key gives the same port for one instance); `ray_port(key, count=1)`
    does the same from the Ray range, the first of `count` consecutive ports.
    `settings` is the agent's agentd.config.Settings.
    `simulated_gpus` is true when the host's GPUs come from a simulated
    inventory: the runtime then sees no GPU and layers planned for local GPUs
    stay in host RAM.
    """

    node: str
    work_dir: Path
    settings: Any
    simulated_gpus: bool = False
    port: Callable[[str], int] = field(default=lambda key: 0)
    ray_port: Callable[..., int] = field(default=lambda key, count=1: 0)


@dataclass(frozen=True)
class ReservedLaunch:
    """What a plugin's `agentd_reserved_launch(runtime)` returns."""

    flags: tuple[str, ...] = ()  # option names, long and short: ("-m", "--model", ...)
    env: tuple[str, ...] = ()  # variable names: ("VLLM_API_KEY", ...)
    env_prefixes: tuple[str, ...] = ()  # ("LLAMA_ARG_",): every variable that starts so
    abbreviations: bool = False  # the program accepts unambiguous prefixes of long options (argparse)
    hints: Mapping[str, str] = field(default_factory=dict)  # flag or variable -> what to use instead

    @staticmethod
    def merge(parts: Iterable[ReservedLaunch | None]) -> ReservedLaunch:
        flags: list[str] = []
        env: list[str] = []
        prefixes: list[str] = []
        hints: dict[str, str] = {}
        abbrev = False
        for p in parts:
            if p is None:
                continue
            flags += p.flags
            env += p.env
            prefixes += p.env_prefixes
            hints.update(p.hints)
            abbrev = abbrev or p.abbreviations
        return ReservedLaunch(tuple(dict.fromkeys(flags)), tuple(dict.fromkeys(env)), tuple(dict.fromkeys(prefixes)),
                              abbrev, hints)


def has_flag(args: Sequence[str], flags: Sequence[str]) -> bool:
    """Whether `args` (a user's extra arguments) already give one of `flags`, as `--flag value` or `--flag=value`:
    then the runtime leaves that flag to the user."""
    return any(x in flags or any(x.startswith(f + "=") for f in flags) for x in args)


def cuda_env(part: Part) -> dict[str, str]:
    """The part's own environment, with CUDA_VISIBLE_DEVICES naming its GPUs unless the part sets it."""
    env = dict(part.env)
    if "CUDA_VISIBLE_DEVICES" not in env and part.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, part.gpus))
    return env


def spans_hosts(a: Assignment) -> bool:
    """Whether the replica's parts run on more than one host."""
    return len({p.host for p in a.plan.parts}) > 1


def main_part_index(a: Assignment) -> int:
    """The index of the replica's main part; InvalidInput when it has none."""
    for i, p in enumerate(a.plan.parts):
        if p.role == "main":
            return i
    raise InvalidInput(f"assignment {a.instance_id} has no main part")


def find_binary(configured: str, names: Sequence[str], dirs: Iterable[Path] = (), *,
                setting: str = "") -> str:
    """The program to run.

    `configured` (a settings value) wins when set: it is returned as given, so
    a wrong path fails at spawn with "does not exist" / "is not executable".
    Otherwise the first of `names` found in `dirs`, then on PATH.
    """
    if configured:
        return configured
    tried = []
    for d in dirs:
        for n in names:
            p = Path(d) / n
            tried.append(str(p))
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    hint = f"; set {setting}" if setting else ""
    raise BinaryNotUsable(f"none of {', '.join(names)} found (looked in {', '.join(tried) or 'no package dir'} "
                          f"and on PATH){hint}")
