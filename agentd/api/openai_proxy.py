"""Forward one OpenAI-style request to a ready replica, streaming the answer back as it comes.

Choice of replica: least outstanding requests first (a replica busy with a
long generation gets fewer new requests), round-robin among equals so idle
replicas share the load. Only endpoints marked ready are ever candidates:
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from agentd.api.load import LoadBoard
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


@dataclass(frozen=True)
class Endpoint:
    """One running replica's model server, as the daemon knows it."""

    url: str  # base URL, e.g. "http://10.0.0.3:40001"; the request path (/v1/...) is appended
    api_key: str | None  # the server's own key, generated at launch; the client never sees it
    ready: bool
    instance_id: str
    served_model: str | None = None  # the name the server answers to, when it differs from the deployment
    runtime: str = ""  # the runtime plugin, for its load hooks (agentd.api.load)


class Balancer:
    """Least outstanding requests, round-robin among ties. State is per process, by design:
    each agent balances what passes through it."""

    def __init__(self) -> None:
        self._outstanding: dict[str, int] = {}
        self._turn: dict[str, int] = {}

    def order(self, model: str, endpoints: Sequence[Endpoint],
              load: Callable[[str], tuple[int, int] | None] | None = None) -> list[Endpoint]:
        """Ready endpoints, least busy first. With `load` (what each model server reports, agentd.api.load),
        busy is the larger of this proxy's outstanding count and the server's own, and a server with no free
        slot goes last."""
        ready = [e for e in endpoints if e.ready]
        if not ready:
            return []
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        start = turn % len(ready)
        rotated = ready[start:] + ready[:start]

        def key(e: Endpoint) -> tuple[bool, int]:
            mine = self._outstanding.get(e.instance_id, 0)
            reported = load(e.instance_id) if load is not None else None
            if reported is None:
                return False, mine
            busy, capacity = reported
            return bool(capacity) and busy >= capacity, max(mine, busy)

        return sorted(rotated, key=key)  # stable: ties keep the turn

    def outstanding(self, instance_id: str) -> int:
        return self._outstanding.get(instance_id, 0)

    @contextmanager
    def track(self, instance_id: str) -> Iterator[None]:
        self._outstanding[instance_id] = self._outstanding.get(instance_id, 0) + 1
        try:
            yield
        finally:
            left = self._outstanding[instance_id] - 1
            if left:
                self._outstanding[instance_id] = left
            else:
                del self._outstanding[instance_id]


def openai_error(status: int, message: str, *, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """An error body the OpenAI client libraries parse: {"error": {message, type, param, code}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class OpenAIProxy:
    """Sends requests to model servers over one pooled client session."""

    def __init__(self, session: aiohttp.ClientSession, *, balancer: Balancer | None = None,
                 metrics: Metrics | None = None, connect_timeout: float = 5.0, read_timeout: float = 600.0,
                 max_attempts: int = 3, clock: Callable[[], float] = time.monotonic,
                 board: LoadBoard | None = None):
        self.session = session
        self.board = board
        self.balancer = balancer or Balancer()
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.max_attempts = max(1, max_attempts)
        self._clock = clock

    async def forward(self, request: web.Request, *, model: str, body: bytes, payload: dict[str, Any],
                      endpoints: Sequence[Endpoint]) -> web.StreamResponse:
        """Proxy `request` (already authorized, body read) to the best ready endpoint of `model`."""
        endpoint_name = request.path.removeprefix("/v1/")
        if self.board is not None:
            self.board.seen(endpoints)
        ordered = self.balancer.order(model, endpoints, self.board.load if self.board is not None else None)
        # Fewer ready replicas than attempts: the same ones again. A burst of connections to a model server that
        # has just started (the requests held while it woke) saw one fail with "Can not write request body" in
        # 20 (cause not pinned down; llama-server's HTTP library listens with a backlog of 5), and such a
        # failure is as safe to retry as any other before an answer.
        candidates = [ordered[k % len(ordered)] for k in range(self.max_attempts)] if ordered else []
        if not candidates:
            return self._count(model, endpoint_name, openai_error(
                503, f"model {model!r} has no ready replica right now; retry shortly",
                type_="service_unavailable", code="no_ready_replica", headers={"Retry-After": "2"}))
        failures: list[str] = []
        started = self._clock()
        for attempt, ep in enumerate(candidates):
            try:
                return await self._attempt(request, ep, model, endpoint_name, body, payload, started)
            except RETRYABLE as exc:
                failures.append(f"{ep.instance_id}: {_short(exc)}")
                if attempt + 1 >= len(ordered):  # a replica tried already: give it a moment
                    await asyncio.sleep(0.05 * (attempt + 1))
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
        with self.balancer.track(ep.instance_id):
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
