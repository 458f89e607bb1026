"""Hugging Face directories into ModelInfo: published configs, safetensors headers, the index, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from agentd.errors import InvalidInput
from agentd.modelinfo import inspect_model

FIXTURES = Path(__file__).parent / "fixtures" / "hf"

# Published facts: model cards and the configs' own numbers; parameters in billions (text model).
PUBLISHED = {
    # name: (layers, heads, kv heads, hidden, head_dim, vocab, context, params_B)
    "Llama-3.1-8B-Instruct": (32, 32, 8, 4096, 128, 128256, 131072, 8.03),
    "Llama-3.1-70B-Instruct": (80, 64, 8, 8192, 128, 128256, 131072, 70.55),
    "Llama-3.1-405B-Instruct": (126, 128, 8, 16384, 128, 128256, 131072, 405.85),
    "Qwen2.5-7B-Instruct": (28, 28, 4, 3584, 128, 152064, 32768, 7.62),
    "Qwen2.5-72B-Instruct": (80, 64, 8, 8192, 128, 152064, 32768, 72.7),
    "Mixtral-8x7B-Instruct-v0.1": (32, 32, 8, 4096, 128, 32000, 32768, 46.7),
    "DeepSeek-R1": (61, 128, 128, 7168, 192, 129280, 163840, 671),
    "Qwen2-VL-7B-Instruct": (28, 28, 4, 3584, 128, 152064, 32768, 7.62),
    "llava-1.5-7b-hf": (32, 32, 32, 4096, 128, 32064, 4096, 6.74),
    "Llama-3.2-11B-Vision-Instruct": (40, 32, 8, 4096, 128, 128256, 131072, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_parse_to_published_facts(name):
    layers, heads, kv, hidden, head_dim, vocab, ctx, params = PUBLISHED[name]
    m = inspect_model(FIXTURES / name)
    assert m.format == "safetensors"
    assert (m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads) == (layers, heads, kv)
    assert (m.hidden_size, m.head_dim, m.vocab_size, m.context_length) == (hidden, head_dim, vocab, ctx)
    if params is not None:
        assert m.extra["estimated_parameters"] / 1e9 == pytest.approx(params, rel=0.005)
    assert m.extra["weight_bytes_source"] == "config-estimate"
    assert len(m.layer_bytes) == layers
    assert m.total_weight_bytes == sum(m.layer_bytes) + sum(m.non_repeating_bytes.values()) + (
        m.vision.weight_bytes or 0 if m.vision else 0)
    assert m.files == (str(FIXTURES / name / "config.json"),)


def test_llama_gqa_kv_cache_and_bf16_size():
    m = inspect_model(FIXTURES / "Llama-3.1-70B-Instruct")
    assert (m.kv_cache.kind, m.kv_cache.k_elements, m.kv_cache.v_elements) == ("gqa", 1024, 1024)
    assert m.kv_cache.bytes_per_token(m.num_hidden_layers) == 327680  # 320 KiB per token at fp16
    assert m.dtype == "bfloat16" and m.quantization is None
    assert m.total_weight_bytes == pytest.approx(141.1e9, rel=0.01)
    assert m.moe is None and m.vision is None


def test_deepseek_r1_mla_moe_and_fp8_blocks():
    m = inspect_model(FIXTURES / "DeepSeek-R1")
    kv = m.kv_cache
    assert (kv.kind, kv.k_elements, kv.v_elements, kv.kv_lora_rank, kv.qk_rope_head_dim) == ("mla", 576, 0, 512, 64)
    assert m.moe and (m.moe.num_experts, m.moe.experts_per_token, m.moe.shared_experts) == (256, 8, 1)
    assert m.quantization and (m.quantization.method, m.quantization.bits, m.quantization.group_size) == (
        "fp8", 8, 128)
    # FP8 linear weights: about one byte per parameter (the published checkpoint, with its MTP layer, is 688.6 GB).
    assert m.total_weight_bytes == pytest.approx(673e9, rel=0.01)
    dense, moe = m.layer_bytes[0], m.layer_bytes[3]
    assert dense == m.layer_bytes[2] and moe == m.layer_bytes[60] and moe > 15 * dense


def test_mixtral_experts():
    m = inspect_model(FIXTURES / "Mixtral-8x7B-Instruct-v0.1")
    assert m.moe and (m.moe.num_experts, m.moe.experts_per_token, m.moe.shared_experts) == (8, 2, 0)


@pytest.mark.parametrize(("name", "method", "bits", "group", "gb"), [
    ("Qwen2.5-7B-Instruct-AWQ", "awq", 4, 128, 5.58),  # published repository size
    ("Meta-Llama-3.1-8B-Instruct-GPTQ-INT4", "gptq", 4, 128, 5.73),
])
def test_gptq_and_awq_quantization(name, method, bits, group, gb):
    m = inspect_model(FIXTURES / name)
    assert m.quantization and (m.quantization.method, m.quantization.bits, m.quantization.group_size) == (
        method, bits, group)
    assert m.dtype == "float16"
    assert m.total_weight_bytes / 1e9 == pytest.approx(gb, rel=0.03)


def test_multimodal_text_model_from_nested_config_and_vision_beside_it():
    m = inspect_model(FIXTURES / "Llama-3.2-11B-Vision-Instruct")
    assert m.architecture == "MllamaForConditionalGeneration"
    assert m.extra["text_config_key"] == "text_config"
    assert m.vision and (m.vision.architecture, m.vision.num_hidden_layers, m.vision.hidden_size) == (
        "mllama_vision_model", 32 + 8, 1280)
    q = inspect_model(FIXTURES / "Qwen2-VL-7B-Instruct")
    assert q.vision and (q.vision.num_hidden_layers, q.vision.hidden_size) == (32, 1280)  # depth, embed_dim
    assert q.vision.weight_bytes / 2 / 1e6 == pytest.approx(675, rel=0.1)  # Qwen2-VL's 675M ViT
    llava = inspect_model(FIXTURES / "llava-1.5-7b-hf")  # text_config leans on LlamaConfig defaults
    assert llava.intermediate_size == 11008 and llava.kv_cache.kind == "mha"
    assert llava.vision and llava.vision.num_hidden_layers == 24


def test_config_json_path_is_accepted():
    assert inspect_model(FIXTURES / "Qwen2.5-7B-Instruct" / "config.json").num_hidden_layers == 28


# --------------------------------------------------------------------------- safetensors


TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "max_position_embeddings": 512, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def tiny_tensors(layers: int = 2) -> dict[str, np.ndarray]:
    t = {"model.embed_tokens.weight": np.zeros((100, 64), np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = np.zeros((64, 64), np.float16)
        t[p + "self_attn.k_proj.weight"] = np.zeros((32, 64), np.float16)
        t[p + "self_attn.v_proj.weight"] = np.zeros((32, 64), np.float16)
        t[p + "self_attn.o_proj.weight"] = np.zeros((64, 64), np.float16)
        t[p + "mlp.gate_proj.weight"] = np.zeros((128, 64), np.float16)
        t[p + "mlp.up_proj.weight"] = np.zeros((128, 64), np.float16)
        t[p + "mlp.down_proj.weight"] = np.zeros((64, 128), np.float16)
        t[p + "input_layernorm.weight"] = np.zeros((64,), np.float16)
        t[p + "post_attention_layernorm.weight"] = np.zeros((64,), np.float16)
    t["model.norm.weight"] = np.zeros((64,), np.float16)
    t["lm_head.weight"] = np.zeros((100, 64), np.float16)
    return t


LAYER = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3 + 64 * 2)


def hf_dir(tmp_path: Path, tensors: dict[str, np.ndarray], *, shards: int = 2, config: dict | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config or TINY))
    names = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(d / fname))
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(a.nbytes for a in part.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    return d


def test_layer_bytes_come_from_the_tensor_names(tmp_path):
    d = hf_dir(tmp_path, tiny_tensors())
    m = inspect_model(d)
    assert m.extra["weight_bytes_source"] == "safetensors-headers"
    assert m.layer_bytes == (LAYER, LAYER)
    assert m.non_repeating_bytes == {"token_embd": 100 * 64 * 2, "output": 100 * 64 * 2, "output_norm": 128,
                                     "other": 0}
    assert m.total_weight_bytes == 2 * LAYER + 2 * 100 * 64 * 2 + 128
    assert len(m.files) == 4 and m.files[1].endswith("model.safetensors.index.json")


def test_mtp_layers_beyond_the_count_and_vision_tensors_are_kept_apart(tmp_path):
    t = tiny_tensors(layers=3)  # config says 2: layer 2 is like DeepSeek's MTP layer
    t["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((256, 64), np.float16)
    t["multi_modal_projector.linear_1.weight"] = np.zeros((64, 64), np.float16)
    m = inspect_model(hf_dir(tmp_path, t))
    assert m.layer_bytes == (LAYER, LAYER)
    assert m.non_repeating_bytes["other"] == LAYER
    assert m.vision is None  # no vision_config: the bytes still count, outside the layers
    assert m.total_weight_bytes == 3 * LAYER + 2 * 100 * 64 * 2 + 128 + (256 + 64) * 64 * 2


def test_single_file_without_index(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    save_file(tiny_tensors(), str(d / "model.safetensors"))
    m = inspect_model(d)
    assert m.layer_bytes == (LAYER, LAYER) and m.files[-1].endswith("model.safetensors")


def test_index_alone_spreads_total_size_over_the_layers(tmp_path):
    d = hf_dir(tmp_path, tiny_tensors())
    for f in d.glob("*.safetensors"):
        f.unlink()
    m = inspect_model(d)
    assert m.extra["weight_bytes_source"] == "index-total-size"
    total = 2 * LAYER + 2 * 100 * 64 * 2 + 128
    assert m.total_weight_bytes == total
    assert sum(m.layer_bytes) + sum(m.non_repeating_bytes.values()) == total
    assert m.layer_bytes[0] == m.layer_bytes[1]


def test_a_missing_shard_is_named(tmp_path):
    d = hf_dir(tmp_path, tiny_tensors(), shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(InvalidInput, match=r"missing shard model-00002-of-00003\.safetensors"):
        inspect_model(d)


def st(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x01", "truncated"),
    (struct.pack("<Q", 10**12) + b"{}", "header length 1000000000000 is absurd"),
    (st(b"{nope"), "header is not JSON"),
    (st(b"[]"), "not a JSON object"),
    (st(b'{"a":{"dtype":"F16","shape":[2],"data_offsets":[4,0]}}'), "data_offsets must be"),
    (st(b'{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}}'), "needs 6 bytes"),
    (st(b'{"a":{"dtype":"F16","shape":[-2],"data_offsets":[0,4]}}'), "shape must be"),
    (st(b'{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}', b"\0\0"), "truncated"),
])
def test_bad_safetensors_headers(tmp_path, raw, message):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    (d / "model.safetensors").write_bytes(raw)
    with pytest.raises(InvalidInput, match=message) as exc:
        inspect_model(d)
    assert "model.safetensors" in str(exc.value)


def test_weight_map_cannot_point_outside_the_directory(tmp_path):
    d = hf_dir(tmp_path, tiny_tensors())
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(InvalidInput, match="outside the model directory"):
        inspect_model(d)


# --------------------------------------------------------------------------- bad config.json


def config_dir(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(text)
    return d


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", r"not valid JSON: .* at line 1 column 2"),
    ("[1, 2]", "must hold a JSON object"),
    ("[" * 100_000, "not valid JSON"),
    (json.dumps({k: v for k, v in TINY.items() if k != "num_attention_heads"}),
     r"key 'num_attention_heads' is missing \(or 'n_head'"),
    (json.dumps({**TINY, "num_hidden_layers": "32"}), "key 'num_hidden_layers' must be an integer"),
    (json.dumps({**TINY, "num_hidden_layers": 0}), "must be at least 1"),
    (json.dumps({**TINY, "num_hidden_layers": 10**9}), "absurd"),
    (json.dumps({**TINY, "hidden_size": 1e300}), "absurd"),
    (json.dumps({k: v for k, v in TINY.items() if k != "vocab_size"}), "key 'vocab_size' is missing"),
    (json.dumps({"model_type": "llava", "text_config": [1]}), "key 'text_config' must be an object"),
    (json.dumps({"model_type": "llava", "text_config": {"model_type": "gemma"}}),
     "key 'text_config.num_hidden_layers' is missing"),
    (json.dumps({**TINY, "quantization_config": {"bits": 4}}), "key 'quantization_config.quant_method' is missing"),
    (json.dumps({**TINY, "quantization_config": {"quant_method": "gptq"}}), "quantization_config.bits' is missing"),
    (json.dumps({**TINY, "quantization_config": {"quant_method": "fp8", "weight_block_size": "128"}}),
     "weight_block_size' must be a list"),
    (json.dumps({**TINY, "num_local_experts": 8}), "key 'num_experts_per_tok' is missing"),
])
def test_bad_config_json_names_the_file_and_key(tmp_path, text, message):
    d = config_dir(tmp_path, text)
    with pytest.raises(InvalidInput, match=message) as exc:
        inspect_model(d)
    assert str(d / "config.json") in str(exc.value)


def test_nan_and_infinite_rope_factors_do_not_break_the_context(tmp_path):
    cfg = {**TINY, "rope_scaling": {"rope_type": "yarn", "factor": float("inf"),
                                    "original_max_position_embeddings": 4096}}
    assert inspect_model(config_dir(tmp_path, json.dumps(cfg))).context_length == 512
