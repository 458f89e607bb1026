"""The HTTP side of an agent: health, readiness, Prometheus metrics and the OpenAI-compatible /v1/ API.

The app knows nothing about Raft or processes; it asks an `HttpProvider`
(implemented by the daemon) for liveness, readiness, the deployments a caller
may see, the ready endpoints of a model, and who an API key belongs to. That
keeps this module testable with real sockets and a tiny fake provider, and
keeps the daemon's state out of request handlers.

Authorization on /v1/: no or unknown key → 401; a model nobody deployed, of
another tenant or outside the key's model list → the same 404 (a key cannot
learn other tenants' model names); a model with no ready replica → 503. /healthz, /readyz and /metrics are open, for
load balancers and Prometheus; bind `http_listen` accordingly.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from agentd.api.affinity import PrefixTable
from agentd.api.load import LoadBoard
from agentd.api.ondemand import Activity, WakeError, Waker, proxy_loads
from agentd.api.openai_proxy import Endpoint, OpenAIProxy, openai_error
from agentd.logs import fields
from agentd.metrics import CONTENT_TYPE, Metrics
from agentd.security.apikeys import Principal

log = logging.getLogger(__name__)

PROXIED_ENDPOINTS = ("chat/completions", "completions", "embeddings")
UNKNOWN_MODEL_LABEL = "-"  # metrics label for requests that named no known model (bounded cardinality)


@dataclass(frozen=True)
class ModelCard:
    """A deployment as /v1/models shows it."""

    id: str
    tenant: str = "default"
    created: int = 0  # unix seconds
    owned_by: str = "agentd"
    runtime: str = ""
    replicas: int = 0
    ready_replicas: int = 0
    on_demand: bool = False  # it has idle_unload: a request finding no ready replica is held while it loads
    idle: bool = False  # unloaded: the next request wakes it

    def to_openai(self) -> dict[str, Any]:
        extra = {"state": "idle"} if self.idle else {}
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by,
                "agentd": {"tenant": self.tenant, "runtime": self.runtime, "replicas": self.replicas,
                           "ready_replicas": self.ready_replicas, **extra}}


class HttpProvider(Protocol):
    """What the daemon gives the HTTP app. Methods may be plain or async."""

    metrics_registry: CollectorRegistry

    def alive(self) -> bool:
        """The process and its event loop work (false: restart me)."""

    def ready(self) -> tuple[bool, str]:
        """In the cluster with a known leader; the string says why not."""

    def routes(self, model: str) -> Sequence[Endpoint]:
        """Every replica endpoint of `model`, ready or not (the proxy skips those not ready)."""

    def models(self) -> Sequence[ModelCard]:
        """Every deployment, across tenants (the app filters per caller)."""

    def verify_api_key(self, key: str) -> Principal | None:
        """The key's principal, or None for unknown, revoked or expired keys."""


PROVIDER = web.AppKey("agentd_provider", HttpProvider)
PROXY = web.AppKey("agentd_proxy", OpenAIProxy)
WAKER = web.AppKey("agentd_waker", Waker)


@dataclass(frozen=True)
class HttpOptions:
    require_api_key: bool = True  # False only with --insecure: every caller is an admin
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    max_attempts: int = 3
    max_body: int = 64 * 1024 * 1024
    # A connection that has not sent a whole request this long after it opened (or after its last
    # response) is closed: slow-header (slowloris) connections would otherwise be held forever.
    header_timeout: float = 30.0
    # Routing by load (agentd.api.openai_proxy): a replica is full when one more request would wait there beyond
    # `replica_max_queue`; with every replica full, up to `saturation_queue` requests per model wait up to
    # `saturation_wait` seconds, the rest get 429. `prefix_affinity`: agentd.api.affinity.
    replica_max_queue: int | None = 8
    saturation_queue: int = 128
    saturation_wait: float = 30.0
    prefix_affinity: bool = True

    @classmethod
    def from_settings(cls, s: Any) -> HttpOptions:
        """From an agent's Settings (agentd.config)."""
        return cls(require_api_key=not s.insecure, connect_timeout=s.proxy_connect_timeout,
                   read_timeout=s.proxy_read_timeout, max_body=s.http_max_body, header_timeout=s.http_header_timeout,
                   replica_max_queue=s.proxy_replica_max_queue, saturation_queue=s.proxy_saturation_queue,
                   saturation_wait=s.proxy_saturation_wait, prefix_affinity=s.proxy_prefix_affinity)


