"""agentd's vLLM KV-cache figures agree with vLLM's own arithmetic within 2%, and never book less.

vLLM's figures come from its own classes, run in `.venv-vllm` by
agentd/testing/vllm_oracle.py (docs/placement.md, "Checked against vLLM's own
arithmetic"): for each architecture agentd places (Llama, Qwen2/3, Mistral with
and without a sliding window, Mixtral, Gemma 2/3, DeepSeek-R1's MLA, GPTQ, AWQ
and FP8 checkpoints, one with an FP8 KV cache), each layout of the grid and
each pipeline stage's worker:

* the KV cache one request of max_model_len tokens needs (5 lengths);
* the largest max_model_len a KV budget holds (4 budgets);
* the page bytes per token, and the model's derived max_model_len.

The default run checks agentd against the committed figures
(tests/fixtures/vllm_kv_oracle.json, keyed by the vLLM version); the vllm tier
recomputes them with the installed vLLM and requires the same figures (skips
without `.venv-vllm`, fails with CI=true). Regenerate after a vLLM upgrade:
`AGENTD_VLLM_ORACLE_WRITE=1 .venv/bin/pytest -m vllm plugins/vllm/tests/test_vllm_oracle.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentd_vllm import kvcache
from agentd_vllm.placement import agentd_layout_args, estimate, vllm_stage_layers

from agentd.modelinfo import inspect_model
from agentd.plugins.api import Layout, Sharded, TensorParallelDivisibility
from agentd.types import DeploymentSpec, RuntimeOptions

ROOT = Path(__file__).resolve().parents[3]
HF = ROOT / "tests" / "fixtures" / "hf"
FIXTURE = ROOT / "tests" / "fixtures" / "vllm_kv_oracle.json"
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TOLERANCE = 0.02
WRITE = os.environ.get("AGENTD_VLLM_ORACLE_WRITE") == "1"  # read at collection

MODELS = (
    "Llama-3.1-8B-Instruct", "Llama-3.1-70B-Instruct", "Qwen2.5-7B-Instruct", "Qwen2.5-72B-Instruct", "Qwen3-8B",
    "Mistral-7B-Instruct-v0.3", "Mistral-7B-v0.1", "Mixtral-8x7B-Instruct-v0.1", "gemma-2-9b-it", "gemma-3-27b-it",
    "DeepSeek-R1", "Meta-Llama-3.1-8B-Instruct-GPTQ-INT4", "Qwen2.5-7B-Instruct-AWQ",
    "Meta-Llama-3.1-8B-Instruct-FP8-KV",
)
LAYOUTS = ((1, 1), (2, 1), (8, 1), (2, 2), (1, 4))
LENS = (1000, 4096, 8192, 32768, 131072)
BUDGETS = (1 << 30, 4 << 30, 16 << 30, 40 << 30)
LIVE = ("gemma-3-27b-it", "Mistral-7B-v0.1", "DeepSeek-R1", "Meta-Llama-3.1-8B-Instruct-FP8-KV")


def cases(models=MODELS, layouts=LAYOUTS) -> dict:
    return {"models": {m: str(HF / m) for m in models}, "layouts": [list(x) for x in layouts],
            "lens": list(LENS), "budgets": list(BUDGETS)}


def run_oracle(tmp_path: Path, spec: dict) -> dict:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(PYTHON), "-m", "agentd.testing.vllm_oracle", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def disagreements(name: str, layout: str, want: dict) -> list[str]:
    """Where agentd's figures for one model and layout differ from vLLM's by more than 2%, or book less."""
    model = inspect_model(str(HF / name))
    tp, pp = (int(x) for x in layout.removeprefix("tp").split("pp"))
    if "error" in want:  # vLLM refused the layout: agentd's constraints must refuse it too
        rule = TensorParallelDivisibility(model.num_attention_heads, model.num_key_value_heads)
        refused = rule.check_shape(Sharded(tp, pp)) is not None
        return [] if refused and "divisible" in want["error"] else [f"{name} {layout}: vLLM: {want['error']}"]
    bad: list[str] = []

    def near(what: str, ours: float, theirs: float, never_below: bool) -> None:
        off = (ours - theirs) / theirs if theirs else float(ours != theirs)
        if abs(off) > TOLERANCE or (never_below and ours < theirs):
            bad.append(f"{name} {layout} {what}: agentd {ours:,.0f} vs vLLM {theirs:,.0f} ({off:+.1%})")

    if model.context_length != want["derived_max_model_len"]:
        bad.append(f"{name}: context length {model.context_length} vs vLLM's {want['derived_max_model_len']}")
    stages = vllm_stage_layers(model.num_hidden_layers, pp)
    page = kvcache.page_bytes(model, tp)
    flight = kvcache.in_flight_tokens(pp)
    windows = kvcache.stage_windows(model, stages)
    assert len(windows) == len(want["stages"])
    for i, (w, stage) in enumerate(zip(windows, want["stages"], strict=True)):
        assert len(w) == stage["layers"]
        near(f"stage {i} bytes/token", len(w) * page / kvcache.BLOCK_SIZE, stage["bytes_per_token"], True)
        for n, theirs in stage["kv_bytes"].items():
            near(f"stage {i} KV at {n}", kvcache.stage_kv_bytes(w, page, int(n), flight), theirs, True)
    for b in want["stages"][0]["max_len"]:
        theirs = min(s["max_len"][b] for s in want["stages"])
        ours = kvcache.max_model_len(model, tp, stages, int(b), model.context_length)
        near(f"max_model_len in {int(b) / 2**30:g} GiB", ours, theirs, False)
        if ours > theirs:
            bad.append(f"{name} {layout}: agentd fits {ours} tokens in {b} bytes, vLLM only {theirs}")
    # What placement books is this figure, and what it assumes is on the command line.
    spec = DeploymentSpec(name="x", model="m", runtime="vllm", options=RuntimeOptions(ctx_size=4096))
    booked = estimate(model, spec, Sharded(tp, pp)).breakdown["kv_cache"]
    if booked != kvcache.kv_bytes(model, tp, stages, 4096):
        bad.append(f"{name} {layout}: the estimate books {booked} bytes of KV, not kvcache.kv_bytes")
    return bad


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {"models": {}}


FIX = _fixture()


def test_the_fixture_covers_every_architecture_and_layout():
    assert FIX["block_size"] == kvcache.BLOCK_SIZE
    assert FIX["max_num_batched_tokens"] == kvcache.MAX_NUM_BATCHED_TOKENS
    assert set(FIX["models"]) == set(MODELS)
    for name, per in FIX["models"].items():
        assert {f"tp{t}pp{p}" for t, p in LAYOUTS} <= set(per), name
    # Each kind of cache the grid is for is really in it (so a fixture of plain models cannot pass for it).
    kinds = {(f["kv_cache_dtype"], f["stages"][0]["groups"]) for per in FIX["models"].values()
             for k, f in per.items() if k.startswith("tp") and "error" not in f}
    assert ("fp8", 1) in kinds and any(g > 1 for _, g in kinds)


@pytest.mark.parametrize("name", MODELS)
def test_agentd_agrees_with_vllm_within_two_percent(name):
    per = FIX["models"][name]
    bad = [msg for layout, want in per.items() if layout.startswith("tp") for msg in disagreements(name, layout, want)]
    assert bad == []


def test_models_with_sliding_windows_pin_the_batch_the_figures_assume():
    for name, windowed in (("gemma-3-27b-it", True), ("gemma-2-9b-it", True), ("Mistral-7B-v0.1", True),
                           ("Mistral-7B-Instruct-v0.3", False), ("Qwen2.5-7B-Instruct", False)):
        model = inspect_model(str(HF / name))
        assert kvcache.has_sliding_window(model) is windowed, name
        layout = Layout(shape=Sharded(1, 1), parts=(), demand=None)
        args = agentd_layout_args("vllm", model, DeploymentSpec(name="x", model="m", runtime="vllm"), layout).args
        pinned = "--max-num-batched-tokens" in args
        assert pinned is windowed, (name, args)
        if pinned:
            assert args[args.index("--max-num-batched-tokens") + 1] == str(kvcache.MAX_NUM_BATCHED_TOKENS)


def test_the_comparison_fails_on_a_wrong_figure():
    want = json.loads(json.dumps(FIX["models"]["gemma-3-27b-it"]["tp1pp1"]))
    assert disagreements("gemma-3-27b-it", "tp1pp1", want) == []
    want["stages"][0]["kv_bytes"]["32768"] = int(want["stages"][0]["kv_bytes"]["32768"] * 1.03)
    assert any("KV at 32768" in m for m in disagreements("gemma-3-27b-it", "tp1pp1", want))


@pytest.mark.vllm
@pytest.mark.slow
def test_live_vllm_gives_the_committed_figures(tmp_path):
    """The installed vLLM computes what the fixture holds (all of it with AGENTD_VLLM_ORACLE_WRITE=1, which
    rewrites the fixture; otherwise 4 models over 2 layouts)."""
    if not PYTHON.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PYTHON} is absent: CI must run the vllm tier (scripts/bootstrap --vllm)", pytrace=False)
        pytest.skip(f"{PYTHON} is absent: the vllm tier needs `scripts/bootstrap --vllm`")
    if WRITE:
        live = run_oracle(tmp_path, cases())
        FIXTURE.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
    else:
        live = run_oracle(tmp_path, cases(LIVE, ((1, 1), (2, 2))))
    assert live["vllm"] == FIX["vllm"], (
        f"vLLM {live['vllm']} is installed, the fixture is for {FIX['vllm']}: regenerate it "
        "(AGENTD_VLLM_ORACLE_WRITE=1) and check agentd still agrees")
    for name, per in live["models"].items():
        assert per["notes"] == FIX["models"][name]["notes"]
        for layout, figures in per.items():
            if layout.startswith("tp"):
                assert figures == FIX["models"][name][layout], (name, layout)
                assert disagreements(name, layout, figures) == []


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
