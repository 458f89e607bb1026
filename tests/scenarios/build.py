"""Builders and invariant checks shared by the placement tests.

`model()` makes ModelInfo values directly (uniform layers, exact byte
counts), `host()`/`gpu()` make inventories, and `assert_valid()` re-checks a
plan against everything DESIGN.md §3 promises, independently of the engine:
the runtime's rules and that no GPU is asked for more than it has free.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from agentd.placement.snapshot import Snapshot
from agentd.plugins import PluginManager
from agentd.types import (
    ClusterInventory,
    DeploymentSpec,
    GpuInfo,
    GpuProcess,
    HostInventory,
    KVCache,
    ModelInfo,
    Plan,
    Quantization,
    RuntimeOptions,
)

GiB = 1024**3
MiB = 1024**2


def builtin_plugins() -> PluginManager:
    return PluginManager.load(allow=["vllm", "llamabox"])


def model(*, layers: int = 32, layer_bytes: int = 1 * GiB, heads: int = 32, kv_heads: int = 8, hidden: int = 4096,
          head_dim: int = 128, vocab: int = 32000, ctx: int = 8192, fmt: str = "safetensors",
          arch: str = "LlamaForCausalLM", dtype: str = "bfloat16", embed: int = 256 * MiB, output: int = 256 * MiB,
          intermediate: int | None = 14336, quant: Quantization | None = None, kv_kind: str = "gqa",
          layer_sizes: Sequence[int] | None = None, name: str = "test-model") -> ModelInfo:
    sizes = tuple(layer_sizes) if layer_sizes is not None else (layer_bytes,) * layers
    nr = {"token_embd": embed, "output": output, "output_norm": hidden * 2, "other": 0}
    per = kv_heads * head_dim
    kv = (KVCache(kind="mla", k_elements=576, v_elements=0, kv_lora_rank=512, qk_rope_head_dim=64)
          if kv_kind == "mla" else KVCache(kind=kv_kind, k_elements=per, v_elements=per))
    return ModelInfo(format=fmt, architecture=arch, name=name, num_hidden_layers=len(sizes),
                     num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=hidden, head_dim=head_dim,
                     intermediate_size=intermediate, vocab_size=vocab, context_length=ctx, dtype=dtype,
                     quantization=quant, total_weight_bytes=sum(sizes) + sum(nr.values()), layer_bytes=sizes,
                     non_repeating_bytes=nr, kv_cache=kv)


def gguf_model(**kw) -> ModelInfo:
    kw.setdefault("arch", "llama")
    kw.setdefault("dtype", "F16")
    return model(fmt="gguf", **kw)


def gpu(index: int, total_gib: float = 80, used_gib: float = 0, *, owned_gib: float = 0, cc: str = "8.0",
        uuid: str | None = None, pid: int = 4121, host: str = "h", name: str = "NVIDIA A100-SXM4-80GB") -> GpuInfo:
    procs = []
    if used_gib:
        procs.append(GpuProcess(pid=pid, memory_used=int(used_gib * GiB), name="other-job"))
    if owned_gib:
        procs.append(GpuProcess(pid=pid + 1, memory_used=int(owned_gib * GiB), name="agentd-instance", owned=True))
    return GpuInfo(index=index, uuid=uuid or f"GPU-{host}-{index}", name=name, memory_total=int(total_gib * GiB),
                   memory_used=int((used_gib + owned_gib) * GiB), compute_capability=cc, processes=tuple(procs))


def host(name: str, n: int = 8, total_gib: float = 80, *, used: dict[int, float] | None = None,
         labels: dict[str, str] | None = None, ram_gib: float = 512, cc: str = "8.0",
         gpus: Sequence[GpuInfo] | None = None) -> HostInventory:
    used = used or {}
    if gpus is None:
        gpus = [gpu(i, total_gib, used.get(i, 0), cc=cc, host=name, pid=4000 + i) for i in range(n)]
    return HostInventory(name=name, labels=labels or {}, cpu_count=32, memory_total=int(ram_gib * GiB),
                         memory_available=int(ram_gib * GiB), gpus=tuple(gpus))


def cluster(*hosts: HostInventory) -> ClusterInventory:
    return ClusterInventory(hosts=tuple(hosts))


def spec(runtime: str = "vllm", *, name: str = "m", replicas: int = 1, strategy: str = "binpack",
         util: float | None = None, ctx: int | None = None, offload: bool = False, **kw) -> DeploymentSpec:
    return DeploymentSpec(name=name, model="/models/m", runtime=runtime, replicas=replicas, strategy=strategy,
                          options=RuntimeOptions(gpu_memory_utilization=util, ctx_size=ctx, allow_cpu_offload=offload),
                          **kw)


# --------------------------------------------------------------------------- invariants


def booked(plan: Plan) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = defaultdict(int)
    for rp in plan.replicas:
        for p in rp.parts:
            assert len(p.memory) == len(p.gpus), p
            for i, m in zip(p.gpus, p.memory, strict=True):
                out[(p.host, i)] += m
    return out


def assert_no_overcommit(plan: Plan, c: ClusterInventory, existing=()) -> None:
    free = {(hv.name, g.index): g.free for hv in Snapshot.build(c, existing).hosts for g in hv.gpus}
    for key, mem in booked(plan).items():
        assert key in free, f"plan uses unknown GPU {key}"
        assert mem <= free[key], f"GPU {key} over-committed: {mem} > {free[key]}"
    # Host RAM booked by parts that serve from it (Part.ram): never more than the host has left.
    ram_left = {hv.name: hv.ram_available for hv in Snapshot.build(c, existing).hosts}
    ram: dict[str, int] = defaultdict(int)
    for rp in plan.replicas:
        for p in rp.parts:
            ram[p.host] += p.ram
    for name, need in ram.items():
        if need:
            assert ram_left[name] is not None and need <= ram_left[name], f"RAM of {name} over-committed"


def assert_vllm_rules(plan: Plan, m: ModelInfo, s: DeploymentSpec, c: ClusterInventory, existing=()) -> None:
    """vLLM's start-up checks, written out again here (not imported from the plugin)."""
    util = s.options.gpu_memory_utilization or 0.9
    snap = {(hv.name, g.index): g for hv in Snapshot.build(c, existing).hosts for g in hv.gpus}
    for rp in plan.replicas:
        tp, pp = rp.tensor_parallel, rp.pipeline_parallel
        assert m.num_attention_heads % tp == 0
        kv = m.num_key_value_heads
        assert (kv % tp == 0) if tp <= kv else (tp % kv == 0)
        assert pp <= m.num_hidden_layers
        hosts = {p.host for p in rp.parts}
        assert sum(len(p.gpus) for p in rp.parts) == tp * pp
        if len(hosts) > 1:
            assert len(hosts) == pp and all(len(p.gpus) == tp for p in rp.parts)
            assert "--distributed-executor-backend" in rp.args
        for p in rp.parts:
            assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, p.gpus))
            for i, mem in zip(p.gpus, p.memory, strict=True):
                g = snap[(p.host, i)]
                assert mem == int(util * g.total)
        args = list(rp.args)
        assert args[args.index("--tensor-parallel-size") + 1] == str(tp)
        assert args[args.index("--pipeline-parallel-size") + 1] == str(pp)
        assert args[args.index("--gpu-memory-utilization") + 1] == f"{util:g}"
    assert_no_overcommit(plan, c, existing)


