"""The reporter: this host's inventory and instance states to the leader every REPORT_INTERVAL, and at once
when the leader changes or an instance changes state (over the report stream; one Report call per report to an
agentd 0.1.0 leader)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc

from agentd import formats
from agentd.api.activity import activity_to_pb
from agentd.api.control import instance_to_pb
from agentd.api.report_stream import StreamEnded
from agentd.cluster.clock import CLUSTER_TIME_METADATA
from agentd.cluster.leadercall import LeaderMoved, unless_leader_moves
from agentd.coordinator import InstanceReport
from agentd.logs import fields
from agentd.runtime import Endpoint
from agentd.runtime.spec import InstanceStatus
from agentd.types import HostInventory
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from agentd.version import BASELINE_STATE_FORMAT

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon

log = logging.getLogger(__name__)
REPORT_INTERVAL = 1.0
# FETCHING: the part's model is being copied from a peer before anything is launched (docs/models.md).
STATE_ORDER = ("FATAL", "BACKOFF", "STOPPING", "FETCHING", "PENDING", "STARTING", "STOPPED", "RUNNING")


def part_reports(node: str, st: InstanceStatus, assignment: Any) -> list[InstanceReport]:
    """This host's parts of one instance, one report each, from the supervisor's view.

    A part may run several processes; the part's state is its least advanced
    process's (FATAL before BACKOFF before ... before RUNNING).
    """
    out = []
    for idx, part in enumerate(assignment.plan.parts):
        if part.host != node:
            continue
        procs = [p for p in st.processes if p.part_index == idx]
        if procs:
            worst = min(procs, key=lambda p: STATE_ORDER.index(p.state) if p.state in STATE_ORDER else 0)
            state, reason = worst.state, worst.reason
            restarts = sum(p.restarts for p in procs)
            pid = next((p.pid for p in procs if p.pid), 0) or 0
            port_in_use = next((p.port_in_use for p in procs if p.port_in_use), 0)
        else:
            state, reason, restarts, pid, port_in_use = st.state, st.reason, st.restarts, 0, 0
        ep = assignment.endpoints[idx]
        out.append(InstanceReport(
            instance_id=st.instance_id, deployment=st.deployment, replica=st.replica, generation=st.generation,
            part=idx, host=node, role=part.role, state=state, reason=reason, restarts=restarts,
            endpoint=f"{ep.address}:{ep.port}", term=assignment.term, pid=pid, gpus=tuple(part.gpus),
            port_in_use=port_in_use))
    return out


class Reporter:
    def __init__(self, d: Daemon):
        self.d = d
        self.now = asyncio.Event()  # set: report at once (coalesced over 50 ms)
        self.leader_format = BASELINE_STATE_FORMAT  # the leader's state format, from its last report reply

    def local_instances(self) -> list[InstanceReport]:
        d = self.d
        wanted = {a.instance_id: a for a in d.state.assignments_on(d.node)}
        replaced = d.reconciler.handoffs.replaced()  # a drain's old replicas, answering what they hold
        if replaced:
            wanted.update((a.instance_id, a) for a in d.supervisor.assignments() if a.instance_id in replaced)
        out: list[InstanceReport] = []
        for st in d.supervisor.status():
            a = wanted.get(st.instance_id)
            if a is not None:
                out += part_reports(d.node, st, a)
        return out + d.reconciler.fetch_reports()

    async def run(self) -> None:
        while True:
            self.now.clear()
            try:
                await self.report_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("report failed", extra=fields(node=self.d.node))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_INTERVAL):
                    await self.now.wait()
                await asyncio.sleep(0.05)  # coalesce a burst of changes into one report

    async def report_once(self) -> None:
        d = self.d
        inventory = d.refresher.latest
        if inventory is None:
            return
        instances = self.local_instances()
        self.update_local_metrics(inventory)
        me = d.agent_version()
        if d.raft.is_leader:
            d.report_stream.close()
            d.coordinator.on_activity(d.node, d.activity.report())
            restarts = d.agent.accept_report(inventory, instances, me)  # it takes this host's peer restarts
        elif d.raft.leader_address:
            # Written for the leader's format: an older leader refuses fields it does not know (agentd.formats).
            inventory_json = json.dumps(formats.dump(inventory, self.leader_format))
            rows = [instance_to_pb(i) for i in instances]
            address = d.raft.leader_address
            channel = d.channels.get(address)
            activity = activity_to_pb(d.activity.report())  # idle clocks and replica queues (issue 21)
            watches = getattr(d.raft.watcher, "source", "") or ""  # a watcher's voter (agentd nodes: WATCHES)
            d.report_stream.admitted_index = d.raft.admitted_index
            try:
                if d.report_stream.unary(address):  # an agentd 0.1.0 leader: one Report call per report
                    req = pb.ReportRequest(node=d.node, address=d.s.advertise_address,
                                           inventory_json=inventory_json, instances=rows,
                                           agent_version=me.version, state_format=me.state_format,
                                           wire_version=me.wire_version, upgrade_required=me.upgrade_required,
                                           activity=activity)
                    call = pb_grpc.AgentStub(channel).Report(req, timeout=2.0,
                                                             metadata=d.cluster_clock.report_metadata())
                    reply = await unless_leader_moves(call, lambda: d.raft.leader_id)
                    d.cluster_clock.on_reply(await call.trailing_metadata())
                elif relay := d.relay_choice.target(d.raft):  # issue16 relay: through the voter it watches from
                    try:
                        reply = await d.report_stream.send(
                            d.channels.get(relay), relay, inventory_json=inventory_json, instances=rows,
                            version=(me.version, me.state_format, me.wire_version, me.upgrade_required),
                            wall_time=time.time(), activity=activity, watches_from=watches)
                    except (grpc.aio.AioRpcError, StreamEnded, TimeoutError) as exc:
                        wait = d.relay_choice.failed(relay, d.raft)  # issue16 relay: another voter, else the leader
                        log.info("the voter stopped relaying this host's reports: reporting elsewhere",
                                 extra=fields(voter=relay, error=str(exc)[:200], wait=round(wait, 3)))
                        # to the leader: its voter's other hosts come too, spread over the jitter; a leader change
                        # (which asks for a report at once, as an instance's change does) ends the wait
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait):
                                await self.now.wait()
                        self.now.set()
                        return
                    if reply.cluster_time:
                        d.cluster_clock.on_reply(((CLUSTER_TIME_METADATA, repr(reply.cluster_time)),))
                else:  # the stream to the leader: only what changed, else a renewal of this host's lease
                    reply = await unless_leader_moves(d.report_stream.send(
                        channel, address, inventory_json=inventory_json, instances=rows,
                        version=(me.version, me.state_format, me.wire_version, me.upgrade_required),
                        wall_time=time.time(), activity=activity, watches_from=watches), lambda: d.raft.leader_id)
                    if reply.cluster_time:
                        d.cluster_clock.on_reply(((CLUSTER_TIME_METADATA, repr(reply.cluster_time)),))
            except StreamEnded:
                self.now.set()  # the leader closed it: a new stream at once
                return
            except LeaderMoved:
                return  # the leader change asked for a report at once (_on_leader_change): it goes to the new one
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and d.report_stream.unary(address):
                    log.info("the leader has no report stream (agentd 0.1.0): reporting with Agent/Report",
                             extra=fields(leader=d.raft.leader_id))
                    self.now.set()
                    return
                level = logging.WARNING if exc.code() == grpc.StatusCode.FAILED_PRECONDITION else logging.DEBUG
                log.log(level, "report not accepted", extra=fields(leader=d.raft.leader_id,
                                                                   code=exc.code().name, error=exc.details()))
                return
            d.relay_choice.served()
            self.leader_format = reply.state_format or BASELINE_STATE_FORMAT
            if reply.join_raft and d.raft.watcher is not None:
                d.spawn(d.raft.become_member(), "become-member")
            restarts = [(r.address, r.port, r.reason) for r in reply.peer_restarts]
        else:
            return
        for address, port, reason in restarts:
            for line in d.supervisor.restart_dependents(Endpoint(host=address, port=port), reason):
                log.info(line, extra=fields(node=d.node))

    def update_local_metrics(self, inventory: HostInventory) -> None:
        d = self.d
        assigned: dict[str, int] = {}
        for a in d.state.assignments_on(d.node):
            for part in a.plan.parts:
                if part.host != d.node:
                    continue
                for g, planned in zip(part.gpus, part.memory, strict=False):
                    uuid = next((x.uuid for x in inventory.gpus if x.index == g), str(g))
                    assigned[uuid] = assigned.get(uuid, 0) + planned
        d.metrics.set_gpus(d.node, inventory.gpus, assigned)
        counts: dict[str, int] = {}
        for st in d.supervisor.status():
            counts[st.state.lower()] = counts.get(st.state.lower(), 0) + 1
        d.metrics.set_instance_states(counts)
        d.metrics.set_raft(term=d.raft.term, commit_index=d.raft.commit_index,
                           applied_index=d.raft.last_applied, is_leader=d.raft.is_leader,
                           leader=d.raft.leader_id)

