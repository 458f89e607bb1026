"""Forward one OpenAI-style request to a ready replica, streaming the answer back as it comes.

Choice of replica: least busy first (this proxy's outstanding requests, or
what the model server reports of itself when it says more: agentd.api.load),
round-robin among equals so idle replicas share the load; a replica that is
full (one more request would wait there beyond `proxy_replica_max_queue`) is
skipped, and when all are, the request waits its turn here
(agentd.api.saturation) or gets 429. Prefix affinity (agentd.api.affinity)
may put first the replica that served the same prompt prefix last, while it
is not overloaded. Only endpoints marked ready are ever candidates:
the daemon marks an instance ready after its health check passes, and
removes it when it stops or its host goes down.

Retry rule: a failure to connect (refused, reset, timed out connecting, or
the server closing before it answered) moves on to the next replica (the same
one again, after a short pause, when there are fewer replicas than attempts); the
request has not produced an answer, so trying elsewhere is safe for
inference. An HTTP answer from the model server, error or not, is passed
through unchanged: the model has spoken, and retrying a 400 elsewhere would
only repeat it. A read timeout is not retried either (the replica may still
be generating; a second copy would double the load) and becomes 504.

Streaming: the body is copied chunk by chunk as it arrives (`iter_any`), so
SSE tokens reach the client without waiting for the end. Compressed bodies
pass through untouched (the client session does not decompress).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from agentd.api.affinity import SLACK as AFFINITY_SLACK
from agentd.api.affinity import PrefixTable
from agentd.api.load import LoadBoard, as_reading
from agentd.api.saturation import Admission, Saturated
from agentd.logs import fields
from agentd.metrics import Metrics

log = logging.getLogger(__name__)

# Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus the ones we set ourselves.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "authorization", "content-length", "cookie"})
FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "accept-encoding", "user-agent", "x-request-id",
                             "openai-organization", "openai-project")
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError)
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
             _CONNECT_TIMEOUT)
STALE = (aiohttp.ServerDisconnectedError,)  # connected, then closed before any answer


@dataclass(frozen=True)
class Endpoint:
    """One running replica's model server, as the daemon knows it."""

    url: str  # base URL, e.g. "http://10.0.0.3:40001"; the request path (/v1/...) is appended
    api_key: str | None  # the server's own key, generated at launch; the client never sees it
    ready: bool
    instance_id: str
    served_model: str | None = None  # the name the server answers to, when it differs from the deployment
    runtime: str = ""  # the runtime plugin, for its load hooks (agentd.api.load)


# Reads a model's endpoints again (the provider's `routes`), for the retries of a request (OpenAIProxy._send).
Refresh = Callable[[], Awaitable[Sequence[Endpoint]]]


@dataclass(frozen=True)
class Pressure:
    """How busy one replica is, as this proxy knows it now (`Balancer.pressure`)."""

    busy: int  # requests it holds: the larger of this proxy's outstanding count and what it reports (runs + waits)
    queue: int  # of them, waiting at the replica beyond what it runs (the autoscaler's queue depth)
    free_slot: bool  # it could start one more now (capacity known), or reports nothing waiting
    full: bool  # one more would wait there beyond `max_queue`: skipped while another has room
    reported: bool  # the model server's own reading was used (else only this proxy's counters)


