"""`agentd serve`: one agent, wired from the pieces.

Every host runs the same daemon. It serves gRPC (Raft, Control, Agent,
health, reflection) on `listen`, replicates the cluster state with Raft, and
runs its own instances through the runtime supervisor. Whichever agent leads
also runs the coordinator (placement, liveness, re-placement).

Loops, all on one asyncio event loop:

* inventory: NVML (or the simulated inventory) every `inventory_refresh`;
* reporter: inventory and instance states to the leader every second, and at
  once when the leader changes or an instance changes state;
* reconciler: after the local copy of the log has caught up with the leader,
  hands the supervisor this host's assignments whenever they change;
* coordinator tick (leader only): marks silent hosts down and re-places
  their replicas;
* systemd: READY=1 once serving and in the cluster, STATUS= lines, watchdog.

Security (docs/security.md): unless --insecure, the agent loads its node
certificate from `tls_dir`, serves mutual TLS on `listen` and TLS without a
client certificate on the token port, authorizes every call by role
(agentd.security.auth), dials its peers with its node certificate, answers
joins (signing them when it holds the CA key), checks /v1/ API keys against
the replicated state, and starts model servers with their own keys.

Nothing here decides placement or process handling; those live in
agentd.coordinator, agentd.placement and agentd.runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentd import datadir, formats
from agentd.api.control import AgentService, ChannelPool, ControlService, add_services, instance_from_pb
from agentd.api.drain import clear_drain_request, drain_decision
from agentd.api.fetch import Fetch, Fetcher, ModelsService
from agentd.api.http import HttpOptions, ModelCard, http_runner, make_http_app
from agentd.api.load import LoadBoard
from agentd.api.ondemand import Activity, Waker
from agentd.api.openai_proxy import Endpoint as ProxyEndpoint
from agentd.api.report_stream import ReportStream, StreamEnded
from agentd.api.sdnotify import SdNotifier, status_line, watchdog_interval
from agentd.api.security_service import JoinService, SecurityService, add_security_services
from agentd.catalog import held_copy
from agentd.cluster.clock import CLUSTER_TIME_METADATA, ClusterClock
from agentd.cluster.leadercall import LeaderMoved, unless_leader_moves
from agentd.cluster.raft import RaftNode, RaftOptions
from agentd.cluster.raft.transport import CHANNEL_OPTIONS
from agentd.cluster.raft.types import Role
from agentd.cluster.state import NODE_UP, ClusterState, node_command, secret_init_command
from agentd.config import Settings
from agentd.coordinator import Coordinator, InstanceReport, host_of, removed_message, run_periodically
from agentd.errors import AgentdError, ConfigError, InvalidInput, NotAvailable
from agentd.inventory import Collector, InventoryRefresher
from agentd.inventory.models import file_key
from agentd.logs import fields
from agentd.metrics import Metrics
from agentd.modelinfo import inspect_model
from agentd.placement import Placer
from agentd.plugins import PluginManager
from agentd.runtime import Endpoint, Supervisor, logfiles
from agentd.runtime.spec import InstanceStatus
from agentd.security import apikeys, renewal
from agentd.security.auth import AuthInterceptor
from agentd.security.ca import CA_CERT, ROLE_NODE, IssuedIdentity, load_ca, save_identity, sign_csr
from agentd.security.files import private_dir, tighten_tree
from agentd.security.tls import (
    TlsIdentity,
    add_secure_ports,
    channel_credentials,
    channel_options,
    http_ssl_context,
    load_identity,
    warn_insecure,
)
from agentd.types import Assignment, HeldModel, HostInventory
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc
from agentd.v1 import models_pb2 as mpb
from agentd.v1 import models_pb2_grpc as mpb_grpc
from agentd.v1 import raft_pb2 as raft_pb
from agentd.v1 import security_pb2 as sec_pb
from agentd.v1 import security_pb2_grpc as sec_pb_grpc
from agentd.version import AGENT_VERSION, BASELINE_STATE_FORMAT, STATE_FORMAT, WIRE_VERSION, PeerVersion

log = logging.getLogger(__name__)
EXIT_RAFT_FAILED = 74  # EX_IOERR: Raft storage failed (or the Raft loop did); Restart=on-failure restarts

REPORT_INTERVAL = 1.0
FAULT_FILE_ENV = "AGENTD_TEST_FAULT_FILE"  # tests only: JSON {"partition": [peer ids]} cuts Raft traffic
CLOCK_SKEW_ENV = "AGENTD_TEST_CLOCK_SKEW"  # tests only: seconds this agent's wall clock reads off (issue 14)
RECONCILE_PERIOD = 5.0  # re-apply even without a change: cheap, and heals a missed event
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


def _claim(message_cls: Any, field: str) -> Any:
    def claimed(raw: Any) -> str | None:
        try:
            return getattr(message_cls.FromString(raw), field) if isinstance(raw, bytes) else None
        except (DecodeError, ValueError):
            return None  # the handler answers garbage itself
    return claimed


# A peer's certificate name must match the node it speaks for in these calls (agentd.security.auth).
NODE_CLAIMS = {
    "/agentd.v1.Raft/Send": _claim(raft_pb.RaftMessage, "sender"),
    "/agentd.v1.Raft/Join": _claim(raft_pb.RaftJoinRequest, "node_id"),  # a host may not re-address another
    "/agentd.v1.Raft/Leave": _claim(raft_pb.RaftLeaveRequest, "node_id"),  # nor remove another
    "/agentd.v1.Agent/Report": _claim(pb.ReportRequest, "node"),
}


def tls_identity(settings: Settings) -> TlsIdentity:
    """This agent's node identity, or one line telling the operator how to get one."""
    directory = settings.tls_directory
    if not (directory / "node.crt").exists() or not (directory / CA_CERT).exists():
        raise NotAvailable(
            f"no TLS identity for this agent in {directory} (node.crt, node.key, ca.crt): on the first host run "
            "'agentd init-ca'; on the others 'agentd join --token TOKEN --server ADDR' (or 'agentd serve --join "
            "ADDR --token TOKEN'); or pass --insecure for a test rig without TLS")
    identity = load_identity(directory, "node")
    if identity.role != "node":
        raise ConfigError(f"{directory / 'node.crt'} carries the role {identity.role!r}, not 'node'")
    if identity.name != settings.node_name:
        raise ConfigError(f"{directory / 'node.crt'} is for node {identity.name!r} but this agent's node_name is "
                          f"{settings.node_name!r}: pass --node-name {identity.name}, or join again under this name")
    return identity


