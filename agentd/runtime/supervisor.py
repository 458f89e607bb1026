"""The per-host supervisor: converge the processes on this host to the desired assignments.

The daemon hands it the assignments that name this host (`apply`), whenever
they change. For each new instance the runtime plugin's `agentd_launch` hook
turns each local part into process specs; one runner per process then walks
the state machine of agentd.runtime.states: wait for dependencies and free
ports, spawn, probe readiness, watch liveness, back off and restart, stop.
Instances no longer desired are stopped as whole trees.

Ordering inside an instance comes from endpoints, not names: a spec that
`wait_for`s an endpoint another local spec `listen`s on depends on it. It
starts only once that one is RUNNING, and is restarted after it whenever the
dependency exits or is spawned anew (a llama-server cannot survive the
restart of one of its rpc-servers). Endpoints on other hosts must accept a
TCP connection before the launch; their restarts are reported by the daemon
through `restart_dependents`.

agentd itself may die at any time. Every spawned process is recorded on disk
(agentd.runtime.records) and survives agentd; `start()` finds the survivors,
and the first `apply()` adopts those its desired state still wants and kills
the rest. Nothing is killed before the desired state is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentd.errors import AgentdError, RuntimeFailure
from agentd.logs import fields
from agentd.runtime import guard, logfiles
from agentd.runtime.backoff import Backoff, BackoffPolicy
from agentd.runtime.gpu import verify_gpu_release
from agentd.runtime.health import Liveness, default_verdict, probe_tcp, run_probe
from agentd.runtime.offloop import call_off_loop, on_loop
from agentd.runtime.ports import PortAllocator, PortInUse, check_free
from agentd.runtime.process import BinaryNotUsable, ProcessHandle, adopt, is_same_process, spawn, stop_tree
from agentd.runtime.records import ProcessRecord, RecordStore, fingerprint
from agentd.runtime.spec import (
    Endpoint,
    HealthVerdict,
    InstanceStatus,
    LaunchContext,
    ProbeResult,
    ProcessSpec,
    ProcessStatus,
    TcpProbe,
)
from agentd.runtime.states import Event, ProcState, State, transition
from agentd.runtime.strays import Stray, find_strays, owner_env
from agentd.types import Assignment

log = logging.getLogger("agentd.runtime")

MiB = 1024 * 1024


@dataclass(frozen=True)
class SupervisorConfig:
    """Timings and limits; `from_settings` reads them from agentd.config.Settings."""

    startup_timeout: float = 600.0  # spawn -> ready; a 400 GB model on slow disks takes minutes
    ready_poll: float = 0.5  # longest readiness probe period while STARTING (it starts at 10 ms and grows)
    health_interval: float = 5.0  # liveness probe period while RUNNING
    health_timeout: float = 2.0  # one probe, on its own connection
    liveness_failures: int = 3  # probes failing in a row before a RUNNING process is killed
    stop_grace: float = 10.0  # SIGTERM -> SIGKILL
    start_retries: int = 3  # failed starts in a row (never ready) before FATAL
    dependency_poll: float = 1.0  # longest period of the TCP check of endpoints on other hosts (starts at 50 ms)
    gpu_release_timeout: float = 10.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    log_keep: int = 5
    log_max_bytes: int = 64 * MiB
    reason_log_lines: int = 8  # log lines quoted in a failure reason
    launch_timeout: float = 30.0  # a plugin's agentd_launch (it may stat the model on a hung mount)
    instance_guard: str = guard.REQUIRED  # secure clusters: the accept guard in every instance process (guard.py)
    instance_guard_allow: tuple[str, ...] = ()  # more addresses or CIDR blocks it lets in (a second network)

    @classmethod
    def from_settings(cls, s: Any) -> SupervisorConfig:
        return cls(
            startup_timeout=s.runtime_startup_timeout,
            health_interval=s.runtime_health_interval,
            health_timeout=s.runtime_health_timeout,
            liveness_failures=s.runtime_liveness_failures,
            stop_grace=s.runtime_stop_grace,
            start_retries=s.runtime_start_retries,
            backoff=BackoffPolicy(initial=s.runtime_backoff_initial, maximum=s.runtime_backoff_max,
                                  stable_after=s.runtime_stable_after),
            log_keep=s.runtime_log_keep,
            log_max_bytes=s.runtime_log_max_bytes,
            instance_guard=s.instance_guard,
            instance_guard_allow=tuple(s.instance_guard_allow),
        )


class _Interrupt(Exception):
    pass


class _Runner:
    """One process of one instance: its state, its current OS process, and the task driving it."""

    def __init__(self, sup: Supervisor, inst: _Instance, spec: ProcessSpec, adopt_from: ProcessRecord | None):
        self.sup, self.inst, self.spec = sup, inst, spec
        self.ps = ProcState(key=f"{inst.instance_id}/{spec.name}", since=sup.clock(),
                            restarts=adopt_from.restarts if adopt_from is not None else 0)
        self.handle: ProcessHandle | None = None
        self.backoff = Backoff(sup.config.backoff, sup.rng)
        self.start_failures = 0
        self.delay = 0.0
        self.adopt_from = adopt_from
        self.deps: list[_Runner] = []
        self.dependents: list[_Runner] = []
        self.remote: list[Endpoint] = []
        self.stop_asked = asyncio.Event()
        self.restart_asked = asyncio.Event()
        self.restart_reason = ""
        self.restart_explicit = False
        self.task: asyncio.Task | None = None
        self.ready_once = False
        self.remote_poll = 0.0  # current wait between TCP checks of endpoints on other hosts
        self.port_in_use = 0  # a port another process held at the last start; reported so the coordinator moves us

    # ------------------------------------------------------------------ plumbing

    @property
    def name(self) -> str:
        return self.spec.name

    def _go(self, new: State, reason: str) -> None:
        self.ps, event = transition(self.ps, new, reason, self.sup.clock())
        self.sup._publish(event, self)

    def _note(self, reason: str) -> None:
        """Update the reason without changing state (e.g. what PENDING is waiting for)."""
        if reason != self.ps.reason:
            self.ps = replace(self.ps, reason=reason)

    def request_restart(self, reason: str, explicit: bool = False) -> None:
        self.restart_reason, self.restart_explicit = reason, explicit
        self.restart_asked.set()

    async def _pause(self, seconds: float, *also: Awaitable[Any]) -> None:
        """Sleep, but wake at once on stop, restart, or any of `also` finishing."""
        waits = [asyncio.ensure_future(self.stop_asked.wait()), asyncio.ensure_future(self.restart_asked.wait())]
        waits += [asyncio.ensure_future(a) for a in also]
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _tail(self) -> str:
        lines = logfiles.tail(self.sup.logs.path(self.inst.instance_id, self.name), self.sup.config.reason_log_lines)
        lines = [ln for ln in lines if not ln.startswith("=== agentd ")]
        if not lines:
            return " | the log is empty"
        return " | last log lines: " + " / ".join(ln.strip()[:200] for ln in lines)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        try:
            while True:
                if self.stop_asked.is_set():
                    await self._finish_stop()
                    return
                st = self.ps.state
                if st is State.PENDING:
                    await self._pending()
                elif st is State.STARTING:
                    await self._starting()
                elif st is State.RUNNING:
                    await self._running()
                elif st is State.BACKOFF:
                    await self._backoff()
                elif st is State.FATAL:
                    await self._fatal()
                else:  # STOPPED by an earlier stop that was then withdrawn: nothing to do
                    await self._pause(3600)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave a process unowned: report it, stop it
            log.exception("supervisor runner failed", extra=fields(process=self.ps.key))
            await self._kill_quietly()
            with contextlib.suppress(Exception):
                if self.ps.state in (State.STARTING, State.RUNNING):
                    self._go(State.STOPPING, "supervisor error")
                    self._go(State.STOPPED, f"supervisor error: {type(exc).__name__}: {exc}")
                elif self.ps.state in (State.PENDING,):
                    self._go(State.FATAL, f"supervisor error: {type(exc).__name__}: {exc}")

    async def _pending(self) -> None:
        self.restart_asked.clear()  # we are on our way to a fresh start anyway
        if self.adopt_from is not None:
            rec, self.adopt_from = self.adopt_from, None
            handle = adopt(rec.pid, rec.pgid, rec.create_time)
            if handle is not None:
                self.handle = handle
                self.ready_once = rec.ready
                self.backoff.started(self.sup.clock())
                self._go(State.STARTING, f"adopted pid {rec.pid} (still running from before the agentd restart)")
                return
        # Local dependencies: RUNNING first.
        waiting = [d for d in self.deps if d.ps.state is not State.RUNNING]
        if waiting:
            d = waiting[0]
            self._note(f"waiting for {d.name} to be RUNNING (it is {d.ps.state}: {d.ps.reason})")
            await self._pause(self.sup.config.dependency_poll, self.sup._changed.wait())
            return
        # Endpoints on other hosts: accepting connections.
        for ep in self.remote:
            res = await probe_tcp(ep.host, ep.port, self.sup.config.health_timeout)
            if not res.ok:
                # The rpc-server on another host usually starts within a second of us: check often at first.
                self.remote_poll = min(self.sup.config.dependency_poll, max(0.05, self.remote_poll * 1.5))
                self._note(f"waiting for {ep} to accept connections ({res.error})")
                await self._pause(self.remote_poll)
                return
        self.remote_poll = 0.0
        if self.stop_asked.is_set():
            return
        try:
            check_free((e.host, e.port) for e in self.spec.ports)
        except PortInUse as exc:
            # Not a failure of this process: the host reports the clash and the coordinator gives the replica
            # new ports (a new generation replaces this instance). Until then, retry: the holder may go away.
            self.port_in_use = exc.port
            self.delay = self.backoff.next_delay(self.sup.clock())
            self._go(State.BACKOFF, f"{exc}; asked the coordinator for another port, retrying in "
                                    f"{self.delay:.1f}s meanwhile")
            return
        self.port_in_use = 0
        await self._spawn()

    async def _spawn(self) -> None:
        sup = self.sup
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.spec.env_remove_prefixes or ("\0",))}
        env.update(self.spec.env)
        if self.inst.guard_policy is not None:
            env.update(self.inst.guard_policy.env(self.spec, env.get("LD_PRELOAD", "")))
        env.update(owner_env(sup.data_dir, self.inst.instance_id, self.name))  # found again if the records are lost
        header = f"run of {self.ps.key} (restart {self.ps.restarts}): {' '.join(self.spec.argv)}"
        t0 = time.perf_counter()
        try:
            fd = sup.logs.open_run(self.inst.instance_id, self.name, header)
        except OSError as exc:
            self._go(State.FATAL, f"cannot open the log file: {exc}")
            return
        try:
            handle = await spawn(list(self.spec.argv), env, self.spec.cwd, fd)
        except BinaryNotUsable as exc:
            self._go(State.FATAL, str(exc))
            return
        finally:
            os.close(fd)
        sup.spawn_latency.append(time.perf_counter() - t0)
        self.handle = handle
        self.ready_once = False
        self.backoff.started(sup.clock())
        self._write_record()
        self._go(State.STARTING, f"spawned pid {handle.pid}")
        for d in self.dependents:
            if d.handle is not None and d.ps.state in (State.STARTING, State.RUNNING):
                d.request_restart(f"restarting after {self.name} (pid {handle.pid}) was started anew")

    def _write_record(self) -> None:
        h = self.handle
        assert h is not None
        rec = ProcessRecord(
            instance_id=self.inst.instance_id, process=self.name, pid=h.pid, pgid=h.pgid,
            create_time=h.create_time, argv=self.spec.argv, fingerprint=self.inst.fingerprint,
            spec=self.spec, assignment=self.inst.assignment, started_at=time.time(),
            log_path=str(self.sup.logs.path(self.inst.instance_id, self.name)), ready=self.ready_once,
            restarts=self.ps.restarts,
        )
        try:
            self.sup.records.write(rec)
        except OSError as exc:  # the process runs; only adoption after a crash is at risk
            log.error("cannot write the process record; this process would not be adopted after a restart",
                      extra=fields(process=self.ps.key, error=str(exc)))

    async def _verdict(self, result: ProbeResult) -> HealthVerdict:
        v = await self.sup._plugin_verdict(self.inst.assignment, self.spec, result)
        return v if v is not None else default_verdict(result)

    async def _starting(self) -> None:
        h = self.handle
        assert h is not None
        cfg = self.sup.config
        timeout = self.spec.startup_timeout or cfg.startup_timeout
        started = self.ps.since
        probe = self.spec.ready
        if h.adopted and (probe is None or (isinstance(probe, TcpProbe) and self.ready_once)):
            # A TCP probe of a busy rpc-server would queue behind its one client: trust the record.
            self._go(State.RUNNING, f"adopted pid {h.pid}; it was ready before the agentd restart")
            return
        poll = 0.01  # a tiny model is ready in tens of milliseconds, a large one in minutes: back off
        while True:
            if self.stop_asked.is_set():
                return
            if self.restart_asked.is_set():
                await self._restart_now()
                return
            if h.exited:
                await self._exited_while_starting(h)
                return
            if probe is None:
                self._ready(f"started (pid {h.pid}; no readiness probe)")
                return
            verdict = await self._verdict(await run_probe(probe, cfg.health_timeout))
            if verdict.ready:
                how = "adopted and ready" if h.adopted else "ready"
                self._ready(f"{how} after {self.sup.clock() - started:.1f}s (pid {h.pid})")
                return
            if self.sup.clock() - started >= timeout:
                await self._kill()
                self._go(State.FATAL, f"not ready after {timeout:g}s (last probe: {verdict.detail}); stopped"
                         + self._tail())
                return
            await self._pause(poll, h.wait())
            poll = min(cfg.ready_poll, poll * 1.5)

    def _ready(self, reason: str) -> None:
        self.start_failures = 0
        self.ready_once = True
        self._write_record()
        self._go(State.RUNNING, reason)

    async def _exited_while_starting(self, h: ProcessHandle) -> None:
        how = _exit_text(h.returncode)
        self._forget()
        self.start_failures += 1
        self._restart_dependents(f"{self.name} {how}")
        if self.start_failures >= self.sup.config.start_retries:
            self._go(State.FATAL, f"{how} during startup, {self.start_failures} times in a row" + self._tail())
        else:
            self.delay = self.backoff.next_delay(self.sup.clock())
            self._go(State.BACKOFF, f"{how} during startup; retrying in {self.delay:.1f}s" + self._tail())

    async def _running(self) -> None:
        h = self.handle
        assert h is not None
        cfg = self.sup.config
        liveness = Liveness(cfg.liveness_failures)
        probe = self.spec.ready
        while True:
            await self._pause(cfg.health_interval, h.wait())
            if self.stop_asked.is_set():
                return
            if self.restart_asked.is_set():
                await self._restart_now()
                return
            if h.exited:
                how = _exit_text(h.returncode)
                self._forget()
                self._restart_dependents(f"{self.name} {how}")
                self.delay = self.backoff.next_delay(self.sup.clock())
                self._go(State.BACKOFF, f"{how}; restarting in {self.delay:.1f}s" + self._tail())
                return
            with contextlib.suppress(OSError):
                self.sup.logs.enforce_size(self.inst.instance_id, self.name)
            if probe is None or isinstance(probe, TcpProbe):
                continue  # liveness = the process exists (see TcpProbe)
            verdict = await self._verdict(await run_probe(probe, cfg.health_timeout))
            if liveness.record(verdict):
                self.delay = self.backoff.next_delay(self.sup.clock())
                self._go(State.BACKOFF, f"liveness failed: {probe.path} failed {liveness.consecutive} times in a "
                         f"row (last: {liveness.last_detail}); killing pid {h.pid}, restarting in {self.delay:.1f}s")
                await self._kill()
                self._restart_dependents(f"{self.name} failed its liveness check")
                return

    async def _restart_now(self) -> None:
        """Publish the decision first: stopping the old process may take the whole grace period."""
        reason = self.restart_reason or "restart requested"
        self.restart_asked.clear()
        pid = self.handle.pid if self.handle is not None else None
        self._go(State.PENDING, reason + (f" (stopping pid {pid})" if pid else ""))
        await self._kill()

    async def _backoff(self) -> None:
        await self._pause(self.delay)
        if self.stop_asked.is_set():
            return
        self.restart_asked.clear()
        self._go(State.PENDING, f"restarting after a {self.delay:.1f}s backoff")

    async def _fatal(self) -> None:
        while not self.stop_asked.is_set():
            await self._pause(3600)
            if self.restart_asked.is_set():
                explicit = self.restart_explicit
                self.restart_asked.clear()
                if explicit:
                    self.start_failures = 0
                    self.backoff.reset()
                    self._go(State.PENDING, self.restart_reason or "restart requested")
                    return

    async def _finish_stop(self) -> None:
        st = self.ps.state
        if st in (State.STARTING, State.RUNNING):
            self._go(State.STOPPING, "stop requested")
            st = State.STOPPING
        if st is State.STOPPING:
            pids, outcome = await self._kill()
            note = await verify_gpu_release(self.sup.gpu_reader, self.spec.gpus, pids,
                                            timeout=self.sup.config.gpu_release_timeout)
            self._go(State.STOPPED, "; ".join(x for x in (outcome, note) if x))
        elif st is not State.STOPPED:
            self._go(State.STOPPED, "stopped (nothing was running)")

    # ------------------------------------------------------------------ helpers

    def _restart_dependents(self, why: str) -> None:
        for d in self.dependents:
            if d.handle is not None and d.ps.state in (State.STARTING, State.RUNNING):
                d.request_restart(f"restarting after {why}")

    def _forget(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = None
        self.sup.records.remove(self.inst.instance_id, self.name)

    async def _kill(self) -> tuple[list[int], str]:
        """Stop the whole tree of the current process; returns the pids signalled and a sentence."""
        h = self.handle
        if h is None:
            return [], "stopped"
        sig = getattr(signal, self.spec.stop_signal)
        grace = self.spec.stop_grace if self.spec.stop_grace is not None else self.sup.config.stop_grace
        outcome = await stop_tree(h.pid, h.pgid, sig=sig, grace=grace)
        self._forget()
        if outcome.survivors:
            log.error("processes survived SIGKILL", extra=fields(process=self.ps.key, pids=outcome.survivors))
        return list(outcome.signalled), outcome.sentence

    async def _kill_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._kill()

    def status(self, wall_offset: float) -> ProcessStatus:
        return ProcessStatus(
            name=self.name, part_index=self.spec.part_index, role=self.spec.role, state=str(self.ps.state),
            reason=self.ps.reason, restarts=self.ps.restarts,
            pid=self.handle.pid if self.handle is not None else None,
            since=self.ps.since + wall_offset, ports=tuple(e.port for e in self.spec.ports),
            log_path=str(self.sup.logs.path(self.inst.instance_id, self.name)), argv=self.spec.argv,
            port_in_use=self.port_in_use,
        )


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited (adopted process: exit status unknown)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Instance:
    assignment: Assignment
    fingerprint: str
    runners: dict[str, _Runner] = field(default_factory=dict)
    error: str = ""  # the launch could not even be built (plugin refused): FATAL with this reason
    ports: dict[str, int] = field(default_factory=dict)  # local ports handed out, by plugin key
    guard_policy: guard.Policy | None = None  # the accept guard's policy for its processes (secure clusters)

    @property
    def instance_id(self) -> str:
        return self.assignment.instance_id


_SEVERITY = {State.FATAL: 0, State.BACKOFF: 1, State.STOPPING: 2, State.PENDING: 3, State.STARTING: 4,
             State.RUNNING: 5, State.STOPPED: 6}


class Supervisor:
    """Runs the desired instances of one host. One per agentd process.

    The daemon calls `await start()` once, then `await apply(assignments)`
    with the full desired set whenever it changes (fencing by Raft term is the
    caller's job), reads `status()` for `agentd ps`, and `await close()` on
    shutdown, which leaves the model servers running for the next agentd.
    """

    def __init__(self, *, node: str, data_dir: Path, plugins: Any, settings: Any,
                 config: SupervisorConfig | None = None, gpu_reader: Any | None = None,
                 simulated_gpus: bool = False, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, on_event: Callable[[Event], None] | None = None,
                 keep_events: int = 1000):
        self.node = node
        self.data_dir = Path(data_dir)
        self.plugins = plugins
        self.settings = settings
        self.config = config or SupervisorConfig.from_settings(settings)
        self.gpu_reader = gpu_reader
        self.simulated_gpus = simulated_gpus
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_event = on_event
        root = self.data_dir / "runtime"
        self.records = RecordStore(root / "records")
        self.logs = logfiles.LogFiles(root / "logs", keep=self.config.log_keep, max_bytes=self.config.log_max_bytes)
        self.work_root = root / "work"
        self.events: deque[Event] = deque(maxlen=keep_events)
        self.spawn_latency: deque[float] = deque(maxlen=1000)  # log open + exec, for the benchmark
        self._instances: dict[str, _Instance] = {}
        self._candidates: dict[tuple[str, str], ProcessRecord] = {}
        self._strays: dict[tuple[str, str], Stray] = {}  # running for this data dir without a record (strays.py)
        self._adoption_done = False
        self._started = False
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._ports = PortAllocator(*settings.port_range, in_use=self._ports_in_use)
        self._ray_ports = PortAllocator(*settings.ray_port_range, in_use=self._ports_in_use)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> list[str]:
        """Find the processes an earlier agentd left running. Kills nothing: `apply` decides."""
        self._started = True
        out = []
        for rec in self.records.load_all():
            if adopt_candidate_alive(rec):
                self._candidates[(rec.instance_id, rec.process)] = rec
                out.append(f"found {rec.instance_id}/{rec.process} still running as pid {rec.pid}")
            else:
                self.records.remove(rec.instance_id, rec.process)
                out.append(f"{rec.instance_id}/{rec.process} (pid {rec.pid}) exited while agentd was down")
        known = {rec.pid for rec in self._candidates.values()}
        for stray in await asyncio.to_thread(find_strays, self.data_dir, known):
            self._strays[(stray.instance_id, stray.process)] = stray
            out.append(f"found {stray.instance_id}/{stray.process} still running as pid {stray.pid} without a "
                       "record (an earlier agentd on this data directory started it)")
        for s in out:
            log.info(s)
        return out

    async def apply(self, assignments: Iterable[Assignment]) -> list[str]:
        """Converge to `assignments` (all of them; those not naming this host are ignored).

        Returns one sentence per decision. New instances are launched in the
        background (watch `status()`); removed ones are stopped before this
        returns, so "deleted" means "nothing left running".
        """
        if not self._started:
            await self.start()
        async with self._lock:
            desired = {a.instance_id: a for a in assignments if a.parts_on(self.node)}
            out: list[str] = []
            gone = [iid for iid in self._instances if iid not in desired]
            if not self._adoption_done:
                out += await self._kill_orphans(desired)
                self._adoption_done = True
            # Stop before starting: a re-placed replica's new generation often gets the old one's port.
            stops = [self._stop_instance(self._instances[iid]) for iid in gone]
            for iid, sentence in zip(gone, await asyncio.gather(*stops), strict=True):
                self._instances.pop(iid, None)
                out.append(sentence)
            for iid, a in desired.items():
                if iid not in self._instances:
                    out.append(await self._launch(a))
            if self._candidates:  # survivors of desired instances that the plugin no longer asks for
                out += await self._kill_orphans({})
            for s in out:
                log.info(s, extra=fields(node=self.node))
            return out

    async def close(self, *, stop_processes: bool = False) -> None:
        """Stop supervising. Processes keep running for the next agentd unless `stop_processes`."""
        if stop_processes:
            await self.apply([])
        for inst in self._instances.values():
            for r in inst.runners.values():
                if r.task is not None:
                    r.task.cancel()
                if r.handle is not None:
                    r.handle.close()
        tasks = [r.task for inst in self._instances.values() for r in inst.runners.values() if r.task]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._instances.clear()

    # ------------------------------------------------------------------ operations

    async def restart(self, instance_id: str, reason: str = "restart requested") -> str:
        """Restart every process of an instance, also from FATAL (an operator's retry)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            raise RuntimeFailure(f"no instance {instance_id} on {self.node}")
        if inst.error:
            self._instances.pop(instance_id)
            return await self._launch(inst.assignment)
        for r in inst.runners.values():
            r.request_restart(reason, explicit=True)
        return f"{instance_id}: {reason}"

    def restart_dependents(self, endpoint: Endpoint, reason: str) -> list[str]:
        """A process on another host serving `endpoint` was restarted: restart what waits for it here.

        The daemon calls this when a peer reports that a part of one of our
        instances restarted (an rpc-server or a Ray head): a llama-server
        connected to the old rpc-server is broken even though its /health
        still answers.
        """
        out = []
        for inst in self._instances.values():
            for r in inst.runners.values():
                if endpoint in r.remote and r.ps.state in (State.STARTING, State.RUNNING):
                    r.request_restart(f"restarting after {endpoint} restarted ({reason})")
                    out.append(f"{r.ps.key}: restarting after {endpoint} restarted")
        return out

    def status(self) -> list[InstanceStatus]:
        offset = time.time() - self.clock()
        return [self._instance_status(inst, offset) for inst in self._instances.values()]

    def assignments(self) -> list[Assignment]:
        """What each instance here was launched from (with its server's key and this host's model path),
        and, until the first `apply` adopts or stops them, what the processes an earlier agentd left running
        were launched from: a drain's replaced replica answering what it holds when agentd restarted is
        kept on (agentd/agent/handoff.py), where the first `apply` would otherwise stop it."""
        out = {iid: inst.assignment for iid, inst in self._instances.items()}
        for rec in self._candidates.values():
            out.setdefault(rec.instance_id, rec.assignment)
        return list(out.values())

    def instance(self, instance_id: str) -> InstanceStatus | None:
        inst = self._instances.get(instance_id)
        return self._instance_status(inst, time.time() - self.clock()) if inst else None

    async def wait_for(self, instance_id: str, states: Iterable[str], timeout: float) -> InstanceStatus:
        """Wait until the instance's state is one of `states` (tests, the demo, `agentd deploy --wait`)."""
        want = {str(s) for s in states}
        deadline = self.clock() + timeout
        while True:
            st = self.instance(instance_id)
            if st is not None and st.state in want:
                return st
            left = deadline - self.clock()
            if left <= 0:
                raise TimeoutError(f"{instance_id} did not reach {sorted(want)} in {timeout:g}s: "
                                   f"{st.state + ': ' + st.reason if st else 'not present'}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._changed.wait()

    def history(self, instance_id: str, limit: int = 50) -> list[Event]:
        """The instance's last state changes, oldest first (`agentd describe`-style views)."""
        prefix = instance_id + "/"
        return [e for e in self.events if e.key.startswith(prefix)][-limit:]

    def log_files(self, instance_id: str, process: str) -> list[Path]:
        """The current log file and the kept previous ones (`agentd logs`, `--previous` = index 1)."""
        return self.logs.runs(instance_id, process)

    # ------------------------------------------------------------------ internals

    def _publish(self, event: Event, runner: _Runner) -> None:
        self.events.append(event)
        log.info(event.sentence, extra=fields(process=event.key, state=str(event.new), restarts=event.restarts))
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("event callback failed", extra=fields(process=event.key))

    def _ports_in_use(self) -> set[int]:
        used: set[int] = set()
        for inst in self._instances.values():
            used.update(inst.ports.values())
            # The coordinator's endpoints for the instance's parts, before any process binds them: a local port
            # handed out while the instance launches (a tunnel entry) must not take one (on one host, or on
            # hosts that share an address, as a LocalCluster's do).
            used.update(e.port for e in inst.assignment.endpoints)
            for r in inst.runners.values():
                used.update(e.port for e in r.spec.ports)
        return used

    def _context(self, inst: _Instance) -> LaunchContext:
        def port(key: str) -> int:
            if key not in inst.ports:
                inst.ports[key] = self._ports.allocate(1)[0]
            return inst.ports[key]

        def ray_port(key: str, count: int = 1) -> int:
            k = f"ray:{key}"
            if k not in inst.ports:
                block = self._ray_ports.allocate(count)
                for j, p in enumerate(block):
                    inst.ports[k if j == 0 else f"{k}#{j}"] = p
            return inst.ports[k]

        loop = asyncio.get_running_loop()  # the hook runs in a thread (_build_specs): allocate on the loop
        return LaunchContext(node=self.node, work_dir=self.work_root / inst.instance_id, settings=self.settings,
                             simulated_gpus=self.simulated_gpus, port=on_loop(loop, port),
                             ray_port=on_loop(loop, ray_port))

    async def _build_specs(self, inst: _Instance) -> list[ProcessSpec]:
        a = inst.assignment
        ctx = self._context(inst)
        specs: list[ProcessSpec] = []
        for i in a.parts_on(self.node):
            try:
                # Off the loop, with a timeout: a plugin may stat a model on a hung mount (agentd/runtime/offloop.py).
                res = await call_off_loop(lambda i=i: self.plugins.hook.agentd_launch(assignment=a, part_index=i,
                                                                                      ctx=ctx),
                                          self.config.launch_timeout, name=f"launch-{a.instance_id}")
                if inspect.isawaitable(res):
                    res = await res
            except TimeoutError:
                raise RuntimeFailure(f"the {a.runtime} plugin did not finish building part {i} within "
                                     f"{self.config.launch_timeout:g}s (a model path on a hung mount?)") from None
            except AgentdError as exc:
                raise RuntimeFailure(f"the {a.runtime} plugin cannot launch part {i}: {exc}") from None
            except Exception as exc:
                raise RuntimeFailure(f"the {a.runtime} plugin failed building part {i}: "
                                     f"{type(exc).__name__}: {exc}") from None
            if res is None:
                raise RuntimeFailure(f"no loaded plugin launches runtime {a.runtime!r}")
            specs.extend(res)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise RuntimeFailure(f"the {a.runtime} plugin returned duplicate process names: {names}")
        return specs

    async def _launch(self, a: Assignment) -> str:
        inst = _Instance(assignment=a, fingerprint=fingerprint(a))
        self._instances[a.instance_id] = inst
        try:
            inst.guard_policy = await guard.policy(a, self.config.instance_guard,
                                                  self.config.instance_guard_allow)
            specs = await self._build_specs(inst)
        except RuntimeFailure as exc:
            inst.error = str(exc)
            self._changed.set()
            self._changed = asyncio.Event()
            return f"{a.instance_id}: FATAL: {exc}"
        adopted = []
        for spec in specs:
            rec = self._candidates.pop((a.instance_id, spec.name), None)
            if rec is None and (stray_rec := self._adopt_stray(inst, spec)) is not None:
                rec = stray_rec
            elif rec is None and (a.instance_id, spec.name) in self._strays:  # runs something else: make room
                log.info(await self._stop_stray(self._strays.pop((a.instance_id, spec.name)),
                                                "its command line differs from this launch"))
            if rec is not None and rec.fingerprint == inst.fingerprint:
                spec = rec.spec  # what actually runs, including ports handed out then
                adopted.append(f"{spec.name} (pid {rec.pid})")
            else:
                rec = None
            inst.runners[spec.name] = _Runner(self, inst, spec, rec)
        _wire(inst)
        for r in inst.runners.values():
            r.task = asyncio.get_running_loop().create_task(r.run(), name=f"runner-{r.ps.key}")
        what = ", ".join(inst.runners)
        if adopted:
            return f"{a.instance_id}: adopting {', '.join(adopted)}; supervising {what}"
        return f"{a.instance_id}: launching {what}"

    async def _stop_instance(self, inst: _Instance) -> str:
        """Dependents first (a llama-server before its rpc-servers), then the rest."""
        for layer in _stop_layers(inst):
            for r in layer:
                r.stop_asked.set()
            await asyncio.gather(*(r.task for r in layer if r.task is not None), return_exceptions=True)
        ctx = self._context(inst)
        for i in inst.assignment.parts_on(self.node):
            await self._plugin_stopped(inst.assignment, i, ctx)
        shutil.rmtree(ctx.work_dir, ignore_errors=True)  # scratch only; the logs are kept for post-mortems
        reasons = [f"{r.name}: {r.ps.reason}" for r in inst.runners.values()]
        return f"{inst.instance_id}: stopped ({'; '.join(reasons) or 'nothing was running'})"

    async def _kill_orphans(self, desired: dict[str, Assignment]) -> list[str]:
        out = []
        for (iid, name), stray in list(self._strays.items()):
            if iid in desired:
                continue  # _launch adopts it if it runs exactly what it would launch, else stops it
            del self._strays[(iid, name)]
            out.append(await self._stop_stray(stray, "no longer desired"))
        for (iid, name), rec in list(self._candidates.items()):
            a = desired.get(iid)
            if a is not None and fingerprint(a) == rec.fingerprint:
                continue  # adopted by _launch
            why = "no longer desired" if a is None else "its assignment changed"
            del self._candidates[(iid, name)]
            if adopt_candidate_alive(rec):
                outcome = await stop_tree(rec.pid, rec.pgid, grace=self.config.stop_grace)
                out.append(f"{iid}/{name}: killed orphan pid {rec.pid} ({why}; {outcome.sentence})")
            self.records.remove(iid, name)
        return out

    async def _stop_stray(self, stray: Stray, why: str) -> str:
        if not is_same_process(stray.pid, stray.create_time):
            return f"{stray.instance_id}/{stray.process}: pid {stray.pid} (no record) already exited"
        outcome = await stop_tree(stray.pid, stray.pgid, grace=self.config.stop_grace)
        return (f"{stray.instance_id}/{stray.process}: stopped pid {stray.pid} of an earlier agentd on this data "
                f"directory ({why}; {outcome.sentence})")

    def _adopt_stray(self, inst: _Instance, spec: ProcessSpec) -> ProcessRecord | None:
        """A record for a stray that runs exactly `spec` for this instance, so the runner adopts it."""
        stray = self._strays.get((inst.instance_id, spec.name))
        if stray is None or stray.argv != tuple(spec.argv) or not is_same_process(stray.pid, stray.create_time):
            return None
        del self._strays[(inst.instance_id, spec.name)]
        rec = ProcessRecord(instance_id=inst.instance_id, process=spec.name, pid=stray.pid, pgid=stray.pgid,
                            create_time=stray.create_time, argv=spec.argv, fingerprint=inst.fingerprint, spec=spec,
                            assignment=inst.assignment, started_at=stray.create_time,
                            log_path=str(self.logs.path(inst.instance_id, spec.name)), ready=True)
        with contextlib.suppress(OSError):
            self.records.write(rec)
        return rec

    async def _plugin_verdict(self, a: Assignment, spec: ProcessSpec, result: ProbeResult) -> HealthVerdict | None:
        try:
            v = self.plugins.hook.agentd_health(assignment=a, part_index=spec.part_index, process=spec,
                                                result=result)
            if inspect.isawaitable(v):
                v = await v
            return v
        except Exception as exc:
            log.warning("agentd_health hook failed; using the default reading",
                        extra=fields(runtime=a.runtime, error=f"{type(exc).__name__}: {exc}"))
            return None

    async def _plugin_stopped(self, a: Assignment, part_index: int, ctx: LaunchContext) -> None:
        try:
            for res in self.plugins.hook.agentd_stop(assignment=a, part_index=part_index, ctx=ctx):
                if inspect.isawaitable(res):
                    await res
        except Exception as exc:
            log.warning("agentd_stop hook failed", extra=fields(runtime=a.runtime, error=f"{type(exc).__name__}: "
                                                                                          f"{exc}"))

    def _instance_status(self, inst: _Instance, offset: float) -> InstanceStatus:
        a = inst.assignment
        procs = tuple(r.status(offset) for r in inst.runners.values())
        if inst.error:
            state, reason = "FATAL", inst.error
        elif not inst.runners:
            state, reason = "STOPPED", "no process on this host"
        else:
            worst = min(inst.runners.values(), key=lambda r: _SEVERITY[r.ps.state])
            state = str(worst.ps.state)
            reason = f"{worst.name}: {worst.ps.reason}"
            if all(r.ps.state is State.RUNNING for r in inst.runners.values()):
                reason = "all processes running"
        return InstanceStatus(instance_id=a.instance_id, deployment=a.deployment, replica=a.replica,
                              generation=a.generation, runtime=a.runtime, state=state, reason=reason,
                              restarts=sum(p.restarts for p in procs), processes=procs)


def adopt_candidate_alive(rec: ProcessRecord) -> bool:
    return is_same_process(rec.pid, rec.create_time)


def _wire(inst: _Instance) -> None:
    """Dependencies by endpoint: who waits for whom, locally and on other hosts."""
    by_listen = {r.spec.listen: r for r in inst.runners.values() if r.spec.listen is not None}
    for r in inst.runners.values():
        for ep in r.spec.wait_for:
            dep = by_listen.get(ep)
            if dep is not None and dep is not r:
                r.deps.append(dep)
                dep.dependents.append(r)
            else:
                r.remote.append(ep)


def _stop_layers(inst: _Instance) -> list[list[_Runner]]:
    """Runners grouped so that each group's dependents are in an earlier group."""
    left = dict(inst.runners)
    layers = []
    while left:
        layer = [r for r in left.values() if not any(d.name in left for d in r.dependents)]
        if not layer:  # a cycle (a plugin bug): stop the rest together
            layer = list(left.values())
        layers.append(layer)
        for r in layer:
            left.pop(r.name)
    return layers
