"""GGUF files for tests and benchmarks, written with the `gguf` package's writer.

Two kinds:

* `write_tiny_llama_gguf`: a real, runnable llama model (random weights, an
  SPM-style vocabulary) that llama.cpp's `llama-server` loads in milliseconds
  and that answers `/completion`. Runtime tests serve it for real.
* `write_header_only_gguf`: the header and tensor infos of a model whose
  tensor data is absent. Model inspection reads headers only, so such a file
  stands for a model of any size (DeepSeek-R1 BF16 is 1.3 TB) and costs a few
  KB to a few MB on disk. Placement tests describe the model they need as a
  `GgufSpec` (see `llama_spec`, `deepseek_r1_spec`, `uniform_spec`).

Shapes in `TensorSpec` are in ggml order: ne[0], the row length, first, as
llama.cpp's logs and gguf-dump print them (token_embd.weight is
[hidden, vocab]). The writer wants numpy order, so it is reversed on write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from agentd.modelinfo.ggml_types import FILE_TYPE_IDS, GgmlType, ggml_type_by_name, tensor_nbytes

__all__ = [
    "GgufSpec",
    "TensorSpec",
    "Typed",
    "deepseek_r1_spec",
    "gib",
    "iter_layer_names",
    "llama3_70b_q4_k_m_spec",
    "llama_spec",
    "retype",
    "shard_paths",
    "uniform_spec",
    "write_header_only_gguf",
    "write_tiny_llama_gguf",
]

_VALUE_TYPES = {
    "u8": GGUFValueType.UINT8, "i8": GGUFValueType.INT8, "u16": GGUFValueType.UINT16,
    "i16": GGUFValueType.INT16, "u32": GGUFValueType.UINT32, "i32": GGUFValueType.INT32,
    "u64": GGUFValueType.UINT64, "i64": GGUFValueType.INT64, "f32": GGUFValueType.FLOAT32,
    "f64": GGUFValueType.FLOAT64, "bool": GGUFValueType.BOOL, "str": GGUFValueType.STRING,
}


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type, e.g. `Typed(2, "u16")` or `Typed([1, 2], "i32")`.

    For a list, `type` is the element type. Plain Python values are typed by
    `_infer`: bool -> BOOL, int -> UINT32 (INT32 if negative, 64-bit if large),
    float -> FLOAT32, str -> STRING, list -> ARRAY of the first element's type.
    """

    value: Any
    type: str


@dataclass(frozen=True)
class TensorSpec:
    """One tensor info: `shape` in ggml order (ne[0] first), `ggml_type` a name such as "Q4_K" or "BF16"."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str = "F32"

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(ggml_type_by_name(self.ggml_type), self.shape)


@dataclass(frozen=True)
class GgufSpec:
    """What a GGUF file says: architecture, metadata (without general.architecture) and tensor infos."""

    architecture: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[TensorSpec, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of the `blk.N.*` tensors by layer: what inspection must report."""
        by_layer: dict[int, int] = {}
        for t in self.tensors:
            if t.name.startswith("blk."):
                n = int(t.name.split(".", 2)[1])
                by_layer[n] = by_layer.get(n, 0) + t.nbytes
        return tuple(by_layer.get(i, 0) for i in range(max(by_layer) + 1)) if by_layer else ()

    def with_metadata(self, **changes: Any) -> GgufSpec:
        """A copy with metadata keys set; use "__" for "." in names (llama__block_count=4), or pass a dict."""
        md = dict(self.metadata)
        md.update({k.replace("__", "."): v for k, v in changes.items()})
        return replace(self, metadata=md)


# --------------------------------------------------------------------------- writing


def _infer(value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, array element type) for GGUFWriter.add_key_value."""
    if isinstance(value, Typed):
        if isinstance(value.value, (list, tuple)):
            return list(value.value), GGUFValueType.ARRAY, _VALUE_TYPES[value.type]
        return value.value, _VALUE_TYPES[value.type], None
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, int):
        if value < 0:
            return value, (GGUFValueType.INT32 if value >= -(2**31) else GGUFValueType.INT64), None
        return value, (GGUFValueType.UINT32 if value < 2**32 else GGUFValueType.UINT64), None
    if isinstance(value, float):
        return value, GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("GGUF arrays cannot be empty")
        first = value[0]
        if isinstance(first, bool):
            sub = GGUFValueType.BOOL
        elif isinstance(first, int):
            sub = GGUFValueType.INT32
        elif isinstance(first, float):
            sub = GGUFValueType.FLOAT32
        elif isinstance(first, str):
            sub = GGUFValueType.STRING
        else:
            raise ValueError(f"unsupported GGUF array element {type(first).__name__}")
        return list(value), GGUFValueType.ARRAY, sub
    raise ValueError(f"unsupported GGUF metadata value {type(value).__name__}")


def shard_paths(path: str | os.PathLike[str], shards: int) -> list[Path]:
    """llama.cpp's split names: `<stem>-00001-of-00030.gguf` beside `path` (unchanged when shards == 1)."""
    path = Path(path)
    if shards <= 1:
        return [path]
    stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
    return [path.with_name(f"{stem}-{i:05d}-of-{shards:05d}.gguf") for i in range(1, shards + 1)]


