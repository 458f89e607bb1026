"""Act phase of the SGLang plugin: `python -m sglang.launch_server` on every host of a replica.

One host: one server with the plan's `--tp-size/--pp-size/...`, CUDA_VISIBLE_DEVICES from the plan,
listening on the main endpoint.

Several hosts (one pipeline stage per host): the same command on each host with SGLang's own
multi-node flags, `--nnodes N --node-rank I --dist-init-addr MAIN:PORT` (no Ray). Rank 0 (the main
part) serves HTTP and opens the rendezvous at the dist-init address; the other ranks run schedulers
only and wait for it. SGLang derives its other TCP ports from the dist-init port (port + 1 .. + 6), so
the rendezvous port comes with a block of DIST_PORTS ports; it must be known on every host without a
round trip, so it is derived from the instance id within the agent's `ray_port_range` (the range
agentd sets aside for distributed runtimes' rendezvous), the same on every host with the same range.

Probes: `/health_generate` is the readiness and liveness probe: it answers 503 while the server is
starting and once it fails to produce a token, 200 once a one-token generation went through (an idle
server runs one; a busy one answers from its traffic). SGLang exempts /health* from its API key. The
default reading applies (2xx ready, anything else a failure): before the first ready answer a 503 only
delays readiness; after it, a 503 means SGLang saw its scheduler stop answering, a liveness failure.
The server's API key goes on the command line (`--api-key`): SGLang reads it from no environment
variable; the process record that holds the argv is readable by agentd only.

The program: the Python that has SGLang installed: `AGENTD_SGLANG_PYTHON` in the agent's environment,
else `python3` on PATH. Every flag passed here is checked against the installed SGLang's own argument
parser in the sglang test tier (plugins/sglang/tests/test_runtime.py).
"""

from __future__ import annotations

import os
import zlib

from agentd.plugins.api import (
    Endpoint,
    HttpProbe,
    InvalidInput,
    LaunchContext,
    ProcessSpec,
    ReservedLaunch,
    cuda_env,
    find_binary,
    hookimpl,
    main_part_index,
    spans_hosts,
)
from agentd.types import Assignment

NAME = "sglang"
PYTHON_VARIABLE = "AGENTD_SGLANG_PYTHON"
DIST_PORTS = 8  # the dist-init port and the 6 SGLang derives from it, plus one spare


def dist_init_port(instance_id: str, port_range: tuple[int, int]) -> int:
    """The rendezvous port of a multi-node replica: the same on every host, the first of DIST_PORTS."""
    lo, hi = port_range
    span = max(1, hi - lo + 1 - DIST_PORTS)
    return lo + zlib.crc32(instance_id.encode()) % span


def sglang_python(ctx: LaunchContext) -> str:
    return find_binary(os.environ.get(PYTHON_VARIABLE, ""), ("python3", "python"), setting=PYTHON_VARIABLE)


CTX_HINT = "use the ctx_size option (agentd deploy --ctx-size), which placement books"
MEM_HINT = ("use the gpu_memory_utilization option (agentd deploy --gpu-memory-utilization), which placement "
            "books as SGLang's --mem-fraction-static")
LAYOUT_HINT = "placement decides tensor, pipeline and expert parallelism; use --pin or --exclude-gpu"
ADDRESS_HINT = "agentd binds each server to the host's internal address and a port from port_range"

