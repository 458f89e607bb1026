"""vLLM's placement rules: what `vllm serve` accepts, and how much memory it takes per GPU.

Every rule here mirrors a check vLLM makes at start-up, so agentd never
proposes a layout vLLM would refuse (DESIGN.md §3):

* heads % TP == 0 (ModelConfig.verify_with_parallel_config);
* KV heads % TP == 0, or TP % KV heads == 0 (QKVParallelLinear replicates KV heads);
* PP <= layers, and PP > 1 only for architectures implementing SupportsPP;
* GPTQ/AWQ (and block-quantized FP8): intermediate_size / TP a multiple of the group size;
* a GPU whose free memory is below gpu_memory_utilization x total is refused
  (memory of processes agentd does not own counts as used);
* bfloat16 weights need compute capability >= 8.0;
* max_model_len may not exceed the model's context length.

Memory per GPU (docs/placement.md has the derivation):

    per_gpu = weights_of_largest_stage / TP
            + KV cache of one max_model_len sequence for that stage's layers, per GPU
              (kvcache.py: vLLM's own arithmetic, checked against vLLM by plugins/vllm/tests/test_vllm_oracle.py)
            + activation peak (profiling batch) + sampler logits
            + fixed overhead (CUDA context, cuBLAS/NCCL workspaces, CUDA graphs)

and it must fit in gpu_memory_utilization x total, which is what vLLM books.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

from agentd.plugins.api import (
    Constraint,
    LaunchParams,
    Layout,
    MinFreeFraction,
    PipelineStages,
    QuantGroupAlignment,
    Rejection,
    ShapeLimits,
    ShardDemand,
    Sharded,
    ShardedReasons,
    TensorParallelDivisibility,
    explain_sharded,
    hookimpl,
)
from agentd.types import DeploymentSpec, MiB, ModelInfo
from agentd_vllm import kvcache

NAME = "vllm"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
PROFILE_TOKENS = 2048  # max_num_batched_tokens vLLM profiles the activation peak with
MAX_NUM_SEQS = 256  # sequences whose logits the sampler holds at once (fp32)
FIXED_OVERHEAD = 1024 * MiB  # CUDA context + cuBLAS workspace + CUDA graphs
NCCL_OVERHEAD = 256 * MiB  # communicator buffers when TP or PP > 1
GROUPED_QUANT = ("gptq", "awq", "gptq_marlin", "awq_marlin", "compressed-tensors", "fp8")

# Architectures whose vLLM model class implements SupportsPP (pipeline parallel).
# Conservative on purpose: an architecture missing here is never given PP > 1.
PP_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM",
    "FalconForCausalLM", "InternLM2ForCausalLM", "Starcoder2ForCausalLM", "CohereForCausalLM",
    "GraniteForCausalLM", "ExaoneForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaForConditionalGeneration",
})


def utilization(spec: DeploymentSpec) -> float:
    return spec.options.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION


def max_model_len(model: ModelInfo, spec: DeploymentSpec) -> int:
    return spec.options.ctx_size or model.context_length


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class MaxModelLen(Constraint):
    """vLLM refuses a max_model_len above the model's own (without VLLM_ALLOW_LONG_MAX_MODEL_LEN)."""

    requested: int
    model_max: int
    name = "MaxModelLen"

    def check_static(self) -> Rejection | None:
        if self.requested <= self.model_max:
            return None
        return Rejection("request", "asks for a longer max_model_len than the model supports",
                         f"{self.requested} tokens, the model's context length is {self.model_max}",
                         {"requested": self.requested, "model_max": self.model_max}, subject_plural="requests",
                         fix=f"use --ctx-size {self.model_max} or less")


@dataclass(frozen=True)
class Bf16NeedsAmpere(Constraint):
    """vLLM: "Bfloat16 is only supported on GPUs with compute capability of at least 8.0"."""

    # Verdict per compute capability string (a cluster has few distinct ones); not part of the value.
    _ok: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    name = "Bf16NeedsAmpere"

    def check_device(self, gpu) -> Rejection | None:
        cc = gpu.info.compute_capability
        ok = self._ok.get(cc)
        if ok is None:
            ok = self._ok[cc] = not cc or _cc(cc) >= (8, 0)
        if ok:
            return None
        return Rejection("GPU", "cannot run bfloat16 weights (compute capability below 8.0)",
                         f"{gpu.info.name or 'GPU'} has compute capability {cc}",
                         {"compute_capability": cc}, where=gpu.label)


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return (0, 0)


