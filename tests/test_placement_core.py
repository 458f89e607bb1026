"""The placement core, runtime-independent: free memory, filters, pins, strategies, replicas, diagnosis, plugins."""

from __future__ import annotations

import pytest
from agentd_llamabox.placement import estimate as llama_estimate

from agentd.errors import InvalidInput, PluginError
from agentd.placement import Constraint, Rejection, Sharded, decision, place, plan_json
from agentd.placement.snapshot import Snapshot
from agentd.placement.units import gib
from agentd.plugins import RuntimeInfo, hookimpl
from agentd.types import Assignment, GpuPin, Part, PartEndpoint, ReplicaPlan
from tests.scenarios.build import (
    GiB,
    assert_llamabox_rules,
    assert_vllm_rules,
    builtin_plugins,
    cluster,
    gguf_model,
    gpu,
    host,
    model,
    spec,
)


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


def assignment(host_name: str, gpus: tuple[int, ...], memory: tuple[int, ...] = (), deployment: str = "other"):
    part = Part(host=host_name, gpus=gpus, role="main", memory=memory)
    return Assignment(deployment=deployment, replica=0, term=1, model="x", runtime="vllm",
                      plan=ReplicaPlan(parts=(part,)), endpoints=(PartEndpoint(host=host_name, address="a", port=1),))


# --------------------------------------------------------------------------- free memory


def test_free_memory_counts_foreign_use_and_agentd_assignments_not_agentd_processes():
    g0 = gpu(0, 80, used_gib=10, owned_gib=30)  # 10 GiB someone else's, 30 GiB an agentd instance
    g1 = gpu(1, 80)
    c = cluster(host("a", gpus=[g0, g1]))
    snap = Snapshot.build(c, [assignment("a", (0,), (35 * GiB,))])
    v0, v1 = snap.hosts[0].gpus
    assert (v0.foreign, v0.assigned, v0.free) == (10 * GiB, 35 * GiB, 35 * GiB)
    assert v1.free == 80 * GiB


def test_a_part_without_planned_memory_holds_the_whole_gpu_and_unknown_hosts_are_ignored():
    c = cluster(host("a", 2))
    snap = Snapshot.build(c, [assignment("a", (1,)), assignment("gone", (0,), (GiB,))])
    assert [g.free for g in snap.hosts[0].gpus] == [80 * GiB, 0]


def test_agentd_memory_already_assigned_is_not_given_out_twice(plugins):
    m = model(layers=8, layer_bytes=4 * GiB, ctx=4096)
    c = cluster(host("a", 2))
    plan = place(c, m, spec(), [assignment("a", (0,), (int(0.9 * 80 * GiB),))], plugins=plugins)
    assert plan.replicas[0].parts[0].gpus == (1,)


# --------------------------------------------------------------------------- filters


def test_selector_pin_and_maintenance_filters(plugins):
    m = model(layers=8, layer_bytes=4 * GiB, ctx=4096)
    c = cluster(host("a", 2, labels={"rack": "a"}), host("b", 2, labels={"rack": "b"}),
                host("c", 2, labels={"rack": "b"}))
    assert place(c, m, spec(selector={"rack": "b"}), plugins=plugins).replicas[0].parts[0].host == "b"
    assert place(c, m, spec(pin=(GpuPin(host="c"),)), plugins=plugins).replicas[0].parts[0].host == "c"
    plan = place(c, m, spec(pin=(GpuPin(host="c"),), exclude_gpus=("GPU-c-0",)), plugins=plugins)
    assert plan.replicas[0].parts[0].gpus == (1,)


def test_mig_instances_of_an_excluded_gpu_are_excluded_too(plugins):
    mig = gpu(0, 40, uuid="MIG-1").model_copy(update={"mig": True, "parent_uuid": "GPU-PHYS"})
    c = cluster(host("a", gpus=[mig]))
    plan = place(c, model(layers=2, layer_bytes=GiB, ctx=1024), spec(exclude_gpus=("GPU-PHYS",)), plugins=plugins)
    assert not plan.placed
    assert "1 GPU excluded for maintenance (MIG-1)" in plan.diagnosis.message


def test_binpack_packs_and_spread_spreads(plugins):
    m = gguf_model(layers=4, layer_bytes=2 * GiB)
    c = cluster(host("a", 2, used={0: 40}), host("b", 2), host("c", 2, used={0: 10}))
    packed = place(c, m, spec("llamabox", replicas=2), plugins=plugins)
    assert [rp.parts[0].host for rp in packed.replicas] == ["a", "a"]
    spread = place(c, m, spec("llamabox", replicas=3, strategy="spread"), plugins=plugins)
    assert [rp.parts[0].host for rp in spread.replicas] == ["b", "c", "a"]


