"""vLLM's KV-cache arithmetic for one worker, as vLLM itself does it (vllm 0.32, `vllm/v1`).

agentd books the KV cache of one request of `max_model_len` tokens per GPU
(vLLM refuses to start when it does not fit: `check_enough_kv_cache_memory`).
vLLM sizes it from per-layer specs (`kv_cache_interface.py`) grouped by
`kv_cache_utils.get_kv_cache_groups`; this module mirrors that, and
`agentd/testing/vllm_oracle.py` checks it against vLLM's own code (issue 17):

* a page is `block_size` (16) tokens of one layer: K and V of the rank's KV
  heads (`max(1, kv_heads // TP)`, replicated when TP > kv_heads), or MLA's one
  latent vector per token (`kv_lora_rank + qk_rope_head_dim`, every rank);
* the element is the model dtype (float32 models run in 16 bits: vLLM
  downcasts them), or one byte for an FP8 KV cache the checkpoint declares
  (compressed-tensors `kv_cache_scheme`, ModelOpt `kv_cache_quant_algo`);
* a full-attention layer holds `cdiv(len, 16)` pages; a sliding-window layer
  `cdiv(min(window - 1 + in_flight, len), 16) + 1`, where `in_flight` is the
  tokens of the batches in flight (`VllmConfig.max_in_flight_tokens`:
  `--max-num-batched-tokens`, which agentd pins for such models, times
  pipeline stages + 1 under asynchronous scheduling);
* layers of different kinds (Gemma 2/3) go into groups of equal size: the
  smaller count, or the larger one when it is under 1.5x the smaller; each
  kind is padded up to whole groups (`_get_kv_cache_groups_uniform_page_size`),
  and the pool keeps one block of the widest group back (the null block).

Which layers slide is what transformers' config classes (as vLLM reads them)
say: `layer_types` when the config lists them; Gemma 2 every other layer,
Gemma 3 all but every `sliding_window_pattern`-th (6); Qwen2/3 with
`use_sliding_window` the layers from `max_window_layers` on; any other model
with a `sliding_window` slides in every layer (vLLM's model-wide window).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from agentd.types import ModelInfo

BLOCK_SIZE = 16  # CacheConfig.block_size's default, FlashAttention's kernel block
MAX_NUM_BATCHED_TOKENS = 2048  # pinned (--max-num-batched-tokens) for models with sliding windows
DEFAULT_WINDOW = {"gemma2": 4096, "gemma3": 4096, "gemma3_text": 4096}
GEMMA3_PATTERN = 6
_QWEN_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _model_window(model: ModelInfo) -> int | None:
    """The model's sliding window, or None when no layer slides (the common case returns after two lookups:
    placement estimates hundreds of shapes)."""
    extra = model.extra
    mt = extra.get("model_type")
    w = extra.get("sliding_window")
    if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
        w = DEFAULT_WINDOW.get(mt) if isinstance(mt, str) else None
        if w is None:
            return None
    if model.kv_cache.kind == "mla":
        return None
    use = extra.get("use_sliding_window")
    if use is False or (mt in _QWEN_TYPES and not use):
        return None
    return w


def sliding_layers(model: ModelInfo) -> tuple[int | None, ...]:
    """The sliding window of each layer (None: full attention), as vLLM builds its attention layers."""
    n = model.num_hidden_layers
    mt = str(model.extra.get("model_type", ""))
    window = _model_window(model)
    if window is None:
        return (None,) * n
    types = model.extra.get("layer_types")
    if isinstance(types, (list, tuple)) and len(types) >= n:
        return tuple(window if types[i] == "sliding_attention" else None for i in range(n))
    if mt == "gemma2":
        return tuple(window if (i + 1) % 2 else None for i in range(n))
    if mt in ("gemma3", "gemma3_text"):
        p = model.extra.get("sliding_window_pattern")
        p = p if isinstance(p, int) and not isinstance(p, bool) and p > 0 else GEMMA3_PATTERN
        return tuple(window if (i + 1) % p else None for i in range(n))
    if mt in _QWEN_TYPES:
        first = model.extra.get("max_window_layers")
        first = first if isinstance(first, int) and not isinstance(first, bool) else 0
        return tuple(window if i >= first else None for i in range(n))
    return (window,) * n


def has_sliding_window(model: ModelInfo) -> bool:
    return _model_window(model) is not None and any(w is not None for w in sliding_layers(model))


def element_bytes(model: ModelInfo) -> int:
    return 1 if model.extra.get("kv_cache_dtype") == "fp8" else 2


def page_bytes(model: ModelInfo, tp: int) -> int:
    """One layer's page (BLOCK_SIZE tokens) on one GPU of a TP group."""
    kv = model.kv_cache
    elem = element_bytes(model)
    if kv.kind == "mla":
        return BLOCK_SIZE * kv.k_elements * elem
    heads = model.num_key_value_heads
    per_head = (kv.k_elements + kv.v_elements) // heads
    return BLOCK_SIZE * max(1, heads // tp) * per_head * elem


def in_flight_tokens(pp: int) -> int:
    """Tokens scheduled but not yet freed: one batch per concurrent step (async: stages + 1)."""
    return (pp + 1) * MAX_NUM_BATCHED_TOKENS


def _pages(window: int | None, length: int, in_flight: int) -> int:
    if window is None:
        return _cdiv(length, BLOCK_SIZE)
    return _cdiv(min(window - 1 + in_flight, length), BLOCK_SIZE) + 1


def stage_kv_bytes(windows: Sequence[int | None], page: int, length: int, in_flight: int) -> int:
    """One request of `length` tokens on one worker holding the layers whose windows are given, plus the
    null block: vLLM's `_max_memory_usage_bytes_from_groups` + `_pool_bytes_per_block`."""
    if not windows:
        return 0
    counts = Counter(windows)
    if len(counts) == 1:
        (window, n), = counts.items()
        return n * page * (_pages(window, length, in_flight) + 1)
    lo, hi = min(counts.values()), max(counts.values())
    group = hi if hi < lo * 1.5 else lo
    blocks = sum(_cdiv(n, group) * _pages(w, length, in_flight) for w, n in counts.items())
    return group * page * (blocks + 1)


def stage_windows(model: ModelInfo, stages: Sequence[int]) -> list[tuple[int | None, ...]]:
    per_layer = sliding_layers(model)
    out, start = [], 0
    for n in stages:
        out.append(per_layer[start:start + n])
        start += n
    return out


def kv_bytes(model: ModelInfo, tp: int, stages: Sequence[int], length: int) -> int:
    """The KV cache of the heaviest pipeline stage's worker for one request of `length` tokens."""
    page = page_bytes(model, tp)
    if _model_window(model) is None:  # every layer full attention: one group (placement's hot path)
        return max(stages) * page * (_cdiv(length, BLOCK_SIZE) + 1)
    flight = in_flight_tokens(len(stages))
    return max(stage_kv_bytes(w, page, length, flight) for w in stage_windows(model, stages))


def max_model_len(model: ModelInfo, tp: int, stages: Sequence[int], budget: int, limit: int) -> int:
    """The largest max_model_len (at most `limit`) whose KV cache fits `budget` bytes on every stage's
    worker; 0 when not even one token fits (vLLM's `_estimate_max_model_len_from_groups`)."""
    page = page_bytes(model, tp)
    flight = in_flight_tokens(len(stages))
    windows = stage_windows(model, stages)

    def fits(n: int) -> bool:
        return all(stage_kv_bytes(w, page, n, flight) <= budget for w in windows)

    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:  # the largest n with fits(n): fits is monotone in n
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
