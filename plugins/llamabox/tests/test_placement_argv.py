"""What placement books on each device is what the launched llama-server puts there.

The output rule both sides follow (agentd/placement/demand.py and
agentd_llamabox/process.py): the output weight is on the last GPU exactly
when every layer is. In partial offload at least one layer stays in RAM, the
output weight stays with it (pinned with --override-tensor; for tied
embeddings llama.cpp's copy is named token_embd.weight) and only output_norm
goes with llama.cpp's output slot to the last device.

Here nothing is taken from either side's bookkeeping: llama.cpp's own
assignment (src/llama-model.cpp, load_tensors: i_gpu_start = n_layer + 1 -
ngl, a layer's device by upper_bound over the cumulative --tensor-split in
float, the output slot as layer n_layer, then the tensor overrides) is
re-derived from the command line the act phase builds, and the bytes that
land on each device are added up from the model's per-layer sizes. They
must equal Part.memory device by device, and the RAM placement checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from agentd_llamabox import process as lb
from agentd_llamabox.placement import estimate

from agentd.config import load_settings
from agentd.placement import place
from agentd.runtime import LaunchContext
from agentd.types import Assignment, ModelInfo, PartEndpoint, ReplicaPlan
from tests.scenarios.build import GiB, builtin_plugins, cluster, gguf_model, gpu, host, spec

PLUGINS = builtin_plugins()
CPU = "CPU"


@dataclass
class Device:
    layers: list[int] = field(default_factory=list)
    output_slot: bool = False
    output_weight: bool = False


def _value(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def llama_cpp_assignment(argv: tuple[str, ...], env: dict[str, str], m: ModelInfo) -> dict[str, Device]:
    """Device -> what llama.cpp loads there, from the command line alone ("CPU" for host RAM)."""
    n_layer = m.num_hidden_layers
    rpc = (_value(argv, "--rpc") or "").split(",") if "--rpc" in argv else []
    gpus = env.get("CUDA_VISIBLE_DEVICES", "").split(",") if env.get("CUDA_VISIBLE_DEVICES") else []
    devices = [f"rpc {ep}" for ep in rpc] + [f"cuda {i}" for i in gpus]  # RPC devices first
    ngl = int(_value(argv, "-ngl"))
    ts = _value(argv, "--tensor-split")
    split = [float(x) for x in ts.split(",")] if ts else [1.0] * len(devices)
    assert len(split) == len(devices), "a --tensor-split entry per device"
    cum = np.cumsum(np.array(split, dtype=np.float32), dtype=np.float32)
    fractions = cum / cum[-1]  # llama.cpp normalises the cumulative split in float
    start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1) if devices else 0

    def where(il: int) -> str:
        if il < start or il - start >= act:
            return CPU
        x = np.float32(il - start) / np.float32(act)
        return devices[int(np.searchsorted(fractions, x, side="right"))]  # std::upper_bound

    out: dict[str, Device] = {CPU: Device()}
    for il in range(n_layer):
        out.setdefault(where(il), Device()).layers.append(il)
    slot = out.setdefault(where(n_layer), Device())
    slot.output_slot = True
    # The output weight follows the output slot unless an override pins it; a tied output is
    # llama.cpp's copy of the embedding, loaded under the embedding's name.
    name = "output.weight" if m.non_repeating_bytes.get("output") else "token_embd.weight"
    pinned = [o.rsplit("=", 1) for o in (_value(argv, "--override-tensor") or "").split(",") if o]
    if any(re.search(pattern, name) and buft == CPU for pattern, buft in pinned):
        out[CPU].output_weight = True
    else:
        slot.output_weight = True
    return out


def device_bytes(m: ModelInfo, s, dev: Device, gpu_side: bool, devices: int, partial: bool) -> int:
    """Bytes on one device: the model's tensors where llama.cpp puts them, plus the cost model's
    per-layer (weights + KV) and per-device (compute buffer, context, logits) sizes. `devices`
    GPUs in all: a full offload onto one runs no pipeline (its own overhead), onto more it does."""
    d = estimate(m, s, "partial" if partial else "full")
    single = not partial and devices == 1
    nr = m.non_repeating_bytes
    tied = not nr.get("output")
    weight = nr["token_embd"] if tied else nr["output"]
    if not gpu_side:  # host RAM: the embedding and buffers, the CPU layers, an untied output weight (a tied
        per = d.cpu_layer_bytes or d.layer_bytes  # one is the embedding's own mapping)
        return (d.cpu_fixed_bytes + sum(per[i] for i in dev.layers)
                + (weight if dev.output_weight and not tied else 0)
                + (d.pipeline_cpu_bytes if not partial and devices > 1 else 0))
    total = sum(d.layer_bytes[i] for i in dev.layers)
    if dev.layers or dev.output_slot:
        total += d.single_overhead if single else d.device_overhead
    if dev.output_slot:
        total += nr["output_norm"]
    if dev.output_weight:
        total += weight + (0 if single else d.output_overhead)  # the lm_head and its logits
    return total


def launch(plan, m: ModelInfo, tmp: Path):
    """The main part's command line, as the act phase builds it for this plan's first replica."""
    rp = plan.replicas[0]
    model = tmp / "m.gguf"
    model.write_bytes(b"GGUF")
    a = Assignment(deployment="m", replica=0, term=1, model=str(model), runtime="llamabox",
                   plan=ReplicaPlan(parts=rp.parts, args=rp.args),
                   endpoints=tuple(PartEndpoint(host=p.host, address=f"10.0.0.{i + 1}", port=40000 + i)
                                   for i, p in enumerate(rp.parts)))
    settings = load_settings(data_dir=str(tmp), node_name=rp.parts[0].host,
                             llama_server_binary="/opt/llama/llama-server",
                             rpc_server_binary="/opt/llama/ggml-rpc-server")
    ctx = LaunchContext(node=rp.parts[0].host, work_dir=tmp / "work", settings=settings, simulated_gpus=False,
                        port=lambda k: 0, ray_port=lambda k, count=1: 0)
    [main] = lb.agentd_launch(a, 0, ctx)
    return a, main


def assert_booked_is_loaded(plan, m: ModelInfo, s, c, tmp: Path) -> dict[str, Device]:
    a, main = launch(plan, m, tmp)
    loaded = llama_cpp_assignment(main.argv, main.env, m)
    rp = plan.replicas[0]
    booked: dict[str, int] = {}
    for p, ep in zip(rp.parts, a.endpoints, strict=True):
        if p.role == "rpc":
            [booked[f"rpc {ep.address}:{ep.port}"]] = p.memory
    mainp = rp.parts[0]
    for i, mem in zip(main.env["CUDA_VISIBLE_DEVICES"].split(","), mainp.memory, strict=True):
        booked[f"cuda {i}"] = mem
    assert set(booked) == set(loaded) - {CPU}, "every booked device gets something, nothing lands elsewhere"
    partial, n = mainp.cpu_layers > 0, len(booked)
    for dev, mem in booked.items():
        assert mem == device_bytes(m, s, loaded[dev], True, n, partial), dev
    assert loaded[CPU].layers == list(range(mainp.cpu_layers)), "the plan's CPU layers are the ones in RAM"
    d = estimate(m, s, "partial" if partial else "full")
    ram_needed = d.ram_for(mainp.cpu_layers, pipeline=not partial and n > 1)
    assert ram_needed == device_bytes(m, s, loaded[CPU], False, n, partial)
    ram = {h.name: h.memory_available for h in c.hosts}[mainp.host]
    assert ram_needed <= ram
    return loaded


# --------------------------------------------------------------------------- cases

SIZES = [int((1.5 + 0.25 * (i % 5)) * GiB) for i in range(12)]  # uneven, so a layer on the wrong device shows


def llama(*, tied: bool = False) -> ModelInfo:
    return gguf_model(layer_sizes=SIZES, heads=8, kv_heads=8, ctx=2048, embed=2 * GiB,
                      output=0 if tied else int(1.5 * GiB), vocab=32000)


@pytest.mark.parametrize("tied", [False, True])
def test_full_offload_on_several_gpus_of_one_host(tmp_path, tied):
    m = llama(tied=tied)
    c = cluster(host("a", gpus=[gpu(0, 16, host="a"), gpu(1, 16, 2, host="a"), gpu(2, 24, 8, host="a")]))
    s = spec("llamabox")
    plan = place(c, m, s, plugins=PLUGINS)
    main = plan.replicas[0].parts[0]
    assert len(plan.replicas[0].parts) == 1 and len(main.gpus) >= 2 and main.cpu_layers == 0
    loaded = assert_booked_is_loaded(plan, m, s, c, tmp_path)
    assert not loaded[CPU].layers and not loaded[CPU].output_weight


@pytest.mark.parametrize("tied", [False, True])
def test_full_offload_split_over_rpc_servers(tmp_path, tied):
    m = llama(tied=tied)
    c = cluster(host("a", gpus=[gpu(0, 12, host="a")]), host("b", gpus=[gpu(0, 12, host="b")]),
                host("c", gpus=[gpu(0, 16, host="c")]))
    s = spec("llamabox")
    plan = place(c, m, s, plugins=PLUGINS)
    parts = plan.replicas[0].parts
    assert [p.role for p in parts].count("rpc") >= 1 and parts[0].cpu_layers == 0
    loaded = assert_booked_is_loaded(plan, m, s, c, tmp_path)
    last = f"cuda {parts[0].gpus[-1]}"
    assert loaded[last].output_weight and loaded[last].output_slot  # the main server's last GPU


@pytest.mark.parametrize("tied", [False, True])
def test_partial_offload_keeps_the_output_weight_in_ram(tmp_path, tied):
    m = llama(tied=tied)
    c = cluster(host("a", gpus=[gpu(0, 10, host="a"), gpu(1, 8, host="a")], ram_gib=256))
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=PLUGINS)
    main = plan.replicas[0].parts[0]
    assert main.cpu_layers > 0 and len(main.gpus) == 2
    loaded = assert_booked_is_loaded(plan, m, s, c, tmp_path)
    assert loaded[CPU].output_weight  # pinned, whether it is output.weight or the embedding's copy
    slot = next(d for d in loaded.values() if d.output_slot)
    assert slot is loaded[f"cuda {main.gpus[-1]}"] and not slot.output_weight  # only the norm went there


def test_partial_offload_with_rpc_servers_for_the_ram(tmp_path):
    m = llama()
    # a's RAM holds the embedding, the output weight and four layers at most: the rest needs b's GPU.
    c = cluster(host("a", gpus=[gpu(0, 10, host="a")], ram_gib=11), host("b", gpus=[gpu(0, 12, host="b")], ram_gib=8))
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=PLUGINS)
    parts = plan.replicas[0].parts
    assert parts[0].cpu_layers > 0 and [p.role for p in parts] == ["main", "rpc"]
    loaded = assert_booked_is_loaded(plan, m, s, c, tmp_path)
    assert loaded[CPU].output_weight


def test_partial_offload_never_puts_every_layer_on_gpus(tmp_path):
    """One GPU holds every layer but not the output layer too: full offload fails. A partial
    layout with no CPU layer would make llama-server load the output weight onto that GPU
    (cpu_layers == 0 means full offload to the act phase), so one layer stays in RAM."""
    m = llama()
    d = estimate(m, spec("llamabox"), "partial")
    fits_layers = (sum(d.layer_bytes) + d.device_overhead + d.output_norm_bytes) / GiB + 0.1
    c = cluster(host("a", gpus=[gpu(0, fits_layers, host="a")], ram_gib=256))
    assert not place(c, m, spec("llamabox"), plugins=PLUGINS).placed
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=PLUGINS)
    main = plan.replicas[0].parts[0]
    assert main.cpu_layers == 1 and main.layers == len(SIZES) - 1
    loaded = assert_booked_is_loaded(plan, m, s, c, tmp_path)
    assert loaded[CPU].output_weight and loaded[CPU].layers == [0]


def _flag(argv, flag):
    return argv[argv.index(flag) + 1]


def test_what_the_estimate_assumes_is_pinned_in_the_argv(tmp_path):
    """Flash attention, batch sizes and slots decide the compute buffers and the sliding-window cells the
    estimate books (agentd_llamabox/memory.py): the launched command line says the same."""
    from agentd_llamabox import memory

    m = llama()
    c = cluster(host("a", gpus=[gpu(0, 80, host="a")]))
    plan = place(c, m, spec("llamabox"), plugins=PLUGINS)
    _, main = launch(plan, m, tmp_path)
    assert _flag(main.argv, "--flash-attn") == "on" and "--kv-unified" in main.argv
    assert (_flag(main.argv, "--batch-size"), _flag(main.argv, "--ubatch-size"), _flag(main.argv, "--parallel")) \
        == (str(memory.N_BATCH), str(memory.N_UBATCH), str(memory.N_SEQ))
    # llama-box, an older llama.cpp: a bare --flash-attn, and its slots share one cache without --kv-unified.
    box = lb._for_llama_box(tuple(plan.replicas[0].args))
    assert "--flash-attn" in box and "on" not in box and "--kv-unified" not in box
    assert _flag(box, "--parallel") == str(memory.N_SEQ)


def test_the_context_and_batching_booked_are_the_ones_pinned_and_no_extra_arg_can_change_them():
    """What the estimate assumes is pinned in the argv, and a deployment cannot move it with extra args:
    those flags are refused at deploy (issue 14), so booking and argv cannot drift apart."""
    from agentd.errors import InvalidInput
    from agentd.plugins import PluginManager
    from agentd.types import RuntimeOptions

    m = gguf_model(layers=4, layer_bytes=GiB, vocab=32000, kv_heads=8, head_dim=128)
    s = spec("llamabox", ctx=16384)
    d = estimate(m, s)
    assert d.breakdown["ctx_size"] == 16384
    c = cluster(host("a", gpus=[gpu(0, 80, host="a")]))
    args = place(c, m, s, plugins=PLUGINS).replicas[0].args
    got = (_flag(args, "--parallel"), _flag(args, "--ubatch-size"), _flag(args, "--ctx-size"))
    assert got == ("4", "512", "16384")
    for extra in (("-np", "8"), ("--ubatch-size=1024",), ("-c", "32768"), ("--ctx_size", "32768")):
        bad = s.model_copy(update={"options": RuntimeOptions(ctx_size=16384, extra_args=extra)})
        with pytest.raises(InvalidInput, match="is set by agentd"):
            PluginManager.load().check_launch_options(bad)
