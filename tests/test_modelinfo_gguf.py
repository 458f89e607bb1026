"""GGUF headers into ModelInfo: real files from the gguf writer, stand-ins for huge models, hostile files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from agentd.errors import InvalidInput
from agentd.modelinfo import inspect_model
from agentd.modelinfo.gguf import ArrayInfo, LongString, TensorTotals, read_header, read_model
from agentd.testing.gguf import (
    GgufSpec,
    TensorSpec,
    Typed,
    deepseek_r1_spec,
    gib,
    llama3_70b_q4_k_m_spec,
    llama_spec,
    shard_paths,
    uniform_spec,
    write_header_only_gguf,
    write_tiny_llama_gguf,
)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    """DeepSeek-R1 BF16 as unsloth ships it: 30 shards, full tokenizer arrays, no tensor data."""
    d = tmp_path_factory.mktemp("r1")
    return write_header_only_gguf(d / "DeepSeek-R1-BF16.gguf", deepseek_r1_spec(), shards=30)


def small_spec(**kw) -> GgufSpec:
    return llama_spec(n_layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=320, ctx=1024, **kw)


# --------------------------------------------------------------------------- real files


def test_tiny_llama_written_with_data_reads_back_exactly(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_layers=3, hidden=64, heads=4, kv_heads=2, ffn=96,
                                 ctx=512)
    m = inspect_model(path)
    assert (m.format, m.architecture, m.num_hidden_layers) == ("gguf", "llama", 3)
    assert (m.num_attention_heads, m.num_key_value_heads, m.hidden_size, m.head_dim) == (4, 2, 64, 16)
    assert (m.intermediate_size, m.context_length, m.vocab_size, m.dtype) == (96, 512, 259 + 62, "F32")
    assert m.quantization is None
    vocab, h, kvd = m.vocab_size, 64, 2 * 16
    per_layer = 4 * (2 * h + h * h * 2 + h * kvd * 2 + 96 * h * 3)
    assert m.layer_bytes == (per_layer,) * 3
    assert m.non_repeating_bytes == {"token_embd": 4 * vocab * h, "output": 4 * vocab * h,
                                     "output_norm": 4 * h, "other": 0}
    assert m.total_weight_bytes == sum(m.layer_bytes) + sum(m.non_repeating_bytes.values())
    assert (m.kv_cache.kind, m.kv_cache.k_elements, m.kv_cache.v_elements) == ("gqa", 32, 32)
    assert m.extra["header_only"] is False
    assert m.files == (str(path),)
    # The data section really is there: the file is exactly header + aligned tensors.
    hdr = read_header(path, TensorTotals())
    assert path.stat().st_size == hdr.data_offset + hdr.data_bytes


def test_f16_tiny_llama_reports_f16(tmp_path):
    m = inspect_model(write_tiny_llama_gguf(tmp_path / "t16.gguf", dtype="f16"))
    assert m.dtype == "F16" and m.extra["bytes_by_ggml_type"]["F16"] > 0


def test_llama3_70b_q4_k_m_stand_in_matches_the_published_file(tmp_path):
    path = write_header_only_gguf(tmp_path / "Meta-Llama-3-70B-Instruct-Q4_K_M.gguf", llama3_70b_q4_k_m_spec())
    m = inspect_model(path)
    assert path.stat().st_size < 100_000  # header only
    assert m.extra["header_only"] is True
    assert (m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads, m.hidden_size) == (80, 64, 8, 8192)
    assert m.dtype == "Q4_K_M"
    assert m.quantization and m.quantization.method == "gguf:Q4_K_M"
    assert (m.quantization.bits, m.quantization.group_size) == (4, 256)
    assert m.total_weight_bytes == pytest.approx(42.52e9, rel=0.01)  # bartowski/lmstudio file: 42.52 GB
    # Layers with Q6_K attn_v/ffn_down (use_more_bits) are bigger than the others.
    assert len(set(m.layer_bytes)) == 2 and m.layer_bytes[0] > m.layer_bytes[10]
    assert m.non_repeating_bytes["output"] == 8192 * 128256 // 256 * 210  # Q6_K
    assert m.non_repeating_bytes["token_embd"] == 8192 * 128256 // 256 * 144  # Q4_K
    assert m.kv_cache.k_elements == 8 * 128


def test_deepseek_r1_bf16_thirty_shards_read_as_one_model(deepseek):
    m = inspect_model(deepseek)
    assert len(m.files) == 30 and m.files[0].endswith("-00001-of-00030.gguf")
    assert m.architecture == "deepseek2" and m.num_hidden_layers == 61
    assert m.total_weight_bytes == pytest.approx(1.342e12, rel=0.002)  # unsloth DeepSeek-R1 BF16: 1.34 TB
    assert m.vocab_size == 129280 and m.context_length == 163840
    assert (m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (128, 128, 192)
    kv = m.kv_cache
    assert (kv.kind, kv.k_elements, kv.v_elements, kv.kv_lora_rank, kv.qk_rope_head_dim) == ("mla", 576, 0, 512, 64)
    assert m.moe and (m.moe.num_experts, m.moe.experts_per_token, m.moe.shared_experts) == (256, 8, 1)
    spec = deepseek_r1_spec(tokenizer=False)
    assert m.layer_bytes == spec.layer_bytes
    assert m.layer_bytes[0] == m.layer_bytes[2] < m.layer_bytes[3] == m.layer_bytes[60]  # 3 dense, then MoE
    assert m.non_repeating_bytes["token_embd"] == m.non_repeating_bytes["output"] == 7168 * 129280 * 2
    assert m.dtype == "BF16" and m.quantization is None


def test_any_shard_leads_to_the_whole_model(deepseek):
    seventh = deepseek.with_name(deepseek.name.replace("-00001-", "-00007-"))
    assert inspect_model(seventh).files == inspect_model(deepseek).files


def test_a_directory_with_one_split_model_inspects_it(deepseek):
    assert inspect_model(deepseek.parent).num_hidden_layers == 61


def test_version_2_files_are_read(tmp_path):
    path = write_header_only_gguf(tmp_path / "v2.gguf", small_spec(), version=2)
    assert inspect_model(path).extra["gguf_version"] == 2


def test_every_llama_cpp_tensor_type_is_sized_like_ggml(tmp_path):
    tensors = []
    for qt in GGMLQuantizationType:
        block, size = GGML_QUANT_SIZES[qt]
        tensors.append(TensorSpec(f"t_{qt.name}", (block * 3, 5, 2), qt.name))
    path = write_header_only_gguf(tmp_path / "types.gguf", GgufSpec("llama", {}, tuple(tensors)))
    totals = TensorTotals()
    read_header(path, totals)
    for qt in GGMLQuantizationType:
        block, size = GGML_QUANT_SIZES[qt]
        assert totals.type_bytes[qt.name] == 3 * size * 5 * 2, qt.name
    assert {"IQ2_XXS", "IQ1_S", "IQ1_M", "Q4_K", "Q6_K", "BF16", "TQ1_0", "TQ2_0", "MXFP4"} <= set(totals.type_bytes)


def test_metadata_of_every_value_type_round_trips(tmp_path):
    md = {
        "t.u8": Typed(200, "u8"), "t.i8": Typed(-100, "i8"), "t.u16": Typed(60000, "u16"),
        "t.i16": Typed(-30000, "i16"), "t.u32": Typed(4_000_000_000, "u32"), "t.i32": Typed(-2_000_000_000, "i32"),
        "t.u64": Typed(2**63 + 5, "u64"), "t.i64": Typed(-(2**62), "i64"), "t.f32": 1.5,
        "t.f64": Typed(2.25, "f64"), "t.bool": True, "t.str": "héllo",
        "t.ints": Typed([1, 2, 3], "i32"), "t.floats": [0.5, 0.25], "t.strs": ["a", "bc"],
        "t.big_ints": Typed([i % 65536 for i in range(100_000)], "u16"), "t.big_strs": [f"s{i}" for i in range(5000)],
        "tokenizer.chat_template": "x" * 200_000,
    }
    path = write_header_only_gguf(tmp_path / "md.gguf", GgufSpec("llama", md, (TensorSpec("a", (4,)),)))
    got = read_header(path, TensorTotals()).metadata
    for key in ("t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32", "t.u64", "t.i64", "t.f64", "t.ints"):
        assert got[key] == md[key].value, key
    assert got["t.f32"] == 1.5 and got["t.bool"] is True and got["t.str"] == "héllo"
    assert got["t.floats"] == [0.5, 0.25] and got["t.strs"] == ["a", "bc"]
    assert got["t.big_ints"] == ArrayInfo("u16", 100_000)
    assert got["t.big_strs"] == ArrayInfo("string", 5000)
    assert got["tokenizer.chat_template"] == LongString(200_000)


def test_per_layer_arrays_report_the_largest_entry(tmp_path):
    spec = small_spec().with_metadata(**{"llama.attention.head_count_kv": Typed([2, 1], "i32"),
                                         "llama.feed_forward_length": Typed([512, 256], "i32")})
    m = inspect_model(write_header_only_gguf(tmp_path / "arr.gguf", spec))
    assert (m.num_key_value_heads, m.intermediate_size) == (2, 512)


def test_uniform_spec_gives_placement_exact_layer_sizes(tmp_path):
    spec = uniform_spec(n_layers=6, layer_bytes=gib(20), embd_bytes=gib(1), output_bytes=gib(1.5))
    m = inspect_model(write_header_only_gguf(tmp_path / "big.gguf", spec, shards=3))
    assert m.layer_bytes == (gib(20),) * 6
    assert m.non_repeating_bytes["token_embd"] == gib(1) and m.non_repeating_bytes["output"] == gib(1.5)
    assert len(m.files) == 3


def test_vocab_falls_back_to_the_token_embedding(tmp_path):
    spec = small_spec()
    md = {k: v for k, v in spec.metadata.items() if k != "llama.vocab_size"}
    m = inspect_model(write_header_only_gguf(tmp_path / "nv.gguf", GgufSpec("llama", md, spec.tensors)))
    assert m.vocab_size == 320


def test_old_deepseek_conversions_cache_full_k_and_v(tmp_path):
    """Files converted before llama.cpp's MLA cache lack *_mla keys: K and V are cached per head."""
    spec = deepseek_r1_spec(tokenizer=False)
    md = {k: v for k, v in spec.metadata.items() if "_mla" not in k}
    md.update({"deepseek2.attention.head_count_kv": 128, "deepseek2.attention.key_length": 192,
               "deepseek2.attention.value_length": 128})
    m = inspect_model(write_header_only_gguf(tmp_path / "old.gguf", GgufSpec("deepseek2", md, spec.tensors[:40])))
    assert (m.kv_cache.kind, m.kv_cache.k_elements, m.kv_cache.v_elements) == ("mha", 128 * 192, 128 * 128)