def test_replicas_never_double_book(plugins):
    m = model(layers=8, layer_bytes=8 * GiB, ctx=4096)  # ~66 GiB: one vLLM replica per GPU
    c = cluster(host("a", 2), host("b", 1))
    plan = place(c, m, spec(replicas=3), plugins=plugins)
    gpus = [(p.host, g) for rp in plan.replicas for p in rp.parts for g in p.gpus]
    assert sorted(gpus) == [("a", 0), ("a", 1), ("b", 0)]
    refused = place(c, m, spec(replicas=4), plugins=plugins)
    assert not refused.placed and refused.replicas == ()
    assert "as replica 4 of 4" in refused.diagnosis.message
    assert refused.diagnosis.suggestions[0] == "scale to 3 replicas: only 3 of 4 fit"


def test_vllm_shares_a_gpu_between_replicas_when_the_fractions_allow(plugins):
    m = model(layers=4, layer_bytes=GiB, ctx=2048)
    plan = place(cluster(host("a", 1)), m, spec(replicas=2, util=0.45), plugins=plugins)
    assert [rp.parts[0].gpus for rp in plan.replicas] == [(0,), (0,)]
    assert_vllm_rules(plan, m, spec(replicas=2, util=0.45), cluster(host("a", 1)))


def test_zero_replicas_is_an_empty_placed_plan(plugins):
    plan = place(cluster(), model(), spec(replicas=0), plugins=plugins)
    assert plan.placed and plan.replicas == ()


# --------------------------------------------------------------------------- pins


def test_a_pinned_gpu_set_that_breaks_a_rule_is_refused_not_fixed(plugins):
    m = model(layers=40, layer_bytes=GiB, heads=32, kv_heads=8, arch="MllamaForConditionalGeneration", ctx=4096)
    c = cluster(host("gpu-node-1", 8))
    s = spec(pin=(GpuPin(host="gpu-node-1", gpus=(1, 2, 3)),))
    plan = place(c, m, s, plugins=plugins)
    assert not plan.placed
    msg = plan.diagnosis.message
    assert "attention heads not divisible by the tensor parallel size (32 attention heads: TP=3)" in msg
    assert "pipeline parallel is not supported for this model" in msg
    assert any(x.startswith("use 1 GPU: TP=1") for x in plan.diagnosis.suggestions)


def test_exact_pins_use_exactly_the_pinned_gpus(plugins):
    m = model(layers=8, layer_bytes=GiB, ctx=4096)
    plan = place(cluster(host("a", 8)), m, spec(pin=(GpuPin(host="a", gpus=(5, 2)),)), plugins=plugins)
    assert plan.replicas[0].parts[0].gpus == (2, 5) and plan.replicas[0].tensor_parallel == 2


def test_pins_on_missing_hosts_and_gpus_are_reported(plugins):
    m = model(layers=8, layer_bytes=GiB, ctx=4096)
    plan = place(cluster(host("a", 2)), m, spec(pin=(GpuPin(host="a", gpus=(7,)), GpuPin(host="zz", gpus=(0,)))),
                 plugins=plugins)
    assert not plan.placed
    reasons = {r.reason: r for r in plan.diagnosis.reasons}
    assert reasons["pinned GPUs does not exist"].details["where"] == ["GPU 7 on a"]
    assert reasons["pinned hosts is not in the cluster"].details["where"] == ["zz"]


# --------------------------------------------------------------------------- diagnosis


def test_diagnosis_is_a_fit_error_with_counts_numbers_near_miss_and_verified_fixes(plugins):
    m = model(layers=16, layer_bytes=14 * GiB, heads=128, kv_heads=8, ctx=4096)  # ~226 GiB: needs 4 GPUs
    c = cluster(host("gpu-node-1", 4, used={0: 72}), host("gpu-node-2", 1, labels={"rack": "b"}))
    plan = place(c, m, spec(name="big", selector={}), plugins=plugins)
    d = plan.diagnosis
    assert d.message.startswith("0/2 hosts can run big (vllm): ")
    assert "1 GPU had less free memory than gpu_memory_utilization requires (needs 72.0 GiB " in d.message
    assert "72.0 GiB used by pid 4000" in d.message
    gpu_reason = next(r for r in d.reasons if r.details["subject"] == "GPU")
    assert gpu_reason.count == 1 and gpu_reason.details["free"] == 8 * GiB and gpu_reason.details["foreign"] == 72 * GiB
    assert d.near_miss.startswith("layout TP=4")
    assert "free GPU 0 on gpu-node-1 (72.0 GiB used by pid 4000)" in d.suggestions
    # The suggestion holds: freeing that GPU places it.
    freed = cluster(host("gpu-node-1", 4), host("gpu-node-2", 1, labels={"rack": "b"}))
    assert place(freed, m, spec(name="big"), plugins=plugins).replicas[0].tensor_parallel == 4


