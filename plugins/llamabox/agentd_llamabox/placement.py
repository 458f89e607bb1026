"""llama-box / llama.cpp placement: layer split over the main server's GPUs and rpc-servers.

Memory comes from the GGUF header, layer by layer (docs/placement.md):

    layer i   = weights of blk.i.* + KV cache of layer i for ctx tokens (f16 K and V)
    output    = output.weight (token_embd.weight when tied) + output_norm
    per device holding layers: compute buffer + CUDA context
    full offload:    the last device also holds the output layer + the logits buffer (n_ubatch x vocab x f32)
    partial offload: at least one layer stays on the CPU; so does the output weight (the act phase pins
                     it there), and the last device holds only output_norm
    main host RAM: token_embd (always on CPU) + the layers kept on CPU (+ output.weight in partial offload;
                   a tied output shares token_embd's mapping; on a CPU with AMX, llama.cpp copies it:
                   memory.amx_output_copy)

The output rule is the act phase's (agentd_llamabox/process.py, `offload`):
the output weight is on a GPU exactly when every layer is (`cpu_layers == 0`).
plugins/llamabox/tests/test_placement_argv.py checks that what placement books on each
device is what the launched command line puts there.

Layout rules: the main server holds at least one layer on its own GPUs
(`MinLayersOnMain(1)`); layers left on the CPU only when the deployment
allows CPU offload. Ranking (in the core's layer-split search): full offload
before partial, fewer rpc-servers and hosts, fewer CPU layers, then the
strategy.

Launch parameters: llama.cpp orders devices RPC first (in `--rpc` order),
then local GPUs; the plan lists rpc parts in that order and the main GPUs
in CUDA_VISIBLE_DEVICES order, so `--tensor-split` is the rpc parts'
layers followed by the main GPUs' (the last one counting the output layer).
The act phase appends `--rpc host:port,...` from the assignment's
endpoints in the same order. Layers on the CPU of a host with AMX, for a
model whose AMX path fails in llama.cpp (memory.amx_unusable): `--no-repack`.
"""

from __future__ import annotations

from agentd.plugins.api import (
    CpuFeatureRam,
    LaunchParams,
    LayerDemand,
    LayerSplit,
    Layout,
    MinLayersOnMain,
    hookimpl,
)
from agentd.types import DeploymentSpec, MiB, ModelInfo
from agentd_llamabox import memory

NAME = "llamabox"
DEFAULT_CTX = 8192  # llama-box's usual --ctx-size; never more than the model's own
N_UBATCH = memory.N_UBATCH
CUDA_CONTEXT = 256 * MiB  # per process and device: CUDA context and cuBLAS workspace (not in llama.cpp's projection)


def ctx_size(model: ModelInfo, spec: DeploymentSpec) -> int:
    """--ctx-size: the deployment's ctx_size, else min(the model's own, 8192). Extra args cannot change it,
    nor the batching: those flags are agentd's alone (process.RESERVED), so the booking is what runs."""
    return spec.options.ctx_size or min(model.context_length, DEFAULT_CTX)


