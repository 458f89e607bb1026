"""The agent's HTTP side: the OpenAI-compatible proxy, /metrics and health (agentd.api.http), and what that app
asks this agent (`Provider`): routes, model cards, readiness, wakes, API keys."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from aiohttp import web

from agentd.api.control import instance_from_pb
from agentd.api.http import HttpOptions, ModelCard, http_runner, make_http_app
from agentd.api.load import LoadBoard
from agentd.api.ondemand import Waker
from agentd.api.openai_proxy import Endpoint as ProxyEndpoint
from agentd.coordinator import InstanceReport
from agentd.errors import NotAvailable
from agentd.security import apikeys
from agentd.security.tls import http_ssl_context
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon


async def start_http(d: Daemon) -> web.AppRunner:
    """Serve HTTP on `http_listen`; the runner is the caller's to clean up. A port in use is a NotAvailable
    that names it (nothing is left set up)."""
    s = d.s
    options = HttpOptions.from_settings(s)  # issue21 proxy: with the saturation and affinity settings
    provider = Provider(d)
    waker = Waker(wake=provider.wake, ready=provider.has_ready, timeout=s.wake_timeout,
                  queue=s.wake_queue, metrics=d.metrics)
    hook = d.plugins.pm.hook
    board = LoadBoard(path=lambda runtime: hook.agentd_load_path(runtime=runtime),
                      read=lambda runtime, status, body: hook.agentd_read_load(runtime=runtime, status=status,
                                                                               body=body))
    app = make_http_app(provider, metrics=d.metrics, options=options, waker=waker, activity=d.activity,
                        board=board)
    runner = http_runner(app, options, access_log=None)
    await runner.setup()
    host, _, port = s.http_listen.rpartition(":")
    ssl_context = None
    if s.http_tls_cert is not None and s.http_tls_key is not None:
        ssl_context = http_ssl_context(s.http_tls_cert, s.http_tls_key)
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise NotAvailable(f"cannot listen on {s.http_listen} for HTTP: {exc.strerror}") from None
    return runner


class ClusterView:
    """Every instance's state as the proxy sees it (see `instances`)."""

    def __init__(self, d: Daemon):
        self.d = d
        # (when, the state's last index then, instances): a follower's proxy asks the leader at most once a second,
        # and again as soon as the replicated state moved on (a drain promoted a successor, a wake placed one).
        self.routes_cache: tuple[float, int, list[InstanceReport]] = (0.0, 0, [])
        self.last_known: dict[tuple[str, int], InstanceReport] = {}  # see fill_gaps

    def forget(self) -> None:
        """The next `instances` asks the leader afresh."""
        self.routes_cache = (0.0, 0, self.routes_cache[2])

    async def instances(self) -> list[InstanceReport]:
        """Every instance's state for the proxy: the leader's reports (cached for a second on other agents),
        with the gaps filled (`fill_gaps`)."""
        if self.d.raft.is_leader:
            return self.fill_gaps(self.d.coordinator.instances())
        at, index, cached = self.routes_cache
        if time.monotonic() - at < 1.0 and index == self.d.state.last_index:
            return cached
        if not self.d.raft.leader_address:
            return cached
        stub = pb_grpc.ControlStub(self.d.channels.get(self.d.raft.leader_address))
        try:
            reply = await stub.ListInstances(pb.ListInstancesRequest(reported_only=True), timeout=2.0)
        except grpc.aio.AioRpcError:
            return cached
        out = self.fill_gaps([instance_from_pb(i) for i in reply.instances])
        self.routes_cache = (time.monotonic(), self.d.state.last_index, out)
        return out

    def fill_gaps(self, reported: list[InstanceReport]) -> list[InstanceReport]:
        """The leader's reports, plus what this agent last knew of parts the leader has no report of.

        A new leader has heard no host yet, and an agent being restarted (`systemctl restart`, an upgrade)
        reports nothing for a few seconds, while its model servers run on and are adopted: without this, the
        proxy would answer 503 for their replicas meanwhile (tests/test_rolling_restart.py). A part keeps its
        last known state until its host reports again or is marked down (then its replica is re-placed under
        a new instance id); this host's own parts come from its supervisor. A replica that really died is
        refused at connect and the proxy tries the next one.
        """
        known = {(i.instance_id, i.part): i for i in reported}
        for i in self.d.reporter.local_instances():
            known.setdefault((i.instance_id, i.part), i)
        for key, i in self.last_known.items():
            node = self.d.state.nodes.get(i.host)
            now = known.get(key)
            if now is None and (node is None or node.state == "up"):
                known[key] = i
            elif (now is not None and now.state == "STARTING" and i.state == "RUNNING" and now.pid
                  and now.pid == i.pid):
                known[key] = i  # the same process, adopted by its restarted agent, which has not probed it yet
        current = {a.instance_id for a in self.d.state.incarnations()}
        self.last_known = {k: i for k, i in known.items() if i.instance_id in current}
        return list(self.last_known.values())