def test_reasons_are_ordered_by_count_then_stage_and_serialise(plugins):
    m = gguf_model(layers=4, layer_bytes=30 * GiB)
    c = cluster(*(host(f"n{i}", 1, 24, labels={"rack": "a"}) for i in range(3)), host("x", 2, 80, labels={"rack": "b"}))
    plan = place(c, m, spec("llamabox", name="m", selector={"rack": "a"}), plugins=plugins)
    d = plan.diagnosis
    e = llama_estimate(m, spec("llamabox"))
    need = e.device_overhead + e.layer_bytes[-1] + e.output_bytes + e.output_overhead  # one GPU: output there too
    assert d.message == (f"0/4 hosts can run m (llamabox): 3 main-server candidates cannot hold one layer "
                         f"(needs {gib(need)}, largest free 24.0 GiB), 1 host excluded by selector rack=a")
    data = plan_json(plan)
    assert data["placed"] is False and data["replicas"] == []
    assert data["diagnosis"]["reasons"][0] == {
        "reason": "main-server candidates cannot hold one layer", "count": 3,
        "details": {"subject": "main-server candidate", "stage": "candidate",
                    "detail": f"needs {gib(need)}, largest free 24.0 GiB", "needs": need,
                    "largest_free": 24 * GiB, "host": "n0", "min_layers": 1, "where": ["n0", "n1", "n2"]}}
    assert any(s.startswith("drop the selector rack=a") for s in d.suggestions)


def test_context_suggestion_is_the_longest_that_fits(plugins):
    m = model(layers=32, layer_bytes=GiB, heads=32, kv_heads=32, ctx=131072)  # MHA: KV dominates
    c = cluster(host("a", 1, 80))
    plan = place(c, m, spec(), plugins=plugins)
    ctx_hint = next(s for s in plan.diagnosis.suggestions if s.startswith("reduce the context"))
    n = int(ctx_hint.split()[4])
    assert place(c, m, spec(ctx=n), plugins=plugins).placed
    assert not place(c, m, spec(ctx=n + 256), plugins=plugins).placed


def test_decision_sentence_is_logged_and_returned(plugins, caplog):
    m = model(layers=8, layer_bytes=GiB, ctx=4096)
    with caplog.at_level("INFO", logger="agentd.placement"):
        plan = place(cluster(host("a", 1)), m, spec(name="small"), plugins=plugins)
    sentence = decision(spec(name="small"), plan)
    assert sentence == "placed small (vllm): replica 0: main a GPU 0 (8 layers)"
    assert sentence in caplog.messages


# --------------------------------------------------------------------------- errors


def test_unknown_runtime_and_wrong_format_are_invalid_input(plugins):
    with pytest.raises(InvalidInput, match="unknown runtime 'sglang'"):
        place(cluster(), model(), spec("sglang"), plugins=plugins)
    with pytest.raises(InvalidInput, match="serves safetensors models, not gguf"):
        place(cluster(), gguf_model(), spec("vllm"), plugins=plugins)


class _Broken:
    @hookimpl
    def agentd_constraints(self, runtime, model, spec):
        class Boom(Constraint):
            def check_device(self, gpu):
                raise ZeroDivisionError("oops")
        return [Boom()]


def test_a_plugin_that_raises_is_a_plugin_error():
    pm = builtin_plugins()
    pm.register(_Broken(), "broken")
    with pytest.raises(PluginError, match="constraint Boom failed in check_device: ZeroDivisionError: oops"):
        place(cluster(host("a", 1)), model(), spec(), plugins=pm)


# --------------------------------------------------------------------------- third-party constraints


class PowerOfTwoTP(Constraint):
    name = "PowerOfTwoTP"

    def check_shape(self, shape):
        if isinstance(shape, Sharded) and shape.tp & (shape.tp - 1):
            return Rejection("layout", "rejected: TP is not a power of two", where=shape.label, list_where=True)
        return None


