"""Copies of model files between agents, and what hashing costs (issue 19).

    .venv/bin/python benchmarks/model_fetch.py [--gib 2] [--runs 2]

In one run, on loopback, with the same TLS (TLS 1.3, one self-signed P-256 certificate):

* digest: sha256 of a GIB file in agentd's hashing thread, seconds per GiB, and the event loop's worst
  lag meanwhile (a 10 ms ticker on the loop);
* agentd: the Models service with its transfer listener in a process of its own (as a holder agent serves
  it) and agentd's Fetcher in this process (as the fetching agent runs it: Models.Open, then the raw TLS
  byte stream, sha256 verified while written, the file renamed into place); throughput, CPU seconds per
  GiB of each side, and each side's worst event-loop lag (a 10 ms ticker on each loop); then the same
  copy over the Models.Fetch gRPC stream (what a holder without Open serves); and, before each run, the
  worst lag of an idle loop in this process for 10 s (the machine's share of any lag);
* curl: the same file over HTTPS from openssl's `s_server -WWW` (a C static file server) in a process of
  its own, written to disk by `curl -o`; throughput; `--aiohttp` adds aiohttp's static server (slow).

The ratio agentd/curl is printed per run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 1024**3
BLOCK = 64 * 1024 * 1024


def make_file(path: Path, size: int) -> str:
    block = os.urandom(BLOCK)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = block[:min(left, BLOCK)]
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def make_cert(d: Path) -> tuple[Path, Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LagMeter:
    """The loop's worst lag: a 10 ms ticker that notes how late it wakes."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - t - 0.01)

    def __enter__(self) -> LagMeter:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- the holder process


def serve(path: Path, sha: str, port: int, cert: Path, key: Path) -> None:
    import grpc

    from agentd.api.fetch import ModelsService
    from agentd.api.transfer import TransferServer
    from agentd.modelinfo import inspect_model
    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.types import HeldModel, ModelFile
    from agentd.v1 import models_pb2_grpc as mpb_grpc

    # Facts are irrelevant to a copy, but a holder serves only models it could run: any ModelInfo will do.
    info = inspect_model(write_tiny_llama_gguf(Path(tempfile.mkdtemp()) / "facts.gguf"))
    held = HeldModel(name="big", digest="sha256:" + sha, path=str(path), size=path.stat().st_size,
                     files=(ModelFile(name=path.name, size=path.stat().st_size, sha256=sha),), info=info)

    async def main() -> None:
        from agentd.cluster.raft.transport import CHANNEL_OPTIONS

        server = grpc.aio.server(options=CHANNEL_OPTIONS)

        async def locate(digest, caller):
            return held, []

        def tls() -> ssl.SSLContext:  # the same TLS as curl's servers get (agentd adds a client certificate)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(cert, key)
            return ctx

        transfer = TransferServer("127.0.0.1", 0, context=tls)
        mpb_grpc.add_ModelsServicer_to_server(ModelsService(models=lambda: [held], locate=locate, transfer=transfer),
                                              server)
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        lag_log = open(os.environ["BENCH_HOLDER_LAG"], "a", buffering=1)  # noqa: SIM115

        async def lag() -> None:  # the holder's loop: the worst lag of each 0.2 s window, with its time
            while True:
                worst, t_end = 0.0, time.perf_counter() + 0.2
                while time.perf_counter() < t_end:
                    t = time.perf_counter()
                    await asyncio.sleep(0.01)
                    worst = max(worst, time.perf_counter() - t - 0.01)
                lag_log.write(f"{time.time()} {worst}\n")

        probe = asyncio.get_running_loop().create_task(lag())
        print("ready", flush=True)
        await server.wait_for_termination()
        probe.cancel()

    asyncio.run(main())


def serve_static(root: Path, port: int, cert: Path, key: Path) -> None:
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/", root)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, print=None)


def start(args: list[str]) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- measurements


async def digest(path: Path, size: int) -> tuple[float, float]:
    from agentd.inventory.models import DigestCache, Hasher, file_key

    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    hasher = Hasher(DigestCache(None), lambda: loop.call_soon_threadsafe(done.set))
    with LagMeter() as lag:
        t = time.perf_counter()
        hasher.want(file_key(path))
        await done.wait()
        took = time.perf_counter() - t
    hasher.stop()
    return took / (size / GiB), lag.worst


async def idle_loop_lag(seconds: float) -> float:
    """The worst lag of a loop with nothing else to do: what the machine's load alone costs a loop here."""
    with LagMeter() as lag:
        await asyncio.sleep(seconds)
    return lag.worst


def holder_lag(since: float, until: float) -> float:
    worst = 0.0
    with open(os.environ["BENCH_HOLDER_LAG"]) as f:
        for line in f:
            t, lag = map(float, line.split())
            if since <= t <= until + 0.2:
                worst = max(worst, lag)
    return worst


