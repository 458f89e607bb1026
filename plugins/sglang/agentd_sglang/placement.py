"""SGLang's placement rules: what `python -m sglang.launch_server` accepts, and how it takes memory.

Rules mirror SGLang's own start-up checks (sglang 0.5.23), so agentd never
proposes a layout SGLang would refuse:

* heads % TP == 0, and KV heads % TP == 0 or TP % KV heads == 0
  (QKVParallelLinear: KV heads are split, or replicated evenly when TP exceeds them);
* PP <= layers, and PP > 1 only for models whose SGLang class is built for it
  (PPMissingLayer: Llama, Qwen2/3 and their MoE, Mixtral, DeepSeek V2/V3, GLM-4, gpt-oss);
* expert parallelism for MoE models, `--ep-size TP`, only where the experts divide evenly
  over the ranks (otherwise the experts are tensor-parallel, as SGLang does by default);
* DP attention for MLA mixture-of-experts models (DeepSeek V2/V3/R1) on one pipeline stage with
  expert parallelism, `--attn-dp-size TP`, SGLang's recommended setup for them: each rank runs
  attention on its own requests (attention TP = TP / attn_dp_size = 1, so the heads rule is
  met by construction) and holds the attention weights whole;
* for a MoE model whose weights are block-quantized (`quantization_config.weight_block_size`, e.g.
  DeepSeek-V3/R1 FP8 with 128 x 128 blocks): the experts' intermediate size divides over the MoE TP
  group (TP / EP), and each rank's slice is a multiple of the block's N, weight_block_size[0]
  (check_quantized_moe_compatibility in srt/model_executor/model_runner_components/moe_ep_setup.py);
* context length no longer than the model's.

Memory (how SGLang books it, srt/arg_groups/memory_hook.py and mem_cache/kv_cache_configurator.py):
SGLang reads the GPU's free memory F when it starts, keeps `(1 - mem_fraction_static) x F` for
activations and CUDA graphs, and fills `mem_fraction_static x F` with the weights and then the KV
cache pool. It takes every free byte of the GPU, so agentd books each GPU whole
(`ShardDemand(budget_fraction=1.0)`) and gives SGLang only GPUs that are at least
`MIN_FREE_SHARE` free. Per GPU it needs

    weights of the heaviest pipeline stage / TP (with DP attention: the attention weights whole)
  + KV cache of one full-context sequence for that stage's layers, per GPU
  + R, SGLang's own activation reserve for the pinned batch limits:
        512 MiB + 1.5 MiB x chunked_prefill_size + TP x PP / 8 GiB + 2 MiB x max_running_requests
        (+ 3 MiB x max_running_requests x attn_dp_size with DP attention)

and `agentd_layout_args` pins what the estimate assumed: `--mem-fraction-static` (so that the
reserve R stays outside the static pool on the chosen GPUs), `--chunked-prefill-size` and
`--max-running-requests` (what R is computed for), and the context length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from agentd.plugins.api import (
    Constraint,
    LaunchParams,
    Layout,
    PipelineStages,
    Rejection,
    ShapeLimits,
    ShardDemand,
    Sharded,
    ShardedReasons,
    TensorParallelDivisibility,
    explain_sharded,
    gib,
    hookimpl,
)
from agentd.types import DeploymentSpec, MiB, ModelInfo

NAME = "sglang"
MIN_FREE_SHARE = 0.9  # a GPU given to SGLang has at least this share of its memory free
CHUNKED_PREFILL_SIZE = 8192  # pinned: SGLang's own default for 40-160 GB GPUs
MAX_RUNNING_REQUESTS = 256  # pinned: caps the decode CUDA-graph batch the reserve is sized for

# Architectures whose SGLang model class supports pipeline parallel (its layers are PPMissingLayer
# outside the rank's range). Conservative: an architecture missing here is never given PP > 1.
PP_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "Phi3ForCausalLM", "InternLM3ForCausalLM", "MistralForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
    "MixtralForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4ForCausalLM",
    "GptOssForCausalLM",
})


def context_length(model: ModelInfo, spec: DeploymentSpec) -> int:
    return spec.options.ctx_size or model.context_length


def reserve_bytes(tp: int, pp: int, attn_dp: int = 1) -> int:
    """SGLang's activation + CUDA-graph reserve (memory_hook.handle_gpu_memory_settings and
    reserve_for_graph_mb) for the pinned chunked_prefill_size and max_running_requests."""
    mib = 512 + max(CHUNKED_PREFILL_SIZE, 2048) * 1.5 + tp * pp / 8 * 1024 + MAX_RUNNING_REQUESTS * 2
    if attn_dp > 1:  # DP attention pads its batches: SGLang reserves more for it
        mib += MAX_RUNNING_REQUESTS * attn_dp * 3
    return int(mib * MiB)


def mla_attention_params(model: ModelInfo) -> int | None:
    """Parameters of one MLA attention block (q_a/q_b or q, kv_a, kv_b, o projections), from config.json's
    keys; None when the model is not MLA or its config lacks them."""
    x, kv = model.extra, model.kv_cache
    try:
        nope, rope, v = int(x["qk_nope_head_dim"]), int(x["qk_rope_head_dim"]), int(x["v_head_dim"])
        lora = int(kv.kv_lora_rank or 0)
    except (KeyError, TypeError, ValueError):
        return None
    if kv.kind != "mla" or not lora:
        return None
    h, heads = model.hidden_size, model.num_attention_heads
    q_lora = x.get("q_lora_rank")
    q = h * int(q_lora) + int(q_lora) * heads * (nope + rope) if q_lora else h * heads * (nope + rope)
    return q + h * (lora + rope) + lora * heads * (nope + v) + heads * v * h


def attention_dp(model: ModelInfo, tp: int, pp: int) -> int:
    """--attn-dp-size for a shape: TP for an MLA mixture-of-experts model on one pipeline stage whose experts
    divide over the ranks (DP attention with expert parallelism), else 1 (no DP attention)."""
    if tp == 1 or pp > 1 or model.moe is None or expert_parallel(model, tp) != tp:
        return 1
    return tp if mla_attention_params(model) is not None else 1


def expert_parallel(model: ModelInfo, tp: int) -> int:
    """The --ep-size for `tp` ranks: TP when the experts divide evenly over them, else 1 (no EP)."""
    if model.moe is None or tp == 1 or model.moe.num_experts % tp:
        return 1
    return tp


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class ContextLength(Constraint):
    """SGLang refuses a --context-length above the model's (without SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN)."""

    requested: int
    model_max: int
    name = "ContextLength"

    def check_static(self) -> Rejection | None:
        if self.requested <= self.model_max:
            return None
        return Rejection("request", "asks for a longer context than the model supports",
                         f"{self.requested} tokens, the model's context length is {self.model_max}",
                         {"requested": self.requested, "model_max": self.model_max}, subject_plural="requests",
                         fix=f"use --ctx-size {self.model_max} or less")


