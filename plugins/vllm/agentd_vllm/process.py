"""Act phase of the vLLM plugin: `vllm serve` on the main host, Ray for multi-host plans.

Single host: one `vllm serve MODEL` with the plan's tensor/pipeline sizes,
CUDA_VISIBLE_DEVICES from the plan, listening on the main endpoint.

Several hosts: a Ray head (`ray start --head --block`) on the main host, a
Ray worker (`ray start --address HEAD --block`) on every other host, its
raylet listening on the part's own endpoint, then `vllm serve ...
--distributed-executor-backend ray` on the main host once the head and every
worker's raylet accept connections (started earlier, vLLM competes with the
workers' start for the CPU and finds an incomplete cluster). Every port Ray opens is given explicitly from
`ray_port_range`, because Ray's defaults (and its random worker ports) land
in or near the kernel's ephemeral range and collide with outgoing
connections. The head's GCS port must be known on every host without a
round-trip, so it is derived from the instance id within `ray_port_range`
(the same on every host with the same range) and checked free like any port.

In a secure cluster (`Assignment.api_key` set) the Ray cluster of an instance is
closed to everything but that instance's own parts (issue 14 item 2): Ray's
token authentication (`RAY_AUTH_MODE=token`, Ray >= 2.5x) with a token derived
from the instance's key (HMAC-SHA256(api_key, "agentd-ray-auth")), which only
the agents of the cluster can derive, written 0600 in the instance's work dir
and named by `RAY_AUTH_TOKEN_PATH` for the head, the workers and `vllm serve`
(the Ray driver). A process without it gets nothing from the GCS: `ray start
--address HEAD` never joins, `ray status` fails. Ray's TLS (`RAY_USE_TLS=1`) is
on as well, with each host's certificate from a CA of the instance's own that
every agent derives from the instance key (ray_tls.py): the token travels
encrypted, and only the instance's own parts pass the handshake. Ray's session dir (sockets,
logs, spilled objects) is private too: `<work dir>/ray`, 0700, or, when that
path is too long for the AF_UNIX sockets Ray puts 62 characters below it, a
0700 directory with an unguessable name from `mkdtemp`, found again through the
`<work dir>/ray` symlink (never a predictable /tmp path another user could
create first).

The API server gets the assignment's own key (`Assignment.api_key`, set in
secure mode) through VLLM_API_KEY, which vLLM reads when `--api-key` is not
given: the key stays out of the command line (`ps` shows argv to every local
user). vLLM checks it on /v1/ only, so /health stays open for probes.

Flags are checked against the installed vLLM's `vllm serve --help` in the
vllm test tier (plugins/vllm/tests/test_runtime.py), so a renamed flag fails a test.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import stat
import tempfile
import zlib
from pathlib import Path

from agentd.plugins.api import (
    Endpoint,
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
    main_part_index,
    spans_hosts,
)
from agentd.types import Assignment, Part
from agentd_vllm.ray_tls import TLS_DIR, write_node_tls

NAME = "vllm"
RAY_WORKER_PORTS = 16  # ports for Ray's worker processes on one node (one per worker process)


def ray_head_port(instance_id: str, port_range: tuple[int, int]) -> int:
    lo, hi = port_range
    return lo + zlib.crc32(instance_id.encode()) % (hi - lo + 1)


# Ray puts AF_UNIX sockets about 62 characters below its temp dir
# ("/session_2026-12-03_12-50-34_247505_1675/sockets/plasma_store"); sun_path holds 107.
RAY_TEMP_DIR_MAX = 44
RAY_TOKEN_FILE = "ray-auth-token"


def _private_dir(path: Path) -> bool:
    """A directory this user owns that nobody else can enter (never follows a symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def ray_temp_dir(work_dir: Path) -> Path:
    """The instance's Ray temp dir on this host, inside a directory only this user can enter.

    Ray makes its temp dir and session dirs world-writable (0777) itself, so what keeps other local
    users out is the parent: the instance's work dir (made 0700) when `<work dir>/ray` is short enough
    for Ray's sockets, else a `mkdtemp` directory (0700, random name) that `<work dir>/ray-tmp` links to,
    so that a restart and agentd_stop find it again."""
    if len(str(work_dir / "ray")) <= RAY_TEMP_DIR_MAX:
        work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(work_dir, 0o700)
        if not _private_dir(work_dir):
            raise InvalidInput(f"{work_dir} is not a private directory of this user; refusing it for Ray")
        return work_dir / "ray"
    link = work_dir / "ray-tmp"
    if link.is_symlink():
        parent = Path(os.readlink(link))
        if _private_dir(parent):
            return parent / "ray"
        link.unlink()
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    parent = Path(tempfile.mkdtemp(prefix="agentd-ray-"))
    os.symlink(parent, link)
    return parent / "ray"


def remove_ray_temp_dir(work_dir: Path) -> None:
    link = work_dir / "ray-tmp"
    if link.is_symlink():
        parent = Path(os.readlink(link))
        if _private_dir(parent):
            shutil.rmtree(parent, ignore_errors=True)
        link.unlink(missing_ok=True)
    shutil.rmtree(work_dir / "ray", ignore_errors=True)


def ray_auth_token(api_key: str) -> str:
    """The instance's Ray token: only agents that hold the cluster secret can derive it."""
    return hmac.new(api_key.encode(), b"agentd-ray-auth", hashlib.sha256).hexdigest()


def ray_auth_env(a: Assignment, work_dir: Path) -> dict[str, str]:
    """Ray token authentication for every Ray process and driver of a secure instance ({} when insecure)."""
    if not getattr(a, "api_key", ""):
        return {}
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = work_dir / RAY_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(ray_auth_token(a.api_key))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def ray_tls_env(a: Assignment, work_dir: Path, address: str) -> dict[str, str]:
    """Ray's mutual TLS with this host's certificate from the instance's own CA ({} when insecure): ray_tls.py."""
    if not getattr(a, "api_key", ""):
        return {}
    paths = write_node_tls(work_dir, a.api_key, a.instance_id, address)
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(paths["cert"]), "RAY_TLS_SERVER_KEY": str(paths["key"]),
            "RAY_TLS_CA_CERT": str(paths["ca"])}


