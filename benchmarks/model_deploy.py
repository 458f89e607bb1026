"""Deploy to RUNNING for a model the chosen host lacks (issue 19).

    .venv/bin/python benchmarks/model_deploy.py [--gib 2]

Three real agents on loopback (insecure, simulated GPUs): a holds a GIB GGUF (the tiny llama padded with
zeros, which llama-server loads like any other) but its GPU is busy; b leads; c has room. The time from the
Deploy call by catalog name until the part on c is RUNNING, split into the fetch (FETCHING seen until the
part leaves it) and the rest (llama-server's start). a's hashing of the file before it can be deployed is
reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import grpc

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

GiB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        base = free_port_block()
        c = LocalCluster(root, hosts=[simulated_host("b", gpus=1, gpu_gib=24),
                                      simulated_host("a", gpus=1, gpu_gib=24, used_gib=23.9),
                                      simulated_host("c", gpus=1, gpu_gib=24, used_gib=4)],
                         extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]"})
        model = write_tiny_llama_gguf(root / "a" / "models" / "big.gguf")
        os.truncate(model, int(args.gib * GiB))
        try:
            t = time.monotonic()
            c.start()
            c.wait_for_inventories()
            stub = pb_grpc.ControlStub(grpc.insecure_channel(c.agents["b"].listen))

            def digest() -> str:
                for n in stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes:
                    if n.name == "a" and n.inventory_json:
                        for m in json.loads(n.inventory_json).get("models", []):
                            if m["name"] == "big" and m.get("digest"):
                                return m["digest"]
                return ""

            while not digest():
                time.sleep(0.05)
            hashed = time.monotonic() - t
            spec = pb.DeploymentSpec(name="big", model="big", runtime="llamabox", replicas=1)
            t0 = time.monotonic()
            stub.Deploy(pb.DeployRequest(spec=spec), timeout=30)
            fetching_until = None
            state = ""
            while state != "RUNNING":
                got = stub.ListInstances(pb.ListInstancesRequest(deployment="big"), timeout=5).instances
                state = got[0].state if got else ""
                if state == "FATAL":
                    raise SystemExit(f"FATAL: {got[0].reason}")
                if state == "FETCHING":  # the fetch ends with the last report that says so
                    fetching_until = time.monotonic()
                time.sleep(0.05)
            total = time.monotonic() - t0
            if fetching_until is None:
                raise SystemExit("never saw FETCHING")
            fetched = fetching_until - t0
            print(json.dumps({"size_gib": args.gib, "agents_up_and_hashed_s": round(hashed, 2),
                              "deploy_to_running_s": round(total, 2), "fetch_s": round(fetched, 2),
                              "fetch_gib_per_s": round(args.gib / fetched, 3),
                              "after_fetch_s": round(total - fetched, 2)}, indent=2))
        finally:
            c.stop()


if __name__ == "__main__":
    main()