@dataclass(frozen=True)
class WholeGpu(Constraint):
    """SGLang takes every free byte of a GPU, so it gets only GPUs that are (nearly) all free, and on each
    the static pool (weights + KV cache) and the activation reserve must fit in what is free.

    Device level: at least MIN_FREE_SHARE of the GPU is free (memory held by other processes and by agentd's
    other instances counts as used). Layout level: the estimate fits in MIN_FREE_SHARE of each chosen GPU,
    so it fits in what SGLang will find free when it starts.
    """

    share: float = MIN_FREE_SHARE
    static_fraction: float | None = None  # the user's --mem-fraction-static: weights + KV must fit in it
    name = "WholeGpu"

    def check_device(self, gpu) -> Rejection | None:
        need = self.share * gpu.total
        if gpu.free >= need:
            return None
        held = gpu.describe_foreign() if gpu.foreign else f"{gib(gpu.assigned)} assigned to agentd instances"
        return Rejection("GPU", "was not free enough for SGLang (it takes a GPU whole)",
                         f"needs {gib(need)} free ({self.share:g} x {gib(gpu.total)}), has {gib(gpu.free)}: {held}",
                         {"needs": int(need), "free": gpu.free, "total": gpu.total}, where=gpu.label,
                         closeness=gpu.free / need if need else 1.0,
                         fix=f"free {gpu.label} ({held})" if gpu.foreign else "")

    def check_layout(self, layout: Layout) -> Rejection | None:
        need = layout.demand.per_gpu
        for part in layout.parts:
            # budget_fraction 1.0: each GPU's booking is its total memory
            for index, total in zip(part.gpus, part.memory, strict=True):
                if need > self.share * total:
                    return Rejection("layout", "did not fit: the per-GPU share exceeds what SGLang finds free",
                                     f"needs {gib(need)} per GPU, GPU {index} on {part.host} has "
                                     f"{gib(self.share * total)} ({self.share:g} x {gib(total)})",
                                     {"needs": need, "total": total}, where=layout.shape.label, list_where=True,
                                     closeness=self.share * total / need)
                static = layout.demand.breakdown.get("weights", 0) + layout.demand.breakdown.get("kv_cache", 0)
                if self.static_fraction is not None and static > self.static_fraction * self.share * total:
                    room = self.static_fraction * self.share * total
                    return Rejection("layout", "did not fit: weights and KV cache exceed mem_fraction_static",
                                     f"needs {gib(static)} per GPU, mem_fraction_static {self.static_fraction:g} "
                                     f"of GPU {index} on {part.host} gives {gib(room)}",
                                     {"needs": static, "total": total, "mem_fraction_static": self.static_fraction},
                                     where=layout.shape.label, list_where=True, closeness=room / static)
        return None