def vllm_binary(ctx: LaunchContext) -> str:
    return find_binary(ctx.settings.vllm_binary, ("vllm",), setting="vllm_binary")


def ray_binary(ctx: LaunchContext) -> str:
    vllm = ctx.settings.vllm_binary or ""
    dirs = [Path(vllm).parent] if "/" in vllm else []
    return find_binary("", ("ray",), dirs, setting="vllm_binary (ray is looked up beside it)")


CTX_HINT = "use the ctx_size option (agentd deploy --ctx-size), which placement books"
MEM_HINT = "use the gpu_memory_utilization option (agentd deploy --gpu-memory-utilization), which placement books"
LAYOUT_HINT = "placement decides tensor and pipeline parallelism; use --parallelism, --pin or --exclude-gpu"
ADDRESS_HINT = "agentd binds each server to the host's internal address and a port from port_range"

# What only agentd may put on `vllm serve`'s command line (issue 14): see agentd/plugins/reserved.py.
RESERVED = ReservedLaunch(
    flags=(
        "--model", "--served-model-name", "--config",
        "--host", "--port", "--uds", "--root-path", "--api-key", "--ssl-keyfile", "--ssl-certfile",
        "--ssl-ca-certs", "--allowed-local-media-path",
        "-tp", "--tensor-parallel-size", "-pp", "--pipeline-parallel-size", "-dp", "--data-parallel-size",
        "-dpl", "--data-parallel-size-local", "-dpa", "--data-parallel-address", "-dpp", "--data-parallel-rpc-port",
        "--data-parallel-start-rank", "-dpb", "--data-parallel-backend", "--data-parallel-hybrid-lb",
        "--data-parallel-external-lb", "--enable-expert-parallel", "--headless", "-asc", "--api-server-count",
        "--distributed-executor-backend",
        "--gpu-memory-utilization", "--kv-cache-memory-bytes", "--max-model-len", "--cpu-offload-gb",
        "--swap-space", "--kv-cache-dtype", "--speculative-config",
    ),
    env=("VLLM_API_KEY", "VLLM_HOST_IP", "VLLM_PORT", "RAY_ADDRESS", "VLLM_ALLOW_LONG_MAX_MODEL_LEN",
         "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR",
         "RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"),
    abbreviations=True,  # argparse: --max-model means --max-model-len
    hints={"--max-model-len": CTX_HINT, "--gpu-memory-utilization": MEM_HINT, "--host": ADDRESS_HINT,
           "--port": ADDRESS_HINT, "--api-key": "agentd gives each server its own key (VLLM_API_KEY)",
           **{f: LAYOUT_HINT for f in ("-tp", "--tensor-parallel-size", "-pp", "--pipeline-parallel-size")}},
)


