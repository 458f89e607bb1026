"""Cluster subcommands: serve, deploy, ls, ps, rm, scale, nodes, status, watch, logs.

Every client command talks to `--server ADDR` (default: the local agent's
`listen` address); any agent forwards to the coordinator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from agentd.api.client import CannotPlace, ControlClient
from agentd.cli.common import EXIT_UNAVAILABLE, client_options, emit, key_values
from agentd.errors import InvalidInput
from agentd.v1 import control_pb2 as pb


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    cparents = [*parents, client_options()]

    p = sub.add_parser("serve", parents=parents, help="run this host's agent",
                       description="Run the agent: join (or bootstrap) the cluster, report this host's GPUs, "
                       "and run the instances assigned to it. Flags override the configuration.")
    p.add_argument("--listen", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:7070)")
    p.add_argument("--advertise", metavar="HOST:PORT", help="address peers use to reach this agent")
    p.add_argument("--http-listen", metavar="HOST:PORT", help="HTTP address for health, metrics and /v1")
    p.add_argument("--data-dir", metavar="DIR", help="state directory (Raft log, process records, logs)")
    p.add_argument("--join", metavar="ADDR[,ADDR...]", help="existing peers; omit to bootstrap a new cluster")
    p.add_argument("--token", dest="join_token", metavar="TOKEN",
                   help="a join token ('agentd token create'): get this host's certificate through --join first")
    p.add_argument("--node-name", metavar="NAME", help="this agent's name (default: the host name)")
    p.add_argument("--simulate", metavar="FILE", dest="simulate_inventory",
                   help="host-inventory JSON standing in for real GPUs")
    p.add_argument("--election-timeout", metavar="DURATION",
                   help="minimum election timeout, e.g. 500ms (the maximum becomes twice this)")
    p.add_argument("--heartbeat", metavar="DURATION", dest="heartbeat_interval", help="leader heartbeat interval")
    p.add_argument("--node-down-grace", metavar="DURATION", help="silence after which a host is marked down")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="host label (repeatable)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="no TLS and no authentication (loopback tests and demos only; logs a warning)")
    p.add_argument("--stop-models-on-exit", action="store_true", default=None,
                   help="stop this host's model servers when agentd stops (default: leave them running; "
                   "not 'agentd drain', which moves them to other hosts)")
    p.add_argument("--drain-on-stop", action="store_true", default=None, help="deprecated: --stop-models-on-exit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", parents=cparents, help="deploy a model",
                       description="Create a deployment. The coordinator places it at once; if it cannot be "
                       "placed, nothing is committed and the diagnosis is printed (exit 3).")
    p.add_argument("name", help="deployment name (a DNS label)")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="a catalog name NAME[@sha256:DIGEST] (`agentd model ls`), "
                   "hf:ORG/NAME[@REVISION][:GGUF-FILE-PATTERN], or the absolute path of a GGUF file or HF model "
                   "directory on the hosts (relative paths are refused)")
    p.add_argument("--runtime", required=True, help="runtime plugin: vllm, llamabox, ...")
    _spec_options(p)
    p.add_argument("--replace", action="store_true", help="replace an existing deployment of this name")
    p.add_argument("--wait", type=float, nargs="?", const=600.0, default=None, metavar="SECONDS",
                   help="wait until every part runs (default 600 s); exit 1 if one fails or time runs out")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("ls", parents=cparents, help="list deployments",
                       description="List deployments with their replica counts and states. By default the "
                                   "leader answers, with every committed change (linearizable).")
    p.add_argument("--local", action="store_true",
                   help="answer from the --server agent's own copy of the state, without the leader (may lag it; "
                        "READY counts the replicas whose main part runs on that agent's host)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("ps", parents=cparents, help="list instances with host, GPUs and state",
                       description="List running instances (one row per part of each replica).")
    p.add_argument("deployment", nargs="?", default="", help="only this deployment")
    p.add_argument("--local", action="store_true",
                   help="only the --server agent's host, from its own supervisor: works with no leader (an outage)")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("rm", parents=cparents, help="delete a deployment",
                       description="Delete a deployment; its processes are stopped on every host.")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("scale", parents=cparents, help="change a deployment's replica count",
                       description="Scale a deployment; new replicas are placed, surplus ones stopped. A "
                       "deployment scaled by load (deploy --max-replicas) takes new bounds instead: "
                       "--min-replicas/--max-replicas (a plain count is refused, as the load would undo it).")
    p.add_argument("name")
    p.add_argument("replicas", type=int, nargs="?")
    p.add_argument("--min-replicas", type=int, metavar="N", help="replicas by load: the new lower bound")
    p.add_argument("--max-replicas", type=int, metavar="M", help="replicas by load: the new upper bound")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("nodes", parents=cparents, help="list the cluster's hosts",
                       description="List hosts with their state, role in consensus, how each reports (VIA: "
                       "'direct' to the leader, or the voter that relays its reports), the voter a watcher "
                       "watches from (WATCHES) and GPUs. 'agentd nodes "
                       "approve NAME [--tenant T]...' lets a host held by its join token (token create "
                       "--needs-approval) get work, optionally only for deployments that select its tenants "
                       "(label tenant.agentd.io/T=true, which only this command sets). 'agentd nodes rm "
                       "NAME' removes a host gone for good: its replicas are re-placed, it leaves Raft, its "
                       "certificate is revoked and it can never rejoin under that name. Admin only.")
    p.add_argument("action", nargs="?", choices=["approve", "rm"],
                   help="approve: let host NAME get work; rm: remove host NAME for good")
    p.add_argument("name", nargs="?", help="the host to approve or remove")
    p.add_argument("--tenant", action="append", default=[], metavar="T",
                   help="with approve: dedicate the host to this tenant (repeatable)")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("status", parents=cparents, help="leader, term, members and commit index",
                       description="This agent's view of the consensus.")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", parents=cparents, help="stream deployment and instance events",
                       description="Stream events until interrupted (one line, or one JSON object, per event).")
    p.add_argument("deployment", nargs="?", default="")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("logs", parents=cparents, help="print an instance's log, from any host",
                       description="Print (or follow) an instance's log. INSTANCE is an instance id "
                       "(name-rN-gN) or name-rN.")
    p.add_argument("instance")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new lines")
    p.add_argument("--previous", action="store_true", help="the previous run's log")
    p.add_argument("--part", type=int, default=-1, help="which part of the replica (default: the main part)")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines")
    p.set_defaults(func=cmd_logs)


def _spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tenant", default="", help="the tenant whose API keys may use it on /v1/ (default: default)")
    p.add_argument("--strategy", choices=["binpack", "spread"], default="binpack")
    p.add_argument("--parallelism", choices=["auto", "latency", "gpus"], default="auto",
                   help="vLLM: auto = TP over NVLink, PP over PCIe or across hosts; latency = the largest TP; "
                   "gpus = the fewest GPUs (default auto)")
    p.add_argument("--idle-unload", default="0", metavar="AFTER",
                   help="stop the replicas after this long without a request (e.g. 15m; the deployment stays, "
                   "IDLE, and the next /v1/ request loads it again); default: never")
    p.add_argument("--min-replicas", type=int, metavar="N",
                   help="replicas by load: never fewer (default 1; 0 needs --idle-unload, which then says when "
                   "the last replica stops)")
    p.add_argument("--max-replicas", type=int, default=0, metavar="M",
                   help="replicas by load: never more; setting it turns scaling by load on (docs/on-demand.md)")
    p.add_argument("--target-queue", type=float, default=0.0, metavar="Q",
                   help="replicas by load: requests waiting per replica to aim for (add one above it, remove one "
                   "well below it)")
    p.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE", help="host label selector")
    p.add_argument("--pin", action="append", default=[], metavar="HOST[:GPU,GPU]", help="pin to a host / GPUs")
    p.add_argument("--exclude-gpu", action="append", default=[], metavar="UUID", help="never use this GPU")
    p.add_argument("--gpu-memory-utilization", type=float, metavar="F")
    p.add_argument("--ctx-size", type=int, metavar="N", help="context length (--max-model-len for vLLM)")
    p.add_argument("--allow-cpu-offload", action="store_true", help="llamabox: allow layers in host RAM")
    p.add_argument("--arg", action="append", default=[], dest="extra_args", metavar="ARG",
                   help="extra argument for the model server (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the server")


def spec_from_args(args: argparse.Namespace) -> pb.DeploymentSpec:
    pins = []
    for item in args.pin:
        host, _, gpus = item.partition(":")
        try:
            indices = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise InvalidInput(f"--pin expects HOST[:GPU,GPU], got {item!r}") from None
        pins.append(pb.GpuPin(host=host, gpus=indices))
    options = pb.RuntimeOptions(allow_cpu_offload=args.allow_cpu_offload, extra_args=args.extra_args,
                                env=key_values(args.env, "--env"))
    if args.gpu_memory_utilization is not None:
        options.gpu_memory_utilization = args.gpu_memory_utilization
    if args.ctx_size is not None:
        options.ctx_size = args.ctx_size
    # Never turned into a path here: a name that happens to exist in the caller's directory must not become
    # one (docs/models.md). A relative path is refused, saying what is accepted.
    from agentd.types import parse_model_ref  # pydantic: not for every CLI start

    try:
        model = parse_model_ref(args.model).text
    except ValueError as exc:
        raise InvalidInput(str(exc), where="--model") from None
    from agentd.config import parse_duration  # pydantic: not for every CLI start

    try:
        idle_unload = parse_duration(getattr(args, "idle_unload", "0") or "0")
    except ValueError as exc:
        raise InvalidInput(f"--idle-unload: {exc}") from None
    autoscale: dict = {"max_replicas": getattr(args, "max_replicas", 0) or 0,
                       "target_queue": getattr(args, "target_queue", 0.0) or 0.0}
    min_replicas = getattr(args, "min_replicas", None)
    if min_replicas is not None and not (min_replicas == 0 and idle_unload > 0 and not autoscale["max_replicas"]):
        autoscale["min_replicas"] = min_replicas  # `--min-replicas 0 --idle-unload T` alone is the idle unload
    return pb.DeploymentSpec(name=args.name, model=model, runtime=args.runtime, replicas=args.replicas,
                             tenant=getattr(args, "tenant", ""), idle_unload=idle_unload, **autoscale,
                             strategy=args.strategy, selector=key_values(args.selector, "--selector"), pin=pins,
                             exclude_gpus=args.exclude_gpu, options=options,
                             parallelism=getattr(args, "parallelism", "auto"))


def _client(args: argparse.Namespace) -> ControlClient:
    # Credentials (admin certificate, AGENTD_TOKEN, or plaintext for --insecure clusters): see api/client.py.
    return ControlClient.for_cli(getattr(args, "server", None))


def _dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


# ---------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from agentd.config import load_settings
    from agentd.daemon import run_daemon

    flags = {k: getattr(args, k, None) for k in ("listen", "advertise", "http_listen", "data_dir", "join",
                                                 "node_name", "simulate_inventory", "heartbeat_interval",
                                                 "node_down_grace", "insecure", "drain_on_stop", "stop_models_on_exit",
                                                 "join_token")}
    if args.election_timeout:
        from agentd.config import parse_duration

        try:
            low = parse_duration(args.election_timeout)
        except ValueError as exc:
            raise InvalidInput(str(exc), where="--election-timeout") from None
        flags["election_timeout_min"], flags["election_timeout_max"] = low, 2 * low
    if args.label:
        flags["labels"] = {**load_settings().labels, **key_values(args.label, "--label")}
    if getattr(args, "log_format", None):
        flags["log_format"] = args.log_format
    if getattr(args, "log_level", None):
        flags["log_level"] = args.log_level
    settings = load_settings(**flags)
    return run_daemon(settings)


def cmd_deploy(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    with _client(args) as c:
        try:
            reply = c.deploy(spec, replace=args.replace)
        except CannotPlace as exc:
            if getattr(args, "json", False):  # --json defaults to SUPPRESS (absent)
                print(json.dumps({"deployed": False, "diagnosis": str(exc)}, indent=2))
            else:
                print(f"agentd: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    data = _dict(reply)
    data["deployment"]["assignments"] = json.loads(reply.deployment.assignments_json or "[]")
    data["deployment"].pop("assignments_json", None)

    def human() -> str:
        lines = [f"{reply.message} (log index {reply.index})"]
        for a in data["deployment"]["assignments"]:
            parts = ", ".join(f"{p['host']}[{','.join(map(str, p['gpus']))}] {p['role']} {p['layers']}L"
                              for p in a["plan"]["parts"])
            lines.append(f"  replica {a['replica']}: {parts}")
            if a["replica"] < len(reply.why) and reply.why[a["replica"]]:  # a deploy places replicas 0..n-1
                lines.append(f"    why: {reply.why[a['replica']]}")
        return "\n".join(lines)

    if args.wait is None:
        emit(args, data, human)
        return 0
    parts = sum(len(a["plan"]["parts"]) for a in data["deployment"]["assignments"])
    bar = None if getattr(args, "json", False) or not sys.stderr.isatty() else _ProgressLine(sys.stderr)
    with _client(args) as c:
        ok, instances, why = wait_running(c, spec.name, parts, args.wait, progress=bar)
    if bar is not None:
        bar.done()
    data["instances"] = [_dict(i) for i in instances]
    emit(args, data, lambda: human() + "\n" + why)
    return 0 if ok else 1


class _ProgressLine:
    """One line on a terminal, rewritten in place: the parts fetching their model (docs/models.md)."""

    def __init__(self, out: Any):
        self.out = out
        self.shown = False

    def __call__(self, instances: list) -> None:
        fetching = [i for i in instances if i.state == "FETCHING"]
        if not fetching:
            return
        texts = []
        for i in fetching:
            pct = int(i.reason.split("%", 1)[0]) if i.reason.split("%", 1)[0].isdigit() else 0
            filled = pct // 5
            texts.append(f"{i.host} [{'#' * filled}{'.' * (20 - filled)}] {i.reason}")
        self.out.write("\r\x1b[2Kfetching the model: " + "; ".join(texts))
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.out.write("\n")
            self.out.flush()


def wait_running(c: ControlClient, name: str, parts: int, timeout: float,
                 poll: float = 0.25, progress: Callable[[list], None] | None = None) -> tuple[bool, list, str]:
    """Poll until `parts` parts of `name` are RUNNING (True) or one is FATAL or time is up (False);
    `progress`, when given, sees every poll's instances (a terminal's fetch progress bar)."""
    deadline = time.monotonic() + timeout
    instances: list = []
    while True:
        instances = list(c.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances)
        if progress is not None:
            progress(instances)
        fatal = [i for i in instances if i.state == "FATAL"]
        if fatal:
            return False, instances, f"{fatal[0].instance_id} part {fatal[0].part} on {fatal[0].host} failed: " \
                                     f"{fatal[0].reason}"
        running = sum(1 for i in instances if i.state == "RUNNING")
        if running >= parts:
            return True, instances, f"all {parts} part(s) running"
        if time.monotonic() >= deadline:
            states = ", ".join(f"{i.instance_id}/{i.part} {i.state}" for i in instances) or "none reported"
            return False, instances, f"not running after {timeout:g}s: {states}"
        time.sleep(poll)


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        reply = c.call("List", pb.ListRequest(serializable=args.local))
    rows, data = [], []
    for d in reply.deployments:
        running = len({i.replica for i in d.instances if i.state == "RUNNING" and i.role == "main"})
        ready = f"IDLE (0/{d.spec.replicas})" if d.idle else f"{running}/{d.spec.replicas}"
        if d.spec.max_replicas:  # scaled by load: its bounds
            ready += f" [{d.spec.min_replicas if d.spec.HasField('min_replicas') else 1}-{d.spec.max_replicas}]"
        rows.append([d.spec.name, d.spec.runtime, ready, d.spec.model])
        data.append({"name": d.spec.name, "runtime": d.spec.runtime, "replicas": d.spec.replicas,
                     "ready": running, "model": d.spec.model, "spec": d.spec, **({"idle": True} if d.idle else {}),
                     **({"wake_error": d.wake_error} if d.wake_error else {}),
                     **({"scaling": d.scaling} if d.scaling else {})})
    emit(args, lambda: {"deployments": [{**d, "spec": _dict(d["spec"])} for d in data]},
         lambda: "\n".join([_table(rows, ["NAME", "RUNTIME", "READY", "MODEL"]), *_notes(reply.deployments)]))
    return 0


def _notes(deployments) -> list[str]:
    """The leader's notes under the table: why a wake could not be placed (the operator's full diagnosis)."""
    return [f"{d.spec.name}: last wake failed {d.wake_error}" for d in deployments if d.wake_error]


def cmd_ps(args: argparse.Namespace) -> int:
    with _client(args) as c:
        reply = c.call("ListInstances", pb.ListInstancesRequest(deployment=args.deployment, local=args.local))
        # The leader's notes (a failed wake's diagnosis, the autoscaler's view): not from a local-only answer.
        deployments = [] if args.local else [d for d in c.call("List", pb.ListRequest()).deployments
                                             if not args.deployment or d.spec.name == args.deployment]
    rows = [[i.instance_id, str(i.part), i.role, i.host, ",".join(map(str, i.gpus)) or "-", i.state,
             str(i.restarts), i.endpoint, i.reason] for i in reply.instances]
    notes = {d.spec.name: {k: v for k, v in (("wake_error", d.wake_error), ("scaling", d.scaling)) if v}
             for d in deployments if d.wake_error or d.scaling}
    lines = [*_notes(deployments), *(d.scaling for d in deployments if d.scaling)]
    emit(args, lambda: {"instances": [_dict(i) for i in reply.instances], **({"deployments": notes} if notes else {})},
         lambda: "\n".join([_table(rows, ["INSTANCE", "PART", "ROLE", "HOST", "GPUS", "STATE", "RESTARTS",
                                          "ENDPOINT", "REASON"]), *lines]))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        reply = c.call("Delete", pb.DeleteRequest(name=args.name))
    emit(args, _dict(reply), reply.message)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            bounds = {k: v for k, v in (("min_replicas", args.min_replicas), ("max_replicas", args.max_replicas))
                      if v is not None}
            if (args.replicas is None) == (not bounds):
                print("agentd: give a replica count, or --min-replicas/--max-replicas for a deployment scaled "
                      "by load (not both)", file=sys.stderr)
                return 2
            reply = c.call("Scale", pb.ScaleRequest(name=args.name, replicas=args.replicas or 0, **bounds))
        except CannotPlace as exc:
            print(f"agentd: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    whys = [w for w in reply.why if w]  # one per replica added (vLLM: why it got its layout)
    emit(args, {"message": reply.message, "index": reply.index, "why": list(reply.why)},
         "\n".join([reply.message, *(f"  why: {w}" for w in whys)]))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    if args.action == "approve":
        from agentd.cli.security import cmd_nodes_approve

        return cmd_nodes_approve(args)
    if args.action == "rm":
        return cmd_nodes_rm(args)
    with _client(args) as c:
        listed = c.nodes()
    rows, data = [], []
    for n in listed:
        inv = json.loads(n.inventory_json) if n.inventory_json else {}
        gpus = inv.get("gpus", [])
        free = sum(g["memory_total"] - g["memory_used"] for g in gpus) / 2**30
        role = n.role or ("leader" if n.leader else ("voter" if n.voter else "learner"))
        state = "needs-upgrade" if n.upgrade_required else n.state
        if n.cordoned:
            host_too = n.name in n.cordoned
            held = [k.split(":", 1)[1] for k in n.cordoned if ":" in k]
            state += ",cordoned" if host_too else f",cordoned:gpu{','.join(held)}"
        if n.draining:
            state += f",draining:{n.draining}"
        # How it reports: to the leader itself ("direct"), or through the voter named; "-" for the leader
        # and for a host the leader holds no report of. A watcher also shows the voter it watches from.
        via = "-" if role == "leader" or not n.inventory_json else (n.reports_via or "direct")
        watches = (n.watches_from or "?") if role == "watcher" else "-"
        rows.append([n.name, n.address, state, role, via, watches, str(len(gpus)), f"{free:.1f}",
                     "yes" if inv.get("simulated") else "no", n.agent_version or "-"])
        entry = _dict(n)
        entry["inventory"] = inv
        entry.pop("inventory_json", None)
        data.append(entry)
    emit(args, {"nodes": data},
         lambda: _table(rows, ["NAME", "ADDRESS", "STATE", "ROLE", "VIA", "WATCHES", "GPUS", "FREE_GIB",
                               "SIMULATED", "VERSION"]))
    return 0


def cmd_nodes_rm(args: argparse.Namespace) -> int:
    if not args.name:
        raise InvalidInput("agentd nodes rm NAME: give the host to remove")
    with _client(args) as c:
        r = c.call("RemoveNode", pb.RemoveNodeRequest(name=args.name))
    emit(args, {"name": args.name, "message": r.message, "index": r.index, "replicas": r.replicas,
                "left_raft": r.left_raft},
         lambda: f"{args.name} removed: {r.replicas} replica(s) with a part there are re-placed now"
                 + ("; it left Raft" if r.left_raft else "") + "; its certificate is revoked")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        reply = c.status()

    def human() -> str:
        lines = [f"node:         {reply.node_id}",
                 f"leader:       {reply.leader_id or '(none)'} {reply.leader_address}",
                 f"term:         {reply.term}",
                 f"commit index: {reply.commit_index} (applied {reply.last_applied})",
                 f"version:      agentd {reply.agent_version or '0.1.0'}, state format {reply.state_format or 1} "
                 f"(cluster writes format {reply.cluster_format or 1}), wire {reply.wire_version or 1}"]
        if reply.upgrade_required:
            lines.append(f"NEEDS UPGRADE: {reply.upgrade_required}")
        if reply.watching:
            lines.append(f"watcher:      follows the committed state from {reply.watching} (not in Raft)")
        lines.append("members:")
        lines += [f"  {m.id:<16} {m.address:<22} {'voter' if m.voter else 'learner'}" for m in reply.members]
        return "\n".join(lines)

    emit(args, lambda: _dict(reply), human)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for ev in c.stream("Watch", pb.WatchRequest(deployment=args.deployment)):
            if getattr(args, "json", False):  # --json defaults to SUPPRESS (absent)
                print(json.dumps({**_dict(ev), "data": json.loads(ev.data_json or "{}")}), flush=True)
            else:
                print(f"{ev.index:>6} t{ev.term} {ev.kind:<20} {ev.name} {ev.data_json}", flush=True)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    req = pb.LogsRequest(instance_id=args.instance, part=args.part, follow=args.follow, previous=args.previous,
                         tail_lines=args.tail)
    with _client(args) as c:
        for chunk in c.stream("Logs", req):
            sys.stdout.buffer.write(chunk.data)
            sys.stdout.buffer.flush()
    return 0
