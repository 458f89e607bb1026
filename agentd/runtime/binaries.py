"""Finding the runtime binaries: the configured path, then known install places, then PATH.

Resolution happens when specs are built, so a missing binary becomes a FATAL
instance whose reason lists every place that was searched, never a silent
fallback to some other program.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from agentd.runtime.process import BinaryNotUsable


def find_binary(configured: str, names: Sequence[str], dirs: Iterable[Path] = (), *,
                setting: str = "") -> str:
    """The program to run.

    `configured` (a settings value) wins when set: it is returned as given, so
    a wrong path fails at spawn with "does not exist" / "is not executable".
    Otherwise the first of `names` found in `dirs`, then on PATH.
    """
    if configured:
        return configured
    tried = []
    for d in dirs:
        for n in names:
            p = Path(d) / n
            tried.append(str(p))
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    hint = f"; set {setting}" if setting else ""
    raise BinaryNotUsable(f"none of {', '.join(names)} found (looked in {', '.join(tried) or 'no package dir'} "
                          f"and on PATH){hint}")