async def _call(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def make_http_app(provider: HttpProvider, *, metrics: Metrics | None = None,
                  options: HttpOptions | None = None, waker: Waker | None = None,
                  activity: Activity | None = None, board: LoadBoard | None = None) -> web.Application:
    """The aiohttp application; run it with aiohttp's AppRunner/TCPSite on `http_listen`.

    `activity` counts requests per deployment (idle unload); `waker` holds requests for a deployment being
    woken (agentd.api.ondemand). Without them, a model with no ready replica gets 503 at once."""
    options = options or HttpOptions()
    app = web.Application(client_max_size=options.max_body)
    app[PROVIDER] = provider

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        # No connection limit: the proxy is as concurrent as its callers; model servers queue themselves.
        # Idle connections are dropped after 4 s, before the model servers drop them (llama-server's HTTP library
        # and uvicorn, under vLLM and SGLang, close after 5 s): a request sent on a connection the server has
        # just closed fails and would be retried elsewhere, losing prefix affinity's cache hit.
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True, keepalive_timeout=4.0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[PROXY] = OpenAIProxy(session, metrics=metrics, connect_timeout=options.connect_timeout,
                                     read_timeout=options.read_timeout, max_attempts=options.max_attempts,
                                     board=board, max_queue=options.replica_max_queue,
                                     queue=options.saturation_queue, wait=options.saturation_wait,
                                     affinity=PrefixTable() if options.prefix_affinity else None)
            if activity is not None:  # the per-replica queues its reports carry (replicas by load)
                activity.loads_from(lambda: proxy_loads(app[PROXY]))
            poller = asyncio.ensure_future(board.run(session)) if board is not None else None
            try:
                yield
            finally:
                if poller is not None:
                    poller.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await poller

    app.cleanup_ctx.append(client_session)
    handlers = _Handlers(provider, metrics, options, waker, activity or Activity())
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.prometheus)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/models/{model:.+}", handlers.get_model)
    for name in PROXIED_ENDPOINTS:
        app.router.add_post(f"/v1/{name}", handlers.proxy)
    return app


def http_runner(app: web.Application, options: HttpOptions, **kwargs: Any) -> web.AppRunner:
    """aiohttp's runner with agentd's connection limits.

    aiohttp has no separate header-read timeout; its keep-alive timer runs from
    the moment a connection opens (and again after each response) and closes
    the connection if no complete request has arrived by then, however slowly
    bytes trickle in. So `keepalive_timeout` is the header timeout here.
    """
    return web.AppRunner(app, handle_signals=False, keepalive_timeout=options.header_timeout, **kwargs)


