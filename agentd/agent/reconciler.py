"""The reconciler: once this agent's copy of the log has caught up with the leader, it hands the supervisor
this host's assignments whenever they change (and every RECONCILE_PERIOD, which heals a missed event)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import grpc

from agentd.agent.handoff import Handoffs
from agentd.api.fetch import Fetch
from agentd.catalog import held_copy
from agentd.coordinator import InstanceReport
from agentd.errors import AgentdError
from agentd.logs import fields
from agentd.security import apikeys
from agentd.types import Assignment
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon

log = logging.getLogger(__name__)
RECONCILE_PERIOD = 5.0  # re-apply even without a change: cheap, and heals a missed event


class Reconciler:
    def __init__(self, d: Daemon):
        self.d = d
        self.now = asyncio.Event()
        self.synced = False  # the local state has caught up with the leader's commit index once
        self.fetching: dict[str, tuple[Assignment, Fetch]] = {}  # instance id -> its model's fetch
        self.model_paths: dict[str, str] = {}  # instance id -> this host's copy of its catalog model (localized)
        hook = d.plugins.pm.hook
        self.handoffs = Handoffs(load_path=lambda runtime: hook.agentd_load_path(runtime=runtime),
                                 read=lambda runtime, status, body: hook.agentd_read_load(
                                     runtime=runtime, status=status, body=body),
                                 timeout=d.s.drain_handoff_timeout, wake=self.now.set, node=d.node)

    async def catch_up(self) -> None:
        """Wait until the local state holds everything the leader had committed when we asked.

        Until then the supervisor gets nothing: an agent restarted with an
        older log must not kill (as orphans) the processes that later entries,
        still on their way, want running.
        """
        raft = self.d.raft
        while True:
            try:
                if raft.is_leader:
                    await raft.read_barrier(timeout=5.0)
                    return
                if raft.leader_address:
                    stub = pb_grpc.ControlStub(self.d.channels.get(raft.leader_address))
                    reply = await stub.Status(pb.StatusRequest(), timeout=2.0)
                    deadline = time.monotonic() + 10.0
                    while raft.last_applied < reply.commit_index and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)
                    if raft.last_applied >= reply.commit_index:
                        return
            except (AgentdError, TimeoutError, grpc.aio.AioRpcError) as exc:
                log.debug("not caught up yet", extra=fields(node=self.d.node, error=str(exc)[:200]))
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        d = self.d
        await self.catch_up()
        if d.secure and not d.state.cluster_secret:
            # Model servers must start with their keys; the leader commits the secret right after its election.
            log.info("waiting for the cluster secret", extra=fields(node=d.node))
            while not d.state.cluster_secret:
                await asyncio.sleep(0.05)
        self.synced = True
        log.info("caught up with the cluster state", extra=fields(node=d.node, applied=d.raft.last_applied))
        try:
            await self._loop()
        finally:
            self.handoffs.close()

    async def _loop(self) -> None:
        d = self.d
        while True:
            self.now.clear()
            try:
                wanted = self.runnable(d.state.assignments_on(d.node))
                replaced = self.handoffs.keep(d.state, d.supervisor.assignments(),
                                              {a.instance_id for a in wanted})
                await d.supervisor.apply(wanted + replaced)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed", extra=fields(node=d.node))
            d.reporter.now.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_PERIOD):
                    await self.now.wait()

    def runnable(self, assignments: list[Assignment]) -> list[Assignment]:
        """What the supervisor gets: each assignment with its model server's key and this host's copy of its
        model. One whose model this host must hold but does not is held back while the model is fetched
        from a peer (reported FETCHING, or FATAL with the reason)."""
        fetcher = self.d.models.fetcher
        out, waiting = [], {}
        for a in assignments:
            local = self.localized(a)
            if local.model == a.model and "@sha256:" in a.model and self._needs_files(a):
                name, _, digest = a.model.partition("@")
                f = fetcher.ensure(name, digest)
                if f.state != "DONE" or not f.path:
                    waiting[a.instance_id] = (a, f)
                    continue
                self.model_paths[a.instance_id] = f.path  # fetched; the catalog will report it at its next scan
                local = a.model_copy(update={"model": f.path})
            out.append(self.keyed(local))
        self.fetching = waiting
        wanted = {f.digest for _, f in waiting.values()}
        for digest in [d for d in fetcher.fetches if d not in wanted]:
            fetcher.forget(digest)
        return out

    def _needs_files(self, a: Assignment) -> bool:
        roles = self.d.plugins.hook.agentd_model_file_roles(runtime=a.runtime)
        return any(p.host == self.d.node and (roles is None or p.role in roles) for p in a.plan.parts)

    def fetch_reports(self) -> list[InstanceReport]:
        """The parts held back while their model is fetched, as reports (FETCHING, or FATAL with the reason)."""
        node = self.d.node
        out = []
        for a, f in self.fetching.values():
            for idx, part in enumerate(a.plan.parts):
                if part.host != node:
                    continue
                ep = a.endpoints[idx]
                out.append(InstanceReport(
                    instance_id=a.instance_id, deployment=a.deployment, replica=a.replica, generation=a.generation,
                    part=idx, host=node, role=part.role, state="FATAL" if f.state == "FATAL" else "FETCHING",
                    reason=f.reason, endpoint=f"{ep.address}:{ep.port}", term=a.term, gpus=tuple(part.gpus)))
        return out

    def localized(self, a: Assignment) -> Assignment:
        """The assignment with a catalog model name (`NAME@sha256:DIGEST`) replaced by this host's copy.

        Once an instance has a path it keeps it, so a rescan (a file touched, a digest recomputed) never
        changes a running instance's assignment. Without a copy here the name stays, and the runtime says
        the model is not on this host.
        """
        ref = a.model
        if ref.startswith("/") or ref.startswith("hf:") or "@sha256:" not in ref:
            return a
        path = self.model_paths.get(a.instance_id)
        if path is None:
            inventory = self.d.refresher.latest
            copy = held_copy(inventory.models if inventory else (), ref)
            if copy is None:
                return a
            path = self.model_paths[a.instance_id] = copy.path
        live = {x.instance_id for x in self.d.state.assignments_on(self.d.node)}
        for gone in [k for k in self.model_paths if k not in live]:
            del self.model_paths[gone]
        return a.model_copy(update={"model": path})

    def keyed(self, a: Assignment) -> Assignment:
        """The assignment with its model server's key (never stored; every agent derives the same)."""
        state = self.d.state
        if not self.d.secure or not state.cluster_secret:
            return a
        secret = state.secret_for(a.instance_id)  # the previous secret for instances older than a rotation
        return a.model_copy(update={"api_key": apikeys.model_server_key(secret, a.instance_id)})