def check_secure_addresses(settings: Settings) -> None:
    """Model servers bind the advertised address; a wildcard would expose them on every interface."""
    host = host_of(settings.advertise_address)
    if host in ("0.0.0.0", "::", "*"):
        raise ConfigError(f"the advertised address {settings.advertise_address} is a wildcard: set advertise to "
                          "this host's internal address (peers dial it, and model servers bind to it)")


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
        self.auth: AuthInterceptor | None = None
        if self.secure:
            self.auth = AuthInterceptor(self._verify_bearer, bindings=NODE_CLAIMS,
                                        revoked=self.state.cert_revocation, is_member=self._is_member)
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
        self.coordinator = Coordinator(
            state=self.state, consensus=self.raft, place=Placer(self.plugins), inspect=inspect_model,
            validate_runtime=self.plugins.runtime, validate_spec=self.plugins.check_launch_options,
            port_range=settings.port_range,
            node_down_grace=settings.node_down_grace, report_interval=REPORT_INTERVAL,
            idle_report_max_age=settings.idle_report_max_age)
        self.coordinator.on_placement = self._on_placement
        self.raft.admit = self.coordinator.admit  # nothing newer than every member supports enters the log
        self.raft.admit_joiner = self._admit_joiner
        self.raft.can_watch = self._can_watch
        self.raft.on_removed = lambda: not self.state.removed(self.node)  # `nodes rm` keeps it out altogether
        self.raft.on_watcher_joined = self._watcher_joined
        self.control = ControlService(node_id=self.node, raft=self.raft, state=self.state,
                                      coordinator=self.coordinator, channels=self.channels,
                                      local_logs=self.local_logs)
        self.control.leader_format = lambda: self._leader_format
        self.control.local_instances = self.local_instances
        self.agent = AgentService(raft=self.raft, coordinator=self.coordinator, control=self.control)
        self.agent.invite = self._invite
        # Key and token expiry read the members' median clock, so one host's wrong clock moves no lifetime.
        skew = float(os.environ.get(CLOCK_SKEW_ENV) or 0)  # tests only: this agent's clock reads that far off
        self.cluster_clock = ClusterClock(wall=(lambda: time.time() + skew) if skew else time.time)
        self.agent.clock = self.cluster_clock
        self.security: SecurityService | None = None
        self.joins: JoinService | None = None
        if self.identity is not None:
            ca = load_ca(settings.tls_directory)  # with its key on signers, which answer joins
            self.security = SecurityService(node_id=self.node, raft=self.raft, state=self.state,
                                            channels=self.channels, ca_pin=ca.fingerprint, ca=ca,
                                            clock=self.cluster_clock.now)
            self.joins = JoinService(node_id=self.node, raft=self.raft, state=self.state, channels=self.channels,
                                     ca=ca, security=self.security, clock=self.cluster_clock.now)
        # Which runtimes this host can run (the plugins' agentd_installed), asked once, in the refresher's
        # worker thread: the inventory reports them and placement keeps each runtime to hosts that have it.
        installed = functools.cache(lambda: self.plugins.installed_runtimes(settings))
        self.collector = Collector.from_settings(settings, owned_pids=self._owned_pids, runtimes=installed)
        self.refresher = InventoryRefresher(self.collector, settings.inventory_refresh, self._on_inventory)
        # Copies of models between hosts (docs/models.md): served by digest, fetched before a part launches.
        self.models_service = ModelsService(models=self._held_models, locate=self._locate, users=self._model_users,
                                            removed=self._fetch_changed)
        self.fetcher = Fetcher(node=self.node, model_dir=settings.model_directories[0], channel=self.channels.get,
                               locate=self._locate_remote, on_file=self._fetched_file, on_change=self._fetch_changed,
                               concurrency=settings.model_fetch_concurrency, rate=settings.model_fetch_rate)
        self._fetching: dict[str, tuple[Assignment, Fetch]] = {}  # instance id -> its model's fetch
        self.watchdog = watchdog_interval()  # read before from_environ(unset=True) removes WATCHDOG_USEC
        self.notifier = SdNotifier.from_environ(unset=True)
        self._election_term = 0
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.raft.on_fatal = self._on_raft_fatal
        self.restarting = False
        self.synced = False  # the local state has caught up with the leader's commit index once
        self._leader_format = BASELINE_STATE_FORMAT  # the leader's state format, from its last report reply
        self._invited: tuple[str, float] | None = None  # the watcher asked to stand by in Raft, until when
        self._report_now = asyncio.Event()
        self.activity = Activity(on_first=self._report_now.set)  # the /v1/ proxy's requests, for idle unload
        self.report_stream = ReportStream(self.node, settings.advertise_address)  # to the leader, see _report_once
        self._reconcile_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http: web.AppRunner | None = None
        # (when, the state's last index then, instances): a follower's proxy asks the leader at most once a second,
        # and again as soon as the replicated state moved on (a drain promoted a successor, a wake placed one).
        self._routes_cache: tuple[float, int, list[InstanceReport]] = (0.0, 0, [])
        self._model_paths: dict[str, str] = {}  # instance id -> this host's copy of its catalog model (localized)
        self._last_known: dict[tuple[str, int], InstanceReport] = {}  # see _fill_gaps
        self._health = health.aio.HealthServicer()

    # ------------------------------------------------------------------ lifecycle

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

    async def run(self) -> int:
        self._private_files()
        if self.s.drain_on_stop:
            log.warning("drain_on_stop is deprecated: it is now called stop_models_on_exit (AGENTD_STOP_MODELS_ON_EXIT,"
                        " --stop-models-on-exit); 'agentd drain' moves a host's replicas elsewhere instead")
        for step in await asyncio.to_thread(datadir.prepare, self.data_dir):
            log.warning("upgraded the data directory", extra=fields(data_dir=str(self.data_dir), step=step))
        if self.s.insecure:
            warn_insecure(log)
        add_services(self.server, self.control, self.agent)  # garbage requests get INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        services = [pb.DESCRIPTOR.services_by_name["Control"].full_name,
                    pb.DESCRIPTOR.services_by_name["Agent"].full_name,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        if self.security is not None and self.joins is not None:
            add_security_services(self.server, self.security, self.joins)
            services += [sec_pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Security", "Join")]
        mpb_grpc.add_ModelsServicer_to_server(self.models_service, self.server)
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
        self.state.subscribe(lambda ev: self._reconcile_now.set())
        self.raft.subscribe(self._on_leader_change)
        for line in await self.supervisor.start():
            log.debug(line)
        await self.server.start()
        try:
            await self.raft.start()
        except BaseException:
            await self.server.stop(0)
            raise
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGUSR2, self._restart_signal)
        if self.collector.catalog is not None:  # a finished digest is reported at once, not at the next refresh
            self.collector.catalog.on_digest = lambda: loop.call_soon_threadsafe(self.refresher.refresh_now)
        self._spawn(self.refresher.run(), "inventory")
        self._spawn(self._reporter(), "reporter")
        self._spawn(self._reconciler(), "reconciler")
        self._spawn(run_periodically(self.coordinator.tick, REPORT_INTERVAL, "coordinator-tick"), "tick")
        self._spawn(self._systemd(), "systemd")
        if self.identity is not None:
            self._spawn(self._renewer(), "cert-renewal")
        if os.environ.get(FAULT_FILE_ENV):
            self._spawn(self._faults(Path(os.environ[FAULT_FILE_ENV])), "faults")
        await self._start_http()
        log.info("agent serving", extra=fields(node=self.node, listen=self.s.listen, http=self.s.http_listen,
                                                data_dir=str(self.data_dir)))
        await self.stop_event.wait()
        await self.shutdown()
        return self.exit_code

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

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"agentd-{name}"))

    async def shutdown(self) -> None:
        drain, why = drain_decision(self.data_dir, self.s.stops_models_on_exit, restarting=self.restarting)
        log.info(why, extra=fields(node=self.node))
        self.notifier.stopping(why)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.refresher.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.supervisor.close(stop_processes=drain)
        await self.fetcher.close()
        self.models_service.close()
        if drain:
            clear_drain_request(self.data_dir)
        with contextlib.suppress(Exception):
            await self.raft.stop(graceful=True)
        if self._http is not None:
            await self._http.cleanup()
        await self.server.stop(1.0)
        await self.channels.close()
        self.collector.close()
        self.notifier.close()
        log.info("agent stopped", extra=fields(node=self.node))

    # ------------------------------------------------------------------ events

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
                self._spawn(self._ensure_cluster_secret(), "cluster-secret")
        else:
            self.coordinator.lost_leadership()
        self.metrics.set_raft(term=change.term, commit_index=self.raft.commit_index,
                              applied_index=self.raft.last_applied, is_leader=change.is_leader,
                              leader=change.leader_id)
        log.info("leader changed", extra=fields(node=self.node, leader=change.leader_id, term=change.term,
                                                 is_leader=change.is_leader))
        self._report_now.set()

    async def _ensure_cluster_secret(self) -> None:
        """The new leader of a cluster without one commits the secret model server keys derive from."""
        while self.raft.is_leader and not self.state.cluster_secret:
            try:
                await self.raft.propose(secret_init_command(apikeys.new_cluster_secret(secrets.token_bytes)))
            except AgentdError as exc:
                log.info("cluster secret not committed yet; retrying", extra=fields(error=str(exc)))
                await asyncio.sleep(0.5)

    async def _renewer(self) -> None:
        """Renew this host's certificate through the cluster once a third of its lifetime is left
        (agentd/security/renewal.py); checked at start and hourly, retried every minute after a failure."""
        while True:
            delay = renewal.CHECK_INTERVAL
            try:
                await self._renew_certificate()
            except (AgentdError, grpc.aio.AioRpcError, OSError) as exc:
                log.warning("could not renew this host's certificate; retrying", extra=fields(error=str(exc)[:300]))
                delay = renewal.RETRY_INTERVAL
            await asyncio.sleep(delay)

    async def _renew_certificate(self) -> str:
        """Renew if due; returns the sentence logged ("" when not due)."""
        import datetime as dt

        assert self.identity is not None
        why = renewal.renewal_due(self.identity.cert_pem, dt.datetime.now(dt.UTC))
        if not why:
            return ""
        request = renewal.renewal_request(self.identity.cert_pem)
        if self.joins is not None and self.joins.signer:  # a signer renews itself
            cert = sign_csr(self.joins.ca, request.csr_pem, role=ROLE_NODE)
            ca_pem, signer = self.joins.ca.cert_pem, self.node
        else:
            cert, ca_pem, signer = await self._renew_through_cluster(request.csr_pem)
        await asyncio.to_thread(save_identity, self.s.tls_directory, "node",
                                IssuedIdentity(key_pem=request.key_pem, cert_pem=cert, ca_pem=ca_pem))
        identity = await asyncio.to_thread(load_identity, self.s.tls_directory, "node")  # checks chain and key
        self.identity = identity
        credentials = channel_credentials(identity)
        self.raft.transport.set_credentials(credentials, channel_options())
        old = self.channels.set_credentials(credentials)
        self._spawn(self._close_later(old), "close-old-channels")
        sentence = f"renewed this host's certificate: {why}"
        log.info(sentence, extra=fields(node=self.node, signer=signer))
        return sentence

    async def _renew_through_cluster(self, csr_pem: bytes) -> tuple[bytes, bytes, str]:
        """Ask the members, the leader first, until a signer renews (the others answer 'not a signer')."""
        own = getattr(self.raft.members.get(self.node), "address", None)
        order = [self.raft.leader_address or ""] + [getattr(m, "address", "") for _, m in
                                                    sorted(self.raft.members.items())]
        tried, last = set(), "no member is known yet"
        for address in order:
            if not address or address == own or address in tried:
                continue
            tried.add(address)
            stub = sec_pb_grpc.SecurityStub(self.channels.get(address))
            try:
                reply = await stub.RenewCertificate(sec_pb.RenewCertificateRequest(csr_pem=csr_pem), timeout=10.0)
                return reply.cert_pem, reply.ca_pem, reply.signer
            except grpc.aio.AioRpcError as exc:
                last = f"{address}: {exc.code().name}: {exc.details()}"
        raise NotAvailable(f"no signer renewed this host's certificate ({last})")

    async def _close_later(self, channels: list[Any], grace: float = 60.0) -> None:
        await asyncio.sleep(grace)  # calls in flight on the old channels finish first
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()

    def _is_member(self, name: str) -> bool | None:
        """Whether `name` is a member of the cluster, or None while this agent is in none (see AuthInterceptor).

        Members: Raft's (voters and learners), and hosts the replicated state knows and has not removed (a
        watcher, which follows the state outside Raft, once the leader recorded it)."""
        members, nodes = self.raft.members, self.state.nodes
        if self.node not in members and self.node not in nodes:
            return None
        if name in members:
            return True
        record = nodes.get(name)
        return record is not None and record.state != "removed"

    def _on_revocation(self, ev: Any) -> None:
        if ev.kind in ("cert.revoked", "key.revoked") and self.auth is not None:
            self.auth.close_revoked()
        elif ev.kind == "node.held" and ev.name == self.node:
            log.warning("this host gets no work until an admin approves it", extra=fields(
                node=self.node, hint=f"agentd nodes approve {self.node} [--tenant T]"))
        elif ev.kind == "node.approved" and ev.name == self.node:
            log.info("this host was approved", extra=fields(node=self.node, tenants=ev.data.get("tenants", [])))

    def _verify_bearer(self, token: str) -> apikeys.Principal | None:
        if self.raft.fatal:  # its copy of the keys may lack a revocation it could not store
            return None
        return apikeys.verify_key(self.state.api_keys, token, now=self.cluster_clock.now())

    def _runnable(self, assignments: list[Assignment]) -> list[Assignment]:
        """What the supervisor gets: each assignment with its model server's key and this host's copy of its
        model. One whose model this host must hold but does not is held back while the model is fetched
        from a peer (reported FETCHING, or FATAL with the reason)."""
        out, waiting = [], {}
        for a in assignments:
            local = self.localized(a)
            if local.model == a.model and "@sha256:" in a.model and self._needs_files(a):
                name, _, digest = a.model.partition("@")
                f = self.fetcher.ensure(name, digest)
                if f.state != "DONE" or not f.path:
                    waiting[a.instance_id] = (a, f)
                    continue
                self._model_paths[a.instance_id] = f.path  # fetched; the catalog will report it at its next scan
                local = a.model_copy(update={"model": f.path})
            out.append(self.keyed(local))
        self._fetching = waiting
        wanted = {f.digest for _, f in waiting.values()}
        for digest in [d for d in self.fetcher.fetches if d not in wanted]:
            self.fetcher.forget(digest)
        return out

    def _needs_files(self, a: Assignment) -> bool:
        roles = self.plugins.hook.agentd_model_file_roles(runtime=a.runtime)
        return any(p.host == self.node and (roles is None or p.role in roles) for p in a.plan.parts)

    def _fetch_reports(self) -> list[InstanceReport]:
        out = []
        for a, f in self._fetching.values():
            for idx, part in enumerate(a.plan.parts):
                if part.host != self.node:
                    continue
                ep = a.endpoints[idx]
                out.append(InstanceReport(
                    instance_id=a.instance_id, deployment=a.deployment, replica=a.replica, generation=a.generation,
                    part=idx, host=self.node, role=part.role, state="FATAL" if f.state == "FATAL" else "FETCHING",
                    reason=f.reason, endpoint=f"{ep.address}:{ep.port}", term=a.term, gpus=tuple(part.gpus)))
        return out

    def _model_users(self, copy: HeldModel) -> list[str]:
        """The deployments that use this copy: by digest (catalog names) or by its path (absolute paths)."""
        def uses(model: str) -> bool:
            return bool(copy.digest and model.endswith("@" + copy.digest)) or model.rstrip("/") == copy.path

        users = {name for name, rec in self.state.deployments.items() if uses(rec.spec.model)}
        return sorted(users | {a.deployment for a in self.state.incarnations() if uses(a.model)})

    def _held_models(self) -> tuple[HeldModel, ...]:
        inventory = self.refresher.latest
        return inventory.models if inventory is not None else ()

    async def _locate(self, digest: str, caller: str) -> tuple[HeldModel | None, list[tuple[str, str]]]:
        """A model's manifest and the live hosts with a complete copy (the leader's reports)."""
        if not self.raft.is_leader:
            model, holders = await self._locate_remote(digest)
            return model, [h for h in holders if h[0] != caller]
        live = {h.name for h in self.coordinator.live_hosts()}
        model, holders = None, []
        for name, rep in sorted(self.coordinator.reports.items()):
            copy = held_copy(rep.inventory.models, "@" + digest)
            if copy is None or name == caller or name not in live:
                continue
            model = model or copy
            holders.append((name, rep.inventory.address))
        return model, holders

    async def _locate_remote(self, digest: str) -> tuple[HeldModel, list[tuple[str, str]]]:
        if self.raft.is_leader:
            model, holders = await self._locate(digest, self.node)
            if model is None:
                raise LookupError(f"no live host reports a complete copy of {digest}")
            return model, holders
        if not self.raft.leader_address:
            raise LookupError("no leader to ask where the model is")
        stub = mpb_grpc.ModelsStub(self.channels.get(self.raft.leader_address))
        reply = await stub.Locate(mpb.LocateRequest(digest=digest), timeout=5.0)
        return HeldModel.model_validate_json(reply.model_json), [(h.host, h.address) for h in reply.holders]

    def _fetched_file(self, path: Path, sha256: str) -> None:
        """A fetched file was verified while written: its digest goes to the cache, so it is not hashed again."""
        catalog = self.collector.catalog
        if catalog is not None:
            with contextlib.suppress(OSError):
                catalog.hasher.cache.put(file_key(path), sha256)

    def _fetch_changed(self) -> None:
        self.refresher.refresh_now()
        self._reconcile_now.set()
        self._report_now.set()

    def localized(self, a: Assignment) -> Assignment:
        """The assignment with a catalog model name (`NAME@sha256:DIGEST`) replaced by this host's copy.

        Once an instance has a path it keeps it, so a rescan (a file touched, a digest recomputed) never
        changes a running instance's assignment. Without a copy here the name stays, and the runtime says
        the model is not on this host.
        """
        ref = a.model
        if ref.startswith("/") or ref.startswith("hf:") or "@sha256:" not in ref:
            return a
        path = self._model_paths.get(a.instance_id)
        if path is None:
            inventory = self.refresher.latest
            copy = held_copy(inventory.models if inventory else (), ref)
            if copy is None:
                return a
            path = self._model_paths[a.instance_id] = copy.path
        live = {x.instance_id for x in self.state.assignments_on(self.node)}
        for gone in [k for k in self._model_paths if k not in live]:
            del self._model_paths[gone]
        return a.model_copy(update={"model": path})

    def keyed(self, a: Assignment) -> Assignment:
        """The assignment with its model server's key (never stored; every agent derives the same)."""
        if not self.secure or not self.state.cluster_secret:
            return a
        secret = self.state.secret_for(a.instance_id)  # the previous secret for instances older than a rotation
        return a.model_copy(update={"api_key": apikeys.model_server_key(secret, a.instance_id)})

    def _on_process_event(self, event: Any) -> None:
        self._report_now.set()
        if str(event.new) == "STARTING" and event.restarts:
            deployment = event.key.split("/", 1)[0].rsplit("-r", 1)[0]
            self.metrics.instance_restarted(deployment)

    def _on_inventory(self, inventory: HostInventory) -> None:
        self._report_now.set()

    def _on_placement(self, seconds: float, plan: Any) -> None:
        self.metrics.observe_placement(seconds, placed=plan.placed)
        if not plan.placed and plan.diagnosis is not None:
            self.metrics.count_unplaceable(r.reason for r in plan.diagnosis.reasons)

    def _owned_pids(self) -> set[int]:
        return {p.pid for st in self.supervisor.status() for p in st.processes if p.pid}

    # ------------------------------------------------------------------ reporter

    def local_instances(self) -> list[InstanceReport]:
        wanted = {a.instance_id: a for a in self.state.assignments_on(self.node)}
        out: list[InstanceReport] = []
        for st in self.supervisor.status():
            a = wanted.get(st.instance_id)
            if a is not None:
                out += part_reports(self.node, st, a)
        return out + self._fetch_reports()

    async def _reporter(self) -> None:
        while True:
            self._report_now.clear()
            try:
                await self._report_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("report failed", extra=fields(node=self.node))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_INTERVAL):
                    await self._report_now.wait()
                await asyncio.sleep(0.05)  # coalesce a burst of changes into one report

    async def _report_once(self) -> None:
        inventory = self.refresher.latest
        if inventory is None:
            return
        instances = self.local_instances()
        self._update_local_metrics(inventory)
        me = self.agent_version()
        if self.raft.is_leader:
            self.report_stream.close()
            self.coordinator.on_activity(self.node, self.activity.snapshot())
            restarts = self.agent.accept_report(inventory, instances, me)  # it takes this host's peer restarts
        elif self.raft.leader_address:
            # Written for the leader's format: an older leader refuses fields it does not know (agentd.formats).
            inventory_json = json.dumps(formats.dump(inventory, self._leader_format))
            rows = [_instance_pb(i) for i in instances]
            address = self.raft.leader_address
            channel = self.channels.get(address)
            activity = [pb.ModelActivity(deployment=d, idle_seconds=idle, in_flight=n)
                        for d, (idle, n) in self.activity.snapshot().items()]
            try:
                if self.report_stream.unary(address):  # an agentd 0.1.0 leader: one Report call per report
                    req = pb.ReportRequest(node=self.node, address=self.s.advertise_address,
                                           inventory_json=inventory_json, instances=rows,
                                           agent_version=me.version, state_format=me.state_format,
                                           wire_version=me.wire_version, upgrade_required=me.upgrade_required,
                                           activity=activity)
                    call = pb_grpc.AgentStub(channel).Report(req, timeout=2.0,
                                                             metadata=self.cluster_clock.report_metadata())
                    reply = await unless_leader_moves(call, lambda: self.raft.leader_id)
                    self.cluster_clock.on_reply(await call.trailing_metadata())
                else:  # the stream to the leader: only what changed, else a renewal of this host's lease
                    reply = await unless_leader_moves(self.report_stream.send(
                        channel, address, inventory_json=inventory_json, instances=rows,
                        version=(me.version, me.state_format, me.wire_version, me.upgrade_required),
                        wall_time=time.time(), activity=activity), lambda: self.raft.leader_id)
                    if reply.cluster_time:
                        self.cluster_clock.on_reply(((CLUSTER_TIME_METADATA, repr(reply.cluster_time)),))
            except StreamEnded:
                self._report_now.set()  # the leader closed it: a new stream at once
                return
            except LeaderMoved:
                return  # the leader change asked for a report at once (_on_leader_change): it goes to the new one
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and self.report_stream.unary(address):
                    log.info("the leader has no report stream (agentd 0.1.0): reporting with Agent/Report",
                             extra=fields(leader=self.raft.leader_id))
                    self._report_now.set()
                    return
                level = logging.WARNING if exc.code() == grpc.StatusCode.FAILED_PRECONDITION else logging.DEBUG
                log.log(level, "report not accepted", extra=fields(leader=self.raft.leader_id,
                                                                   code=exc.code().name, error=exc.details()))
                return
            self._leader_format = reply.state_format or BASELINE_STATE_FORMAT
            if reply.join_raft and self.raft.watcher is not None:
                self._spawn(self.raft.become_member(), "become-member")
            restarts = [(r.address, r.port, r.reason) for r in reply.peer_restarts]
        else:
            return
        for address, port, reason in restarts:
            for line in self.supervisor.restart_dependents(Endpoint(host=address, port=port), reason):
                log.info(line, extra=fields(node=self.node))

    def _invite(self, name: str) -> bool:
        """On the leader: ask this watcher to stand by in Raft while the seats for voters and standby learners
        are not all taken (a voter was demoted, a learner removed). One at a time; hosts in zones and racks no
        voter covers yet first."""
        if self.s.voters or not self.raft.is_leader:
            return False
        members = self.raft.members
        # A demoted voter that is down keeps its membership (it comes back as a non-voter): count live seats.
        # Per member, not through every live host: this runs for each report, and live_hosts() walks (and
        # copies the labels of) every host in the cluster.
        if name in members or sum(map(self.coordinator.is_live, members)) >= \
                self.s.max_voters + self.s.standby_learners:
            return False
        pending = self._invited
        now = time.monotonic()
        if pending is not None and pending[1] > now and pending[0] not in members:
            return name == pending[0]
        voters = [self.coordinator.reports.get(m) for m, x in members.items() if getattr(x, "voter", False)]
        covered = {(r.inventory.labels.get("zone"), r.inventory.labels.get("rack")) for r in voters if r}
        candidates = []
        for host in self.coordinator.live_hosts():
            rep = self.coordinator.reports[host.name]
            if host.name in members or rep.agent.state_format < 2 or self.state.removed(host.name) \
                    or host.name in {c.host for c in self.state.cordons.values() if c.gpu is None}:
                continue
            spot = (host.labels.get("zone"), host.labels.get("rack"))
            candidates.append((spot in covered, host.name))
        if not candidates:
            return False
        chosen = min(candidates)[1]
        self._invited = (chosen, now + 30.0)
        return name == chosen

    def _can_watch(self, name: str) -> bool:
        """A member that runs a release with watchers (0.2.0 and later) may leave Raft to watch."""
        rep = self.coordinator.reports.get(name)
        return rep is not None and rep.agent.state_format >= 2

    async def _watcher_joined(self, name: str, address: str) -> None:
        """Record a new watcher as a host of the cluster, so that every voter accepts its calls at once."""
        node = self.state.nodes.get(name)
        if node is None or node.state != NODE_UP:
            with contextlib.suppress(AgentdError):
                await self.raft.propose(node_command(name, NODE_UP, address))

    def _admit_joiner(self, node_id: str, state_format: int) -> str:
        if self.state.removed(node_id):
            return removed_message(node_id)
        if state_format < self.state.cluster_format:
            return (f"the cluster writes state format {self.state.cluster_format} and the joiner applies formats "
                    f"up to {state_format}: install this cluster's release (agentd {AGENT_VERSION}) on it")
        return ""

    def agent_version(self) -> PeerVersion:
        """What this agent says of itself in reports and Status (docs/versioning.md)."""
        return PeerVersion(AGENT_VERSION, STATE_FORMAT, WIRE_VERSION, self.raft.upgrade_required)

    def _update_local_metrics(self, inventory: HostInventory) -> None:
        assigned: dict[str, int] = {}
        for a in self.state.assignments_on(self.node):
            for part in a.plan.parts:
                if part.host != self.node:
                    continue
                for g, planned in zip(part.gpus, part.memory, strict=False):
                    uuid = next((x.uuid for x in inventory.gpus if x.index == g), str(g))
                    assigned[uuid] = assigned.get(uuid, 0) + planned
        self.metrics.set_gpus(self.node, inventory.gpus, assigned)
        counts: dict[str, int] = {}
        for st in self.supervisor.status():
            counts[st.state.lower()] = counts.get(st.state.lower(), 0) + 1
        self.metrics.set_instance_states(counts)
        self.metrics.set_raft(term=self.raft.term, commit_index=self.raft.commit_index,
                              applied_index=self.raft.last_applied, is_leader=self.raft.is_leader,
                              leader=self.raft.leader_id)

    # ------------------------------------------------------------------ reconciler

    async def _catch_up(self) -> None:
        """Wait until the local state holds everything the leader had committed when we asked.

        Until then the supervisor gets nothing: an agent restarted with an
        older log must not kill (as orphans) the processes that later entries,
        still on their way, want running.
        """
        while True:
            try:
                if self.raft.is_leader:
                    await self.raft.read_barrier(timeout=5.0)
                    return
                if self.raft.leader_address:
                    stub = pb_grpc.ControlStub(self.channels.get(self.raft.leader_address))
                    reply = await stub.Status(pb.StatusRequest(), timeout=2.0)
                    deadline = time.monotonic() + 10.0
                    while self.raft.last_applied < reply.commit_index and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)
                    if self.raft.last_applied >= reply.commit_index:
                        return
            except (AgentdError, TimeoutError, grpc.aio.AioRpcError) as exc:
                log.debug("not caught up yet", extra=fields(node=self.node, error=str(exc)[:200]))
            await asyncio.sleep(0.1)

    async def _reconciler(self) -> None:
        await self._catch_up()
        if self.secure and not self.state.cluster_secret:
            # Model servers must start with their keys; the leader commits the secret right after its election.
            log.info("waiting for the cluster secret", extra=fields(node=self.node))
            while not self.state.cluster_secret:
                await asyncio.sleep(0.05)
        self.synced = True
        log.info("caught up with the cluster state", extra=fields(node=self.node, applied=self.raft.last_applied))
        while True:
            self._reconcile_now.clear()
            try:
                await self.supervisor.apply(self._runnable(self.state.assignments_on(self.node)))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed", extra=fields(node=self.node))
            self._report_now.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_PERIOD):
                    await self._reconcile_now.wait()

    # ------------------------------------------------------------------ logs

    async def local_logs(self, request: pb.LogsRequest) -> AsyncIterator[bytes]:
        """An instance part's log on this host: the current run, or the previous one."""
        a = self._assignment(request.instance_id)
        part = request.part
        if part < 0:
            part = next((i for i, p in enumerate(a.plan.parts) if p.role == "main"), 0)
        st = self.supervisor.instance(a.instance_id)
        procs = [p for p in (st.processes if st else ()) if p.part_index == part]
        if not procs:
            raise InvalidInput(f"{a.instance_id} part {part} has no process on {self.node}")
        runs = self.supervisor.log_files(a.instance_id, procs[0].name)
        index = 1 if request.previous else 0
        if len(runs) <= index or not runs[index].exists():
            raise InvalidInput(f"{a.instance_id} part {part} has no {'previous ' if request.previous else ''}log")
        path = runs[index]
        if request.tail_lines > 0:
            lines = logfiles.tail(path, request.tail_lines)
            yield ("\n".join(lines) + "\n").encode() if lines else b""
            if request.follow:
                async for chunk in logfiles.follow(path, from_start=False):
                    yield chunk
            return
        if request.follow and not request.previous:
            async for chunk in logfiles.follow(path):
                yield chunk
            return
        with open(path, "rb") as f:
            while chunk := f.read(65536):
                yield chunk

    def _assignment(self, instance_id: str) -> Any:
        for a in self.state.incarnations():
            if instance_id in (a.instance_id, f"{a.deployment}-r{a.replica}"):
                return a
        raise InvalidInput(f"no instance {instance_id!r}")

    # ------------------------------------------------------------------ HTTP side

    async def _start_http(self) -> None:
        options = HttpOptions(require_api_key=not self.s.insecure, connect_timeout=self.s.proxy_connect_timeout,
                              read_timeout=self.s.proxy_read_timeout, max_body=self.s.http_max_body,
                              header_timeout=self.s.http_header_timeout)
        provider = _Provider(self)
        waker = Waker(wake=provider.wake, ready=provider.has_ready, timeout=self.s.wake_timeout,
                      queue=self.s.wake_queue, metrics=self.metrics)
        hook = self.plugins.pm.hook
        board = LoadBoard(path=lambda runtime: hook.agentd_load_path(runtime=runtime),
                          read=lambda runtime, status, body: hook.agentd_read_load(runtime=runtime, status=status,
                                                                                   body=body))
        app = make_http_app(provider, metrics=self.metrics, options=options, waker=waker, activity=self.activity,
                            board=board)
        self._http = http_runner(app, options, access_log=None)
        await self._http.setup()
        host, _, port = self.s.http_listen.rpartition(":")
        ssl_context = None
        if self.s.http_tls_cert is not None and self.s.http_tls_key is not None:
            ssl_context = http_ssl_context(self.s.http_tls_cert, self.s.http_tls_key)
        site = web.TCPSite(self._http, host.strip("[]"), int(port), ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise NotAvailable(f"cannot listen on {self.s.http_listen} for HTTP: {exc.strerror}") from None

    async def cluster_instances(self) -> list[InstanceReport]:
        """Every instance's state for the proxy: the leader's reports (cached for a second on other agents),
        with the gaps filled (`_fill_gaps`)."""
        if self.raft.is_leader:
            return self._fill_gaps(self.coordinator.instances())
        at, index, cached = self._routes_cache
        if time.monotonic() - at < 1.0 and index == self.state.last_index:
            return cached
        if not self.raft.leader_address:
            return cached
        stub = pb_grpc.ControlStub(self.channels.get(self.raft.leader_address))
        try:
            reply = await stub.ListInstances(pb.ListInstancesRequest(reported_only=True), timeout=2.0)
        except grpc.aio.AioRpcError:
            return cached
        out = self._fill_gaps([instance_from_pb(i) for i in reply.instances])
        self._routes_cache = (time.monotonic(), self.state.last_index, out)
        return out

    def _fill_gaps(self, reported: list[InstanceReport]) -> list[InstanceReport]:
        """The leader's reports, plus what this agent last knew of parts the leader has no report of.

        A new leader has heard no host yet, and an agent being restarted (`systemctl restart`, an upgrade)
        reports nothing for a few seconds, while its model servers run on and are adopted: without this, the
        proxy would answer 503 for their replicas meanwhile (tests/test_rolling_restart.py). A part keeps its
        last known state until its host reports again or is marked down (then its replica is re-placed under
        a new instance id); this host's own parts come from its supervisor. A replica that really died is
        refused at connect and the proxy tries the next one.
        """
        known = {(i.instance_id, i.part): i for i in reported}
        for i in self.local_instances():
            known.setdefault((i.instance_id, i.part), i)
        for key, i in self._last_known.items():
            node = self.state.nodes.get(i.host)
            now = known.get(key)
            if now is None and (node is None or node.state == "up"):
                known[key] = i
            elif (now is not None and now.state == "STARTING" and i.state == "RUNNING" and now.pid
                  and now.pid == i.pid):
                known[key] = i  # the same process, adopted by its restarted agent, which has not probed it yet
        current = {a.instance_id for a in self.state.incarnations()}
        self._last_known = {k: i for k, i in known.items() if i.instance_id in current}
        return list(self._last_known.values())

    async def _faults(self, path: Path) -> None:
        """Fault injection for cluster tests: follow `path` and cut Raft traffic to the peers it names.

        Only with AGENTD_TEST_FAULT_FILE set (never in a unit file). The cut is
        in this process's Raft transport, both directions, so a test can make
        a minority side without root or network namespaces.
        """
        log.warning("fault injection enabled", extra=fields(node=self.node, file=str(path)))
        current: tuple[str, ...] = ()
        while True:
            try:
                data = json.loads(path.read_text()) if path.exists() else {}
                peers = tuple(sorted(str(p) for p in data.get("partition", [])))
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                log.warning("unreadable fault file", extra=fields(file=str(path), error=str(exc)))
                peers = current
            if peers != current:
                log.warning("fault injection: partition", extra=fields(node=self.node, peers=list(peers)))
                self.raft.set_partition(peers)
                current = peers
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ systemd

    async def _systemd(self) -> None:
        """READY=1 once gRPC serves (it does before this loop starts) and the agent is in the cluster and caught
        up; STATUS= lines; EXTEND_TIMEOUT_USEC= while it catches up on a long log; WATCHDOG=1 from the loop."""
        interval = self.watchdog
        ready_sent = False
        applied = self.raft.last_applied
        while True:
            if not ready_sent and self.raft.leader_id and self.synced:
                self.notifier.ready(self._status_text())
                ready_sent = True
                log.info("told systemd we are ready", extra=fields(node=self.node, enabled=self.notifier.enabled))
            elif ready_sent:
                self.notifier.status(self._status_text())
            else:
                waiting = ("waiting for a leader" if not self.raft.leader_id
                           else f"catching up with the cluster state (applied {self.raft.last_applied})")
                self.notifier.status(waiting)
                if self.raft.last_applied > applied:  # progress: do not let TimeoutStartSec cut a long catch-up
                    self.notifier.extend_timeout(30.0)
                applied = self.raft.last_applied
            if interval:
                self.notifier.watchdog()
            period = min(interval / 2 if interval else 2.0, 2.0)
            await asyncio.sleep(period if ready_sent else min(period, 0.1))  # READY promptly once in

    def _status_text(self) -> str:
        sts = self.supervisor.status()
        return status_line(leader=self.raft.leader_id, term=self.raft.term,
                           instances_running=sum(1 for s in sts if s.state == "RUNNING"),
                           instances_total=len(sts))


class _Provider:
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
        for i in await self.d.cluster_instances():
            if i.deployment == model:
                by_replica.setdefault(i.instance_id, []).append(i)
        out, unheard = [], []
        for a in self.d.state.incarnations_for(model):  # a drain's surge serves as soon as it is ready
            parts = by_replica.get(a.instance_id, [])
            main = next((i for i, p in enumerate(a.plan.parts) if p.role == "main"), 0)
            ep = a.endpoints[main]
            ready = len(parts) == len(a.plan.parts) and all(p.state == "RUNNING" for p in parts)
            out.append(ProxyEndpoint(url=f"http://{_url_host(ep.address)}:{ep.port}",
                                     api_key=self.d.keyed(a).api_key or None, ready=ready,
                                     instance_id=a.instance_id, runtime=a.runtime))
            if not parts and all(getattr(self.d.state.nodes.get(p.host), "state", "up") == "up" for p in a.plan.parts):
                unheard.append(out[-1])
        if unheard and not any(e.ready for e in out):
            # Nothing is known ready, and these replicas are simply unheard of: a new leader that has not heard
            # their hosts yet (one may be restarting, its model servers running on), an agent that never asked.
            # Try them rather than answer 503: a refused connection moves the proxy on to the next replica.
            out = [dataclasses.replace(e, ready=True) if e in unheard else e for e in out]
        return out

    async def models(self) -> Sequence[ModelCard]:
        instances = await self.d.cluster_instances()
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
            self.d._routes_cache = (0.0, 0, self.d._routes_cache[2])
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
        return self.d._verify_bearer(key)


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _instance_pb(i: InstanceReport) -> pb.Instance:
    from agentd.api.control import instance_to_pb

    return instance_to_pb(i)


def join_with_token(settings: Settings) -> Settings:
    """`serve --join ADDR --token TOKEN` on a host without a certificate: get one first.

    Returns the settings with the members' addresses (from the signer's
    answer) added in front of --join, so the Raft join goes to peer ports.
    """
    from agentd.api.join_client import join_cluster, node_addresses

    result = join_cluster(settings.join_token.get_secret_value(), settings.join, tls_dir=settings.tls_directory,
                          node_name=settings.node_name, addresses=node_addresses(settings))
    join = list(dict.fromkeys([*result.peers, *settings.join]))
    log.info("joined with a token; joining the cluster", extra=fields(node=settings.node_name, signer=result.signer,
                                                                      peers=list(result.peers)))
    return settings.model_copy(update={"join": join})


def run_daemon(settings: Settings) -> int:
    """Run one agent until SIGTERM/SIGINT (or SIGUSR2, for a restart). Returns the exit code."""
    async def main() -> int:
        s = settings
        if not s.insecure and s.join_token.get_secret_value() and not (s.tls_directory / "node.crt").exists():
            s = await asyncio.to_thread(join_with_token, s)
        return await Daemon(s).run()  # built inside the loop: grpc.aio and asyncio objects bind to it

    os.umask(0o077)  # what agentd and its model servers create is the agentd user's alone, whatever the caller's umask

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
