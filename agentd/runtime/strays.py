"""Model servers of an earlier life of this data directory, found without their records.

A host whose disk died comes back with an empty data directory, but the model
servers its previous agentd started may still run (they live in their own
sessions). Without records nothing owns them: they hold their ports and GPU
memory, and the rejoined agent's own launch of the same instance clashes
with them ("port ... in use by pid ..."). Every process agentd spawns carries
three variables naming its owner: the data directory (absolute), the instance
and the process name. A scan of the processes this user may read finds the
session leaders that carry this data directory's name and have no record: the
supervisor adopts each one whose command line is exactly what it would launch
now for a desired instance, and stops the others (docs/runtime.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

OWNER_DATA_DIR = "AGENTD_OWNER_DATA_DIR"
OWNER_INSTANCE = "AGENTD_OWNER_INSTANCE"
OWNER_PROCESS = "AGENTD_OWNER_PROCESS"


def owner_env(data_dir: Path, instance_id: str, process: str) -> dict[str, str]:
    """The variables that name a spawned process's owner."""
    return {OWNER_DATA_DIR: str(Path(data_dir).resolve()), OWNER_INSTANCE: instance_id, OWNER_PROCESS: process}


@dataclass(frozen=True)
class Stray:
    pid: int
    pgid: int
    create_time: float
    instance_id: str
    process: str
    argv: tuple[str, ...]


def find_strays(data_dir: Path, known_pids: Iterable[int] = (),
                processes: Callable[..., Iterable[psutil.Process]] = psutil.process_iter) -> list[Stray]:
    """Live session leaders spawned for `data_dir` that are not in `known_pids` (the recorded ones)."""
    want = str(Path(data_dir).resolve())
    known = set(known_pids)
    out = []
    for p in processes(["pid", "create_time", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if p.info["pid"] in known or p.info["pid"] == os.getpid():
                continue
            env = p.environ()  # only our own user's processes are readable; others are not ours anyway
            if env.get(OWNER_DATA_DIR) != want or not env.get(OWNER_INSTANCE):
                continue
            pgid = os.getpgid(p.info["pid"])
            if pgid != p.info["pid"]:
                continue  # a child of the process agentd started: it goes with its group leader
            out.append(Stray(pid=p.info["pid"], pgid=pgid, create_time=p.info["create_time"],
                             instance_id=env[OWNER_INSTANCE], process=env.get(OWNER_PROCESS, ""),
                             argv=tuple(p.info["cmdline"] or ())))
    return sorted(out, key=lambda s: (s.instance_id, s.process, s.pid))
