"""ModelInfo from a GGUF model: the header facts llama.cpp itself would act on.

Keys are `<arch>.<name>` as llama.cpp's llama-arch.cpp spells them. Where a
value may be a per-layer array (head counts, feed-forward sizes in models with
uneven layers), the largest entry is what sizes the biggest layer, so it is
the one reported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentd.errors import InvalidInput
from agentd.modelinfo.ggml_types import FILE_TYPES, GGML_TYPES_BY_NAME
from agentd.modelinfo.gguf import ArrayInfo, GgufHeader, TensorTotals, read_header, read_model
from agentd.types import KVCache, ModelInfo, MoE, Quantization, VisionTower

UNQUANTIZED = {"F32", "F16", "BF16", "F64"}
MAX_LAYERS = 1 << 16  # layer_bytes has one entry per layer; no real model comes near
ROLES = ("token_embd", "output", "output_norm", "other")
# Scalar metadata copied into ModelInfo.extra for plugins: small and useful to launchers.
_EXTRA_SUFFIXES = (
    "rope.freq_base", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "attention.sliding_window", "expert_feed_forward_length", "expert_shared_feed_forward_length",
    "leading_dense_block_count", "attention.q_lora_rank", "attention.kv_lora_rank", "attention.key_length",
    "attention.value_length", "attention.key_length_mla", "attention.value_length_mla", "expert_gating_func",
    "nextn_predict_layers", "rope.dimension_count", "attention.layer_norm_rms_epsilon",
)


class _Meta:
    """Typed access to the first shard's metadata, with errors that name the key."""

    def __init__(self, md: dict[str, Any], path: Path):
        self.md, self.path = md, path

    def fail(self, key: str, message: str) -> InvalidInput:
        return InvalidInput(f"metadata key {key!r} {message}", where=str(self.path))

    def int(self, key: str, *, required: bool = False, default: int | None = None, minimum: int = 0,
            maximum: int = 1 << 48) -> int | None:
        v = self.md.get(key)
        if v is None:
            if required:
                raise self.fail(key, "is missing")
            return default
        if isinstance(v, list):
            v = max((x for x in v if isinstance(x, int) and not isinstance(x, bool)), default=None)
            if v is None:
                raise self.fail(key, "must be an integer or an array of integers")
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {_short(v)}")
        if v < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {v}")
        if v > maximum:
            raise self.fail(key, f"is absurd: {v} (at most {maximum})")
        return v

    def str(self, key: str) -> str | None:
        v = self.md.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(key, f"must be a string, got {_short(v)}")
        return v


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _vocab(m: _Meta, arch: str, totals: TensorTotals) -> int:
    v = m.int(f"{arch}.vocab_size", minimum=1)
    if v:
        return v
    tokens = m.md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArrayInfo) and tokens.count:
        return tokens.count
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    shape = totals.shapes.get("token_embd.weight")
    if shape and len(shape) >= 2 and shape[1] > 0:
        return shape[1]
    raise m.fail(f"{arch}.vocab_size", "is missing, and neither tokenizer.ggml.tokens nor token_embd.weight "
                 "gives the vocabulary size")


def _quantization(dtype: str, totals: TensorTotals) -> Quantization | None:
    if dtype in UNQUANTIZED:
        return None
    quantized = {k: v for k, v in totals.type_bytes.items() if k not in UNQUANTIZED and not k.startswith("I")}
    group = None
    if quantized:
        group = GGML_TYPES_BY_NAME[max(quantized, key=quantized.__getitem__)].block_size
    digits = None if dtype.startswith("file_type_") else re.search(r"\d+", dtype)
    return Quantization(method=f"gguf:{dtype}", bits=int(digits.group()) if digits else None, group_size=group)


def _kv_cache(m: _Meta, arch: str, heads: int, kv_heads: int, head_dim: int) -> KVCache:
    p = f"{arch}.attention."
    kv_lora = m.int(p + "kv_lora_rank", minimum=1)
    if kv_lora and p + "key_length_mla" in m.md:
        # llama.cpp caches MLA's compressed latent plus the shared RoPE key; V is a view of it.
        rope = m.int(f"{arch}.rope.dimension_count", required=True, minimum=1)
        return KVCache(kind="mla", k_elements=kv_lora + rope, v_elements=0, kv_lora_rank=kv_lora,
                       qk_rope_head_dim=rope)
    # Without the *_mla keys (files converted before llama.cpp's MLA cache), the full K and V are cached.
    k_len = m.int(p + "key_length", default=head_dim, minimum=1)
    v_len = m.int(p + "value_length", default=k_len, minimum=0)
    kind = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
    return KVCache(kind=kind, k_elements=kv_heads * k_len, v_elements=kv_heads * v_len)


def _vision(path: Path) -> VisionTower:
    """The vision tower from an mmproj GGUF (llama.cpp's `clip` architecture)."""
    totals = TensorTotals()
    h = read_header(path, totals)
    m = _Meta(h.metadata, path)
    arch = m.str("general.architecture")
    if arch != "clip":
        raise InvalidInput(f"expected a multimodal projector (general.architecture 'clip'), got {arch!r}",
                           where=str(path))
    return VisionTower(architecture=m.str("clip.projector_type") or "clip",
                       num_hidden_layers=m.int("clip.vision.block_count"),
                       hidden_size=m.int("clip.vision.embedding_length"),
                       weight_bytes=totals.total_bytes)


