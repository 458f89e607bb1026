"""gRPC Control and Agent services.

Any agent accepts a Control call. Calls that need the coordinator are
forwarded to the current leader, transparently to the caller, with the
leader's status code and message passed back unchanged. A forwarded call is
marked so that it is never forwarded twice (a leader change mid-call gives
UNAVAILABLE, which clients retry).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from agentd import formats
from agentd.api.activity import activity_from_pb
from agentd.api.convert import spec_from_pb, spec_to_pb
from agentd.autoscale import DeploymentActivity
from agentd.cluster.clock import CLOCK_METADATA, CLUSTER_TIME_METADATA
from agentd.cluster.leadercall import LeaderMoved, unless_leader_moves
from agentd.cluster.state import ClusterState, StateEvent, cert_revoke_command
from agentd.coordinator import Coordinator, InstanceReport, removed_message
from agentd.errors import AgentdError, InvalidInput, NotAvailable, PeerError, Unplaceable, UpgradeRequired
from agentd.logs import fields
from agentd.reports import ReportDesk, ResendInventory
from agentd.security.auth import REDIRECT_KEY, Redirect, current_caller, forward_metadata
from agentd.types import HostInventory
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, PeerVersion

log = logging.getLogger(__name__)
FORWARDED = "x-agentd-forwarded"
FORWARD_TIMEOUT = 30.0
SNAPSHOT_CHUNK = 1 << 20  # bytes per SnapshotChunk: well under gRPC's message limit
SNAPSHOT_CATCH_UP = 10.0  # seconds a follower may take to apply up to the leader's read index
READS = frozenset({"Get", "List", "ListInstances", "ListNodes", "Plan"})  # safe to send again to a new leader


class RaftView(Protocol):
    is_leader: bool
    leader_id: str | None
    leader_address: str | None
    term: int
    commit_index: int
    last_applied: int

    @property
    def members(self) -> dict[str, Any]: ...

    async def read_barrier(self, timeout: float | None = None) -> int: ...

    async def propose(self, command: bytes, timeout: float | None = None) -> Any: ...

    async def remove_member(self, member_id: str, timeout: float | None = None) -> dict[str, Any]: ...


LogReader = Callable[[pb.LogsRequest], AsyncIterator[bytes]]


async def redirect(context: grpc.aio.ServicerContext, r: Redirect) -> None:
    """Tell the caller to call another agent itself: UNAVAILABLE, the address in trailing metadata (the CLI
    follows it) and in the sentence (for anyone else)."""
    context.set_trailing_metadata(((REDIRECT_KEY, r.address),))
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(r))


def status_for(exc: AgentdError) -> grpc.StatusCode:
    if isinstance(exc, Unplaceable):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, InvalidInput):
        msg = str(exc)
        if msg.startswith("no deployment named") or "no instance" in msg:
            return grpc.StatusCode.NOT_FOUND
        if "already exists" in msg:
            return grpc.StatusCode.ALREADY_EXISTS
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotAvailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, (PeerError, UpgradeRequired)):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


class ChannelPool:
    """One channel per peer address, reused across calls."""

    def __init__(self, options: list[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = options or []
        self._credentials = credentials

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._credentials is not None:
                ch = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            else:
                ch = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = ch
        return ch

    def set_credentials(self, credentials: grpc.ChannelCredentials) -> list[grpc.aio.Channel]:
        """Use new credentials (a renewed certificate) for channels opened from now on; returns the old
        channels, which the caller closes once calls in flight on them are done."""
        self._credentials = credentials
        old, self._channels = list(self._channels.values()), {}
        return old

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def page_of(names: list[str], limit: int, after: str) -> tuple[list[str], str]:
    """The names of one ListNodes page: the sorted `names` after `after`, at most `limit` of them (0: all), and the
    token of the next page (empty: none). The token is the page's last name, so a node that joins or leaves
    between two pages moves no other node to the wrong page."""
    start = bisect.bisect_right(names, after) if after else 0
    end = len(names) if limit <= 0 else min(len(names), start + limit)
    return names[start:end], names[end - 1] if end < len(names) else ""


def instance_to_pb(i: InstanceReport) -> pb.Instance:
    return pb.Instance(instance_id=i.instance_id, deployment=i.deployment, replica=i.replica,
                       generation=i.generation, part=i.part, host=i.host, gpus=list(i.gpus), role=i.role,
                       state=i.state, reason=i.reason, restarts=i.restarts, endpoint=i.endpoint, term=i.term,
                       pid=i.pid, port_in_use=i.port_in_use)


def instance_from_pb(m: pb.Instance) -> InstanceReport:
    return InstanceReport(instance_id=m.instance_id, deployment=m.deployment, replica=m.replica,
                          generation=m.generation, part=m.part, host=m.host, role=m.role, state=m.state,
                          reason=m.reason, restarts=m.restarts, endpoint=m.endpoint, term=m.term, pid=m.pid,
                          gpus=tuple(m.gpus), port_in_use=m.port_in_use)


class ControlService(pb_grpc.ControlServicer):
    def __init__(self, *, node_id: str, raft: RaftView, state: ClusterState, coordinator: Coordinator,
                 channels: ChannelPool, local_logs: LogReader):
        self.node_id = node_id
        self.raft = raft
        self.state = state
        self.coordinator = coordinator
        self.channels = channels
        self.local_logs = local_logs
        # On the leader: node -> the address of the voter each watcher says it watches from (written by
        # AgentService's ReportDesk, shown by ListNodes as Node.watches_from).
        self.watching: dict[str, str] = {}
        # The leader's state format, as its last ReportReply said (the daemon sets it): a request this agent
        # forwards must not carry what an older leader would silently drop.
        self.leader_format: Callable[[], int] = lambda: STATE_FORMAT
        # This host's instances as its own supervisor sees them (the daemon sets it): `ps --local`, and the
        # states a serializable read shows for this host's parts when this agent does not lead.
        self.local_instances: Callable[[], list[InstanceReport]] = lambda: []
        self._watchers: set[asyncio.Queue] = set()
        state.subscribe(self._on_state_event)

    # ------------------------------------------------------------------ plumbing

    async def _on_leader(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                         local: Callable[[], Awaitable[Any]]) -> Any:
        """Run `local` here if we lead, else forward `method` to the leader."""
        try:
            while True:
                if self.raft.is_leader:
                    return await local()
                forwarded = any(k == FORWARDED for k, _ in (context.invocation_metadata() or ()))
                if forwarded or not self.raft.leader_address:
                    raise NotAvailable("no leader elected yet" if not self.raft.leader_address
                                       else "leadership changed while the call was forwarded; retry")
                try:
                    metadata = forward_metadata(self.node_id, FORWARDED, self.raft.leader_address,
                                                f"the leader ({self.raft.leader_id})")
                except Redirect as r:
                    await redirect(context, r)
                try:
                    return await self._forward(method, request, metadata)
                except LeaderMoved as moved:
                    if method not in READS:  # the old leader may still run it: the caller decides
                        raise NotAvailable(f"the leader changed from {moved.old} to {moved.new} while the call "
                                           "was forwarded; retry") from None
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "")
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug: the caller gets a sentence, the log gets the traceback
            log.exception("control call failed", extra=fields(method=method))
            await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed inside agent {self.node_id}: "
                                                          f"{type(exc).__name__}: {exc} (the agent's log has details)")

    async def _forward(self, method: str, request: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
        """Call the leader; give up as soon as another leader is known (a hung leader keeps its sockets open,
        so the call would wait for its whole deadline although the cluster elected another)."""
        stub = pb_grpc.ControlStub(self.channels.get(self.raft.leader_address))
        call = getattr(stub, method)(request, timeout=FORWARD_TIMEOUT, metadata=metadata)
        return await unless_leader_moves(call, lambda: self.raft.leader_id)

    def _deployment_pb(self, name: str) -> pb.Deployment:
        record = self.state.deployment(name)
        if record is None:
            raise InvalidInput(f"no deployment named {name!r}")
        assignments = self.state.assignments_for(name)
        return pb.Deployment(
            spec=spec_to_pb(record.spec),
            instances=[instance_to_pb(i) for i in self._instances(name)],
            assignments_json=json.dumps([a.model_dump(mode="json") for a in assignments]),
            updated_index=record.updated_index,
            idle=name in self.state.idle,
            **self._leader_notes(name),
        )

    def _leader_notes(self, name: str) -> dict[str, str]:
        """What only the leader knows of a deployment (soft state): its last failed wake, the autoscaler's view."""
        if not self.raft.is_leader:
            return {}
        out = {}
        failed = self.coordinator.wake_failures.get(name)
        if failed is not None:
            out["wake_error"] = f"{self.coordinator.clock() - failed[0]:.0f}s ago: {failed[1]}"
        if scaling := self.coordinator.last_decisions.get(name):
            out["scaling"] = scaling
        return out

    async def _read(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                    answer: Callable[[], Any]) -> Any:
        """A read of the replicated state: linearizable on the leader, or this agent's copy when serializable."""
        if request.serializable:
            try:
                return answer()
            except AgentdError as exc:
                await context.abort(status_for(exc), str(exc))

        async def local():
            await self.raft.read_barrier()
            return answer()
        return await self._on_leader(method, request, context, local)

    def _instances(self, deployment: str = "") -> list[InstanceReport]:
        """Reported instances, plus PENDING/UNKNOWN rows for assigned parts nobody reported yet.

        Only the leader hears reports. On a follower (a serializable read, also during an outage) this host's
        parts come from its own supervisor and the other hosts' rows are UNKNOWN.
        """
        follower = not self.raft.is_leader
        if follower:
            reported = {(i.instance_id, i.part): i for i in self.local_instances()
                        if not deployment or i.deployment == deployment}
        else:
            reported = {(i.instance_id, i.part): i for i in self.coordinator.instances(deployment)}
        out = list(reported.values())
        for a in self.state.incarnations():
            if deployment and a.deployment != deployment:
                continue
            for idx, part in enumerate(a.plan.parts):
                if (a.instance_id, idx) in reported:
                    continue
                node = self.state.nodes.get(part.host)
                down = node is not None and node.state == "down"
                if follower:
                    reason = f"{self.node_id} is not the leader: instance states are reported to the leader"
                elif down:
                    reason = f"host {part.host} is down"
                else:
                    reason = "not reported by its host yet"
                ep = a.endpoints[idx]
                out.append(InstanceReport(
                    instance_id=a.instance_id, deployment=a.deployment, replica=a.replica,
                    generation=a.generation, part=idx, host=part.host, role=part.role,
                    state="UNKNOWN" if down or follower else "PENDING", reason=reason,
                    endpoint=f"{ep.address}:{ep.port}", term=a.term, gpus=part.gpus))
        return sorted(out, key=lambda i: (i.deployment, i.replica, i.part))

    def _on_state_event(self, ev: StateEvent) -> None:
        msg = pb.Event(kind=ev.kind, name=ev.name, index=ev.index, term=ev.term, data_json=json.dumps(ev.data))
        for q in list(self._watchers):
            if q.qsize() < 1000:  # a slow watcher loses events rather than growing memory
                q.put_nowait(msg)

    def publish_instance_event(self, report: InstanceReport) -> None:
        self._on_state_event(StateEvent("instance.state", report.deployment, self.state.last_index,
                                        self.raft.term, {"instance_id": report.instance_id,
                                                         "part": report.part, "host": report.host,
                                                         "state": report.state, "reason": report.reason}))

    # ------------------------------------------------------------------ writes (leader)

    async def Deploy(self, request, context):
        if not self.raft.is_leader:
            await self._refuse_what_the_leader_would_drop(request.spec, context)

        async def local():
            spec = spec_from_pb(request.spec)
            whys: list[str] = []
            result, index = await self.coordinator.deploy(spec, replace=request.replace, whys=whys)
            return pb.DeployReply(deployment=self._deployment_pb(spec.name), message=result.message, index=index,
                                  why=whys)
        return await self._on_leader("Deploy", request, context, local)

    async def _refuse_what_the_leader_would_drop(self, spec_pb: pb.DeploymentSpec,
                                                 context: grpc.aio.ServicerContext) -> None:
        """An older leader (agentd 0.1.0) ignores spec fields it does not know: say so instead of forwarding."""
        try:
            needs = formats.needed_format(spec_from_pb(spec_pb))
        except AgentdError:
            return  # the leader answers with the reason
        if needs > self.leader_format():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this deployment needs state format {needs}, but the leader "
                                f"({self.raft.leader_id}) applies format {self.leader_format()}: it runs an older "
                                "agentd and would ignore the new options; finish the upgrade, then retry")

    async def Scale(self, request, context):
        async def local():
            whys: list[str] = []
            if request.HasField("min_replicas") or request.HasField("max_replicas"):  # replicas by load
                result, index = await self.coordinator.set_bounds(
                    request.name, request.min_replicas if request.HasField("min_replicas") else None,
                    request.max_replicas if request.HasField("max_replicas") else None)
                return pb.DeployReply(deployment=self._deployment_pb(request.name), message=result.message,
                                      index=index)
            result, index = await self.coordinator.scale(request.name, request.replicas, whys=whys)
            return pb.DeployReply(deployment=self._deployment_pb(request.name), message=result.message, index=index,
                                  why=whys)
        return await self._on_leader("Scale", request, context, local)

    async def Wake(self, request, context):
        """An agent's /v1/ proxy holds requests for an IDLE deployment: place it again (once, however many ask)."""
        async def local():
            result, index = await self.coordinator.wake(request.name)
            return pb.WakeReply(message=result.message if result else f"deployment {request.name} is not idle",
                                index=index, woken=result is not None)
        return await self._on_leader("Wake", request, context, local)

    async def Delete(self, request, context):
        async def local():
            result, index = await self.coordinator.delete(request.name)
            return pb.DeleteReply(message=result.message, index=index)
        return await self._on_leader("Delete", request, context, local)

    async def Plan(self, request, context):
        async def local():
            plan, _ = await self.coordinator.plan_when_ready(spec_from_pb(request.spec))
            return pb.PlanReply(placed=plan.placed, plan_json=plan.model_dump_json())
        return await self._on_leader("Plan", request, context, local)

    # ------------------------------------------------------------------ reads

    async def Get(self, request, context):
        return await self._read("Get", request, context, lambda: self._deployment_pb(request.name))

    async def List(self, request, context):
        return await self._read("List", request, context, lambda: pb.ListReply(
            deployments=[self._deployment_pb(n) for n in sorted(self.state.deployments)]))

    async def ListInstances(self, request, context):
        if request.local:  # this host's supervisor: no leader needed
            return pb.ListInstancesReply(instances=[
                instance_to_pb(i) for i in sorted(self.local_instances(), key=lambda i: (i.deployment, i.replica,
                                                                                        i.part))
                if not request.deployment or i.deployment == request.deployment])

        async def local():
            if request.reported_only:
                return pb.ListInstancesReply(instances=[instance_to_pb(i)
                                                        for i in self.coordinator.instances(request.deployment)])
            return pb.ListInstancesReply(instances=[instance_to_pb(i) for i in self._instances(request.deployment)])
        return await self._on_leader("ListInstances", request, context, local)

    async def ListNodes(self, request, context):
        async def local():
            now = self.coordinator.clock()
            members = self.raft.members
            names = sorted(set(members) | set(self.state.nodes) | set(self.coordinator.reports))
            names, next_token = page_of(names, request.limit, request.page_token)
            named = {getattr(m, "address", ""): n for n, m in members.items()}  # a watcher's voter, by name
            nodes = []
            for name in names:
                rep = self.coordinator.reports.get(name)
                rec = self.state.nodes.get(name)
                member = members.get(name)
                address = (getattr(member, "address", "") or (rec.address if rec else "")
                           or (rep.inventory.address if rep else ""))
                left, blocked = self.coordinator.drains.remaining(name)
                role = ("leader" if name == self.raft.leader_id else "voter" if getattr(member, "voter", False)
                        else "learner" if member is not None else "watcher")
                watches = self.watching.get(name, "") if role == "watcher" else ""
                nodes.append(pb.Node(
                    name=name, address=address, state=rec.state if rec else ("up" if rep else "unknown"),
                    voter=bool(getattr(member, "voter", False)), leader=name == self.raft.leader_id,
                    inventory_json=rep.inventory.model_dump_json() if rep else "",
                    last_seen_seconds=(now - rep.last_seen) if rep else -1.0,
                    agent_version=rep.agent.version if rep else "",
                    state_format=rep.agent.state_format if rep else 0,
                    upgrade_required=rep.agent.upgrade_required if rep else "",
                    cordoned=[c.key for c in self.state.cordons_of(name)],
                    draining=left, drain_blocked=blocked,
                    role=role, reports_via=rep.via if rep else "", watches_from=named.get(watches, watches)))
            return pb.ListNodesReply(nodes=nodes, next_page_token=next_token)
        return await self._on_leader("ListNodes", request, context, local)

    async def Cordon(self, request, context):
        async def local():
            result, index, t = await self.coordinator.drains.cordon(
                request.target, reason=request.reason[:500], drain=request.drain, force=request.force)
            return pb.CordonReply(message=result.message, index=index, host=t.host,
                                  gpu=-1 if t.gpu is None else t.gpu)
        return await self._on_leader("Cordon", request, context, local)

    async def Uncordon(self, request, context):
        async def local():
            result, index, t = await self.coordinator.drains.uncordon(request.target)
            return pb.CordonReply(message=result.message, index=index, host=t.host,
                                  gpu=-1 if t.gpu is None else t.gpu)
        return await self._on_leader("Uncordon", request, context, local)

    async def RemoveNode(self, request, context):
        async def local():
            name = request.name.strip()
            if name == self.node_id:
                raise InvalidInput(f"{name} leads the cluster: stop its agent (it hands leadership over) or run "
                                   "this on the new leader after a restart, then remove it")
            result, index, replicas = await self.coordinator.remove_node(name)
            # Its certificate too (state format 2, like node.remove): a copy of its identity is refused anywhere.
            await self.raft.propose(cert_revoke_command(name, time.time()))
            left = name in self.raft.members
            if left:
                await self.raft.remove_member(name)
            log.warning("host removed from the cluster", extra=fields(node=name, replicas=replicas, left_raft=left))
            return pb.RemoveNodeReply(message=result.message, index=index, replicas=replicas, left_raft=left)
        return await self._on_leader("RemoveNode", request, context, local)

    async def Leader(self, request, context):
        return pb.LeaderReply(leader_id=self.raft.leader_id or "", leader_address=self.raft.leader_address or "",
                              term=self.raft.term)

    async def Status(self, request, context):
        members = [pb.Member(id=mid, address=getattr(m, "address", ""), voter=bool(getattr(m, "voter", False)))
                   for mid, m in sorted(self.raft.members.items())]
        return pb.StatusReply(node_id=self.node_id, leader_id=self.raft.leader_id or "",
                              leader_address=self.raft.leader_address or "", term=self.raft.term,
                              commit_index=self.raft.commit_index, last_applied=self.raft.last_applied,
                              members=members, agent_version=AGENT_VERSION, state_format=STATE_FORMAT,
                              wire_version=WIRE_VERSION, cluster_format=self.state.cluster_format,
                              upgrade_required=getattr(self.raft, "upgrade_required", ""),
                              watching=_watching(self.raft))

    async def Watch(self, request, context):
        if not self.raft.is_leader:
            if not self.raft.leader_address:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no leader elected yet")
            try:
                metadata = forward_metadata(self.node_id, FORWARDED, self.raft.leader_address,
                                            f"the leader ({self.raft.leader_id})")
            except Redirect as r:
                await redirect(context, r)
            stub = pb_grpc.ControlStub(self.channels.get(self.raft.leader_address))
            try:
                async for ev in stub.Watch(request, metadata=metadata):
                    yield ev
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        try:
            while True:
                ev = await q.get()
                if not request.deployment or ev.name == request.deployment:
                    yield ev
        finally:
            self._watchers.discard(q)

    async def Snapshot(self, request, context):
        """A consistent copy of the replicated state, from any agent (agentd.cluster.backup writes the file).

        The leader confirms it still leads (ReadIndex). A follower asks the leader for that read index and
        waits until it has applied it (Raft thesis §6.4), so the copy holds every write committed before the
        call, whichever agent answers. The state and its (index, term) are read in one step of the event
        loop: no entry is applied in between.
        """
        try:
            if request.read_index_only:
                if not self.raft.is_leader:
                    raise NotAvailable(f"{self.node_id} is not the leader (leader: {self.raft.leader_id or 'none'})")
                index = await self.raft.read_barrier()
                yield pb.SnapshotChunk(index=index, term=self.raft.term, node_id=self.node_id)
                return
            if self.raft.is_leader:
                await self.raft.read_barrier()
            else:
                index = await self._leader_read_index()
                async with asyncio.timeout(SNAPSHOT_CATCH_UP):
                    while self.raft.last_applied < index:
                        await asyncio.sleep(0.01)
            frozen = self.state.frozen_copy()  # one step of the loop: no entry is applied while it is taken
            index, term = frozen.last_index, frozen.last_term
            # Serialising 10,000 deployments takes seconds (benchmarks/snapshot.py): off the loop, so the
            # leader's heartbeats go on meanwhile.
            data = await asyncio.to_thread(frozen.snapshot)
        except TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} did not catch up with the leader "
                                                             f"within {SNAPSHOT_CATCH_UP:g}s; retry")
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))
        log.info("state snapshot taken for a backup", extra=fields(node=self.node_id, index=index, term=term,
                                                                   bytes=len(data)))
        cluster_id = str(getattr(self.raft, "cluster_id", "") or "")
        for offset in range(0, max(len(data), 1), SNAPSHOT_CHUNK):
            chunk = data[offset:offset + SNAPSHOT_CHUNK]
            if offset == 0:
                yield pb.SnapshotChunk(data=chunk, index=index, term=term, cluster_id=cluster_id,
                                       node_id=self.node_id, size=len(data))
            else:
                yield pb.SnapshotChunk(data=chunk)

    async def _leader_read_index(self) -> int:
        """The leader's read index (it confirmed its leadership with a quorum), for a read served here.

        Asked as this host (its node certificate; docs/security.md lets a node ask for a read point): the
        caller was authorized here, and the leader sends no state back.
        """
        if not self.raft.leader_address:
            raise NotAvailable("no leader elected yet: a consistent snapshot needs one")
        stub = pb_grpc.ControlStub(self.channels.get(self.raft.leader_address))
        try:
            async for chunk in stub.Snapshot(pb.SnapshotRequest(read_index_only=True), timeout=FORWARD_TIMEOUT):
                return chunk.index
        except grpc.aio.AioRpcError as exc:
            raise NotAvailable(f"the leader ({self.raft.leader_id}) gave no read index: {exc.details()}") from None
        raise NotAvailable(f"the leader ({self.raft.leader_id}) gave no read index")

    async def Logs(self, request, context):
        """Stream an instance's log from whichever host runs the requested part."""
        try:
            host = self._host_of(request.instance_id, request.part)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))
        if host == self.node_id:
            async for chunk in self._stream_local(request, context):
                yield chunk
            return
        address = self._address_of(host)
        if not address:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no address known for host {host}")
        try:  # the host that runs it judges the caller: a bearer token travels along, a certificate is redirected
            metadata = forward_metadata(self.node_id, FORWARDED, address, f"host {host}")
        except Redirect as r:
            await redirect(context, r)
        stub = pb_grpc.AgentStub(self.channels.get(address))
        try:
            async for chunk in stub.Logs(request, metadata=metadata):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def _stream_local(self, request, context):
        try:
            async for data in self.local_logs(request):
                yield pb.LogChunk(data=data, host=self.node_id)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))

    def _host_of(self, instance_id: str, part: int) -> str:
        for a in self.state.incarnations():
            if a.instance_id == instance_id or f"{a.deployment}-r{a.replica}" == instance_id:
                if part < 0:
                    mains = [p for p in a.plan.parts if p.role == "main"]
                    return (mains[0] if mains else a.plan.parts[0]).host
                if part >= len(a.plan.parts):
                    raise InvalidInput(f"{instance_id} has {len(a.plan.parts)} part(s); no part {part}")
                return a.plan.parts[part].host
        raise InvalidInput(f"no instance {instance_id!r}")

    def _address_of(self, host: str) -> str:
        member = self.raft.members.get(host)
        if member is not None and getattr(member, "address", ""):
            return member.address
        rec = self.state.nodes.get(host)
        return rec.address if rec else ""


