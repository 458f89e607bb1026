"""Durable Raft state: an append-only, checksummed, fsynced log plus a snapshot file.

Layout under the data directory (see docs/raft.md for the byte format):

- `raft.wal`  header `AGDRAFT1`, then records `<magic u16><type u8><len u32><crc32 u32><payload>`;
  the CRC covers type, length and payload. Types: META (node and cluster id),
  HARD (term, vote, commit), BASE (the snapshot the entries follow) and ENTRY.
  An ENTRY at index i replaces every stored entry at i or later, which is how
  a follower's conflicting suffix is truncated without rewriting the file.
- `raft.snap` header `AGDSNAP1`, CRC32, meta length, meta JSON, state-machine bytes;
  replaced atomically (write temp, fsync, rename, fsync the directory).
- `raft.lock` an flock so two daemons never share one directory.

On load a record that fails its check with nothing valid after it is a torn
write: it is cut off with a warning. A bad record followed by valid ones is
corruption in the middle and stops the node with a clear error, because
silently dropping acknowledged entries would break Raft's guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agentd.cluster.raft.types import Entry, EntryKind, HardState, Membership, Ready, Snapshot, SnapshotMeta
from agentd.errors import AgentdError
from agentd.logs import fields
from agentd.security.files import open_private, private_dir

log = logging.getLogger(__name__)

WAL_MAGIC = b"AGDRAFT1"
SNAP_MAGIC = b"AGDSNAP1"
REC_MAGIC = 0xA7D3
REC_HEADER = struct.Struct("<HBII")  # magic, type, payload length, crc32
MAX_RECORD = 256 << 20

T_META, T_HARD, T_BASE, T_ENTRY = 1, 2, 3, 4
_U64X2 = struct.Struct("<QQ")
_ENTRY_HEAD = struct.Struct("<QQB")


class RaftStorageError(AgentdError):
    """The Raft data directory is corrupt, foreign or unusable; the node must not start on it."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class PersistedState:
    """Everything a restarted node knows: rebuild the core from this alone."""

    node_id: str = ""
    cluster_id: str = ""  # empty until this node bootstrapped or finished joining
    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def snap_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snap_index

    def is_empty(self) -> bool:
        return not self.entries and self.snapshot is None and self.hard_state == HardState()

    def put_entries(self, entries: Iterable[Entry], where: str = "") -> None:
        for e in entries:
            if e.index <= self.snap_index:
                continue
            if e.index > self.last_index() + 1:
                raise RaftStorageError(f"log gap: entry {e.index} after {self.last_index()}", where=where)
            del self.entries[e.index - self.snap_index - 1 :]
            self.entries.append(e)

    def put_snapshot(self, snap: Snapshot) -> None:
        """Raft §7: keep the entries after the snapshot only if our log agrees at its index."""
        keep: list[Entry] = []
        i = snap.meta.index - self.snap_index - 1
        if i == -1 and (self.snapshot is None or self.snapshot.meta.term == snap.meta.term):
            keep = self.entries
        elif 0 <= i < len(self.entries) and self.entries[i].term == snap.meta.term:
            keep = self.entries[i + 1 :]
        self.snapshot, self.entries = snap, keep
        if self.hard_state.commit < snap.meta.index:
            hs = self.hard_state
            self.hard_state = HardState(hs.term, hs.vote, snap.meta.index)


class Storage(Protocol):
    def load(self) -> PersistedState: ...
    def save(self, rd: Ready) -> None: ...
    def set_cluster_id(self, cluster_id: str) -> None: ...
    def close(self) -> None: ...