def assert_llamabox_rules(plan: Plan, m: ModelInfo, s: DeploymentSpec, c: ClusterInventory, existing=()) -> None:
    L = m.num_hidden_layers
    for rp in plan.replicas:
        main = rp.parts[0]
        assert main.role == "main" and all(p.role == "rpc" for p in rp.parts[1:])
        hosts = {h.name: h for h in c.hosts}
        if hosts[main.host].gpus:
            assert main.layers >= 1 and main.gpus, "the main server must hold a layer on its own GPUs"
        else:  # a host without GPUs, allowed for a CPU deployment: its RAM is its device
            assert s.options.allow_cpu_offload and not main.gpus and main.cpu_layers >= 1
        # an rpc-server serves one GPU, or the RAM of a host without GPUs (booked in Part.ram)
        assert all((len(p.gpus) == 1 or (not p.gpus and p.ram > 0 and not hosts[p.host].gpus
                                          and s.options.allow_cpu_offload)) and p.layers >= 1
                   for p in rp.parts[1:])
        assert sum(p.layers for p in rp.parts) + (main.cpu_layers or 0) == L
        assert all(sum(p.layer_split) == p.layers for p in rp.parts)
        if not s.options.allow_cpu_offload:
            assert main.cpu_layers == 0
        args = list(rp.args)
        ngl = int(args[args.index("--n-gpu-layers") + 1])
        split = [n for p in rp.parts[1:] for n in p.layer_split] + list(main.layer_split)
        if main.cpu_layers == 0:
            assert ngl == L + 1  # every layer and the output layer
            split[-1] += 1
        else:
            assert ngl == L - main.cpu_layers
        if "--tensor-split" in args:
            assert args[args.index("--tensor-split") + 1] == ",".join(map(str, split))
        assert {p.host for p in rp.parts[1:]} <= {h.name for h in c.hosts}
    assert_no_overcommit(plan, c, existing)
