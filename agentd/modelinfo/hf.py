"""ModelInfo from a Hugging Face model directory: config.json plus safetensors headers or the index.

Composite configs (Llava, Mllama, InternVL, Gemma 3, Qwen2.5-Omni...) nest the
language model in `text_config`, `llm_config`, `language_config` or
`thinker_config.text_config`; heads and layers come from there, and the vision
tower is reported beside it. Keys a nested config leaves out take the defaults
of its `model_type` as transformers would (llava-1.5's text_config names only
its vocabulary and context, the rest is LlamaConfig's defaults).

Weight bytes, in order of preference: the safetensors headers (which also give
the bytes of each `model.layers.N.` layer), `metadata.total_size` from the
index (shared out over the layers by their estimated sizes), or an estimate
from the config alone. `extra["weight_bytes_source"]` says which.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentd.errors import InvalidInput
from agentd.modelinfo.estimate import (
    Experts,
    Mla,
    ParamCount,
    Storage,
    TextShape,
    count_params,
    estimate_bytes,
    spread,
    vision_params,
)
from agentd.modelinfo.safetensors import SafetensorsHeader, load_json, read_index, read_safetensors_header
from agentd.types import KVCache, ModelInfo, MoE, Quantization, VisionTower

MAX_CONFIG_BYTES = 16 << 20
MAX_VALUE = 1 << 40  # no size, count or length in a real config comes near; bigger ones are corruption
MAX_LAYERS = 1 << 16
INDEX_NAME = "model.safetensors.index.json"

# transformers' defaults for the families whose nested configs rely on them.
MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "tie_word_embeddings": False},
    # Gemma 3's published text_config names neither its vocabulary nor its context (Gemma3TextConfig's).
    "gemma3_text": {"vocab_size": 262208, "max_position_embeddings": 131072, "hidden_size": 2304,
                    "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "tie_word_embeddings": False},
}
NESTED_TEXT = (("text_config",), ("llm_config",), ("language_config",), ("thinker_config", "text_config"))
QKV_BIAS_TYPES = {"qwen2", "qwen2_vl", "qwen2_5_vl", "qwen2_moe", "qwen2_audio"}
UNGATED_TYPES = {"gpt2", "gpt_neox", "gptj", "falcon", "phi", "starcoder2", "bloom", "opt", "mpt", "gpt_bigcode"}
DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "float16": 2.0, "half": 2.0, "bfloat16": 2.0, "float64": 8.0,
               "float8_e4m3fn": 1.0, "float8_e5m2": 1.0}
VISION_PREFIXES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "vpm",
                   "mlp1", "resampler", "image_newline", "vision_embed_tokens", "vision_encoder", "audio_tower",
                   "vision", "img_processor", "patch_embed")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", re.ASCII)
EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings)\.")
OUTPUT_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.|^output\.")
NORM_RE = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layernorm|final_layer_norm)\.(?:weight|bias)$")


class _Cfg:
    """Typed reads from a config dict, with errors that name config.json and the key path."""

    def __init__(self, data: dict[str, Any], path: Path, prefix: str = "", defaults: dict[str, Any] | None = None):
        self.data, self.path, self.prefix, self.defaults = data, path, prefix, defaults or {}

    def fail(self, key: str, message: str) -> InvalidInput:
        return InvalidInput(f"key '{self.prefix}{key}' {message}", where=str(self.path))

    def get(self, *keys: str) -> tuple[str, Any]:
        for k in keys:
            if self.data.get(k) is not None:
                return k, self.data[k]
        for k in keys:
            if self.defaults.get(k) is not None:
                return k, self.defaults[k]
        return keys[0], None

    def int(self, *keys: str, required: bool = True, minimum: int = 1, maximum: int = MAX_VALUE) -> int | None:
        k, v = self.get(*keys)
        if v is None:
            if required:
                alias = f" (or {', '.join(repr(x) for x in keys[1:])})" if len(keys) > 1 else ""
                raise self.fail(keys[0], f"is missing{alias}")
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(k, f"must be an integer, got {v!r:.60}")
        if v < minimum:
            raise self.fail(k, f"must be at least {minimum}, got {v}")
        if v > maximum:
            raise self.fail(k, f"is absurd: {v} (at most {maximum})")
        return v

    def bool(self, key: str, default: bool = False) -> bool:
        _, v = self.get(key)
        return bool(v) if isinstance(v, (bool, int)) else default

    def str(self, key: str) -> str | None:
        _, v = self.get(key)
        return v if isinstance(v, str) else None

    def dict(self, key: str) -> dict[str, Any] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail(key, "must be an object")
        return v


def load_config(path: Path) -> dict[str, Any]:
    data = load_json(path, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise InvalidInput("config.json must hold a JSON object", where=str(path))
    return data


def _text_cfg(top: _Cfg) -> _Cfg:
    for keys in NESTED_TEXT:
        node: Any = top.data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            continue
        prefix = ".".join(keys) + "."
        if not isinstance(node, dict):
            raise top.fail(".".join(keys), "must be an object")
        mt = node.get("model_type")
        return _Cfg(node, top.path, prefix, MODEL_TYPE_DEFAULTS.get(mt) if isinstance(mt, str) else None)
    return top


# --------------------------------------------------------------------------- shape


def _shape(t: _Cfg, top: _Cfg) -> tuple[TextShape, int]:
    """The language model's shape and its context length."""
    model_type = t.str("model_type") or top.str("model_type") or ""
    layers = t.int("num_hidden_layers", "n_layer", "num_layers", "n_layers", maximum=MAX_LAYERS)
    heads = t.int("num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = t.int("hidden_size", "n_embd", "d_model", "dim", "model_dim")
    assert layers is not None and heads is not None and hidden is not None
    if t.bool("multi_query_attention") or t.bool("multi_query"):
        kv = t.int("multi_query_group_num", "num_kv_heads", required=False) or 1
    else:
        kv = t.int("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num",
                   required=False) or heads
    vocab = t.int("vocab_size", "padded_vocab_size", "n_vocab", required=False) or top.int(
        "vocab_size", "padded_vocab_size", required=False)
    if vocab is None:
        raise t.fail("vocab_size", "is missing")
    inter = t.int("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", required=False)

    mla = None
    kv_lora = t.int("kv_lora_rank", required=False)
    if kv_lora:
        rope = t.int("qk_rope_head_dim")
        nope = t.int("qk_nope_head_dim")
        assert rope is not None and nope is not None
        mla = Mla(q_lora_rank=t.int("q_lora_rank", required=False), kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
                  qk_rope_head_dim=rope, v_head_dim=t.int("v_head_dim", required=False) or nope)
        head_dim = nope + rope
    else:
        head_dim = t.int("head_dim", "head_size", required=False) or max(1, hidden // heads)

    experts = _experts(t, layers, inter)
    tie = t.data["tie_word_embeddings"] if isinstance(t.data.get("tie_word_embeddings"), bool) \
        else top.bool("tie_word_embeddings")
    shape = TextShape(
        model_type=model_type, num_layers=layers, num_heads=heads, num_kv_heads=kv, hidden_size=hidden,
        head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, tie_embeddings=tie,
        qkv_bias=t.bool("attention_bias") or t.bool("qkv_bias") or model_type in QKV_BIAS_TYPES,
        gated_mlp=model_type not in UNGATED_TYPES, mla=mla, experts=experts,
    )
    return shape, _context(t)


def _experts(t: _Cfg, layers: int, inter: int | None) -> Experts | None:
    n = t.int("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts", required=False,
              minimum=0)
    if not n:
        return None
    used = t.int("num_experts_per_tok", "moe_top_k", "num_experts_per_token", "top_k")
    expert_inter = t.int("moe_intermediate_size", required=False) or inter
    if expert_inter is None:
        raise t.fail("moe_intermediate_size", "is missing")
    shared = t.int("n_shared_experts", "num_shared_experts", required=False, minimum=0) or 0
    shared_inter = shared * expert_inter
    shared_gate = False
    if t.int("shared_expert_intermediate_size", required=False):
        shared_inter = t.int("shared_expert_intermediate_size") or 0
        shared, shared_gate = max(shared, 1), True
    first_dense = t.int("first_k_dense_replace", required=False, minimum=0) or 0
    freq = t.int("moe_layer_freq", required=False) or 1
    step = t.int("decoder_sparse_step", required=False) or 1
    _, mlp_only = t.get("mlp_only_layers")
    dense_only = {x for x in mlp_only if isinstance(x, int)} if isinstance(mlp_only, list) else set()
    moe_layers = frozenset(i for i in range(layers)
                           if i >= first_dense and i % freq == 0 and (i + 1) % step == 0 and i not in dense_only)
    assert used is not None
    return Experts(num_experts=n, experts_per_token=used, intermediate=expert_inter, shared_experts=shared,
                   shared_intermediate=shared_inter, moe_layers=moe_layers,
                   router_bias=t.str("topk_method") == "noaux_tc", shared_gate=shared_gate)


def _context(t: _Cfg) -> int:
    """vLLM's derived max length: max_position_embeddings, scaled by linear/dynamic/yarn RoPE factors."""
    ctx = t.int("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "model_max_length")
    assert ctx is not None
    rs = t.data.get("rope_scaling")
    if isinstance(rs, dict) and "gemma3" not in str(t.data.get("model_type", "")):
        # vLLM: "Gemma3's max_model_len (128K) is already scaled by RoPE scaling" (ModelConfig)
        kind = rs.get("rope_type") or rs.get("type")
        factor = rs.get("factor")
        if kind in ("linear", "dynamic", "yarn") and isinstance(factor, (int, float)) \
                and math.isfinite(factor) and 1 < factor <= 1 << 20:
            base = rs.get("original_max_position_embeddings") if kind == "yarn" else None
            ctx = int((base if isinstance(base, int) and base > 0 else ctx) * factor)
    return ctx


# --------------------------------------------------------------------------- quantization


def _quantization(top: _Cfg, t: _Cfg) -> tuple[Quantization | None, dict[str, Any] | None]:
    qc = top.dict("quantization_config") or t.dict("quantization_config")
    if qc is None:
        return None, None
    q = _Cfg(qc, top.path, "quantization_config.")
    method = (q.str("quant_method") or "").lower()
    if not method:
        if q.bool("load_in_4bit") or q.bool("load_in_8bit"):
            method = "bitsandbytes"
        else:
            raise q.fail("quant_method", "is missing")
    bits = group = None
    if method in ("gptq", "awq", "gptq_marlin", "awq_marlin", "autoround", "auto-round"):
        bits = q.int("bits", "w_bit", maximum=64)
        group = q.int("group_size", "q_group_size", required=False, minimum=-1)
        group = None if group in (None, -1, 0) else group
    elif method in ("fp8", "fbgemm_fp8", "fp8_e4m3"):
        bits = 8
        block = qc.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list) and block and all(
                    isinstance(b, int) and not isinstance(b, bool) and 0 < b <= MAX_VALUE for b in block)):
                raise q.fail("weight_block_size", f"must be a list of positive integers, got {block!r:.60}")
            group = block[-1]
    elif method == "compressed-tensors":
        groups = qc.get("config_groups")
        if isinstance(groups, dict):
            for g in groups.values():
                w = g.get("weights") if isinstance(g, dict) else None
                if isinstance(w, dict):
                    nb, gs = w.get("num_bits"), w.get("group_size")
                    bits = nb if isinstance(nb, int) and not isinstance(nb, bool) and 0 < nb <= 64 else None
                    group = gs if isinstance(gs, int) and not isinstance(gs, bool) and 0 < gs <= MAX_VALUE else None
                    break
    elif method == "bitsandbytes":
        bits = 4 if q.bool("load_in_4bit") else 8
        group = 64 if bits == 4 else None
    elif method == "mxfp4":
        bits, group = 4, 32
    else:
        bits = q.int("bits", required=False, maximum=64)
        group = q.int("group_size", required=False)
    small = {k: v for k, v in qc.items() if isinstance(v, (int, float, str, bool)) or k == "weight_block_size"}
    return Quantization(method=method, bits=bits, group_size=group), small


def _kv_cache_dtype(qc: dict[str, Any] | None) -> str | None:
    """"fp8" when the checkpoint declares an FP8 KV cache that vLLM honours by default: compressed-tensors'
    `kv_cache_scheme` (any: vLLM's Attention then uses fp8) or ModelOpt's FP8 `kv_cache_quant_algo`."""
    if not qc:
        return None
    method = str(qc.get("quant_method") or "").lower()
    if method == "compressed-tensors" and isinstance(qc.get("kv_cache_scheme"), dict):
        return "fp8"
    if method.startswith("modelopt"):
        inner = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
        algo = inner.get("kv_cache_quant_algo") or qc.get("kv_cache_quant_algo")
        if isinstance(algo, str) and algo.lower().startswith("fp8"):
            return "fp8"
    return None


def _storage(dtype: str, quant: Quantization | None, qc: dict[str, Any] | None) -> Storage:
    """Bytes per parameter for linear weights and for the rest, for estimates."""
    other = DTYPE_BYTES.get(dtype, 2.0)
    if quant is None:
        return Storage(other, other)
    bits = quant.bits or 16
    g = quant.group_size
    if quant.method == "fp8":
        block = (qc or {}).get("weight_block_size") or []
        area = block[0] * block[-1] if block else 0
        return Storage(1.0 + (4.0 / area if area else 0.0), other)
    if bits >= 16:
        return Storage(other, other)
    # A scale (fp16) and a packed zero point per group of weights.
    overhead = (2.0 + bits / 8) / g if g else 0.0
    return Storage(bits / 8 + overhead, other)


# --------------------------------------------------------------------------- weights


@dataclass
class _Weights:
    source: str  # safetensors-headers | index-total-size | config-estimate
    files: list[str]
    text_bytes: int
    layer_bytes: tuple[int, ...]
    roles: dict[str, int]
    vision_bytes: int | None


VISION_RE = re.compile(r"^(?:model\.)?(?:" + "|".join(re.escape(p) for p in VISION_PREFIXES) + ")")


def _classify(headers: list[SafetensorsHeader], layers: int) -> tuple[tuple[int, ...], dict[str, int], int]:
    per_layer = [0] * layers
    roles = {"token_embd": 0, "output": 0, "output_norm": 0, "other": 0}
    vision = 0
    fast = "model.layers."
    for h in headers:
        for name, nbytes in h.tensor_bytes.items():
            if name.startswith(fast):  # the common case, without regexes (90k names in DeepSeek-R1)
                n, _, _ = name[13:].partition(".")
                if n.isascii() and n.isdigit():
                    i = int(n)
                    if i < layers:
                        per_layer[i] += nbytes
                    else:
                        roles["other"] += nbytes
                    continue
            if VISION_RE.match(name):
                vision += nbytes
                continue
            m = LAYER_RE.search(name)
            if m:
                i = int(m.group(1))
                if i < layers:
                    per_layer[i] += nbytes
                else:  # DeepSeek's multi-token-prediction layer and the like
                    roles["other"] += nbytes
            elif EMBED_RE.search(name):
                roles["token_embd"] += nbytes
            elif OUTPUT_RE.search(name):
                roles["output"] += nbytes
            elif NORM_RE.search(name):
                roles["output_norm"] += nbytes
            else:
                roles["other"] += nbytes
    return tuple(per_layer), roles, vision


def _weights(root: Path, params: ParamCount, storage: Storage, vision_estimate: int | None) -> _Weights:
    index_path = root / INDEX_NAME
    index = read_index(index_path) if index_path.is_file() else None
    if index is not None:
        names = index.files
        present = [n for n in names if (root / n).is_file()]
        if present and len(present) < len(names):
            missing = [n for n in names if n not in present]
            raise InvalidInput(f"missing shard {missing[0]} ({len(missing)} of {len(names)} listed in {INDEX_NAME} "
                               "are absent)", where=str(root / missing[0]))
        if not present:
            if index.total_size is None:
                raise InvalidInput("no weight files and no metadata.total_size", where=str(index_path))
            return _from_total(index.total_size, params, storage, vision_estimate, "index-total-size",
                               [str(index_path)])
        files = [root / n for n in names]
    else:
        files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        layers, roles = estimate_bytes(params, storage)
        return _Weights("config-estimate", [], sum(layers) + sum(roles.values()), layers, roles, vision_estimate)
    headers = [read_safetensors_header(p) for p in files]
    per_layer, roles, vision = _classify(headers, len(params.layers))
    listed = ([str(index_path)] if index else []) + [str(p) for p in files]
    return _Weights("safetensors-headers", listed, sum(per_layer) + sum(roles.values()), per_layer, roles,
                    vision or None)


def _from_total(total: int, params: ParamCount, storage: Storage, vision_estimate: int | None, source: str,
                files: list[str]) -> _Weights:
    est_layers, est_roles = estimate_bytes(params, storage)
    vision = min(vision_estimate or 0, total)
    text = total - vision
    nonrep = sum(est_roles.values())
    if nonrep >= text:  # the estimate does not fit what the index says; spread evenly rather than go negative
        nonrep, est_roles = 0, dict.fromkeys(est_roles, 0)
    return _Weights(source, files, text, spread(text - nonrep, est_layers), est_roles, vision or None)


# --------------------------------------------------------------------------- assembly


def _vision_tower(top: _Cfg, storage: Storage) -> tuple[VisionTower | None, int | None]:
    vc = top.dict("vision_config")
    if vc is None:
        return None, None
    v = _Cfg(vc, top.path, "vision_config.")
    if "depth" in vc and "embed_dim" in vc:  # Qwen2-VL style: hidden_size is the merger's output width
        layers, hidden = v.int("depth", required=False), v.int("embed_dim", required=False)
        ratio = vc.get("mlp_ratio")
        ok = isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 1 << 10
        inter = int(hidden * ratio) if hidden and ok else None
    else:
        layers = v.int("num_hidden_layers", "depth", "num_layers", required=False)
        hidden = v.int("hidden_size", "embed_dim", "width", required=False)
        inter = v.int("intermediate_size", required=False)
        extra_layers = v.int("num_global_layers", required=False, minimum=0) or 0
        layers = layers + extra_layers if layers else layers
    estimate = None
    if layers and hidden:
        estimate = round(vision_params(layers, hidden, inter or 4 * hidden) * storage.other)
    arch = v.str("model_type") or f"{top.str('model_type') or 'unknown'}_vision"
    return VisionTower(architecture=arch, num_hidden_layers=layers, hidden_size=hidden), estimate


def model_from_hf(path: str | os.PathLike[str]) -> ModelInfo:
    """Inspect a Hugging Face model directory (or its config.json); raises InvalidInput for every bad input."""
    root = Path(path)
    if root.name == "config.json" and root.is_file():
        root = root.parent
    config_path = root / "config.json"
    if not config_path.is_file():
        raise InvalidInput("no config.json in the model directory", where=str(root))
    top = _Cfg(load_config(config_path), config_path)
    t = _text_cfg(top)
    shape, ctx = _shape(t, top)
    dtype = top.str("torch_dtype") or top.str("dtype") or t.str("torch_dtype") or t.str("dtype") or ""
    quant, qc = _quantization(top, t)
    storage = _storage(dtype, quant, qc)
    vision, vision_estimate = _vision_tower(top, storage)
    params = count_params(shape)
    w = _weights(root, params, storage, vision_estimate)
    if vision is not None:
        vision = vision.model_copy(update={"weight_bytes": w.vision_bytes})

    if shape.mla:
        m = shape.mla
        kv = KVCache(kind="mla", k_elements=m.kv_lora_rank + m.qk_rope_head_dim, v_elements=0,
                     kv_lora_rank=m.kv_lora_rank, qk_rope_head_dim=m.qk_rope_head_dim)
    else:
        n = shape.num_kv_heads * shape.head_dim
        kind = "mha" if shape.num_kv_heads == shape.num_heads else "mqa" if shape.num_kv_heads == 1 else "gqa"
        kv = KVCache(kind=kind, k_elements=n, v_elements=n)
    moe = None
    if shape.experts:
        e = shape.experts
        moe = MoE(num_experts=e.num_experts, experts_per_token=e.experts_per_token, shared_experts=e.shared_experts)

    archs = top.data.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else shape.model_type
    if not arch:
        raise top.fail("architectures", "is missing (and so is model_type)")
    extra: dict[str, Any] = {
        "model_type": shape.model_type,
        "weight_bytes_source": w.source,
        "estimated_parameters": params.total,
        "tie_word_embeddings": shape.tie_embeddings,
    }
    mpe = t.data.get("max_position_embeddings")
    if isinstance(mpe, int) and mpe != ctx:
        extra["max_position_embeddings"] = mpe
    for key in ("rope_theta", "sliding_window", "use_sliding_window", "first_k_dense_replace", "moe_intermediate_size",
                "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_nextn_predict_layers",
                "sliding_window_pattern", "max_window_layers"):
        v = t.data.get(key)
        if isinstance(v, (int, float, str, bool)):
            extra[key] = v
    layer_types = t.data.get("layer_types")
    if isinstance(layer_types, list) and "sliding_attention" in layer_types \
            and all(isinstance(x, str) for x in layer_types):
        extra["layer_types"] = layer_types  # which layers slide (vLLM sizes their KV cache by the window)
    kv_dtype = _kv_cache_dtype(top.dict("quantization_config") or t.dict("quantization_config"))
    if kv_dtype:
        extra["kv_cache_dtype"] = kv_dtype
    rs = t.data.get("rope_scaling")
    if isinstance(rs, dict):
        extra["rope_scaling"] = {k: v for k, v in rs.items() if isinstance(v, (int, float, str, bool))}
    if qc:
        extra["quantization_config"] = qc
    if t is not top:
        extra["text_config_key"] = t.prefix.rstrip(".")

    files = [str(config_path), *w.files]
    try:
        return ModelInfo(
            format="safetensors",
            architecture=arch,
            name=_name(top, root),
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads,
            hidden_size=shape.hidden_size,
            head_dim=shape.head_dim,
            intermediate_size=shape.intermediate_size,
            vocab_size=shape.vocab_size,
            context_length=ctx,
            dtype=dtype,
            quantization=quant,
            total_weight_bytes=w.text_bytes + (w.vision_bytes or 0),
            layer_bytes=w.layer_bytes,
            non_repeating_bytes=w.roles,
            kv_cache=kv,
            moe=moe,
            vision=vision,
            files=tuple(files),
            extra=extra,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidInput(f"inconsistent config: {err['msg']} ({'.'.join(str(x) for x in err['loc'])})",
                           where=str(config_path)) from None


def _name(top: _Cfg, root: Path) -> str:
    n = top.str("_name_or_path")
    return n if n and "/" in n and not n.startswith(("/", ".")) else root.resolve().name
