"""agentd's own C programs and libraries, built once per source version with the host's C compiler.

The tunnel's relay (relay.c, agentd/security/relay.py) and the instance guard (guard.c,
agentd/security/guard.py) are built the same way: by `scripts/bootstrap` or on first use, named by a hash of
the source and the compiler's arguments (an edit or other libraries build a new one; the compiler itself is left
out, so a host whose compiler was removed after the build, as in an image built in stages, still finds it),
beside this Python's installation or else in the user's cache. A failed build leaves a `.failed` file with the
reason next to where the output would be, so later users do not try again; only an explicit `retry` (the
`python -m` build commands that scripts/bootstrap runs) does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPILE_TIMEOUT = 120.0


class Unavailable(Exception):
    """The program cannot be built or run here; the message says why."""


@dataclass(frozen=True)
class Native:
    """How to build one C source into one file.

    `arguments(output)` is the compile command after the compiler (it may raise Unavailable: no library);
    `check(built)` runs the fresh output once and returns "" when it works, else why not."""

    name: str  # the output's name starts so, then "-<hash>" and `suffix`
    source: Path
    arguments: Callable[[Path], list[str]]
    check: Callable[[Path], str]
    suffix: str = ""


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise Unavailable("no C compiler (cc) on PATH")
    return found


def build_dirs() -> list[Path]:
    """Where built files may live: beside this Python's installation, else the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentd"
    return [Path(sys.prefix) / "libexec" / "agentd", cache]


def built(what: Native, retry: bool = False) -> Path:
    """The built file (building it the first time), or Unavailable with the reason."""
    digest = hashlib.sha256(what.source.read_bytes() + "\0".join(what.arguments(Path("OUT"))).encode()).hexdigest()
    name = f"{what.name}-{digest[:12]}{what.suffix}"
    reasons = []
    for d in build_dirs():
        path = d / name
        if os.access(path, os.R_OK if what.suffix else os.X_OK):
            return path
        failed = d / (name + ".failed")
        if failed.exists():
            if not retry:
                raise Unavailable(failed.read_text().strip())
            failed.unlink(missing_ok=True)
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d, prefix=".build-") as tmp:
                return _build(what, Path(tmp) / name, path, failed)
        except OSError as exc:  # not writable here: try the next place
            reasons.append(f"{d}: {exc}")
    raise Unavailable("nowhere to build it: " + "; ".join(reasons))


def _build(what: Native, out: Path, path: Path, failed: Path) -> Path:
    command = [compiler(), *what.arguments(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
        why = "" if done.returncode == 0 else f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}"
        if not why:
            why = what.check(out)
    except subprocess.TimeoutExpired as exc:
        why = f"{exc.cmd[0]} took over {exc.timeout:.0f} s"
    except OSError as exc:  # the compiler named by CC cannot run
        why = f"cannot run {command[0]}: {exc}"
    if why:
        failed.write_text(why + "\n")
        raise Unavailable(why)
    os.replace(out, path)  # atomic: two users that build at once both end with one good file
    return path