class MinComputeCapability(Constraint):
    name = "MinComputeCapability"

    def check_device(self, gpu):
        cc = tuple(int(x) for x in gpu.info.compute_capability.split("."))
        if cc >= (8, 0):
            return None
        return Rejection("GPU", "has compute capability below 8.0", gpu.info.compute_capability, where=gpu.label)


class ThirdParty:
    """A plugin that serves no runtime and only adds rules to vLLM's, through the same hooks."""

    @hookimpl
    def agentd_runtime(self):
        return None

    @hookimpl
    def agentd_constraints(self, runtime, model, spec):
        return [PowerOfTwoTP(), MinComputeCapability()] if runtime == "vllm" else None


def test_a_third_party_plugin_adds_its_own_constraints():
    # ~170 GiB, and an architecture vLLM has no pipeline parallel for: TP is the only way to split it.
    m = model(layers=24, layer_bytes=7 * GiB, heads=48, kv_heads=48, ctx=4096, dtype="float16",
              arch="Phi3SmallForCausalLM")
    c = cluster(host("a", 8, 80, cc="8.0"), host("old", 8, 80, cc="7.0"))
    pm = builtin_plugins()
    before = place(c, m, spec(), plugins=pm)
    assert before.replicas[0].tensor_parallel == 3  # vLLM alone: 48 heads split 3 ways is fine
    pm.register(ThirdParty(), "third-party")
    after = place(c, m, spec(), plugins=pm)
    rp = after.replicas[0]
    assert rp.tensor_parallel == 4 and rp.parts[0].host == "a"
    pm.unregister("third-party")
    pm.register(ThirdParty(), "third-party")
    only_old = place(cluster(host("old", 8, 80, cc="7.0")), m, spec(), plugins=pm)
    assert not only_old.placed
    assert "8 GPUs has compute capability below 8.0 (7.0)" in only_old.diagnosis.message
    tp3 = place(c, m, spec(pin=(GpuPin(host="a", gpus=(0, 1, 2)),)), plugins=pm)
    assert "rejected: TP is not a power of two (TP=3)" in tp3.diagnosis.message


class PreferLabel:
    """A scorer: prefer hosts labelled ssd=yes, through agentd_scorers."""

    weight = 1.0

    def score(self, layout):
        return 1.0 if layout.main.host.startswith("ssd") else 0.0


class ScorerPlugin:
    @hookimpl
    def agentd_scorers(self, runtime, model, spec):
        return [PreferLabel()]


def test_plugin_scorers_order_equal_candidates():
    m = gguf_model(layers=4, layer_bytes=2 * GiB)
    c = cluster(host("a", 1, 24), host("ssd-b", 1, 24))
    pm = builtin_plugins()
    assert place(c, m, spec("llamabox"), plugins=pm).replicas[0].parts[0].host == "a"
    pm.register(ScorerPlugin(), "scorer")
    plan = place(c, m, spec("llamabox"), plugins=pm)
    assert plan.replicas[0].parts[0].host == "ssd-b" and plan.replicas[0].score == 1.0
    assert_llamabox_rules(plan, m, spec("llamabox"), c)


class Sglang:
    """A whole third-party runtime using the core's sharded search."""

    @hookimpl
    def agentd_runtime(self):
        return RuntimeInfo(name="sglang", formats=("safetensors",))

    @hookimpl
    def agentd_propose(self, runtime, model, spec, limits):
        return [Sharded(tp) for tp in (1, 2, 4, 8)] if runtime == "sglang" else None

    @hookimpl
    def agentd_estimate(self, runtime, model, spec, shape):
        from agentd.placement import ShardDemand
        return ShardDemand(per_gpu=model.total_weight_bytes // shape.tp + GiB) if runtime == "sglang" else None


def test_a_third_party_runtime_gets_the_default_launch_parameters():
    pm = builtin_plugins()
    pm.register(Sglang(), "sglang")
    plan = place(cluster(host("a", 4, 24)), model(layers=10, layer_bytes=4 * GiB), spec("sglang"), plugins=pm)
    rp = plan.replicas[0]
    assert rp.tensor_parallel == 2 and rp.args == ()
    assert rp.parts[0].env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert rp.parts[0].memory[0] == (10 * 4 * GiB + 512 * 1024**2 + 2 * 4096) // 2 + GiB
