"""Serving on demand at the /v1/ proxy: count what each deployment gets, hold requests while an idle one wakes.

`Activity` is this agent's side of idle unload: per deployment, when its
proxy last started or finished a request and how many it forwards now. The
agent sends these in every report; the coordinator unloads a deployment only
when no proxy in the cluster has sent it anything for its idle time
(agentd.coordinator, `_unload_idle`). The first request after a quiet second
asks for a report at once, so the coordinator learns of it without waiting for
the next report interval.

`Waker` holds requests for a deployment that has no ready replica because it
is IDLE (or is loading after a wake): one wake call per deployment at a time
from this agent, however many requests wait (the coordinator, under its lock,
makes one placement however many agents call), a bounded number of held
requests and a bounded wait. A wake that fails gives the caller a message safe
for a tenant; the diagnosis (host names, free memory) goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from agentd.autoscale import DeploymentActivity, ReplicaReading
from agentd.logs import fields
from agentd.metrics import Metrics

log = logging.getLogger(__name__)


class Activity:
    """Requests this agent's proxy sent each deployment. State is per process, like the balancer's."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 on_first: Callable[[], None] | None = None, quiet: float = 1.0):
        self._clock = clock
        self._on_first = on_first
        self._quiet = quiet
        self._last: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._loads: Callable[[], tuple[dict[str, dict[str, ReplicaReading]], dict[str, int]]] | None = None

    def loads_from(self, fn: Callable[[], tuple[dict[str, dict[str, ReplicaReading]], dict[str, int]]]) -> None:
        """Where `report` reads the per-replica queues: () -> (deployment -> instance id -> reading,
        deployment -> requests held). `proxy_loads` over the /v1/ proxy, wired by make_http_app."""
        self._loads = fn

    @contextmanager
    def track(self, model: str) -> Iterator[None]:
        now = self._clock()
        quiet = not self._in_flight.get(model) and now - self._last.get(model, float("-inf")) >= self._quiet
        if self._on_first is not None and quiet:
            self._on_first()  # the first request after a quiet spell: report it now, not at the next interval
        self._last[model] = now
        self._in_flight[model] = self._in_flight.get(model, 0) + 1
        try:
            yield
        finally:
            self._in_flight[model] -= 1
            self._last[model] = self._clock()

    def report(self) -> dict[str, DeploymentActivity]:
        """What this agent's report says of each deployment: `snapshot` plus, for replicas by load, the queue
        of every replica this proxy sends to (agentd/autoscale.py)."""
        replicas, held = self._loads() if self._loads is not None else ({}, {})
        out = {m: DeploymentActivity(idle_seconds=idle, in_flight=n, held=held.get(m, 0),
                                     replicas=replicas.get(m, {}))
               for m, (idle, n) in self.snapshot().items()}
        for m, rs in replicas.items():  # polled, though no request of this agent's is known (cannot happen)
            if m not in out:
                out[m] = DeploymentActivity(idle_seconds=float("inf"), replicas=rs, held=held.get(m, 0))
        return out

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """deployment -> (seconds since its last request started or ended here, requests in flight here)."""
        now = self._clock()
        return {m: (max(0.0, now - t), self._in_flight.get(m, 0)) for m, t in sorted(self._last.items())}


def proxy_loads(proxy: object) -> tuple[dict[str, dict[str, ReplicaReading]], dict[str, int]]:
    """The /v1/ proxy's view of each replica it polls (agentd/api/openai_proxy.py, agentd/api/load.py): its own
    outstanding requests there and the model server's latest reading; and the requests it holds per model."""
    board = getattr(proxy, "board", None)
    balancer = getattr(proxy, "balancer", None)
    if board is None or balancer is None:
        return {}, {}
    replicas: dict[str, dict[str, ReplicaReading]] = {}
    for iid, model in board.polled().items():
        model = model or iid.rsplit("-r", 1)[0]
        reading = board.load(iid)
        replicas.setdefault(model, {})[iid] = ReplicaReading(
            outstanding=balancer.outstanding(iid), running=reading.busy if reading else 0,
            waiting=reading.waiting if reading else 0, capacity=reading.capacity if reading else 0)
    held = {m: n for m in replicas if (n := proxy.held(m))} if hasattr(proxy, "held") else {}
    return replicas, held


class WakeError(Exception):
    """A held request cannot be served: `message` is for the tenant (no hosts, no other tenants' usage)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Waker:
    """Holds requests while their deployment wakes; see the module docstring."""

    def __init__(self, *, wake: Callable[[str], Awaitable[object]], ready: Callable[[str], Awaitable[bool]],
                 timeout: float = 300.0, queue: int = 256, poll: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None):
        self.metrics = metrics
        self._wake_fn = wake
        self._ready = ready
        self.timeout = timeout
        self.queue = queue
        self._poll = poll
        self._clock = clock
        self._wakes: dict[str, asyncio.Task[None]] = {}
        self.held = 0
        self.wake_calls = 0  # wake calls this agent made (tests, metrics)

    async def hold(self, model: str, *, idle: bool) -> None:
        """Return once `model` has a ready replica; wake it first when it is idle. Raises WakeError."""
        if self.held >= self.queue:
            raise WakeError(503, "too many requests are waiting for models to load; retry shortly",
                            "wake_queue_full")
        self.held += 1
        started = self._clock()
        deadline = started + self.timeout
        if self.metrics is not None:
            self.metrics.requests_held.labels(model=model).inc()
        try:
            if idle:
                task = self._wakes.get(model)
                if task is None:
                    task = asyncio.ensure_future(self._wake(model))
                    self._wakes[model] = task
                    task.add_done_callback(lambda t, m=model: self._done(m, t))
                try:
                    await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - self._clock()))
                except TimeoutError:
                    raise self._timed_out(model) from None
            while not await self._ready(model):
                if self._clock() >= deadline:
                    raise self._timed_out(model)
                await asyncio.sleep(self._poll)
            if self.metrics is not None:
                self.metrics.wake_seconds.labels(model=model).observe(max(0.0, self._clock() - started))
        finally:
            self.held -= 1
            if self.metrics is not None:
                self.metrics.requests_held.labels(model=model).dec()

    def _done(self, model: str, task: asyncio.Task[None]) -> None:
        if self._wakes.get(model) is task:
            del self._wakes[model]
        if not task.cancelled():
            task.exception()  # retrieved here: a wake nobody waits for any more logs nothing twice

    async def _wake(self, model: str) -> None:
        self.wake_calls += 1
        started = self._clock()
        try:
            await self._wake_fn(model)
        except Exception as exc:
            # The diagnosis names hosts and their free memory: the operator's, not the tenant's.
            if self.metrics is not None:
                self.metrics.wakes.labels(model=model, result="failed").inc()
            log.warning("could not wake an idle deployment; held requests get 503",
                        extra=fields(deployment=model, error=str(exc)[:2000]))
            raise WakeError(503, f"the model {model!r} is not loaded and there is no capacity to load it right "
                                 "now; retry later", "model_unavailable") from None
        if self.metrics is not None:
            self.metrics.wakes.labels(model=model, result="woken").inc()
        log.info("woke an idle deployment", extra=fields(deployment=model,
                                                          seconds=round(self._clock() - started, 3)))

    def _timed_out(self, model: str) -> WakeError:
        log.warning("a held request waited too long for its model to load",
                    extra=fields(deployment=model, timeout=self.timeout))
        return WakeError(503, f"the model {model!r} is still loading; retry shortly", "model_loading")
