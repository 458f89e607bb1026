"""The ggml type table: every id llama.cpp defines, with the block sizes ggml uses."""

from __future__ import annotations

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from agentd.errors import InvalidInput
from agentd.modelinfo.ggml_types import FILE_TYPES, GGML_TYPES, ggml_type, ggml_type_by_name, tensor_nbytes


def test_table_agrees_with_the_gguf_package_for_every_type():
    live = {t.id for t in GGML_TYPES.values() if not t.removed}
    assert live == {int(q) for q in GGMLQuantizationType}
    for q in GGMLQuantizationType:
        t = GGML_TYPES[int(q)]
        assert (t.name, t.block_size, t.type_size) == (q.name, *GGML_QUANT_SIZES[q]), q.name


def test_file_types_agree_with_llama_cpp():
    for ft in LlamaFileType:
        name = ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        assert FILE_TYPES[int(ft)] == name, ft.name


@pytest.mark.parametrize(("name", "shape", "nbytes"), [
    ("F32", (4096, 4096), 4096 * 4096 * 4),
    ("BF16", (7168, 129280), 7168 * 129280 * 2),
    ("Q4_K", (8192, 28672), 8192 // 256 * 144 * 28672),
    ("Q6_K", (8192, 128256), 8192 // 256 * 210 * 128256),
    ("IQ2_XXS", (4096, 14336), 4096 // 256 * 66 * 14336),
    ("IQ1_S", (7168, 2048, 256), 7168 // 256 * 50 * 2048 * 256),
    ("Q8_0", (64,), 2 * 34),
    ("TQ2_0", (256, 2), 2 * 66),
    ("F16", (), 2),
])
def test_tensor_bytes(name, shape, nbytes):
    assert tensor_nbytes(ggml_type_by_name(name), shape) == nbytes


def test_bits_per_weight_of_familiar_types():
    assert ggml_type_by_name("Q4_K").bits_per_weight == 4.5
    assert ggml_type_by_name("Q8_0").bits_per_weight == 8.5
    assert ggml_type_by_name("IQ2_XXS").bits_per_weight == pytest.approx(2.0625)


def test_unknown_and_removed_types_are_invalid_input():
    with pytest.raises(InvalidInput, match="unknown ggml tensor type 1000"):
        ggml_type(1000, where="f.gguf")
    with pytest.raises(InvalidInput, match="removed"):
        ggml_type(31)
    with pytest.raises(InvalidInput, match="unknown ggml tensor type 'Q9_K'"):
        ggml_type_by_name("Q9_K")


def test_row_length_must_be_whole_blocks():
    with pytest.raises(InvalidInput, match="not a multiple of Q4_K's block size 256"):
        tensor_nbytes(ggml_type_by_name("Q4_K"), (100, 4))