class _Handlers:
    def __init__(self, provider: HttpProvider, metrics: Metrics | None, options: HttpOptions,
                 waker: Waker | None = None, activity: Activity | None = None):
        self.provider = provider
        self.metrics = metrics
        self.options = options
        self.waker = waker
        self.activity = activity or Activity()

    # ------------------------------------------------------------ operations

    async def healthz(self, request: web.Request) -> web.Response:
        alive = bool(await _call(self.provider.alive()))
        return web.json_response({"status": "ok" if alive else "unhealthy"}, status=200 if alive else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        ok, reason = await _call(self.provider.ready())
        return web.json_response({"ready": bool(ok), "reason": reason}, status=200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.provider.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------ /v1/

    async def _principal(self, request: web.Request) -> Principal | web.Response:
        if not self.options.require_api_key:
            return Principal(key_id="insecure", tenant="*", admin=True)
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return openai_error(401, "an API key is required: send 'Authorization: Bearer <key>' "
                                "(create one with 'agentd keys create')", type_="invalid_request_error",
                                code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        principal = await _call(self.provider.verify_api_key(key.strip()))
        if principal is None:
            log.info("refused an invalid, revoked or expired API key", extra=fields(remote=request.remote))
            return openai_error(401, "the API key is invalid, expired or revoked", type_="invalid_request_error",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return principal

    async def list_models(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        if isinstance(principal, web.Response):
            return principal
        cards = await _call(self.provider.models())
        data = [c.to_openai() for c in sorted(cards, key=lambda c: c.id) if principal.may_use(c.id, c.tenant)]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        if isinstance(principal, web.Response):
            return principal
        card = await self._card(request.match_info["model"], principal)
        if isinstance(card, web.Response):
            return card
        return web.json_response(card.to_openai())

    async def _card(self, model: str, principal: Principal) -> ModelCard | web.Response:
        """The model's card, or the same 404 whether nobody deployed it or this key may not use it.

        A 403 for models the key may not use would let any key holder probe
        other tenants' model names; so a model outside the key's view does not
        exist for it (as GitHub answers 404 for private repositories).
        """
        cards = await _call(self.provider.models())
        for c in cards:
            if c.id == model and principal.may_use(c.id, c.tenant):
                return c
        return openai_error(404, f"the model {model!r} does not exist (see GET /v1/models)",
                            type_="invalid_request_error", code="model_not_found", param="model")


    async def proxy(self, request: web.Request) -> web.StreamResponse:
        endpoint_name = request.path.removeprefix("/v1/")
        principal = await self._principal(request)
        if isinstance(principal, web.Response):
            return self._count(UNKNOWN_MODEL_LABEL, endpoint_name, principal)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._count(UNKNOWN_MODEL_LABEL, endpoint_name, openai_error(
                413, f"the request body exceeds {self.options.max_body} bytes", type_="invalid_request_error",
                code="request_too_large"))
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._count(UNKNOWN_MODEL_LABEL, endpoint_name, openai_error(
                400, f"the request body is not valid JSON: {exc}", type_="invalid_request_error",
                code="invalid_json"))
        except RecursionError:  # json's C scanner recurses per nesting level
            return self._count(UNKNOWN_MODEL_LABEL, endpoint_name, openai_error(
                400, "the request body is nested too deeply", type_="invalid_request_error", code="invalid_json"))
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            return self._count(UNKNOWN_MODEL_LABEL, endpoint_name, openai_error(
                400, "the request body must be a JSON object with a string 'model'", type_="invalid_request_error",
                code="missing_model", param="model"))
        card = await self._card(model, principal)
        if isinstance(card, web.Response):
            log.info("refused a request for a model that does not exist or the key may not use",
                     extra=fields(key=principal.key_id, tenant=principal.tenant))
            return self._count(UNKNOWN_MODEL_LABEL, endpoint_name, card)
        with self.activity.track(model):  # held requests count: a deployment being woken is not idle
            # Held: an idle model, or one being woken (on demand, none ready yet); not one scaled to 0.
            if self.waker is not None and card.replicas and (card.idle or (card.on_demand and not card.ready_replicas)):
                try:
                    await self.waker.hold(model, idle=card.idle)
                except WakeError as exc:
                    return self._count(model, endpoint_name, openai_error(
                        exc.status, exc.message, type_="service_unavailable", code=exc.code,
                        headers={"Retry-After": "5"}))
            endpoints = await _call(self.provider.routes(model))
            return await request.app[PROXY].forward(request, model=model, body=body, payload=payload,
                                                    endpoints=endpoints,
                                                    refresh=lambda: _call(self.provider.routes(model)))

    def _count(self, model: str, endpoint_name: str, resp: web.Response) -> web.Response:
        if self.metrics is not None:
            self.metrics.proxy_requests.labels(model=model, endpoint=endpoint_name, code=str(resp.status)).inc()
        return resp
