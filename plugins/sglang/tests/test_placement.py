"""The SGLang plugin (plugins/sglang): its rules against SGLang's own, its memory booking, its launch lines.

The plugin is a separate distribution written against agentd.plugins.api only (tests/test_layering.py);
here it is loaded through its entry point like any third-party plugin. The seed scenario is issue 2's:
8 x A100-80GB with GPU 0 held by someone else's job, a 405B model with 128 attention heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from agentd_sglang import placement as sg
from agentd_sglang import process as sp

from agentd.modelinfo import inspect_model
from agentd.placement import Sharded, place
from agentd.plugins import PluginManager
from agentd.plugins.api import LaunchContext
from agentd.types import (
    Assignment,
    ClusterInventory,
    GpuPin,
    Part,
    PartEndpoint,
    ReplicaPlan,
    RuntimeOptions,
)
from tests.scenarios.build import GiB, MiB, booked, cluster, host, model, spec

ROOT = Path(__file__).resolve().parents[3]
HF = ROOT / "tests" / "fixtures" / "hf"
MODELS = ROOT / "tests" / "scenarios" / "models"
SEED = ROOT / "examples" / "clusters" / "a100-one-busy-gpu.json"


@pytest.fixture(scope="module")
def plugins():
    mgr = PluginManager.load(allow=["sglang"])
    assert [p.name for p in mgr.loaded] == ["sglang"] and mgr.failures == []
    return mgr


def _model(name: str):
    return inspect_model(MODELS / name if (MODELS / name).is_dir() else HF / name)


def seed_cluster(busy: tuple[int, ...] = (0,)) -> ClusterInventory:
    data = json.loads(SEED.read_text())
    for g in data["hosts"][0]["gpus"]:
        if g["index"] in busy and not g.get("processes"):
            g.update(memory_used=72 * GiB, processes=[{"pid": 4121 + g["index"], "memory_used": 72 * GiB}])
    return ClusterInventory.model_validate(data)


def sgl(**kw):
    return spec("sglang", **kw)


# --------------------------------------------------------------------------- rules vs SGLang, on real configs


def sglang_accepts(m, tp: int, pp: int) -> bool:
    """SGLang's checks, transcribed from its source (sglang 0.5.23) rather than from the plugin:
    QKVParallelLinear divides heads by TP and KV heads by TP (or TP by KV heads, replicating them);
    get_pp_indices gives each stage at least one layer; PP only for PPMissingLayer model classes."""
    heads, kv = m.num_attention_heads, m.num_key_value_heads
    if heads % tp or ((kv % tp) if tp <= kv else (tp % kv)):
        return False
    if not sglang_moe_check_passes(m, tp):
        return False
    return pp == 1 or (pp <= m.num_hidden_layers and m.architecture in (
        "LlamaForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM"))


def sglang_moe_check_passes(m, tp: int) -> bool:
    """check_quantized_moe_compatibility (srt/model_executor/model_runner_components/moe_ep_setup.py, 0.5.23),
    with the --ep-size agentd passes (TP where the experts divide, else none) and no --moe-dp-size."""
    block = (m.extra.get("quantization_config") or {}).get("weight_block_size")
    size = m.extra.get("moe_intermediate_size")
    if block is None or size is None:
        return True
    ep = tp if m.moe is not None and m.moe.num_experts % tp == 0 else 1
    moe_tp = tp // ep // 1
    return size % moe_tp == 0 and (size // moe_tp) % block[0] == 0


def _accepted(m, tp: int, pp: int = 1) -> bool:
    shape = Sharded(tp, pp)
    return all(c.check_shape(shape) is None for c in sg.agentd_constraints(runtime="sglang", model=m, spec=sgl()))


@pytest.mark.parametrize("name", ["Llama-3.1-8B-Instruct", "Llama-3.1-70B-Instruct", "Qwen2.5-7B-Instruct",
                                  "Qwen2.5-72B-Instruct", "Mixtral-8x7B-Instruct-v0.1", "DeepSeek-R1",
                                  "Llama-3.2-11B-Vision-Instruct"])
def test_tensor_and_pipeline_sizes_match_sglang(name):
    m = _model(name)
    for tp in (1, 2, 3, 4, 6, 7, 8, 16):
        assert _accepted(m, tp) == sglang_accepts(m, tp, 1), (name, tp)
    for pp in (2, 3, 5):
        assert _accepted(m, 1, pp) == sglang_accepts(m, 1, pp), (name, pp)


def test_context_beyond_the_models_is_refused(plugins):
    plan = place(cluster(host("a", 8)), model(ctx=8192), sgl(ctx=16384), plugins=plugins)
    assert not plan.placed
    assert "asks for a longer context than the model supports" in plan.diagnosis.message
    assert "reduce the context to 8192 tokens (--ctx-size 8192)" in plan.diagnosis.suggestions


# --------------------------------------------------------------------------- memory


def test_memory_per_gpu_follows_the_documented_formula():
    m = model(layers=32, layer_bytes=GiB, heads=32, kv_heads=8, ctx=8192)
    d = sg.estimate(m, sgl(), Sharded(4))
    weights = math.ceil((32 * GiB + 256 * MiB + 256 * MiB + 4096 * 2) / 4)
    kv = 8192 * 32 * (2 * 128 * 2 * 2)  # tokens x layers x (K+V x 2 heads/rank x 128 x bf16)
    reserve = int((512 + 8192 * 1.5 + 4 / 8 * 1024 + 256 * 2) * MiB)
    assert d.breakdown == {"weights": weights, "kv_cache": kv, "activation": reserve}
    assert d.per_gpu == weights + kv + reserve and d.budget_fraction == 1.0


def test_pipeline_stages_split_like_sglang_the_last_stages_take_the_remainder():
    assert sg.stage_layers(126, 4) == (31, 31, 32, 32)
    assert sg.stage_layers(61, 3) == (20, 20, 21)
    assert sum(sg.stage_layers(126, 7)) == 126


def test_a_gpu_goes_whole_to_sglang_and_is_booked_whole(plugins):
    # 5 GiB of someone else's on GPU 0 leaves 75 of 80 GiB free (>= 90%): usable; 20 GiB on GPU 1 is not.
    c = cluster(host("a", 2, used={0: 5, 1: 20}))
    m = model(layers=16, layer_bytes=GiB, ctx=4096)
    plan = place(c, m, sgl(), plugins=plugins)
    rp = plan.replicas[0]
    assert rp.parts[0].gpus == (0,)
    assert booked(plan) == {("a", 0): 80 * GiB}  # SGLang fills what it finds free: nothing is left to give
    d = place(cluster(host("a", 1, used={0: 20})), m, sgl(), plugins=plugins).diagnosis
    assert "1 GPU was not free enough for SGLang (it takes a GPU whole)" in d.message
    assert "free GPU 0 on a (20.0 GiB used by pid 4000)" in d.suggestions


def test_mem_fraction_static_keeps_the_reserve_outside_the_static_pool(plugins):
    m = model(layers=16, layer_bytes=GiB, ctx=4096)
    rp = place(cluster(host("a", 1)), m, sgl(), plugins=plugins).replicas[0]
    args = dict(zip(rp.args[::2], rp.args[1::2], strict=False))
    mfs = float(args["--mem-fraction-static"])
    reserve = sg.reserve_bytes(1, 1)
    free_at_start = 0.9 * 80 * GiB  # the least SGLang can find free on the GPU it was given
    assert (1 - mfs) * free_at_start >= reserve  # activations and CUDA graphs fit beside the pool
    d = sg.estimate(m, sgl(), Sharded(1))
    assert mfs * free_at_start >= d.breakdown["weights"] + d.breakdown["kv_cache"]  # the pool holds the model
    assert args["--chunked-prefill-size"] == "8192" and args["--max-running-requests"] == "256"  # what R assumed
    assert args["--context-length"] == "4096"


def test_a_users_mem_fraction_static_is_pinned_and_checked(plugins):
    m = model(layers=20, layer_bytes=2 * GiB, ctx=4096)  # 40.5 GiB of weights on one 80 GiB GPU
    rp = place(cluster(host("a", 1)), m, sgl(util=0.95), plugins=plugins).replicas[0]
    assert rp.args[rp.args.index("--mem-fraction-static") + 1] == "0.95"
    plan = place(cluster(host("a", 1)), m, sgl(util=0.5), plugins=plugins)
    assert not plan.placed
    assert "did not fit: weights and KV cache exceed mem_fraction_static" in plan.diagnosis.message


# --------------------------------------------------------------------------- the seed scenario


def test_seed_awq_405b_takes_tp4_on_four_free_gpus_with_a_shorter_context(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    plan = place(seed_cluster(), m, sgl(name="llama-405b", ctx=32768), plugins=plugins)
    rp = plan.replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (4, 1)
    assert rp.parts[0].host == "gpu-node-1" and rp.parts[0].gpus == (1, 2, 3, 4)
    assert rp.parts[0].env == {"CUDA_VISIBLE_DEVICES": "1,2,3,4"}
    assert rp.args[:4] == ("--tp-size", "4", "--pp-size", "1")


def test_seed_awq_405b_at_full_context_takes_five_stages_since_tp5_breaks_the_heads(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")  # 128K tokens of KV no longer fit 4 GPUs beside SGLang's reserve
    rp = place(seed_cluster(), m, sgl(), plugins=plugins).replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (1, 5) and rp.parts[0].gpus == (1, 2, 3, 4, 5)
    assert sglang_accepts(m, 1, 5) and not sglang_accepts(m, 5, 1)


def test_seed_fp8_405b_explains_heads_memory_and_the_busy_gpu(plugins):
    m = _model("Llama-3.1-405B-Instruct-FP8")
    plan = place(seed_cluster(), m, sgl(name="llama-405b"), plugins=plugins)
    d = plan.diagnosis
    assert not plan.placed
    assert d.message.startswith("0/1 hosts can run llama-405b (sglang): ")
    assert "attention heads not divisible by the tensor parallel size (128 attention heads: TP=6, TP=3 PP=2, TP=7)" \
        in d.message
    assert "1 GPU was not free enough for SGLang (it takes a GPU whole)" in d.message
    assert "free GPU 0 on gpu-node-1 (72.0 GiB used by pid 4121)" in d.suggestions
    ctx = next(s for s in d.suggestions if s.startswith("reduce the context to "))
    assert place(seed_cluster(), m, sgl(ctx=int(ctx.split()[4])), plugins=plugins).placed


def test_seed_pinned_to_all_eight_gpus_is_refused_naming_the_busy_one(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    s = sgl(name="llama-405b", pin=(GpuPin(host="gpu-node-1", gpus=tuple(range(8))),))
    d = place(seed_cluster(), m, s, plugins=plugins).diagnosis
    assert "was not free enough for SGLang" in d.message
    assert d.suggestions[0] == "free GPU 0 on gpu-node-1 (72.0 GiB used by pid 4121)"


def test_moe_gets_expert_parallel_where_the_experts_divide(plugins):
    m = _model("Mixtral-8x7B-Instruct-v0.1")  # 8 experts
    rp = place(seed_cluster(), m, sgl(ctx=8192), plugins=plugins).replicas[0]
    assert "--ep-size" in rp.args and rp.args[rp.args.index("--ep-size") + 1] == str(rp.tensor_parallel)
    assert sg.expert_parallel(m, 8) == 8 and sg.expert_parallel(m, 3) == 1
    assert sg.expert_parallel(_model("Llama-3.1-8B-Instruct"), 4) == 1  # dense: no EP


def fp8_block_moe(arch: str = "Qwen2MoeForCausalLM", moe_intermediate_size: int = 1408, experts: int = 60,
                  block: int = 128, **kw):
    """Qwen1.5-MoE-A2.7B's shape (16 heads, 60 experts of intermediate size 1408) with DeepSeek-V3's FP8 blocks."""
    from agentd.types import MoE, Quantization

    kw.setdefault("layers", 24)
    return model(heads=16, kv_heads=16, hidden=2048, arch=arch, quant=Quantization(method="fp8", bits=8),
                 **kw).model_copy(update={
        "moe": MoE(num_experts=experts, experts_per_token=4),
        "extra": {"moe_intermediate_size": moe_intermediate_size,
                  "quantization_config": {"quant_method": "fp8", "weight_block_size": [block, block]}}})


def test_block_quantized_moe_experts_must_split_into_whole_blocks_like_sglang():
    m = fp8_block_moe()
    for tp in (1, 2, 3, 4, 6, 8, 16):
        assert _accepted(m, tp) == sglang_accepts(m, tp, 1), tp
    # TP=4: 60 experts divide, EP=4, each rank holds whole experts. TP=8: they do not, so every expert is split
    # over 8 ranks: 1408 / 8 = 176 is not a multiple of 128, and SGLang refuses to start.
    assert _accepted(m, 4) and not _accepted(m, 8)
    r = sg.moe_block_alignment(m).check_shape(Sharded(8))
    assert r.reason == "rejected: the MoE experts' quantization blocks do not divide over the tensor parallel ranks"
    assert r.detail == ("moe_intermediate_size / MoE TP (1408 / 8 = 176) is not a multiple of the FP8 block 128; "
                        "EP=1 (60 experts do not divide over TP=8)")
    # Not block-quantized, or dense: SGLang does not check, and neither does agentd.
    assert sg.moe_block_alignment(m.model_copy(update={"extra": {"moe_intermediate_size": 1408}})) is None
    assert sg.moe_block_alignment(_model("Llama-3.1-8B-Instruct")) is None
    assert sg.moe_block_alignment(_model("Mixtral-8x7B-Instruct-v0.1")) is None  # no moe_intermediate_size
    assert sg.moe_block_alignment(_model("DeepSeek-R1")).block_n == 128


def test_an_fp8_moe_that_needs_eight_gpus_is_explained_not_launched(plugins):
    # No pipeline parallel for this architecture, and more than 4 x 24 GiB needed: TP=8 is the only shape, and SGLang
    # would refuse it.
    m = fp8_block_moe(arch="Qwen2MoeForCausalLMNoPP", layer_bytes=int(1.7 * GiB))
    plan = place(cluster(host("h", 8, total_gib=24)), m, sgl(name="moe", ctx=4096), plugins=plugins)
    assert not plan.placed
    assert ("1 layout rejected: the MoE experts' quantization blocks do not divide over the tensor parallel ranks "
            "(moe_intermediate_size / MoE TP (1408 / 8 = 176) is not a multiple of the FP8 block 128; EP=1 "
            "(60 experts do not divide over TP=8): TP=8)") in plan.diagnosis.message
    # With pipeline parallel it runs in stages whose ranks hold whole experts instead (EP=TP=2, three stages).
    pp = fp8_block_moe(layer_bytes=int(1.7 * GiB))
    rp = place(cluster(host("h", 8, total_gib=24)), pp, sgl(name="moe", ctx=4096), plugins=plugins).replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (2, 3) and rp.args[4:6] == ("--ep-size", "2")
    assert sglang_accepts(pp, rp.tensor_parallel, 1)


# --------------------------------------------------------------------------- multi-node


def test_multi_host_runs_one_stage_per_host(plugins):
    m = _model("Llama-3.1-405B-Instruct-AWQ-INT4")
    c = cluster(host("n1", 2), host("n2", 2), host("n3", 2, used={1: 50}))
    rp = place(c, m, sgl(name="big", ctx=32768), plugins=plugins).replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (2, 2)
    assert [(p.host, p.role, p.gpus, p.layers) for p in rp.parts] == [("n1", "main", (0, 1), 63),
                                                                      ("n2", "worker", (0, 1), 63)]


class _Settings:
    ray_port_range = (30000, 30999)


def _ctx(tmp_path, node: str) -> LaunchContext:
    ports = iter(range(41000, 41100))
    given: dict[str, int] = {}
    return LaunchContext(node=node, work_dir=tmp_path, settings=_Settings(),
                         port=lambda key: given.setdefault(key, next(ports)))


def _assignment(parts, args=("--tp-size", "4", "--pp-size", "2"), **kw) -> Assignment:
    eps = tuple(PartEndpoint(host=p.host, address=f"10.0.0.{i + 1}", port=8000 + i) for i, p in enumerate(parts))
    return Assignment(deployment="big", replica=0, term=3, model="/models/llama", runtime="sglang",
                      plan=ReplicaPlan(tensor_parallel=4, pipeline_parallel=len(parts), parts=parts, args=args),
                      endpoints=eps, **kw)


def test_launch_lines_use_sglangs_own_multi_node_flags(tmp_path, monkeypatch):
    monkeypatch.setenv(sp.PYTHON_VARIABLE, "/opt/sglang/bin/python")
    parts = (Part(host="n1", gpus=(0, 1, 2, 3), role="main", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}),
             Part(host="n2", gpus=(0, 1, 2, 3), role="worker", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}))
    a = _assignment(parts, options=RuntimeOptions(extra_args=("--log-level", "debug")))
    port = sp.dist_init_port(a.instance_id, _Settings.ray_port_range)
    [main] = sp.launch(a, 0, _ctx(tmp_path, "n1"))
    [rank1] = sp.launch(a, 1, _ctx(tmp_path, "n2"))
    assert main.argv[:3] == ("/opt/sglang/bin/python", "-m", "sglang.launch_server")
    assert main.argv[3:11] == ("--model-path", "/models/llama", "--host", "10.0.0.1", "--port", "8000",
                               "--served-model-name", "big")
    for spec_, rank in ((main, "0"), (rank1, "1")):
        i = spec_.argv.index("--nnodes")
        assert spec_.argv[i:i + 6] == ("--nnodes", "2", "--node-rank", rank, "--dist-init-addr", f"10.0.0.1:{port}")
        assert spec_.argv[-6:] == ("--tp-size", "4", "--pp-size", "2", "--log-level", "debug")
    assert main.ready.path == "/health_generate" and main.listen.port == 8000
    assert {e.port for e in main.ports} >= {8000, *range(port, port + 7)}  # SGLang derives 6 ports from it
    assert rank1.ready is None and rank1.listen is None and [str(e) for e in rank1.wait_for] == [f"10.0.0.1:{port}"]
    assert rank1.role == "worker" and rank1.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_single_host_launch_and_the_servers_key(tmp_path, monkeypatch):
    monkeypatch.setenv(sp.PYTHON_VARIABLE, "/opt/sglang/bin/python")
    a = _assignment((Part(host="n1", gpus=(2,), role="main"),), args=("--tp-size", "1"), api_key="k" * 32)
    [main] = sp.launch(a, 0, _ctx(tmp_path, "n1"))
    assert "--nnodes" not in main.argv and main.env["CUDA_VISIBLE_DEVICES"] == "2"
    assert main.argv[main.argv.index("--api-key") + 1] == "k" * 32
    assert main.gpus == (2,)


def test_deploys_may_not_set_what_agentd_sets(plugins):
    from agentd.errors import InvalidInput

    for arg in ("--tp-size=2", "--mem-frac", "--context-length", "--dist-init-addr=x:1", "--api-key"):
        with pytest.raises(InvalidInput, match="is set by agentd for runtime sglang"):
            plugins.check_launch_options(sgl().model_copy(update={
                "options": RuntimeOptions(extra_args=(arg, "1"))}))
    plugins.check_launch_options(sgl().model_copy(update={"options": RuntimeOptions(extra_args=("--log-level",))}))


# --------------------------------------------------------------------------- DP attention (MLA mixture of experts)


def h200(n: int = 8):
    return host("h200", n, total_gib=141)


def test_mla_attention_weights_come_from_the_config():
    m = _model("DeepSeek-R1")  # hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128
    assert sg.mla_attention_params(m) == (7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
                                          + 128 * 128 * 7168)
    assert sg.mla_attention_params(_model("Mixtral-8x7B-Instruct-v0.1")) is None


def test_dp_attention_only_for_mla_moe_on_one_stage_with_experts_over_every_rank():
    r1 = _model("DeepSeek-R1")  # 256 experts
    assert [sg.attention_dp(r1, tp, 1) for tp in (1, 2, 4, 6, 8)] == [1, 2, 4, 1, 8]
    assert sg.attention_dp(r1, 8, 2) == 1  # pipeline stages: plain TP
    assert sg.attention_dp(_model("Mixtral-8x7B-Instruct-v0.1"), 8, 1) == 1  # MoE without MLA


def test_deepseek_r1_on_eight_h200_runs_dp_attention_with_expert_parallel(plugins):
    m = _model("DeepSeek-R1")
    s = sgl(name="r1", ctx=8192, pin=(GpuPin(host="h200", gpus=tuple(range(8))),))
    rp = place(cluster(h200()), m, s, plugins=plugins).replicas[0]
    assert (rp.tensor_parallel, rp.pipeline_parallel) == (8, 1)
    args = dict(zip(rp.args[::2], rp.args[1::2], strict=False))
    assert args["--ep-size"] == "8" and args["--attn-dp-size"] == "8"
    d = sg.estimate(m, s, Sharded(8))
    attention = sg.mla_attention_params(m) * (m.total_weight_bytes / m.extra["estimated_parameters"]) * 61
    plain = sg.estimate(m, s, Sharded(8, 2)).breakdown  # no DP attention with two stages
    assert d.breakdown["weights"] > math.ceil(plain["weights"] * 2 - 1)  # one stage of 8 holds more per GPU
    assert d.breakdown["weights"] == math.ceil((sg._heaviest_stage(m, (61,)) - attention) / 8 + attention)
    assert d.breakdown["activation"] == sg.reserve_bytes(8, 1) + 256 * 8 * 3 * MiB  # SGLang's DP padding


def test_dp_attention_lifts_the_heads_rule_where_sglang_does():
    # 160 experts and 128 heads (DeepSeek-V2's shape): TP=5 splits experts evenly, and with DP attention each
    # rank runs attention whole, so SGLang accepts what the plain heads rule would refuse.
    from agentd.types import MoE

    m = model(heads=128, kv_heads=128, kv_kind="mla").model_copy(update={
        "moe": MoE(num_experts=160, experts_per_token=6),
        "extra": {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "q_lora_rank": 1536}})
    assert _accepted(m, 5) and not sglang_accepts(m, 5, 1)
    assert not _accepted(m, 6)  # 160 experts do not divide over 6 ranks: no DP attention, heads rule applies
