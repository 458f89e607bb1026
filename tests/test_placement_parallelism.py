"""vLLM's choice of tensor and pipeline parallel (`--parallelism auto|latency|gpus`), and why (issue 18).

auto follows vLLM's own guidance: tensor parallel inside a host over NVLink,
pipeline stages over PCIe-only GPUs and across hosts; without reported
topology it is the fewest-GPUs rule. Each placed replica says why it got its
layout and what the other policies would have run.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from agentd.api.convert import spec_from_pb, spec_to_pb
from agentd.modelinfo import inspect_model
from agentd.placement import Sharded, place, plan_json
from agentd.placement.links import HostLinks
from agentd.plugins import PluginManager
from agentd.types import ClusterInventory, DeploymentSpec, GpuLink, HostInventory
from agentd.v1 import control_pb2 as pb
from tests.conftest import run_cli
from tests.scenarios.build import GiB, assert_vllm_rules, builtin_plugins, cluster, host, model, spec

ROOT = Path(__file__).resolve().parent.parent
H100 = ROOT / "examples/clusters/h100-nvlink.json"
L40S = ROOT / "examples/clusters/l40s-pcie.json"
SEED = ROOT / "examples/clusters/a100-one-busy-gpu.json"
AWQ = ROOT / "tests/scenarios/models/Llama-3.1-405B-Instruct-AWQ-INT4"
FP8 = ROOT / "tests/scenarios/models/Llama-3.1-405B-Instruct-FP8"
PLUGINS = builtin_plugins()
# The model: 170 GiB of weights, 64 heads (8 KV heads), 80 layers.
M170 = model(layers=80, layer_bytes=int(2.1 * GiB), heads=64, kv_heads=8, ctx=8192)


def load(path: Path) -> ClusterInventory:
    return ClusterInventory.model_validate_json(path.read_text())


def without_links(c: ClusterInventory) -> ClusterInventory:
    return ClusterInventory(hosts=tuple(h.model_copy(update={"gpu_links": ()}) for h in c.hosts))


def plan_of(c: ClusterInventory, m, parallelism: str = "auto", **kw):
    s = spec(parallelism=parallelism, **kw)
    p = place(c, m, s, plugins=PLUGINS)
    assert p.placed, p.diagnosis
    assert_vllm_rules(p, m, s, c)
    return p


def layout(p) -> tuple[int, int, tuple[int, ...]]:
    r = p.replicas[0]
    return r.tensor_parallel, r.pipeline_parallel, tuple(g for part in r.parts for g in part.gpus)


def links(n: int, kind: str, pairs=None) -> tuple[GpuLink, ...]:
    return tuple(GpuLink(gpus=(a, b), link=kind) for a, b in (pairs or itertools.combinations(range(n), 2)))


# --------------------------------------------------------------------------- the cases


def test_h100_nvlink_host_runs_tensor_parallel_and_says_what_gpus_would_do():
    p = plan_of(load(H100), M170)
    assert layout(p) == (4, 1, (0, 1, 2, 3))
    assert p.replicas[0].why == (
        "TP=4 on h100-node-1 GPUs 0-3 (NVLink): tensor parallel over NVLink, as vLLM advises inside a host; "
        "PP=3 would use 3 GPUs: --parallelism gpus; TP=8 would use 8 GPUs: --parallelism latency")


def test_the_other_policies_on_the_same_host():
    gpus = plan_of(load(H100), M170, "gpus")
    assert layout(gpus) == (1, 3, (0, 1, 2))
    assert gpus.replicas[0].why.startswith("PP=3 on h100-node-1 GPUs 0-2: the fewest GPUs that fit; "
                                           "TP=4 would use 4 GPUs: --parallelism auto")
    latency = plan_of(load(H100), M170, "latency")
    assert layout(latency) == (8, 1, tuple(range(8)))
    assert latency.replicas[0].why.startswith("TP=8 on h100-node-1 GPUs 0-7: the largest tensor-parallel size")


def test_pcie_only_l40s_runs_pipeline_stages_and_the_reason_says_so():
    p = plan_of(load(L40S), M170)
    tp, pp, gpus = layout(p)
    assert pp > 1 and (tp, pp) == (1, 5) and gpus == (0, 1, 2, 3, 4)
    assert p.replicas[0].why == (
        "PP=5 on l40s-node-1 GPUs 0-4 (PCIe only): pipeline stages over PCIe, as vLLM advises for GPUs without "
        "NVLink; TP=8 would use 8 GPUs: --parallelism latency")


def test_pcie_prefers_tp_x_pp_when_layers_forbid_that_many_stages():
    """Two 80 GiB layers need four GPUs, and four stages are too many for two layers: TP=2 x PP=2 over
    PCIe comes before TP=4."""
    m = model(layers=2, layer_bytes=80 * GiB, heads=32, kv_heads=8, ctx=4096)
    c = cluster(host("p", n=4, total_gib=80).model_copy(update={"gpu_links": links(4, "pcie")}))
    p = plan_of(c, m)
    assert layout(p)[:2] == (2, 2)
    assert "(PCIe only): pipeline stages over PCIe" in p.replicas[0].why


def test_seed_cluster_awq_keeps_tp4_on_the_free_gpus():
    p = plan_of(load(SEED), inspect_model(AWQ))
    assert layout(p) == (4, 1, (1, 2, 3, 4))
    assert p.replicas[0].why == ("TP=4 on gpu-node-1 GPUs 1-4 (NVLink): tensor parallel over NVLink, as vLLM "
                                 "advises inside a host; the same with any --parallelism")


def test_seed_cluster_fp8_that_needs_seven_gpus_still_finds_pp7():
    p = plan_of(load(SEED), inspect_model(FP8))
    assert layout(p) == (1, 7, (1, 2, 3, 4, 5, 6, 7))
    assert "(NVLink): pipeline stages inside the host: no tensor-parallel-only layout" in p.replicas[0].why


def test_unknown_topology_keeps_the_fewest_gpus_rule_and_says_so():
    p = plan_of(without_links(load(H100)), M170)
    assert layout(p) == (1, 3, (0, 1, 2))
    assert p.replicas[0].why == ("PP=3 on h100-node-1 GPUs 0-2: GPU interconnect unknown: the fewest GPUs that "
                                 "fit; TP=8 would use 8 GPUs: --parallelism latency")


# --------------------------------------------------------------------------- which GPUs


def test_tp_stays_inside_one_nvlink_island():
    """Two NVLink islands of four (PCIe between them), GPU 0 busy: TP=4 takes the whole free island."""
    islands = [p for p in itertools.combinations(range(8), 2) if p[0] // 4 == p[1] // 4]
    across = [p for p in itertools.combinations(range(8), 2) if p[0] // 4 != p[1] // 4]
    h = host("n", used={0: 70}).model_copy(update={"gpu_links": links(8, "nvlink", islands) + links(8, "pcie", across)})
    p = plan_of(cluster(h), M170)
    assert layout(p) == (4, 1, (4, 5, 6, 7))


def test_bridged_pairs_give_tp2_on_a_pair():
    pairs = [(0, 1), (2, 3)]
    rest = [p for p in itertools.combinations(range(4), 2) if p not in pairs]
    h = host("n", n=4, used={0: 70}).model_copy(
        update={"gpu_links": links(4, "nvlink", pairs) + links(4, "pcie", rest)})
    m = model(layers=32, layer_bytes=3 * GiB, heads=32, kv_heads=8, ctx=4096)  # ~96 GiB: two GPUs
    p = plan_of(cluster(h), m)
    assert layout(p) == (2, 1, (2, 3))
    assert "(NVLink)" in p.replicas[0].why


def test_a_model_that_fits_one_gpu_takes_one_gpu():
    m = model(layers=32, layer_bytes=1 * GiB, heads=32, kv_heads=8, ctx=4096)
    p = plan_of(load(H100), m)
    assert layout(p) == (1, 1, (0,))
    assert "one GPU holds it; TP=8 would use 8 GPUs: --parallelism latency" in p.replicas[0].why


def test_several_hosts_keep_one_stage_per_host():
    """Too big for one host: one stage per host (TP = GPUs per host, PP = hosts), the fewest GPUs first,
    as before the policy."""
    m = model(layers=80, layer_bytes=9 * GiB, heads=64, kv_heads=8, ctx=4096)  # ~720 GiB
    c = cluster(*(host(f"h{i}").model_copy(update={"gpu_links": links(8, "nvlink")}) for i in range(3)))
    p = plan_of(c, m)
    r = p.replicas[0]
    assert (r.tensor_parallel, r.pipeline_parallel, len(r.parts)) == (4, 3, 3)
    assert all(len(part.gpus) == 4 for part in r.parts)
    assert layout(plan_of(without_links(c), m)) == layout(p)
    assert "no single host holds it: one pipeline stage per host" in r.why


def test_pinned_pcie_gpus_get_pipeline_stages_first():
    c = load(L40S)
    p = plan_of(c, M170, pin=({"host": "l40s-node-1", "gpus": [0, 1, 2, 3, 4, 5, 6, 7]},))
    assert layout(p)[:2] == (1, 8)
    assert p.replicas[0].why.endswith("(PCIe only): the pinned GPUs")
    assert layout(plan_of(c, M170, "gpus", pin=({"host": "l40s-node-1", "gpus": list(range(8))},)))[:2] == (8, 1)


def test_unplaceable_diagnosis_does_not_count_the_linked_preferences():
    huge = model(layers=80, layer_bytes=20 * GiB, heads=64, kv_heads=8)
    with_links = place(load(H100), huge, spec(), plugins=PLUGINS)
    plain = place(without_links(load(H100)), huge, spec(), plugins=PLUGINS)
    assert not with_links.placed and with_links.diagnosis.message == plain.diagnosis.message


# --------------------------------------------------------------------------- formats and flags


def test_default_parallelism_and_empty_why_are_left_out_of_the_json():
    s = spec()
    assert "parallelism" not in json.loads(s.model_dump_json())
    assert json.loads(spec(parallelism="gpus").model_dump_json())["parallelism"] == "gpus"
    p = plan_of(load(H100), M170)
    assert "why" in plan_json(p)["replicas"][0]
    bare = p.replicas[0].model_copy(update={"why": ""})
    assert "why" not in json.loads(bare.model_dump_json())
    assert "gpu_links" not in json.loads(HostInventory(name="x").model_dump_json())


def test_parallelism_travels_over_the_wire():
    for mode in ("auto", "latency", "gpus"):
        assert spec_from_pb(spec_to_pb(spec(parallelism=mode))).parallelism == mode
    assert spec_from_pb(pb.DeploymentSpec(name="x", model="m", runtime="vllm", replicas=1)).parallelism == "auto"


def test_bad_links_are_refused():
    with pytest.raises(ValueError, match="two different GPU indices"):
        GpuLink(gpus=(1, 1), link="nvlink")
    with pytest.raises(ValueError):
        GpuLink(gpus=(0, 1), link="infiniband")
    with pytest.raises(ValueError):
        DeploymentSpec(name="x", model="m", runtime="vllm", parallelism="fast")
    with pytest.raises(ValueError, match="invalid link"):
        Sharded(4, 2, hosts=2, link="nvlink")


def test_host_links_choose_greedy_cliques():
    h = HostLinks(HostInventory(name="h", gpu_links=links(4, "nvlink", [(0, 1), (2, 3), (1, 2)])))
    assert h.largest["nvlink"] == 4 and h.largest["pcie"] == 0
    assert h.choose("nvlink", [0, 1, 2, 3], 2, index=int) == [0, 1]
    assert h.choose("nvlink", [0, 1, 2, 3], 3, index=int) is None  # a chain, not a clique
    assert h.choose("pcie", [0, 1], 2, index=int) is None


def test_agentd_plan_takes_the_flag_and_prints_why():
    args = ("plan", "--cluster", str(H100), "--model", str(AWQ), "--runtime", "vllm", "--log-level", "warning")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("  why: TP=") and "(NVLink)" in line for line in r.stdout.splitlines())
    r = run_cli(*args, "--parallelism", "latency", "--json")
    assert r.returncode == 0, r.stderr
    rp = json.loads(r.stdout)["replicas"][0]
    assert rp["tensor_parallel"] == 8 and rp["why"].startswith("TP=8 on h100-node-1 GPUs 0-7: the largest")
    r = run_cli(*args, "--parallelism", "fast")
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr


# --------------------------------------------------------------------------- invariants on random hosts


def _random_case(rnd):
    hosts = []
    for h in range(rnd.choice([1, 2, 3])):
        n = rnd.choice([2, 4, 8])
        used = {i: rnd.choice([0, 0, 0, 30, 75]) for i in range(n)}
        style = rnd.choice(["nvswitch", "pcie", "pairs", "islands", "none", "holes"])
        out = []
        for a, b in itertools.combinations(range(n), 2):
            kind = {"nvswitch": "nvlink", "pcie": "pcie", "pairs": "nvlink" if a // 2 == b // 2 else "pcie",
                    "islands": "nvlink" if a // 4 == b // 4 else "pcie", "none": None,
                    "holes": rnd.choice(["nvlink", "pcie", "unknown", None])}[style]
            if kind:
                out.append(GpuLink(gpus=(a, b), link=kind))
        hosts.append(host(f"h{h}", n=n, used=used).model_copy(update={"gpu_links": tuple(out)}))
    heads = rnd.choice([32, 40, 64, 128])
    m = model(layers=rnd.choice([2, 8, 32, 80]), layer_bytes=int(rnd.choice([0.5, 2, 6, 20]) * GiB), heads=heads,
              kv_heads=8, ctx=4096)
    return cluster(*hosts), m


def test_every_policy_keeps_vllms_rules_and_names_the_links_it_claims():
    import random

    placed = 0
    for seed in range(60):
        rnd = random.Random(seed)
        c, m = _random_case(rnd)
        plans = {}
        for mode in ("auto", "latency", "gpus"):
            s = spec(parallelism=mode)
            p = place(c, m, s, plugins=PLUGINS)
            plans[mode] = p
            if not p.placed:
                continue
            placed += 1
            assert_vllm_rules(p, m, s, c)
            r = p.replicas[0]
            kinds = {(h.name, lk.gpus): lk.link for h in c.hosts for lk in h.gpu_links}
            pairs = [(part.host, pair) for part in r.parts for pair in itertools.combinations(part.gpus, 2)]
            if "(NVLink)" in r.why:
                assert all(kinds.get(x) == "nvlink" for x in pairs), (seed, mode, r.why)
            if "(PCIe only)" in r.why:
                assert all(kinds.get(x) == "pcie" for x in pairs), (seed, mode, r.why)
        # Where or whether it places does not depend on the policy, only how it splits.
        assert len({p.placed for p in plans.values()}) == 1, seed
        # Without topology auto is the fewest-GPUs rule: the same layouts, only the sentence differs.
        bare = place(without_links(c), m, spec(), plugins=PLUGINS)
        assert [r.model_copy(update={"why": ""}) for r in bare.replicas] == [
            r.model_copy(update={"why": ""}) for r in place(without_links(c), m, spec(parallelism="gpus"),
                                                            plugins=PLUGINS).replicas]
    assert placed > 60


def test_pcie_gpus_fall_back_to_tp_for_a_model_vllm_cannot_pipeline():
    m = model(layers=32, layer_bytes=5 * GiB, heads=32, kv_heads=8, ctx=4096, arch="MllamaForConditionalGeneration")
    p = plan_of(load(L40S), m)
    assert layout(p)[1] == 1 and layout(p)[0] > 1
    assert "(PCIe only): tensor parallel over PCIe: no layout with pipeline stages fits or is supported" in \
        p.replicas[0].why


# --------------------------------------------------------------------------- the same facts for SGLang


def test_sglang_gets_the_same_policy_through_the_plugin_api():
    """The SGLang plugin (agentd.plugins.api only) reads the same links: TP=4 over NVLink on the H100 host,
    pipeline stages on the PCIe-only L40S host, the old order where no topology is reported."""
    sglang = PluginManager.load(allow=["sglang"])

    def sg(c, parallelism="auto"):
        p = place(c, M170, spec(runtime="sglang", parallelism=parallelism), plugins=sglang)
        assert p.placed, p.diagnosis
        return p

    nv = sg(load(H100))
    assert layout(nv)[:2] == (4, 1) and nv.replicas[0].why.startswith(
        "TP=4 on h100-node-1 GPUs 0-3 (NVLink): tensor parallel over NVLink inside a host")
    assert "--parallelism gpus" in nv.replicas[0].why
    assert layout(sg(load(H100), "gpus"))[:2] != (4, 1)
    pcie = sg(load(L40S))
    assert layout(pcie)[1] > 1 and "(PCIe only): pipeline stages over PCIe" in pcie.replicas[0].why
    bare = sg(without_links(load(H100)))
    assert layout(bare) == layout(sg(without_links(load(H100)), "gpus"))
    assert "GPU interconnect unknown" in bare.replicas[0].why