# What only agentd may put on SGLang's command line (agentd_reserved_launch): what launch sets, and what
# changes what SGLang allocates without placement booking it.
RESERVED = ReservedLaunch(
    flags=(
        "--model-path", "--model", "--served-model-name", "--host", "--port", "--api-key", "--admin-api-key",
        "--ssl-keyfile", "--ssl-certfile",
        "--tp-size", "--tensor-parallel-size", "--pp-size", "--pipeline-parallel-size", "--dp-size",
        "--data-parallel-size", "--ep-size", "--expert-parallel-size", "--ep", "--enable-dp-attention",
        "--attn-dp-size", "--attention-data-parallel-size",
        "--attn-cp-size", "--moe-dense-tp-size",
        "--nnodes", "--node-rank", "--dist-init-addr", "--nccl-init-addr", "--nccl-port", "--base-gpu-id",
        "--mem-fraction-static", "--max-total-tokens", "--context-length", "--chunked-prefill-size",
        "--max-running-requests", "--kv-cache-dtype", "--cpu-offload-gb", "--device",
    ),
    env=("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "SGLANG_PP_LAYER_PARTITION"),
    abbreviations=True,  # argparse: --mem-frac means --mem-fraction-static
    hints={"--context-length": CTX_HINT, "--mem-fraction-static": MEM_HINT, "--host": ADDRESS_HINT,
           "--port": ADDRESS_HINT, "--api-key": "agentd gives each server its own key",
           **{f: LAYOUT_HINT for f in ("--tp-size", "--tensor-parallel-size", "--pp-size",
                                        "--pipeline-parallel-size", "--ep-size", "--expert-parallel-size")}},
)


@hookimpl
def agentd_reserved_launch(runtime):
    return RESERVED if runtime == NAME else None


def server_argv(a: Assignment, python: str, address: str, port: int, *, nnodes: int = 1, node_rank: int = 0,
                dist_init: Endpoint | None = None, nccl_port: int | None = None) -> list[str]:
    """The launch_server command line (the plan's args, then the deployment's extra args)."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", a.model, "--host", address, "--port", str(port),
            "--served-model-name", a.deployment]
    if getattr(a, "api_key", ""):
        argv += ["--api-key", a.api_key]
    if nnodes > 1 and dist_init is not None:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--dist-init-addr", str(dist_init)]
    elif dist_init is not None:
        argv += ["--dist-init-addr", str(dist_init)]
    if nccl_port is not None:
        argv += ["--nccl-port", str(nccl_port)]
    return argv + list(a.plan.args) + list(a.options.extra_args)


def launch(a: Assignment, part_index: int, ctx: LaunchContext) -> list[ProcessSpec]:
    part, ep = a.plan.parts[part_index], a.endpoints[part_index]
    if part.role not in ("main", "worker"):
        raise InvalidInput(f"sglang has no part role {part.role!r} (main and worker only)")
    env = cuda_env(part)
    env.update(a.options.env)
    gpus = () if ctx.simulated_gpus else part.gpus
    listen = Endpoint(host=ep.address, port=ep.port)
    python = sglang_python(ctx)
    nccl = ctx.port("nccl")
    if not spans_hosts(a):
        if "--attn-dp-size" not in a.plan.args:
            argv = server_argv(a, python, ep.address, ep.port, nccl_port=nccl)
            block: tuple[Endpoint, ...] = ()
        else:  # DP attention talks over TCP ports derived from the dist-init port: give it a block of ours
            first = ctx.ray_port("dist-init", DIST_PORTS)
            argv = server_argv(a, python, ep.address, ep.port, nccl_port=nccl, nnodes=1,
                               dist_init=Endpoint(host=ep.address, port=first))
            block = tuple(Endpoint(host=ep.address, port=first + i) for i in range(DIST_PORTS - 1))
        return [ProcessSpec(
            name="main", argv=tuple(argv), env=env, part_index=part_index, role="main", cwd=str(ctx.work_dir),
            listen=listen, ports=(listen, Endpoint(host=ep.address, port=nccl), *block),
            ready=HttpProbe(host=ep.address, port=ep.port, path="/health_generate"), gpus=gpus)]
    main_i = main_part_index(a)
    main_ep = a.endpoints[main_i]
    dist = Endpoint(host=main_ep.address, port=dist_init_port(a.instance_id, ctx.settings.ray_port_range))
    ranks = sorted(range(len(a.plan.parts)), key=lambda i: (i != main_i, i))  # the main part is rank 0
    rank = ranks.index(part_index)
    argv = server_argv(a, python, ep.address, ep.port, nnodes=len(a.plan.parts), node_rank=rank,
                       dist_init=dist, nccl_port=nccl)
    if rank == 0:
        block = tuple(Endpoint(host=ep.address, port=dist.port + i) for i in range(DIST_PORTS - 1))
        return [ProcessSpec(
            name="main", argv=tuple(argv), env=env, part_index=part_index, role="main", cwd=str(ctx.work_dir),
            listen=listen, ports=(listen, Endpoint(host=ep.address, port=nccl), *block),
            ready=HttpProbe(host=ep.address, port=ep.port, path="/health_generate"), gpus=gpus)]
    # Other ranks serve no HTTP: they join rank 0's rendezvous, so they start once it accepts connections.
    return [ProcessSpec(
        name=f"rank-{rank}", argv=tuple(argv), env=env, part_index=part_index, role="worker", cwd=str(ctx.work_dir),
        ports=(Endpoint(host=ep.address, port=nccl),), wait_for=(dist,), gpus=gpus)]


@hookimpl
def agentd_launch(assignment, part_index, ctx):
    if assignment.runtime != NAME:
        return None
    return launch(assignment, part_index, ctx)

