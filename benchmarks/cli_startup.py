"""Whole-process start-up of the `agentd` command, against `python -c pass` in the same run.

    .venv/bin/python benchmarks/cli_startup.py [--runs 20] [--no-secure] [--compare DIR] [--no-bytecode]

Each row is the wall time of one whole process (fork, interpreter start,
imports, the work, exit), measured from this process: the median, the fastest
and the slowest of `--runs` runs, and the median minus that of `python -c pass`
(the interpreter's own start). The commands run round-robin, one run of each in
turn, so a burst of load elsewhere on the machine lands on every row alike.
The last column is the median CPU time (user + system) of the process: on a
machine that others load, wall times stretch with the run queue but CPU time
mostly does not, so it says what the command itself costs.

`status`, `ps` and `ls` talk to a real agent that this benchmark starts
(`agentd serve` with a simulated host, one deployment of the tiny GGUF so `ps`
lists an instance): once over plaintext (AGENTD_INSECURE=1), and once over
mutual TLS with an admin certificate (AGENTD_TLS_DIR), as an operator's
shell would. `--compare DIR` adds rows for another source tree (say, a
`git worktree` of an older commit), run as `python -m agentd` from DIR, beside
the same rows for this tree, so a change is measured under the same load.
The targets (issue 16): `agentd version` under 0.15 s, `agentd status` and
`agentd ps` under 0.35 s.

Bytecode: an installed agentd has its `.pyc` files (pip compiles them), but a
shell with PYTHONDONTWRITEBYTECODE=1 (as in this project's sessions) and an
editable install compile every agentd module from source at each start, some
30-50 ms of `agentd ps`. So the commands run with PYTHONPYCACHEPREFIX set to a
folder in this run's temporary directory (the warm-up run fills it; the source
tree is not written to) and PYTHONDONTWRITEBYTECODE unset, as an operator's
install would. `--no-bytecode` measures the other case: compiled every time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb

AGENTD = str(Path(sys.executable).with_name("agentd"))  # the console script an operator runs


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_once(argv: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole process."""
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return elapsed, cpu


Row = tuple[str, list[str], dict[str, str], str | None]  # name, argv, environment, working directory


def measure(rows: list[Row], runs: int) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _, _ in rows}
    for _name, argv, env, cwd in rows:  # one warm-up each: page cache, .pyc files
        _run_once(argv, env, cwd)
    for _ in range(runs):
        for name, argv, env, cwd in rows:
            times[name].append(_run_once(argv, env, cwd))
    return times


def _start_agent(root: Path, model: Path, secure: bool) -> LocalCluster:
    c = LocalCluster(root, hosts=[simulated_host("bench", gpus=2, gpu_gib=24)], secure=secure)
    c.start()
    c.wait_for_inventories()
    with c.any_client(timeout=30) as cl:
        cl.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1,
                                    options=pb.RuntimeOptions(ctx_size=256)))
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    ap.add_argument("--no-secure", action="store_true", help="skip the rows against an mTLS agent")
    ap.add_argument("--compare", metavar="DIR", help="also run version/status/ps from this source tree")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="compile every module from source at each start (PYTHONDONTWRITEBYTECODE=1, no pyc cache)")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    clusters: list[LocalCluster] = []
    with tempfile.TemporaryDirectory(prefix="agentd-cli-startup-") as tmp:
        root = Path(tmp)
        base.pop("PYTHONPYCACHEPREFIX", None)
        if args.no_bytecode:
            base["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            base.pop("PYTHONDONTWRITEBYTECODE", None)
            base["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        (root / "empty.toml").touch()
        base["AGENTD_CONFIG"] = str(root / "empty.toml")
        model = write_tiny_llama_gguf(root / "tiny.gguf")
        try:
            plain = _start_agent(root / "plain", model, secure=False)
            clusters.append(plain)
            env_plain = {**base, "AGENTD_INSECURE": "1", "AGENTD_SERVER": plain.agents["bench"].listen}
            rows: list[Row] = [
                ("python -c pass", [sys.executable, "-c", "pass"], base, None),
                ("agentd version", [AGENTD, "version"], base, None),
                ("agentd version --json", [AGENTD, "version", "--json"], base, None),
                ("agentd status (plaintext)", [AGENTD, "status"], env_plain, None),
                ("agentd ps (plaintext)", [AGENTD, "ps"], env_plain, None),
                ("agentd ls (plaintext)", [AGENTD, "ls"], env_plain, None),
                ("agentd ps --help", [AGENTD, "ps", "--help"], base, None),
                ("agentd --help (every module)", [AGENTD, "--help"], base, None),
            ]
            if args.compare:
                here = str(Path(__file__).resolve().parent.parent)
                for label, tree in (("this tree", here), ("--compare", args.compare)):
                    for cmd, env in (("version", base), ("status", env_plain), ("ps", env_plain)):
                        rows.append((f"python -m agentd {cmd} ({label})", [sys.executable, "-m", "agentd", cmd],
                                     env, tree))
            if not args.no_secure:
                tls = _start_agent(root / "tls", model, secure=True)
                clusters.append(tls)
                env_tls = {**base, "AGENTD_TLS_DIR": str(tls.admin_dir), "AGENTD_SERVER": tls.agents["bench"].listen}
                rows += [("agentd status (mTLS, admin cert)", [AGENTD, "status"], env_tls, None),
                         ("agentd ps (mTLS, admin cert)", [AGENTD, "ps"], env_tls, None)]
                if args.compare:
                    for label, tree in (("this tree", here), ("--compare", args.compare)):
                        for cmd in ("status", "ps"):
                            rows.append((f"python -m agentd {cmd} mTLS ({label})",
                                         [sys.executable, "-m", "agentd", cmd], env_tls, tree))
            times = measure(rows, args.runs)
        finally:
            for c in clusters:
                c.stop()
    floor = statistics.median(w for w, _ in times["python -c pass"])
    width = max(len(name) for name in times)
    print(f"{'command':<{width}}  {'n':>3}  {'median':>8}  {'min':>8}  {'max':>8}  {'- pass':>8}  {'CPU':>8}")
    for name, runs_ in times.items():
        xs = [w for w, _ in runs_]
        med = statistics.median(xs)
        cpu = statistics.median(c for _, c in runs_)
        print(f"{name:<{width}}  {len(xs):>3}  {med * 1000:>6.0f}ms  {min(xs) * 1000:>6.0f}ms  "
              f"{max(xs) * 1000:>6.0f}ms  {(med - floor) * 1000:>6.0f}ms  {cpu * 1000:>6.0f}ms")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; bytecode: "
          + ("compiled at every start (--no-bytecode)" if args.no_bytecode else "cached, as installed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