@hookimpl
def agentd_constraints(runtime, model: ModelInfo, spec: DeploymentSpec):
    if runtime != NAME:
        return None
    out: list[Constraint] = [
        MaxModelLen(max_model_len(model, spec), model.context_length),
        MinFreeFraction(utilization(spec)),
        TensorParallelDivisibility(model.num_attention_heads, model.num_key_value_heads),
        PipelineStages(model.num_hidden_layers, supported=model.architecture in PP_ARCHITECTURES,
                       why_unsupported=f"vLLM has no pipeline parallel for {model.architecture}"),
    ]
    q = model.quantization
    if q is not None and q.method.lower() in GROUPED_QUANT and q.group_size and q.group_size > 0:
        sizes = {model.intermediate_size, model.extra.get("moe_intermediate_size")}
        out += [QuantGroupAlignment(s, q.group_size, q.method) for s in sorted(x for x in sizes if x)]
    if model.dtype.lower() in ("bfloat16", "bf16"):
        out.append(Bf16NeedsAmpere())
    return out


# --------------------------------------------------------------------------- propose


def _divisors_desc(n: int, most: int | None = None) -> list[int]:
    """Divisors of n, largest first, no larger than `most`."""
    return [d for d in range(min(n, most or n), 0, -1) if n % d == 0]


@hookimpl
def agentd_propose(runtime, model: ModelInfo, spec: DeploymentSpec, limits: ShapeLimits):
    if runtime != NAME:
        return None
    return _shapes(model, spec, limits)


