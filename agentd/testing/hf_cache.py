"""Models laid out in a Hugging Face hub cache as huggingface_hub writes them, for tests of the catalog and of
copies between hosts. Shared by test modules so that no test module imports another."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def hf_cache_model(cache: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40,
                   refs: tuple[str, ...] = ("main",)) -> Path:
    """A model in a Hugging Face hub cache, laid out as huggingface_hub writes it: content-addressed blobs,
    a snapshot per commit whose files are relative symlinks to them, and refs naming the commit."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (base / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(commit)
    return snapshot


HF_CONFIG = json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 256,
    "vocab_size": 300, "max_position_embeddings": 512, "torch_dtype": "float32"}).encode()
