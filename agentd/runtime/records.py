"""On-disk records of the processes agentd started, so none runs unowned.

When agentd is killed or upgraded, its model servers keep running (they are
in their own sessions and write to files, not to pipes). The next agentd reads
these records to find them: a process whose pid *and* start time still match
is the one we started (a pid alone may have been reused), and it is adopted
if the desired state still wants it, killed otherwise.

Each record is one small JSON file, written to a temporary name, fsynced and
renamed over the old one, then the directory is fsynced: a crash leaves the
old record or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agentd.logs import fields
from agentd.runtime.spec import ProcessSpec
from agentd.security.files import open_private, private_dir
from agentd.types import Assignment

log = logging.getLogger("agentd.runtime")


class ProcessRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    instance_id: str
    process: str
    pid: int
    pgid: int
    create_time: float  # seconds since the epoch, as psutil reports it from /proc
    argv: tuple[str, ...]
    fingerprint: str  # of the assignment the process was started for
    spec: ProcessSpec
    assignment: Assignment
    started_at: float  # wall clock
    log_path: str = ""
    ready: bool = False  # it passed readiness at least once
    restarts: int = 0  # the process's restart count so far, so an adopting agentd reports it on (`agentd ps`)


def fingerprint(assignment: Assignment) -> str:
    """A stable digest of everything the coordinator decided for an instance."""
    blob = json.dumps(assignment.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes) -> None:
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RecordStore:
    """`<data dir>/runtime/records/<instance id>/<process>.json`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, instance_id: str, process: str) -> Path:
        return self.root / instance_id / f"{process}.json"

    def write(self, rec: ProcessRecord) -> None:
        atomic_write(self.path(rec.instance_id, rec.process), rec.model_dump_json().encode())

    def remove(self, instance_id: str, process: str) -> None:
        p = self.path(instance_id, process)
        try:
            p.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(p.parent)
        try:
            p.parent.rmdir()  # only when it was the instance's last record
        except OSError:
            pass

    def load_all(self) -> list[ProcessRecord]:
        """Every readable record. An unreadable one is renamed `*.corrupt` and reported, not fatal."""
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.glob("*/*.json")):
            try:
                out.append(ProcessRecord.model_validate_json(p.read_bytes()))
            except (OSError, ValidationError, ValueError) as exc:
                bad = p.with_suffix(".corrupt")
                log.warning(
                    "process record unreadable; set aside (its process, if any, is not adopted)",
                    extra=fields(path=str(p), moved_to=str(bad), error=str(exc).splitlines()[0]),
                )
                try:
                    p.rename(bad)
                except OSError:
                    pass
        return out