def _shapes(model: ModelInfo, spec: DeploymentSpec, limits: ShapeLimits) -> Iterator[Sharded]:
    """The shapes in the order of the deployment's `parallelism` (docs/placement.md, "Candidate order").

    auto: one GPU; then, inside one host, TP only over NVLink (smallest first), TP x PP over NVLink,
    PP first over PCIe-only GPUs (vLLM's advice for GPUs without NVLink); then the fewest-GPUs order
    for GPUs of unknown or mixed links and for several hosts. Without reported topology that is
    exactly `gpus`. latency: the largest TP first. gpus: the fewest GPUs first.
    Multi-host layouts run one pipeline stage per host through Ray (TP = GPUs per host, PP = hosts).
    Counts whose weights alone exceed the largest GPU budget are skipped: no layout of that size can fit.
    """
    g = limits.max_gpus_per_host
    if g == 0:
        return
    mode = spec.parallelism
    if limits.exact is not None:  # pinned GPUs: only the shapes that use exactly them
        counts = {n for _, n in limits.exact}
        if len(limits.exact) == 1:
            n = limits.exact[0][1]
            if mode == "auto" and n > 1 and limits.pcie_gpus >= n:  # PCIe only: pipeline stages first
                yield from (Sharded(tp, n // tp, link="pcie") for tp in reversed(_divisors_desc(n)))
            yield from (Sharded(tp, n // tp) for tp in _divisors_desc(n))
        elif len(counts) == 1:
            yield Sharded(counts.pop(), len(limits.exact), hosts=len(limits.exact))
        return
    max_hosts = min(limits.hosts, model.num_hidden_layers)
    n_max = g * max(1, max_hosts)
    budget = utilization(spec) * limits.max_gpu_memory
    n_min = max(1, math.ceil(model.total_weight_bytes / budget)) if budget else 1
    lo = min(n_min, n_max)
    if mode == "latency":
        yield from _largest_tp_first(lo, g, max_hosts)
        return
    if mode == "auto" and (limits.nvlink_gpus > 1 or limits.pcie_gpus > 1):
        yield from _linked_first(lo, g, limits)
    yield from _fewest_gpus_first(lo, n_max, g, max_hosts)


def _linked_first(lo: int, g: int, limits: ShapeLimits) -> Iterator[Sharded]:
    """auto's shapes on one host whose GPUs report their links: one GPU; TP only over NVLink, fewest GPUs
    first; TP x PP over NVLink (heads or memory ruled TP only out), larger TP first; then over PCIe only,
    PP first (vLLM: "on GPUs without NVLink, use pipeline parallelism")."""
    if lo <= 1:
        yield Sharded(1)
    first = max(2, lo)
    nvlink = min(g, limits.nvlink_gpus)
    yield from (Sharded(n, link="nvlink") for n in range(first, nvlink + 1))
    for n in range(first, nvlink + 1):
        yield from (Sharded(tp, n // tp, link="nvlink") for tp in _divisors_desc(n, n - 1))
    for n in range(first, min(g, limits.pcie_gpus) + 1):
        yield from (Sharded(tp, n // tp, link="pcie") for tp in reversed(_divisors_desc(n)))


def _largest_tp_first(lo: int, g: int, max_hosts: int) -> Iterator[Sharded]:
    """latency: the largest TP first; for a TP, one host before several, fewer stages first."""
    for tp in range(g, 0, -1):
        yield from (Sharded(tp, pp) for pp in range(max(1, -(-lo // tp)), g // tp + 1))
    for tp in range(g, 0, -1):
        yield from (Sharded(tp, h, hosts=h) for h in range(max(2, -(-lo // tp)), max_hosts + 1))


def _fewest_gpus_first(lo: int, n_max: int, g: int, max_hosts: int) -> Iterator[Sharded]:
    """gpus (and auto where links are unknown): the fewest GPUs first; for a count, one host before
    several, and larger TP before PP."""
    # Too big for the whole cluster: still propose the largest layouts, so the
    # diagnosis can say by how much they miss.
    for n in range(lo, n_max + 1):
        if n <= g:
            yield from (Sharded(tp, n // tp) for tp in _divisors_desc(n))
        # One stage per host: TP divides n, and TP <= GPUs per host (TP never spans hosts), with
        # 2 <= PP = n / TP <= max_hosts, so TP runs from min(g, n // 2) down to ceil(n / max_hosts).
        for tp in range(min(g, n // 2), -(-n // max_hosts) - 1, -1) if max_hosts >= 2 else ():
            if n % tp == 0:
                yield Sharded(tp, n // tp, hosts=n // tp)


# --------------------------------------------------------------------------- estimate


def vllm_stage_layers(layers: int, pp: int) -> tuple[int, ...]:
    """Layers per pipeline stage the way vLLM splits them (get_pp_indices).

    Even split; the remainder goes one layer each to the stages just before
    the last one (the last stage also holds the LM head).
    """
    q, r = divmod(layers, pp)
    return (q,) * (pp - 1 - r) + (q + 1,) * r + (q,)


def layer_bytes(model: ModelInfo) -> tuple[int, ...]:
    if model.layer_bytes:
        return model.layer_bytes
    rest = max(0, model.total_weight_bytes - sum(model.non_repeating_bytes.values()))
    return (rest // model.num_hidden_layers,) * model.num_hidden_layers


def kv_bytes_per_token_layer(model: ModelInfo, tp: int) -> float:
    """KV cache bytes per token per full-attention layer on one GPU of a TP group (kvcache.py has the rules:
    max(1, kv_heads / TP) heads per rank, MLA's latent on every rank, 16-bit or FP8 elements)."""
    return kvcache.page_bytes(model, tp) / kvcache.BLOCK_SIZE


def _heaviest_stage(model: ModelInfo, stages: tuple[int, ...], embed: int, head: int) -> int:
    """The weights of the heaviest pipeline stage: its layers, token_embd on the first stage, the
    head on the last. The diagnosis estimates shapes of up to a hundred stages, a hundred times."""
    sizes = layer_bytes(model)
    if sizes and len(sizes) >= model.num_hidden_layers and sizes.count(sizes[0]) == len(sizes):
        # Layers of one size (a config's): a stage weighs its layer count times that size.
        each = sizes[0]
        if len(stages) == 1:
            return stages[0] * each + embed + head
        return max(stages[0] * each + embed, stages[-1] * each + head, max(stages) * each)
    # Each stage from prefix sums at the stage bounds, without a loop in Python.
    prefix = list(accumulate(sizes, initial=0))
    short = model.num_hidden_layers + 1 - len(prefix)
    if short > 0:  # a header may list fewer layers than the config counts: those weigh nothing
        prefix += [prefix[-1]] * short
    at_bound = list(map(prefix.__getitem__, accumulate(stages, initial=0)))
    per_stage = list(map(operator.sub, at_bound[1:], at_bound))
    per_stage[0] += embed
    per_stage[-1] += head
    return max(per_stage)


def estimate(model: ModelInfo, spec: DeploymentSpec, shape: Sharded) -> ShardDemand:
    tp, pp = shape.tp, shape.pp
    stages = vllm_stage_layers(model.num_hidden_layers, pp)
    nr = model.non_repeating_bytes
    embed = nr.get("token_embd", 0)
    head = nr.get("output", 0) or (embed if pp > 1 else 0)  # tied embeddings: the last stage holds a copy
    head += nr.get("output_norm", 0)
    weights = math.ceil(_heaviest_stage(model, stages, embed, head) / tp)
    kv = kvcache.kv_bytes(model, tp, stages, max_model_len(model, spec))
    inter = model.intermediate_size or 4 * model.hidden_size
    activation = PROFILE_TOKENS * (4 * model.hidden_size + 2 * inter // tp) * 2 + MAX_NUM_SEQS * model.vocab_size * 4
    overhead = FIXED_OVERHEAD + (NCCL_OVERHEAD if tp * pp > 1 else 0)
    return ShardDemand(
        per_gpu=weights + kv + activation + overhead,
        budget_fraction=utilization(spec),
        stage_layers=stages,
        breakdown={"weights": weights, "kv_cache": kv, "activation": activation, "overhead": overhead},
    )


@hookimpl
def agentd_estimate(runtime, model: ModelInfo, spec: DeploymentSpec, shape):
    if runtime != NAME or not isinstance(shape, Sharded):
        return None
    return estimate(model, spec, shape)


# --------------------------------------------------------------------------- launch parameters


@hookimpl
def agentd_layout_args(runtime, model: ModelInfo, spec: DeploymentSpec, layout: Layout):
    if runtime != NAME or not isinstance(layout.shape, Sharded):
        return None
    shape = layout.shape
    args = [
        "--tensor-parallel-size", str(shape.tp),
        "--pipeline-parallel-size", str(shape.pp),
        "--gpu-memory-utilization", f"{utilization(spec):g}",
        "--max-model-len", str(max_model_len(model, spec)),
    ]
    if kvcache.has_sliding_window(model):  # the sliding-window layers' KV cache grows with the batch in flight
        args += ["--max-num-batched-tokens", str(kvcache.MAX_NUM_BATCHED_TOKENS)]
    if shape.hosts > 1:
        args += ["--distributed-executor-backend", "ray"]
    env = tuple({"CUDA_VISIBLE_DEVICES": ",".join(map(str, p.gpus))} for p in layout.parts)
    return LaunchParams(args=tuple(args), env=env)


# --------------------------------------------------------------------------- explain

# Where vLLM's advice is the reason: TP inside an NVLink host, PP over PCIe.
_REASONS = ShardedReasons(tp_nvlink="tensor parallel over NVLink, as vLLM advises inside a host",
                          pp_pcie="pipeline stages over PCIe, as vLLM advises for GPUs without NVLink")


@hookimpl
def agentd_explain(runtime, model: ModelInfo, spec: DeploymentSpec, layout: Layout, limits: ShapeLimits, find):
    """The layout, why the policy chose it, and what each other --parallelism would run instead (when
    that differs): "TP=4 on gpu-node-1 GPUs 1-4 (NVLink): tensor parallel over NVLink, as vLLM advises
    inside a host; PP=3 would use 3 GPUs: --parallelism gpus"."""
    if runtime != NAME or not isinstance(layout.shape, Sharded):
        return None
    return explain_sharded(layout, spec.parallelism, limits, find,
                           lambda other: _shapes(model, spec.model_copy(update={"parallelism": other}), limits),
                           _REASONS)