def add_services(server: grpc.aio.Server, control: ControlService, agent: AgentService) -> None:
    """Register Control and Agent on `server`, parsing requests ourselves.

    With the generated registration, bytes that are not a valid message fail
    inside grpc's deserializer and reach the caller as UNKNOWN "Unexpected
    DecodeError". Here the handlers take the raw bytes and a request that does
    not parse is answered INVALID_ARGUMENT with a sentence, like any other
    bad input; the servicers only ever see well-formed messages.
    """
    for service, servicer in (("Control", control), ("Agent", agent)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        handlers = {}
        for method in desc.methods:
            request_cls = getattr(pb, method.input_type.name)
            response_cls = getattr(pb, method.output_type.name)
            behavior = getattr(servicer, method.name)
            if method.client_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    _parsed_bidi(behavior, request_cls, method.full_name),
                    response_serializer=response_cls.SerializeToString)
            elif method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    _parsed_stream(behavior, request_cls, method.full_name),
                    response_serializer=response_cls.SerializeToString)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _parsed_unary(behavior, request_cls, method.full_name),
                    response_serializer=response_cls.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))


def _watching(raft: Any) -> str:
    watcher = getattr(raft, "watcher", None)
    return (watcher.source or "(looking for a voter)") if watcher is not None else ""


