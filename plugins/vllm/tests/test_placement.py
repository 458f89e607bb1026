"""vLLM placement: its start-up rules on real model configs, its memory formula, and the GPUStack seed case.

Seed case (issue 4): 8 x A100-80GB, GPU 0 used 90% by another job. TP=7 breaks
"attention heads (128) must be divisible by tensor parallel size (7)", TP=8
needs the busy GPU; agentd must find a layout by itself or say exactly why not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from agentd_vllm.placement import agentd_constraints, estimate

from agentd.modelinfo import inspect_model
from agentd.placement import Sharded, place
from agentd.types import ClusterInventory, GpuPin
from tests.scenarios.build import GiB, assert_vllm_rules, builtin_plugins, cluster, gpu, host, model, spec

ROOT = Path(__file__).resolve().parents[3]
HF = ROOT / "tests" / "fixtures" / "hf"
MODELS = ROOT / "tests" / "scenarios" / "models"
SEED = ROOT / "examples" / "clusters" / "a100-one-busy-gpu.json"


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


def seed_cluster(busy: tuple[int, ...] = (0,)) -> ClusterInventory:
    data = json.loads(SEED.read_text())
    gpus = data["hosts"][0]["gpus"]
    for g in gpus:
        if g["index"] in busy and not g.get("processes"):
            g.update(memory_used=72 * GiB, processes=[{"pid": 4121 + g["index"], "memory_used": 72 * GiB}])
    return ClusterInventory.model_validate(data)


# --------------------------------------------------------------------------- rules vs vLLM, on real configs


def vllm_accepts(m, tp: int, pp: int) -> bool:
    """vLLM's checks, transcribed from its source rather than from our plugin.

    ModelConfig.verify_with_parallel_config: heads % TP, PP only for SupportsPP models.
    QKVParallelLinear: KV heads % TP when TP <= KV heads, else TP % KV heads.
    GPTQ/AWQ (and block FP8) linear methods: each rank's input slice holds whole groups.
    get_pp_indices: every stage gets at least one layer.
    """
    heads, kv = m.num_attention_heads, m.num_key_value_heads
    if heads % tp or ((kv % tp) if tp <= kv else (tp % kv)):
        return False
    if pp > 1 and (m.architecture in ("MllamaForConditionalGeneration", "Phi3SmallForCausalLM")
                   or pp > m.num_hidden_layers):
        return False
    q = m.quantization
    if q and q.group_size and q.method in ("gptq", "awq", "fp8"):
        for size in (m.intermediate_size, m.extra.get("moe_intermediate_size")):
            if size and (size % tp or (size // tp) % q.group_size):
                return False
    return True


# model -> TP sizes vLLM accepts among 1, 2, 3, 4, 6, 7, 8, 16, 32 (derived by hand from the rules above)
TP_TABLE = {
    "Llama-3.1-8B-Instruct": {1, 2, 4, 8, 16, 32},  # 32 heads, 8 KV heads: TP=16, 32 replicate KV heads
    "Llama-3.1-70B-Instruct": {1, 2, 4, 8, 16, 32},  # 64 / 8
    "Llama-3.1-405B-Instruct": {1, 2, 4, 8, 16, 32},  # 128 / 8
    "Qwen2.5-7B-Instruct": {1, 2, 4},  # 28 / 4: TP=7 divides the heads but not the 4 KV heads
    "Qwen2.5-72B-Instruct": {1, 2, 4, 8, 16, 32},  # 64 / 8
    "Qwen2-VL-7B-Instruct": {1, 2, 4},  # 28 / 4
    "Mixtral-8x7B-Instruct-v0.1": {1, 2, 4, 8, 16, 32},  # 32 / 8
    "DeepSeek-R1": {1, 2, 4, 8, 16},  # 128 / 128 (MLA); FP8 blocks of 128: moe_intermediate 2048 / 32 = 64
    "Meta-Llama-3.1-8B-Instruct-GPTQ-INT4": {1, 2, 4, 8, 16},  # 14336 / 16 = 896 = 7 x 128
    "Qwen2.5-7B-Instruct-AWQ": {1, 2, 4},  # 18944 / 4 = 4736 = 37 x 128
    "Qwen2.5-72B-Instruct-AWQ": {1},  # 29568 / 2 = 14784, not a multiple of 128: the famous TP=2/4 failure
    "Llama-3.2-11B-Vision-Instruct": {1, 2, 4, 8, 16, 32},
    "llava-1.5-7b-hf": {1, 2, 4, 8, 16, 32},  # 32 / 32
}
TPS = (1, 2, 3, 4, 6, 7, 8, 16, 32)


def _model(name: str):
    return inspect_model(MODELS / name if (MODELS / name).is_dir() else HF / name)


def _accepted(m, tp: int, pp: int = 1) -> bool:
    shape = Sharded(tp, pp)
    for c in agentd_constraints(runtime="vllm", model=m, spec=spec()):
        if getattr(type(c), "check_shape", None) and c.check_shape(shape) is not None:
            return False
    return True


@pytest.mark.parametrize("name", sorted(TP_TABLE))
def test_tensor_parallel_sizes_match_vllm(name):
    m = _model(name)
    ours = {tp for tp in TPS if _accepted(m, tp)}
    assert ours == TP_TABLE[name]
    assert ours == {tp for tp in TPS if vllm_accepts(m, tp, 1)}


@pytest.mark.parametrize("name", sorted(TP_TABLE))
def test_pipeline_parallel_sizes_match_vllm(name):
    m = _model(name)
    for tp in (1, 2):
        for pp in (2, 3, 7, m.num_hidden_layers, m.num_hidden_layers + 1):
            assert _accepted(m, tp, pp) == vllm_accepts(m, tp, pp), (tp, pp)


def test_max_model_len_beyond_the_models_is_refused(plugins):
    m = _model("Qwen2.5-7B-Instruct")
    plan = place(cluster(host("a", 1)), m, spec(ctx=65536, name="q"), plugins=plugins)
    assert plan.diagnosis.message == ("0/1 hosts can run q (vllm): 1 request asks for a longer max_model_len than the "
                                      "model supports (65536 tokens, the model's context length is 32768)")
    assert plan.diagnosis.reasons[0].details["fixes"] == ["use --ctx-size 32768 or less"]


def test_bf16_needs_compute_capability_8(plugins):
    m = _model("Llama-3.1-8B-Instruct")
    c = cluster(host("t4", 2, 16, cc="7.5"), host("l4", 1, 24, cc="8.9"))
    plan = place(c, m, spec(ctx=8192), plugins=plugins)
    assert plan.replicas[0].parts[0].host == "l4"
    refused = place(cluster(host("t4", 4, 16, cc="7.5")), m, spec(ctx=8192, name="l"), plugins=plugins)
    assert "4 GPUs cannot run bfloat16 weights (compute capability below 8.0)" in refused.diagnosis.message


# --------------------------------------------------------------------------- memory


def test_memory_per_gpu_follows_the_documented_formula():
    m = _model("Llama-3.1-70B-Instruct")
    d = estimate(m, spec(), Sharded(4, 1))
    weights = math.ceil((sum(m.layer_bytes) + sum(m.non_repeating_bytes.values())) / 4)
    # 2 of 8 KV heads per rank, bf16, full context in 16-token blocks, plus vLLM's null block
    kv = math.ceil((1024 + 1024) * 2 * (2 / 8) * 80 * 16 * (131072 // 16 + 1))
    activation = 2048 * (4 * 8192 + 2 * 28672 // 4) * 2 + 256 * 128256 * 4
    overhead = (1024 + 256) * 1024**2
    assert dict(d.breakdown) == {"weights": weights, "kv_cache": kv, "activation": activation, "overhead": overhead}
    assert d.per_gpu == weights + kv + activation + overhead
    assert d.budget_fraction == 0.9 and d.stage_layers == (80,)


def test_pipeline_stages_split_like_vllm_and_the_largest_stage_sizes_the_gpu():
    m = model(layers=7, layer_bytes=GiB, embed=2 * GiB, output=3 * GiB, ctx=1024)
    d = estimate(m, spec(), Sharded(1, 3))
    assert d.stage_layers == (2, 3, 2)  # vLLM's get_pp_indices: the remainder goes before the last stage
    assert d.breakdown["weights"] == 2 * GiB + 3 * GiB + m.hidden_size * 2  # last stage: 2 layers + LM head + norm


def test_mla_kv_cache_is_replicated_on_every_tp_rank():
    m = _model("DeepSeek-R1")
    one, eight = estimate(m, spec(), Sharded(1)), estimate(m, spec(), Sharded(8))
    assert one.breakdown["kv_cache"] == eight.breakdown["kv_cache"] == 576 * 2 * 61 * 16 * (163840 // 16 + 1)


def test_gpus_below_the_utilization_are_excluded_counting_only_foreign_memory(plugins):
    m = model(layers=8, layer_bytes=GiB, ctx=2048)
    foreign = gpu(0, 80, used_gib=10)
    mine = gpu(0, 80, owned_gib=30, uuid="GPU-mine")  # an agentd instance being replaced: not counted
    assert not place(cluster(host("a", gpus=[foreign])), m, spec(), plugins=plugins).placed
    assert place(cluster(host("a", gpus=[foreign])), m, spec(util=0.85), plugins=plugins).placed
    assert place(cluster(host("a", gpus=[mine])), m, spec(), plugins=plugins).placed


# --------------------------------------------------------------------------- the seed scenario


def test_seed_awq_405b_takes_tp4_on_the_four_free_gpus(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    s = spec(name="llama-405b")
    plan = place(seed_cluster(), m, s, plugins=plugins)
    rp = plan.replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (4, 1)
    assert rp.parts[0].host == "gpu-node-1" and rp.parts[0].gpus == (1, 2, 3, 4) and rp.parts[0].role == "main"
    assert rp.parts[0].layers == 126 and rp.parts[0].env == {"CUDA_VISIBLE_DEVICES": "1,2,3,4"}
    assert rp.args == ("--tensor-parallel-size", "4", "--pipeline-parallel-size", "1",
                       "--gpu-memory-utilization", "0.9", "--max-model-len", "131072")
    assert_vllm_rules(plan, m, s, seed_cluster())


def test_seed_fp8_405b_runs_seven_pipeline_stages_when_tp_cannot(plugins):
    m = _model("Llama-3.1-405B-Instruct-FP8")  # 382 GiB: 4 GPUs are too few, TP=7 breaks the heads rule
    plan = place(seed_cluster(), m, spec(), plugins=plugins)
    rp = plan.replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (1, 7) and rp.parts[0].gpus == (1, 2, 3, 4, 5, 6, 7)
    assert_vllm_rules(plan, m, spec(), seed_cluster())


def test_seed_with_two_busy_gpus_explains_and_suggests(plugins):
    m = _model("Llama-3.1-405B-Instruct-FP8")
    plan = place(seed_cluster(busy=(0, 5)), m, spec(name="llama-405b"), plugins=plugins)
    d = plan.diagnosis
    assert not plan.placed
    assert d.message.startswith("0/1 hosts can run llama-405b (vllm): ")
    assert "2 GPUs had less free memory than gpu_memory_utilization requires" in d.message
    assert "attention heads not divisible by the tensor parallel size (128 attention heads: TP=6, TP=3 PP=2, TP=7)" in (
        d.message)
    assert "free GPU 0 on gpu-node-1 (72.0 GiB used by pid 4121)" in d.suggestions
    assert "free GPU 5 on gpu-node-1 (72.0 GiB used by pid 4126)" in d.suggestions
    ctx = next(s for s in d.suggestions if s.startswith("reduce the context to "))
    n = int(ctx.split()[4])
    assert place(seed_cluster(busy=(0, 5)), m, spec(ctx=n), plugins=plugins).placed


def test_seed_pinned_to_all_eight_gpus_is_refused_with_the_reason(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    s = spec(name="llama-405b", pin=(GpuPin(host="gpu-node-1", gpus=tuple(range(8))),))
    plan = place(seed_cluster(), m, s, plugins=plugins)
    d = plan.diagnosis
    assert d.message == (
        "0/1 hosts can run llama-405b (vllm): 1 GPU had less free memory than gpu_memory_utilization requires "
        "(needs 72.0 GiB (gpu_memory_utilization 0.9 x 80.0 GiB), has 8.0 GiB: 72.0 GiB used by pid 4121)")
    assert d.suggestions[0] == "free GPU 0 on gpu-node-1 (72.0 GiB used by pid 4121)"
    assert "use 4 GPUs: TP=4 (TP=4 on gpu-node-1 GPUs 1-4)" in d.suggestions


def test_seed_pinned_to_the_seven_free_gpus_uses_exactly_them(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    s = spec(pin=(GpuPin(host="gpu-node-1", gpus=(1, 2, 3, 4, 5, 6, 7)),))
    rp = place(seed_cluster(), m, s, plugins=plugins).replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (1, 7)  # TP=7 is invalid; seven stages are not


def test_multi_host_runs_one_stage_per_host_through_ray(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    c = cluster(host("n1", 2), host("n2", 2), host("n3", 2, used={1: 50}))
    s = spec(name="big")
    plan = place(c, m, s, plugins=plugins)
    rp = plan.replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (2, 2)
    assert [(p.host, p.role, p.gpus, p.layers) for p in rp.parts] == [("n1", "main", (0, 1), 63),
                                                                      ("n2", "worker", (0, 1), 63)]
    assert rp.args[-2:] == ("--distributed-executor-backend", "ray")
    assert_vllm_rules(plan, m, s, c)


COUNT_MODELS = ("Llama-3.1-8B-Instruct", "Qwen2.5-7B-Instruct", "Qwen2.5-72B-Instruct-AWQ",
                "Mixtral-8x7B-Instruct-v0.1", "Llama-3.2-11B-Vision-Instruct", "DeepSeek-R1")


@pytest.mark.parametrize("name", COUNT_MODELS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_gpu_counts_give_a_layout_vllm_accepts_or_none(plugins, name, n):
    """Pin n GPUs of an idle 8 x 80 GiB host: the layout must be one vLLM accepts, the preferred one that fits."""
    m = _model(name)
    s = spec(ctx=4096, pin=(GpuPin(host="a", gpus=tuple(range(n))),))
    plan = place(cluster(host("a", 8)), m, s, plugins=plugins)
    fitting = [(tp, n // tp) for tp in range(n, 0, -1) if n % tp == 0 and vllm_accepts(m, tp, n // tp)
               and estimate(m, s, Sharded(tp, n // tp)).per_gpu <= int(0.9 * 80 * GiB)]
    if not fitting:
        assert not plan.placed
        return
    rp = plan.replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == fitting[0]
    assert rp.parts[0].gpus == tuple(range(n))