def find_mmproj(model_path: Path) -> Path | None:
    """The one `mmproj*.gguf` beside a model, as llama-box / GPUStack pair them; None if none or ambiguous."""
    if model_path.name.lower().startswith("mmproj"):
        return None
    try:
        found = [p for p in model_path.parent.iterdir() if p.name.lower().startswith("mmproj")
                 and p.name.lower().endswith(".gguf") and p.is_file()]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def model_from_gguf(path: str | os.PathLike[str], *, mmproj: str | os.PathLike[str] | None = None,
                    find_projector: bool = True) -> ModelInfo:
    """Inspect a GGUF model (any shard of a split one); raises InvalidInput for every bad input.

    `mmproj` names the multimodal projector; when None and `find_projector`,
    a single `mmproj*.gguf` in the same directory is used.
    """
    headers, totals = read_model(path)
    first: GgufHeader = headers[0]
    m = _Meta(first.metadata, first.path)
    arch = m.str("general.architecture")
    if not arch:
        raise m.fail("general.architecture", "is missing")
    if arch == "clip":
        raise InvalidInput("this is a multimodal projector (mmproj), not a language model: inspect the model "
                           "file and pass the projector with --mmproj", where=str(first.path))
    a = f"{arch}."
    layers = m.int(a + "block_count", required=True, minimum=1, maximum=MAX_LAYERS)
    heads = m.int(a + "attention.head_count", default=0) or 0
    attention_free = heads == 0  # SSM / RWKV models: no attention heads, no KV cache growth
    heads = max(heads, 1)
    kv_heads = m.int(a + "attention.head_count_kv", default=heads) or heads
    hidden = m.int(a + "embedding_length", required=True, minimum=1)
    ctx = m.int(a + "context_length", required=True, minimum=1)
    mla = a + "attention.key_length_mla" in m.md
    if mla:
        head_dim = m.int(a + "attention.key_length_mla", minimum=1)
        kv_heads = heads  # each head gets its own K/V once the latent is expanded, as in the HF config
    else:
        head_dim = m.int(a + "attention.key_length", minimum=1) or max(1, hidden // heads)
    assert layers is not None and hidden is not None and ctx is not None and head_dim is not None

    file_type = m.int("general.file_type")
    if file_type is not None:
        dtype = FILE_TYPES.get(file_type, f"file_type_{file_type}")
    elif totals.type_bytes:
        dtype = max(totals.type_bytes, key=totals.type_bytes.__getitem__)
    else:
        dtype = ""

    experts = m.int(a + "expert_count", default=0) or 0
    moe = None
    if experts > 0:
        used = m.int(a + "expert_used_count", required=True, minimum=1)
        assert used is not None
        moe = MoE(num_experts=experts, experts_per_token=used,
                  shared_experts=m.int(a + "expert_shared_count", default=0) or 0)

    files = [str(h.path) for h in headers]
    vision = None
    projector = Path(mmproj) if mmproj is not None else (find_mmproj(first.path) if find_projector else None)
    if projector is not None:
        vision = _vision(projector)
        files.append(str(projector))

    extra: dict[str, Any] = {
        "gguf_version": first.version,
        "tensor_count": totals.count,
        "header_only": any(h.header_only for h in headers),
        "bytes_by_ggml_type": dict(sorted(totals.type_bytes.items())),
    }
    if totals.types:
        extra["ggml_type_by_tensor"] = dict(sorted(totals.types.items()))  # token_embd, output, output_norm
    if file_type is not None:
        extra["file_type"] = file_type
    if attention_free:
        extra["attention_free"] = True
    for suffix in _EXTRA_SUFFIXES:
        v = m.md.get(a + suffix)
        if isinstance(v, (int, float, str)):
            extra[suffix] = v
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        if isinstance(m.md.get(key), str):
            extra[key] = m.md[key]
    if "tokenizer.chat_template" in m.md:
        extra["has_chat_template"] = True

    try:
        return ModelInfo(
            format="gguf",
            architecture=arch,
            name=m.str("general.name") or "",
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            hidden_size=hidden,
            head_dim=head_dim,
            intermediate_size=m.int(a + "feed_forward_length"),
            vocab_size=_vocab(m, arch, totals),
            context_length=ctx,
            dtype=dtype,
            quantization=_quantization(dtype, totals),
            total_weight_bytes=totals.total_bytes,
            layer_bytes=tuple(totals.layer_bytes.get(i, 0) for i in range(layers)),
            non_repeating_bytes={r: totals.role_bytes.get(r, 0) for r in ROLES},
            kv_cache=_kv_cache(m, arch, heads, kv_heads if not mla else 1, head_dim),
            moe=moe,
            vision=vision,
            files=tuple(files),
            extra=extra,
        )
    except ValidationError as exc:
        raise InvalidInput(f"inconsistent model metadata: {exc.errors()[0]['msg']} "
                           f"({'.'.join(str(x) for x in exc.errors()[0]['loc'])})", where=str(first.path)) from None
