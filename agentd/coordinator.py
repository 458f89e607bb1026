"""The coordinator: what the Raft leader does besides replicating the log.

It keeps soft state from agent heartbeats (inventories, instance states, last
seen), runs placement for deploy and scale, allocates ports, and re-places the
replicas of hosts that stop reporting. Everything it decides goes through the
log (`propose`), stamped with the leader's term, so a deposed leader can
decide nothing: its proposals never commit.

Placement and model inspection are injected: the coordinator is the one place
that joins them to consensus, and tests can drive it without a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from agentd import autoscale, catalog
from agentd.cluster.maintenance import Cordon
from agentd.cluster.state import (
    NODE_DOWN,
    NODE_REMOVED,
    NODE_UP,
    ApplyResult,
    ClusterState,
    assign_command,
    bounds_command,
    cluster_format_command,
    delete_command,
    deploy_command,
    idle_command,
    node_command,
    node_remove_command,
    replica_leave_command,
    replica_remove_command,
    wake_command,
)
from agentd.drains import Drains
from agentd.errors import AgentdError, InvalidInput, NotAvailable, Unplaceable
from agentd.inspection import INSPECT_TIMEOUT, BoundedInspector
from agentd.logs import fields
from agentd.runtime.states import LIVE_STATES
from agentd.types import (
    Assignment,
    ClusterInventory,
    DeploymentSpec,
    HostInventory,
    ModelInfo,
    PartEndpoint,
    Plan,
    held_copy,
    parse_model_ref,
)
from agentd.version import STATE_FORMAT, PeerVersion

log = logging.getLogger(__name__)



@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Hold off CPython's cyclic garbage collector for one placement (the placement core leaves this to its
    caller: it touches no interpreter state).

    A placement on a large cluster allocates an object or two per GPU, all short-lived and acyclic (they die
    with the call, by reference counting). Those allocations trigger collections, and a full collection walks
    the leader's whole heap (the inventories, the Raft log): on 2,048 hosts that cost twice the placement
    itself. Collection resumes on exit, and nothing changes if it was already disabled.
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

class Consensus(Protocol):
    """The part of the Raft node the coordinator needs."""

    @property
    def term(self) -> int: ...

    @property
    def is_leader(self) -> bool: ...

    async def propose(self, command: bytes, timeout: float = ...) -> Any: ...

    @property
    def members(self) -> dict[str, Any]: ...  # id -> member (with `voter`)


PlaceFn = Callable[[ClusterInventory, ModelInfo, DeploymentSpec, Sequence[Assignment]], Plan]
InspectFn = Callable[[str], ModelInfo]


@dataclass
class InstanceReport:
    """One instance as its host last reported it."""

    instance_id: str
    deployment: str
    replica: int
    generation: int
    part: int
    host: str
    role: str
    state: str
    reason: str = ""
    restarts: int = 0
    endpoint: str = ""
    term: int = 0
    pid: int = 0
    gpus: tuple[int, ...] = ()
    port_in_use: int = 0  # a port of this part that another process holds: the replica needs new ports


@dataclass
class NodeReport:
    inventory: HostInventory
    instances: list[InstanceReport] = field(default_factory=list)
    last_seen: float = 0.0
    agent: PeerVersion = field(default_factory=PeerVersion)
    via: str = ""  # the voter that relayed the latest report or renewal (agentd/reports.py); "": the host itself


def removed_message(name: str) -> str:
    return (f"host {name} was removed from the cluster (agentd nodes rm): it takes no work and cannot rejoin "
            "under this name; give a replacement host a new name")


def with_cordons(host: HostInventory, cordons: Sequence[Cordon]) -> HostInventory:
    """`host` with its cordoned GPUs, or all of it, marked for placement."""
    if not cordons:
        return host
    whole = next((c for c in cordons if c.gpu is None), None)
    gpus = {c.gpu for c in cordons if c.gpu is not None}
    return host.model_copy(update={
        "cordoned": (whole.reason or "cordoned") if whole else "",
        "gpus": tuple(g.model_copy(update={"cordoned": True}) if g.index in gpus else g for g in host.gpus)})


def diagnosis_text(diagnosis: Any) -> str:
    """An unplaceable plan's diagnosis as one paragraph: the headline, each counted reason, the nearest miss."""
    if diagnosis is None:
        return "unplaceable"
    lines = [diagnosis.message]
    lines += [f"{r.count} x {r.reason}" if r.count > 1 else r.reason for r in diagnosis.reasons
              if r.reason not in diagnosis.message]
    if diagnosis.near_miss:
        lines.append(f"closest: {diagnosis.near_miss}")
    return "; ".join(lines)


