"""Backups of the replicated state: the snapshot file, and seeding a new cluster from one.

`agentd snapshot save` writes the state machine's snapshot (agentd.cluster.state,
which carries its own state format) inside this file:

    AGENTD-SNAPSHOT\\n                   16 bytes of magic: anything else is not ours
    {"file_format": 1, ...}\\n           one JSON header line (below)
    <size bytes of state>                ClusterState.snapshot()

The header says where the state was taken (index, term, cluster id, node,
time, agent version, state format) and what follows (`size`, `sha256`). A file
that is cut short, altered or of a newer file format is refused with one
sentence before anything is written.

`agentd snapshot restore` works like etcd's: it never touches a running cluster.
It seeds a *new* data directory with the state as a Raft snapshot whose only
voter is the restoring agent, under a new cluster id, so members of the old
cluster (whose logs carry the old id) can never mix with the new one. The
restored agent starts as usual and the other hosts join it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.errors import InvalidInput
from agentd.security.files import open_private, private_dir

MAGIC = b"AGENTD-SNAPSHOT\n"
FILE_FORMAT = 1
MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class BackupHeader:
    index: int
    term: int
    cluster_id: str
    node: str
    saved_at: float
    agent_version: str
    state_format: int
    size: int
    sha256: str
    file_format: int = FILE_FORMAT

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def encode(state: bytes, *, index: int, term: int, cluster_id: str, node: str, agent_version: str,
           saved_at: float | None = None) -> bytes:
    """The file's bytes for a state snapshot taken at (index, term)."""
    try:
        state_format = int(json.loads(state).get("format", 1))
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidInput(f"the agent sent a state snapshot that is not JSON: {exc}") from None
    header = BackupHeader(index=index, term=term, cluster_id=cluster_id, node=node,
                          saved_at=time.time() if saved_at is None else saved_at, agent_version=agent_version,
                          state_format=state_format, size=len(state), sha256=hashlib.sha256(state).hexdigest())
    return MAGIC + json.dumps(header.to_json(), sort_keys=True).encode() + b"\n" + state


def decode(raw: bytes, where: str = "the file") -> tuple[BackupHeader, bytes]:
    """(header, state bytes) of a snapshot file; InvalidInput naming what is wrong otherwise."""
    if not raw.startswith(MAGIC):
        raise InvalidInput(f"{where} is not an agentd snapshot file (it does not start with "
                           f"{MAGIC.decode().strip()!r})")
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise InvalidInput(f"{where}: the snapshot header is cut short or unreadable")
    try:
        head = json.loads(raw[len(MAGIC):end])
        fmt = head.get("file_format")
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise ValueError("no file_format")
        if fmt > FILE_FORMAT:
            raise InvalidInput(f"{where} has snapshot file format {fmt} (written by agentd "
                               f"{head.get('agent_version', '?')}); this agentd reads format {FILE_FORMAT}: "
                               "restore it with that release or newer")
        header = BackupHeader(**{k: head[k] for k in BackupHeader.__dataclass_fields__})
        if not (isinstance(header.index, int) and isinstance(header.term, int) and isinstance(header.size, int)):
            raise ValueError("index, term and size must be integers")
    except InvalidInput:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"{where}: the snapshot header is unreadable ({exc})") from None
    state = raw[end + 1:]
    if len(state) != header.size:
        raise InvalidInput(f"{where} is truncated or padded: it holds {len(state)} bytes of state, its header "
                           f"says {header.size}")
    if hashlib.sha256(state).hexdigest() != header.sha256:
        raise InvalidInput(f"{where} is corrupt: the state's SHA-256 does not match its header")
    return header, state


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` owner-only (0600 whatever the umask: the state holds secrets), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_file(path: Path) -> tuple[BackupHeader, bytes]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    return decode(raw, str(path))


def seed_data_dir(path: Path, data_dir: Path, *, node_id: str, address: str) -> dict[str, Any]:
    """Make `data_dir` the data directory of a new one-voter cluster holding the snapshot's state.

    Everything is checked before anything is written: the file, the state inside it (this agentd must be
    able to apply it), and that `data_dir` holds no Raft log yet. Returns what was done (for the CLI).
    """
    from agentd import datadir
    from agentd.cluster.raft.storage import FileStorage
    from agentd.cluster.raft.types import HardState, Member, Membership, Ready, Snapshot, SnapshotMeta
    from agentd.cluster.state import ClusterState

    if not node_id:
        raise InvalidInput("restore needs the restoring agent's node name (--node-name)")
    if not address:
        raise InvalidInput("restore needs the address other agents reach the restoring agent on (--advertise)")
    header, state = read_file(path)
    try:
        ClusterState().restore(state)  # raises UpgradeRequired for a newer state format
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path}: the state inside is unreadable ({type(exc).__name__}: {exc})") from None
    data_dir = Path(data_dir)
    raft_dir = data_dir / "raft"
    if raft_dir.exists() and any(raft_dir.iterdir()):
        raise InvalidInput(f"{data_dir} already holds a Raft log ({raft_dir}): restore only into a new data "
                           "directory (move the old one aside first)")
    if data_dir.exists():
        fmt, by = datadir.read_format(data_dir)
        if fmt > datadir.DATA_FORMAT:
            raise InvalidInput(f"{data_dir} was written by agentd {by} (data format {fmt}): too new for this agentd")
    private_dir(data_dir)
    datadir.prepare(data_dir)
    index, term = max(header.index, 1), max(header.term, 1)
    cluster_id = uuid.uuid4().hex
    storage = FileStorage(raft_dir, node_id)
    try:
        storage.load()
        membership = Membership((Member(node_id, address, True),))
        snap = Snapshot(SnapshotMeta(index, term, membership), state)
        storage.save(Ready(hard_state=HardState(term, None, index), snapshot=snap))
        storage.set_cluster_id(cluster_id)
    finally:
        storage.close()
    return {"restored": True, "data_dir": str(data_dir), "node": node_id, "address": address,
            "cluster_id": cluster_id, "previous_cluster_id": header.cluster_id, "index": index, "term": term,
            "saved_at": header.saved_at, "state_format": header.state_format}
