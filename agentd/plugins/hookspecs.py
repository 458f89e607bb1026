"""Hook specifications for runtime plugins (entry-point group `agentd.plugins`).

The phases follow the Kubernetes scheduling framework: *describe* what a
runtime offers, *declare* its constraints and memory needs, *propose / filter
/ score* layouts, then *act* on processes. Placement hooks are synchronous and
pure: they get a frozen snapshot and return values, never touching the network
or the disk. Process hooks may be async.

Rules for evolving this file: specs only ever gain arguments (pluggy passes
only the arguments an implementation names, so old plugins keep working), and
every hook is documented in docs/plugins.md (a test checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from agentd.plugins.api import (  # noqa: F401 (PROJECT and hookimpl: re-exported for older imports)
    PROJECT,
    Constraint,
    HealthVerdict,
    InstalledRuntime,
    LaunchContext,
    LaunchParams,
    LayerDemand,
    Layout,
    ProbeResult,
    ProcessSpec,
    ReservedLaunch,
    RuntimeInfo,
    Scorer,
    Shape,
    ShapeLimits,
    ShardDemand,
    Sharded,
    hookimpl,
    hookspec,
)
from agentd.types import Assignment, DeploymentSpec, ModelInfo

# --------------------------------------------------------------------------- describe


@hookspec
def agentd_runtime() -> RuntimeInfo | None:
    """Describe the runtime this plugin provides, if any.

    Return an `agentd.plugins.RuntimeInfo` (name, model formats served,
    description), or None for a plugin that only adds constraints to other
    runtimes. Runtime names are unique across loaded plugins.
    """


@hookspec
def agentd_installed(settings: Any) -> InstalledRuntime | None:
    """Say whether this host has your runtime's program, and its version.

    Called on each agent when it starts (`settings` is its agentd.config.Settings:
    the configured binary paths). Return `InstalledRuntime(name, version)`
    when the program is there (version "" when it cannot be read cheaply),
    None when it is not. The agent reports what every plugin answers in its
    inventory (`runtimes`), and placement never puts a runtime on a host
    that reports runtimes without it. Keep it quick (well under a second):
    look for the program, read a version from package metadata or
    `--version`; never import the runtime.
    """


# --------------------------------------------------------------------------- declare, propose, filter, score
# (placement phase: synchronous and pure; see agentd/placement and docs/placement.md)
#
# Every placement hook receives `runtime` (the deployment's runtime name) so a
# plugin can add rules to other plugins' runtimes; return None for runtimes
# you do not know. `model` is an agentd.types.ModelInfo, `spec` the
# DeploymentSpec. Declaration hooks are called once per placement; the
# objects they return are then called by the core for every candidate, so
# keep them cheap.


@hookspec
def agentd_constraints(runtime: str, model: ModelInfo, spec: DeploymentSpec) -> Iterable[Constraint] | None:
    """Declare the rules a layout must satisfy (filter phase).

    Return an iterable of constraint objects (see agentd.placement.Constraint:
    `check_static()`, `check_device(gpu)`, `check_shape(shape)`,
    `check_layout(layout)`, each returning None or a Rejection), or None.
    Every plugin's constraints apply, so a third-party plugin can restrict a
    built-in runtime. A rejection's `reason` must be stable text: the
    diagnosis counts rejections by it.
    """


@hookspec(firstresult=True)
def agentd_propose(runtime: str, model: ModelInfo, spec: DeploymentSpec,
                   limits: ShapeLimits) -> Iterable[Shape] | None:
    """Propose layout shapes for `runtime`, most preferred first (propose phase).

    Return an iterable of agentd.placement shapes (`Sharded(tp, pp, hosts)`
    or `LayerSplit(offload)`), or None when `runtime` is not yours. `limits`
    (ShapeLimits) bounds what the filtered hosts could hold. The core takes
    the first shape with a valid candidate, so the order is the runtime's
    preference; it may be a lazy generator.
    """


@hookspec(firstresult=True)
def agentd_estimate(runtime: str, model: ModelInfo, spec: DeploymentSpec,
                    shape: Shape) -> ShardDemand | LayerDemand | None:
    """Declare the memory `shape` needs on each device (declare phase).

    Return `ShardDemand` for a Sharded shape (bytes per GPU, and the
    fraction of each GPU the runtime takes, if it takes a fixed one) or
    `LayerDemand` for a LayerSplit (bytes per layer, output layer, per-device
    overheads, host RAM); None when `runtime` is not yours.
    """


@hookspec
def agentd_scorers(runtime: str, model: ModelInfo, spec: DeploymentSpec) -> Iterable[Scorer] | None:
    """Declare scorers that rank valid candidates of the same shape (score phase).

    Return an iterable of objects with `score(layout) -> float` (higher is
    better) and optionally `weight`, or None. The core adds the weighted
    scores and breaks ties with the placement strategy (binpack | spread).
    For layer-split layouts, fewer rpc-servers, fewer hosts and fewer CPU
    layers rank first; scores order candidates equal on those.
    """


@hookspec(firstresult=True)
def agentd_layout_args(runtime: str, model: ModelInfo, spec: DeploymentSpec,
                       layout: Layout) -> LaunchParams | None:
    """Turn the chosen layout into launch parameters for the plan.

    Return agentd.placement.LaunchParams: `args` for the main process (e.g.
    --tensor-parallel-size, --tensor-split) and `env` per part (e.g.
    CUDA_VISIBLE_DEVICES), or None for the core's default (no args,
    CUDA_VISIBLE_DEVICES per part). Endpoints and ports are not known yet:
    the act phase adds them.
    """


@hookspec(firstresult=True)
def agentd_explain(runtime: str, model: ModelInfo, spec: DeploymentSpec, layout: Layout, limits: ShapeLimits,
                   find: Callable[[Sequence[Sharded]], Layout | None]) -> str | None:
    """Say in one sentence why `layout` was chosen over the runner-up (the plan's `why`).

    Called once per placed replica, after the layout passed every check.
    `limits` are the ShapeLimits the proposals were made for. `find(shapes)`
    returns the first Layout among `shapes` (Sharded shapes) that would place
    on the same cluster view with the same checks and strategy, or None; it
    books nothing, so a plugin can name the layout another policy would have
    chosen ("TP=4 on GPUs 1-4 (NVLink); PP=3 would use 3 GPUs: --parallelism
    gpus"). Return a string, or None when `runtime` is not yours. Keep it
    cheap: each `find` costs about one more search per shape it tries.
    """


@hookspec(firstresult=True)
def agentd_model_file_roles(runtime: str) -> Iterable[str] | None:
    """The part roles whose hosts need the model's files on their own disk (docs/models.md).

    Placement prefers hosts that already hold the files for these parts and
    requires free disk in the model directory of a host that would fetch
    them; before launch, such a host fetches them from a peer. llamabox:
    `("main",)` (rpc-servers receive tensors over the network); vLLM: every
    role of a multi-host replica. Return None for runtimes you do not know;
    when no plugin answers, every role needs the files.
    """


# --------------------------------------------------------------------------- act
# (process phase: launch, health and stop of the processes a runtime starts; see agentd/runtime)
#
# The act hooks run on the host that runs a part, inside agentd's supervisor
# (agentd/runtime, docs/runtime.md). They may be `async def`. The supervisor
# owns the processes: spawning, readiness and liveness probes, restarts with
# backoff, adoption after an agentd restart, and stopping whole trees; the
# plugin only says what to run and how to read its answers.


@hookspec
def agentd_reserved_launch(runtime: str) -> ReservedLaunch | None:
    """Declare the launch flags and environment variables only agentd may set for `runtime`.

    Return an `agentd.plugins.ReservedLaunch` (flags, long and short; variable
    names and prefixes; whether the program accepts abbreviated long options;
    hints naming the deployment option to use instead), or None for runtimes
    you do not know. Declare what your `agentd_launch` sets (listen address,
    port, API key, model, devices) and whatever changes what the server
    allocates without placement booking it. Every plugin's declarations for
    the runtime apply, plus agentd's own (`LD_*`, `PATH`, `PYTHONPATH`,
    `CUDA_VISIBLE_DEVICES`, ...). A deploy whose `options.extra_args` or
    `options.env` set one is refused with INVALID_ARGUMENT naming it. Called
    by the coordinator for each deploy: pure, no I/O.
    """


@hookspec(firstresult=True)
def agentd_launch(assignment: Assignment, part_index: int, ctx: LaunchContext) -> list[ProcessSpec] | None:
    """Say which processes run part `part_index` of `assignment` on this host.

    Return a list of `agentd.runtime.ProcessSpec` (argv list, env, the
    endpoints it listens on and binds, a readiness probe, the endpoints it
    must wait for), or None when `assignment.runtime` is not yours. Called
    once per new instance and part; an instance id names one immutable
    assignment, so the same input must give the same specs. `ctx` is an
    `agentd.runtime.LaunchContext`: the node name, a private work dir, the
    agent's settings (binary paths), whether the GPUs are simulated, and
    `port(key)` / `ray_port(key)` for extra local ports from the configured
    ranges. Raise `agentd.errors.InvalidInput` for an assignment you cannot
    run (the instance becomes FATAL with your message).
    """


@hookspec(firstresult=True)
def agentd_health(assignment: Assignment, part_index: int, process: ProcessSpec,
                  result: ProbeResult) -> HealthVerdict | None:
    """Read one probe answer of `process` (a ProcessSpec of yours).

    `result` is an `agentd.runtime.ProbeResult` (ok, HTTP status, the first
    bytes of the body, or the connection error). Return an
    `agentd.runtime.HealthVerdict(ready, alive, detail)`, or None for the
    default reading (2xx is ready, anything else a failure). `alive=True`
    with `ready=False` means "not serving yet, but not failing" (a model still
    loading), which neither counts toward liveness failures nor marks it
    ready. Called on every probe: keep it cheap and free of I/O.
    """


@hookspec(firstresult=True)
def agentd_load_path(runtime: str) -> str | None:
    """The path on a replica's main server that says how busy it is (llamabox: `/slots`; vllm: `/metrics`;
    sglang: `/v1/loads?include=core`), or None.

    The /v1/ proxy GETs it about twice a second from each replica it sent a
    request to recently (with the server's own key), and hands the answer to
    `agentd_read_load`. None: the proxy routes by its own counters only.
    """


@hookspec(firstresult=True)
def agentd_read_load(runtime: str, status: int, body: bytes) -> tuple[int, ...] | None:
    """Read one answer from `agentd_load_path`: `(busy, capacity)` or `(busy, capacity, waiting)`: the requests
    the model server works on now, how many it can work on at once (0: it does not say), and how many wait in
    its own queue (llamabox: slots processing, slots; vllm: running, 0, waiting; sglang: running, its batch
    limit, waiting), or None when unreadable.

    The proxy prefers the least busy replica and skips a full one (no free slot and
    `proxy_replica_max_queue` waiting already) while another has room; when every
    replica is full, requests wait in a bounded line or get 429 (docs/on-demand.md).
    Called for every poll: keep it cheap and free of I/O.
    """


@hookspec
def agentd_stop(assignment: Assignment, part_index: int, ctx: LaunchContext) -> None:
    """Clean up after part `part_index` of `assignment` was stopped for good on this host.

    Called once every process of the instance on this host has been stopped
    (the whole process tree is already gone), not on restarts. Use it for
    runtime leftovers outside the process tree (temp dirs, sockets).
    Failures are logged and ignored.
    """
