"""ggml tensor types and llama.cpp file types: the table that turns a shape into bytes.

Written from ggml.h's `enum ggml_type` and the block structs in
ggml-common.h (a quantized row is stored as ne[0] / block_size blocks of
type_size bytes each). The ids are part of the GGUF file format, so the table
is fixed data; tests cross-check it against the `gguf` package's copy.

Ids that ggml once defined and has since removed (Q4_2, Q4_3, the Q4_0_x_y and
IQ4_NL_x_y repacked layouts) are listed with `removed=True`: llama.cpp refuses
files that use them, and so do we, with a message that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.errors import InvalidInput

QK_K = 256  # super-block size of the K-quants and the i-quants


@dataclass(frozen=True, slots=True)
class GgmlType:
    id: int
    name: str
    block_size: int  # elements per block (along ne[0])
    type_size: int  # bytes per block
    removed: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size if self.block_size else 0.0


def _t(id_: int, name: str, block: int, size: int, removed: bool = False) -> GgmlType:
    return GgmlType(id_, name, block, size, removed)


GGML_TYPES: dict[int, GgmlType] = {t.id: t for t in (
    _t(0, "F32", 1, 4),
    _t(1, "F16", 1, 2),
    _t(2, "Q4_0", 32, 2 + 16),
    _t(3, "Q4_1", 32, 2 + 2 + 16),
    _t(4, "Q4_2", 0, 0, removed=True),
    _t(5, "Q4_3", 0, 0, removed=True),
    _t(6, "Q5_0", 32, 2 + 4 + 16),
    _t(7, "Q5_1", 32, 2 + 2 + 4 + 16),
    _t(8, "Q8_0", 32, 2 + 32),
    _t(9, "Q8_1", 32, 4 + 4 + 32),
    _t(10, "Q2_K", QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    _t(11, "Q3_K", QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    _t(12, "Q4_K", QK_K, 2 + 2 + QK_K // 2 + 12),
    _t(13, "Q5_K", QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    _t(14, "Q6_K", QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    _t(15, "Q8_K", QK_K, 4 + QK_K + QK_K // 8),
    _t(16, "IQ2_XXS", QK_K, 2 + QK_K // 4),
    _t(17, "IQ2_XS", QK_K, 2 + QK_K // 4 + QK_K // 32),
    _t(18, "IQ3_XXS", QK_K, 2 + QK_K // 4 + QK_K // 8),
    _t(19, "IQ1_S", QK_K, 2 + QK_K // 8 + QK_K // 16),
    _t(20, "IQ4_NL", 32, 2 + 16),
    _t(21, "IQ3_S", QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    _t(22, "IQ2_S", QK_K, 2 + QK_K // 4 + QK_K // 16),
    _t(23, "IQ4_XS", QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    _t(24, "I8", 1, 1),
    _t(25, "I16", 1, 2),
    _t(26, "I32", 1, 4),
    _t(27, "I64", 1, 8),
    _t(28, "F64", 1, 8),
    _t(29, "IQ1_M", QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    _t(30, "BF16", 1, 2),
    _t(31, "Q4_0_4_4", 0, 0, removed=True),
    _t(32, "Q4_0_4_8", 0, 0, removed=True),
    _t(33, "Q4_0_8_8", 0, 0, removed=True),
    _t(34, "TQ1_0", QK_K, 2 + 4 * 13),
    _t(35, "TQ2_0", QK_K, 2 + QK_K // 4),
    _t(36, "IQ4_NL_4_4", 0, 0, removed=True),
    _t(37, "IQ4_NL_4_8", 0, 0, removed=True),
    _t(38, "IQ4_NL_8_8", 0, 0, removed=True),
    _t(39, "MXFP4", 32, 1 + 16),
    _t(40, "NVFP4", 64, 4 + 32),
    _t(41, "Q1_0", 128, 2 + 16),
)}

GGML_TYPES_BY_NAME: dict[str, GgmlType] = {t.name: t for t in GGML_TYPES.values()}

# llama.cpp's `enum llama_ftype` (general.file_type): what a quantizer was asked for.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_1_SOME_F16", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS",
    24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS",
    31: "IQ1_M", 32: "BF16", 33: "Q4_0_4_4", 34: "Q4_0_4_8", 35: "Q4_0_8_8", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}
FILE_TYPE_IDS: dict[str, int] = {v: k for k, v in FILE_TYPES.items()}


def ggml_type(type_id: int, *, where: str | None = None) -> GgmlType:
    """The type for an id read from a file; unknown or removed ids are the file's fault."""
    t = GGML_TYPES.get(type_id)
    if t is None:
        raise InvalidInput(f"unknown ggml tensor type {type_id} (known: 0..{max(GGML_TYPES)})", where=where)
    if t.removed:
        raise InvalidInput(f"ggml tensor type {type_id} ({t.name}) was removed from llama.cpp; "
                           "re-quantize the model with a current llama.cpp", where=where)
    return t


def ggml_type_by_name(name: str | int | GgmlType) -> GgmlType:
    """Accept a name ("Q4_K", "bf16"), an id or a GgmlType; for code and tests that build files."""
    if isinstance(name, GgmlType):
        return name
    if isinstance(name, int):
        return ggml_type(name)
    t = GGML_TYPES_BY_NAME.get(name.upper())
    if t is None or t.removed:
        raise InvalidInput(f"unknown ggml tensor type {name!r}")
    return t


def tensor_nbytes(t: GgmlType, shape: tuple[int, ...] | list[int], *, where: str | None = None) -> int:
    """Bytes of a tensor with ggml shape `shape` (ne[0] first, the row length).

    ggml stores each row as whole blocks, so ne[0] must be a multiple of the
    block size; llama.cpp refuses the file otherwise, and so do we.
    """
    ne0 = shape[0] if shape else 1  # a 0-d tensor holds one element, as in ggml (ne[] defaults to 1)
    if ne0 % t.block_size:
        raise InvalidInput(f"tensor row length {ne0} is not a multiple of {t.name}'s block size {t.block_size}",
                           where=where)
    n = (ne0 // t.block_size) * t.type_size
    for d in shape[1:]:
        n *= d
    return n
