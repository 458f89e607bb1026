"""A bounded GGUF header reader: metadata and tensor infos, never the tensor data.

Why not `gguf.GGUFReader`: it memory-maps the whole file and builds numpy
views of every field, which costs seconds and hundreds of MB on a real
multi-shard model, and it trusts the counts in the file. This reader walks the
header through a small sliding window and checks every count and length
against the bytes left in the file before acting on it, so a corrupt or
hostile file costs at most a pass over its own header and gets an
InvalidInput naming the file and offset.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor
count, u64 metadata count; metadata as (string key, u32 type, value); tensor
infos as (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset);
then padding to `general.alignment` and the data section. Strings are a u64
length and UTF-8 bytes; arrays are a u32 element type, a u64 count, elements.

Big arrays (a 129k-token vocabulary, 127k merges, 129k scores) are skipped:
numeric ones in O(1), string ones by walking their lengths. Only their element
type and count are kept (`ArrayInfo`).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from agentd.errors import InvalidInput
from agentd.modelinfo.ggml_types import ggml_type, tensor_nbytes
from agentd.modelinfo.regular import open_regular

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses tensor names of this many bytes or more

# Bounds that no real model comes near, so that counts in a hostile file cannot
# make us loop or allocate without end.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_ARRAY_STRINGS = 1 << 24
MAX_KEY_BYTES = 1 << 16
KEEP_STRING_BYTES = 1 << 16  # longer metadata strings (chat templates) are skipped, their length kept
KEEP_ARRAY_ITEMS = 1 << 12  # longer arrays are summarised as ArrayInfo
WINDOW = 1 << 20

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)
VALUE_TYPE_NAMES = {
    T_UINT8: "u8", T_INT8: "i8", T_UINT16: "u16", T_INT16: "i16", T_UINT32: "u32", T_INT32: "i32",
    T_FLOAT32: "f32", T_BOOL: "bool", T_STRING: "string", T_ARRAY: "array", T_UINT64: "u64",
    T_INT64: "i64", T_FLOAT64: "f64",
}
_SCALAR = {  # type -> (struct format, size)
    T_UINT8: ("<B", 1), T_INT8: ("<b", 1), T_UINT16: ("<H", 2), T_INT16: ("<h", 2), T_UINT32: ("<I", 4),
    T_INT32: ("<i", 4), T_FLOAT32: ("<f", 4), T_BOOL: ("<?", 1), T_UINT64: ("<Q", 8), T_INT64: ("<q", 8),
    T_FLOAT64: ("<d", 8),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """A metadata array too long to keep: its element type and length (e.g. the vocabulary)."""

    type: str
    count: int


@dataclass(frozen=True, slots=True)
class LongString:
    """A metadata string too long to keep (a chat template, say): only its length in bytes."""

    nbytes: int


@dataclass
class TensorTotals:
    """What the tensor infos add up to; merged over the shards of a split model."""

    total_bytes: int = 0
    count: int = 0
    layer_bytes: dict[int, int] = field(default_factory=dict)  # blk.N.* by N
    role_bytes: dict[str, int] = field(default_factory=dict)  # non-repeating tensors by role
    type_bytes: dict[str, int] = field(default_factory=dict)  # bytes by ggml type name
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # shapes of the non-repeating tensors
    types: dict[str, str] = field(default_factory=dict)  # ggml types of the non-repeating tensors
    names: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class GgufHeader:
    """One file's header: version, metadata (small values; ArrayInfo for long arrays), sizes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensor_count: int
    data_offset: int  # where the data section starts
    data_bytes: int  # what the tensor infos say the data section holds
    file_size: int

    @property
    def header_only(self) -> bool:
        return self.file_size <= self.data_offset


def _role(name: str) -> str:
    """Which non-repeating bucket a tensor belongs to."""
    base = name.split(".", 1)[0]
    return base if base in ("token_embd", "output", "output_norm") else "other"