def _layer_weights(model: ModelInfo) -> tuple[int, ...]:
    if model.layer_bytes:
        return model.layer_bytes
    rest = max(0, model.total_weight_bytes - sum(model.non_repeating_bytes.values()))
    return (rest // model.num_hidden_layers,) * model.num_hidden_layers


def estimate(model: ModelInfo, spec: DeploymentSpec, offload: str = "full") -> LayerDemand:
    """The layer-split demand for a full or partial offload (agentd_llamabox.memory has the terms)."""
    ctx = ctx_size(model, spec)
    mem = memory.llama_cpp_memory(model, ctx, memory.Batching())
    layers = tuple(w + kv for w, kv in zip(_layer_weights(model), mem.kv_per_layer, strict=True))
    nr = model.non_repeating_bytes
    norm = nr.get("output_norm", 0)
    output = (nr.get("output") or nr.get("token_embd", 0)) + norm
    breakdown = {"kv_per_layer": max(mem.kv_per_layer, default=0), "logits": mem.logits, "ctx_size": ctx,
                 "masks": mem.masks, "core": mem.core}
    # On a CPU with AMX: what its buffers add, unless this model is launched without them (--no-repack).
    amx_copy = 0 if memory.amx_unusable(model) else memory.amx_output_copy(model)
    amx_ram = (CpuFeatureRam(memory.AMX_FEATURE, amx_copy),) if amx_copy else ()
    if offload == "partial":
        # Tensor overrides (the output weight pinned to the CPU) turn pipeline parallelism off.
        return LayerDemand(
            layer_bytes=layers, output_bytes=output, device_overhead=mem.partial_device + CUDA_CONTEXT,
            cpu_fixed_bytes=nr.get("token_embd", 0) + mem.host_partial,
            breakdown={**breakdown, "compute": mem.partial_device, "host_compute": mem.host_partial},
            output_norm_bytes=norm,
            # Tied embeddings: the output "weight" is token_embd's mapping, already counted in RAM.
            cpu_output_bytes=nr.get("output", 0), cpu_feature_ram=amx_ram)
    device = mem.pipeline_device
    return LayerDemand(
        layer_bytes=layers,
        output_bytes=output,
        device_overhead=device + CUDA_CONTEXT,
        output_overhead=max(0, mem.pipeline_output_device - device),
        cpu_fixed_bytes=nr.get("token_embd", 0) + mem.host_single,
        breakdown={**breakdown, "compute": device, "output_compute": mem.pipeline_output_device,
                   "single_compute": mem.single_device, "host_compute": mem.host_single},
        output_norm_bytes=norm,
        cpu_output_bytes=nr.get("output", 0),
        single_device_overhead=mem.single_device + CUDA_CONTEXT,
        pipeline_cpu_bytes=mem.host_pipeline - mem.host_single,
        cpu_feature_ram=amx_ram,
    )


@hookimpl
def agentd_constraints(runtime, model: ModelInfo, spec: DeploymentSpec):
    if runtime != NAME:
        return None
    return [MinLayersOnMain(1)]


@hookimpl
def agentd_propose(runtime, model: ModelInfo, spec: DeploymentSpec, limits):
    if runtime != NAME:
        return None
    shapes = [LayerSplit("full")]
    if spec.options.allow_cpu_offload:
        shapes.append(LayerSplit("partial"))
    return shapes


@hookimpl
def agentd_estimate(runtime, model: ModelInfo, spec: DeploymentSpec, shape):
    if runtime != NAME or not isinstance(shape, LayerSplit):
        return None
    return estimate(model, spec, shape.offload)


def tensor_split(layout: Layout) -> list[int]:
    """Layers per device in llama.cpp's device order: rpc-servers, then the main GPUs."""
    rpc = [n for p in layout.parts if p.role == "rpc" for n in p.layer_split]
    main = list(layout.main.layer_split)
    if layout.shape.offload == "full" and main:
        main[-1] += 1  # the output layer counts as one more "layer" on the last device
    return rpc + main


@hookimpl
def agentd_layout_args(runtime, model: ModelInfo, spec: DeploymentSpec, layout: Layout):
    if runtime != NAME or not isinstance(layout.shape, LayerSplit):
        return None
    split = tensor_split(layout)
    args = [
        "--ctx-size", str(ctx_size(model, spec)),
        "--n-gpu-layers", str(sum(split)),
        "--split-mode", "layer",
    ]
    if len(split) > 1:
        args += ["--tensor-split", ",".join(map(str, split))]
    # What the estimate assumes (batch sizes, slots, flash attention); extra args that change them are
    # followed by the estimate and repeated here the same.
    args += memory.pinned_args(memory.Batching())
    if layout.main.cpu_layers and memory.AMX_FEATURE in layout.main.cpu_features and memory.amx_unusable(model):
        # Layers on a CPU with AMX, whose llama.cpp fails on this model there: no AMX (nor CPU_REPACK) buffers,
        # the weights stay in the file's mapping, booked as on any other CPU.
        args.append("--no-repack")
    env = tuple({"CUDA_VISIBLE_DEVICES": ",".join(map(str, p.gpus))} for p in layout.parts)
    return LaunchParams(args=tuple(args), env=env)
