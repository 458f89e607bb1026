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
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import timeit
from pathlib import Path

from agentd.security import apikeys as K
from agentd.security import ca as C
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="calls per measurement")
    args = ap.parse_args()

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