@hookimpl
def agentd_reserved_launch(runtime):
    return RESERVED if runtime == NAME else None


def serve_argv(a: Assignment, binary: str, ep_address: str, ep_port: int) -> list[str]:
    """The `vllm serve` command line for an assignment (the plan's args win over ours)."""
    extra = tuple(a.plan.args) + tuple(a.options.extra_args)
    argv = [binary, "serve", a.model, "--host", ep_address, "--port", str(ep_port),
            "--served-model-name", a.deployment]
    if not has_flag(extra, ("--tensor-parallel-size", "-tp")):
        argv += ["--tensor-parallel-size", str(a.plan.tensor_parallel)]
    if not has_flag(extra, ("--pipeline-parallel-size", "-pp")):
        argv += ["--pipeline-parallel-size", str(a.plan.pipeline_parallel)]
    if a.options.gpu_memory_utilization is not None and not has_flag(extra, ("--gpu-memory-utilization",)):
        argv += ["--gpu-memory-utilization", f"{a.options.gpu_memory_utilization:g}"]
    if a.options.ctx_size and not has_flag(extra, ("--max-model-len",)):
        argv += ["--max-model-len", str(a.options.ctx_size)]
    if spans_hosts(a) and not has_flag(extra, ("--distributed-executor-backend",)):
        argv += ["--distributed-executor-backend", "ray"]
    return argv + list(extra)


def _ray_node_ports(ctx: LaunchContext, head_port: int) -> dict[str, int]:
    """This node's Ray ports, none equal to the head's GCS port."""
    out: dict[str, int] = {}
    for key in ("node-manager", "object-manager", "runtime-env-agent", "dashboard-agent-grpc",
                "dashboard-agent-listen", "metrics-export", "ray-client-server"):
        p = ctx.ray_port(key)
        if p == head_port:
            p = ctx.ray_port(key + "-2")
        out[key] = p
    first = ctx.ray_port("workers", RAY_WORKER_PORTS)
    if first <= head_port < first + RAY_WORKER_PORTS:
        first = ctx.ray_port("workers-2", RAY_WORKER_PORTS)
    out["min-worker"], out["max-worker"] = first, first + RAY_WORKER_PORTS - 1
    return out


def ray_argv(ctx: LaunchContext, a: Assignment, part: Part, address: str, head: Endpoint,
             is_head: bool, worker_port: int = 0) -> tuple[list[str], tuple[Endpoint, ...]]:
    ports = _ray_node_ports(ctx, head.port)
    if not is_head:
        # A worker's raylet listens on the part's own endpoint, which every host knows from the assignment, so
        # that `vllm serve` on the main host starts only once every worker node is up (not while they start).
        ports["node-manager"] = worker_port
    argv = [ray_binary(ctx), "start", "--block", "--disable-usage-stats", "--node-ip-address", address,
            "--num-gpus", str(len(part.gpus)), "--temp-dir", str(ray_temp_dir(ctx.work_dir))]
    if is_head:
        argv += ["--head", "--port", str(head.port), "--include-dashboard=false",
                 "--ray-client-server-port", str(ports["ray-client-server"])]
    else:
        argv += ["--address", str(head)]
    argv += ["--node-manager-port", str(ports["node-manager"]),
             "--object-manager-port", str(ports["object-manager"]),
             "--runtime-env-agent-port", str(ports["runtime-env-agent"]),
             "--dashboard-agent-grpc-port", str(ports["dashboard-agent-grpc"]),
             "--dashboard-agent-listen-port", str(ports["dashboard-agent-listen"]),
             "--metrics-export-port", str(ports["metrics-export"]),
             "--min-worker-port", str(ports["min-worker"]), "--max-worker-port", str(ports["max-worker"])]
    bound = [head.port] if is_head else []
    bound += [v for k, v in ports.items() if k not in ("min-worker", "max-worker", "ray-client-server")]
    if is_head:
        bound.append(ports["ray-client-server"])
    return argv, tuple(Endpoint(host=address, port=p) for p in bound)


