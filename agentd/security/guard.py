"""The instance guard (guard.c): a library preloaded into an instance's processes so that only the instance's
own hosts reach their listening sockets (docs/security.md, "Only the parts of an instance reach its processes").

torch.distributed's TCPStore (SGLang's --dist-init-addr, vLLM's rendezvous) listens on every interface with no
authentication, and NCCL, gloo, ZMQ and Ray open listeners of their own: a firewall per instance would need
root. The guard needs nothing: it wraps accept/accept4 and closes a connection whose peer is not allowed.

`python -m agentd.security.guard` builds it now (scripts/bootstrap does), also after a failed build, and prints
its path. The supervisor (agentd/runtime/guard.py) writes the policy into each process's environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agentd.security import native
from agentd.security.native import Unavailable

__all__ = ["ALLOW_ENV", "NAME", "OPEN_PORTS_ENV", "Unavailable", "library"]

SOURCE = Path(__file__).with_suffix(".c")
NAME = "libagentd-guard"  # /proc/PID/maps of a guarded process names it
ALLOW_ENV = "AGENTD_GUARD_ALLOW"  # addresses or CIDR blocks whose connections pass, comma-separated
OPEN_PORTS_ENV = "AGENTD_GUARD_OPEN_PORTS"  # local ports anyone may reach, comma-separated


def _compile_arguments(output: Path) -> list[str]:
    return ["-O2", "-shared", "-fPIC", "-o", str(output), str(SOURCE), "-ldl"]


def _check(built: Path) -> str:
    """A program started with it preloaded has it mapped (the dynamic loader skips one it cannot load)."""
    probe = subprocess.run([sys.executable, "-I", "-c", "print(open('/proc/self/maps').read())"],
                           env={"LD_PRELOAD": str(built), ALLOW_ENV: "127.0.0.1"}, capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode == 0 and str(built) in probe.stdout:
        return ""
    return f"the built guard does not load: {probe.stderr.strip()[-500:]}"


GUARD = native.Native(name=NAME, source=SOURCE, arguments=_compile_arguments, check=_check, suffix=".so")


def library(retry: bool = False) -> Path:
    """The built library (building it the first time), or Unavailable with the reason.

    LD_PRELOAD separates entries by spaces and colons, so a path with either cannot be preloaded."""
    path = native.built(GUARD, retry)
    if any(c in str(path) for c in " :"):
        raise Unavailable(f"{path}: LD_PRELOAD cannot name a path with a space or a colon")
    return path


def main() -> int:
    try:
        print(library(retry=True))
    except Unavailable as exc:
        print(f"agentd: the instance guard is unavailable (secure clusters need it unless instance_guard = "
              f"\"off\"): {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
