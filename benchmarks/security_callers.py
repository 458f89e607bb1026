"""What judging the original caller costs (issue 13): Status and Deploy latency, before and after, same run.

    .venv/bin/python benchmarks/security_callers.py [--n 200] [--deploys 40] [--rounds 2] [--before REV]
    (or: .venv/bin/python benchmarks/security.py --callers ...)

Before the change, a follower forwarded any call to the leader under its own
certificate; now it forwards an admin key (the leader verifies it again) and
redirects an admin certificate to the leader (the client reconnects there).
Each round starts a 3-agent mTLS cluster (LocalCluster, one simulated GPU
each) on the code before issue 13 (`--before`, default `BEFORE`, checked out
in a temporary git worktree and imported first via PYTHONPATH) and one on
this tree, interleaved, and measures from an admin:

* `Status` at the leader and at a follower (answered locally; the
  interceptor's revocation and membership checks are on this path);
* `Deploy` at the leader (a Raft write; `replicas: 0`, so nothing starts);
* `Deploy` through a follower with an admin key on the token port (forwarded);
* `Deploy` through a follower with an admin certificate, a new client per
  call as each CLI command is: before, one TLS handshake and a forward;
  now, the follower's redirect and a second handshake with the leader.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The last commit whose agent code has none of issue 13: 1aff4cc (issue 12, another engineer's) already carried
# part of it, picked up from the shared working tree. bf1cd58's LocalCluster carries one line of it (any_node
# when creating join tokens), which `measure` works around for such trees.
BEFORE = "bf1cd58"


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50": statistics.median(s) * 1e3, "p99": s[max(0, int(len(s) * 0.99) - 1)] * 1e3, "n": len(s)}


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(n: int, deploys: int) -> dict[str, dict[str, float]]:
    """One cluster of whatever agentd is imported first; the latencies in ms."""
    import grpc

    from agentd.api.client import ControlClient
    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.testing.localcluster import LocalCluster, simulated_host
    from agentd.v1 import control_pb2 as pb
    from agentd.v1 import control_pb2_grpc as pb_grpc
    from agentd.v1 import security_pb2 as spb

    if "any_node" not in spb.CreateJoinTokenRequest.DESCRIPTOR.fields_by_name:  # older protos: no binding
        def create_token(self, node_name: str = "", ttl: float = 600.0) -> str:
            with self.alive_agents()[0].client(timeout=10.0) as cl:
                return cl.call("CreateJoinToken", spb.CreateJoinTokenRequest(ttl_seconds=ttl,
                                                                            node_name=node_name)).token
        LocalCluster.create_token = create_token

    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny.gguf"
        write_tiny_llama_gguf(model, n_layers=8, hidden=256, ffn=512)
        c = LocalCluster(Path(tmp) / "c", hosts=[simulated_host(x, gpus=1) for x in "abc"], secure=True)
        try:
            c.start()
            c.wait_for_inventories()
            lead = c.leader()[0]
            leader = c.agents[lead]
            follower = next(a for a in c.agents.values() if a.name != lead)
            counter = iter(range(10**6))

            def spec() -> pb.DeploymentSpec:
                return pb.DeploymentSpec(name=f"bench-{next(counter)}", model=str(model), runtime="llamabox",
                                         replicas=0, options=pb.RuntimeOptions(ctx_size=256))

            with leader.client(timeout=30) as at_leader, follower.client(timeout=30) as at_follower:
                at_leader.status()
                at_follower.status()
                rows["Status at the leader"] = _stats(_timed(at_leader.status, n))
                rows["Status at a follower"] = _stats(_timed(at_follower.status, n))
                rows["Deploy at the leader"] = _stats(_timed(lambda: at_leader.deploy(spec()), deploys))
                key = at_leader.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="ops", admin=True)).key
            ca = (c.admin_dir / "ca.crt").read_bytes()
            creds = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(ca),
                                                       grpc.access_token_call_credentials(key))
            from agentd.security.channel import channel_options

            with grpc.secure_channel(follower.token_listen, creds, options=channel_options()) as ch:
                stub = pb_grpc.ControlStub(ch)
                deadline = time.monotonic() + 10
                while True:  # the follower checks the key against its own copy: wait until it applied key.add
                    try:
                        stub.Status(pb.StatusRequest(), timeout=10)
                        break
                    except grpc.RpcError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                rows["Deploy via a follower, admin key"] = _stats(_timed(
                    lambda: stub.Deploy(pb.DeployRequest(spec=spec()), timeout=30), deploys))

            def cli_like() -> None:
                with ControlClient(follower.listen, timeout=30, auth=follower.auth) as cl:
                    cl.deploy(spec())

            rows["Deploy via a follower, admin cert (new client)"] = _stats(_timed(cli_like, deploys))
        finally:
            c.stop()
    return rows


def run_in(tree: Path, n: int, deploys: int) -> dict[str, dict[str, float]]:
    """`measure` with `tree`'s agentd imported first (LocalCluster starts agents outside the caller's directory,
    so the agents run that code too)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (tree, tree / "plugins" / "llamabox",
                                                          tree / "plugins" / "vllm"))
    out = subprocess.run([sys.executable, __file__, "--measure", "--n", str(n), "--deploys", str(deploys)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"measurement in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="Status calls per measurement")
    ap.add_argument("--deploys", type=int, default=40, help="Deploy calls per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="before/after pairs, interleaved")
    ap.add_argument("--before", default=BEFORE, help="the code to compare with (a git revision)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.n, args.deploys)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before],
                       check=True, capture_output=True)
        try:
            results: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                results["before"].append(run_in(old, args.n, args.deploys))
                results["after"].append(run_in(ROOT, args.n, args.deploys))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    print(f"3 agents, mTLS, loopback; median of {args.rounds} round(s) of p50 / p99 in ms "
          f"(before = {args.before})")
    print(f"{'':<48} {'before p50':>10} {'p99':>8} {'after p50':>10} {'p99':>8}")
    for row in results["after"][0]:
        cells = []
        for side in ("before", "after"):
            runs = [r[row] for r in results[side] if row in r]
            cells += [statistics.median(r["p50"] for r in runs), statistics.median(r["p99"] for r in runs)]
        print(f"{row:<48} {cells[0]:>10.2f} {cells[1]:>8.2f} {cells[2]:>10.2f} {cells[3]:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
