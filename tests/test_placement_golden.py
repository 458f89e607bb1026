"""Placement's output is pinned byte for byte on seeded random clusters.

The engine's hot paths were rewritten for speed (docs/placement.md,
"Performance"); these plans and diagnoses were recorded before the rewrite,
so any change in what placement decides or says shows up here as a diff.
Regenerate only for an intended change of behaviour, and say why in the
commit:

    .venv/bin/python -m tests.test_placement_golden --write

Each case is built from its seed alone (random.Random), so the fixture
holds only the outputs.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

import pytest

from agentd.modelinfo import inspect_model
from agentd.placement import decision, place, plan_json
from agentd.testing.gguf import deepseek_r1_spec, llama3_70b_q4_k_m_spec, write_header_only_gguf
from agentd.types import (
    Assignment,
    ClusterInventory,
    DeploymentSpec,
    GpuPin,
    Part,
    PartEndpoint,
    ReplicaPlan,
    RuntimeOptions,
)
from tests.scenarios.build import GiB, MiB, builtin_plugins, gguf_model, gpu, host, model

FIXTURE = Path(__file__).parent / "fixtures" / "placement_golden.json"
SEEDS = range(64)
PLUGINS = builtin_plugins()


def _cluster(rnd: random.Random, n_hosts: int) -> ClusterInventory:
    hosts = []
    for h in range(n_hosts):
        name = f"n{h:02d}"
        gpus = []
        for i in range(rnd.choice([1, 2, 4, 8])):
            total = rnd.choice([16, 24, 40, 80])
            used = total * rnd.choice([0, 0, 0, 0.05, 0.25, 0.6, 0.95])
            owned = bool(used) and rnd.random() < 0.3
            gpus.append(gpu(i, total, 0 if owned else used, owned_gib=used if owned else 0, host=name,
                            pid=1000 + 10 * h + i, cc=rnd.choice(["8.0", "8.0", "9.0", "7.5"])))
        hosts.append(host(name, gpus=gpus, ram_gib=rnd.choice([16, 64, 512]), labels={"rack": f"r{h % 3}"}))
    rnd.shuffle(hosts)  # the engine sorts; the input order must not matter
    return ClusterInventory(hosts=tuple(hosts))


def _existing(rnd: random.Random, c: ClusterInventory) -> list[Assignment]:
    out = []
    for k in range(rnd.choice([0, 0, 1, 3])):
        h = rnd.choice(c.hosts)
        g = rnd.choice(h.gpus)
        mem = () if rnd.random() < 0.1 else (int(g.memory_total * rnd.choice([0.1, 0.5, 0.9])),)
        part = Part(host=h.name, gpus=(g.index,), role="main", memory=mem)
        out.append(Assignment(deployment=f"other{k}", replica=0, term=1, model="x", runtime="vllm",
                              plan=ReplicaPlan(parts=(part,)),
                              endpoints=(PartEndpoint(host=h.name, address="a", port=1),)))
    return out


def _total(c: ClusterInventory) -> int:
    return sum(g.memory_total for h in c.hosts for g in h.gpus)


def case(seed: int):
    """(cluster, model, spec, existing) for one seed."""
    rnd = random.Random(seed)
    c = _cluster(rnd, rnd.choice([1, 2, 3, 5, 8, 13, 24, 40]))
    existing = _existing(rnd, c)
    runtime = "vllm" if seed % 2 == 0 else "llamabox"
    heads, kv = rnd.choice([(8, 8), (28, 4), (32, 8), (64, 8), (40, 8), (14, 2), (128, 8)])
    layers = rnd.choice([4, 12, 32, 61, 80])
    share = rnd.choice([0.01, 0.03, 0.1, 0.3, 0.6, 1.2] if runtime == "vllm" else [0.02, 0.1, 0.3, 0.6, 0.9, 1.2])
    per_layer = max(64 * MiB, int(min(_total(c), 8 * 80 * GiB) * share / layers) // MiB * MiB)
    if runtime == "vllm":
        m = model(layers=layers, layer_bytes=per_layer, heads=heads, kv_heads=kv,
                  ctx=rnd.choice([8192, 32768, 131072]),
                  arch=rnd.choice(["LlamaForCausalLM", "LlamaForCausalLM", "MllamaForConditionalGeneration"]),
                  dtype=rnd.choice(["bfloat16", "bfloat16", "float16"]))
    else:
        sizes = None
        if rnd.random() < 0.3:  # uneven layers (dense then MoE, like DeepSeek)
            dense = max(1, layers // 10)
            sizes = [per_layer // 3] * dense + [per_layer] * (layers - dense)
        m = gguf_model(layers=layers, layer_bytes=per_layer, heads=heads, kv_heads=kv, layer_sizes=sizes,
                       ctx=rnd.choice([2048, 8192, 32768]), embed=int(rnd.choice([0.25, 2]) * GiB),
                       vocab=rnd.choice([32000, 128256]))
    names = sorted(h.name for h in c.hosts)
    kw: dict = {}
    if rnd.random() < 0.15:
        kw["selector"] = {"rack": rnd.choice(["r0", "r1", "r9"])}
    if rnd.random() < 0.15:
        uuids = [g.uuid for h in c.hosts for g in h.gpus]
        kw["exclude_gpus"] = tuple(rnd.sample(uuids, min(len(uuids), rnd.choice([1, 3]))))
    r = rnd.random()
    if r < 0.1:
        kw["pin"] = (GpuPin(host=rnd.choice(names)),)
    elif r < 0.2:
        pins = []
        for name in rnd.sample(names, min(len(names), rnd.choice([1, 1, 2]))):
            h = next(x for x in c.hosts if x.name == name)
            pins.append(GpuPin(host=name, gpus=tuple(sorted(rnd.sample([g.index for g in h.gpus],
                                                                          rnd.randint(1, len(h.gpus)))))))
        kw["pin"] = tuple(pins)
    options = RuntimeOptions(
        gpu_memory_utilization=rnd.choice([None, None, 0.5, 0.95]) if runtime == "vllm" else None,
        ctx_size=rnd.choice([None, None, 1024, 8192]),
        allow_cpu_offload=runtime == "llamabox" and rnd.random() < 0.5,
    )
    spec = DeploymentSpec(name=f"g{seed}", model="/models/m", runtime=runtime, replicas=rnd.choice([1, 1, 2, 3]),
                          strategy=rnd.choice(["binpack", "spread"]), options=options, **kw)
    return c, m, spec, existing


def outcome(seed: int) -> dict:
    c, m, spec, existing = case(seed)
    plan = place(c, m, spec, existing, plugins=PLUGINS)
    return {"decision": decision(spec, plan), "plan": plan_json(plan)}


def _bench_module():
    """benchmarks/placement.py: its synthetic cluster (64 hosts here) and real model headers."""
    path = Path(__file__).parent.parent / "benchmarks" / "placement.py"
    spec = importlib.util.spec_from_file_location("agentd_bench_placement", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH_CASES = {
    "bench-vllm-70b-x4": ("vllm", "llama-70b", {}, 4),
    "bench-vllm-405b": ("vllm", "llama-405b", {"ctx_size": 32768}, 1),
    "bench-vllm-unplaceable": ("vllm", "llama-405b", {"gpu_memory_utilization": 0.02}, 1),
    "bench-llamabox-70b-q4-x3": ("llamabox", "llama-70b-q4", {}, 3),
    "bench-llamabox-r1": ("llamabox", "deepseek-r1-bf16", {}, 1),
    "bench-llamabox-r1-partial": ("llamabox", "deepseek-r1-bf16", {"allow_cpu_offload": True}, 2),
}


def bench_outcomes(tmp: Path) -> dict:
    bench = _bench_module()
    root = Path(__file__).parent
    models = {
        "llama-70b": inspect_model(root / "fixtures/hf/Llama-3.1-70B-Instruct"),
        "llama-405b": inspect_model(root / "fixtures/hf/Llama-3.1-405B-Instruct"),
        "llama-70b-q4": inspect_model(write_header_only_gguf(tmp / "l70.gguf", llama3_70b_q4_k_m_spec())),
        "deepseek-r1-bf16": inspect_model(write_header_only_gguf(tmp / "r1.gguf", deepseek_r1_spec(tokenizer=False))),
    }
    c, existing = bench.cluster(64)
    out = {}
    for key, (runtime, name, opts, replicas) in BENCH_CASES.items():
        spec = DeploymentSpec(name=key, model=name, runtime=runtime, replicas=replicas,
                              options=RuntimeOptions(**opts))
        plan = place(c, models[name], spec, existing, plugins=PLUGINS)
        out[key] = {"decision": decision(spec, plan), "plan": plan_json(plan)}
    return out


def _load() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_is_unchanged(seed):
    want = _load()[str(seed)]
    got = json.loads(json.dumps(outcome(seed)))
    assert got == want


def test_benchmark_clusters_are_unchanged(tmp_path):
    want = _load()
    got = json.loads(json.dumps(bench_outcomes(tmp_path)))
    for key in BENCH_CASES:
        assert got[key] == want[key], key


def test_the_cases_cover_both_outcomes_and_runtimes():
    data = _load()
    placed = {(s % 2, v["plan"]["placed"]) for s, v in ((int(k), v) for k, v in data.items() if k.isdigit())}
    assert placed == {(0, True), (0, False), (1, True), (1, False)}
    assert any(p.get("cpu_layers") for v in data.values() for r in v["plan"]["replicas"] for p in r["parts"])
    assert any(p["role"] == "rpc" for v in data.values() for r in v["plan"]["replicas"] for p in r["parts"])
    assert any(r["pipeline_parallel"] > 1 for v in data.values() for r in v["plan"]["replicas"])


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_placement_golden --write")
    with tempfile.TemporaryDirectory() as tmp:
        data = {str(s): outcome(s) for s in SEEDS} | bench_outcomes(Path(tmp))
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
