"""Saturation and prefix affinity in the /v1/ proxy (issue 21 item 3), without agents: the balancer's notion of
full, the waiting line, the prefix table, and the whole HTTP app against real loopback model servers that report
their load as llama-server's /slots does. With real agents and llama-server: test_saturation_e2e.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from agentd_llamabox.load import agentd_load_path, agentd_read_load
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agentd.api.affinity import PrefixTable, prefix_keys, prompt_text
from agentd.api.http import HttpOptions, ModelCard, make_http_app
from agentd.api.load import LoadBoard
from agentd.api.openai_proxy import Balancer, Endpoint
from agentd.api.saturation import Admission, Saturated
from agentd.metrics import Metrics


def ep(name: str, url: str = "http://127.0.0.1:1", runtime: str = "llamabox") -> Endpoint:
    return Endpoint(url=url, api_key=None, ready=True, instance_id=name, runtime=runtime)


# ------------------------------------------------------------------ full

def test_full_means_one_more_would_wait_beyond_max_queue():
    b = Balancer(max_queue=0)
    slots = {"a": (1, 1), "b": (0, 1)}
    assert b.pressure(ep("a"), slots.get).full and not b.pressure(ep("b"), slots.get).full
    with b.track("b"):  # this proxy's own request counts before the server's next reading shows it
        assert b.pressure(ep("b"), slots.get).full
    # vLLM says no capacity, only what waits: full once anything waits (max_queue 0), or max_queue wait (2).
    vllm = {"v": (5, 0, 0), "w": (5, 0, 1)}
    assert not b.pressure(ep("v"), vllm.get).full and b.pressure(ep("w"), vllm.get).full
    assert Balancer(max_queue=2).pressure(ep("w"), {"w": (5, 0, 2)}.get).full
    assert not Balancer(max_queue=2).pressure(ep("w"), {"w": (5, 0, 1)}.get).full
    # llama-server with 2 slots and max_queue 1: 2 running + 1 waiting is full; queue depth is what waits.
    p = Balancer(max_queue=1).pressure(ep("a"), {"a": (2, 2, 1)}.get)
    assert p.full and p.queue == 1 and p.busy == 3
    # No reading: never full, whatever this proxy sends (nothing says how many it takes).
    with b.track("c"), b.track("c"):
        assert not b.pressure(ep("c"), lambda i: None).full
    # No max_queue: never full (as before saturation existed).
    assert not Balancer().pressure(ep("a"), slots.get).full


def test_full_replicas_go_last():
    b = Balancer(max_queue=0)
    load = {"a": (1, 1), "b": (0, 1)}.get
    for _ in range(3):
        assert [e.instance_id for e in b.order("m", [ep("a"), ep("b")], load)] == ["b", "a"]


# ------------------------------------------------------------------ the line

def test_waiters_get_room_in_order_and_the_rest_are_refused():
    async def scenario() -> None:
        room = [0]
        released: list[str] = []

        def pick() -> str | None:
            if room[0]:
                room[0] -= 1
                return "r"
            return None

        line: Admission[str] = Admission(queue=2, wait=5.0, release=released.append)
        first = asyncio.ensure_future(line.admit("m", pick))
        second = asyncio.ensure_future(line.admit("m", pick))
        await asyncio.sleep(0)
        assert line.held("m") == 2
        with pytest.raises(Saturated) as refused:
            await line.admit("m", pick)
        assert refused.value.reason == "queue_full"
        room[0] = 1
        line.kick("m")
        assert await first == "r" and not second.done()
        room[0] = 1
        line.kick()
        assert await second == "r" and line.held("m") == 0 and released == []

    asyncio.run(scenario())


def test_a_wait_ends_with_saturated_and_a_queue_of_zero_refuses_at_once():
    async def scenario() -> None:
        line: Admission[str] = Admission(queue=4, wait=0.05, release=lambda r: None)
        with pytest.raises(Saturated) as timed_out:
            await line.admit("m", lambda: None)
        assert timed_out.value.reason == "timeout" and timed_out.value.waited >= 0.05 and line.held("m") == 0
        with pytest.raises(Saturated):
            await Admission(queue=0, wait=5, release=lambda r: None).admit("m", lambda: "r")

    asyncio.run(scenario())


def test_a_waiter_whose_client_left_gives_its_room_back():
    async def scenario() -> None:
        released: list[str] = []
        line: Admission[str] = Admission(queue=4, wait=5, release=released.append)
        waiter = asyncio.ensure_future(line.admit("m", lambda: None))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert line.held("m") == 0 and released == []

    asyncio.run(scenario())


# ------------------------------------------------------------------ prefix table

def test_turns_of_one_chat_share_keys_and_other_chats_do_not():
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    turn1 = {"messages": [system, {"role": "user", "content": "What is a prime number? " * 3}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "A number with two divisors. " * 5},
                          {"role": "user", "content": "And 91?"}]}
    other = {"messages": [{"role": "system", "content": "Answer in French. " * 40}]}
    t = PrefixTable(entries=100, block=64)
    k1, k2 = t.keys(turn1), t.keys(turn2)
    assert k1 and k2[:len(k1)] == k1 and len(k2) > len(k1)
    assert t.lookup("m", k2) is None
    t.record("m", k1, "r1")
    assert t.lookup("m", k2) == "r1" and t.lookup("other-model", k2) is None
    assert t.lookup("m", t.keys(other)) is None
    # Short prompts, token-id prompts and embeddings inputs get no keys.
    assert t.keys({"prompt": "hi"}) == [] and t.keys({"prompt": [1, 2, 3] * 100}) == []
    assert t.keys({"input": "x" * 1000}) == []
    assert prompt_text({"prompt": "x" * 100}, limit=10) == "x" * 10
    assert prefix_keys(["é" * 130], block=64)[:2] == prefix_keys(["é" * 128 + "ab"], block=64)[:2]
    # Keys at every message end: the next turn finds this one's whole conversation, even mid-block.
    a, b = {"messages": [system, {"role": "user", "content": "hi"}]}, {"messages": [system, {"role": "user",
                                                                                         "content": "yo"}]}
    t.record("m", t.keys(a), "ra")
    t.record("m", t.keys(b), "rb")
    assert t.lookup("m", t.keys({"messages": [*a["messages"], {"role": "user", "content": "more"}]})) == "ra"
    assert t.lookup("m", t.keys({"messages": [system, {"role": "user", "content": "new"}]})) == "rb"  # shared


def test_the_table_is_bounded():
    t = PrefixTable(entries=10, block=4, limit=400)
    for i in range(50):
        t.record("m", prefix_keys([f"{i:04d}" * 10], 4), f"r{i}")
    assert len(t) == 10
    with pytest.raises(ValueError):
        PrefixTable(entries=0)


# ------------------------------------------------------------------ the HTTP app, real loopback servers

class _Replica:
    """A model server on loopback with `slots` slots that reports them as llama-server's /slots does; each
    completion holds a slot until `release` is set."""

    def __init__(self, slots: int = 1):
        self.slots = slots
        self.busy = 0
        self.release = asyncio.Event()
        self.prompts: list[str] = []
        app = web.Application()
        app.router.add_get("/slots", self._slots)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self.server = TestServer(app)

    async def _slots(self, request: web.Request) -> web.Response:
        return web.json_response([{"id": i, "is_processing": i < self.busy} for i in range(self.slots)])

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.prompts.append(json.dumps(body))
        self.busy += 1
        try:
            if not body.get("quick"):
                await self.release.wait()
        finally:
            self.busy -= 1
        return web.json_response({"choices": [{"text": "ok"}]})


class _Provider:
    def __init__(self, metrics: Metrics, endpoints: list[Endpoint]):
        self.metrics_registry = metrics.registry
        self.endpoints = endpoints

    def alive(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def routes(self, model: str) -> list[Endpoint]:
        return self.endpoints

    def models(self) -> list[ModelCard]:
        return [ModelCard(id="m", replicas=len(self.endpoints), ready_replicas=len(self.endpoints))]

    def verify_api_key(self, key: str):
        return None


def _board() -> LoadBoard:
    return LoadBoard(path=lambda rt: agentd_load_path(rt), read=lambda rt, st, b: agentd_read_load(rt, st, b),
                     period=0.05)


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_every_replica_full_some_wait_and_succeed_the_rest_get_429_with_retry_after():
    async def scenario() -> None:
        metrics = Metrics("n")
        replica = _Replica(slots=1)
        async with replica.server:
            endpoints = [ep("r", str(replica.server.make_url("/")).rstrip("/"))]
            options = HttpOptions(require_api_key=False, replica_max_queue=0, saturation_queue=2,
                                  saturation_wait=30.0)
            board = _board()
            app = make_http_app(_Provider(metrics, endpoints), metrics=metrics, options=options, board=board)
            async with TestClient(TestServer(app)) as client:
                def post():
                    return client.post("/v1/completions", json={"model": "m", "prompt": "x"})

                long = asyncio.ensure_future(post())
                await _until(lambda: replica.busy == 1 and (board.load("r") or (0,))[0] == 1)
                burst = [asyncio.ensure_future(post()) for _ in range(5)]
                done, pending = await asyncio.wait(burst, timeout=2.0)
                refused = [await t.result().json() | {"headers": dict(t.result().headers),
                                                      "status": t.result().status} for t in done]
                assert len(refused) == 3 and len(pending) == 2, (len(done), refused)
                for r in refused:
                    assert r["status"] == 429 and r["headers"]["Retry-After"] == "1"
                    assert r["error"]["code"] == "model_at_capacity" and r["error"]["type"] == "rate_limit_error"
                assert replica.busy == 1  # the two waiting were not sent to the busy slot
                text = (await (await client.get("/metrics")).read()).decode()
                assert 'agentd_proxy_queued{model="m"} 2.0' in text
                assert 'agentd_proxy_rejected_total{model="m",reason="queue_full"} 3.0' in text
                assert 'agentd_replica_queue_depth{model="m",replica="r"}' in text
                replica.release.set()
                answers = [await t for t in [long, *pending]]
                assert [a.status for a in answers] == [200, 200, 200]
                assert len(replica.prompts) == 3
                text = (await (await client.get("/metrics")).read()).decode()
                assert 'agentd_proxy_queue_wait_seconds_count{model="m"} 2.0' in text

    asyncio.run(scenario())


def test_a_waiting_request_goes_to_the_first_replica_with_room_and_times_out_with_429():
    async def scenario() -> None:
        metrics = Metrics("n")
        a, b = _Replica(slots=1), _Replica(slots=1)
        async with a.server, b.server:
            endpoints = [ep("a", str(a.server.make_url("/")).rstrip("/")),
                         ep("b", str(b.server.make_url("/")).rstrip("/"))]
            options = HttpOptions(require_api_key=False, replica_max_queue=0, saturation_queue=4,
                                  saturation_wait=0.5)
            board = _board()
            app = make_http_app(_Provider(metrics, endpoints), metrics=metrics, options=options, board=board)
            async with TestClient(TestServer(app)) as client:
                def post():
                    return client.post("/v1/completions", json={"model": "m", "prompt": "x"})

                first, second = asyncio.ensure_future(post()), asyncio.ensure_future(post())
                await _until(lambda: a.busy == 1 and b.busy == 1)  # one each: the second skipped the busy one
                await _until(lambda: all((board.load(i) or (0,))[0] == 1 for i in "ab"))
                timed_out = await post()
                assert timed_out.status == 429 and "0.5s" in (await timed_out.json())["error"]["message"]
                third = asyncio.ensure_future(post())
                await asyncio.sleep(0.1)
                b.release.set()  # b frees up: the waiter goes there, not behind a's generation
                assert (await third).headers["X-Agentd-Instance"] == "b"
                a.release.set()
                assert [(await t).status for t in (first, second)] == [200, 200]
                text = (await (await client.get("/metrics")).read()).decode()
                assert 'agentd_proxy_rejected_total{model="m",reason="timeout"} 1.0' in text

    asyncio.run(scenario())


def test_prefix_affinity_keeps_a_chat_on_its_replica_until_it_is_overloaded():
    async def scenario() -> None:
        metrics = Metrics("n")
        a, b = _Replica(slots=1), _Replica(slots=1)
        async with a.server, b.server:
            endpoints = [ep("a", str(a.server.make_url("/")).rstrip("/")),
                         ep("b", str(b.server.make_url("/")).rstrip("/"))]
            app = make_http_app(_Provider(metrics, endpoints), metrics=metrics,
                                options=HttpOptions(require_api_key=False), board=_board())
            system = {"role": "system", "content": "You are a careful assistant. " * 40}
            async with TestClient(TestServer(app)) as client:
                async def turn(n: int) -> str:
                    msgs = [system, *({"role": "user", "content": f"question {k} " * 20} for k in range(n))]
                    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": msgs,
                                                                        "quick": True})
                    assert r.status == 200
                    return r.headers["X-Agentd-Instance"]

                where = [await turn(n) for n in range(1, 7)]
                assert len(set(where)) == 1, where  # round-robin alone would alternate
                home = a if where[0] == "a" else b
                # Its replica busy (its slot taken by a request that did not pass this proxy), the other free: the
                # next turn goes elsewhere, and stays there.
                other = a if home is b else b
                blocker = asyncio.ensure_future(client.session.post(str(home.server.make_url("/v1/completions")),
                                                                    json={"prompt": "z"}))
                await _until(lambda: home.busy == 1)
                await asyncio.sleep(0.3)  # a few poll periods: the proxy has read the busy slot
                moved = await turn(7)
                assert moved == ("a" if other is a else "b")
                assert await turn(8) == moved
                home.release.set()
                other.release.set()
                (await blocker).release()

    asyncio.run(scenario())


def test_a_connection_closed_before_the_answer_is_retried_on_the_same_replica_first():
    """A pooled connection the model server had just timed out fails as 'server disconnected'; trying the same
    replica again on a new connection keeps the request where its prompt cache is."""
    async def scenario() -> None:
        hits = {"a": 0, "b": 0}

        def server(name: str) -> TestServer:
            async def complete(request: web.Request) -> web.StreamResponse:
                hits[name] += 1
                if name == "a" and hits["a"] == 1:
                    assert request.transport is not None
                    request.transport.close()  # closed without an answer
                    return web.Response()
                return web.json_response({"choices": [{"text": name}]})

            app = web.Application()
            app.router.add_post("/v1/completions", complete)
            return TestServer(app)

        a, b = server("a"), server("b")
        metrics = Metrics("n")
        async with a, b:
            endpoints = [ep("a", str(a.make_url("/")).rstrip("/")), ep("b", str(b.make_url("/")).rstrip("/"))]
            app = make_http_app(_Provider(metrics, endpoints), metrics=metrics,
                                options=HttpOptions(require_api_key=False))
            async with TestClient(TestServer(app)) as client:
                r = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
                assert r.status == 200 and r.headers["X-Agentd-Instance"] == "a"
                assert hits == {"a": 2, "b": 0}

    asyncio.run(scenario())