def _quant_type(t: GgmlType) -> GGMLQuantizationType:
    return GGMLQuantizationType(t.id)


def write_header_only_gguf(path: str | os.PathLike[str], spec: GgufSpec, *, shards: int = 1,
                           version: int = 3) -> Path:
    """Write `spec` as GGUF header(s) and tensor infos with no tensor data; return the first file.

    With `shards > 1` the tensors are dealt out in order, in equal counts, to
    files named like llama.cpp's gguf-split output (`shard_paths`). As there,
    the first shard holds all the metadata and every shard holds
    `split.no` (u16), `split.count` (u16) and `split.tensors.count` (i32).
    Tensor offsets are the ones the data would have (32-byte aligned), so the
    header is exactly what a full file's header would be.

    `version` 2 patches the version field: v2 and v3 headers are laid out
    identically for little-endian files.
    """
    if shards < 1 or shards > len(spec.tensors) or shards > 65535:
        raise ValueError(f"cannot split {len(spec.tensors)} tensors into {shards} shards")
    paths = shard_paths(path, shards)
    n = len(spec.tensors)
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        w = GGUFWriter(p, spec.architecture)
        if i == 0:
            for key, value in spec.metadata.items():
                v, vt, sub = _infer(value)
                w.add_key_value(key, v, vt, sub_type=sub)
        else:
            w.kv_data[0].clear()  # only split.* keys beyond the first shard, as gguf-split writes them
        if shards > 1:
            w.add_key_value("split.no", i, GGUFValueType.UINT16)
            w.add_key_value("split.count", shards, GGUFValueType.UINT16)
            w.add_key_value("split.tensors.count", n, GGUFValueType.INT32)
        for t in spec.tensors[i * n // shards:(i + 1) * n // shards]:
            gt = ggml_type_by_name(t.ggml_type)
            w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes,
                              raw_dtype=_quant_type(gt))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        if version != 3:
            with open(p, "r+b") as f:
                f.seek(4)
                f.write(int(version).to_bytes(4, "little"))
    return paths[0]


# --------------------------------------------------------------------------- specs


def _gpt2_tokenizer(vocab: int, merges: int) -> dict[str, Any]:
    """A BPE tokenizer's arrays at full length: what makes real headers big (129k tokens, 127k merges)."""
    md: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)],
                          "tokenizer.ggml.token_type": Typed([1] * vocab, "i32")}
    if merges:
        md["tokenizer.ggml.merges"] = [f"t{i} t{i + 1}" for i in range(merges)]
    return md


def llama_spec(*, n_layers: int = 32, hidden: int = 4096, heads: int = 32, kv_heads: int = 8, ffn: int = 14336,
               vocab: int = 128256, ctx: int = 131072, weight_type: str = "F16", embd_type: str | None = None,
               output_type: str | None = None, layer_types: Mapping[str, str] | None = None,
               file_type: str | None = None, name: str = "", tokenizer: bool = False,
               tied_embeddings: bool = False) -> GgufSpec:
    """A llama-architecture model as llama.cpp's converter writes it (defaults: Llama-3.1-8B shape).

    `layer_types` overrides the type of one per-layer tensor role
    ({"attn_v": "Q6_K"}); `tokenizer=True` adds full-length tokenizer arrays
    (slower to write, closer to a real header).
    """
    head_dim = hidden // heads
    embd_type = embd_type or weight_type
    output_type = output_type or weight_type
    lt = dict(layer_types or {})
    md: dict[str, Any] = {
        "general.name": name or f"llama-{n_layers}L-{hidden}",
        "general.file_type": FILE_TYPE_IDS[file_type or weight_type.upper()],
        "general.quantization_version": 2,
        "llama.context_length": ctx,
        "llama.embedding_length": hidden,
        "llama.block_count": n_layers,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": head_dim,
        "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": vocab,
    }
    if tokenizer:
        md.update(_gpt2_tokenizer(vocab, 0))
    tensors = [TensorSpec("token_embd.weight", (hidden, vocab), embd_type)]
    for i in range(n_layers):
        def t(role: str, shape: tuple[int, ...], default: str, i: int = i) -> TensorSpec:
            return TensorSpec(f"blk.{i}.{role}.weight", shape, lt.get(role, default))
        tensors += [
            t("attn_norm", (hidden,), "F32"),
            t("attn_q", (hidden, hidden), weight_type),
            t("attn_k", (hidden, kv_heads * head_dim), weight_type),
            t("attn_v", (hidden, kv_heads * head_dim), weight_type),
            t("attn_output", (hidden, hidden), weight_type),
            t("ffn_norm", (hidden,), "F32"),
            t("ffn_gate", (hidden, ffn), weight_type),
            t("ffn_up", (hidden, ffn), weight_type),
            t("ffn_down", (ffn, hidden), weight_type),
        ]
    tensors.append(TensorSpec("output_norm.weight", (hidden,), "F32"))
    if not tied_embeddings:
        tensors.append(TensorSpec("output.weight", (hidden, vocab), output_type))
    return GgufSpec("llama", md, tuple(tensors))