def launch(a: Assignment, part_index: int, ctx: LaunchContext) -> list[ProcessSpec]:
    part, ep = a.plan.parts[part_index], a.endpoints[part_index]
    if part.role not in ("main", "worker"):
        raise InvalidInput(f"vllm has no part role {part.role!r} (main and worker only)")
    env = cuda_env(part)
    env.update(a.options.env)
    gpus = () if ctx.simulated_gpus else part.gpus
    main_i = main_part_index(a)
    main_ep = a.endpoints[main_i]
    serve_key = {"VLLM_API_KEY": a.api_key} if getattr(a, "api_key", "") else {}
    if not spans_hosts(a):
        argv = serve_argv(a, vllm_binary(ctx), ep.address, ep.port)
        return [ProcessSpec(
            name="main", argv=tuple(argv), env={**env, **serve_key}, part_index=part_index, role="main",
            cwd=str(ctx.work_dir),
            listen=Endpoint(host=ep.address, port=ep.port), ports=(Endpoint(host=ep.address, port=ep.port),),
            ready=HttpProbe(host=ep.address, port=ep.port, path="/health"), gpus=gpus)]
    head = Endpoint(host=main_ep.address, port=ray_head_port(a.instance_id, ctx.settings.ray_port_range))
    ray_env = dict(env, RAY_USAGE_STATS_ENABLED="0", **ray_auth_env(a, ctx.work_dir),
                   **ray_tls_env(a, ctx.work_dir, ep.address))
    if part.role == "worker":
        argv, bound = ray_argv(ctx, a, part, ep.address, head, is_head=False, worker_port=ep.port)
        node = Endpoint(host=ep.address, port=ep.port)
        return [ProcessSpec(name=f"ray-worker-{part_index}", argv=tuple(argv), env=ray_env, part_index=part_index,
                            role="worker", cwd=str(ctx.work_dir), listen=node, ports=bound,
                            ready=TcpProbe(host=node.host, port=node.port), wait_for=(head,), gpus=gpus)]
    argv, bound = ray_argv(ctx, a, part, ep.address, head, is_head=True)
    head_spec = ProcessSpec(name="ray-head", argv=tuple(argv), env=ray_env, part_index=part_index, role="main",
                            cwd=str(ctx.work_dir), listen=head, ports=bound,
                            ready=TcpProbe(host=head.host, port=head.port), gpus=gpus)
    serve_env = dict(ray_env, RAY_ADDRESS=str(head), VLLM_HOST_IP=ep.address, **serve_key)
    workers = tuple(Endpoint(host=e.address, port=e.port) for i, e in enumerate(a.endpoints)
                    if a.plan.parts[i].role == "worker" and a.plan.parts[i].host != part.host)
    serve = ProcessSpec(
        name="main", argv=tuple(serve_argv(a, vllm_binary(ctx), ep.address, ep.port)), env=serve_env,
        part_index=part_index, role="main", cwd=str(ctx.work_dir), listen=Endpoint(host=ep.address, port=ep.port),
        ports=(Endpoint(host=ep.address, port=ep.port),), ready=HttpProbe(host=ep.address, port=ep.port),
        wait_for=(head, *workers), gpus=gpus)
    return [head_spec, serve]


@hookimpl
def agentd_launch(assignment, part_index, ctx):
    if assignment.runtime != NAME:
        return None
    return launch(assignment, part_index, ctx)


@hookimpl
def agentd_stop(assignment, part_index, ctx):
    """Ray leaves its session dir (logs, sockets, spilled objects) behind; remove it with the instance."""
    if assignment.runtime != NAME or not spans_hosts(assignment):
        return
    remove_ray_temp_dir(ctx.work_dir)
    (ctx.work_dir / RAY_TOKEN_FILE).unlink(missing_ok=True)
    shutil.rmtree(ctx.work_dir / TLS_DIR, ignore_errors=True)