class Balancer:
    """Least busy first, round-robin among ties. State is per process, by design: each agent balances what
    passes through it, plus what the model servers report (agentd.api.load)."""

    def __init__(self, max_queue: int | None = None) -> None:
        # Requests a replica may hold waiting beyond what it runs before it is full (None: never full).
        self.max_queue = max_queue
        self._outstanding: dict[str, int] = {}
        self._turn: dict[str, int] = {}

    def pressure(self, e: Endpoint, load: Callable[[str], Sequence[int] | None] | None = None) -> Pressure:
        """Full is judged only from a model server's own reading: without one, nothing says how many it can take.
        With its capacity known (llama-server's slots), what it holds beyond capacity waits; without (vLLM), what
        it says waits."""
        mine = self._outstanding.get(e.instance_id, 0)
        reading = as_reading(load(e.instance_id)) if load is not None else None
        if reading is None:
            return Pressure(mine, 0, not mine, False, False)
        busy = max(mine, reading.busy + reading.waiting)
        # What waits there now; a free slot only while nothing waits (a server that queues with batch slots free
        # is short of KV cache: one more would wait too).
        queue = max(reading.waiting, busy - reading.capacity) if reading.capacity else reading.waiting
        free_slot = not queue and (not reading.capacity or busy < reading.capacity)
        full = self.max_queue is not None and not free_slot and queue >= self.max_queue
        return Pressure(busy, queue, free_slot, full, True)

    def order(self, model: str, endpoints: Sequence[Endpoint],
              load: Callable[[str], Sequence[int] | None] | None = None, *, turn: bool = True) -> list[Endpoint]:
        """Ready endpoints, least busy first, full ones last. With `load` (what each model server reports,
        agentd.api.load), busy is the larger of this proxy's outstanding count and the server's own, and a
        server with no free slot goes after those with one. Each call takes the model's next turn of the
        round-robin among ties, unless `turn` is False (a retry of a request that took its turn)."""
        ready = [e for e in endpoints if e.ready]
        if not ready:
            return []
        start = self._turn.get(model, 0)
        if turn:
            self._turn[model] = start + 1
        rotated = ready[start % len(ready):] + ready[:start % len(ready)]

        def key(e: Endpoint) -> tuple[bool, bool, int]:
            p = self.pressure(e, load)
            return p.full, not p.free_slot, p.busy

        return sorted(rotated, key=key)  # stable: ties keep the turn

    def outstanding(self, instance_id: str) -> int:
        return self._outstanding.get(instance_id, 0)

    def reserve(self, instance_id: str) -> None:
        """Count a request as outstanding before it is sent (a waiter given room), so the next pick sees it."""
        self._outstanding[instance_id] = self._outstanding.get(instance_id, 0) + 1

    def release(self, instance_id: str) -> None:
        left = self._outstanding.get(instance_id, 0) - 1
        if left > 0:
            self._outstanding[instance_id] = left
        else:
            self._outstanding.pop(instance_id, None)

    @contextmanager
    def track(self, instance_id: str, *, reserved: bool = False) -> Iterator[None]:
        """Outstanding while the block runs; `reserved`: counted already by `reserve`."""
        if not reserved:
            self.reserve(instance_id)
        try:
            yield
        finally:
            self.release(instance_id)


