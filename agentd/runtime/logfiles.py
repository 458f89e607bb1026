"""Per-process log files: one per run, previous runs kept, size capped.

The child writes straight into the file (its stdout and stderr are the file,
opened O_APPEND), never through a pipe to agentd: a model server must survive
agentd being killed or upgraded, and a pipe whose reader died would kill it
with SIGPIPE or block it on a full buffer. So rotation happens around the
child: a new run moves `<name>.log` to `<name>.log.1` (and so on, keeping
`keep` old files); a run that grows past `max_bytes` is copied to `.1` and
truncated in place (logrotate's copytruncate; O_APPEND makes the child's
next write land at the new end).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from agentd.security.files import open_private, private_dir


class LogFiles:
    def __init__(self, root: Path, keep: int = 5, max_bytes: int = 64 * 1024 * 1024):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.max_bytes = max_bytes

    def path(self, instance_id: str, process: str) -> Path:
        return self.root / instance_id / f"{process}.log"

    def runs(self, instance_id: str, process: str) -> list[Path]:
        """The current file first, then older ones (`--previous` is index 1)."""
        cur = self.path(instance_id, process)
        out = [cur] if cur.exists() else []
        for i in range(1, self.keep + 1):
            p = cur.with_name(f"{cur.name}.{i}")
            if p.exists():
                out.append(p)
        return out

    def _shift(self, cur: Path) -> None:
        oldest = cur.with_name(f"{cur.name}.{self.keep}")
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            src = cur.with_name(f"{cur.name}.{i}")
            if src.exists():
                src.rename(cur.with_name(f"{cur.name}.{i + 1}"))

    def open_run(self, instance_id: str, process: str, header: str) -> int:
        """Rotate, then open the new run's file for the child; returns an fd the caller closes after spawn."""
        cur = self.path(instance_id, process)
        private_dir(cur.parent)
        if cur.exists() and cur.stat().st_size > 0:
            self._shift(cur)
            cur.rename(cur.with_name(f"{cur.name}.1"))
        fd = open_private(cur, os.O_WRONLY | os.O_APPEND)  # a server's log may hold prompts
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"=== agentd {stamp}: {header}\n".encode())
        return fd

    def enforce_size(self, instance_id: str, process: str) -> bool:
        """Copy-truncate the current file if it is over the cap; True if it rotated."""
        cur = self.path(instance_id, process)
        try:
            if cur.stat().st_size <= self.max_bytes:
                return False
        except FileNotFoundError:
            return False
        self._shift(cur)
        shutil.copyfile(cur, cur.with_name(f"{cur.name}.1"))
        with open(cur, "r+b") as f:
            f.truncate(0)
        return True


def tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of a file, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return list(deque((ln for ln in text.splitlines() if ln.strip()), maxlen=lines))


async def follow(path: Path, *, from_start: bool = True, poll: float = 0.25,
                 stop: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """Yield the file's bytes as they are written, across copy-truncate and new runs.

    A shrinking file (truncated) is read again from its start; a replaced one
    (a new run renamed the old away) is reopened.
    """
    f = None
    ino = None
    try:
        while stop is None or not stop.is_set():
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 (kept open across loop turns, closed in finally)
                except FileNotFoundError:
                    await asyncio.sleep(poll)
                    continue
                ino = os.fstat(f.fileno()).st_ino
                if not from_start:
                    f.seek(0, os.SEEK_END)
                from_start = True  # a reopened file is always read whole
            chunk = f.read(65536)
            if chunk:
                yield chunk
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is None or st.st_ino != ino:
                f.close()
                f = None
                continue
            if st.st_size < f.tell():
                f.seek(0)
                continue
            await asyncio.sleep(poll)
    finally:
        if f is not None:
            f.close()
