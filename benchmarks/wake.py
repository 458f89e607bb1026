"""Wake latency (issue 21): request arrival to first byte for an IDLE deployment of the tiny model.

    .venv/bin/python benchmarks/wake.py [--runs 3] [--via b]

Three real agents on loopback (insecure, simulated GPUs, real llama-server). A deployment with
`--idle-unload 2s` is left idle until the coordinator unloads it; then one streaming /v1/completions request
goes to agent VIA (a follower by default when a leads) and the time to its first byte is split, from the
agents' JSON logs (millisecond timestamps), into:

- placement: request arrival -> the leader committed the wake (held request, Wake RPC, plan, Raft commit);
- spawn: -> the model server's process started on its host (the entry reaches the host, reconcile, fork);
- load: -> the part RUNNING (llama-server loads the model; agentd's readiness probe sees /health 200);
- first byte: -> the client's first byte (the held request sees a ready replica, is forwarded, first token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc


def _events(c: LocalCluster, since: float) -> list[tuple[float, str, dict]]:
    out = []
    for name, text in c.logs():
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
                ts = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=__import__("datetime").timezone.utc).timestamp()
            except (ValueError, KeyError):
                continue
            if ts >= since - 0.001:
                out.append((ts, name, rec))
    return sorted(out, key=lambda e: e[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--via", default="b")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        base = free_port_block()
        c = LocalCluster(root, hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "abc"],
                         extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]",
                                    "AGENTD_RUNTIME_STOP_GRACE": "1s"})
        model = write_tiny_llama_gguf(root / "tiny.gguf")
        try:
            c.start()
            c.wait_for_inventories()
            stub = pb_grpc.ControlStub(grpc.insecure_channel(c.agents["a"].listen))
            spec = pb.DeploymentSpec(name="m", model=str(model), runtime="llamabox", replicas=1, idle_unload=2.0,
                                     options=pb.RuntimeOptions(ctx_size=256))
            stub.Deploy(pb.DeployRequest(spec=spec), timeout=60)
            rows = []
            for run in range(args.runs):
                while not stub.Get(pb.GetRequest(name="m"), timeout=5).idle:
                    time.sleep(0.05)
                time.sleep(1.5)  # the unloaded server's stop and its reports settle
                body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 8, "stream": True}).encode()
                req = urllib.request.Request(f"http://{c.agents[args.via].http_listen}/v1/completions",
                                             data=body, headers={"Content-Type": "application/json"})
                t0 = time.time()
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read(1)
                    t_first = time.time()
                    r.read()
                time.sleep(0.5)
                ev = _events(c, t0)
                woken = next(ts for ts, _, rec in ev if rec["msg"].startswith("deployment m woken"))
                started = next(ts for ts, _, rec in ev if rec.get("state") == "STARTING"
                               and str(rec.get("process", "")).startswith("m-"))
                running = next(ts for ts, _, rec in ev if rec.get("state") == "RUNNING"
                               and str(rec.get("process", "")).startswith("m-"))
                row = {"placement": woken - t0, "spawn": started - woken, "load": running - started,
                       "first_byte": t_first - running, "total": t_first - t0}
                rows.append(row)
                print(f"run {run + 1}: " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items()), flush=True)
            print("median: " + "  ".join(f"{k} {statistics.median(r[k] for r in rows) * 1000:.0f} ms"
                                         for k in rows[0]))
        finally:
            c.stop()


if __name__ == "__main__":
    main()