def _parse(request_cls: Any, raw: bytes) -> Any:
    try:
        return request_cls.FromString(raw)
    except (DecodeError, ValueError, TypeError):
        return None


async def _refuse_garbage(context: grpc.aio.ServicerContext, request_cls: Any, raw: bytes, method: str) -> None:
    log.warning("garbage request refused", extra=fields(method=method, size=len(raw), peer=context.peer()))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request ({len(raw)} bytes) is not a valid "
                        f"{request_cls.DESCRIPTOR.full_name} message")


def _parsed_unary(behavior: Callable[..., Awaitable[Any]], request_cls: Any, method: str) -> Any:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        request = _parse(request_cls, raw)
        if request is None:
            await _refuse_garbage(context, request_cls, raw, method)
        return await behavior(request, context)
    return handler


def _parsed_bidi(behavior: Callable[..., AsyncIterator[Any]], request_cls: Any, method: str) -> Any:
    """A bidirectional stream: each message is parsed as it arrives, garbage ends the call (INVALID_ARGUMENT)."""
    async def handler(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for raw in raws:
                request = _parse(request_cls, raw)
                if request is None:
                    await _refuse_garbage(context, request_cls, raw, method)
                yield request
        async for item in behavior(parsed(), context):
            yield item
    return handler


def _parsed_stream(behavior: Callable[..., AsyncIterator[Any]], request_cls: Any, method: str) -> Any:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = _parse(request_cls, raw)
        if request is None:
            await _refuse_garbage(context, request_cls, raw, method)
        async for item in behavior(request, context):
            yield item
    return handler


class AgentService(pb_grpc.AgentServicer):
    """Agent-to-agent calls: heartbeat reports to the coordinator (agentd/reports.py holds what they do; this
    translates), a voter's relayed reports, host-local logs."""

    clock: Any = None  # agentd.cluster.clock.ClusterClock; the daemon sets it (reports carry the reporter's clock)
    # agentd.cluster.relay.ReportRelay on an agent that relays its watchers' reports while it does not lead
    relay: Any = None

    def __init__(self, *, raft: RaftView, coordinator: Coordinator, control: ControlService):
        self.raft = raft
        self.coordinator = coordinator
        self.control = control
        self.desk = ReportDesk(coordinator, on_instance_state=control.publish_instance_event,
                               watching=control.watching)

    @property
    def invite(self) -> Callable[[str], bool]:
        """Whether the reporting host should join Raft as a standby learner (the daemon decides)."""
        return self.desk.invite

    @invite.setter
    def invite(self, decide: Callable[[str], bool]) -> None:
        self.desk.invite = decide

    async def Report(self, request, context):
        if not self.raft.is_leader:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"not the leader; leader is {self.raft.leader_id or 'unknown'}")
        try:
            self.desk.admit(request.node)
            agent = self.desk.agent(request.node, request.agent_version, request.state_format,
                                    request.wire_version, request.upgrade_required)
            inventory = self.desk.inventory(request.node, request.inventory_json)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))
        self.desk.activity(request.node, _activity(request.activity))
        restarts = self.accept_report(inventory, [instance_from_pb(i) for i in request.instances], agent)
        if self.clock is not None:  # the reporter's wall clock, for the cluster's median (agentd/cluster/clock.py)
            context.set_trailing_metadata(self.clock.on_report(request.node, context.invocation_metadata()))
        return pb.ReportReply(term=self.raft.term, leader_id=self.raft.leader_id or "",
                              peer_restarts=_restarts_pb(restarts), agent_version=AGENT_VERSION,
                              state_format=STATE_FORMAT, join_raft=self.invite(request.node))

    async def ReportStream(self, requests: AsyncIterator[pb.ReportUpdate], context: grpc.aio.ServicerContext):
        """A host's reports on one long-lived stream (docs/cluster.md, "Liveness by lease").

        The stream speaks for one host, the one its first message names, and that must be the caller's
        certificate name (docs/security.md). The leader records what it says (agentd/reports.py); a voter
        that does not lead relays it (agentd/cluster/relay.py, "Reports through a voter"). A message that
        reaches an agent that can do neither ends the stream (FAILED_PRECONDITION), and the host opens a new
        one to the leader it then knows; so does a leader change under a stream (UNAVAILABLE).
        """
        node = ""
        session = None
        relayed = False
        async for m in requests:
            if not node:
                node = m.node
                caller = current_caller()
                if caller is not None and caller.kind == "cert" and caller.role == "node" and caller.name != node:
                    log.warning("refused a report stream claiming another node",
                                extra=fields(caller=caller.name, claimed=node))
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"the certificate of {caller.name!r} may not speak for {node!r} "
                                        "(/agentd.v1.Agent/ReportStream)")
                if not node or not (m.inventory_json or m.inventory_digest) or not m.agent_version:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "a report stream's first message names its node and carries its "
                                        "inventory (or its digest) and agent version")
                relayed = not self.raft.is_leader and self.relay is not None and self.relay.serving()
                log.info("report stream opened", extra=fields(node=node, peer=context.peer(), relayed=relayed))
            elif m.node and m.node != node:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"this report stream speaks for {node!r}, not {m.node!r}: one stream per host")
            if relayed:
                reply = await self._relay_one(node, m, context)
            else:
                if not self.raft.is_leader:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"not the leader; leader is {self.raft.leader_id or 'unknown'}")
                if session is None:
                    session = self.desk.session(node)
                reply = await self._record_one(session, m, context)
            yield reply

    async def _record_one(self, session: Any, m: pb.ReportUpdate, context: grpc.aio.ServicerContext) -> pb.ReportReply:
        """On the leader: one message of a host's own stream."""
        node = session.node
        try:
            restarts = session.apply(
                inventory_json=m.inventory_json, inventory_digest=m.inventory_digest,
                instances=[instance_from_pb(i) for i in m.instances] if m.instances_changed else None,
                agent=(m.agent_version, m.state_format, m.wire_version, m.upgrade_required)
                if m.agent_version else None,
                activity=_activity(m.activity),  # the proxy's idle clocks (issue 21) ride on every message
                watches=m.watches_from)
        except ResendInventory:  # named by a digest this leader does not hold: the host sends it again, whole
            return pb.ReportReply(term=self.raft.term, leader_id=self.raft.leader_id or "",
                                  agent_version=AGENT_VERSION, state_format=STATE_FORMAT, resend_inventory=True)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))
        cluster_time = 0.0
        if self.clock is not None and m.wall_time:
            told = dict(self.clock.on_report(node, ((CLOCK_METADATA, repr(m.wall_time)),)))
            cluster_time = float(told.get(CLUSTER_TIME_METADATA, 0.0))
        return pb.ReportReply(term=self.raft.term, leader_id=self.raft.leader_id or "",
                              peer_restarts=_restarts_pb(restarts), agent_version=AGENT_VERSION,
                              state_format=STATE_FORMAT, join_raft=self.invite(node), cluster_time=cluster_time)

    async def _relay_one(self, node: str, m: pb.ReportUpdate, context: grpc.aio.ServicerContext) -> pb.ReportReply:
        """On a voter that does not lead: hold the message for the leader; the reply is the relay's."""
        if self.raft.is_leader:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this agent leads now: open a new report stream to it")
        if self.coordinator.state.removed(node):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, removed_message(node))
        try:
            return self.relay.on_update(node, m)
        except AgentdError as exc:
            await context.abort(status_for(exc), str(exc))

    async def RelayReports(self, requests: AsyncIterator[pb.RelayBatch], context: grpc.aio.ServicerContext):
        """On the leader: a voter's batches of its hosts' reports (docs/cluster.md, "Reports through a voter").

        Only a current voter may relay, and with mTLS only under its own certificate's name: a watcher (or
        a learner) that claims to forward another host's reports is refused (PERMISSION_DENIED). The hosts'
        own identities were checked by the voter against their certificates when their streams opened.
        """
        relay = ""
        sessions: dict[str, Any] = {}
        async for batch in requests:
            if not self.raft.is_leader:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"not the leader; leader is {self.raft.leader_id or 'unknown'}")
            if not relay:
                relay = batch.relay
                caller = current_caller()
                if caller is not None and caller.kind == "cert" and caller.name != relay:
                    log.warning("refused a relay stream claiming another node",
                                extra=fields(caller=caller.name, claimed=relay))
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"the certificate of {caller.name!r} may not relay as {relay!r} "
                                        "(/agentd.v1.Agent/RelayReports)")
                log.info("relay stream opened", extra=fields(relay=relay, peer=context.peer()))
            elif batch.relay and batch.relay != relay:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"this relay stream speaks for {relay!r}, not {batch.relay!r}")
            member = self.raft.members.get(relay)
            if member is None or not getattr(member, "voter", False) or relay == self.raft.leader_id:
                log.warning("refused relayed reports from a host that is not a voter", extra=fields(relay=relay))
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{relay!r} is not a voter: only voters relay other hosts' reports")
            yield self._relayed(relay, batch, sessions)

    def _relayed(self, relay: str, batch: pb.RelayBatch, sessions: dict[str, Any]) -> pb.RelayReply:
        replies = []
        heard: dict[str, Any] = {}  # node -> restarts, in the order heard
        for m in batch.updates[:100000]:
            node = m.node
            session = sessions.get(node)
            if session is None or m.agent_version:  # a host new on this stream (or its new stream) starts over
                session = sessions[node] = self.desk.session(node, via=relay)
            try:
                heard[node] = session.apply(
                    inventory_json=m.inventory_json, inventory_digest=m.inventory_digest,
                    instances=[instance_from_pb(i) for i in m.instances] if m.instances_changed else None,
                    agent=(m.agent_version, m.state_format, m.wire_version, m.upgrade_required)
                    if m.agent_version else None,
                    activity=_activity(m.activity) if m.activity else None, watches=m.watches_from)
            except ResendInventory:  # the voter sends this host's whole report in a following batch
                sessions.pop(node, None)
                heard.pop(node, None)
                replies.append(pb.RelayHostReply(node=node, resend_inventory=True))
                continue
            except AgentdError as exc:
                sessions.pop(node, None)
                heard.pop(node, None)
                replies.append(pb.RelayHostReply(node=node, refused_code=status_for(exc).value[0],
                                                 refused=str(exc)))
                continue
            if self.clock is not None and m.wall_time:
                self.clock.observe(node, m.wall_time)
        for node in batch.live[:100000]:
            session = sessions.get(node)
            if session is not None and node not in heard:
                try:
                    heard[node] = session.renew()
                except AgentdError as exc:
                    sessions.pop(node, None)
                    replies.append(pb.RelayHostReply(node=node, refused_code=status_for(exc).value[0],
                                                     refused=str(exc)))
        for node, restarts in heard.items():
            join = self.invite(node)
            if restarts or join:
                replies.append(pb.RelayHostReply(node=node, peer_restarts=_restarts_pb(restarts), join_raft=join))
        return pb.RelayReply(term=self.raft.term, leader_id=self.raft.leader_id or "", agent_version=AGENT_VERSION,
                             state_format=STATE_FORMAT, hosts=replies, takes_digests=True,
                             cluster_time=self.clock.now() if self.clock is not None else 0.0)

    def accept_report(self, inventory: HostInventory, instances: list[InstanceReport],
                      agent: PeerVersion = PeerVersion()) -> list[tuple[str, int, str]]:
        """Record a host's report (also the leader's own); returns the peer restarts that host must act on."""
        return self.desk.accept(inventory, instances, agent)

    async def Logs(self, request, context):
        caller = current_caller()
        if caller is not None and caller.kind == "cert" and caller.role == "node":
            # A host reads the logs of instances it has a part of (a worker's main server), no others.
            try:
                host = self.control._host_of(request.instance_id, request.part)
                ids = {a.instance_id for a in self.control.state.assignments_on(caller.name)}
                ids |= {f"{a.deployment}-r{a.replica}" for a in self.control.state.assignments_on(caller.name)}
            except AgentdError as exc:
                await context.abort(status_for(exc), str(exc))
            if host != caller.name and request.instance_id not in ids:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"host {caller.name!r} may read only the logs of its own instances")
        async for chunk in self.control._stream_local(request, context):
            yield chunk


def _activity(rows: Any) -> dict[str, DeploymentActivity]:
    return activity_from_pb(rows)  # idle clocks and per-replica queues (issue 21; agentd/api/activity.py)


def _restarts_pb(restarts: list[tuple[str, int, str]]) -> list[pb.PeerRestart]:
    return [pb.PeerRestart(address=a, port=p, reason=r) for a, p, r in restarts]
