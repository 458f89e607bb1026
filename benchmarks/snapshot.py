"""Backup and restore of a large replicated state: 10,000 deployments (issue 20).

    .venv/bin/python benchmarks/snapshot.py [--deployments 10000] [--runs 3]

Rows (wall time; median of --runs where repeated):

* state.snapshot(): the state machine's serialisation, as the Snapshot RPC runs it (on the event loop);
* restore (offline): `agentd snapshot restore`'s work - read and check the file, load the state once to
  verify it, write the new data directory (Raft snapshot, log, fsyncs);
* agent start: `agentd serve` on the restored directory until it leads and has applied the snapshot;
* snapshot save (CLI): the whole `agentd snapshot save FILE` process against that agent (read barrier,
  serialisation, the stream, checksum, the 0600 file).

The state is built through `apply`, as a cluster builds it (agentd.testing.statefill): one-replica
deployments over 16 hosts that do not exist here, so the agent (named `bench`) runs nothing.
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

from agentd.api.client import ControlClient
from agentd.cluster import backup
from agentd.cluster.state import ClusterState
from agentd.testing.localcluster import free_port, simulated_host
from agentd.testing.statefill import fill_state

AGENTD = str(Path(sys.executable).with_name("agentd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deployments", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    state = fill_state(ClusterState(), args.deployments)
    build = time.perf_counter() - t0
    snap_times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        data = state.snapshot()
        snap_times.append(time.perf_counter() - t0)
    rows = [(f"build the state through apply ({args.deployments} deployments)", build),
            ("state.snapshot()", statistics.median(snap_times))]

    with tempfile.TemporaryDirectory(prefix="agentd-bench-snap-") as tmp:
        root = Path(tmp)
        file = root / "in.snap"
        backup.write_file(file, backup.encode(data, index=state.last_index, term=state.last_term,
                                              cluster_id="bench", node="x", agent_version="bench"))
        restore_times = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            backup.seed_data_dir(file, root / f"d{i}", node_id="bench", address="127.0.0.1:1")
            restore_times.append(time.perf_counter() - t0)
        rows.append(("restore (offline, into a new data dir)", statistics.median(restore_times)))

        listen = f"127.0.0.1:{free_port()}"
        data_dir = root / "agent"
        backup.seed_data_dir(file, data_dir, node_id="bench", address=listen)
        inv = root / "bench.json"
        inv.write_text(json.dumps(simulated_host("bench")))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
        env.update({"AGENTD_CONFIG": str(root / "none.toml"), "AGENTD_INSECURE": "1"})
        (root / "none.toml").touch()
        log = open(root / "agent.log", "wb")  # noqa: SIM115 - the agent writes it for its whole life
        t0 = time.perf_counter()
        proc = subprocess.Popen([AGENTD, "serve", "--node-name", "bench", "--listen", listen, "--http-listen",
                                 f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir), "--simulate", str(inv),
                                 "--insecure", "--node-down-grace", "1h", "--log-format", "json"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"agent exited {proc.returncode}: {(root / 'agent.log').read_text()[-2000:]}")
                try:
                    with ControlClient(listen, timeout=1.0) as c:
                        st = c.status()
                    if st.leader_id == "bench" and st.last_applied >= state.last_index:
                        break
                except Exception:
                    pass
                time.sleep(0.05)
            rows.append(("agent start on the restored dir (until it leads, state applied)",
                         time.perf_counter() - t0))
            save_times = []
            for i in range(args.runs):
                t0 = time.perf_counter()
                r = subprocess.run([AGENTD, "snapshot", "save", str(root / f"out{i}.snap"), "--server", listen],
                                   env=env, capture_output=True, text=True)
                save_times.append(time.perf_counter() - t0)
                if r.returncode:
                    raise SystemExit(f"snapshot save failed: {r.stderr}")
            rows.append(("snapshot save (CLI process, through the agent)", statistics.median(save_times)))
            header, _ = backup.read_file(root / "out0.snap")
            size = (root / "out0.snap").stat().st_size
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()

    print(f"snapshot file: {size / 2**20:.1f} MiB for {args.deployments} deployments, index {header.index}")
    width = max(len(r[0]) for r in rows)
    for name, seconds in rows:
        print(f"{name.ljust(width)}  {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
