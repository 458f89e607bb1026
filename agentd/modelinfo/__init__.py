"""Model facts from headers alone: GGUF files and Hugging Face directories, into one ModelInfo.

`inspect_model(path)` is the entry point. It reads only headers (GGUF metadata
and tensor infos, safetensors JSON headers, config.json, the safetensors
index), never tensor data, and raises InvalidInput, naming the file and the
key or offset, for every input it cannot use.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentd.errors import InvalidInput
from agentd.modelinfo.gguf import GGUF_MAGIC, SPLIT_RE
from agentd.modelinfo.gguf_model import model_from_gguf
from agentd.modelinfo.hf import model_from_hf
from agentd.modelinfo.regular import open_regular
from agentd.types import ModelInfo

__all__ = ["inspect_model", "model_from_gguf", "model_from_hf"]


def inspect_model(path: str | os.PathLike[str], *, mmproj: str | os.PathLike[str] | None = None) -> ModelInfo:
    """ModelInfo for a GGUF file (any shard of a split model), a Hugging Face directory or its config.json.

    A directory without config.json but with exactly one GGUF model (one file,
    or the shards of one split model) inspects that model. `mmproj` names a
    multimodal projector GGUF; by default a single `mmproj*.gguf` beside a
    GGUF model is used.
    """
    p = Path(path)
    try:
        if p.is_dir():
            if (p / "config.json").is_file():
                return model_from_hf(p)
            return model_from_gguf(_only_gguf(p), mmproj=mmproj)
        if not p.exists():
            raise InvalidInput("no such file or directory", where=str(p))
        if p.name == "config.json":
            return model_from_hf(p)
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            return model_from_gguf(p, mmproj=mmproj)
    except OSError as exc:  # permissions, a file vanishing mid-read, a name too long
        raise InvalidInput(f"cannot read: {exc.strerror or exc}", where=str(exc.filename or p)) from None
    raise InvalidInput("not a model: expected a .gguf file, a Hugging Face model directory or its config.json",
                       where=str(p))


def _has_gguf_magic(p: Path) -> bool:
    with open_regular(p) as f:
        return f.read(4) == GGUF_MAGIC


def _only_gguf(d: Path) -> Path:
    models = sorted(f for f in d.glob("*.gguf") if f.is_file() and not f.name.lower().startswith("mmproj")
                    and not ((m := SPLIT_RE.match(f.name)) and int(m["no"]) != 1))
    if len(models) == 1:
        return models[0]
    if not models:
        raise InvalidInput("no config.json and no .gguf model in the directory", where=str(d))
    raise InvalidInput(f"{len(models)} GGUF models in the directory ({', '.join(f.name for f in models[:5])}"
                       f"{', ...' if len(models) > 5 else ''}): name the file", where=str(d))
