"""Routing by the replicas' own load without agents (issue 21 item 3): the balancer's order and the board that
polls a real HTTP server. With real agents and llama-servers: test_load_routing_e2e.py."""

from __future__ import annotations

import asyncio

import aiohttp
from agentd_llamabox.load import agentd_load_path, agentd_read_load
from aiohttp import web
from aiohttp.test_utils import TestServer

from agentd.api.load import LoadBoard
from agentd.api.openai_proxy import Balancer, Endpoint


def ep(name: str, url: str = "http://127.0.0.1:1", runtime: str = "llamabox") -> Endpoint:
    return Endpoint(url=url, api_key="k", ready=True, instance_id=name, runtime=runtime)


def test_the_least_busy_replica_first_and_a_full_one_last():
    b = Balancer()
    eps = [ep("a"), ep("b"), ep("c")]
    load = {"a": (3, 4), "b": (1, 4), "c": (4, 4)}.get
    for _ in range(4):  # whatever the round-robin turn
        assert [e.instance_id for e in b.order("m", eps, load)] == ["b", "a", "c"]
    # Its own outstanding requests count when the server has not said more.
    with b.track("b"), b.track("b"), b.track("b"), b.track("b"):
        assert [e.instance_id for e in b.order("m", eps, load)] == ["a", "b", "c"]
    # No reading: the proxy's own counters, round-robin among equals, as before.
    assert {b.order("m", eps, lambda i: None)[0].instance_id for _ in range(3)} == {"a", "b", "c"}


def test_llamabox_reads_its_slots():
    assert agentd_load_path("llamabox") == "/slots" and agentd_load_path("vllm") is None
    body = b'[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]'
    assert agentd_read_load("llamabox", 200, body) == (1, 2)
    assert agentd_read_load("llamabox", 501, body) is None
    assert agentd_read_load("llamabox", 200, b"not json") is None
    assert agentd_read_load("vllm", 200, body) is None


def test_the_board_polls_what_the_proxy_routes_to_and_forgets_stale_readings():
    async def scenario() -> None:
        seen_keys: list[str] = []

        async def slots(request: web.Request) -> web.Response:
            seen_keys.append(request.headers.get("Authorization", ""))
            return web.json_response([{"is_processing": True}, {"is_processing": True}])

        app = web.Application()
        app.router.add_get("/slots", slots)
        now = [0.0]
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            board = LoadBoard(path=lambda rt: agentd_load_path(rt),
                              read=lambda rt, st, body: agentd_read_load(rt, st, body), clock=lambda: now[0])
            url = str(server.make_url("/")).rstrip("/")
            board.seen([ep("busy", url), ep("dead", "http://127.0.0.1:9"), ep("other", url, runtime="vllm")])
            await board.poll_once(session)
            assert board.load("busy") == (2, 2, 0) and board.load("dead") is None and board.load("other") is None
            assert seen_keys == ["Bearer k"]
            now[0] += 2.0  # older than three poll periods: not used
            assert board.load("busy") is None
            now[0] += 60.0  # not routed to for longer than the ttl: not polled any more
            await board.poll_once(session)
            assert seen_keys == ["Bearer k"]

    asyncio.run(scenario())