def host_of(address: str) -> str:
    """'10.0.0.3:7070' -> '10.0.0.3'; '[::1]:7070' -> '::1'."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]") or "127.0.0.1"


class Coordinator:
    def __init__(
        self,
        *,
        state: ClusterState,
        consensus: Consensus,
        place: PlaceFn,
        inspect: InspectFn,
        validate_runtime: Callable[[str], None],
        port_range: tuple[int, int],
        node_down_grace: float,
        report_interval: float = 1.0,
        report_wait: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        propose_timeout: float = 10.0,
        inspect_timeout: float = INSPECT_TIMEOUT,
        validate_spec: Callable[[DeploymentSpec], None] | None = None,
        idle_report_max_age: float = 5.0,
        autoscale_up_after: float = 15.0,
        autoscale_down_after: float = 120.0,
        autoscale_cooldown: float = 60.0,
        scale_down_timeout: float = 300.0,
    ):
        self.state = state
        self.consensus = consensus
        self._place = place
        self._inspect = BoundedInspector(inspect, timeout=inspect_timeout)  # a user's path: never on the loop
        self._validate_runtime = validate_runtime
        self._validate_spec = validate_spec  # launch flags only agentd may set (PluginManager.check_launch_options)
        self.port_range = port_range
        self.node_down_grace = node_down_grace
        self.report_interval = report_interval
        # How long a new leader waits for every known host's first report before it trusts what it heard
        # (heard_from_known_hosts). The daemon adds its hosts' relay jitter: after a failover a host whose voter
        # fails it waits up to that long before it reports to the leader directly (agentd/cluster/relay.py).
        self.report_wait = 2.5 * report_interval if report_wait is None else report_wait
        self.clock = clock
        self.propose_timeout = propose_timeout
        self.reports: dict[str, NodeReport] = {}
        self.leader_since: float | None = None
        self._lock = asyncio.Lock()  # one placement decision at a time: no double booking
        self._replace_after: dict[tuple[str, int], float] = {}
        self._peer_restarts: dict[str, list[tuple[str, int, str]]] = {}
        self._last_pids: dict[tuple[str, int], int] = {}  # (instance, part) -> last pid reported, see _note_restarts
        self._reported_since_leading: set[str] = set()  # hosts heard from since became_leader, see wait_for_reports
        self._report_arrived = asyncio.Event()  # wakes plan_when_ready at once instead of at its next poll
        self._leading = asyncio.Event()  # set by became_leader: the daemon has handed the coordinator over
        self.on_placement: Callable[[float, Plan], None] | None = None  # metrics hook
        self.drains = Drains(self)
        # Serving on demand (docs/on-demand.md): what each host's /v1/ proxy last said it sent each deployment,
        # host -> (when the report arrived, deployment -> (seconds idle then, requests in flight)). A deployment
        # is unloaded only while every live host's activity is at most `idle_report_max_age` old.
        self.idle_report_max_age = idle_report_max_age
        self._activity: dict[str, tuple[float, dict[str, tuple[float, int]]]] = {}
        self._awake_since: dict[str, tuple[frozenset[str], float]] = {}  # deployment -> (its instances, since)
        # Replicas by load (agentd/autoscale.py): the windows, and per deployment what the scaler remembers.
        self.autoscale_windows = (autoscale_up_after, autoscale_down_after, autoscale_cooldown)
        self.scale_down_timeout = scale_down_timeout
        self._scaler: dict[str, autoscale.Memory] = {}
        self._leaving_since: dict[tuple[str, int], float] = {}  # when this leader saw each replica leaving
        self._loads: dict[str, dict[str, autoscale.DeploymentActivity]] = {}  # host -> deployment -> activity
        self.on_scale: Callable[[str, str, str], None] | None = None  # metrics hook: deployment, direction, reason
        self.on_replicas: Callable[[str, int, int], None] | None = None  # metrics hook: deployment, desired, actual
        self.last_decisions: dict[str, str] = {}  # deployment -> the scaler's last sentence (agentd ps)
        # deployment -> (when, the full diagnosis) of its last wake that could not be placed (agentd ps and ls)
        self.wake_failures: dict[str, tuple[float, str]] = {}

    # ------------------------------------------------------------------ soft state

    def became_leader(self) -> None:
        """Heartbeats went to the old leader; give every host a full grace period from now."""
        self.leader_since = self.clock()
        now = self.clock()
        for rep in self.reports.values():
            rep.last_seen = max(rep.last_seen, now)
        self._reported_since_leading.clear()
        self._activity.clear()  # idle times count afresh under this leader (_unload_idle)
        self._awake_since.clear()
        self._loads.clear()
        self._scaler.clear()  # scaling windows count afresh too
        self._leaving_since.clear()
        self._leading.set()

    def lost_leadership(self) -> None:
        self.leader_since = None
        self._leading.clear()
        self._last_pids.clear()

    def on_report(self, inventory: HostInventory, instances: list[InstanceReport],
                  agent: PeerVersion = PeerVersion()) -> None:
        previous = self.reports.get(inventory.name)
        if previous is not None:
            self._note_restarts(previous.instances, instances)
        self.reports[inventory.name] = NodeReport(inventory, instances, self.clock(), agent)
        self._reported_since_leading.add(inventory.name)
        self._report_arrived.set()

    def renew(self, name: str) -> bool:
        """A host's lease renewed with nothing changed (a bare message on its report stream): it stays up until
        `node_down_grace` from now. False when the leader holds no report of it to renew (a full one is due)."""
        rep = self.reports.get(name)
        if rep is None:
            return False
        rep.last_seen = self.clock()
        self._reported_since_leading.add(name)
        self._report_arrived.set()
        return True

    def on_activity(self, host: str,
                    activity: dict[str, tuple[float, int]] | dict[str, autoscale.DeploymentActivity]) -> None:
        """A host's proxy counters (ModelActivity in its report): seconds since its last request per deployment,
        and the requests it forwards now; with the per-replica queues when given as DeploymentActivity."""
        plain: dict[str, tuple[float, int]] = {}
        loads: dict[str, autoscale.DeploymentActivity] = {}
        for name, act in activity.items():
            if isinstance(act, autoscale.DeploymentActivity):
                plain[name] = (act.idle_seconds, act.in_flight)
                loads[name] = act
            else:
                plain[name] = act
                loads[name] = autoscale.DeploymentActivity(idle_seconds=act[0], in_flight=act[1])
        self._activity[host] = (self.clock(), plain)
        self._loads[host] = loads

    def _note_restarts(self, before: list[InstanceReport], after: list[InstanceReport]) -> None:
        """A part that now runs under a new pid was restarted: the other hosts of its instance must know.

        A llama-server keeps answering /health after one of its rpc-servers
        restarted, but its connection to that server is gone; only the host
        that runs it can restart it, and only the coordinator sees both hosts.

        A restart goes through BACKOFF and PENDING, which are reported without
        a pid, so the new pid is compared with the last pid seen, not with the
        previous report's.
        """
        old = {(i.instance_id, i.part): i.pid for i in before}
        for key in old.keys() - {(i.instance_id, i.part) for i in after}:
            self._last_pids.pop(key, None)
        for i in after:
            key = (i.instance_id, i.part)
            was = self._last_pids.get(key) or old.get(key)
            if i.pid:
                self._last_pids[key] = i.pid
            if not was or not i.pid or was == i.pid or not i.endpoint:
                continue
            assignment = next((a for a in self.state.incarnations() if a.instance_id == i.instance_id), None)
            if assignment is None:
                continue
            address, _, port = i.endpoint.rpartition(":")
            why = f"{i.role} part {i.part} of {i.instance_id} on {i.host} restarted (pid {was} -> {i.pid})"
            for host in {p.host for p in assignment.plan.parts} - {i.host}:
                self._peer_restarts.setdefault(host, []).append((address, int(port), why))

    def take_peer_restarts(self, host: str) -> list[tuple[str, int, str]]:
        return self._peer_restarts.pop(host, [])

    def is_live(self, name: str, now: float | None = None) -> bool:
        """One host of `live_hosts`, without going through all of them (the leader asks per report)."""
        rep = self.reports.get(name)
        node = self.state.nodes.get(name)
        return (rep is not None and (node is None or node.state == NODE_UP) and name not in self.state.held_hosts
                and (self.clock() if now is None else now) - rep.last_seen <= self.node_down_grace)

    def live_hosts(self) -> list[HostInventory]:
        """Hosts that reported within the grace period and are not marked down."""
        now = self.clock()
        out = []
        for name, rep in sorted(self.reports.items()):
            node = self.state.nodes.get(name)
            if node is not None and node.state != NODE_UP:  # down, or removed for good
                continue
            if name in self.state.held_hosts:  # the operator has not approved it: no tenant's work goes there
                continue
            if now - rep.last_seen <= self.node_down_grace:
                inventory = rep.inventory
                labels = self.state.trusted_labels(name, inventory.labels)
                if labels is not inventory.labels:
                    inventory = inventory.model_copy(update={"labels": labels})
                out.append(inventory)
        return out

    def booked(self) -> list[Assignment]:
        """What holds GPUs and ports, as placement must see it: every incarnation of the state, and each one a
        drain replaced (`state.replaced`) that a host still reports running, because it answers the requests
        it holds before it stops (agentd/agent/handoff.py). A host silent past the grace reports nothing."""
        out = self.state.incarnations()
        replaced = self.state.replaced
        if not replaced:
            return out
        since = self.clock() - self.node_down_grace
        held = {i.instance_id for rep in self.reports.values() if rep.last_seen >= since for i in rep.instances
                if i.instance_id in replaced and i.state in LIVE_STATES}
        return out + [replaced[iid] for iid in sorted(held)]

    def snapshot(self, exclude_hosts: Sequence[str] = ()) -> ClusterInventory:
        """The live hosts as placement sees them: cordons (from the replicated state) marked on them."""
        hosts = [h for h in self.live_hosts() if h.name not in exclude_hosts]
        if self.state.cordons:
            hosts = [with_cordons(h, self.state.cordons_of(h.name)) for h in hosts]
        promised = self._promised_bytes()
        if promised:
            hosts = [h.model_copy(update={"model_disk_free": h.model_disk_free - promised[h.name]})
                     if h.model_disk_free is not None and promised.get(h.name) else h for h in hosts]
        return ClusterInventory(hosts=tuple(hosts))

    def _promised_bytes(self) -> dict[str, int]:
        """Disk space per host that fetches of committed assignments will take: a host assigned a part of a
        catalog model it does not hold yet. Taken off its reported free space before placement, so two deploys
        never both count on the same free bytes (the second sees the first's assignment)."""
        out: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for a in self.state.incarnations():
            if "@sha256:" not in a.model:
                continue
            for host in {p.host for p in a.plan.parts}:
                rep = self.reports.get(host)
                if rep is None or held_copy(rep.inventory.models, a.model) is not None:
                    continue
                if a.model not in sizes:
                    sizes[a.model] = max((m.size for r in self.reports.values() for m in r.inventory.models
                                          if m.digest and a.model.endswith("@" + m.digest)), default=0)
                out[host] = out.get(host, 0) + sizes[a.model]
        return out

    def catalog_hosts(self) -> list[HostInventory]:
        """Every host's last report, down ones included: a model's facts do not change with its holder's health."""
        return [rep.inventory for _, rep in sorted(self.reports.items())]

    async def resolve(self, spec: DeploymentSpec) -> DeploymentSpec:
        """`spec` with a catalog name pinned to its digest (`NAME@sha256:...`), from the hosts' reports.

        A fresh leader may not have heard every host yet: a name not found is looked up again until every
        known host has reported. Absolute paths are left as they are (inspected, as before).
        """
        try:
            ref = parse_model_ref(spec.model)
        except ValueError as exc:
            raise InvalidInput(str(exc), where="model") from None
        if ref.kind == "path":
            return spec
        while True:
            try:
                model, _ = catalog.resolve(spec.model, self.live_hosts())
                break
            except InvalidInput:
                if self.heard_from_known_hosts():
                    raise
            await asyncio.sleep(0.05)
        return spec if model == spec.model else spec.model_copy(update={"model": model})

    def instances(self, deployment: str = "") -> list[InstanceReport]:
        out = []
        for rep in self.reports.values():
            out.extend(i for i in rep.instances if not deployment or i.deployment == deployment)
        return sorted(out, key=lambda i: (i.deployment, i.replica, i.part))

    def heard_from_known_hosts(self) -> bool:
        """True once every host the state knows as up reported to this leader, or the wait for them is over."""
        if self.leader_since is None:
            return True
        if self.clock() >= self.leader_since + self.report_wait:
            return True
        # Reports kept from an earlier spell as leader do not count: they may be minutes old.
        return all(n in self._reported_since_leading for n, rec in self.state.nodes.items() if rec.state == NODE_UP)

    async def wait_for_reports(self) -> None:
        """A fresh leader has no heartbeats yet: wait (briefly) until known hosts report."""
        while not self.heard_from_known_hosts():
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ decisions

    async def _require_leader(self) -> None:
        """Raise NotAvailable unless this agent leads and has taken over as coordinator.

        Raft reports leadership the moment the votes are counted; the daemon
        hears of it (became_leader) once the new term is on disk, a few
        milliseconds later. A call in between waits for that, instead of
        placing with no soft state at all ("0/0 hosts").
        """
        if not self.consensus.is_leader:
            raise NotAvailable("this agent is not the coordinator")
        if not self._leading.is_set():
            try:
                await asyncio.wait_for(self._leading.wait(), 2.0)
            except TimeoutError:
                raise NotAvailable("this agent was just elected and has not taken over yet; retry") from None
            if not self.consensus.is_leader:
                raise NotAvailable("this agent is not the coordinator")

    async def plan(self, spec: DeploymentSpec, exclude_deployment: str = "") -> tuple[Plan, ModelInfo]:
        """Placement for `spec` on the live cluster, counting what is already assigned."""
        spec = await self.resolve(spec)
        plan, model, seconds = self._plan(spec, await self._model(spec), exclude_deployment)
        if self.on_placement:
            self.on_placement(seconds, plan)
        return plan, model

    async def plan_when_ready(self, spec: DeploymentSpec, exclude_deployment: str = "") -> tuple[Plan, ModelInfo]:
        """Placement as soon as it can be trusted, for a leader that may have just been elected.

        A plan on the hosts heard from so far is valid: their inventories are
        fresh and every committed assignment is counted. So it is taken at
        once, and a host that died with the old leader (it never reports)
        does not hold deploys up. An unplaceable result is retried until every
        known host has reported, or the wait is over, so that the diagnosis
        covers the whole cluster.
        """
        await self._require_leader()
        model = await self._model(spec)
        while True:
            complete = self.heard_from_known_hosts()
            plan, model, seconds = self._plan(spec, model, exclude_deployment)
            if plan.placed or complete:
                if self.on_placement:
                    self.on_placement(seconds, plan)
                return plan, model
            self._report_arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_arrived.wait(), 0.05)

    async def _model(self, spec: DeploymentSpec, *, check_options: bool = True) -> ModelInfo:
        try:
            self._validate_runtime(spec.runtime)
        except InvalidInput as exc:
            raise InvalidInput(str(exc), where="runtime") from None
        if check_options and self._validate_spec is not None:  # not when re-placing what is committed
            self._validate_spec(spec)
        if not spec.model.startswith("/"):  # a catalog name: the facts its holders reported, no file opened
            _, info = catalog.resolve(spec.model, self.catalog_hosts())
            return info
        # An absolute path (deployments of earlier releases): a host whose model directories hold that path
        # reports its facts, so a leader without the file still plans (after a failover, say).
        reported = next((m.info for h in self.catalog_hosts() if (m := held_copy(h.models, spec.model))), None)
        if reported is not None:
            return reported
        try:
            return await self._inspect(spec.model)
        except InvalidInput as exc:  # the message names the file; say which field it came from
            raise InvalidInput(str(exc), where=None if exc.where == "model" else "model") from None

    def _plan(self, spec: DeploymentSpec, model: ModelInfo, exclude_deployment: str) -> tuple[Plan, ModelInfo, float]:
        existing = [a for a in self.booked() if a.deployment != exclude_deployment]
        started = time.perf_counter()
        with collector_paused():
            plan = self._place(self.snapshot(), model, spec, existing)
        return plan, model, time.perf_counter() - started

    async def deploy(self, spec: DeploymentSpec, replace: bool = False,
                     whys: list[str] | None = None) -> tuple[ApplyResult, int]:
        """Place and commit `spec`; `whys`, when given, gets each replica's reason for its layout."""
        await self._require_leader()
        async with self._lock:
            if spec.name in self.state.deployments and not replace:
                raise InvalidInput(f"deployment {spec.name!r} already exists (use replace to change it)")
            if spec.autoscaled:  # it starts inside its bounds (at least one replica: zero is the idle unload's)
                start = min(max(spec.replicas, spec.min_replicas, 1), spec.max_replicas)
                spec = spec.model_copy(update={"replicas": start})
            spec = await self.resolve(spec)
            plan, _ = await self.plan_when_ready(spec, exclude_deployment=spec.name if replace else "")
            if not plan.placed:
                raise Unplaceable(plan.diagnosis)
            old = {a.replica: a for a in self.state.assignments_for(spec.name)} if replace else {}
            assignments = self._assignments(spec, plan, range(len(plan.replicas)), old)
            if whys is not None:
                whys.extend(rp.why for rp in plan.replicas)
            log.info("placed deployment", extra=fields(deployment=spec.name, replicas=len(assignments),
                                                        term=self.consensus.term))
            self.wake_failures.pop(spec.name, None)
            self.last_decisions.pop(spec.name, None)
            return await self._commit(deploy_command(spec, assignments, replace=replace))

    async def scale(self, name: str, replicas: int, whys: list[str] | None = None) -> tuple[ApplyResult, int]:
        """Add or remove replicas; `whys`, when given, gets each new replica's reason for its layout."""
        await self._require_leader()
        if replicas < 0:
            raise InvalidInput(f"replicas must be >= 0, got {replicas}")
        async with self._lock:
            record = self.state.deployment(name)
            if record is None:
                raise InvalidInput(f"no deployment named {name!r}")
            if record.spec.autoscaled:
                raise InvalidInput(
                    f"deployment {name} is scaled by load ({record.spec.min_replicas}-{record.spec.max_replicas} "
                    f"replicas, now {record.spec.replicas}): change its bounds with `agentd scale {name} "
                    "--min-replicas N --max-replicas M`")
            current = {a.replica for a in self.state.assignments_for(name)}
            missing = [r for r in range(replicas) if r not in current]
            if name in self.state.idle:  # the next wake places this many; nothing starts now
                missing = []
            new: list[Assignment] = []
            if missing:
                spec = record.spec.model_copy(update={"replicas": len(missing)})
                plan, _ = await self.plan_when_ready(spec)
                if not plan.placed:
                    raise Unplaceable(plan.diagnosis)
                new = self._assignments(record.spec, plan, missing, {})
                if whys is not None:
                    whys.extend(rp.why for rp in plan.replicas)
            return await self._commit(assign_command(name, new, replicas))

    async def set_bounds(self, name: str, min_replicas: int | None,
                         max_replicas: int | None) -> tuple[ApplyResult, int]:
        """New bounds for a deployment scaled by load (`agentd scale NAME --min-replicas/--max-replicas`); the
        replica count follows at the next tick, with no window (docs/on-demand.md)."""
        await self._require_leader()
        record = self.state.deployment(name)
        if record is None:
            raise InvalidInput(f"no deployment named {name!r}")
        if not record.spec.autoscaled:
            raise InvalidInput(f"deployment {name} has a fixed number of replicas: `agentd scale {name} N` sets "
                               "it; bounds need a deployment made with --max-replicas")
        if min_replicas is None and max_replicas is None:
            raise InvalidInput("give --min-replicas, --max-replicas or both")
        update = {k: v for k, v in (("min_replicas", min_replicas), ("max_replicas", max_replicas)) if v is not None}
        if update.get("max_replicas", 1) < 1:
            raise InvalidInput("max_replicas must be >= 1 (a deployment scaled by load keeps max_replicas > 0)")
        try:
            DeploymentSpec.model_validate({**record.spec.model_dump(mode="json"), **update})
        except ValidationError as exc:
            raise InvalidInput("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()),
                               where="bounds") from None
        async with self._lock:
            self._scaler.pop(name, None)
            return await self._commit(bounds_command(name, min_replicas, max_replicas))

    async def wake(self, name: str) -> tuple[ApplyResult | None, int]:
        """Place an IDLE deployment again, on whatever fits now. Returns (None, 0) when it is not idle (another
        wake placed it already): under the lock, concurrent wakes from every agent make one placement."""
        await self._require_leader()
        async with self._lock:
            record = self.state.deployment(name)
            if record is None:
                raise InvalidInput(f"no deployment named {name!r}")
            if name not in self.state.idle:
                return None, 0
            spec = record.spec
            if spec.autoscaled:  # from zero to its lower bound; load adds the rest
                spec = spec.model_copy(update={"replicas": max(spec.min_replicas, 1)})
            plan, _ = await self.plan_when_ready(spec, exclude_deployment=name)
            if not plan.placed:
                self.wake_failures[name] = (self.clock(), diagnosis_text(plan.diagnosis))
                raise Unplaceable(plan.diagnosis)
            self.wake_failures.pop(name, None)
            # A new generation (the index of the entry that made it idle, so never one used before): the woken
            # replicas' instance ids differ from the unloaded ones', whose last reports may still be around.
            assignments = [a.model_copy(update={"generation": record.updated_index + 1})
                           for a in self._assignments(spec, plan, range(len(plan.replicas)), {})]
            result, index = await self._commit(wake_command(name, assignments))
            hosts = sorted({p.host for a in assignments for p in a.plan.parts})
            log.info(f"deployment {name} woken: {len(assignments)} replica(s) on {', '.join(hosts)}",
                     extra=fields(deployment=name, index=index, term=self.consensus.term))
            return result, index

    async def _unload_idle(self) -> list[str]:
        """Unload deployments whose idle_unload time passed with no request at any agent's proxy.

        Freshness: a request is known here once its proxy's host reports (at once on the first request after a
        quiet second, else within the report interval). So nothing is unloaded while a live host's last report
        is older than `idle_report_max_age`, nor while any proxy forwards a request for it, nor before the
        deployment's current replicas have all been RUNNING for the idle time under this leader (a load
        slower than the idle time does not unload what was just woken).
        """
        now = self.clock()
        decisions: list[str] = []
        candidates = [r for n, r in sorted(self.state.deployments.items())
                      if r.spec.idle_unload > 0 and n not in self.state.idle and self.state.assignments_for(n)]
        if not candidates or not self.heard_from_known_hosts():
            return decisions
        live = {h.name for h in self.live_hosts()}
        stale = sorted(h for h in live if now - self._activity.get(h, (float("-inf"), {}))[0]
                       > self.idle_report_max_age)
        running = {(i.instance_id, i.part) for i in self.instances() if i.state == "RUNNING"}
        async with self._lock:
            for record in candidates:
                name, after = record.spec.name, record.spec.idle_unload
                incarnations = self.state.incarnations_for(name)
                ids = frozenset(a.instance_id for a in incarnations)
                seen = self._awake_since.get(name)
                if seen is None or seen[0] != ids or not all(running.issuperset(
                        (a.instance_id, k) for k in range(len(a.plan.parts))) for a in incarnations):
                    # New replicas, or some still loading: the idle time counts from when all of them serve.
                    self._awake_since[name] = seen = (ids, now)
                last, busy = seen[1], 0
                for host, (at, acts) in self._activity.items():
                    if host in live and name in acts:
                        idle_for, in_flight = acts[name]
                        last, busy = max(last, at - idle_for), busy + in_flight
                if busy or now - last < after or name in self.state.idle:
                    continue
                if stale:
                    log.debug("idle unload waits for fresh activity reports",
                              extra=fields(deployment=name, hosts=stale[:5]))
                    continue
                await self._commit(idle_command(name))
                self._awake_since.pop(name, None)
                decisions.append(f"deployment {name}: no request for {now - last:.1f}s "
                                 f"(idle_unload {after:g}s): unloaded, IDLE until the next request")
        return decisions

    def _fresh_loads(self, now: float) -> tuple[dict[str, dict[str, autoscale.DeploymentActivity]], list[str]]:
        """Every live host's last proxy report within the freshness bound, and the live hosts whose report is
        older (or missing): a partitioned proxy, or one that has not reported to this leader yet."""
        fresh, stale = {}, []
        for name in sorted(self.reports):
            if not self.is_live(name, now):
                continue
            at = self._activity.get(name, (float("-inf"), {}))[0]
            if now - at > self.idle_report_max_age:
                stale.append(name)
            else:
                fresh[name] = self._loads.get(name, {})
        return fresh, stale

    def replica_queues(self, name: str, loads: dict[str, dict[str, autoscale.DeploymentActivity]]) -> dict[str, int]:
        """Instance id -> requests waiting on it, across the proxies in `loads`."""
        per: dict[str, list[autoscale.ReplicaReading]] = {}
        for acts in loads.values():
            act = acts.get(name)
            for iid, reading in (act.replicas.items() if act else ()):
                per.setdefault(iid, []).append(reading)
        return {iid: autoscale.replica_queue(rs) for iid, rs in per.items()}

    async def _autoscale(self) -> list[str]:
        """Replicas by load: one `autoscale.decide` per deployment with max_replicas, then act on it (add
        replicas, or mark the least-loaded one leaving); and remove leaving replicas once their requests are
        answered or `scale_down_timeout` passed (docs/on-demand.md, "Replicas by load")."""
        names = {n for n, r in self.state.deployments.items() if r.spec.autoscaled and n not in self.state.idle}
        if not names and not self.state.leaving:
            return []
        if not self.heard_from_known_hosts():
            return []
        now = self.clock()
        loads, stale = self._fresh_loads(now)
        decisions: list[str] = []
        up_after, down_after, cooldown = self.autoscale_windows
        async with self._lock:
            decisions += await self._finish_leaving(loads, stale, now)
            # One pass over the assignments and one over the reports, grouped by deployment: a pass per
            # deployment over every host's report was seconds per tick at 1,000 deployments x 2,048 hosts.
            current_of: dict[str, list[Assignment]] = {}
            for (dep, _), a in sorted(self.state.assignments.items()):
                if dep in names:
                    current_of.setdefault(dep, []).append(a)
            ids_of: dict[str, set[str]] = {}
            for (dep, _), a in [*self.state.assignments.items(), *self.state.surges.items()]:
                if dep in current_of:
                    ids_of.setdefault(dep, set()).add(a.instance_id)
            acts_of: dict[str, list[autoscale.DeploymentActivity]] = {}
            for acts in loads.values():
                for dep, act in acts.items():
                    if dep in current_of:
                        acts_of.setdefault(dep, []).append(act)
            for name in sorted(current_of):
                record = self.state.deployment(name)
                if record is None or name in self.state.idle:
                    continue
                spec = record.spec
                current = self.state.assignments_for(name) if decisions else current_of[name]  # moved: re-read
                active = [a for a in current if not self.state.is_leaving(a)]
                if not active:
                    continue
                queue = autoscale.deployment_queue(acts_of.get(name, []), ids_of.get(name, set()))
                policy = autoscale.Policy(spec.min_replicas, spec.max_replicas, spec.target_queue,
                                          up_after=up_after, down_after=down_after, cooldown=cooldown)
                obs = autoscale.Observation(replicas=len(active), queue=queue, fresh=not stale,
                                            stale_hosts=tuple(stale))
                d = autoscale.decide(policy, obs, self._scaler.get(name, autoscale.Memory()), now, name)
                self._scaler[name] = d.memory
                self.last_decisions[name] = d.sentence
                if self.on_replicas:
                    self.on_replicas(name, d.desired, len(active))
                if d.direction == autoscale.UP:
                    decisions.append(await self._scale_up(record.spec, current, d))
                elif d.direction == autoscale.DOWN:
                    decisions.append(await self._scale_down(active, loads, d))
        return decisions

    async def _scale_up(self, spec: DeploymentSpec, current: list[Assignment], d: autoscale.Decision) -> str:
        active = sum(1 for a in current if not self.state.is_leaving(a))
        add = d.desired - active
        taken = {a.replica for a in current}
        free = [r for r in range(len(current) + add + 1) if r not in taken][:add]
        try:
            plan, _ = await self.plan(spec.model_copy(update={"replicas": add}))
        except AgentdError as exc:
            plan, why = None, str(exc)
        if plan is not None and not plan.placed:
            why = plan.diagnosis.message if plan.diagnosis else "unplaceable"
            # Fewer than asked may fit: place what does (one at a time is still a step towards the load).
            if add > 1:
                try:
                    plan, _ = await self.plan(spec.model_copy(update={"replicas": 1}))
                except AgentdError:
                    plan = None
                free = free[:1]
        if plan is None or not plan.placed:
            self.last_decisions[spec.name] = f"{d.sentence}; cannot place: {why}"
            if self.on_scale:
                self.on_scale(spec.name, autoscale.UP, "unplaceable")
            return f"{d.sentence}; cannot place a new replica: {why}"
        new = self._assignments(spec, plan, free, {})
        await self._commit(assign_command(spec.name, new, len(current) + len(new)))
        if self.on_scale:
            self.on_scale(spec.name, autoscale.UP, d.reason)
        hosts = sorted({p.host for a in new for p in a.plan.parts})
        return f"{d.sentence}: added {', '.join(a.instance_id for a in new)} on {', '.join(hosts)}"

    async def _scale_down(self, active: list[Assignment], loads: dict[str, dict[str, autoscale.DeploymentActivity]],
                          d: autoscale.Decision) -> str:
        name = active[0].deployment
        queues = self.replica_queues(name, loads)
        victim_index = autoscale.least_loaded({a.replica: queues.get(a.instance_id, 0) for a in active})
        victim = next(a for a in active if a.replica == victim_index)
        await self._commit(replica_leave_command(victim))
        self._leaving_since[(name, victim.replica)] = self.clock()
        if self.on_scale:
            self.on_scale(name, autoscale.DOWN, d.reason)
        return (f"{d.sentence}: {victim.instance_id} ({queues.get(victim.instance_id, 0)} waiting) takes no new "
                "requests and stops once they are answered")

    async def _finish_leaving(self, loads: dict[str, dict[str, autoscale.DeploymentActivity]], stale: list[str],
                              now: float) -> list[str]:
        """Remove each leaving replica once no proxy has a request on it (every live host's report fresh and
        sent after the leave was committed here), or `scale_down_timeout` after it started leaving."""
        out = []
        for (name, replica) in sorted(self.state.leaving):
            a = self.state.assignments.get((name, replica))
            if a is None:
                continue
            since = self._leaving_since.setdefault((name, replica), now)  # a new leader: from now
            queue = self.replica_queues(name, loads).get(a.instance_id, 0)
            heard_since = not stale and all(self._activity.get(h, (float("-inf"),))[0] > since for h in loads)
            timed_out = now - since >= self.scale_down_timeout
            if not (timed_out or (heard_since and queue == 0)):
                continue
            await self._commit(replica_remove_command(a))
            self._leaving_since.pop((name, replica), None)
            why = (f"still {queue} request(s) on it after {self.scale_down_timeout:g}s" if queue and timed_out
                   else "its requests answered")
            out.append(f"deployment {name}: {a.instance_id} removed ({why})")
        return out

    async def delete(self, name: str) -> tuple[ApplyResult, int]:
        await self._require_leader()
        if name not in self.state.deployments:
            raise InvalidInput(f"no deployment named {name!r}")
        self.wake_failures.pop(name, None)
        self.last_decisions.pop(name, None)
        self._scaler.pop(name, None)
        return await self._commit(delete_command(name))

    async def _commit(self, command: bytes) -> tuple[ApplyResult, int]:
        result = await self.consensus.propose(command, timeout=self.propose_timeout)
        index = self.state.last_index  # applied here before propose returns; the lock keeps it ours
        if isinstance(result, tuple):
            result, index = result
        if isinstance(result, ApplyResult) and not result.ok:
            raise InvalidInput(result.message)
        return result, index

    def _assignments(self, spec: DeploymentSpec, plan: Plan, replica_ids: Sequence[int],
                     old: dict[int, Assignment]) -> list[Assignment]:
        taken = self._ports_in_use()
        out = []
        for replica, rplan in zip(replica_ids, plan.replicas, strict=True):
            endpoints = []
            for part in rplan.parts:
                address = self._address_of(part.host)
                port = self._free_port(address, taken)
                taken.setdefault(address, set()).add(port)
                endpoints.append(PartEndpoint(host=part.host, address=address, port=port))
            prev = old.get(replica)
            out.append(Assignment(
                deployment=spec.name, replica=replica, generation=(prev.generation + 1) if prev else 1,
                term=self.consensus.term, model=spec.model, runtime=spec.runtime, options=spec.options,
                # The reason for the layout is for the caller, not the log (older agents would refuse it).
                plan=rplan.model_copy(update={"why": ""}) if rplan.why else rplan, endpoints=tuple(endpoints),
            ))
        return out

    def _address_of(self, host: str) -> str:
        rep = self.reports.get(host)
        if rep and rep.inventory.address:
            return host_of(rep.inventory.address)
        node = self.state.nodes.get(host)
        return host_of(node.address) if node and node.address else "127.0.0.1"

    def _ports_in_use(self) -> dict[str, set[int]]:
        """Ports per address, so agents sharing one address (one machine) never collide: those of every
        assignment (`booked`), and those that other processes hold on a host (its report's foreign_ports)."""
        used: dict[str, set[int]] = {}
        for a in self.booked():
            for ep in a.endpoints:
                used.setdefault(ep.address, set()).add(ep.port)
        for name, rep in self.reports.items():
            if rep.inventory.foreign_ports:
                used.setdefault(self._address_of(name), set()).update(rep.inventory.foreign_ports)
        return used

    async def _repair_port_clashes(self) -> list[str]:
        """Give new ports to a replica whose host found one of its ports held by another process at spawn.

        The replica gets a new generation (so a new instance id, and with it new local and Ray ports on its
        hosts) stamped with this term, and fresh endpoint ports that skip every port reported taken. The old
        one never started, so nothing that serves is stopped. At most once per report interval per replica.
        """
        clashes: dict[str, set[tuple[str, int]]] = {}
        for host, rep in self.reports.items():
            for i in rep.instances:
                if i.port_in_use:
                    clashes.setdefault(i.instance_id, set()).add((host, i.port_in_use))
        if not clashes:
            return []
        decisions = []
        async with self._lock:
            for a in self.state.all_assignments():
                hit = clashes.get(a.instance_id)
                key = (a.deployment, a.replica)
                record = self.state.deployment(a.deployment)
                if not hit or record is None or self.clock() < self._replace_after.get(key, 0.0):
                    continue
                taken = self._ports_in_use()
                for host, port in hit:
                    taken.setdefault(self._address_of(host), set()).add(port)
                clashed = {(self._address_of(h), p) for h, p in hit}
                endpoints = []
                for ep in a.endpoints:
                    port = ep.port
                    if (ep.address, ep.port) in clashed:
                        port = self._free_port(ep.address, taken)
                        taken.setdefault(ep.address, set()).add(port)
                    endpoints.append(ep.model_copy(update={"port": port}))
                new = a.model_copy(update={"generation": a.generation + 1, "term": self.consensus.term,
                                           "endpoints": tuple(endpoints)})
                self._replace_after[key] = self.clock() + self.report_interval
                await self._commit(assign_command(a.deployment, [new], record.spec.replicas))
                ports = ", ".join(f"{p} on {h}" for h, p in sorted(hit))
                decisions.append(f"{a.instance_id}: port {ports} held by another process: new ports as "
                                 f"{new.instance_id} ({', '.join(str(e.port) for e in endpoints)})")
        return decisions

    def _free_port(self, address: str, taken: dict[str, set[int]]) -> int:
        lo, hi = self.port_range
        used = taken.get(address, set())
        for port in range(lo, hi + 1):
            if port not in used:
                return port
        raise NotAvailable(f"no free port left in {lo}-{hi} on {address}")

    # ------------------------------------------------------------------ membership

    async def remove_node(self, name: str) -> tuple[ApplyResult, int, int]:
        """`agentd nodes rm`: mark `name` removed for good; its replicas are re-placed at the next tick, as a
        down host's are. Returns the result, its index and how many replicas had a part there. Leaving Raft
        and revoking the certificate are the caller's (the API has the Raft node and the clock)."""
        await self._require_leader()
        known = set(self.reports) | set(self.state.nodes) | set(self.consensus.members)
        if name not in known:
            raise InvalidInput(f"no host named {name!r} (`agentd nodes` lists them)")
        if self.state.removed(name):
            raise InvalidInput(f"host {name} was removed already")
        async with self._lock:
            result, index = await self._commit(node_remove_command(name))
        self.reports.pop(name, None)
        affected = sum(1 for a in self.state.incarnations() if any(p.host == name for p in a.plan.parts))
        return result, index, affected

    # ------------------------------------------------------------------ versions

    def _member_versions(self) -> dict[str, PeerVersion]:
        """What each member that counts for the cluster's format runs: every Raft member (voters and
        learners both apply the log) but those marked down. A member that has not reported to this leader
        yet counts as the oldest release, so the format never rises on a guess."""
        out = {}
        for name, member in self.consensus.members.items():
            node = self.state.nodes.get(name)
            if node is not None and node.state == NODE_DOWN and not getattr(member, "voter", True):
                continue
            rep = self.reports.get(name)
            out[name] = rep.agent if rep is not None else PeerVersion()
        return out

    def admit(self, command: bytes) -> str:
        """Raft's gate on every proposal: a command newer than the cluster's format, with the members that
        hold it back named."""
        why = self.state.admit(command)
        if not why:
            return ""
        behind = [f"{name} ({v})" for name, v in sorted(self._member_versions().items())
                  if v.state_format < STATE_FORMAT]
        return why + (f"; members on older agents: {', '.join(behind)}" if behind else "")

    async def raise_cluster_format(self) -> str:
        """Once every member supports a newer state format, commit it, so newer commands may follow."""
        if not self.consensus.is_leader or self.leader_since is None:
            return ""
        versions = self._member_versions()
        target = min([STATE_FORMAT, *(v.state_format for v in versions.values())])
        if target <= self.state.cluster_format:
            return ""
        before = self.state.cluster_format
        await self._commit(cluster_format_command(target))
        return f"every member supports state format {target}: cluster format raised from {before}"

    # ------------------------------------------------------------------ liveness

    async def tick(self) -> list[str]:
        """Mark silent hosts down, hosts that came back up, and re-place what ran on down hosts.

        Returns the decisions taken, one sentence each (for logs and tests).
        """
        if not self.consensus.is_leader or self.leader_since is None:
            return []
        now = self.clock()
        decisions: list[str] = []
        # A host that died with the old leader never reports to this one: it counts as
        # silent since this agent took over, so it, too, is marked down after the grace.
        for name in sorted(set(self.reports) | set(self.state.nodes)):
            if self.state.removed(name):
                continue
            rep = self.reports.get(name)
            node = self.state.nodes.get(name)
            last_seen = rep.last_seen if rep else self.leader_since
            address = rep.inventory.address if rep else (node.address if node else "")
            silent = now - last_seen
            if silent > self.node_down_grace and (node is None or node.state == NODE_UP):
                decisions.append(f"host {name} silent for {silent:.1f}s (> {self.node_down_grace:g}s): marked down")
                await self._commit(node_command(name, NODE_DOWN, address))
            elif rep is not None and silent <= self.node_down_grace and (node is None or node.state == NODE_DOWN):
                decisions.append(f"host {name} reporting: marked up")
                await self._commit(node_command(name, NODE_UP, address))
        down = {n for n, rec in self.state.nodes.items() if rec.state in (NODE_DOWN, NODE_REMOVED)}
        if down:
            decisions += await self._replace_from(down)
        if raised := await self.raise_cluster_format():
            decisions.append(raised)
        decisions += await self.drains.step()
        decisions += await self._repair_port_clashes()
        decisions += await self._unload_idle()
        decisions += await self._autoscale()
        for d in decisions:
            log.info(d)
        return decisions

    async def _replace_from(self, down: set[str]) -> list[str]:
        decisions = []
        async with self._lock:
            for a in self.state.all_assignments():
                hosts = {p.host for p in a.plan.parts}
                if not hosts & down:
                    continue
                key = (a.deployment, a.replica)
                if self.clock() < self._replace_after.get(key, 0.0):
                    continue
                record = self.state.deployment(a.deployment)
                if record is None:
                    continue
                spec = record.spec.model_copy(update={"replicas": 1})
                others = [x for x in self.booked() if x is not a]
                try:
                    model = await self._model(spec, check_options=False)
                except AgentdError as exc:
                    self._replace_after[key] = self.clock() + self.node_down_grace
                    decisions.append(f"{a.instance_id} on down host(s) {', '.join(sorted(hosts & down))} "
                                     f"cannot be re-placed: {exc}")
                    continue
                with collector_paused():
                    plan = self._place(self.snapshot(exclude_hosts=sorted(down)), model, spec, others)
                if not plan.placed:
                    self._replace_after[key] = self.clock() + self.node_down_grace
                    decisions.append(f"{a.instance_id} on down host(s) {', '.join(sorted(hosts & down))} "
                                     f"cannot be re-placed: {plan.diagnosis.message if plan.diagnosis else ''}")
                    continue
                new = self._assignments(record.spec, plan, [a.replica], {a.replica: a})
                await self._commit(assign_command(a.deployment, new, record.spec.replicas))
                decisions.append(f"{a.instance_id} re-placed from down host(s) {', '.join(sorted(hosts & down))} "
                                 f"as {new[0].instance_id} on {', '.join(sorted({p.host for p in new[0].plan.parts}))}")
        return decisions


async def run_periodically(fn: Callable[[], Awaitable[Any]], period: float, name: str) -> None:
    """Call `fn` every `period` seconds until cancelled; errors are logged and the loop goes on."""
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic task failed", extra=fields(task=name))
        await asyncio.sleep(period)
