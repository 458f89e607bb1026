"""safetensors headers and index files: tensor names and byte sizes without touching the tensors.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}), then the data. We read the 8 bytes and the JSON, after checking N
against the file size and a cap, and nothing else.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.errors import InvalidInput
from agentd.modelinfo.regular import open_regular

# safetensors' own reader refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
MAX_INDEX_BYTES = 256 << 20
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
SUBBYTE_DTYPES = {"F4": (1, 2), "F6_E2M3": (3, 4), "F6_E3M2": (3, 4)}  # bytes per element as a fraction


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensor_bytes: dict[str, int]  # name -> bytes (from data_offsets)
    tensor_dtypes: dict[str, str]
    metadata: dict[str, str]


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read one file's header; InvalidInput names the file and what is wrong."""
    path = Path(path)
    where = str(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise InvalidInput(f"file is truncated: {len(head)} byte(s), a safetensors header needs 8",
                                   where=f"{where} at offset 0")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InvalidInput(f"header length {n} is absurd for a file of {size} bytes",
                                   where=f"{where} at offset 0")
            raw = f.read(n)
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror or exc}", where=where) from None
    if len(raw) < n:
        raise InvalidInput(f"file is truncated: header needs {n} bytes", where=f"{where} at offset 8")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"header is not JSON: {exc}", where=f"{where} at offset 8") from None
    if not isinstance(header, dict):
        raise InvalidInput("header is not a JSON object", where=f"{where} at offset 8")
    data_size = size - 8 - n
    sizes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if isinstance(entry, dict):
                metadata = {str(k): str(v) for k, v in entry.items()}
            continue
        sizes[name], dtypes[name] = _entry_bytes(name, entry, where)
    # Files written by others may be header-only stand-ins; a file with some data must hold all of it.
    end = max((_end(header[k]) for k in sizes), default=0)
    if 0 < data_size < end:
        raise InvalidInput(f"file is truncated: tensor data ends at {end}, {data_size} byte(s) present",
                           where=where)
    return SafetensorsHeader(path=path, tensor_bytes=sizes, tensor_dtypes=dtypes, metadata=metadata)


def _end(entry: dict[str, Any]) -> int:
    return entry["data_offsets"][1]


def _entry_bytes(name: str, entry: Any, where: str) -> tuple[int, str]:
    """Bytes of one tensor entry, checked for shape/offset consistency (a hot loop: 90k tensors for DeepSeek)."""
    def bad(message: str) -> InvalidInput:
        return InvalidInput(f"tensor {name!r}: {message}", where=where)

    if type(entry) is not dict:
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(dtype) is not str:
        raise bad("dtype is missing")
    if type(shape) is not list:
        raise bad(f"shape must be a list of non-negative integers, got {shape!r:.60}")
    elements = 1
    for d in shape:
        if type(d) is not int or d < 0:  # type() is, not isinstance: JSON true is not a dimension
            raise bad(f"shape must be a list of non-negative integers, got {shape!r:.60}")
        elements *= d
    if type(offsets) is not list or len(offsets) != 2:
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.60}")
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.60}")
    nbytes = end - begin
    per = DTYPE_BYTES.get(dtype)
    if per is None:
        dtype = dtype.upper()
        per = DTYPE_BYTES.get(dtype)
    if per is not None:
        if elements * per != nbytes:
            raise bad(f"{dtype} {shape!s:.60} needs {elements * per} bytes, data_offsets span {nbytes}")
    elif dtype in SUBBYTE_DTYPES:
        num, den = SUBBYTE_DTYPES[dtype]
        if -(-elements * num // den) != nbytes:
            raise bad(f"{dtype} {shape!s:.60} needs {-(-elements * num // den)} bytes, data_offsets span {nbytes}")
    return nbytes, dtype


@dataclass(frozen=True)
class SafetensorsIndex:
    path: Path
    total_size: int | None
    weight_map: dict[str, str]  # tensor name -> file name

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def read_index(path: str | os.PathLike[str]) -> SafetensorsIndex:
    """`model.safetensors.index.json`: metadata.total_size and the weight map."""
    path = Path(path)
    data = load_json(path, MAX_INDEX_BYTES)
    if not isinstance(data, dict):
        raise InvalidInput("not a JSON object", where=str(path))
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise InvalidInput("'metadata' must be an object", where=f"{path}: metadata")
    total = meta.get("total_size")
    if total is not None:
        if isinstance(total, float) and total.is_integer():
            total = int(total)
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise InvalidInput(f"metadata.total_size must be a non-negative integer, got {total!r:.60}",
                               where=f"{path}: metadata.total_size")
    wm = data.get("weight_map") or {}
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise InvalidInput("'weight_map' must map tensor names to file names", where=f"{path}: weight_map")
    for v in set(wm.values()):
        if "/" in v or "\\" in v or v in ("", ".", ".."):
            raise InvalidInput(f"weight_map names a file outside the model directory: {v!r}",
                               where=f"{path}: weight_map")
    return SafetensorsIndex(path=path, total_size=total, weight_map=dict(wm))


def load_json(path: Path, limit: int) -> Any:
    """Parse a JSON file of at most `limit` bytes; InvalidInput with line and column otherwise."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise InvalidInput(f"file of {size} bytes is larger than the {limit}-byte limit", where=str(path))
            raw = f.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror or exc}", where=str(path)) from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                           where=str(path)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"not valid JSON: {type(exc).__name__}", where=str(path)) from None
