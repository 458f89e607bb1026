"""Fuzzing the readers: whatever the bytes, the answer is a ModelInfo or InvalidInput, soon.

Mutations start from valid headers (the gguf writer's output, real safetensors
files, real configs) so that they reach deep into the parsers instead of
failing at the magic. Hypothesis' deadline catches a hang; any exception
other than InvalidInput fails the test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from agentd.errors import InvalidInput
from agentd.modelinfo import inspect_model
from agentd.testing.gguf import Typed, deepseek_r1_spec, llama_spec, write_header_only_gguf
from agentd.types import ModelInfo

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FUZZ = settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)
INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1, 10 * 10**9]


@pytest.fixture(scope="module")
def gguf_seeds(tmp_path_factory) -> list[bytes]:
    d = tmp_path_factory.mktemp("seeds")
    small = llama_spec(n_layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=30, ctx=128)
    small = small.with_metadata(**{"tokenizer.ggml.tokens": [f"t{i}" for i in range(30)],
                                   "tokenizer.ggml.scores": [0.5] * 30, "general.tags": ["x"],
                                   "llama.attention.head_count_kv": Typed([2, 1], "i32")})
    ds = deepseek_r1_spec(tokenizer=False)
    ds = type(ds)(ds.architecture, dict(ds.metadata), ds.tensors[:25])
    return [write_header_only_gguf(d / "a.gguf", small).read_bytes(),
            write_header_only_gguf(d / "b.gguf", ds).read_bytes()]


def check(path: Path) -> None:
    try:
        assert isinstance(inspect_model(path), ModelInfo)
    except InvalidInput:
        pass


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("u64"), st.integers(0, 10**6), st.sampled_from(INTERESTING_U64)),
    st.tuples(st.just("u32"), st.integers(0, 10**6), st.sampled_from([0, 1, 8, 9, 13, 31, 99, 2**31, 2**32 - 1])),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
)


@FUZZ
@given(seed=st.integers(0, 1), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_gguf_headers_give_model_info_or_invalid_input(tmp_path, gguf_seeds, seed, mutations):
    data = bytearray(gguf_seeds[seed])
    for kind, pos, value in mutations:
        if not data:
            break
        pos %= len(data)
        if kind == "byte":
            data[pos] = value
        elif kind == "u64":
            data[pos:pos + 8] = struct.pack("<Q", value)
        elif kind == "u32":
            data[pos:pos + 4] = struct.pack("<I", value)
        else:
            del data[pos:]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(data))
    check(path)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_after_the_magic(tmp_path, data):
    path = tmp_path / "rand.gguf"
    path.write_bytes(b"GGUF" + data)
    check(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size",
               "intermediate_size", "max_position_embeddings", "head_dim", "rope_scaling", "quantization_config",
               "text_config", "vision_config", "n_routed_experts", "num_local_experts", "num_experts_per_tok",
               "kv_lora_rank", "qk_rope_head_dim", "moe_intermediate_size", "tie_word_embeddings", "torch_dtype",
               "first_k_dense_replace", "mlp_only_layers", "architectures"]


@FUZZ
@given(name=st.sampled_from(sorted(p.name for p in FIXTURES.iterdir())),
       changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=3),
       nested=st.booleans())
def test_mutated_configs_give_model_info_or_invalid_input(tmp_path, name, changes, nested):
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    target = cfg["text_config"] if nested and isinstance(cfg.get("text_config"), dict) else cfg
    target.update(changes)
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    check(d)


@pytest.fixture(scope="module")
def safetensors_seed(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": np.zeros((4, 8), np.float16),
               "model.embed_tokens.weight": np.zeros((10, 8), np.float32)}, str(p))
    return p.read_bytes()


@FUZZ
@given(mutations=st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**5)))
def test_mutated_safetensors_give_model_info_or_invalid_input(tmp_path, safetensors_seed, mutations, cut):
    data = bytearray(safetensors_seed)
    for pos, value in mutations:
        data[pos % len(data)] = value
    if cut is not None:
        del data[cut % len(data):]
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((FIXTURES / "Qwen2.5-7B-Instruct" / "config.json").read_text())
    (d / "model.safetensors").write_bytes(bytes(data))
    check(d)
