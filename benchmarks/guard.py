"""What the instance guard (agentd/security/guard.c) costs a listener: CPU time per accepted connection.

    .venv/bin/python benchmarks/guard.py [--rounds 6] [--connections 3000]

The wrapper's own work per accept (getsockname, getpeername, a look through the allow list): a Python listener on
127.0.0.1 accepts and closes `--connections` connections, made one after another by this process from 127.0.0.1,
once with the library preloaded (the address allowed, so every connection is served) and once without, in
alternating order over `--rounds` rounds. The listener's CPU time (user + system, its accept loop only) per
connection is the figure: on a machine others load, wall time stretches with the run queue, CPU time mostly
does not. Prints the median of each and the median paired difference. A refusal costs an allowed accept plus
a close and a log line.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

from agentd.security import guard

LISTENER = r"""
import socket, sys, time
n = int(sys.argv[1])
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(128)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.close()  # the first connection starts the clock
t0 = time.process_time()
for _ in range(n):
    c, _ = s.accept(); c.close()
print((time.process_time() - t0) / n * 1e6, flush=True)
"""


def one(connections: int, guarded: bool) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_GUARD_") and k != "LD_PRELOAD"}
    if guarded:
        env.update({"LD_PRELOAD": str(guard.library()), guard.ALLOW_ENV: "10.0.0.1,10.0.0.2,127.0.0.1,::1"})
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(connections)], env=env, stdout=subprocess.PIPE,
                            text=True)
    port = int(proc.stdout.readline())
    for _ in range(connections + 1):
        with socket.create_connection(("127.0.0.1", port)):
            pass
    micros = float(proc.stdout.readline())
    proc.wait()
    return micros


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=3000)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    plain, guarded, diffs = [], [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {g: one(args.connections, g) for g in order}
        plain.append(got[False])
        guarded.append(got[True])
        diffs.append(got[True] - got[False])
        time.sleep(0.1)
    for name, xs in (("without the guard", plain), ("with the guard", guarded)):
        print(f"{name:18} {statistics.median(xs):6.2f} us CPU per accept (range {min(xs):.2f}-{max(xs):.2f})")
    print(f"guard - plain, paired by round: median {statistics.median(diffs):+.2f} us "
          f"(range {min(diffs):+.2f} .. {max(diffs):+.2f})")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
