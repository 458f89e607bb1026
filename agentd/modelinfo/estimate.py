"""Parameter counts and bytes from a config alone, for when no weight file can be read.

Used in two ways: to size a model directory that holds only config.json (so a
deployment can be planned before the download), and to share a known total
(`metadata.total_size`) out over the layers in proportion to what each layer
holds, which for DeepSeek's 3 dense + 58 MoE layers is far from even.

The counts follow the decoder layouts of Llama, Qwen2, Mistral/Mixtral and
DeepSeek-V2/V3 (MLA + routed/shared experts); tests check them against the
published parameter counts (8.03B, 70.6B, 405.9B, 7.62B, 72.7B, 46.7B, 671B).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mla:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class Experts:
    num_experts: int
    experts_per_token: int
    intermediate: int  # per routed expert
    shared_experts: int = 0
    shared_intermediate: int = 0  # total width of the shared expert(s)
    moe_layers: frozenset[int] = frozenset()  # which layers are MoE; the others are dense
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    shared_gate: bool = False  # Qwen2-MoE's shared_expert_gate


@dataclass(frozen=True)
class TextShape:
    """The language model's shape, normalised from whichever config keys a family uses."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    head_dim: int
    intermediate_size: int | None
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    gated_mlp: bool = True
    mla: Mla | None = None
    experts: Experts | None = None


@dataclass(frozen=True)
class ParamCount:
    """Parameters by place: linear weights (quantizable) and the rest, per layer, plus non-repeating roles."""

    layers: tuple[tuple[int, int], ...]  # (linear, other) per layer
    token_embd: int
    output: int
    output_norm: int

    @property
    def total(self) -> int:
        return self.token_embd + self.output + self.output_norm + sum(a + b for a, b in self.layers)


def count_params(s: TextShape) -> ParamCount:
    h = s.hidden_size
    if s.mla:
        m = s.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            q_lin, q_other = h * m.q_lora_rank + m.q_lora_rank * s.num_heads * qk, m.q_lora_rank
        else:
            q_lin, q_other = h * s.num_heads * qk, 0
        attn_lin = (q_lin + h * (m.kv_lora_rank + m.qk_rope_head_dim)
                    + m.kv_lora_rank * s.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
                    + s.num_heads * m.v_head_dim * h)
        attn_other = q_other + m.kv_lora_rank
    else:
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        attn_lin = h * q + 2 * h * kv + q * h
        attn_other = (q + 2 * kv) if s.qkv_bias else 0
    mats = 3 if s.gated_mlp else 2
    dense = mats * h * (s.intermediate_size or 4 * h)
    layers = []
    e = s.experts
    for i in range(s.num_layers):
        lin, other = attn_lin, attn_other + 2 * h
        if e and i in e.moe_layers:
            lin += e.num_experts * mats * h * e.intermediate + mats * h * e.shared_intermediate
            other += h * e.num_experts + (e.num_experts if e.router_bias else 0) + (h if e.shared_gate else 0)
        else:
            lin += dense
        layers.append((lin, other))
    embd = s.vocab_size * h
    return ParamCount(layers=tuple(layers), token_embd=embd, output=0 if s.tie_embeddings else embd, output_norm=h)


@dataclass(frozen=True)
class Storage:
    """Bytes per parameter: linear weights may be quantized, the rest stays in the checkpoint dtype."""

    linear: float
    other: float


def estimate_bytes(p: ParamCount, st: Storage) -> tuple[tuple[int, ...], dict[str, int]]:
    """(bytes per layer, non-repeating bytes by role) for a parameter count stored as `st` says."""
    layers = tuple(round(lin * st.linear + other * st.other) for lin, other in p.layers)
    roles = {"token_embd": round(p.token_embd * st.other), "output": round(p.output * st.other),
             "output_norm": round(p.output_norm * st.other), "other": 0}
    return layers, roles


def spread(total: int, weights: tuple[int, ...]) -> tuple[int, ...]:
    """Share `total` over the layers in proportion to `weights`; the parts add up to `total` exactly."""
    if not weights:
        return ()
    wsum = sum(weights)
    if wsum <= 0:
        weights, wsum = (1,) * len(weights), len(weights)
    parts = [total * w // wsum for w in weights]
    for i in range(total - sum(parts)):
        parts[i % len(parts)] += 1
    return tuple(parts)


def vision_params(layers: int, hidden: int, intermediate: int) -> int:
    """A ViT encoder: attention (4 h^2) and MLP (2 h i) per layer, plus biases and norms."""
    return layers * (4 * hidden * hidden + 2 * hidden * intermediate + 9 * hidden + intermediate)