class Provider:
    """What the HTTP app asks the daemon (agentd.api.http.HttpProvider)."""

    def __init__(self, d: Daemon):
        self.d = d
        self.metrics_registry = d.metrics.registry

    def alive(self) -> bool:
        return not self.d.stop_event.is_set()

    def ready(self) -> tuple[bool, str]:
        if self.d.raft.fatal:
            return False, f"stopped, exiting: {self.d.raft.fatal}"
        if self.d.raft.upgrade_required:
            return False, f"needs an upgrade: {self.d.raft.upgrade_required}"
        if not self.d.raft.leader_id:
            return False, "no leader elected"
        if not self.d.synced:
            return False, "catching up with the cluster state"
        return True, f"leader {self.d.raft.leader_id}, term {self.d.raft.term}"

    async def routes(self, model: str) -> Sequence[ProxyEndpoint]:
        record = self.d.state.deployment(model)
        if record is None:
            return []
        by_replica: dict[str, list[InstanceReport]] = {}
        for i in await self.d.view.instances():
            if i.deployment == model:
                by_replica.setdefault(i.instance_id, []).append(i)
        out, unheard, leaving = [], [], []
        for a in self.d.state.incarnations_for(model):  # a drain's surge serves as soon as it is ready
            parts = by_replica.get(a.instance_id, [])
            main = next((i for i, p in enumerate(a.plan.parts) if p.role == "main"), 0)
            ep = a.endpoints[main]
            ready = len(parts) == len(a.plan.parts) and all(p.state == "RUNNING" for p in parts)
            if ready and self.d.state.is_leaving(a):  # being scaled down: new requests go to the others
                leaving.append(a.instance_id)
            out.append(ProxyEndpoint(url=f"http://{url_host(ep.address)}:{ep.port}",
                                     api_key=self.d.reconciler.keyed(a).api_key or None, ready=ready,
                                     instance_id=a.instance_id, runtime=a.runtime))
            if not parts and all(getattr(self.d.state.nodes.get(p.host), "state", "up") == "up" for p in a.plan.parts):
                unheard.append(out[-1])
        if unheard and not any(e.ready for e in out):
            # Nothing is known ready, and these replicas are simply unheard of: a new leader that has not heard
            # their hosts yet (one may be restarting, its model servers running on), an agent that never asked.
            # Try them rather than answer 503: a refused connection moves the proxy on to the next replica.
            out = [dataclasses.replace(e, ready=True) if e in unheard else e for e in out]
        if leaving and any(e.ready and e.instance_id not in leaving for e in out):
            out = [dataclasses.replace(e, ready=False) if e.instance_id in leaving else e for e in out]
        return out

    async def models(self) -> Sequence[ModelCard]:
        instances = await self.d.view.instances()
        cards = []
        for name, record in sorted(self.d.state.deployments.items()):
            assignments = self.d.state.assignments_for(name)
            running = {(i.instance_id, i.part) for i in instances if i.deployment == name and i.state == "RUNNING"}
            ready = sum(1 for a in assignments if all((a.instance_id, k) in running for k in range(len(a.plan.parts))))
            cards.append(ModelCard(id=name, tenant=record.spec.tenant, runtime=record.spec.runtime,
                                   replicas=record.spec.replicas, ready_replicas=ready,
                                   on_demand=record.spec.idle_unload > 0, idle=name in self.d.state.idle))
        return cards

    async def has_ready(self, model: str) -> bool:
        """A replica of `model` reported RUNNING in every part (what the held requests of a wake wait for).

        Asked of the leader afresh, not from the proxy's one-second cache: held requests go out as soon as the
        leader has heard the replica is ready (one call per poll while requests are held)."""
        if not self.d.raft.is_leader:
            self.d.view.forget()
        return any(c.id == model and c.ready_replicas for c in await self.models())

    async def wake(self, model: str) -> None:
        """Ask the coordinator to place an IDLE deployment again (here when this agent leads)."""
        if self.d.raft.is_leader:
            await self.d.coordinator.wake(model)
            return
        if not self.d.raft.leader_address:
            raise NotAvailable("no leader elected yet")
        stub = pb_grpc.ControlStub(self.d.channels.get(self.d.raft.leader_address))
        try:
            await stub.Wake(pb.WakeRequest(name=model), timeout=self.d.s.wake_timeout)
        except grpc.aio.AioRpcError as exc:
            raise NotAvailable(f"the leader ({self.d.raft.leader_id}) could not wake {model}: "
                               f"{exc.code().name}: {exc.details()}") from None

    def verify_api_key(self, key: str) -> apikeys.Principal | None:
        """Against this agent's own copy of the replicated keys, on every request: a revocation is in force
        here as soon as this agent applies it."""
        return self.d.verify_bearer(key)


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