def moe_block_alignment(model: ModelInfo) -> MoeBlockAlignment | None:
    """The block-alignment rule for this model, or None where SGLang does not check it: a model without a
    `moe_intermediate_size` in its config, or whose quantization config has no `weight_block_size`."""
    size = model.extra.get("moe_intermediate_size")
    qc = model.extra.get("quantization_config") or {}
    block = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if not isinstance(size, int) or size <= 0 or not block or not isinstance(block[0], int) or block[0] <= 0:
        return None
    return MoeBlockAlignment(model, size, block[0], str(qc.get("quant_method") or "block-quantized"))


@dataclass(frozen=True)
class MoeBlockAlignment(Constraint):
    """SGLang's check_quantized_moe_compatibility (0.5.23): with block-quantized MoE weights it refuses to start
    unless moe_intermediate_size % moe_tp == 0 and (moe_intermediate_size / moe_tp) % weight_block_size[0] == 0,
    where moe_tp = TP / EP / moe_dp ("please make sure (moe_intermediate_size / moe_tp_size) %
    weight_block_size_n == 0"). agentd passes --ep-size TP where the experts divide (moe_tp 1) and no EP
    otherwise (moe_tp TP), and never --moe-dp-size (1). SGLang skips the check under SGLANG_SHARED_EXPERT_TP1
    and on ROCm with aiter; agentd does not rely on either."""

    model: ModelInfo
    moe_intermediate_size: int
    block_n: int
    method: str = "fp8"
    name = "MoeBlockAlignment"

    def check_shape(self, shape) -> Rejection | None:
        if not isinstance(shape, Sharded):
            return None
        ep = expert_parallel(self.model, shape.tp)
        moe_tp = shape.tp // ep
        size = self.moe_intermediate_size
        if size % moe_tp == 0 and (size // moe_tp) % self.block_n == 0:
            return None
        per_rank = f"{size} / {moe_tp} = {size / moe_tp:g}"
        experts = self.model.moe.num_experts if self.model.moe is not None else 0
        return Rejection(
            "layout", "rejected: the MoE experts' quantization blocks do not divide over the tensor parallel ranks",
            f"moe_intermediate_size / MoE TP ({per_rank}) is not a multiple of the {self.method.upper()} block "
            f"{self.block_n}; EP={ep} ({experts} experts{' do not' if ep == 1 else ''} divide over TP={shape.tp})",
            {"shape": shape.label, "moe_intermediate_size": size, "moe_tp": moe_tp, "ep": ep,
             "block_n": self.block_n}, where=shape.label, list_where=True)


@dataclass(frozen=True)
class AttentionHeads(Constraint):
    """SGLang's QKVParallelLinear over the attention TP group: heads % attention TP == 0, and KV heads % TP == 0
    or TP % KV heads == 0. The attention TP is TP / attn_dp_size: 1 under DP attention, so any TP passes
    there, and TP elsewhere (the plain TensorParallelDivisibility)."""

    model: ModelInfo
    name = "AttentionHeads"

    def check_shape(self, shape) -> Rejection | None:
        if not isinstance(shape, Sharded) or shape.tp == 1:
            return None
        if attention_dp(self.model, shape.tp, shape.pp) > 1:
            return None
        m = self.model
        return TensorParallelDivisibility(m.num_attention_heads, m.num_key_value_heads).check_shape(shape)


@hookimpl
def agentd_constraints(runtime, model: ModelInfo, spec: DeploymentSpec):
    if runtime != NAME:
        return None
    return [
        ContextLength(context_length(model, spec), model.context_length),
        WholeGpu(static_fraction=spec.options.gpu_memory_utilization),
        AttentionHeads(model),
        PipelineStages(model.num_hidden_layers, supported=model.architecture in PP_ARCHITECTURES,
                       why_unsupported=f"SGLang has no pipeline parallel for {model.architecture}"),
        *filter(None, [moe_block_alignment(model)]),
    ]


# --------------------------------------------------------------------------- propose


@hookimpl
def agentd_propose(runtime, model: ModelInfo, spec: DeploymentSpec, limits: ShapeLimits):
    if runtime != NAME:
        return None
    return _shapes(model, limits, spec.parallelism)


def _shapes(model: ModelInfo, limits: ShapeLimits, mode: str = "auto") -> Iterator[Sharded]:
    """The shapes in the order of the deployment's `parallelism` (docs/placement.md, "Candidate order"),
    from the GPU links the plugin API reports (`ShapeLimits.nvlink_gpus` / `pcie_gpus`, `Sharded.link`).

    gpus: the fewest GPUs first; for a count, one host before several, larger TP before PP. auto
    (SGLang's advice: tensor parallel inside a node): first one GPU, TP only over NVLink (smallest
    first), TP x PP over NVLink, PP first over PCIe-only GPUs; then the gpus order, which is all of it
    where no host reports its topology. latency: the largest TP first. Several hosts run one pipeline
    stage each (--pp-size = --nnodes). Pinned GPUs: only the shapes that use exactly them."""
    g = limits.max_gpus_per_host
    if g == 0:
        return
    if limits.exact is not None:
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
    budget = MIN_FREE_SHARE * limits.max_gpu_memory
    lo = min(max(1, math.ceil(model.total_weight_bytes / budget)) if budget else 1, n_max)
    if mode == "latency":
        for tp in range(g, 0, -1):
            yield from (Sharded(tp, pp) for pp in range(max(1, -(-lo // tp)), g // tp + 1))
        for tp in range(g, 0, -1):
            yield from (Sharded(tp, h, hosts=h) for h in range(max(2, -(-lo // tp)), max_hosts + 1))
        return
    if mode == "auto" and (limits.nvlink_gpus > 1 or limits.pcie_gpus > 1):
        if lo <= 1:
            yield Sharded(1)
        nvlink = min(g, limits.nvlink_gpus)
        yield from (Sharded(n, link="nvlink") for n in range(max(2, lo), nvlink + 1))
        for n in range(max(2, lo), nvlink + 1):
            yield from (Sharded(tp, n // tp, link="nvlink") for tp in _divisors_desc(n) if tp < n)
        for n in range(max(2, lo), min(g, limits.pcie_gpus) + 1):
            yield from (Sharded(tp, n // tp, link="pcie") for tp in reversed(_divisors_desc(n)))
    for n in range(lo, n_max + 1):
        if n <= g:
            yield from (Sharded(tp, n // tp) for tp in _divisors_desc(n))
        for tp in range(min(g, n // 2), -(-n // max_hosts) - 1, -1) if max_hosts >= 2 else ():
            if n % tp == 0:
                yield Sharded(tp, n // tp, hosts=n // tp)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


# --------------------------------------------------------------------------- explain

# SGLang's words for hosts are nodes (--nnodes, --node-rank).
_REASONS = ShardedReasons(across_hosts="no single host holds it: one pipeline stage per node, TP = GPUs per node")


@hookimpl
def agentd_explain(runtime, model: ModelInfo, spec: DeploymentSpec, layout: Layout, limits: ShapeLimits, find):
    """The layout, why the policy chose it, and what each other --parallelism would run instead."""
    if runtime != NAME or not isinstance(layout.shape, Sharded):
        return None
    return explain_sharded(layout, spec.parallelism, limits, find, lambda other: _shapes(model, limits, other),
                           _REASONS)


# --------------------------------------------------------------------------- estimate


def stage_layers(layers: int, pp: int) -> tuple[int, ...]:
    """Layers per pipeline stage as SGLang splits them (distributed/utils.get_pp_indices): even, and the
    last `layers % pp` stages one more."""
    q, r = divmod(layers, pp)
    return (q,) * (pp - r) + (q + 1,) * r


def _layer_sizes(model: ModelInfo) -> tuple[int, ...]:
    if model.layer_bytes:
        return tuple(model.layer_bytes) + (0,) * max(0, model.num_hidden_layers - len(model.layer_bytes))
    rest = max(0, model.total_weight_bytes - sum(model.non_repeating_bytes.values()))
    return (rest // model.num_hidden_layers,) * model.num_hidden_layers


def _heaviest_stage(model: ModelInfo, stages: tuple[int, ...]) -> int:
    nr = model.non_repeating_bytes
    embed = nr.get("token_embd", 0)
    head = (nr.get("output", 0) or (embed if len(stages) > 1 else 0)) + nr.get("output_norm", 0)
    sizes = _layer_sizes(model)
    out, start = 0, 0
    for i, n in enumerate(stages):
        w = sum(sizes[start:start + n]) + (embed if i == 0 else 0) + (head if i == len(stages) - 1 else 0)
        out = max(out, w)
        start += n
    return out


def kv_bytes_per_token_layer(model: ModelInfo, tp: int) -> float:
    """KV bytes per token per layer on one rank: MLA's latent cache is whole on every rank; GQA/MHA ranks
    hold max(1, KV heads / TP) heads. Element size of the model dtype (--kv-cache-dtype auto)."""
    elem = 4 if model.dtype.lower() in ("float32", "fp32") else 2
    per = (model.kv_cache.k_elements + model.kv_cache.v_elements) * elem
    if model.kv_cache.kind == "mla":
        return per
    kv = model.num_key_value_heads
    return per * (kv // tp if kv >= tp else 1) / kv


def _bytes_per_param(model: ModelInfo) -> float:
    params = model.extra.get("estimated_parameters")
    if isinstance(params, int) and params > 0:
        return model.total_weight_bytes / params
    return 1.0 if model.quantization is not None and model.quantization.bits == 8 else 2.0


def estimate(model: ModelInfo, spec: DeploymentSpec, shape: Sharded) -> ShardDemand:
    tp, pp = shape.tp, shape.pp
    stages = stage_layers(model.num_hidden_layers, pp)
    heaviest = _heaviest_stage(model, stages)
    attn_dp = attention_dp(model, tp, pp)
    if attn_dp > 1:  # attention runs unsplit on every rank: its weights are whole on each GPU
        attention = mla_attention_params(model) * _bytes_per_param(model) * max(stages)
        weights = math.ceil((heaviest - attention) / tp + attention)
    else:
        weights = math.ceil(heaviest / tp)
    kv = math.ceil(kv_bytes_per_token_layer(model, tp) * max(stages) * context_length(model, spec))
    reserve = reserve_bytes(tp, pp, attn_dp)
    return ShardDemand(per_gpu=weights + kv + reserve, budget_fraction=1.0, stage_layers=stages,
                       breakdown={"weights": weights, "kv_cache": kv, "activation": reserve})


@hookimpl
def agentd_estimate(runtime, model: ModelInfo, spec: DeploymentSpec, shape):
    if runtime != NAME or not isinstance(shape, Sharded):
        return None
    return estimate(model, spec, shape)


# --------------------------------------------------------------------------- launch parameters


def mem_fraction_static(layout: Layout, spec: DeploymentSpec) -> float:
    """--mem-fraction-static for the chosen GPUs: the user's (deploy --gpu-memory-utilization), or what
    leaves the activation reserve outside the static pool on the smallest chosen GPU when SGLang finds
    MIN_FREE_SHARE of it free. Rounded down to 3 decimals (a smaller static pool only shrinks the KV
    pool beyond the one sequence booked)."""
    if spec.options.gpu_memory_utilization is not None:
        return spec.options.gpu_memory_utilization
    smallest = min(m for p in layout.parts for m in p.memory)
    reserve = layout.demand.breakdown["activation"]
    return math.floor((1 - reserve / (MIN_FREE_SHARE * smallest)) * 1000) / 1000


@hookimpl
def agentd_layout_args(runtime, model: ModelInfo, spec: DeploymentSpec, layout: Layout):
    if runtime != NAME or not isinstance(layout.shape, Sharded):
        return None
    shape = layout.shape
    args = ["--tp-size", str(shape.tp), "--pp-size", str(shape.pp)]
    ep = expert_parallel(model, shape.tp)
    if ep > 1:
        args += ["--ep-size", str(ep)]
    attn_dp = attention_dp(model, shape.tp, shape.pp)
    if attn_dp > 1:
        args += ["--attn-dp-size", str(attn_dp)]
    args += ["--mem-fraction-static", f"{mem_fraction_static(layout, spec):g}",
             "--chunked-prefill-size", str(CHUNKED_PREFILL_SIZE),
             "--max-running-requests", str(MAX_RUNNING_REQUESTS),
             "--context-length", str(context_length(model, spec))]
    env = tuple({"CUDA_VISIBLE_DEVICES": ",".join(map(str, p.gpus))} for p in layout.parts)
    return LaunchParams(args=tuple(args), env=env)