async def agentd_copy(src: Path, sha: str, size: int, port: int, cert: Path, dest: Path, stream: bool) -> dict:
    import grpc

    from agentd.api.fetch import Fetcher
    from agentd.cluster.raft.transport import CHANNEL_OPTIONS
    from agentd.types import HeldModel, ModelFile

    held = HeldModel(name="big", digest="sha256:" + sha, path=str(src), size=size,
                     files=(ModelFile(name=src.name, size=size, sha256=sha),))
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=CHANNEL_OPTIONS)

    async def locate(digest):
        return held, [("holder", f"127.0.0.1:{port}")]

    done = asyncio.Event()
    def tls() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cert)
        return ctx

    fetcher = Fetcher(node="bench", model_dir=dest, channel=lambda a: channel, locate=locate,
                      on_change=done.set, transfer_context=tls if stream else None)
    fetcher.transfer_hostname = "localhost"
    server_pid = int(os.environ["BENCH_SERVER_PID"])
    with LagMeter() as lag:
        c0, s0, t0, w0 = cpu(), proc_cpu(server_pid), time.perf_counter(), time.time()
        f = fetcher.ensure("big", held.digest)
        await done.wait()
        took = time.perf_counter() - t0
        c1, s1 = cpu(), proc_cpu(server_pid)
    assert f.state == "DONE", f.reason
    await fetcher.close()
    await channel.close()
    return {"seconds": took, "gib_per_s": size / GiB / took, "client_cpu_per_gib": (c1 - c0) / (size / GiB),
            "server_cpu_per_gib": (s1 - s0) / (size / GiB), "loop_worst_lag_ms": lag.worst * 1000,
            "holder_loop_worst_lag_ms": holder_lag(w0, time.time()) * 1000}


def curl_copy(name: str, size: int, port: int, cert: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "--tlsv1.3", "--cacert", str(cert), "-o", str(out),
                    f"https://127.0.0.1:{port}/{name}"], check=True)
    took = time.perf_counter() - t
    assert out.stat().st_size == size
    return size / GiB / took



def start_openssl(root: Path, port: int, cert: Path, key: Path) -> subprocess.Popen:
    """openssl's own HTTPS file server (`s_server -WWW`, C): a second, faster reference than aiohttp's."""
    import socket

    p = subprocess.Popen(["openssl", "s_server", "-WWW", "-quiet", "-accept", str(port), "-cert", str(cert),
                          "-key", str(key)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return p
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("openssl s_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--aiohttp", action="store_true", help="also curl from aiohttp's static server (slow)")
    ap.add_argument("--serve", nargs=5, metavar=("PATH", "SHA", "PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    ap.add_argument("--static", nargs=4, metavar=("ROOT", "PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        p, sha, port, cert, key = args.serve
        return serve(Path(p), sha, int(port), Path(cert), Path(key))
    if args.static:
        root, port, cert, key = args.static
        return serve_static(Path(root), int(port), Path(cert), Path(key))
    size = int(args.gib * GiB)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        src = d / "src" / "big.gguf"
        src.parent.mkdir()
        sha = make_file(src, size)
        cert, key = make_cert(d)
        per_gib, lag = asyncio.run(digest(src, size))
        result: dict = {"size_gib": args.gib, "digest_s_per_gib": round(per_gib, 3),
                        "digest_loop_worst_lag_ms": round(lag * 1000, 1), "runs": []}
        gport, hport = free_port(), free_port()
        os.environ["BENCH_HOLDER_LAG"] = str(d / "holder-lag.log")
        server = start(["--serve", str(src), sha, str(gport), str(cert), str(key)])
        static = start(["--static", str(src.parent), str(hport), str(cert), str(key)])
        oport = free_port()
        openssl = start_openssl(src.parent, oport, cert, key)
        os.environ["BENCH_SERVER_PID"] = str(server.pid)
        try:
            for _ in range(args.runs):
                dest = d / "dest"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                load = os.getloadavg()[0]
                idle_lag = asyncio.run(idle_loop_lag(10.0))
                fast = curl_copy(src.name, size, oport, cert, d / "curl.out")
                (d / "curl.out").unlink()
                ours = asyncio.run(agentd_copy(src, sha, size, gport, cert, dest, stream=True))
                shutil.rmtree(dest)
                dest.mkdir()
                grpc_only = asyncio.run(agentd_copy(src, sha, size, gport, cert, dest, stream=False))
                shutil.rmtree(dest)
                theirs = curl_copy(src.name, size, hport, cert, d / "curl.out") if args.aiohttp else 0.0
                (d / "curl.out").unlink(missing_ok=True)
                ours = {k: round(v, 3) for k, v in ours.items()}
                grpc_only = {k: round(v, 3) for k, v in grpc_only.items()}
                run = {"load_avg_1m": round(load, 1), "idle_loop_worst_lag_ms": round(idle_lag * 1000, 1),
                       "agentd": ours, "agentd_over_fetch": grpc_only,
                       "curl_openssl_gib_per_s": round(fast, 3),
                       "ratio_openssl": round(ours["gib_per_s"] / fast, 2),
                       "ratio_openssl_over_fetch": round(grpc_only["gib_per_s"] / fast, 2)}
                if args.aiohttp:
                    run |= {"curl_aiohttp_gib_per_s": round(theirs, 3),
                            "ratio_aiohttp": round(ours["gib_per_s"] / theirs, 2)}
                result["runs"].append(run)
                print(json.dumps(result["runs"][-1]), flush=True)
        finally:
            server.terminate()
            static.terminate()
            openssl.terminate()
            openssl.wait()
            server.wait()
            static.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
