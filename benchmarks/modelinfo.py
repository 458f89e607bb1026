"""How long `inspect_model` takes, and how much memory, on a header-only DeepSeek-R1 BF16 in 30 shards.

    .venv/bin/python benchmarks/modelinfo.py [--repeat 15] [--dir DIR]

The stand-in carries the real header: 61 layers with fused 256-expert tensors
(1,086 tensor infos), the 129,280-token vocabulary, its token types and
127,741 merges, split like unsloth's DeepSeek-R1-BF16-0000N-of-00030.gguf
(5 MB of headers standing for 1.34 TB). Also timed: Llama-3-70B Q4_K_M with a
full tokenizer, and a Hugging Face directory of DeepSeek-R1 with its
config.json, index and safetensors headers.

Targets (issue 3): under 150 ms and under 50 MB of extra memory for the
30-shard model. Time is wall time per call in a warm process (files in the
page cache, as after the first read); memory is tracemalloc's peak of Python
allocations during one call plus the RSS growth over all calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from agentd.modelinfo import inspect_model  # noqa: E402
from agentd.testing.gguf import deepseek_r1_spec, llama3_70b_q4_k_m_spec, write_header_only_gguf  # noqa: E402


def hf_deepseek(d: Path) -> Path:
    """config.json + index + 163 safetensors files holding only headers (tensor names from the GGUF spec)."""
    import struct

    m = d / "DeepSeek-R1-hf"
    m.mkdir(exist_ok=True)
    (m / "config.json").write_text((ROOT / "tests/fixtures/hf/DeepSeek-R1/config.json").read_text())
    names = []
    for i in range(61):
        for role in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                     "self_attn.kv_b_proj", "self_attn.o_proj", "input_layernorm", "post_attention_layernorm"):
            names.append(f"model.layers.{i}.{role}.weight")
        if i < 3:
            names += [f"model.layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for e in range(256)
                      for p in ("gate_proj", "up_proj", "down_proj")]
    names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    shards = 163
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:06d}.safetensors"
        part = names[s::shards]
        header, off = {}, 0
        for n in part:
            header[n] = {"dtype": "F8_E4M3", "shape": [2048, 7168], "data_offsets": [off, off + 2048 * 7168]}
            off += 2048 * 7168
        raw = json.dumps(header).encode()
        (m / fname).write_bytes(struct.pack("<Q", len(raw)) + raw)
        weight_map.update(dict.fromkeys(part, fname))
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                "weight_map": weight_map}))
    return m


def measure(path: Path, repeat: int) -> dict[str, float]:
    inspect_model(path)  # warm: page cache, imports
    gc.collect()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        inspect_model(path)
        times.append((time.perf_counter() - t) * 1000)
    rss_growth = (proc.memory_info().rss - rss0) / 2**20
    tracemalloc.start()
    inspect_model(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times.sort()
    return {"p50": statistics.median(times), "min": times[0], "max": times[-1], "peak_mb": peak / 2**20,
            "rss_mb": rss_growth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the stand-ins (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = args.dir or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        r1 = write_header_only_gguf(d / "DeepSeek-R1-BF16.gguf", deepseek_r1_spec(), shards=30)
        l70 = write_header_only_gguf(d / "Meta-Llama-3-70B-Instruct-Q4_K_M.gguf",
                                     llama3_70b_q4_k_m_spec(tokenizer=True))
        hf = hf_deepseek(d)
        setup = time.perf_counter() - t
        header_mb = sum(p.stat().st_size for p in d.glob("DeepSeek-R1-BF16-*.gguf")) / 2**20
        print(f"stand-ins written in {setup:.1f} s; DeepSeek-R1 headers: {header_mb:.1f} MB in 30 files; "
              f"cpus {os.cpu_count()}")
        rows = [
            ("DeepSeek-R1 BF16 GGUF, 30 shards", r1),
            ("Llama-3-70B Q4_K_M GGUF", l70),
            ("DeepSeek-R1 HF dir, 163 safetensors headers", hf),
        ]
        print(f"{'model':46} {'p50 ms':>8} {'min ms':>8} {'max ms':>8} {'peak MB':>8} {'RSS+ MB':>8}")
        for name, path in rows:
            r = measure(path, args.repeat)
            print(f"{name:46} {r['p50']:8.1f} {r['min']:8.1f} {r['max']:8.1f} {r['peak_mb']:8.2f} {r['rss_mb']:8.1f}")
        print("targets: DeepSeek-R1 30-shard GGUF < 150 ms, < 50 MB extra memory")


if __name__ == "__main__":
    main()