def openai_error(status: int, message: str, *, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """An error body the OpenAI client libraries parse: {"error": {message, type, param, code}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class OpenAIProxy:
    """Sends requests to model servers over one pooled client session.

    With a load board, replicas are ordered by what they report as well as by this proxy's counters; with
    `max_queue` a replica is full once one more request would wait there beyond `max_queue`, and a request for a
    model whose every replica is full waits in `admission` (at most `queue` per model, `wait` seconds each; then
    429). With `affinity`, requests sharing a long prompt prefix go to the replica that had it last, unless it is
    overloaded (agentd.api.affinity)."""

    def __init__(self, session: aiohttp.ClientSession, *, balancer: Balancer | None = None,
                 metrics: Metrics | None = None, connect_timeout: float = 5.0, read_timeout: float = 600.0,
                 max_attempts: int = 3, clock: Callable[[], float] = time.monotonic,
                 board: LoadBoard | None = None, max_queue: int | None = None, queue: int = 128,
                 wait: float = 30.0, affinity: PrefixTable | None = None):
        self.session = session
        self.board = board
        self.balancer = balancer or Balancer(max_queue)
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.max_attempts = max(1, max_attempts)
        self._clock = clock
        self.affinity = affinity
        self.admission: Admission[Endpoint] = Admission(
            queue=queue, wait=wait, release=lambda e: self.balancer.release(e.instance_id), clock=clock)
        if board is not None:
            board.on_poll = self._polled

    def _load(self) -> Callable[[str], Sequence[int] | None] | None:
        return self.board.load if self.board is not None else None

    def held(self, model: str) -> int:
        """Requests this agent holds for `model` because every replica is full."""
        return self.admission.held(model)

    def replica_queues(self) -> dict[str, tuple[str, int]]:
        """instance id -> (deployment, requests waiting at that replica beyond what it runs), for every replica
        this agent polls (sent a request to in the last 30 s); the autoscaler's input."""
        if self.board is None:
            return {}
        load = self.board.load
        out = {}
        for iid, model in self.board.polled().items():
            p = self.balancer.pressure(Endpoint(url="", api_key=None, ready=True, instance_id=iid), load)
            out[iid] = (model, p.queue)
        return out

    def _polled(self) -> None:
        """After each load poll: set the queue gauges, and give room to waiters if some freed up."""
        if self.metrics is not None:
            self.metrics.replica_queue_depth.clear()
            for iid, (model, queue) in self.replica_queues().items():
                self.metrics.replica_queue_depth.labels(model=model or "-", replica=iid).set(queue)
        self.admission.kick()

    def _prefer(self, model: str, keys: Sequence[bytes], ordered: list[Endpoint]) -> list[Endpoint]:
        """`ordered` with the replica that served this prompt prefix last put first, while it is not overloaded:
        not full, with a free slot unless no other replica has one either, and at most `SLACK` requests busier
        than the least busy."""
        if not keys or self.affinity is None or len(ordered) < 2:
            return ordered
        want = self.affinity.lookup(model, keys)
        i = next((k for k, e in enumerate(ordered) if e.instance_id == want), None)
        if not i:  # unknown, gone, or first already
            return ordered
        load = self._load()
        p = self.balancer.pressure(ordered[i], load)
        others = [self.balancer.pressure(e, load) for k, e in enumerate(ordered) if k != i]
        if (p.full or (not p.free_slot and any(o.free_slot for o in others))
                or p.busy > min(o.busy for o in others) + AFFINITY_SLACK):
            return ordered
        return [ordered[i], *ordered[:i], *ordered[i + 1:]]

    def _ordered(self, model: str, endpoints: Sequence[Endpoint], keys: Sequence[bytes]) -> list[Endpoint]:
        return self._prefer(model, keys, self.balancer.order(model, endpoints, self._load()))

    def _pick(self, model: str, endpoints: Sequence[Endpoint], keys: Sequence[bytes]) -> Endpoint | None:
        """For a waiter: the best replica if it has room, reserved for it; None while every one is full."""
        ordered = self._ordered(model, endpoints, keys)
        if not ordered or self.balancer.pressure(ordered[0], self._load()).full:
            return None
        self.balancer.reserve(ordered[0].instance_id)
        return ordered[0]

    async def forward(self, request: web.Request, *, model: str, body: bytes, payload: dict[str, Any],
                      endpoints: Sequence[Endpoint], refresh: Refresh | None = None) -> web.StreamResponse:
        """Proxy `request` (already authorized, body read) to the best ready endpoint of `model`. `refresh`
        reads the model's endpoints again after a replica could not be reached (see `_send`)."""
        endpoint_name = request.path.removeprefix("/v1/")
        if self.board is not None:
            self.board.seen(endpoints, model)
        keys = self.affinity.keys(payload) if self.affinity is not None and endpoint_name != "embeddings" else []
        ordered = self._ordered(model, endpoints, keys)
        if not ordered:
            return self._count(model, endpoint_name, openai_error(
                503, f"model {model!r} has no ready replica right now; retry shortly",
                type_="service_unavailable", code="no_ready_replica", headers={"Retry-After": "2"}))
        reserved: Endpoint | None = None
        if self.admission.held(model) or self.balancer.pressure(ordered[0], self._load()).full:
            # Every replica is full (or others wait already: no overtaking them). Wait in line for room.
            got = await self._wait_for_room(model, endpoint_name, endpoints, keys)
            if isinstance(got, web.Response):
                return got
            reserved = got
            ordered = [got, *(e for e in ordered if e.instance_id != got.instance_id)]
        try:
            return await self._send(request, model, endpoint_name, body, payload, ordered, keys, reserved, refresh)
        finally:
            self.admission.kick(model)  # this request's replica has room again

    async def _wait_for_room(self, model: str, endpoint_name: str, endpoints: Sequence[Endpoint],
                             keys: Sequence[bytes]) -> Endpoint | web.Response:
        started = self._clock()
        queued = self.metrics.proxy_queued.labels(model=model) if self.metrics is not None else None
        if queued is not None:
            queued.inc()
        try:
            got = await self.admission.admit(model, lambda: self._pick(model, endpoints, keys))
        except Saturated as exc:
            if self.metrics is not None:
                self.metrics.proxy_rejected.labels(model=model, reason=exc.reason).inc()
            log.info("every replica is full; answering 429",
                     extra=fields(model=model, reason=exc.reason, waiting=self.admission.held(model)))
            if exc.reason == "queue_full":
                message = (f"model {model!r} is at capacity: every replica is busy and {self.admission.queue} "
                           "requests are waiting already; retry shortly")
            else:
                message = (f"model {model!r} is at capacity: no replica had room within "
                           f"{self.admission.wait:g}s; retry shortly")
            return self._count(model, endpoint_name, openai_error(
                429, message, type_="rate_limit_error", code="model_at_capacity", headers={"Retry-After": "1"}))
        finally:
            if queued is not None:
                queued.dec()
        if self.metrics is not None:
            self.metrics.proxy_queue_seconds.labels(model=model).observe(max(0.0, self._clock() - started))
        return got

    async def _send(self, request: web.Request, model: str, endpoint_name: str, body: bytes,
                    payload: dict[str, Any], ordered: list[Endpoint], keys: Sequence[bytes],
                    reserved: Endpoint | None, refresh: Refresh | None) -> web.StreamResponse:
        # Fewer ready replicas than attempts: the same ones again. A burst of connections to a model server that
        # has just started (the requests held while it woke) saw one fail with "Can not write request body" in
        # 20 (cause not pinned down; llama-server's HTTP library listens with a backlog of 5), and such a
        # failure is as safe to retry as any other before an answer.
        candidates = [ordered[k % len(ordered)] for k in range(self.max_attempts)]
        failures: list[str] = []
        tried: set[str] = set()
        started = self._clock()
        attempt = -1
        while attempt + 1 < len(candidates):
            attempt += 1
            ep = candidates[attempt]
            tried.add(ep.instance_id)
            if keys and self.affinity is not None:
                self.affinity.record(model, keys, ep.instance_id)
            try:
                with self.balancer.track(ep.instance_id, reserved=reserved is not None and attempt == 0):
                    return await self._attempt(request, ep, model, endpoint_name, body, payload, started)
            except RETRYABLE as exc:
                failures.append(f"{ep.instance_id}: {_short(exc)}")
                at_once = attempt == 0 and isinstance(exc, STALE)  # the same replica again at once, if listed
                again = []
                if refresh is not None and attempt + 1 < len(candidates):
                    again = await self._retry_order(model, ep, at_once, refresh, tried, len(candidates) - attempt - 1)
                if again:
                    candidates[attempt + 1:] = again
                elif at_once and len(candidates) > 1:
                    candidates[1:] = [ep, *candidates[1:-1]]
                upcoming = candidates[attempt + 1].instance_id if attempt + 1 < len(candidates) else None
                if upcoming in tried and not (at_once and upcoming == ep.instance_id):
                    await asyncio.sleep(0.05 * (attempt + 1))  # a replica tried already: give it a moment
                log.warning("replica unreachable; trying the next one",
                            extra=fields(model=model, instance=ep.instance_id, attempt=attempt + 1,
                                         error=_short(exc)))
                if self.metrics is not None:
                    self.metrics.proxy_retries.labels(model=model).inc()
            except aiohttp.ServerTimeoutError as exc:
                return self._count(model, endpoint_name, openai_error(
                    504, f"replica {ep.instance_id} of {model!r} did not answer in time ({_short(exc)})",
                    type_="timeout", code="upstream_timeout"))
        return self._count(model, endpoint_name, openai_error(
            502, f"could not reach any ready replica of {model!r}: " + "; ".join(failures),
            type_="service_unavailable", code="upstream_unreachable"))

    async def _retry_order(self, model: str, failed: Endpoint, at_once: bool, refresh: Refresh,
                           tried: set[str], left: int) -> list[Endpoint]:
        """The next `left` replicas to try after `failed` could not be reached, from the model's endpoints read
        again: the state may have moved on since the request came in (a drain promoted successors and stopped
        the replicas it was sent to; a failover re-placed one). Replicas not tried yet go first. With `at_once`
        (the first attempt was closed under us before any answer, most often on a pooled connection the server
        had just timed out), `failed` first while it is still listed: a new connection to it keeps its prompt
        cache, and a dead one refuses quickly. Empty when no replica is ready now."""
        fresh = self.balancer.order(model, await refresh(), self._load(), turn=False)
        ring = [e for e in fresh if e.instance_id not in tried] + [e for e in fresh if e.instance_id in tried]
        listed = next((e for e in ring if e.instance_id == failed.instance_id), None)
        if at_once and listed is not None:
            ring = [listed, *(e for e in ring if e is not listed)]
        return [ring[k % len(ring)] for k in range(left)] if ring else []

    async def _attempt(self, request: web.Request, ep: Endpoint, model: str, endpoint_name: str, body: bytes,
                       payload: dict[str, Any], started: float) -> web.StreamResponse:
        if ep.served_model and ep.served_model != payload.get("model"):
            body = json.dumps({**payload, "model": ep.served_model}).encode()
        headers = {k: v for k in FORWARDED_REQUEST_HEADERS if (v := request.headers.get(k)) is not None}
        headers.setdefault("content-type", "application/json")
        if ep.api_key:
            headers["Authorization"] = f"Bearer {ep.api_key}"
        if request.remote:
            headers["X-Forwarded-For"] = request.remote
        url = ep.url.rstrip("/") + request.path
        in_flight = self.metrics.proxy_in_flight.labels(model=model) if self.metrics is not None else None
        if in_flight is not None:
            in_flight.inc()
        try:
            async with self.session.post(url, data=body, headers=headers, timeout=self.timeout,
                                         allow_redirects=False) as upstream:
                if self.metrics is not None:
                    self.metrics.proxy_seconds.labels(model=model).observe(max(0.0, self._clock() - started))
                return await self._relay(request, upstream, ep, model, endpoint_name)
        finally:
            if in_flight is not None:
                in_flight.dec()

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, ep: Endpoint, model: str,
                     endpoint_name: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                resp.headers.add(key, value)
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        resp.headers["X-Agentd-Instance"] = ep.instance_id
        self._count(model, endpoint_name, resp)
        await resp.prepare(request)
        # Returning `resp` after a broken write lets aiohttp finish it as a client disconnect, quietly;
        # raising would log a traceback for an ordinary event.
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
        except asyncio.CancelledError:
            upstream.close()
            raise
        except ConnectionResetError:
            # The client went away: drop the upstream connection so the model stops generating for nobody.
            log.info("client left mid-response; closing the model server connection",
                     extra=fields(model=model, instance=ep.instance_id))
            upstream.close()
            return resp
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("model server failed mid-response; cutting the client's response short",
                        extra=fields(model=model, instance=ep.instance_id, error=_short(exc)))
            upstream.close()
            if request.transport is not None:
                # Without the final chunk the client sees a truncated body, not a complete-looking one.
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    def _count(self, model: str, endpoint_name: str, resp: web.StreamResponse) -> web.StreamResponse:
        if self.metrics is not None:
            self.metrics.proxy_requests.labels(model=model, endpoint=endpoint_name, code=str(resp.status)).inc()
        return resp


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