class MemoryStorage:
    """Storage with the same semantics and no disk (the simulator, unit tests)."""

    def __init__(self, node_id: str, cluster_id: str = "") -> None:
        self.state = PersistedState(node_id=node_id, cluster_id=cluster_id)

    def load(self) -> PersistedState:
        s = self.state
        return PersistedState(s.node_id, s.cluster_id, s.hard_state, s.snapshot, list(s.entries))

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.state.put_snapshot(rd.snapshot)
        self.state.put_entries(rd.entries)
        if rd.hard_state is not None:
            self.state.hard_state = rd.hard_state

    def set_cluster_id(self, cluster_id: str) -> None:
        self.state.cluster_id = cluster_id

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- encoding


def _record(rtype: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<BI", rtype, len(payload))))
    return REC_HEADER.pack(REC_MAGIC, rtype, len(payload), crc) + payload


def _hard_payload(hs: HardState) -> bytes:
    return _U64X2.pack(hs.term, hs.commit) + (hs.vote or "").encode()


def _entry_payload(e: Entry) -> bytes:
    return _ENTRY_HEAD.pack(e.index, e.term, int(e.kind)) + e.data


def _parse_record(buf: bytes, off: int) -> tuple[int, bytes, int] | None:
    """(type, payload, next offset) of a valid record at `off`, else None."""
    if off + REC_HEADER.size > len(buf):
        return None
    magic, rtype, length, crc = REC_HEADER.unpack_from(buf, off)
    if magic != REC_MAGIC or length > MAX_RECORD or rtype not in (T_META, T_HARD, T_BASE, T_ENTRY):
        return None
    end = off + REC_HEADER.size + length
    if end > len(buf):
        return None
    payload = buf[off + REC_HEADER.size : end]
    if zlib.crc32(payload, zlib.crc32(struct.pack("<BI", rtype, length))) != crc:
        return None
    return rtype, payload, end


def _next_valid_record(buf: bytes, start: int) -> int | None:
    magic = struct.pack("<H", REC_MAGIC)
    pos = buf.find(magic, start)
    while pos != -1:
        if _parse_record(buf, pos) is not None:
            return pos
        pos = buf.find(magic, pos + 1)
    return None


def _encode_snapshot(snap: Snapshot) -> bytes:
    meta = json.dumps({
        "index": snap.meta.index,
        "term": snap.meta.term,
        "members": json.loads(snap.meta.membership.encode()),
    }).encode()
    body = struct.pack("<Q", len(meta)) + meta + snap.data
    return SNAP_MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def _decode_snapshot(raw: bytes, where: str) -> Snapshot:
    if raw[:8] != SNAP_MAGIC or len(raw) < 20:
        raise RaftStorageError("not an agentd snapshot file (bad header)", where=where)
    (crc,) = struct.unpack_from("<I", raw, 8)
    body = raw[12:]
    if zlib.crc32(body) != crc:
        raise RaftStorageError("snapshot checksum mismatch: the file is corrupt", where=where)
    (meta_len,) = struct.unpack_from("<Q", body)
    try:
        meta = json.loads(body[8 : 8 + meta_len])
        membership = Membership.decode(json.dumps(meta["members"]).encode())
        sm = SnapshotMeta(int(meta["index"]), int(meta["term"]), membership)
    except (ValueError, KeyError, TypeError) as exc:
        raise RaftStorageError(f"snapshot metadata unreadable: {exc}", where=where) from None
    return Snapshot(sm, bytes(body[8 + meta_len :]))


# ---------------------------------------------------------------- file storage


class FileStorage:
    """The production storage. Calls are serialised by a lock (the driver saves from a worker thread)."""

    def __init__(self, directory: Path, node_id: str, *, fsync: Callable[[int], None] = os.fsync) -> None:
        self.dir = Path(directory)
        self.node_id = node_id
        self._fsync = fsync
        self.wal_path = self.dir / "raft.wal"
        self.snap_path = self.dir / "raft.snap"
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._state = PersistedState(node_id=node_id)
        self._mutex = threading.Lock()

    # ------------------------------------------------------------ load

    def load(self) -> PersistedState:
        try:
            return self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> PersistedState:
        try:
            private_dir(self.dir)
            self._lock()
            snapshot = _decode_snapshot(self.snap_path.read_bytes(), str(self.snap_path)) \
                if self.snap_path.exists() else None
            if self.wal_path.exists():
                state = self._replay(snapshot)
            else:
                if snapshot is not None:
                    raise RaftStorageError("snapshot present but the log is missing", where=str(self.wal_path))
                state = PersistedState(node_id=self.node_id)
                self._rewrite(state)
        except OSError as exc:
            raise RaftStorageError(f"cannot use Raft data directory: {exc}", where=str(self.dir)) from None
        if state.node_id and state.node_id != self.node_id:
            raise RaftStorageError(
                f"this directory belongs to node {state.node_id!r}, not {self.node_id!r}", where=str(self.dir))
        state.node_id = self.node_id
        self._state = state
        self._fd = os.open(self.wal_path, os.O_WRONLY | os.O_APPEND)
        return PersistedState(state.node_id, state.cluster_id, state.hard_state, state.snapshot, list(state.entries))

    def _lock(self) -> None:
        self._lock_fd = open_private(self.dir / "raft.lock", os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RaftStorageError("another agentd process is using this data directory",
                                   where=str(self.dir)) from None

    def _replay(self, snapshot: Snapshot | None) -> PersistedState:
        where = str(self.wal_path)
        buf = self.wal_path.read_bytes()
        if buf[: len(WAL_MAGIC)] != WAL_MAGIC:
            if WAL_MAGIC.startswith(buf) and snapshot is None:
                log.warning("Raft log header was torn; starting with an empty log", extra=fields(path=where))
                state = PersistedState(node_id=self.node_id)
                self._rewrite(state)
                return state
            raise RaftStorageError("not an agentd Raft log (bad header)", where=where)
        state = PersistedState()
        base: tuple[int, int] = (0, 0)
        entries: list[Entry] = []
        off = len(WAL_MAGIC)
        while off < len(buf):
            rec = _parse_record(buf, off)
            if rec is None:
                later = _next_valid_record(buf, off + 1)
                if later is not None:
                    raise RaftStorageError(
                        f"corrupt record at byte {off} with valid records after it (at byte {later}); "
                        "refusing to start on a damaged log: remove this data directory and rejoin the cluster",
                        where=where)
                log.warning("discarding a torn or corrupt record at the end of the Raft log",
                            extra=fields(path=where, offset=off, discarded_bytes=len(buf) - off))
                self._truncate(off)
                break
            rtype, payload, nxt = rec
            self._apply_record(state, rtype, payload, off, entries, where)
            if rtype == T_BASE:
                base = _U64X2.unpack(payload)
                entries = []
            off = nxt
        self._merge(state, snapshot, base, entries, where)
        return state

    def _apply_record(self, state: PersistedState, rtype: int, payload: bytes, off: int,
                      entries: list[Entry], where: str) -> None:
        at = f"{where}@{off}"
        try:
            if rtype == T_META:
                meta = json.loads(payload)
                state.node_id, state.cluster_id = str(meta["node_id"]), str(meta.get("cluster_id", ""))
            elif rtype == T_HARD:
                term, commit = _U64X2.unpack_from(payload)
                vote = payload[_U64X2.size :].decode() or None
                state.hard_state = HardState(term, vote, commit)
            elif rtype == T_ENTRY:
                index, term, kind = _ENTRY_HEAD.unpack_from(payload)
                e = Entry(index, term, EntryKind(kind), bytes(payload[_ENTRY_HEAD.size :]))
                if entries:
                    first = entries[0].index
                    if index > entries[-1].index + 1 or index < first:
                        raise RaftStorageError(f"log gap: entry {index} after {entries[-1].index}", where=at)
                    del entries[index - first :]
                entries.append(e)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
            raise RaftStorageError(f"unreadable record: {exc}", where=at) from None

    def _merge(self, state: PersistedState, snapshot: Snapshot | None, base: tuple[int, int],
               entries: list[Entry], where: str) -> None:
        base_index, base_term = base
        if entries and entries[0].index != base_index + 1:
            raise RaftStorageError(f"log starts at {entries[0].index} but its base is {base_index}", where=where)
        if base_index and (snapshot is None or snapshot.meta.index < base_index):
            raise RaftStorageError(f"log follows snapshot {base_index} but that snapshot is missing",
                                   where=str(self.snap_path))
        state.snapshot = None
        state.entries = entries
        if snapshot is not None:
            if snapshot.meta.index == base_index and snapshot.meta.term != base_term:
                raise RaftStorageError("snapshot and log disagree about the base term", where=where)
            # A newer snapshot than the log's base means we crashed between writing
            # the snapshot and rewriting the log: apply the §7 rule again.
            state.snapshot = Snapshot(SnapshotMeta(base_index, base_term, Membership()), b"")
            state.put_snapshot(snapshot)
        if state.hard_state.commit > state.last_index():
            hs = state.hard_state
            state.hard_state = HardState(hs.term, hs.vote, state.last_index())

    def _truncate(self, size: int) -> None:
        with open(self.wal_path, "r+b") as f:
            f.truncate(size)
            f.flush()
            self._fsync(f.fileno())

    # ------------------------------------------------------------ write

    def save(self, rd: Ready) -> None:
        """Persist one Ready; returns once it is durable (when durability matters)."""
        with self._mutex:
            self._save(rd)

    def _save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self._write_snapshot(rd.snapshot)
            self._state.put_snapshot(rd.snapshot)
            if rd.hard_state is not None:
                self._state.hard_state = rd.hard_state
            self._state.put_entries(rd.entries, str(self.wal_path))
            self._rewrite(self._state)
            return
        out = bytearray()
        if rd.hard_state is not None:
            out += _record(T_HARD, _hard_payload(rd.hard_state))
        for e in rd.entries:
            out += _record(T_ENTRY, _entry_payload(e))
        if not out:
            return
        self._append(bytes(out))
        # A commit-index-only change need not be durable: a lower commit after a
        # crash is always safe, and skipping the fsync keeps commit latency down.
        prev = self._state.hard_state
        durable = bool(rd.entries) or (
            rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) != (prev.term, prev.vote))
        if durable:
            self._fsync(self._fd)
        if rd.hard_state is not None:
            self._state.hard_state = rd.hard_state
        self._state.put_entries(rd.entries, str(self.wal_path))

    def set_cluster_id(self, cluster_id: str) -> None:
        with self._mutex:
            self._state.cluster_id = cluster_id
            self._append(self._meta_record(self._state))
            self._fsync(self._fd)

    def _meta_record(self, state: PersistedState) -> bytes:
        return _record(T_META, json.dumps({"node_id": self.node_id, "cluster_id": state.cluster_id}).encode())

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            raise RaftStorageError("storage is not open", where=str(self.wal_path))
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _write_snapshot(self, snap: Snapshot) -> None:
        self._atomic_write(self.snap_path, _encode_snapshot(snap))

    def _rewrite(self, state: PersistedState) -> None:
        """Replace the log with its live content: meta, hard state, base, entries."""
        out = bytearray(WAL_MAGIC)
        out += self._meta_record(state)
        out += _record(T_HARD, _hard_payload(state.hard_state))
        if state.snapshot is not None:
            out += _record(T_BASE, _U64X2.pack(state.snapshot.meta.index, state.snapshot.meta.term))
        for e in state.entries:
            out += _record(T_ENTRY, _entry_payload(e))
        self._atomic_write(self.wal_path, bytes(out))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = os.open(self.wal_path, os.O_WRONLY | os.O_APPEND)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)  # the log holds the cluster secret
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            self._fsync(dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        with self._mutex:  # a save still running in a worker thread finishes first
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None
