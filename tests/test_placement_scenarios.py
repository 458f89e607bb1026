"""Scenario files: a cluster file, a model, a deployment spec and the decision or diagnosis expected.

Each tests/scenarios/*.json names a cluster under examples/clusters (the same
files `agentd plan` runs in the README), a model (a config.json directory, or a
header-only GGUF generated here) and what must come out. Every placed plan is
also re-checked against the runtime's rules and for over-committed GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentd.modelinfo import inspect_model
from agentd.placement import place, plan_json
from agentd.testing.gguf import deepseek_r1_spec, write_header_only_gguf
from agentd.types import ClusterInventory, DeploymentSpec
from tests.scenarios.build import assert_llamabox_rules, assert_vllm_rules, builtin_plugins

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "tests" / "scenarios").glob("*.json"))
GGUF = {"deepseek-r1-bf16": lambda: deepseek_r1_spec(tokenizer=False)}


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(ref: dict):
        key = json.dumps(ref, sort_keys=True)
        if key not in cache:
            if "gguf" in ref:
                path = write_header_only_gguf(tmp_path_factory.mktemp("gguf") / f"{ref['gguf']}.gguf",
                                              GGUF[ref["gguf"]](), shards=ref.get("shards", 1))
            else:
                path = ROOT / ref["path"]
            cache[key] = inspect_model(path)
        return cache[key]

    return get


def test_there_are_scenarios_for_both_seed_reports():
    names = {p.stem for p in SCENARIOS}
    assert {"gpustack-deepseek-r1-llamabox", "gpustack-deepseek-r1-rack-a", "a100-busy-gpu-405b-awq"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path, plugins, models):
    sc = json.loads(path.read_text())
    cluster = ClusterInventory.model_validate_json((ROOT / sc["cluster"]).read_text())
    model = models(sc["model"])
    spec = DeploymentSpec.model_validate({"model": "m", **sc["spec"]})
    plan = place(cluster, model, spec, plugins=plugins)
    want = sc["expect"]
    data = plan_json(plan)
    assert plan.placed == want["placed"], plan.diagnosis.message if plan.diagnosis else plan
    if not plan.placed:
        d = data["diagnosis"]
        assert data["replicas"] == []
        if "message" in want:
            assert d["message"] == want["message"]
        for i, r in enumerate(want.get("reasons", [])):
            assert {k: d["reasons"][i][k] for k in r} == r
        if "near_miss" in want:
            assert d["near_miss"] == want["near_miss"]
        for s in want.get("suggestions_include", []):
            assert s in d["suggestions"]
        return
    (assert_vllm_rules if spec.runtime == "vllm" else assert_llamabox_rules)(plan, model, spec, cluster)
    assert data["diagnosis"] is None and len(data["replicas"]) == len(want["replicas"])
    for got, exp in zip(data["replicas"], want["replicas"], strict=True):
        for key in ("tensor_parallel", "pipeline_parallel", "args"):
            if key in exp:
                assert got[key] == exp[key]
        for i, part in enumerate(exp.get("parts", [])):
            assert {k: got["parts"][i][k] for k in part} == part
        if "rpc_servers" in exp:
            assert sum(1 for p in got["parts"] if p["role"] == "rpc") == exp["rpc_servers"]
        if "hosts" in exp:
            assert sorted({p["host"] for p in got["parts"]}) == exp["hosts"]
        if "args_start" in exp:
            assert got["args"][:len(exp["args_start"])] == exp["args_start"]
