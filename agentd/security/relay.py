"""The tunnel's relay in C (relay.c): built once per source version with the host's C compiler, on first use.

`python -m agentd.security.tunnel` runs it in its own place (exec, same pid and command line) when it can be built
and run; otherwise the Python relay serves, and the tunnel logs why. A Python process wakes up per message per
hop, and ggml RPC sends 15-19 small messages per token: that, not TLS, was the tunnel's loss
(docs/security.md, "Helpers behind a tunnel").

No OpenSSL headers are needed: relay.c declares the functions it uses, and links the libssl/libcrypto that
this Python's `ssl` module has loaded (OpenSSL 3), by full path. The binary's name carries a hash of the
source and the link line, so an edit or another OpenSSL builds a new one. A failed build leaves a
`.failed` file with the reason next to where the binary would be, so later tunnels do not try again.

`python -m agentd.security.relay` builds it now (scripts/bootstrap does), also after a failed build, and
prints its path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
NAME = "agentd-tunnel"  # the binary's name starts so: /proc/PID/exe and `ps -e` (comm) tell the C relay by it
COMPILE_TIMEOUT = 120.0
# The tunnel's relay: "python" the one in tunnel.py; "c" this one or none (exit 1); unset: this one when it
# builds and runs here, else Python's (logged)
IMPLEMENTATION_ENV = "AGENTD_TUNNEL"


class Unavailable(Exception):
    """The C relay cannot be built or run here; the message says why."""


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


def _compile_command(output: Path) -> list[str]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise Unavailable("no C compiler (cc) on PATH")
    libs = _loaded_libraries()
    rpath = sorted({str(Path(lib).parent) for lib in libs})
    return [compiler, "-O2", "-o", str(output), str(SOURCE), *libs, "-lpthread",
            *(f"-Wl,-rpath,{d}" for d in rpath)]


def _build_dirs() -> list[Path]:
    """Where a built relay may live: beside this Python's installation, else the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentd"
    return [Path(sys.prefix) / "libexec" / "agentd", cache]


def binary(retry: bool = False) -> Path:
    """The built relay (building it the first time), or Unavailable with the reason.

    A build that failed is not tried again (its `.failed` file says why) unless `retry`: a tunnel never
    retries, `python -m agentd.security.relay` (scripts/bootstrap, run again after a fix) does."""
    command = _compile_command(Path("OUT"))
    digest = hashlib.sha256(SOURCE.read_bytes() + "\0".join(command).encode()).hexdigest()[:12]
    name = f"{NAME}-{digest}"
    reasons = []
    for d in _build_dirs():
        path = d / name
        if os.access(path, os.X_OK):
            return path
        failed = d / (name + ".failed")
        if failed.exists():
            if not retry:
                raise Unavailable(failed.read_text().strip())
            failed.unlink(missing_ok=True)
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d, prefix=".build-") as tmp:
                return _build(_compile_command(Path(tmp) / name), Path(tmp) / name, path, failed)
        except OSError as exc:  # not writable here: try the next place
            reasons.append(f"{d}: {exc}")
    raise Unavailable("nowhere to build it: " + "; ".join(reasons))


def _build(command: list[str], built: Path, path: Path, failed: Path) -> Path:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
        why = "" if done.returncode == 0 else f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}"
        if not why:  # it runs, and finds its libraries: a bad call answers 2 with its usage
            probe = subprocess.run([str(built)], capture_output=True, text=True, timeout=30, check=False)
            why = "" if probe.returncode == 2 else f"the built relay does not run: {probe.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired as exc:
        why = f"{exc.cmd[0]} took over {exc.timeout:.0f} s"
    except OSError as exc:  # the compiler named by CC cannot run
        why = f"cannot run {command[0]}: {exc}"
    if why:
        failed.write_text(why + "\n")
        raise Unavailable(why)
    os.replace(built, path)  # atomic: two tunnels that build at once both end with one good binary
    return path


def main() -> int:
    try:
        print(binary(retry=True))
    except Unavailable as exc:
        print(f"agentd: the tunnel's C relay is unavailable, the Python one will serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
