"""The agent's composition root: builds the parts, starts them in order, and stops them in reverse.

One lifecycle (`Daemon.run`): every part that starts registers its own cleanup on an AsyncExitStack, so a
failure anywhere in start-up (a port in use, a locked Raft directory) stops exactly what had started and the
error reaches the caller; a normal stop unwinds the same stack. Start order, and so (reversed) stop order:

1. gRPC serves (Raft, Control, Agent, Models, health, reflection);
2. HTTP serves (the proxy, /metrics): before Raft, so a host that cannot serve HTTP never takes part in it;
3. Raft runs (this is where the data directory's lock is taken);
4. the supervisor's instances and model copies (on stop: drained if asked, else left running for the next
   start, which adopts them);
5. the loops: inventory, reporter, reconciler, coordinator tick, systemd, certificate renewal;
6. on stop: NOT_SERVING, and the drain decision.

The loops and the parts' jobs live beside this module: reporter.py, reconciler.py, models.py, http.py,
membership.py, renewer.py, systemd.py, logs.py, identity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentd import datadir
from agentd.agent.http import ClusterView, start_http
from agentd.agent.identity import NODE_CLAIMS, check_secure_addresses, tls_identity
from agentd.agent.logs import InstanceLogs
from agentd.agent.membership import Membership
from agentd.agent.models import ModelSharing
from agentd.agent.reconciler import Reconciler
from agentd.agent.renewer import CertificateRenewer
from agentd.agent.reporter import REPORT_INTERVAL, Reporter
from agentd.agent.systemd import Systemd
from agentd.api.control import AgentService, ChannelPool, ControlService, add_services
from agentd.api.drain import clear_drain_request, drain_decision
from agentd.api.ondemand import Activity
from agentd.api.report_stream import ReportStream
from agentd.api.security_service import JoinService, SecurityService, add_security_services
from agentd.cluster.clock import ClusterClock
from agentd.cluster.raft import RaftNode, RaftOptions
from agentd.cluster.raft.transport import CHANNEL_OPTIONS
from agentd.cluster.raft.types import Role
from agentd.cluster.relay import RelayChoice, ReportRelay  # issue16 relay
from agentd.cluster.report_timing import RelayTimings
from agentd.cluster.state import ClusterState, secret_init_command
from agentd.config import Settings
from agentd.coordinator import Coordinator, run_periodically
from agentd.errors import AgentdError, ConfigError, NotAvailable
from agentd.inventory import Collector, InventoryRefresher
from agentd.logs import fields
from agentd.metrics import Metrics
from agentd.modelinfo import inspect_model
from agentd.placement import Placer
from agentd.plugins import PluginManager
from agentd.runtime import Supervisor
from agentd.security import apikeys
from agentd.security.auth import AuthInterceptor
from agentd.security.ca import load_ca
from agentd.security.channel import channel_options
from agentd.security.files import private_dir, tighten_tree
from agentd.security.tls import (
    TlsIdentity,
    add_secure_ports,
    channel_credentials,
    warn_insecure,
)
from agentd.types import HostInventory
from agentd.v1 import control_pb2 as pb
from agentd.v1 import models_pb2 as mpb
from agentd.v1 import models_pb2_grpc as mpb_grpc
from agentd.v1 import security_pb2 as sec_pb
from agentd.version import AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, PeerVersion

log = logging.getLogger(__name__)
EXIT_RAFT_FAILED = 74  # EX_IOERR: Raft storage failed (or the Raft loop did); Restart=on-failure restarts

# The one seam for test-only code (docs/cluster.md, "Fault injection"): a module of agentd.testing whose
# `install(daemon, stack)` runs first in start-up. Unset in production, and nothing outside agentd.testing loads.
TEST_HOOKS_ENV = "AGENTD_TEST_HOOKS"


def load_test_hooks() -> Any:
    """The test hooks module `AGENTD_TEST_HOOKS` names, or None (always, in production)."""
    name = os.environ.get(TEST_HOOKS_ENV, "")
    if not name:
        return None
    if not name.startswith("agentd.testing."):
        raise ConfigError(f"{TEST_HOOKS_ENV}={name!r}: test hooks come from agentd.testing only")
    return importlib.import_module(name)


class Daemon:
    def __init__(self, settings: Settings, plugins: PluginManager | None = None):
        self.s = settings
        self.node = settings.node_name
        self.data_dir = Path(settings.data_dir)
        self.secure = not settings.insecure
        self.identity: TlsIdentity | None = None
        if self.secure:
            check_secure_addresses(settings)
            self.identity = tls_identity(settings)
        self.plugins = plugins or PluginManager.load(settings.plugins, settings.disable_plugins)
        self.state = ClusterState()
        self.metrics = Metrics(self.node)
        self.membership = Membership(self)
        self.reporter = Reporter(self)
        self.reconciler = Reconciler(self)
        self.view = ClusterView(self)
        self.auth: AuthInterceptor | None = None
        if self.secure:
            self.auth = AuthInterceptor(self.verify_bearer, bindings=NODE_CLAIMS,
                                        revoked=self.state.cert_revocation, is_member=self.membership.is_member,
                                        applied=lambda: self.raft.last_applied)
            self.state.subscribe(self._on_revocation)
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[self.auth] if self.auth else [])
        self.raft = RaftNode(self.node, settings.advertise_address, self.data_dir, self.state,
                             options=RaftOptions.from_settings(settings), join=settings.join, server=self.server)
        credentials = channel_credentials(self.identity) if self.identity is not None else None
        tls_options = channel_options() if self.identity is not None else []
        if credentials is not None:
            self.raft.transport.set_credentials(credentials, tls_options)
        self.channels = ChannelPool(options=[*CHANNEL_OPTIONS, *tls_options], credentials=credentials)
        self.supervisor = Supervisor(node=self.node, data_dir=self.data_dir, plugins=self.plugins,
                                     settings=settings, simulated_gpus=settings.simulate_inventory is not None,
                                     on_event=self._on_process_event)
        self.report_timings = RelayTimings.for_grace(settings.node_down_grace)  # issue16: timeouts from the grace
        self.coordinator = Coordinator(
            state=self.state, consensus=self.raft, place=Placer(self.plugins), inspect=inspect_model,
            validate_runtime=self.plugins.runtime, validate_spec=self.plugins.check_launch_options,
            port_range=settings.port_range,
            node_down_grace=settings.node_down_grace, report_interval=REPORT_INTERVAL,
            report_wait=2.5 * REPORT_INTERVAL + self.report_timings.jitter,
            idle_report_max_age=settings.idle_report_max_age, autoscale_up_after=settings.autoscale_up_after,
            autoscale_down_after=settings.autoscale_down_after, autoscale_cooldown=settings.autoscale_cooldown,
            scale_down_timeout=settings.scale_down_timeout)
        self.coordinator.on_placement = self._on_placement
        self.coordinator.on_scale = lambda model, direction, reason: self.metrics.scale_events.labels(
            model=model, direction=direction, reason=reason).inc()
        self.coordinator.on_replicas = self._on_replicas
        self.raft.admit = self.coordinator.admit  # nothing newer than every member supports enters the log
        self.raft.admit_joiner = self.membership.admit_joiner
        self.raft.can_watch = self.membership.can_watch
        self.raft.on_removed = lambda: not self.state.removed(self.node)  # `nodes rm` keeps it out altogether
        self.raft.on_watcher_joined = self.membership.watcher_joined
        self.logs = InstanceLogs(self.node, self.state, self.supervisor)
        self.control = ControlService(node_id=self.node, raft=self.raft, state=self.state,
                                      coordinator=self.coordinator, channels=self.channels,
                                      local_logs=self.logs.read)
        self.control.leader_format = lambda: self.reporter.leader_format
        self.control.local_instances = self.reporter.local_instances
        self.agent = AgentService(raft=self.raft, coordinator=self.coordinator, control=self.control)
        self.agent.invite = self.membership.invite
        self.agent.desk.on_inventory = lambda how: self.metrics.report_inventories.labels(how=how).inc()
        # Key and token expiry read the members' median clock, so one host's wrong clock moves no lifetime.
        self.wall = time.time  # this host's wall clock (a test hook may set it wrong)
        self.cluster_clock = ClusterClock(wall=lambda: self.wall())
        self.agent.clock = self.cluster_clock
        # issue16 relay: a voter relays its watchers' reports to the leader; a watcher reports through its voter
        self.relay = ReportRelay(self.node, self.raft, self.channels.get, timings=self.report_timings)
        self.agent.relay = self.relay
        self.relay_choice = RelayChoice(self.node, jitter=self.report_timings.jitter)
        self.security: SecurityService | None = None
        self.joins: JoinService | None = None
        if self.identity is not None:
            ca = load_ca(settings.tls_directory)  # with its key on signers, which answer joins
            self.security = SecurityService(node_id=self.node, raft=self.raft, state=self.state,
                                            channels=self.channels, ca_pin=ca.fingerprint, ca=ca,
                                            clock=self.cluster_clock.now)
            self.joins = JoinService(node_id=self.node, raft=self.raft, state=self.state, channels=self.channels,
                                     ca=ca, security=self.security, clock=self.cluster_clock.now)
        self.renewer = CertificateRenewer(self)
        # Which runtimes this host can run (the plugins' agentd_installed), asked once, in the refresher's
        # worker thread: the inventory reports them and placement keeps each runtime to hosts that have it.
        installed = functools.cache(lambda: self.plugins.installed_runtimes(settings))
        self.collector = Collector.from_settings(settings, owned_pids=self._owned_pids, runtimes=installed)
        self.refresher = InventoryRefresher(self.collector, settings.inventory_refresh, self._on_inventory)
        self.models = ModelSharing(self)  # copies of models between hosts (docs/models.md)
        self.systemd = Systemd(self)
        self._election_term = 0
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.raft.on_fatal = self._on_raft_fatal
        self.restarting = False
        self._drain = False  # stop this host's model servers on the way out (decided when the stop begins)
        self.activity = Activity(on_first=self.reporter.now.set)  # the /v1/ proxy's requests, for idle unload
        self.report_stream = ReportStream(self.node, settings.advertise_address,  # to the leader (reporter.py)
                                          timeout=self.report_timings.host_timeout)
        self._tasks: list[asyncio.Task] = []
        self._health = health.aio.HealthServicer()
        self._test_hooks = load_test_hooks()

    @property
    def synced(self) -> bool:
        """The local state has caught up with the leader's commit index once."""
        return self.reconciler.synced

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT/SIGUSR2 or a fatal Raft error, stop; returns the exit code.

        A failure while starting stops what had started, then propagates (the CLI prints it and exits
        non-zero)."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._start(stack)
                log.info("agent serving", extra=fields(node=self.node, listen=self.s.listen,
                                                        http=self.s.http_listen, data_dir=str(self.data_dir)))
                await self.stop_event.wait()
        except BaseException as exc:
            if not self.stop_event.is_set():
                log.error("agent could not start; stopped what had started",
                          extra=fields(node=self.node, error=f"{type(exc).__name__}: {exc}"))
            raise
        log.info("agent stopped", extra=fields(node=self.node))
        return self.exit_code

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        # What __init__ built and holds (sockets, NVML, the notify socket) is released last.
        stack.callback(self.systemd.notifier.close)
        stack.callback(self.collector.close)
        stack.push_async_callback(self.channels.close)
        if self._test_hooks is not None:
            await self._test_hooks.install(self, stack)
        self._private_files()
        if self.s.drain_on_stop:
            log.warning("drain_on_stop is deprecated: it is now called stop_models_on_exit (AGENTD_STOP_MODELS_ON_EXIT,"
                        " --stop-models-on-exit); 'agentd drain' moves a host's replicas elsewhere instead")
        for step in await asyncio.to_thread(datadir.prepare, self.data_dir):
            log.warning("upgraded the data directory", extra=fields(data_dir=str(self.data_dir), step=step))
        if self.s.insecure:
            warn_insecure(log)
        self._add_services()
        self.state.subscribe(lambda ev: self.reconciler.now.set())
        self.raft.subscribe(self._on_leader_change)
        for line in await self.supervisor.start():  # reads the records of what runs; nothing to undo yet
            log.debug(line)
        await self.server.start()
        stack.push_async_callback(self.server.stop, 1.0)
        runner = await start_http(self)
        stack.push_async_callback(runner.cleanup)
        await self.raft.start()
        stack.push_async_callback(self._stop_raft)
        stack.push_async_callback(self._stop_work)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self.stop_event.set), (signal.SIGINT, self.stop_event.set),
                             (signal.SIGUSR2, self._restart_signal)):
            loop.add_signal_handler(sig, handler)
            stack.callback(loop.remove_signal_handler, sig)
        stack.push_async_callback(self._stop_loops)
        if self.collector.catalog is not None:  # a finished digest is reported at once, not at the next refresh
            self.collector.catalog.on_digest = lambda: loop.call_soon_threadsafe(self.refresher.refresh_now)
        self.spawn(self.refresher.run(), "inventory")
        self.spawn(self.reporter.run(), "reporter")
        self.spawn(self.relay.run(), "report-relay")  # issue16 relay
        self.spawn(self.reconciler.run(), "reconciler")
        self.spawn(run_periodically(self.coordinator.tick, REPORT_INTERVAL, "coordinator-tick"), "tick")
        self.spawn(self.systemd.run(), "systemd")
        if self.identity is not None:
            self.spawn(self.renewer.run(), "cert-renewal")
        stack.push_async_callback(self._stopping)

    def _private_files(self) -> list[str]:
        """Create the data dir 0700; tighten what an older agentd left readable (the WAL holds the secret)."""
        private_dir(self.data_dir)
        changed = tighten_tree(self.data_dir)
        tls = self.s.tls_directory
        if tls.is_dir() and not tls.resolve().is_relative_to(self.data_dir.resolve()):
            changed += tighten_tree(tls)
        if changed:
            log.warning("tightened the modes of files agentd owns to owner-only",
                        extra=fields(count=len(changed), paths=changed[:20]))
        return changed

    def _add_services(self) -> None:
        """Every gRPC service on the server, and its listening ports (a port in use is a NotAvailable)."""
        add_services(self.server, self.control, self.agent)  # garbage requests get INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        services = [pb.DESCRIPTOR.services_by_name["Control"].full_name,
                    pb.DESCRIPTOR.services_by_name["Agent"].full_name,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        if self.security is not None and self.joins is not None:
            add_security_services(self.server, self.security, self.joins)
            services += [sec_pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Security", "Join")]
        mpb_grpc.add_ModelsServicer_to_server(self.models.service, self.server)
        services.append(mpb.DESCRIPTOR.services_by_name["Models"].full_name)
        reflection.enable_server_reflection(services, self.server)
        if self.identity is not None:
            add_secure_ports(self.server, self.identity, listen=self.s.listen,
                             token_listen=self.s.token_listen_address, current=lambda: self.identity)
            log.info("serving mutual TLS", extra=fields(node=self.node, listen=self.s.listen,
                                                        token_listen=self.s.token_listen_address,
                                                        signer=bool(self.joins and self.joins.signer)))
        elif not self.server.add_insecure_port(self.s.listen):
            raise NotAvailable(f"cannot listen on {self.s.listen} (in use?)")

    async def _stopping(self) -> None:
        """The first step of a stop: say so, and decide whether this host's model servers stop with it."""
        self._drain, why = drain_decision(self.data_dir, self.s.stops_models_on_exit, restarting=self.restarting)
        log.info(why, extra=fields(node=self.node))
        self.systemd.notifier.stopping(why)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _stop_loops(self) -> None:
        """Cancel every loop, and cancel again whatever is still running a second later: Python 3.11's
        wait_for and timeout() lose a cancellation that arrives just as what they wait for completes (a
        reconciler stopped while its catch-up barrier returned ran on, and the agent never exited)."""
        self.refresher.stop()
        pending = set(self._tasks)
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
            if pending:
                log.warning("cancelling again what ignored a cancellation", extra=fields(
                    node=self.node, tasks=sorted(t.get_name() for t in pending)))

    async def _stop_work(self) -> None:
        """Stop supervising (and stop the model servers if the stop drains) and copying models."""
        await self.supervisor.close(stop_processes=self._drain)
        await self.models.close()
        if self._drain:
            clear_drain_request(self.data_dir)

    async def _stop_raft(self) -> None:
        with contextlib.suppress(Exception):
            await self.raft.stop(graceful=True)

    def stop(self) -> None:
        """Ask `run` to stop (what SIGTERM does)."""
        self.stop_event.set()

    def _on_raft_fatal(self, reason: str) -> None:
        """A member that cannot persist must not go on as if it could: exit non-zero, and systemd restarts it.

        Until it has exited, /readyz says 503 with the reason and no API key is accepted here (this copy of
        the keys may miss a revocation it can no longer store). Its model servers keep running and are
        adopted on the next start. See docs/cluster.md, "A member that cannot persist".
        """
        self.exit_code = EXIT_RAFT_FAILED
        log.critical("this agent can no longer take part in the cluster; exiting so that the service manager "
                     "restarts it", extra=fields(node=self.node, reason=reason, exit_code=self.exit_code))
        self.stop_event.set()

    def _restart_signal(self) -> None:
        self.restarting = True
        self.stop_event.set()

    def spawn(self, coro: Any, name: str) -> None:
        """A background task of this agent, cancelled when it stops."""
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"agentd-{name}"))

    def _on_leader_change(self, change: Any) -> None:
        self.cluster_clock.leading = self.raft.is_leader
        self.cluster_clock.members = len(self.raft.members) or 1
        # Elections this agent started: one per term in which it stood (a leader always stood for its term; a
        # single voter goes from follower to leader in one step, never seen as a candidate).
        if self.raft.role in (Role.CANDIDATE, Role.LEADER) and change.term > self._election_term:
            self._election_term = change.term
            self.metrics.election_started()
        if change.is_leader:
            self.coordinator.became_leader()
            if self.secure and not self.state.cluster_secret:
                self.spawn(self._ensure_cluster_secret(), "cluster-secret")
        else:
            self.coordinator.lost_leadership()
        self.metrics.set_raft(term=change.term, commit_index=self.raft.commit_index,
                              applied_index=self.raft.last_applied, is_leader=change.is_leader,
                              leader=change.leader_id)
        log.info("leader changed", extra=fields(node=self.node, leader=change.leader_id, term=change.term,
                                                 is_leader=change.is_leader))
        self.reporter.now.set()

    async def _ensure_cluster_secret(self) -> None:
        """The new leader of a cluster without one commits the secret model server keys derive from."""
        while self.raft.is_leader and not self.state.cluster_secret:
            try:
                await self.raft.propose(secret_init_command(apikeys.new_cluster_secret(secrets.token_bytes)))
            except AgentdError as exc:
                log.info("cluster secret not committed yet; retrying", extra=fields(error=str(exc)))
                await asyncio.sleep(0.5)

    def _on_revocation(self, ev: Any) -> None:
        if ev.kind in ("cert.revoked", "key.revoked") and self.auth is not None:
            self.auth.close_revoked()
        elif ev.kind == "node.held" and ev.name == self.node:
            log.warning("this host gets no work until an admin approves it", extra=fields(
                node=self.node, hint=f"agentd nodes approve {self.node} [--tenant T]"))
        elif ev.kind == "node.approved" and ev.name == self.node:
            log.info("this host was approved", extra=fields(node=self.node, tenants=ev.data.get("tenants", [])))

    def verify_bearer(self, token: str) -> apikeys.Principal | None:
        if self.raft.fatal:  # its copy of the keys may lack a revocation it could not store
            return None
        return apikeys.verify_key(self.state.api_keys, token, now=self.cluster_clock.now())

    def _on_process_event(self, event: Any) -> None:
        self.reporter.now.set()
        if str(event.new) == "STARTING" and event.restarts:
            deployment = event.key.split("/", 1)[0].rsplit("-r", 1)[0]
            self.metrics.instance_restarted(deployment)

    def _on_inventory(self, inventory: HostInventory) -> None:
        self.reporter.now.set()

    def _on_placement(self, seconds: float, plan: Any) -> None:
        self.metrics.observe_placement(seconds, placed=plan.placed)
        if not plan.placed and plan.diagnosis is not None:
            self.metrics.count_unplaceable(r.reason for r in plan.diagnosis.reasons)

    def _on_replicas(self, model: str, desired: int, actual: int) -> None:
        self.metrics.replicas_desired.labels(model=model).set(desired)
        self.metrics.replicas_actual.labels(model=model).set(actual)

    def _owned_pids(self) -> set[int]:
        return {p.pid for st in self.supervisor.status() for p in st.processes if p.pid}

    def agent_version(self) -> PeerVersion:
        """What this agent says of itself in reports and Status (docs/versioning.md)."""
        return PeerVersion(AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, self.raft.upgrade_required)
