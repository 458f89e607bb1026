"""Deployments through the whole cluster, with real agents and real llama.cpp servers.

    .venv/bin/python benchmarks/e2e_runtime.py [--n 5]

Two `agentd serve` processes with one 0.272 GiB simulated GPU each (as in
scripts/demo), the 8-layer tiny GGUF split main + rpc. Per cycle:

1. Deploy RPC returned -> every part reported RUNNING by `ListInstances`
   (the coordinator's placement and commit, Raft replication to the rpc host,
   both supervisors' launches, the main server waiting for its rpc-server,
   model load, readiness, the agents' reports to the leader); polled every 10 ms.
2. kill -9 of the rpc-server -> both parts RUNNING again under new pids (its
   host's backoff, the report to the coordinator, the main host's restart of
   llama-server after it).
3. Delete RPC returned -> no process of the deployment left.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb


def _wait(pred, timeout: float = 60.0, poll: float = 0.01, what=lambda: "") -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if pred():
            return time.perf_counter() - t0
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:g}s {what()}")


def _describe(pids: list[int]):
    def f() -> str:
        out = []
        for p in pids:
            try:
                proc = psutil.Process(p)
                out.append(f"{p}: {proc.status()} {proc.name()} parent {proc.ppid()}")
            except psutil.Error as exc:
                out.append(f"{p}: {exc}")
        return "; ".join(out)
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5, help="deploy/kill/delete cycles")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-e2e-"))
    model = write_tiny_llama_gguf(root / "tiny.gguf", n_layers=8, hidden=256, ffn=512)
    cluster = LocalCluster(root / "cluster", hosts=[simulated_host(n, gpus=1, gpu_gib=0.272) for n in "ab"],
                           extra_env={"AGENTD_PORT_RANGE": "[24000,24999]"})
    cluster.start()
    cluster.wait_for_inventories()
    client = cluster.agents["a"].client()
    deploy_s, heal_s, delete_s = [], [], []

    def parts(name: str) -> list[pb.Instance]:
        return list(client.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances)

    try:
        for k in range(args.n):
            name = f"bench{k}"
            spec = pb.DeploymentSpec(name=name, model=str(model), runtime="llamabox", replicas=1,
                                     options=pb.RuntimeOptions(ctx_size=256))
            client.deploy(spec, replace=False)
            t0 = time.perf_counter()
            _wait(lambda n=name: len(p := parts(n)) == 2 and all(i.state == "RUNNING" for i in p))
            deploy_s.append(time.perf_counter() - t0)
            before = {i.part: i.pid for i in parts(name)}
            os.kill(before[1], signal.SIGKILL)
            heal_s.append(_wait(lambda n=name, b=before: len(p := parts(n)) == 2 and all(
                i.state == "RUNNING" and i.pid != b[i.part] for i in p)))
            pids = [i.pid for i in parts(name)]
            client.call("Delete", pb.DeleteRequest(name=name))
            delete_s.append(_wait(lambda ps=pids: not any(psutil.pid_exists(p) for p in ps), 20, what=_describe(pids)))
    finally:
        client.close()
        cluster.stop()

    def row(label: str, xs: list[float]) -> str:
        return f"{label:<44} {statistics.median(xs) * 1000:>9.0f} {max(xs) * 1000:>9.0f}"

    print(f"{'through 2 agents, tiny GGUF split main + rpc':<44} {'median ms':>9} {'max ms':>9}   (n={args.n})")
    print(row("Deploy returned -> both parts RUNNING", deploy_s))
    print(row("kill -9 rpc-server -> both RUNNING again", heal_s))
    print(row("Delete returned -> no process left", delete_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
