"""What the /v1/ proxy and the auth checks cost, on loopback.

    .venv/bin/python benchmarks/proxy.py [--requests 2000] [--concurrency 32]

A fake model server answers a small JSON completion at once (and streams 64
SSE chunks for the streaming case), so the numbers are the proxy's own
overhead: direct vs through agentd's HTTP app with API key checks, routing,
the balancer and the upstream key. Also: API key verification and
peer-certificate role extraction, per call.
Targets: proxy overhead under 1 ms per request at p50; key check under 20 µs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from agentd.api.http import HttpOptions, ModelCard, make_http_app  # noqa: E402
from agentd.api.openai_proxy import Endpoint  # noqa: E402
from agentd.metrics import Metrics  # noqa: E402
from agentd.security import apikeys as K  # noqa: E402
from agentd.security import ca as C  # noqa: E402
from agentd.security.auth import identify  # noqa: E402

CHUNKS = 64


async def upstream(request: web.Request) -> web.StreamResponse:
    payload = await request.json()
    if not payload.get("stream"):
        return web.json_response({"id": "x", "choices": [{"text": "hello"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(CHUNKS):
        await resp.write(f'data: {{"i": {i}}}\n\n'.encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def slots(request: web.Request) -> web.Response:
    return web.json_response([{"id": 0, "is_processing": False}, {"id": 1, "is_processing": True}])


class Provider:
    def __init__(self, url: str, metrics: Metrics, keys: dict, runtime: str = ""):
        self.metrics_registry = metrics.registry
        self._eps = [Endpoint(url=url, api_key="k", ready=True, instance_id=f"r{i}", runtime=runtime)
                     for i in range(2)]
        self._keys = keys

    def alive(self):
        return True

    def ready(self):
        return True, "ok"

    def routes(self, model):
        return self._eps

    def models(self):
        return [ModelCard(id="m", tenant="t")]

    def verify_api_key(self, key):
        return K.verify_key(self._keys, key, now=time.time())


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def load(client: aiohttp.ClientSession, url: str, headers: dict, body: dict, n: int, conc: int,
               stream: bool = False) -> tuple[list[float], float]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(conc)

    async def one():
        async with sem:
            t = time.perf_counter()
            async with client.post(url, json=body, headers=headers) as r:
                if stream:
                    await r.content.readuntil(b"\n\n")
                    latencies.append(time.perf_counter() - t)
                    await r.read()
                else:
                    await r.read()
                    latencies.append(time.perf_counter() - t)
                assert r.status == 200, r.status

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return latencies, time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000


async def http_bench(n: int, conc: int) -> None:
    up_app = web.Application()
    up_app.router.add_post("/v1/completions", upstream)
    up_app.router.add_post("/v1/chat/completions", upstream)
    up_app.router.add_get("/slots", slots)
    up_runner, up_url = await start(up_app)
    secret, rec = K.new_api_key(tenant="t", now=time.time(), random_bytes=random.Random(1).randbytes)
    metrics = Metrics("bench")
    px_runner, px_url = await start(make_http_app(Provider(up_url, metrics, K.add_key({}, rec)), metrics=metrics))
    # The same with load-aware routing (issue 21 item 3): the board polls /slots twice a second in the background.
    from agentd_llamabox.load import agentd_read_load

    from agentd.api.load import LoadBoard

    board = LoadBoard(path=lambda rt: "/slots", read=lambda rt, st, b: agentd_read_load("llamabox", st, b))
    lb_runner, lb_url = await start(make_http_app(Provider(up_url, metrics, K.add_key({}, rec), runtime="llamabox"),
                                                  metrics=metrics, board=board))
    # Load-aware routing without prefix affinity, for the chat cases (issue 21 item 3): the cost of the keys.
    board2 = LoadBoard(path=lambda rt: "/slots", read=lambda rt, st, b: agentd_read_load("llamabox", st, b))
    na_runner, na_url = await start(make_http_app(Provider(up_url, metrics, K.add_key({}, rec), runtime="llamabox"),
                                                  metrics=metrics, board=board2,
                                                  options=HttpOptions(prefix_affinity=False)))
    auth = {"Authorization": f"Bearer {secret}"}
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        await load(client, px_url + "/v1/completions", auth, {"model": "m"}, 200, conc)  # warm up
        await load(client, lb_url + "/v1/completions", auth, {"model": "m"}, 200, conc)
        await load(client, na_url + "/v1/completions", auth, {"model": "m"}, 200, conc)
        await asyncio.sleep(1.0)  # the board has read both replicas' load
        for label, url, hdr, c, stream in [
            ("direct, sequential", up_url, {}, 1, False),
            ("proxied, sequential", px_url, auth, 1, False),
            (f"direct, {conc} concurrent", up_url, {}, conc, False),
            ("load-routed, sequential", lb_url, auth, 1, False),
            (f"proxied, {conc} concurrent", px_url, auth, conc, False),
            (f"load-routed, {conc} concurrent", lb_url, auth, conc, False),
            ("direct, stream TTFB", up_url, {}, 1, True),
            ("proxied, stream TTFB", px_url, auth, 1, True),
        ]:
            body = {"model": "m", "stream": stream}
            cpu = time.process_time()
            lat, wall = await load(client, url + "/v1/completions", hdr, body, n, c, stream)
            cpu = (time.process_time() - cpu) / n * 1e6
            rows.append((label, statistics.median(lat) * 1000, pct(lat, 0.99), n / wall, cpu))
        # A 6-turn chat with a 1,300-character system prompt (about 4 KB of messages): the prefix keys are hashed
        # per request (16 block and message-end keys) and looked up; same fake server, which ignores the text.
        chat = {"model": "m", "messages": [{"role": "system", "content": "You are a careful assistant. " * 45},
                                           *({"role": r, "content": f"turn {i}: " + "words " * 50}
                                             for i in range(6) for r in ("user", "assistant"))]}
        for label, url in [("load-routed, 4 KB chat", na_url), ("  + prefix affinity", lb_url)]:
            cpu = time.process_time()
            lat, wall = await load(client, url + "/v1/chat/completions", auth, chat, n, 1)
            cpu = (time.process_time() - cpu) / n * 1e6
            rows.append((label + ", sequential", statistics.median(lat) * 1000, pct(lat, 0.99), n / wall, cpu))
    await px_runner.cleanup()
    await lb_runner.cleanup()
    await na_runner.cleanup()
    await up_runner.cleanup()
    # CPU: this process's CPU time per request; client, proxy and fake server all run here, so proxied minus
    # direct is the proxy's own work, and it does not grow with the machine's load as wall-clock latency does.
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':<40} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'CPU µs/req':>11}")
    for label, p50, p99, rps, cpu in rows:
        print(f"{label:<40} {p50:8.3f} {p99:8.3f} {rps:8.0f} {cpu:11.0f}")


def micro() -> None:
    secret, rec = K.new_api_key(tenant="t", now=0, random_bytes=random.Random(2).randbytes)
    store = {rec.id: rec}
    for i in range(10_000):  # a realistic store size
        _, r = K.new_api_key(tenant="t", now=0, random_bytes=random.Random(i + 10).randbytes)
        store[r.id] = r
    n = 50_000
    t = time.perf_counter()
    for _ in range(n):
        K.verify_key(store, secret, now=1)
    key_us = (time.perf_counter() - t) / n * 1e6
    authority = C.create_ca()
    cert = C.issue_identity(authority, "n1", role="node").cert_pem
    ctx = {"x509_pem_cert": [cert]}
    m = 5_000
    t = time.perf_counter()
    for _ in range(m):
        identify(ctx, (), lambda tok: None)
    cert_us = (time.perf_counter() - t) / m * 1e6
    cache: dict = {}
    t = time.perf_counter()
    for _ in range(n):
        identify(ctx, (), lambda tok: None, cache)
    cached_us = (time.perf_counter() - t) / n * 1e6
    print(f"{'check':<40} {'µs/call':>8}")
    print(f"{'API key verify (10,001 keys in store)':<40} {key_us:8.2f}")
    print(f"{'gRPC caller from peer certificate':<40} {cert_us:8.2f}")
    print(f"{'  same, cached (as AuthInterceptor does)':<40} {cached_us:8.2f}")


def routing_micro() -> None:
    """CPU per request of the routing decisions alone (issue 21 item 3), in process: no sockets, so the machine's
    load does not enter; process CPU time, best and worst of 5 rounds."""
    from agentd.api.affinity import PrefixTable
    from agentd.api.openai_proxy import Balancer

    eps = [Endpoint(url="", api_key=None, ready=True, instance_id=f"r{i}", runtime="llamabox") for i in range(2)]
    readings = {"r0": (2, 4, 0), "r1": (3, 4, 0)}
    chat = {"model": "m", "messages": [{"role": "system", "content": "You are a careful assistant. " * 45},
                                       *({"role": r, "content": f"turn {i}: " + "words " * 50}
                                         for i in range(6) for r in ("user", "assistant"))]}
    table = PrefixTable()
    table.record("m", table.keys(chat)[:8], "r1")

    def least_outstanding(b: Balancer) -> None:
        b.order("m", eps)

    def load_aware(b: Balancer) -> None:
        ordered = b.order("m", eps, readings.get)
        b.pressure(ordered[0], readings.get)

    def affinity(b: Balancer) -> None:
        table.lookup("m", table.keys(chat))

    print(f"{'routing step (in process)':<40} {'µs/request CPU, best-worst of 5':>32}")
    for label, fn in [("least outstanding (order)", least_outstanding),
                      ("load-aware (order + full check)", load_aware),
                      ("prefix keys + lookup, 4 KB chat", affinity)]:
        b = Balancer(max_queue=8)
        rounds = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(20_000):
                fn(b)
            rounds.append((time.process_time() - t) / 20_000 * 1e6)
        print(f"{label:<40} {min(rounds):15.2f} - {max(rounds):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    asyncio.run(http_bench(args.requests, args.concurrency))
    print()
    micro()
    print()
    routing_micro()


if __name__ == "__main__":
    main()
