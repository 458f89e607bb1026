"""Declared constraints and the rejections they give.

A runtime plugin declares its rules as constraint objects (`agentd_constraints`);
the core checks every candidate against all of them and explains each
rejection. A constraint checks at one or more levels, from cheapest to
most specific, and the core calls only the levels a constraint overrides:

* `check_static()` - the request itself (e.g. max_model_len > the model's);
* `check_device(gpu)` - one GPU, before any layout (e.g. free memory);
* `check_shape(shape)` - a layout shape, before GPUs are chosen (e.g. TP divides heads);
* `check_layout(layout)` - a concrete candidate (e.g. the main server holds a layer).

Each returns None (fine) or a `Rejection`. Rejections are grouped by
(subject, reason), so `reason` must be stable text; the numbers go in
`detail` (human) and `details` (machine). Constraints are plain objects,
called in the hot loop: keep them cheap and free of I/O.

The classes here are the rules several runtimes share; a plugin may use
them, subclass `Constraint`, or pass any object with these methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from agentd.placement.shapes import LayerSplit, Shape, Sharded
from agentd.placement.units import gib

if TYPE_CHECKING:
    from agentd.placement.layout import Layout
    from agentd.placement.snapshot import GpuView


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


class Constraint:
    """Base class: override the levels you check. Every level defaults to "fine"."""

    name = ""  # shown in errors; defaults to the class name

    def check_static(self) -> Rejection | None:
        return None

    def check_device(self, gpu: GpuView) -> Rejection | None:
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

    def check_device(self, gpu: GpuView) -> Rejection | None:
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

    def __init__(self, gpu: GpuView, need: float, c: MinFreeFraction):
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
    """The main server must hold at least `layers` model layers on its own GPUs.

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
        need = layout.facts.get("main_layer_need", 0)
        largest = layout.facts.get("main_largest_free", 0)
        what = "one layer" if self.layers == 1 else f"{self.layers} layers"
        return Rejection(
            "main-server candidate", f"cannot hold {what}",
            f"needs {gib(need)}, largest free {gib(largest)}",
            {"needs": int(need), "largest_free": int(largest), "host": layout.main.host, "min_layers": self.layers},
            where=layout.main.host, closeness=min(1.0, largest / need) if need else 0.0)