class _Cursor:
    """Sequential reads over a file through a bounded window; every read is checked against the file size."""

    __slots__ = ("base", "buf", "f", "path", "pos", "size")

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.pos = 0
        self.base = 0
        self.buf = b""

    def fail(self, message: str, at: int | None = None) -> InvalidInput:
        return InvalidInput(message, where=f"{self.path} at offset {self.pos if at is None else at}")

    def need(self, n: int, what: str) -> int:
        """Make n bytes at pos readable; return their index in buf."""
        rel = self.pos - self.base
        if rel + n <= len(self.buf):
            return rel
        if self.pos + n > self.size:
            raise self.fail(f"file is truncated: {what} needs {n} byte(s), {max(0, self.size - self.pos)} left")
        self.f.seek(self.pos)
        self.buf = self.f.read(max(n, WINDOW))
        self.base = self.pos
        if len(self.buf) < n:  # the file shrank under us
            raise self.fail(f"file is truncated: {what} needs {n} byte(s), {len(self.buf)} left")
        return 0

    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"file is truncated: {what} needs {n} byte(s), {self.left()} left")
        self.pos += n

    def u32(self, what: str) -> int:
        i = self.need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, i)[0]

    def u64(self, what: str) -> int:
        i = self.need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, i)[0]

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALAR[vtype]
        i = self.need(size, what)
        self.pos += size
        return struct.unpack_from(fmt, self.buf, i)[0]

    def raw(self, n: int, what: str) -> bytes:
        """n bytes (callers cap n well below the window size)."""
        i = self.need(n, what)
        self.pos += n
        return self.buf[i:i + n]

    def string(self, what: str, limit: int) -> str | LongString:
        """A string, or LongString (skipped) when longer than `limit`; never trusts the length."""
        at = self.pos
        n = self.u64(what)
        if n > self.left():
            raise self.fail(f"{what}: string length {n} exceeds the {self.left()} byte(s) left in the file", at)
        if n > limit:
            self.pos += n
            return LongString(n)
        return self.raw(n, what).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` strings reading only their lengths: the hot loop for vocabularies."""
        unpack = _U64.unpack_from
        remaining = count
        while remaining:
            rel = self.need(8, what)
            buf, end = self.buf, len(self.buf) - 8
            for i in range(remaining):  # a for loop over range is the fastest pure-Python form here
                if rel > end:
                    remaining -= i
                    break
                rel += 8 + unpack(buf, rel)[0]
            else:
                remaining = 0
            self.pos = self.base + rel
            if self.pos > self.size:
                raise self.fail(f"{what}: string data runs past the end of the file ({self.size} bytes)")


def _read_array(c: _Cursor, key: str) -> Any:
    at = c.pos
    etype = c.u32(f"element type of array {key!r}")
    count = c.u64(f"length of array {key!r}")
    if etype == T_ARRAY:
        raise c.fail(f"key {key!r}: nested arrays are not supported by llama.cpp", at)
    if etype == T_STRING:
        if count * 8 > c.left() or count > MAX_ARRAY_STRINGS:
            raise c.fail(f"key {key!r}: array of {count} strings cannot fit in the {c.left()} byte(s) left", at)
        if count <= KEEP_ARRAY_ITEMS // 16:
            items = [c.string(f"item of {key!r}", KEEP_STRING_BYTES) for _ in range(count)]
            if all(isinstance(s, str) for s in items):
                return items
            return ArrayInfo("string", count)
        c.skip_strings(count, f"array {key!r}")
        return ArrayInfo("string", count)
    if etype not in _SCALAR:
        raise c.fail(f"key {key!r}: unknown array element type {etype}", at)
    fmt, size = _SCALAR[etype]
    nbytes = count * size
    if nbytes > c.left():
        raise c.fail(f"key {key!r}: array of {count} {VALUE_TYPE_NAMES[etype]} needs {nbytes} byte(s), "
                     f"{c.left()} left", at)
    if count > KEEP_ARRAY_ITEMS:
        c.skip(nbytes, f"array {key!r}")
        return ArrayInfo(VALUE_TYPE_NAMES[etype], count)
    i = c.need(nbytes, f"array {key!r}")
    c.pos += nbytes
    return list(struct.unpack_from(f"<{count}{fmt[1]}", c.buf, i))


def _read_value(c: _Cursor, vtype: int, key: str) -> Any:
    if vtype == T_STRING:
        return c.string(f"value of {key!r}", KEEP_STRING_BYTES)
    if vtype == T_ARRAY:
        return _read_array(c, key)
    if vtype in _SCALAR:
        return c.scalar(vtype, f"value of {key!r}")
    raise c.fail(f"key {key!r}: unknown metadata value type {vtype}")


def read_header(path: str | os.PathLike[str], totals: TensorTotals, *, block_count: int | None = None,
                split: tuple[int, int] | None = None) -> GgufHeader:
    """Read one GGUF file's header, adding its tensors to `totals`; raises InvalidInput.

    `block_count` (from the first shard) says which `blk.N` are repeating
    layers; when None it is taken from this file's `<arch>.block_count`.
    `split` = (split.no, split.count) this file must declare, checked before
    its tensors are read.
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            return _parse(_Cursor(f, path, size), totals, block_count, split)
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror or exc}", where=str(path)) from None


def _parse(c: _Cursor, totals: TensorTotals, block_count: int | None, split: tuple[int, int] | None) -> GgufHeader:
    i = c.need(4, "magic")
    magic = c.buf[i:i + 4]
    if magic != GGUF_MAGIC:
        raise c.fail("not a GGUF file: it does not start with the GGUF magic")  # never echo a file's bytes
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise c.fail("big-endian GGUF files are not supported", 4)
        if version == 1:
            raise c.fail("GGUF version 1 is no longer supported by llama.cpp; re-convert the model", 4)
        raise c.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
    at = c.pos
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # Each tensor info takes at least 24 bytes and each key/value at least 13.
    if n_tensors > MAX_TENSORS or n_tensors * 24 > c.left():
        raise c.fail(f"absurd tensor count {n_tensors} for a file of {c.size} bytes", at)
    if n_kv > MAX_KV or n_kv * 13 > c.left():
        raise c.fail(f"absurd metadata count {n_kv} for a file of {c.size} bytes", at + 8)

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        at = c.pos
        key = c.string("metadata key", MAX_KEY_BYTES)
        if not isinstance(key, str):
            raise c.fail(f"metadata key longer than {MAX_KEY_BYTES} bytes", at)
        if key in metadata:
            raise c.fail(f"duplicate metadata key {key!r}", at)
        vat = c.pos
        vtype = c.u32(f"type of {key!r}")
        if vtype not in VALUE_TYPE_NAMES:
            raise c.fail(f"key {key!r}: unknown metadata value type {vtype}", vat)
        metadata[key] = _read_value(c, vtype, key)

    if split is not None:
        no, count = split
        if metadata.get("split.count") != count:
            raise InvalidInput(f"split.count is {metadata.get('split.count')!r}, the first shard says {count}",
                               where=str(c.path))
        if metadata.get("split.no") != no:
            raise InvalidInput(f"split.no is {metadata.get('split.no')!r}, expected {no} from the file name",
                               where=str(c.path))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise InvalidInput(f"general.alignment must be a power of two, got {alignment!r}", where=str(c.path))
    if block_count is None:
        arch = metadata.get("general.architecture")
        bc = metadata.get(f"{arch}.block_count") if isinstance(arch, str) else None
        block_count = bc if isinstance(bc, int) and not isinstance(bc, bool) else 0

    expected_offset = 0
    for _ in range(n_tensors):
        at = c.pos
        name = c.string("tensor name", GGML_MAX_NAME - 1)
        if not isinstance(name, str):
            raise c.fail(f"tensor name of {GGML_MAX_NAME} bytes or more", at)
        if name in totals.names:
            raise c.fail(f"duplicate tensor {name!r}", at)
        n_dims = c.u32(f"dimension count of {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})", at)
        shape = tuple(c.u64(f"shape of {name!r}") for _ in range(n_dims))
        elements = 1
        for d in shape:
            elements *= d
        if elements >= 1 << 63:
            raise c.fail(f"tensor {name!r} shape {list(shape)} overflows", at)
        tat = c.pos
        t = ggml_type(c.u32(f"type of {name!r}"), where=f"{c.path} at offset {tat} (tensor {name!r})")
        nbytes = tensor_nbytes(t, shape, where=f"{c.path} at offset {at} (tensor {name!r})")
        oat = c.pos
        offset = c.u64(f"offset of {name!r}")
        if offset != expected_offset:
            raise c.fail(f"tensor {name!r} has data offset {offset}, expected {expected_offset} "
                         "(tensor data must be contiguous and aligned)", oat)
        expected_offset += -(-nbytes // alignment) * alignment

        totals.names.add(name)
        totals.count += 1
        totals.total_bytes += nbytes
        totals.type_bytes[t.name] = totals.type_bytes.get(t.name, 0) + nbytes
        layer = _layer_of(name)
        if layer is not None and layer < block_count:
            totals.layer_bytes[layer] = totals.layer_bytes.get(layer, 0) + nbytes
        else:
            role = _role(name)
            totals.role_bytes[role] = totals.role_bytes.get(role, 0) + nbytes
            if role != "other":
                totals.shapes[name] = shape
                totals.types[name] = t.name

    data_offset = -(-c.pos // alignment) * alignment
    if c.size > data_offset and c.size < data_offset + expected_offset:
        raise InvalidInput(f"file is truncated: tensor data ends at offset {data_offset + expected_offset}, "
                           f"the file has {c.size} bytes", where=str(c.path))
    return GgufHeader(path=c.path, version=version, metadata=metadata, tensor_count=n_tensors,
                      data_offset=data_offset, data_bytes=expected_offset, file_size=c.size)


def _layer_of(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    n, _, rest = name[4:].partition(".")
    return int(n) if n.isascii() and n.isdigit() and rest else None


# --------------------------------------------------------------------------- split models


def first_shard(path: Path) -> Path:
    """The `-00001-of-N` file for any shard of a split model (a single file maps to itself)."""
    m = SPLIT_RE.match(path.name)
    if m and int(m["no"]) != 1:
        return path.with_name(f"{m['prefix']}-00001-of-{m['count']}.gguf")
    return path


def read_model(path: str | os.PathLike[str]) -> tuple[list[GgufHeader], TensorTotals]:
    """Read a GGUF model, following `split.count` to the other shards; raises InvalidInput.

    Given any shard of a split model, starts from the first, which holds the
    metadata. Every shard must be present, say the same split count and its
    own number, and together hold `split.tensors.count` tensors.
    """
    path = first_shard(Path(path))
    totals = TensorTotals()
    first = read_header(path, totals)
    md = first.metadata
    count = md.get("split.count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidInput(f"split.count must be a positive integer, got {count!r}", where=str(path))
    if count == 1:
        return [first], totals
    m = SPLIT_RE.match(path.name)
    if not m:
        raise InvalidInput(f"split.count is {count} but the file name is not '<name>-00001-of-{count:05d}.gguf'",
                           where=str(path))
    if int(m["count"]) != count:
        raise InvalidInput(f"split.count is {count} but the file name says {int(m['count'])}", where=str(path))
    _check_split_no(first, 0)
    arch = md.get("general.architecture")
    bc = md.get(f"{arch}.block_count", 0)
    headers = [first]
    for i in range(2, count + 1):
        shard = path.with_name(f"{m['prefix']}-{i:05d}-of-{m['count']}.gguf")
        if not shard.is_file():
            raise InvalidInput(f"missing shard {i} of {count} of split model {path.name}", where=str(shard))
        headers.append(read_header(shard, totals, block_count=bc if isinstance(bc, int) else 0,
                                   split=(i - 1, count)))
    expected = md.get("split.tensors.count")
    if isinstance(expected, int) and expected != totals.count:
        raise InvalidInput(f"the {count} shards hold {totals.count} tensors, split.tensors.count says {expected}",
                           where=str(path))
    return headers, totals


def _check_split_no(h: GgufHeader, expected: int) -> None:
    no = h.metadata.get("split.no")
    if no != expected:
        raise InvalidInput(f"split.no is {no!r}, expected {expected} from the file name", where=str(h.path))
