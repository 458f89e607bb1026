"""Real model shapes as GGUF specs, and full-size sparse GGUF files of them.

llama.cpp's `llama-fit-params` projects a model's memory per device without
reading a weight, but it does check every tensor's offset against the file
size. So a real header followed by a hole of the right size (made with
`truncate`: no disk blocks) loads as the real model would: a 1.3 TB
DeepSeek-R1 costs a few MB of disk. The shapes below are the published
configurations (config.json of each model, as llama.cpp's converter writes
them); the vocabulary is declared by `<arch>.vocab_size` with a `none`
tokenizer, which sizes token_embd, output and the logits exactly as a real
tokenizer of that length would, without writing 150k token strings.

Used by the llama.cpp oracle (tests/test_llamacpp_oracle.py,
benchmarks/llamacpp_oracle.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agentd.modelinfo.ggml_types import FILE_TYPE_IDS
from agentd.testing.gguf import (
    GgufSpec,
    TensorSpec,
    deepseek_r1_spec,
    llama3_70b_q4_k_m_spec,
    llama_spec,
    retype,
    write_header_only_gguf,
)

ALIGNMENT = 32  # general.alignment's default: each tensor's data starts on it


def _no_tokenizer(spec: GgufSpec) -> GgufSpec:
    md = {k: v for k, v in spec.metadata.items() if not k.startswith("tokenizer.")}
    md["tokenizer.ggml.model"] = "none"
    return replace(spec, metadata=md)


def llama31_8b() -> GgufSpec:
    """Meta-Llama-3.1-8B-Instruct, F16."""
    return _no_tokenizer(llama_spec(name="Llama-3.1-8B-Instruct"))


def llama31_70b_q4_k_m() -> GgufSpec:
    """Meta-Llama-3.1-70B-Instruct Q4_K_M (llama.cpp's per-tensor types), 128k context."""
    spec = llama3_70b_q4_k_m_spec()
    return _no_tokenizer(spec.with_metadata(llama__context_length=131072, **{"general.name": "Llama-3.1-70B"}))


def _qwen2(name: str, n_layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, w: str,
           tied: bool) -> GgufSpec:
    head_dim = hidden // heads
    md: dict[str, Any] = {
        "general.name": name, "general.file_type": FILE_TYPE_IDS[w], "general.quantization_version": 2,
        "qwen2.context_length": 32768, "qwen2.embedding_length": hidden, "qwen2.block_count": n_layers,
        "qwen2.feed_forward_length": ffn, "qwen2.attention.head_count": heads,
        "qwen2.attention.head_count_kv": kv_heads, "qwen2.rope.freq_base": 1000000.0,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6, "qwen2.vocab_size": vocab,
        "tokenizer.ggml.model": "none",
    }
    kv = kv_heads * head_dim
    tensors = [TensorSpec("token_embd.weight", (hidden, vocab), w)]
    for i in range(n_layers):
        b = f"blk.{i}."
        tensors += [
            TensorSpec(b + "attn_norm.weight", (hidden,), "F32"),
            TensorSpec(b + "attn_q.weight", (hidden, hidden), w), TensorSpec(b + "attn_q.bias", (hidden,), "F32"),
            TensorSpec(b + "attn_k.weight", (hidden, kv), w), TensorSpec(b + "attn_k.bias", (kv,), "F32"),
            TensorSpec(b + "attn_v.weight", (hidden, kv), w), TensorSpec(b + "attn_v.bias", (kv,), "F32"),
            TensorSpec(b + "attn_output.weight", (hidden, hidden), w),
            TensorSpec(b + "ffn_norm.weight", (hidden,), "F32"),
            TensorSpec(b + "ffn_gate.weight", (hidden, ffn), w),
            TensorSpec(b + "ffn_up.weight", (hidden, ffn), w),
            TensorSpec(b + "ffn_down.weight", (ffn, hidden), w),
        ]
    tensors.append(TensorSpec("output_norm.weight", (hidden,), "F32"))
    if not tied:
        tensors.append(TensorSpec("output.weight", (hidden, vocab), w))
    return GgufSpec("qwen2", md, tuple(tensors))


def qwen25_7b() -> GgufSpec:
    """Qwen2.5-7B-Instruct, Q8_0 (qkv biases, an untied output)."""
    return _qwen2("Qwen2.5-7B-Instruct", 28, 3584, 28, 4, 18944, 152064, "Q8_0", tied=False)


def qwen25_72b() -> GgufSpec:
    """Qwen2.5-72B-Instruct, Q8_0."""
    return _qwen2("Qwen2.5-72B-Instruct", 80, 8192, 64, 8, 29568, 152064, "Q8_0", tied=False)


def qwen25_3b() -> GgufSpec:
    """Qwen2.5-3B-Instruct, F16: a tied output (no output.weight; llama.cpp reuses token_embd)."""
    return _qwen2("Qwen2.5-3B-Instruct", 36, 2048, 16, 2, 11008, 151936, "F16", tied=True)


def gemma3_27b() -> GgufSpec:
    """Gemma-3-27B-it, Q8_0: 5 sliding-window layers (window 1024) to 1 global, a tied output."""
    n_layers, hidden, heads, kv_heads, head_dim, ffn, vocab, w = 62, 5376, 32, 16, 128, 21504, 262208, "Q8_0"
    md: dict[str, Any] = {
        "general.name": "Gemma-3-27B-it", "general.file_type": FILE_TYPE_IDS[w], "general.quantization_version": 2,
        "gemma3.context_length": 131072, "gemma3.embedding_length": hidden, "gemma3.block_count": n_layers,
        "gemma3.feed_forward_length": ffn, "gemma3.attention.head_count": heads,
        "gemma3.attention.head_count_kv": kv_heads, "gemma3.attention.key_length": head_dim,
        "gemma3.attention.value_length": head_dim, "gemma3.attention.sliding_window": 1024,
        "gemma3.rope.freq_base": 1000000.0, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.vocab_size": vocab, "tokenizer.ggml.model": "none",
    }
    q, kv = heads * head_dim, kv_heads * head_dim
    tensors = [TensorSpec("token_embd.weight", (hidden, vocab), w)]
    for i in range(n_layers):
        b = f"blk.{i}."
        tensors += [
            TensorSpec(b + "attn_norm.weight", (hidden,), "F32"),
            TensorSpec(b + "attn_q.weight", (hidden, q), w),
            TensorSpec(b + "attn_k.weight", (hidden, kv), w),
            TensorSpec(b + "attn_v.weight", (hidden, kv), w),
            TensorSpec(b + "attn_output.weight", (q, hidden), w),
            TensorSpec(b + "post_attention_norm.weight", (hidden,), "F32"),
            TensorSpec(b + "attn_k_norm.weight", (head_dim,), "F32"),
            TensorSpec(b + "attn_q_norm.weight", (head_dim,), "F32"),
            TensorSpec(b + "ffn_norm.weight", (hidden,), "F32"),
            TensorSpec(b + "ffn_gate.weight", (hidden, ffn), w),
            TensorSpec(b + "ffn_up.weight", (hidden, ffn), w),
            TensorSpec(b + "ffn_down.weight", (ffn, hidden), w),
            TensorSpec(b + "post_ffw_norm.weight", (hidden,), "F32"),
        ]
    tensors.append(TensorSpec("output_norm.weight", (hidden,), "F32"))
    return GgufSpec("gemma3", md, tuple(tensors))


def mixtral_8x7b() -> GgufSpec:
    """Mixtral-8x7B-Instruct-v0.1, Q4_K_M-like (Q4_K experts, Q6_K output): 8 experts, 2 per token."""
    n_layers, hidden, heads, kv_heads, ffn, vocab, experts = 32, 4096, 32, 8, 14336, 32000, 8
    base = llama_spec(n_layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, vocab=vocab,
                      ctx=32768, weight_type="Q4_K", output_type="Q6_K", file_type="Q4_K_M",
                      name="Mixtral-8x7B-Instruct")
    tensors = []
    for t in base.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            if parts[2] == "ffn_gate":
                b = f"blk.{parts[1]}."
                tensors += [TensorSpec(b + "ffn_gate_inp.weight", (hidden, experts), "F32"),
                            TensorSpec(b + "ffn_gate_exps.weight", (hidden, ffn, experts), "Q4_K"),
                            TensorSpec(b + "ffn_down_exps.weight", (ffn, hidden, experts), "Q6_K"),
                            TensorSpec(b + "ffn_up_exps.weight", (hidden, ffn, experts), "Q4_K")]
            continue
        tensors.append(t)
    md = {**base.metadata, "llama.expert_count": experts, "llama.expert_used_count": 2,
          "llama.rope.freq_base": 1000000.0}
    return _no_tokenizer(replace(base, metadata=md, tensors=tuple(tensors)))


def deepseek_r1_bf16() -> GgufSpec:
    """DeepSeek-R1 (671B, MLA + 256 experts, 3 dense layers), BF16: 1.3 TB."""
    return _no_tokenizer(deepseek_r1_spec(tokenizer=False))


def deepseek_r1_q4_k_m(**sizes: int) -> GgufSpec:
    """DeepSeek-R1 Q4_K_M-like: Q4_K matrices, Q6_K down projections and output, Q8_0 for the MLA k_b/v_b
    (their 128-wide rows do not fill a 256-element K-quant block), F32 norms and router. `sizes`: smaller
    dimensions than R1's (deepseek_r1_spec's keywords)."""
    spec = deepseek_r1_spec(tokenizer=False, **sizes)
    types = {}
    for t in spec.tensors:
        role = t.name.split(".")[-2]
        if t.ggml_type != "BF16":
            continue
        types[role] = ("Q8_0" if role in ("attn_k_b", "attn_v_b") else
                       "Q6_K" if role in ("ffn_down", "ffn_down_exps", "ffn_down_shexp", "output") else "Q4_K")
    spec = retype(spec, types)
    return _no_tokenizer(spec.with_metadata(**{"general.file_type": FILE_TYPE_IDS["Q4_K_M"]}))


SHAPES: dict[str, Callable[[], GgufSpec]] = {
    "llama-3.1-8b-f16": llama31_8b,
    "llama-3.1-70b-q4_k_m": llama31_70b_q4_k_m,
    "qwen2.5-3b-f16-tied": qwen25_3b,
    "qwen2.5-7b-q8_0": qwen25_7b,
    "qwen2.5-72b-q8_0": qwen25_72b,
    "gemma-3-27b-q8_0": gemma3_27b,
    "mixtral-8x7b-q4_k_m": mixtral_8x7b,
    "deepseek-r1-bf16": deepseek_r1_bf16,
    "deepseek-r1-q4_k_m": deepseek_r1_q4_k_m,
}


def data_bytes(spec: GgufSpec) -> int:
    """The tensor data section's size: each tensor padded to the alignment, as the writer lays them out."""
    return sum(-(-t.nbytes // ALIGNMENT) * ALIGNMENT for t in spec.tensors)


def write_sparse_gguf(path: str | os.PathLike[str], spec: GgufSpec) -> Path:
    """The real header, then a hole as large as the tensor data: a loadable full-size file on no disk."""
    p = write_header_only_gguf(path, spec)
    header = p.stat().st_size
    start = -(-header // ALIGNMENT) * ALIGNMENT
    os.truncate(p, start + data_bytes(spec))
    return p
