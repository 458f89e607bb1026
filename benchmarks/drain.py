"""Draining a host, with real agents and real llama-servers.

    .venv/bin/python benchmarks/drain.py [--replicas 4] [--runs 3]

Three agents on loopback (simulated 8 GiB GPUs). REPLICAS replicas of the
tiny GGUF model all run on a (b and c are cordoned while it is deployed, then
uncordoned); `agentd drain a` then moves them onto b and c, surge first. For
each run: the time from the drain call to "drained", and the fewest ready
replicas seen meanwhile (sampled every 50 ms through ListInstances; it must
never be 0, and with room elsewhere it should stay at REPLICAS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb


def cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    r = subprocess.run([sys.executable, "-m", "agentd", *args, "--server", c.agents["c"].listen],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"agentd {' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r


def ready(c: LocalCluster, name: str) -> int:
    with c.agents["c"].client(timeout=5) as client:
        rows = client.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances
    states: dict[str, list[str]] = {}
    for i in rows:
        states.setdefault(i.instance_id, []).append(i.state)
    return sum(all(s == "RUNNING" for s in v) for v in states.values())


def one_run(root: Path, model: Path, replicas: int) -> tuple[float, int]:
    base = free_port_block()
    c = LocalCluster(root, hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "abc"],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    try:
        c.start()
        c.wait_for_inventories()
        cli(c, "cordon", "b")
        cli(c, "cordon", "c")
        cli(c, "deploy", "m", "--model", str(model), "--runtime", "llamabox", "--replicas", str(replicas),
            "--ctx-size", "256", "--wait", "120")
        cli(c, "uncordon", "b")
        cli(c, "uncordon", "c")
        lowest, stop = [replicas], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    lowest[0] = min(lowest[0], ready(c, "m"))
                except Exception:
                    pass
                time.sleep(0.05)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        t0 = time.monotonic()
        cli(c, "drain", "a", "--timeout", "300")
        took = time.monotonic() - t0
        stop.set()
        t.join(5)
        return took, lowest[0]
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = write_tiny_llama_gguf(root / "tiny.gguf")
        results = [one_run(root / f"run{i}", model, args.replicas) for i in range(args.runs)]
    times = [t for t, _ in results]
    print(json.dumps({"replicas": args.replicas, "runs": args.runs,
                      "drain_seconds": {"median": round(statistics.median(times), 2), "max": round(max(times), 2),
                                        "all": [round(t, 2) for t in times]},
                      "fewest_ready_replicas": min(low for _, low in results)}, indent=2))


if __name__ == "__main__":
    main()
