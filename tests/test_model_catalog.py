"""Issue 19 part 1: what a host reports about the models in its model directories.

Real files: a generated GGUF, a split set, Hugging Face directories (one good, one with a broken
config.json, one truncated GGUF); digests from a real worker thread, cached on disk by path+size+mtime.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from agentd.catalog import held_copy
from agentd.config import Settings
from agentd.errors import InvalidInput
from agentd.inventory.collect import Collector
from agentd.inventory.models import DigestCache, ModelCatalog, model_digest
from agentd.modelinfo import inspect_model
from agentd.testing.gguf import llama_spec, write_header_only_gguf, write_tiny_llama_gguf
from agentd.testing.hf_cache import HF_CONFIG, hf_cache_model
from agentd.testing.localcluster import simulated_host
from agentd.types import HeldModel, HostInventory, ModelFile, parse_model_ref


def wait_for_digests(catalog: ModelCatalog, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        models = catalog.scan()
        if all(m.digest or not m.complete or m.broken for m in models) and catalog.hasher.pending == 0:
            return models
        assert time.monotonic() < deadline, [m.name for m in models if not m.digest]
        time.sleep(0.02)


def hf_dir(d: Path, *, config: str | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(config if config is not None else json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
        "intermediate_size": 256, "vocab_size": 300, "max_position_embeddings": 512,
        "torch_dtype": "float32"}))
    (d / "tokenizer.json").write_text("{}")
    return d


def test_scan_reports_gguf_split_sets_and_hf_dirs_with_digests_and_facts(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    tiny = write_tiny_llama_gguf(models / "tiny.gguf")
    write_header_only_gguf(models / "big" / "m.gguf", llama_spec(n_layers=4, hidden=256, heads=4, kv_heads=4,
                                                                 ffn=512), shards=2)
    hf_dir(models / "org" / "llama-hf")
    (models / "broken-hf").mkdir()
    (models / "broken-hf" / "config.json").write_text("{not json")
    (models / "trunc.gguf").write_bytes(tiny.read_bytes()[:100])
    (models / "notes.txt").write_text("not a model")
    (models / "fetching.gguf.partial").write_bytes(b"x" * 10)
    catalog = ModelCatalog([models], tmp_path / "digests.json")
    try:
        held = {m.name: m for m in wait_for_digests(catalog)}
    finally:
        catalog.close()
    assert set(held) == {"tiny", "big/m", "org/llama-hf", "broken-hf", "trunc"}
    t = held["tiny"]
    assert t.usable and t.format == "gguf" and t.path == str(tiny) and t.size == tiny.stat().st_size
    assert t.digest == "sha256:" + hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert t.info is not None and t.info.num_hidden_layers == 4
    split = held["big/m"]
    assert split.usable and [f.name for f in split.files] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    assert split.digest == model_digest(split.files) and split.digest != "sha256:" + split.files[0].sha256
    hf = held["org/llama-hf"]
    assert hf.usable and hf.format == "hf" and {f.name for f in hf.files} == {"config.json", "tokenizer.json"}
    assert hf.info is not None and hf.info.num_hidden_layers == 2
    assert not held["broken-hf"].usable and "config.json" in held["broken-hf"].broken
    assert not held["trunc"].usable and held["trunc"].broken
    # The whole inventory, with models, goes through JSON and back.
    inv = HostInventory(name="a", models=tuple(held.values()))
    assert HostInventory.model_validate_json(inv.model_dump_json()) == inv


def test_a_split_set_missing_a_shard_is_partial(tmp_path):
    write_header_only_gguf(tmp_path / "m.gguf", llama_spec(n_layers=2, hidden=64, heads=2, kv_heads=2, ffn=128),
                           shards=3)
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    catalog = ModelCatalog([tmp_path])
    try:
        (m,) = catalog.scan()
    finally:
        catalog.close()
    assert not m.complete and not m.usable and m.digest == "" and len(m.files) == 2


def test_digests_are_cached_by_path_size_and_mtime_and_never_hashed_on_the_caller(tmp_path):
    models = tmp_path / "models"
    f = write_tiny_llama_gguf(models / "tiny.gguf")
    cache = tmp_path / "digests.json"
    hashed_in: list[str] = []
    catalog = ModelCatalog([models], cache)
    real = catalog.hasher._run

    def spy():
        hashed_in.append(threading.current_thread().name)
        real()

    catalog.hasher._run = spy
    try:
        first = catalog.scan()
        assert first[0].digest == ""  # reported at once, hashed behind
        (m,) = wait_for_digests(catalog)
    finally:
        catalog.close()
    assert hashed_in == ["agentd-model-hash"]
    assert json.loads(cache.read_text())[str(f)][2] == m.digest.removeprefix("sha256:")
    again = ModelCatalog([models], cache)  # a restart: no hashing
    try:
        assert again.scan()[0].digest == m.digest and again.hasher.pending == 0
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))  # same size, new mtime: hashed again
        (changed,) = wait_for_digests(again)
    finally:
        again.close()
    assert changed.digest and changed.digest != m.digest


def test_a_corrupt_cache_file_is_ignored(tmp_path):
    (tmp_path / "d.json").write_text("[1, 2")
    assert DigestCache(tmp_path / "d.json").get(type("K", (), {"path": "x"})()) == ""  # type: ignore[arg-type]


def test_the_collector_reports_models_dirs_and_free_disk(tmp_path):
    host = tmp_path / "host.json"
    host.write_text(json.dumps(simulated_host("a", gpus=1)))
    s = Settings(node_name="a", data_dir=tmp_path / "data", simulate_inventory=host)
    assert s.model_directories == (tmp_path / "data" / "models",)
    write_tiny_llama_gguf(tmp_path / "data" / "models" / "tiny.gguf")
    collector = Collector.from_settings(s)
    try:
        inv = collector()
    finally:
        collector.close()
    assert [m.name for m in inv.models] == ["tiny"]
    assert inv.model_dirs == (str(tmp_path / "data" / "models"),)
    assert inv.model_disk_free and inv.model_disk_free > 0
    with pytest.raises(ValueError, match="must be absolute"):
        Settings(model_dirs="models")
    assert Settings(model_dirs="/a,/b").model_directories == (Path("/a"), Path("/b"))


def test_an_inventory_without_models_writes_no_new_field():
    assert set(HostInventory(name="a").model_dump(mode="json")) == {
        "name", "address", "labels", "cpu_count", "memory_total", "memory_available", "load_average", "gpus",
        "simulated", "warnings"}


def test_model_refs():
    assert parse_model_ref("/m/x.gguf").kind == "path"
    assert parse_model_ref("hf:org/name@main").revision == "main"
    ref = parse_model_ref("org/name@sha256:" + "a" * 64)
    assert (ref.kind, ref.name, ref.digest) == ("catalog", "org/name", "sha256:" + "a" * 64)
    for bad in ("./x.gguf", "x.gguf", "../m", "a/../b", "~/m", "", "hf:nope", "x@sha256:12"):
        with pytest.raises(ValueError, match=r"relative paths are refused|is not hf:|neither"):
            parse_model_ref(bad)


def test_held_copy_by_digest_or_by_path(tmp_path):
    info = inspect_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    m = HeldModel(name="tiny", digest="sha256:" + "b" * 64, path="/m/tiny.gguf", size=1,
                  files=(ModelFile(name="tiny.gguf", size=1, sha256="b" * 64),), info=info)
    assert held_copy([m], f"tiny@{m.digest}") is m
    assert held_copy([m], "tiny@sha256:" + "c" * 64) is None
    assert held_copy([m], "/m/tiny.gguf") is m
    assert held_copy([m.model_copy(update={"broken": "x"})], f"tiny@{m.digest}") is None


def test_a_hugging_face_cache_is_read_with_huggingface_hub(tmp_path):
    from agentd import catalog as cat
    from agentd.types import HostInventory as Inv

    cache = tmp_path / "hub"
    snap = hf_cache_model(cache, "org/tiny-hf", {"config.json": HF_CONFIG, "tokenizer.json": b"{}"})
    hf_cache_model(cache, "org/other", {"README.md": b"no config"}, commit="b" * 40)  # not a model
    catalog = ModelCatalog([cache])
    try:
        (m,) = wait_for_digests(catalog)
    finally:
        catalog.close()
    assert (m.name, m.format, m.path, m.revision, m.refs) == ("org/tiny-hf", "hf", str(snap), "a" * 40, ("main",))
    assert m.usable and {f.name for f in m.files} == {"config.json", "tokenizer.json"}
    assert next(f for f in m.files if f.name == "config.json").sha256 == hashlib.sha256(HF_CONFIG).hexdigest()
    host = Inv(name="a", models=(m,))
    for ref in ("hf:org/tiny-hf", "hf:org/tiny-hf@main", "hf:org/tiny-hf@aaaaaaa"):
        assert cat.resolve(ref, [host])[0] == f"org/tiny-hf@{m.digest}"
    with pytest.raises(InvalidInput, match="no host holds a model hf:org/tiny-hf@v2"):
        cat.resolve("hf:org/tiny-hf@v2", [host])


def test_a_gguf_repository_in_a_hugging_face_cache_gives_each_file_as_a_model(tmp_path):
    """Issue 19 item 5: `hf:ORG/NAME[@REV]:PATTERN` picks one GGUF file of a -GGUF repository in a hub cache."""
    from agentd import catalog as cat
    from agentd.types import HostInventory as Inv

    q4 = write_tiny_llama_gguf(tmp_path / "q4.gguf", seed=1).read_bytes()
    q8 = write_tiny_llama_gguf(tmp_path / "q8.gguf", seed=2).read_bytes()
    one = write_tiny_llama_gguf(tmp_path / "one.gguf", seed=3).read_bytes()
    cache = tmp_path / "hub"
    snap = hf_cache_model(cache, "org/tiny-GGUF", {"tiny.Q4_K_M.gguf": q4, "tiny.Q8_0.gguf": q8,
                                                    "README.md": b"quantized"})
    hf_cache_model(cache, "org/one-GGUF", {"one.Q4_0.gguf": one}, commit="c" * 40, refs=("main", "v1"))
    catalog = ModelCatalog([cache])
    try:
        held = {m.name: m for m in wait_for_digests(catalog)}
    finally:
        catalog.close()
    assert sorted(held) == ["org/one-GGUF/one.Q4_0", "org/tiny-GGUF/tiny.Q4_K_M", "org/tiny-GGUF/tiny.Q8_0"]
    m4 = held["org/tiny-GGUF/tiny.Q4_K_M"]
    assert (m4.format, m4.path, m4.revision, m4.refs) == ("gguf", str(snap / "tiny.Q4_K_M.gguf"), "a" * 40, ("main",))
    assert m4.usable and [f.name for f in m4.files] == ["tiny.Q4_K_M.gguf"]
    assert m4.files[0].sha256 == hashlib.sha256(q4).hexdigest()
    host = Inv(name="a", models=tuple(held.values()))
    for ref in ("hf:org/tiny-GGUF:Q4_K_M", "hf:org/tiny-GGUF:q4_k_m", "hf:org/tiny-GGUF@main:Q4_K_M",
                "hf:org/tiny-GGUF@aaaaaaa:*.Q4_*"):
        assert cat.resolve(ref, [host])[0] == f"org/tiny-GGUF/tiny.Q4_K_M@{m4.digest}", ref
    q8_digest = held["org/tiny-GGUF/tiny.Q8_0"].digest
    assert cat.resolve("hf:org/tiny-GGUF:Q8_0", [host])[0] == f"org/tiny-GGUF/tiny.Q8_0@{q8_digest}"
    # The repository's only GGUF model needs no pattern; a revision narrows as for any hf: name.
    one_digest = held["org/one-GGUF/one.Q4_0"].digest
    assert cat.resolve("hf:org/one-GGUF@v1", [host])[0] == f"org/one-GGUF/one.Q4_0@{one_digest}"
    with pytest.raises(InvalidInput, match=r"matches 2 GGUF models of org/tiny-GGUF .*tiny.Q4_K_M, "
                                           r"org/tiny-GGUF/tiny.Q8_0.*hf:org/tiny-GGUF:PATTERN"):
        cat.resolve("hf:org/tiny-GGUF", [host])
    with pytest.raises(InvalidInput, match="no host holds a model hf:org/tiny-GGUF:Q2_K"):
        cat.resolve("hf:org/tiny-GGUF:Q2_K", [host])
    with pytest.raises(InvalidInput, match="no host holds a model hf:org/tiny-GGUF@v9:Q4_K_M"):
        cat.resolve("hf:org/tiny-GGUF@v9:Q4_K_M", [host])
    assert parse_model_ref("hf:org/tiny-GGUF@main:Q4_K_M").text == "hf:org/tiny-GGUF@main:Q4_K_M"
    with pytest.raises(ValueError, match="GGUF-FILE-PATTERN"):
        parse_model_ref("hf:org/tiny-GGUF:Q4 K")


def test_deploy_wait_draws_the_fetch_progress_on_one_terminal_line():
    import io
    from types import SimpleNamespace

    from agentd.cli.cluster import _ProgressLine

    out = io.StringIO()
    bar = _ProgressLine(out)
    bar([SimpleNamespace(state="PENDING", host="b", reason="")])
    assert out.getvalue() == ""  # nothing fetching: nothing drawn
    bar([SimpleNamespace(state="FETCHING", host="c", reason="42% of 2.00 GiB 0.1 GiB/s ETA 12s")])
    bar([SimpleNamespace(state="FETCHING", host="c", reason="100% of 2.00 GiB 0.1 GiB/s ETA 1s")])
    bar.done()
    assert out.getvalue() == ("\r\x1b[2Kfetching the model: c [########............] 42% of 2.00 GiB 0.1 GiB/s ETA 12s"
                              "\r\x1b[2Kfetching the model: c [####################] 100% of 2.00 GiB 0.1 GiB/s "
                              "ETA 1s\n")