def llama3_70b_q4_k_m_spec(*, tokenizer: bool = False) -> GgufSpec:
    """Meta-Llama-3-70B-Instruct quantized Q4_K_M, with llama.cpp's per-tensor type choices.

    Q4_K_M keeps attn_v and ffn_down at Q6_K on the first and last eighth of
    the layers and on every third layer between (`use_more_bits`), Q5_K
    elsewhere for the 70B's attn_v; token_embd Q4_K and output Q6_K. The
    published file is 42.5 GB; this spec's tensors add up to within 1 % of it.
    """
    n = 80
    spec = llama_spec(n_layers=n, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=128256, ctx=8192,
                      weight_type="Q4_K", embd_type="Q4_K", output_type="Q6_K", file_type="Q4_K_M",
                      name="Meta-Llama-3-70B-Instruct", tokenizer=tokenizer)

    def more_bits(i: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    tensors = []
    for t in spec.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down"):
            layer = int(parts[1])
            t = replace(t, ggml_type="Q6_K" if more_bits(layer) else ("Q5_K" if parts[2] == "attn_v" else "Q4_K"))
        tensors.append(t)
    return replace(spec, tensors=tuple(tensors), metadata={**spec.metadata, "llama.rope.freq_base": 500000.0})


def deepseek_r1_spec(*, weight_type: str = "BF16", tokenizer: bool = True, hidden: int = 7168, n_layers: int = 61,
                     heads: int = 128, vocab: int = 129280, ffn: int = 18432, expert_ffn: int = 2048,
                     experts: int = 256, experts_used: int = 8, dense: int = 3) -> GgufSpec:
    """DeepSeek-R1 (DeepSeek-V3 architecture, llama.cpp's `deepseek2`) with its real tensor list.

    61 layers: 3 dense, 58 MoE with 256 routed experts in fused
    `ffn_*_exps` tensors [in, out, 256] plus one shared expert; MLA attention
    (q_lora_rank 1536, kv_lora_rank 512, rope head dim 64). The multi-token
    prediction layer is left out, as llama.cpp's converter does. With
    tokenizer=True the header carries the full 129280-token vocabulary and
    127741 merges, which is what makes a real header several MB. The sizes
    outside MLA can be made smaller, for a file llama-server loads in a test.
    """
    q_lora, kv_lora, rope, nope, v_dim = 1536, 512, 64, 128, 128
    md: dict[str, Any] = {
        "general.name": "DeepSeek R1",
        "general.file_type": FILE_TYPE_IDS[weight_type.upper()],
        "general.quantization_version": 2,
        "deepseek2.block_count": n_layers,
        "deepseek2.context_length": 163840,
        "deepseek2.embedding_length": hidden,
        "deepseek2.feed_forward_length": ffn,
        "deepseek2.attention.head_count": heads,
        "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.key_length": kv_lora + rope,
        "deepseek2.attention.value_length": kv_lora,
        "deepseek2.attention.key_length_mla": nope + rope,
        "deepseek2.attention.value_length_mla": v_dim,
        "deepseek2.rope.freq_base": 10000.0,
        "deepseek2.attention.layer_norm_rms_epsilon": 1e-6,
        "deepseek2.expert_used_count": experts_used,
        "deepseek2.leading_dense_block_count": dense,
        "deepseek2.vocab_size": vocab,
        "deepseek2.attention.q_lora_rank": q_lora,
        "deepseek2.attention.kv_lora_rank": kv_lora,
        "deepseek2.expert_feed_forward_length": expert_ffn,
        "deepseek2.expert_count": experts,
        "deepseek2.expert_shared_count": 1,
        "deepseek2.expert_weights_scale": 2.5,
        "deepseek2.expert_weights_norm": True,
        "deepseek2.expert_gating_func": 2,
        "deepseek2.rope.dimension_count": rope,
        "deepseek2.rope.scaling.type": "yarn",
        "deepseek2.rope.scaling.factor": 40.0,
        "deepseek2.rope.scaling.original_context_length": 4096,
        "deepseek2.rope.scaling.yarn_log_multiplier": 0.1,
        "tokenizer.ggml.pre": "deepseek-v3",
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    if tokenizer:
        md.update(_gpt2_tokenizer(vocab, 127741))
    w = weight_type
    tensors = [TensorSpec("token_embd.weight", (hidden, vocab), w)]
    for i in range(n_layers):
        b = f"blk.{i}."
        tensors += [
            TensorSpec(b + "attn_norm.weight", (hidden,), "F32"),
            TensorSpec(b + "attn_q_a_norm.weight", (q_lora,), "F32"),
            TensorSpec(b + "attn_kv_a_norm.weight", (kv_lora,), "F32"),
            TensorSpec(b + "attn_q_a.weight", (hidden, q_lora), w),
            TensorSpec(b + "attn_q_b.weight", (q_lora, heads * (nope + rope)), w),
            TensorSpec(b + "attn_kv_a_mqa.weight", (hidden, kv_lora + rope), w),
            TensorSpec(b + "attn_k_b.weight", (nope, kv_lora, heads), w),
            TensorSpec(b + "attn_v_b.weight", (kv_lora, v_dim, heads), w),
            TensorSpec(b + "attn_output.weight", (heads * v_dim, hidden), w),
            TensorSpec(b + "ffn_norm.weight", (hidden,), "F32"),
        ]
        if i < dense:
            tensors += [
                TensorSpec(b + "ffn_gate.weight", (hidden, ffn), w),
                TensorSpec(b + "ffn_up.weight", (hidden, ffn), w),
                TensorSpec(b + "ffn_down.weight", (ffn, hidden), w),
            ]
        else:
            tensors += [
                TensorSpec(b + "ffn_gate_inp.weight", (hidden, experts), "F32"),
                TensorSpec(b + "exp_probs_b.bias", (experts,), "F32"),
                TensorSpec(b + "ffn_gate_exps.weight", (hidden, expert_ffn, experts), w),
                TensorSpec(b + "ffn_down_exps.weight", (expert_ffn, hidden, experts), w),
                TensorSpec(b + "ffn_up_exps.weight", (hidden, expert_ffn, experts), w),
                TensorSpec(b + "ffn_gate_shexp.weight", (hidden, expert_ffn), w),
                TensorSpec(b + "ffn_down_shexp.weight", (expert_ffn, hidden), w),
                TensorSpec(b + "ffn_up_shexp.weight", (hidden, expert_ffn), w),
            ]
    tensors += [TensorSpec("output_norm.weight", (hidden,), "F32"), TensorSpec("output.weight", (hidden, vocab), w)]
    return GgufSpec("deepseek2", md, tuple(tensors))


def uniform_spec(*, n_layers: int, layer_bytes: int, embd_bytes: int = 0, output_bytes: int = 0,
                 hidden: int = 8192, heads: int = 64, kv_heads: int = 8, vocab: int = 128256, ctx: int = 8192,
                 architecture: str = "llama", name: str = "") -> GgufSpec:
    """A model for placement tests whose every layer is exactly `layer_bytes` (e.g. 20 GiB).

    Each layer is an F32 attention norm plus one I8 blob tensor making up the
    rest, so the byte counts are exact; token_embd / output are I8 blobs of
    the given sizes (left out when 0). The metadata is a complete llama-style
    header (heads, kv heads, context, vocab), so inspection reports
    everything placement needs.
    """
    norm = hidden * 4
    if layer_bytes <= norm:
        raise ValueError(f"layer_bytes must exceed the {norm}-byte norm tensor")
    a = architecture
    md: dict[str, Any] = {
        "general.name": name or f"uniform-{n_layers}x{layer_bytes}",
        "general.file_type": FILE_TYPE_IDS["F16"],
        f"{a}.context_length": ctx,
        f"{a}.embedding_length": hidden,
        f"{a}.block_count": n_layers,
        f"{a}.feed_forward_length": hidden * 4,
        f"{a}.attention.head_count": heads,
        f"{a}.attention.head_count_kv": kv_heads,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{a}.vocab_size": vocab,
    }

    def blob(name: str, nbytes: int) -> TensorSpec:
        shape = (hidden, nbytes // hidden) if nbytes % hidden == 0 else (nbytes,)
        return TensorSpec(name, shape, "I8")

    tensors = [blob("token_embd.weight", embd_bytes)] if embd_bytes else []
    for i in range(n_layers):
        tensors += [TensorSpec(f"blk.{i}.attn_norm.weight", (hidden,), "F32"),
                    blob(f"blk.{i}.ffn_up.weight", layer_bytes - norm)]
    tensors.append(TensorSpec("output_norm.weight", (hidden,), "F32"))
    if output_bytes:
        tensors.append(blob("output.weight", output_bytes))
    return GgufSpec(a, md, tuple(tensors))


# --------------------------------------------------------------------------- a runnable model

_PIECES = (
    "▁", "e", "t", "a", "o", "i", "n", "s", "r", "h", "l", "d", "c", "u", "m", "f", "p", "g", "w", "y", "b",
    "v", "k", ".", ",", "▁t", "he", "▁a", "in", "er", "on", "re", "▁the", "▁s", "▁w", "▁o", "at", "en", "nd",
    "▁c", "is", "it", "es", "▁f", "▁b", "▁p", "or", "ing", "▁m", "▁and", "▁to", "▁of", "▁in", "▁is", "▁it",
    "▁hello", "▁world", "▁model", "▁answer", "▁Paris", "▁capital", "▁France",
)


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then pieces by score."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(_PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(_PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_PIECES)  # UNKNOWN, CONTROL, BYTE, NORMAL
    return tokens, scores, types


def write_tiny_llama_gguf(path: str | os.PathLike[str], *, n_layers: int = 4, hidden: int = 64, heads: int = 4,
                          kv_heads: int = 4, ffn: int = 128, ctx: int = 256, seed: int = 0,
                          dtype: str = "f32") -> Path:
    """Write a real llama model llama-server can serve (random weights, so it babbles); return `path`.

    `dtype` ("f32" or "f16") is the type of the 2-D weights; norms stay F32
    as llama.cpp expects. The vocabulary is SPM-style (3 specials + 256 byte
    tokens + a few dozen pieces), so any prompt tokenizes. llama-server
    reports n_layers + 1 offloadable layers (the output layer counts).
    Deterministic for a given `seed`.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must divide by heads, and heads by kv_heads")
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    wdt = np.float32 if dtype == "f32" else np.float16
    rng = np.random.default_rng(seed)
    tokens, scores, types = _spm_vocab()
    vocab = len(tokens)
    head_dim = hidden // heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    w = GGUFWriter(path, "llama")
    w.add_name(f"tiny-llama-{n_layers}L-{hidden}")
    w.add_file_type(0 if dtype == "f32" else 1)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(wdt)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", mat(vocab, hidden))
    for i in range(n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones(hidden))
        w.add_tensor(b + "attn_q.weight", mat(hidden, hidden))
        w.add_tensor(b + "attn_k.weight", mat(kv_heads * head_dim, hidden))
        w.add_tensor(b + "attn_v.weight", mat(kv_heads * head_dim, hidden))
        w.add_tensor(b + "attn_output.weight", mat(hidden, hidden))
        w.add_tensor(b + "ffn_norm.weight", ones(hidden))
        w.add_tensor(b + "ffn_gate.weight", mat(ffn, hidden))
        w.add_tensor(b + "ffn_up.weight", mat(ffn, hidden))
        w.add_tensor(b + "ffn_down.weight", mat(hidden, ffn))
    w.add_tensor("output_norm.weight", ones(hidden))
    w.add_tensor("output.weight", mat(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def iter_layer_names(spec: GgufSpec) -> Iterable[str]:
    """Names of the repeating-layer tensors, for tests that want to drop or retype some."""
    return (t.name for t in spec.tensors if t.name.startswith("blk."))


def retype(spec: GgufSpec, types: Mapping[str, str], *, names: Sequence[str] | None = None) -> GgufSpec:
    """A copy with tensors retyped by role suffix ({"ffn_down": "Q6_K"}), optionally only the named ones."""
    chosen = set(names) if names is not None else None
    out = []
    for t in spec.tensors:
        role = t.name.split(".")[-2] if t.name.count(".") >= 1 else t.name
        if role in types and (chosen is None or t.name in chosen):
            t = replace(t, ggml_type=types[role])
        out.append(t)
    return replace(spec, tensors=tuple(out))


def gib(x: float) -> int:
    """Bytes in x GiB, for specs like uniform_spec(layer_bytes=gib(20))."""
    return math.ceil(x * 1024**3)