def test_mmproj_beside_the_model_is_the_vision_tower(tmp_path):
    model = write_header_only_gguf(tmp_path / "m.gguf", small_spec())
    w = GGUFWriter(tmp_path / "mmproj-m-f16.gguf", "clip")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.block_count", 24)
    w.add_uint32("clip.vision.embedding_length", 1024)
    w.add_tensor("v.blk.0.attn_q.weight", np.zeros((1024, 1024), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = inspect_model(model)
    assert m.vision and (m.vision.architecture, m.vision.num_hidden_layers, m.vision.hidden_size) == ("mlp", 24, 1024)
    assert m.vision.weight_bytes == 1024 * 1024 * 2
    assert m.files[-1].endswith("mmproj-m-f16.gguf")
    with pytest.raises(InvalidInput, match="multimodal projector"):
        inspect_model(tmp_path / "mmproj-m-f16.gguf")


# --------------------------------------------------------------------------- bad input


def build(*, version=3, kv=(), tensors=(), magic=b"GGUF", n_tensors=None, n_kv=None) -> bytes:
    """A GGUF header byte by byte, so tests can put any value at any field."""
    def s(x: bytes | str) -> bytes:
        b = x.encode() if isinstance(x, str) else x
        return struct.pack("<Q", len(b)) + b

    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kv) if n_kv is None else n_kv)
    for key, vtype, payload in kv:
        out += s(key) + struct.pack("<I", vtype) + payload
    for name, shape, ttype, offset in tensors:
        out += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", ttype, offset)
    return out


