"""Copies of model files between agents against curl, and what hashing costs (issue 19).

    .venv/bin/python benchmarks/model_fetch.py [--gib 2] [--runs 6] [--fetch] [--aiohttp] [--curl-verify]

On loopback, with the same TLS on both (TLS 1.3, its default suite, one self-signed P-256 certificate):

* digest: sha256 of the file in agentd's hashing thread, seconds per GiB, and the event loop's worst lag
  meanwhile (a 10 ms ticker on the loop); and the worst lag of an idle loop for 5 s (the machine's share);
* each run is a pair, its order alternating (agentd then curl, curl then agentd, ...), so that a drift in
  the machine's load hits both alike; a pause before each copy lets the last one's cleanup settle:
  * agentd: the Models service with its transfer listener in a process of its own (as a holder agent
    serves it) and agentd's Fetcher in this process (Models.Open, then the raw TLS byte stream, sha256
    verified while written, the file renamed into place): throughput, CPU seconds per GiB of each side
    (this process's rusage; the holder's from /proc), each side's worst event-loop lag;
  * curl: the same file from openssl's `s_server -WWW` (a C static file server) written to disk by
    `curl -o`: throughput, curl's CPU per GiB (rusage of the waited-for child) and s_server's (/proc);
* `--fetch` adds a copy over the Models.Fetch gRPC stream (what a holder without Open serves),
  `--aiohttp` curl from aiohttp's static server (slow), `--curl-verify` the same work as agentd's with
  standard tools: `curl | tee FILE | sha256sum` from s_server (download, write and verify).

Each run prints a line; the end prints the median, min and max of each figure and of the ratio
agentd/curl, and the load average (1 min) at the start, in the runs and at the end.
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


def curl_copy(name: str, size: int, port: int, cert: Path, out: Path, server_pid: int) -> dict:
    """curl fetching from openssl's s_server: throughput, curl's CPU per GiB (the kernel's accounting of the
    waited-for child) and the server's (from /proc)."""
    r0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu(server_pid)
    t = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "--tlsv1.3", "--cacert", str(cert), "-o", str(out),
                    f"https://127.0.0.1:{port}/{name}"], check=True)
    took = time.perf_counter() - t
    r1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu(server_pid)
    assert out.stat().st_size == size
    gib = size / GiB
    return {"seconds": took, "gib_per_s": gib / took,
            "client_cpu_per_gib": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / gib,
            "server_cpu_per_gib": (s1 - s0) / gib}


def curl_verify_copy(name: str, size: int, port: int, cert: Path, out: Path, sha: str, server_pid: int) -> dict:
    """What agentd's copy does, with standard tools: curl, tee to the file, sha256sum of the stream."""
    r0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu(server_pid)
    t = time.perf_counter()
    said = subprocess.run(f"curl -sS --fail --tlsv1.3 --cacert '{cert}' 'https://127.0.0.1:{port}/{name}' "
                          f"| tee '{out}' | sha256sum", shell=True, check=True, capture_output=True, text=True)
    took = time.perf_counter() - t
    r1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu(server_pid)
    assert out.stat().st_size == size and said.stdout.split()[0] == sha
    gib = size / GiB
    return {"seconds": took, "gib_per_s": gib / took,
            "client_cpu_per_gib": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / gib,
            "server_cpu_per_gib": (s1 - s0) / gib}


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


def spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    n = len(xs)
    median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return {"median": round(median, 3), "min": round(xs[0], 3), "max": round(xs[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=6, help="pairs of copies (agentd and curl, alternating order)")
    ap.add_argument("--fetch", action="store_true", help="also copy over the Models.Fetch gRPC stream (slow)")
    ap.add_argument("--aiohttp", action="store_true", help="also curl from aiohttp's static server (slow)")
    ap.add_argument("--curl-verify", action="store_true",
                    help="also curl | tee FILE | sha256sum from s_server: the same work as agentd's copy")
    ap.add_argument("--pause", type=float, default=3.0,
                    help="seconds before each copy: the freed pages of the last one are handed back to the VM host "
                         "(virtio free page reporting, 2 s), so each copy starts alike")
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
        idle_lag = asyncio.run(idle_loop_lag(5.0))
        result: dict = {"size_gib": args.gib, "load_avg_1m_start": round(os.getloadavg()[0], 2),
                        "digest_s_per_gib": round(per_gib, 3), "digest_loop_worst_lag_ms": round(lag * 1000, 1),
                        "idle_loop_worst_lag_ms": round(idle_lag * 1000, 1), "runs": []}
        print(json.dumps(result), flush=True)
        gport, hport = free_port(), free_port()
        os.environ["BENCH_HOLDER_LAG"] = str(d / "holder-lag.log")
        server = start(["--serve", str(src), sha, str(gport), str(cert), str(key)])
        static = start(["--static", str(src.parent), str(hport), str(cert), str(key)]) if args.aiohttp else None
        oport = free_port()
        openssl = start_openssl(src.parent, oport, cert, key)
        os.environ["BENCH_SERVER_PID"] = str(server.pid)
        dest = d / "dest"

        def ours(stream: bool) -> dict:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            c0 = proc_cpu(server.pid)
            time.sleep(args.pause)
            idle = (proc_cpu(server.pid) - c0) / args.pause if args.pause else 0.0
            try:
                # The holder's idle CPU per second (its gRPC server and its lag probe, 100 wakeups a second)
                # is in its CPU per GiB too: at a slow copy (a loaded machine) it is a large part of it.
                return asyncio.run(agentd_copy(src, sha, size, gport, cert, dest, stream=stream)) | {
                    "server_idle_cpu_per_s": idle}
            finally:
                shutil.rmtree(dest, ignore_errors=True)

        def theirs(port: int, pid: int) -> dict:
            time.sleep(args.pause)
            try:
                return curl_copy(src.name, size, port, cert, d / "curl.out", pid)
            finally:
                (d / "curl.out").unlink(missing_ok=True)

        try:
            for i in range(args.runs):
                load = os.getloadavg()[0]
                if i % 2 == 0:  # alternate which goes first: a drift in the machine's load hits both alike
                    a, c = ours(True), theirs(oport, openssl.pid)
                else:
                    c, a = theirs(oport, openssl.pid), ours(True)
                run = {"load_avg_1m": round(load, 2), "agentd": {k: round(v, 3) for k, v in a.items()},
                       "curl_openssl": {k: round(v, 3) for k, v in c.items()},
                       "ratio": round(a["gib_per_s"] / c["gib_per_s"], 3)}
                if args.fetch:
                    run["agentd_over_fetch"] = {k: round(v, 3) for k, v in ours(False).items()}
                if static is not None:
                    run["curl_aiohttp"] = {k: round(v, 3) for k, v in theirs(hport, static.pid).items()}
                if args.curl_verify:
                    time.sleep(args.pause)
                    try:
                        v = curl_verify_copy(src.name, size, oport, cert, d / "curl.out", sha, openssl.pid)
                    finally:
                        (d / "curl.out").unlink(missing_ok=True)
                    run["curl_tee_sha256sum"] = {k: round(x, 3) for k, x in v.items()}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
        finally:
            for p in (server, static, openssl):
                if p is not None:
                    p.terminate()
                    p.wait()
    runs = result["runs"]
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    result["summary"] = {
        "ratio": spread([r["ratio"] for r in runs]),
        **{f"{who}_{k}": spread([r[who][k] for r in runs])
           for who in ("agentd", "curl_openssl") for k in ("gib_per_s", "client_cpu_per_gib", "server_cpu_per_gib")},
        "agentd_loop_worst_lag_ms": max(r["agentd"]["loop_worst_lag_ms"] for r in runs),
        "holder_loop_worst_lag_ms": max(r["agentd"]["holder_loop_worst_lag_ms"] for r in runs),
        **({"curl_tee_sha256sum_gib_per_s": spread([r["curl_tee_sha256sum"]["gib_per_s"] for r in runs])}
           if args.curl_verify else {}),
        "load_avg_1m": spread([r["load_avg_1m"] for r in runs]),
        "load_avg_1m_end": result["load_avg_1m_end"],
    }
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
