"""The HTTP side against real aiohttp servers on loopback: the proxy under test, fake model servers behind it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import socket
import ssl
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from agentd.api.http import HttpOptions, ModelCard, http_runner, make_http_app
from agentd.api.openai_proxy import Balancer, Endpoint
from agentd.errors import InvalidInput
from agentd.metrics import Metrics
from agentd.security import apikeys as K
from agentd.security import ca as C
from agentd.security.tls import http_ssl_context

T0 = 1_900_000_000.0


@dataclass
class Upstream:
    """A fake model server: checks its own key, records what reached it, streams on request."""

    name: str
    key: str
    hits: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    status: int = 200
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    hold: asyncio.Event | None = None  # when set, non-stream answers wait for it
    break_stream: bool = False
    long_stream: bool = False  # stream tokens for seconds, like a real generation
    chunks_sent: int = 0
    url: str = ""
    closed_early: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": "wrong upstream key"}, status=401)
        payload = await request.json()
        self.hits.append(payload)
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.json_response({"error": {"message": f"{self.name} says no"}}, status=self.status)
        if not payload.get("stream"):
            if self.hold is not None:
                await self.hold.wait()
            return web.json_response({"instance": self.name, "model": payload["model"], "path": request.path})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b'data: {"token": "first"}\n\n')
            await asyncio.wait_for(self.gate.wait(), 10)
            if self.break_stream:
                request.transport.abort()
                return resp
            if self.long_stream:
                for _ in range(500):
                    await resp.write(b'data: {"token": "more"}\n\n')
                    self.chunks_sent += 1
                    await asyncio.sleep(0.01)
            for tok in ("second", "third"):
                await resp.write(f'data: {{"token": "{tok}"}}\n\n'.encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.closed_early.set()
            raise
        return resp


class Provider:
    def __init__(self, metrics: Metrics):
        self.metrics_registry = metrics.registry
        self.is_alive = True
        self.readiness = (True, "leader n1, term 3")
        self.cards: list[ModelCard] = []
        self.endpoints: dict[str, list[Endpoint]] = {}
        self.then: dict[str, list[Endpoint]] = {}  # a model's endpoints from the next `routes` call on
        self.keys: dict[str, K.ApiKeyRecord] = {}
        self.now = T0

    def alive(self):
        return self.is_alive

    async def ready(self):  # async on purpose: both kinds of provider method work
        return self.readiness

    def routes(self, model):
        out = self.endpoints.get(model, [])
        if model in self.then:
            self.endpoints[model] = self.then.pop(model)
        return out

    def models(self):
        return self.cards

    def verify_api_key(self, key):
        return K.verify_key(self.keys, key, now=self.now)

    def new_key(self, tenant, models=(), seed=0):
        secret, rec = K.new_api_key(tenant=tenant, models=models, now=T0, random_bytes=random.Random(seed).randbytes)
        self.keys = K.add_key(self.keys, rec)
        return secret, rec.id


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def env():
    runners = []
    metrics = Metrics("n1")
    provider = Provider(metrics)

    async def upstream(name: str, **kw) -> Upstream:
        up = Upstream(name=name, key=f"instance-key-{name}", **kw)
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            app.router.add_post(path, up.handle)
        runner, up.url = await serve(app)
        runners.append(runner)
        return up

    runner, base = await serve(make_http_app(provider, metrics=metrics,
                                             options=HttpOptions(connect_timeout=2, read_timeout=10)))
    runners.append(runner)
    async with aiohttp.ClientSession() as client:
        yield provider, upstream, client, base, metrics
    for r in reversed(runners):
        await r.cleanup()


def ep(up: Upstream, ready: bool = True, **kw) -> Endpoint:
    return Endpoint(url=up.url, api_key=up.key, ready=ready, instance_id=up.name, **kw)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client, base, key, body, path="/v1/chat/completions"):
    async with client.post(base + path, data=json.dumps(body) if not isinstance(body, bytes) else body,
                           headers=auth(key) if key else {}) as r:
        return r.status, await r.json(), r.headers


async def deploy(provider, upstream, model="llama", tenant="acme", replicas=1, ready=True):
    ups = [await upstream(f"{model}-{i}") for i in range(replicas)]
    provider.cards.append(ModelCard(id=model, tenant=tenant, replicas=replicas, ready_replicas=replicas))
    provider.endpoints[model] = [ep(u, ready) for u in ups]
    return ups


async def test_health_readiness_and_metrics(env):
    provider, _, client, base, metrics = env
    async with client.get(base + "/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with client.get(base + "/readyz") as r:
        assert r.status == 200 and (await r.json())["reason"] == "leader n1, term 3"
    provider.is_alive, provider.readiness = False, (False, "no leader")
    async with client.get(base + "/healthz") as r:
        assert r.status == 503
    async with client.get(base + "/readyz") as r:
        assert r.status == 503 and (await r.json()) == {"ready": False, "reason": "no leader"}
    metrics.set_raft(term=9, commit_index=41, is_leader=True, leader="n1")
    async with client.get(base + "/metrics") as r:
        text = await r.text()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert "agentd_raft_term 9.0" in text and 'agentd_raft_leader{leader="n1"} 1.0' in text
    assert "python_gc" not in text, "only agentd's own registry, not the process-global default"


async def test_request_reaches_a_replica_with_the_instance_key_not_the_clients(env):
    provider, upstream, client, base, _ = env
    (up,) = await deploy(provider, upstream)
    key, _ = provider.new_key("acme")
    status, body, headers = await post(client, base, key, {"model": "llama", "messages": []})
    assert status == 200 and body == {"instance": "llama-0", "model": "llama", "path": "/v1/chat/completions"}
    assert headers["X-Agentd-Instance"] == "llama-0"
    assert up.headers[0]["Authorization"] == "Bearer instance-key-llama-0"
    assert key not in json.dumps(up.headers)
    for path in ("/v1/completions", "/v1/embeddings"):
        status, body, _ = await post(client, base, key, {"model": "llama", "input": "x"}, path)
        assert status == 200 and body["path"] == path


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer nonsense", "Bearer "])
async def test_missing_or_invalid_key_is_401_in_openai_shape(env, header):
    provider, upstream, client, base, _ = env
    (up,) = await deploy(provider, upstream)
    async with client.post(base + "/v1/chat/completions", json={"model": "llama"},
                           headers={"Authorization": header} if header else {}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and err["code"] in ("missing_api_key", "invalid_api_key")
    assert up.hits == []


async def test_a_revoked_key_is_refused_at_once(env):
    provider, upstream, client, base, _ = env
    await deploy(provider, upstream)
    key, key_id = provider.new_key("acme")
    assert (await post(client, base, key, {"model": "llama"}))[0] == 200
    provider.keys, _ = K.revoke_key(provider.keys, key_id, now=T0 + 1)
    status, body, _ = await post(client, base, key, {"model": "llama"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_another_tenants_model_is_refused_and_hidden(env):
    provider, upstream, client, base, _ = env
    (theirs,) = await deploy(provider, upstream, model="secret-model", tenant="globex")
    await deploy(provider, upstream, model="llama", tenant="acme")
    await deploy(provider, upstream, model="qwen", tenant="acme")
    key, _ = provider.new_key("acme")
    status, body, _ = await post(client, base, key, {"model": "secret-model"})
    _, unknown, _ = await post(client, base, key, {"model": "no-such-model"})
    # The same 404 as for a model nobody deployed: a key cannot probe other tenants' model names.
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"] == {**unknown["error"], "message": unknown["error"]["message"].replace("no-such-model",
                                                                                                "secret-model")}
    assert theirs.hits == []
    async with client.get(base + "/v1/models", headers=auth(key)) as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["llama", "qwen"]
    async with client.get(base + "/v1/models/secret-model", headers=auth(key)) as r:
        assert r.status == 404
    async with client.get(base + "/v1/models/llama", headers=auth(key)) as r:
        assert (await r.json())["agentd"]["tenant"] == "acme"
    limited, _ = provider.new_key("acme", models=["qwen"], seed=1)
    assert (await post(client, base, limited, {"model": "llama"}))[0] == 404
    assert (await post(client, base, limited, {"model": "qwen"}))[0] == 200


async def test_unknown_model_bad_json_and_missing_model(env):
    provider, _upstream, client, base, _ = env
    key, _ = provider.new_key("acme")
    status, body, _ = await post(client, base, key, {"model": "nope"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    status, body, _ = await post(client, base, key, b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = await post(client, base, key, {"messages": []})
    assert status == 400 and body["error"]["code"] == "missing_model"
    status, body, _ = await post(client, base, key, [1, 2])
    assert status == 400
    status, body, _ = await post(client, base, key, b"[" * 100_000 + b"]" * 100_000)  # was a 500 and a traceback
    assert status == 400 and body["error"]["code"] == "invalid_json" and "nested too deeply" in body["error"]["message"]


async def test_never_routes_to_a_replica_that_is_not_ready(env):
    provider, upstream, client, base, _ = env
    starting = await upstream("starting")
    provider.cards.append(ModelCard(id="llama", tenant="acme"))
    provider.endpoints["llama"] = [ep(starting, ready=False)]
    key, _ = provider.new_key("acme")
    status, body, headers = await post(client, base, key, {"model": "llama"})
    assert status == 503 and body["error"]["code"] == "no_ready_replica" and headers["Retry-After"] == "2"
    good = await upstream("good")
    provider.endpoints["llama"].append(ep(good))
    for _ in range(6):
        assert (await post(client, base, key, {"model": "llama"}))[0] == 200
    assert starting.hits == [] and len(good.hits) == 6


async def test_round_robin_across_idle_replicas(env):
    provider, upstream, client, base, _ = env
    ups = await deploy(provider, upstream, replicas=3)
    key, _ = provider.new_key("acme")
    seen = [(await post(client, base, key, {"model": "llama"}))[1]["instance"] for _ in range(9)]
    assert [len(u.hits) for u in ups] == [3, 3, 3]
    assert len(set(seen[:3])) == 3


async def test_least_outstanding_replica_gets_new_requests(env):
    provider, upstream, client, base, _ = env
    slow, fast = await deploy(provider, upstream, replicas=2)
    slow.hold = asyncio.Event()
    key, _ = provider.new_key("acme")
    first = [asyncio.create_task(post(client, base, key, {"model": "llama"})) for _ in range(2)]
    for _ in range(100):  # until both replicas hold one request each
        if len(slow.hits) == 1 and len(fast.hits) == 1:
            break
        await asyncio.sleep(0.01)
    fast_results = [await post(client, base, key, {"model": "llama"}) for _ in range(4)]
    assert [r[1]["instance"] for r in fast_results] == ["llama-1"] * 4, "the busy replica is skipped"
    slow.hold.set()
    assert sorted(r[1]["instance"] for r in await asyncio.gather(*first)) == ["llama-0", "llama-1"]


async def test_connection_failure_retries_another_replica(env):
    provider, upstream, client, base, metrics = env
    good = await upstream("good")
    dead = Endpoint(url=f"http://127.0.0.1:{free_port()}", api_key="k", ready=True, instance_id="dead")
    provider.cards.append(ModelCard(id="llama", tenant="acme"))
    provider.endpoints["llama"] = [dead, ep(good)]
    key, _ = provider.new_key("acme")
    for _ in range(4):
        status, body, _ = await post(client, base, key, {"model": "llama"})
        assert status == 200 and body["instance"] == "good"
    assert len(good.hits) == 4
    text = metrics.render().decode()
    assert 'agentd_proxy_retries_total{model="llama"} 2.0' in text, "the dead replica is tried first every 2nd time"
    provider.endpoints["llama"] = [dead]
    status, body, _ = await post(client, base, key, {"model": "llama"})
    assert status == 502 and body["error"]["code"] == "upstream_unreachable" and "dead" in body["error"]["message"]


async def test_a_retry_reads_the_routes_again_when_the_replicas_moved_during_the_request(env):
    """A drain promoted successors elsewhere and stopped both replicas the request was routed among: the retry
    goes to a successor, not round the stopped ones until it answers 502 (a clean-clone CI run saw that 502)."""
    provider, upstream, client, base, metrics = env
    successor = await upstream("successor")
    stopped = [Endpoint(url=f"http://127.0.0.1:{free_port()}", api_key="k", ready=True, instance_id=f"old-{i}")
               for i in range(2)]
    provider.cards.append(ModelCard(id="llama", tenant="acme"))
    provider.endpoints["llama"] = stopped
    provider.then["llama"] = [*(dataclasses.replace(e, ready=False) for e in stopped), ep(successor)]
    key, _ = provider.new_key("acme")
    status, body, _ = await post(client, base, key, {"model": "llama"})
    assert status == 200 and body["instance"] == "successor"
    assert 'agentd_proxy_retries_total{model="llama"} 1.0' in metrics.render().decode()


async def test_http_errors_from_the_model_pass_through_without_retry(env):
    provider, upstream, client, base, _ = env
    bad, other = await deploy(provider, upstream, replicas=2)
    bad.status = 400
    key, _ = provider.new_key("acme")
    status, body, _ = await post(client, base, key, {"model": "llama"})
    assert status == 400 and body == {"error": {"message": "llama-0 says no"}}
    assert len(bad.hits) == 1 and other.hits == []


async def test_streaming_passes_the_first_chunk_before_the_upstream_finishes(env):
    provider, upstream, client, base, _ = env
    (up,) = await deploy(provider, upstream)
    key, _ = provider.new_key("acme")
    async with client.post(base + "/v1/chat/completions", json={"model": "llama", "stream": True},
                           headers=auth(key)) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b'data: {"token": "first"}\n\n'
        assert not up.gate.is_set(), "the upstream is still mid-stream"
        up.gate.set()
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert rest == b'data: {"token": "second"}\n\ndata: {"token": "third"}\n\ndata: [DONE]\n\n'


async def test_an_upstream_dying_mid_stream_truncates_the_client_response(env):
    provider, upstream, client, base, _ = env
    (up,) = await deploy(provider, upstream)
    up.break_stream = True
    key, _ = provider.new_key("acme")
    async with client.post(base + "/v1/chat/completions", json={"model": "llama", "stream": True},
                           headers=auth(key)) as r:
        await r.content.readuntil(b"\n\n")
        up.gate.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.content.read(), 5)


async def test_a_client_leaving_mid_stream_closes_the_upstream(env):
    provider, upstream, client, base, _ = env
    (up,) = await deploy(provider, upstream)
    up.long_stream = True
    key, _ = provider.new_key("acme")
    r = await client.post(base + "/v1/chat/completions", json={"model": "llama", "stream": True}, headers=auth(key))
    await r.content.readuntil(b"\n\n")
    up.gate.set()
    await r.content.readuntil(b"\n\n")
    r.close()  # the client hangs up while the model is still generating
    await asyncio.wait_for(up.closed_early.wait(), 5)
    assert up.chunks_sent < 500, "the model server stopped generating for nobody"


async def test_served_model_name_is_rewritten_for_the_upstream(env):
    provider, upstream, client, base, _ = env
    up = await upstream("u")
    provider.cards.append(ModelCard(id="llama", tenant="acme"))
    provider.endpoints["llama"] = [ep(up, served_model="llama-3-8b-instruct")]
    key, _ = provider.new_key("acme")
    status, _body, _ = await post(client, base, key, {"model": "llama", "temperature": 0})
    assert status == 200 and up.hits == [{"model": "llama-3-8b-instruct", "temperature": 0}]


async def test_proxy_metrics_count_by_model_endpoint_and_code(env):
    provider, upstream, client, base, metrics = env
    await deploy(provider, upstream)
    key, _ = provider.new_key("acme")
    await post(client, base, key, {"model": "llama"})
    await post(client, base, key, {"model": "no-such-model-" + "x" * 10})
    await post(client, base, None, {"model": "llama"})
    text = metrics.render().decode()
    assert 'agentd_proxy_requests_total{code="200",endpoint="chat/completions",model="llama"} 1.0' in text
    assert 'agentd_proxy_requests_total{code="404",endpoint="chat/completions",model="-"} 1.0' in text
    assert 'agentd_proxy_requests_total{code="401",endpoint="chat/completions",model="-"} 1.0' in text
    assert "no-such-model" not in text, "user-supplied names never become label values"
    assert 'agentd_proxy_in_flight{model="llama"} 0.0' in text


def test_balancer_orders_by_outstanding_then_turn():
    b = Balancer()
    eps = [Endpoint(f"http://h{i}", None, True, f"i{i}") for i in range(3)] + [Endpoint("http://x", None, False, "x")]
    assert [e.instance_id for e in b.order("m", eps)] == ["i0", "i1", "i2"]
    assert [e.instance_id for e in b.order("m", eps)] == ["i1", "i2", "i0"]
    with b.track("i2"), b.track("i2"), b.track("i0"):
        assert [e.instance_id for e in b.order("m", eps)] == ["i1", "i0", "i2"]
    assert b.outstanding("i2") == 0
    assert b.order("m", [eps[3]]) == []


async def test_https_with_operator_certificate(tmp_path):
    authority = C.create_ca()
    C.save_identity(tmp_path, "node", C.issue_identity(authority, "n1", role="node", addresses=["127.0.0.1"]))
    ctx = http_ssl_context(tmp_path / "node.crt", tmp_path / "node.key")
    runner = web.AppRunner(make_http_app(Provider(Metrics("n1"))), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        client_ctx = ssl.create_default_context(cadata=authority.cert_pem.decode())
        async with aiohttp.ClientSession() as client:
            async with client.get(f"https://127.0.0.1:{port}/healthz", ssl=client_ctx) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await client.get(f"https://127.0.0.1:{port}/healthz")  # the system store does not know our CA
    finally:
        await runner.cleanup()
    with pytest.raises(InvalidInput, match="HTTPS"):
        http_ssl_context(tmp_path / "missing.crt", tmp_path / "node.key")


async def test_slow_header_connections_are_closed_after_the_header_timeout():
    """Issue 14: 300 connections that never finish their headers were held forever (slowloris)."""
    options = HttpOptions(header_timeout=0.5)
    runner = http_runner(make_http_app(Provider(Metrics("n1")), options=options), options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        for _, w in conns:
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        async with asyncio.timeout(10):
            for r, w in conns:
                w.write(b"X-Slow: 1\r\n")  # still sending headers: the timer is not reset by bytes
                try:
                    assert await r.read() == b""  # closed by the server...
                except ConnectionResetError:
                    pass  # ...or reset, with our unread bytes in its buffer
                w.close()
        async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200  # whole requests are unaffected
    finally:
        await runner.cleanup()

