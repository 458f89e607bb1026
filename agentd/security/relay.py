"""The tunnel's relay in C (relay.c): built once per source version with the host's C compiler, on first use.

`python -m agentd.security.tunnel` runs it in its own place (exec, same pid and command line) when it can be built
and run; otherwise the Python relay serves, and the tunnel logs why. A Python process wakes up per message per
hop, and ggml RPC sends 15-19 small messages per token: that, not TLS, was the tunnel's loss
(docs/security.md, "Helpers behind a tunnel").

No OpenSSL headers are needed: relay.c declares the functions it uses, and links the libssl/libcrypto that
this Python's `ssl` module has loaded (OpenSSL 3), by full path. The binary's name carries a hash of the
source and the compiler's arguments, so an edit or another OpenSSL builds a new one (agentd/security/native.py, which
the instance guard's build shares). A failed build leaves a `.failed` file with the reason next to where the
binary would be, so later tunnels do not try again.

`python -m agentd.security.relay` builds it now (scripts/bootstrap does), also after a failed build, and
prints its path.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

from agentd.security import native
from agentd.security.native import Unavailable

__all__ = ["IMPLEMENTATION_ENV", "NAME", "Unavailable", "binary"]

SOURCE = Path(__file__).with_suffix(".c")
NAME = "agentd-tunnel"  # the binary's name starts so: /proc/PID/exe and `ps -e` (comm) tell the C relay by it
# The tunnel's relay: "python" the one in tunnel.py; "c" this one or none (exit 1); unset: this one when it
# builds and runs here, else Python's (logged)
IMPLEMENTATION_ENV = "AGENTD_TUNNEL"


def _loaded_libraries() -> list[str]:
    """Full paths of the libssl and libcrypto this process has loaded through `ssl` (OpenSSL 3), in that order."""
    if ssl.OPENSSL_VERSION_INFO[0] < 3:
        raise Unavailable(f"Python's ssl uses {ssl.OPENSSL_VERSION}; relay.c needs OpenSSL 3")
    found: dict[str, str] = {}
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as exc:
        raise Unavailable(f"cannot find Python's libssl: {exc}") from None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        for lib in ("libssl", "libcrypto"):
            if Path(path).name.startswith(lib + ".so.3"):
                found.setdefault(lib, path)
    if len(found) < 2:
        raise Unavailable("Python's ssl module did not load libssl.so.3 and libcrypto.so.3 as shared libraries")
    return [found["libssl"], found["libcrypto"]]


def _compile_arguments(output: Path) -> list[str]:
    libs = _loaded_libraries()
    rpath = sorted({str(Path(lib).parent) for lib in libs})
    return ["-O2", "-o", str(output), str(SOURCE), *libs, "-lpthread", *(f"-Wl,-rpath,{d}" for d in rpath)]


def _check(built: Path) -> str:
    """It runs, and finds its libraries: a bad call answers 2 with its usage."""
    probe = subprocess.run([str(built)], capture_output=True, text=True, timeout=30, check=False)
    return "" if probe.returncode == 2 else f"the built relay does not run: {probe.stderr.strip()[-500:]}"


RELAY = native.Native(name=NAME, source=SOURCE, arguments=_compile_arguments, check=_check)


def binary(retry: bool = False) -> Path:
    """The built relay (building it the first time), or Unavailable with the reason.

    A build that failed is not tried again (its `.failed` file says why) unless `retry`: a tunnel never
    retries, `python -m agentd.security.relay` (scripts/bootstrap, run again after a fix) does."""
    return native.built(RELAY, retry)


def main() -> int:
    try:
        print(binary(retry=True))
    except Unavailable as exc:
        print(f"agentd: the tunnel's C relay is unavailable, the Python one will serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