ARCH = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(("data", "message"), [
    (b"", "truncated"),
    (b"GGU", "truncated"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (build(version=1), "version 1"),
    (build(version=7), "unsupported GGUF version 7"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (build(n_tensors=2**60), "absurd tensor count"),
    (build(n_kv=2**60), "absurd metadata count"),
    (build(kv=[("k", 8, struct.pack("<Q", 10 * 10**9) + b"x")]), "string length 10000000000 exceeds"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**63) + bytes(16), "string length"),
    (build(kv=[("k", 99, b"")]), "unknown metadata value type 99"),
    (build(kv=[("k", 9, struct.pack("<IQ", 9, 1))]), "nested arrays"),
    (build(kv=[("k", 9, struct.pack("<IQ", 8, 2**61))]), "array of 2305843009213693952 strings"),
    (build(kv=[("k", 9, struct.pack("<IQ", 4, 2**62))]), "needs"),
    (build(kv=[("k", 9, struct.pack("<IQ", 42, 1))]), "unknown array element type 42"),
    (build(kv=[("k", 4, b"\x01\0\0\0"), ("k", 4, b"\x01\0\0\0")]), "duplicate metadata key 'k'"),
    (build(kv=[ARCH], tensors=[("t", (32,), 99, 0)]), "unknown ggml tensor type 99"),
    (build(kv=[ARCH], tensors=[("t", (32,), 31, 0)]), "Q4_0_4_4.*removed"),
    (build(kv=[ARCH], tensors=[("t", (33,), 2, 0)]), "not a multiple of Q4_0's block size 32"),
    (build(kv=[ARCH], tensors=[("t", (1, 1, 1, 1, 1), 0, 0)]), "5 dimensions"),
    (build(kv=[ARCH], tensors=[("t", (2**40, 2**40), 0, 0)]), "overflows"),
    (build(kv=[ARCH], tensors=[("t", (4,), 0, 0), ("t", (4,), 0, 32)]), "duplicate tensor 't'"),
    (build(kv=[ARCH], tensors=[("t", (4,), 0, 0), ("u", (4,), 0, 16)]), "offset 16, expected 32"),
    (build(kv=[ARCH], tensors=[("x" * 64, (4,), 0, 0)]), "tensor name of 64 bytes"),
    (build(kv=[("general.alignment", 4, struct.pack("<I", 3))]), "power of two"),
])
def test_hostile_headers_get_invalid_input_naming_file_and_offset(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(InvalidInput, match=message) as exc:
        read_model(path)
    assert str(path) in str(exc.value)


def test_errors_name_the_offset_of_the_bad_field(tmp_path):
    data = build(kv=[ARCH], tensors=[("t", (32,), 99, 0)])
    path = write(tmp_path, data)
    type_offset = len(data) - 12  # u32 type, then u64 offset
    with pytest.raises(InvalidInput, match=f"at offset {type_offset}"):
        read_model(path)


def test_every_truncation_of_a_header_is_invalid_input(tmp_path):
    base = llama_spec(n_layers=1, hidden=32, heads=2, kv_heads=1, ffn=64, vocab=40, ctx=64)
    spec = base.with_metadata(**{"tokenizer.ggml.tokens": [f"t{i}" for i in range(40)],
                                 "tokenizer.ggml.scores": [0.0] * 40, "general.tags": ["a", "b"]})
    full = write_header_only_gguf(tmp_path / "full.gguf", spec).read_bytes()
    assert 1000 < len(full) < 3000
    cut = tmp_path / "cut.gguf"
    for n in range(len(full)):
        cut.write_bytes(full[:n])
        with pytest.raises(InvalidInput):
            inspect_model(cut)


def test_tensor_data_cut_short_is_truncation_not_a_header_only_file(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidInput, match="truncated: tensor data ends at"):
        inspect_model(path)


def test_missing_required_keys_are_named(tmp_path):
    spec = small_spec()
    md = {k: v for k, v in spec.metadata.items() if k != "llama.block_count"}
    path = write_header_only_gguf(tmp_path / "nb.gguf", GgufSpec("llama", md, spec.tensors))
    with pytest.raises(InvalidInput, match=r"'llama.block_count' is missing"):
        inspect_model(path)
    absurd = write_header_only_gguf(tmp_path / "ab.gguf", spec.with_metadata(**{"llama.block_count": 2**40}))
    with pytest.raises(InvalidInput, match="absurd"):
        inspect_model(absurd)
    wrong = write_header_only_gguf(tmp_path / "wr.gguf", spec.with_metadata(**{"llama.block_count": "many"}))
    with pytest.raises(InvalidInput, match="must be an integer"):
        inspect_model(wrong)


def test_missing_shard_is_named(tmp_path):
    first = write_header_only_gguf(tmp_path / "m.gguf", small_spec(), shards=3)
    shard_paths(tmp_path / "m.gguf", 3)[1].unlink()
    with pytest.raises(InvalidInput, match="missing shard 2 of 3") as exc:
        inspect_model(first)
    assert "m-00002-of-00003.gguf" in str(exc.value)


def test_shards_that_disagree_are_refused(tmp_path):
    a = write_header_only_gguf(tmp_path / "a" / "m.gguf", small_spec(), shards=2)
    write_header_only_gguf(tmp_path / "b" / "m.gguf", small_spec(), shards=3)
    other = shard_paths(tmp_path / "b" / "m.gguf", 3)[1]
    shard_paths(tmp_path / "a" / "m.gguf", 2)[1].write_bytes(other.read_bytes())  # split.count 3 in a 2-way split
    with pytest.raises(InvalidInput, match=r"split.count is 3, the first shard says 2"):
        inspect_model(a)
    renamed = tmp_path / "a" / "renamed.gguf"
    renamed.write_bytes(a.read_bytes())
    with pytest.raises(InvalidInput, match="file name is not"):
        inspect_model(renamed)


def test_split_tensor_count_must_add_up(tmp_path):
    spec = small_spec()
    first = write_header_only_gguf(tmp_path / "m.gguf", spec, shards=2)
    second = shard_paths(tmp_path / "m.gguf", 2)[1]
    # Rewrite the second shard with one tensor fewer.
    half = spec.tensors[len(spec.tensors) // 2:-1]
    w = GGUFWriter(second, "llama")
    w.kv_data[0].clear()
    w.add_key_value("split.no", 1, GGUFValueType.UINT16)
    w.add_key_value("split.count", 2, GGUFValueType.UINT16)
    w.add_key_value("split.tensors.count", len(spec.tensors), GGUFValueType.INT32)
    for t in half:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes,
                          raw_dtype=GGMLQuantizationType[t.ggml_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(InvalidInput, match=r"hold 20 tensors, split.tensors.count says 21"):
        inspect_model(first)


def test_not_a_model_and_no_such_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInput, match="not a model"):
        inspect_model(tmp_path / "notes.txt")
    with pytest.raises(InvalidInput, match="no such file"):
        inspect_model(tmp_path / "absent.gguf")
    with pytest.raises(InvalidInput, match=r"no config.json and no .gguf"):
        inspect_model(tmp_path)


def test_retyped_stand_in_changes_the_layer_sizes(tmp_path):
    from agentd.testing.gguf import retype

    base = small_spec(weight_type="F16")
    q = retype(base, {"ffn_down": "Q8_0"}, names=["blk.1.ffn_down.weight"])
    m = inspect_model(write_header_only_gguf(tmp_path / "q.gguf", q))
    assert m.layer_bytes[0] == base.layer_bytes[0]
    assert m.layer_bytes[1] == base.layer_bytes[1] - 512 * 256 * 2 + 512 * 256 // 32 * 34
