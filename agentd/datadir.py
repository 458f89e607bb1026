"""The data directory's format: read any older one and upgrade it in place, refuse a newer one.

`agentd-data.json` at the top of the data directory names the layout
(`data_format`) and the release that last wrote it. agentd 0.1.0 wrote no such
file: a directory that holds agentd files but no format file is format 1.

What each format holds (docs/versioning.md):

- 1 (agentd 0.1.0): `raft/raft.wal` (`AGDRAFT1`), `raft/raft.snap` (`AGDSNAP1`),
  `runtime/records/` (one JSON record per model-server process), `runtime/logs/`,
  `runtime/work/`, `tls/`.
- 2 (agentd 0.2.0): the same files, owner-only (0700/0600), plus this file.
  Log entries and snapshots inside carry their own state format; the bytes
  around them did not change, so the upgrade checks that the Raft files are the
  ones format 1 wrote and records the new format.

An upgrade step runs before anything else opens the directory; a directory of
a newer format stops the agent with the versions named, before it writes
anything there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from agentd.errors import ConfigError, UpgradeRequired
from agentd.version import AGENT_VERSION, BASELINE_DATA_FORMAT, DATA_FORMAT

FORMAT_FILE = "agentd-data.json"
_KNOWN_MAGIC = {"raft/raft.wal": b"AGDRAFT1", "raft/raft.snap": b"AGDSNAP1"}
# What an agentd of any release leaves in a data directory it used.
_AGENTD_ENTRIES = ("raft", "runtime", "tls")


def read_format(data_dir: Path) -> tuple[int, str]:
    """(data format, the release that wrote it) of an existing directory; (0, "") for a new, empty one."""
    path = data_dir / FORMAT_FILE
    if not path.exists():
        if any((data_dir / name).exists() for name in _AGENTD_ENTRIES):
            return BASELINE_DATA_FORMAT, "0.1.0"
        return 0, ""
    try:
        raw = json.loads(path.read_text())
        fmt, by = raw["data_format"], str(raw.get("agent_version", "unknown"))
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise ValueError(f"data_format must be a positive integer, got {fmt!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); it names the data directory's format: restore it "
                          "from a backup, or delete it only if this directory was written by agentd 0.1.0") from None
    return fmt, by


def _check_v1_files(data_dir: Path) -> str:
    for name, magic in _KNOWN_MAGIC.items():
        path = data_dir / name
        if path.exists():
            with open(path, "rb") as f:
                head = f.read(len(magic))
            if head and head != magic:
                raise ConfigError(f"{path} does not start with {magic.decode()}: not a data directory agentd "
                                  "wrote; refusing to upgrade it")
    return "format 1 -> 2: Raft log and snapshot checked; entries keep their bytes and say their own format"


# From format N to N+1; each step is idempotent, so an upgrade killed half way is simply run again.
UPGRADES: dict[int, Callable[[Path], str]] = {1: _check_v1_files}


def prepare(data_dir: Path) -> list[str]:
    """Upgrade `data_dir` to DATA_FORMAT in place, or raise UpgradeRequired for a newer one.

    Returns one sentence per step taken (the caller logs them). A new directory just gets the format file.
    """
    fmt, written_by = read_format(data_dir)
    if fmt > DATA_FORMAT:
        raise UpgradeRequired(
            f"data directory {data_dir} was written by agentd {written_by} (data format {fmt}); this agentd "
            f"{AGENT_VERSION} reads data formats up to {DATA_FORMAT}: run agentd {written_by} or newer on it, or "
            "restore the backup taken before the upgrade (docs/operations.md, 'Upgrades')")
    steps = []
    if fmt:
        while fmt < DATA_FORMAT:
            steps.append(UPGRADES[fmt](data_dir))
            fmt += 1
    if steps or written_by != AGENT_VERSION:
        _write_format(data_dir)
    return steps


def _write_format(data_dir: Path) -> None:
    path = data_dir / FORMAT_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"data_format": DATA_FORMAT, "agent_version": AGENT_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
