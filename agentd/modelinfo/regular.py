"""Open a user-given model file only if it is a regular file.

Model paths come from users, and the leader reads them. A FIFO blocks open()
until someone writes to it, a character device (`/dev/zero`, a tty) never
ends or has side effects: either wedges whoever reads it. So every model file
is stat'ed first, opened with O_NONBLOCK (a FIFO's open then returns at once)
and checked again on the open descriptor, which is race-free. What still
blocks (a hung network mount) is the caller's to bound: the coordinator
inspects in a worker thread with a timeout.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from agentd.errors import InvalidInput

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def refuse_irregular(path: str | os.PathLike[str], mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise InvalidInput(f"not a regular file ({kind_of(mode)}): model files must be regular files",
                           where=str(path))


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """open(path, "rb") that refuses FIFOs, devices and sockets with InvalidInput (OSError passes through)."""
    path = Path(path)
    refuse_irregular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        refuse_irregular(path, os.fstat(fd).st_mode)  # swapped for a FIFO after the stat
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
