"""How long placement takes on synthetic clusters of 8 to 2,048 hosts with 8 GPUs each (warm process).

    .venv/bin/python benchmarks/placement.py [--sizes 8,64,512,2048] [--repeat 15]

Each host has 8 x 80 GiB GPUs; a seeded half of the GPUs carry memory
used by other jobs, and one host in eight holds agentd instances already
(passed as existing assignments), so the filters and the free-memory
accounting do real work. Models come from real headers: Llama-3.1-70B and
Llama-3.1-405B config.json for vLLM, header-only GGUFs of Llama-3-70B Q4_K_M
and DeepSeek-R1 BF16 (1.2 TiB, needs rpc-servers on several hosts) for
llama-box, plus an unplaceable request to time the diagnosis path. The
last row places Llama-3.1-70B again on the same hosts reporting NVSwitch
links between their GPUs (`gpu_links`), where vLLM's auto parallelism
prefers tensor parallel over NVLink (TP=4 instead of PP=3).
Prints min / median ms: the machine is shared, the min is the code's own cost.
Targets: under 20 ms at 512 hosts and under 100 ms at 2,048 hosts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.coordinator import collector_paused  # noqa: E402
from agentd.modelinfo import inspect_model  # noqa: E402
from agentd.placement import place  # noqa: E402
from agentd.plugins import PluginManager  # noqa: E402
from agentd.testing.gguf import deepseek_r1_spec, llama3_70b_q4_k_m_spec, write_header_only_gguf  # noqa: E402
from agentd.types import (  # noqa: E402
    Assignment,
    ClusterInventory,
    DeploymentSpec,
    GpuInfo,
    GpuLink,
    GpuProcess,
    HostInventory,
    Part,
    PartEndpoint,
    ReplicaPlan,
    RuntimeOptions,
)

GiB = 1024**3


def cluster(hosts: int, seed: int = 7, nvlink: bool = False) -> tuple[ClusterInventory, list[Assignment]]:
    """`nvlink`: every host reports NVSwitch links between its 8 GPUs (28 pairs)."""
    rnd = random.Random(seed)
    out, existing = [], []
    links = tuple(GpuLink(gpus=(a, b), link="nvlink", nvlinks=12) for a in range(8) for b in range(a + 1, 8))
    for h in range(hosts):
        name = f"node-{h:04d}"
        gpus = []
        for i in range(8):
            used = rnd.choice([0, 0, 0, 4, 12, 30]) * GiB
            procs = (GpuProcess(pid=10000 + h * 8 + i, memory_used=used),) if used else ()
            gpus.append(GpuInfo(index=i, uuid=f"GPU-{h:04d}-{i}", name="NVIDIA A100-SXM4-80GB",
                                memory_total=80 * GiB, memory_used=used, compute_capability="8.0", processes=procs))
        out.append(HostInventory(name=name, address=f"10.0.{h // 250}.{h % 250}:7070",
                                 labels={"rack": f"r{h % 16}"}, cpu_count=64, memory_total=1024 * GiB,
                                 memory_available=900 * GiB, gpus=tuple(gpus), gpu_links=links if nvlink else ()))
        if h % 8 == 3:  # an agentd instance already holds GPUs 6 and 7
            part = Part(host=name, gpus=(6, 7), role="main", memory=(72 * GiB, 72 * GiB))
            existing.append(Assignment(deployment=f"d{h}", replica=0, term=1, model="m", runtime="vllm",
                                       plan=ReplicaPlan(tensor_parallel=2, parts=(part,)),
                                       endpoints=(PartEndpoint(host=name, address="10.0.0.1", port=40000),)))
    return ClusterInventory(hosts=tuple(out)), existing


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(min ms, median ms, last result). Other processes share the machine: the min is the cleanest
    reading of the code's own cost, the median what a caller sees. Each call runs with the cyclic
    collector paused, as the coordinator runs placement."""
    for _ in range(3):
        with collector_paused():
            result = fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        with collector_paused():
            result = fn()
        samples.append(time.perf_counter() - t)
    return min(samples) * 1000, statistics.median(samples) * 1000, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,64,512,2048")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    plugins = PluginManager.load()
    tmp = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
    models = {
        "llama-70b": inspect_model(ROOT / "tests/fixtures/hf/Llama-3.1-70B-Instruct"),
        "llama-405b": inspect_model(ROOT / "tests/fixtures/hf/Llama-3.1-405B-Instruct"),
        "llama-70b-q4": inspect_model(write_header_only_gguf(tmp / "l70.gguf", llama3_70b_q4_k_m_spec())),
        "deepseek-r1-bf16": inspect_model(write_header_only_gguf(tmp / "r1.gguf", deepseek_r1_spec(tokenizer=False))),
    }
    cases = [
        ("vllm", "llama-70b", {}, 1),
        ("vllm", "llama-405b", {"ctx_size": 32768}, 1),
        ("vllm", "llama-70b", {}, 4),
        ("llamabox", "llama-70b-q4", {}, 1),
        ("llamabox", "deepseek-r1-bf16", {}, 1),
        ("vllm", "llama-405b", {"gpu_memory_utilization": 0.02}, 1),  # unplaceable: diagnosis path
        ("vllm", "llama-70b", {}, 1, "nvlink"),  # the same hosts reporting NVSwitch links
    ]
    header = f"{'runtime':<9} {'model':<17} {'replicas':>8} " + " ".join(f"{n:>13}" for n in sizes)
    print(f"min / median ms per placement (warm process, {args.repeat} runs, a third of them at 2,048 hosts); "
          "columns are hosts x 8 GPUs")
    print(header)
    print("-" * len(header))
    clusters = {n: cluster(n) for n in sizes}
    linked = {}
    for runtime, model_name, opts, replicas, *topology in cases:
        cells, outcome = [], ""
        for n in sizes:
            if topology and n not in linked:
                linked[n] = cluster(n, nvlink=True)
            c, existing = linked[n] if topology else clusters[n]
            spec = DeploymentSpec(name="bench", model=model_name, runtime=runtime, replicas=replicas,
                                  options=RuntimeOptions(**opts))
            repeat = args.repeat if n <= 512 else max(3, args.repeat // 3)
            low, med, plan = timed(
                lambda c=c, e=existing, s=spec, m=models[model_name]: place(c, m, s, e, plugins=plugins), repeat)
            cells.append(f"{low:6.1f}/{med:6.1f}")
            rp = plan.replicas[0] if plan.placed else None
            outcome = (f"TP={rp.tensor_parallel} PP={rp.pipeline_parallel} parts={len(rp.parts)}"
                       if rp else "unplaced")
        label = model_name + ("" if not opts else "*") + (" nvlink" if topology else "")
        print(f"{runtime:<9} {label:<17} {replicas:>8} " + " ".join(cells) + f"   {outcome}")
    print("* options: 405b ctx_size=32768; the unplaceable row uses gpu_memory_utilization=0.02")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
