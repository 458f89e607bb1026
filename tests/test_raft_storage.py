"""Durable Raft storage: round trips, torn tails, corruption, crash points, fsync discipline."""

from __future__ import annotations

import logging
import os

import pytest

from agentd.cluster.raft.storage import FileStorage, MemoryStorage, RaftStorageError
from agentd.cluster.raft.types import (
    Entry,
    EntryKind,
    HardState,
    Member,
    Membership,
    Ready,
    Snapshot,
    SnapshotMeta,
)

MEMBERS = Membership((Member("a", "127.0.0.1:1", True), Member("b", "127.0.0.1:2", False)))


def entries(lo: int, hi: int, term: int = 1) -> tuple[Entry, ...]:
    return tuple(Entry(i, term, EntryKind.NORMAL, f"cmd-{i}-{term}".encode()) for i in range(lo, hi + 1))


def opened(tmp_path, node="a", **kw) -> FileStorage:
    st = FileStorage(tmp_path, node, **kw)
    st.load()
    return st


def reload(tmp_path, node="a"):
    st = FileStorage(tmp_path, node)
    try:
        return st.load()
    finally:
        st.close()


def test_round_trip(tmp_path):
    st = opened(tmp_path)
    cfg = Entry(1, 1, EntryKind.CONFIG, MEMBERS.encode())
    st.save(Ready(hard_state=HardState(3, "b", 2), entries=(cfg, *entries(2, 5, term=3))))
    st.set_cluster_id("c-123")
    st.close()
    got = reload(tmp_path)
    assert got.hard_state == HardState(3, "b", 2)
    assert got.cluster_id == "c-123" and got.node_id == "a"
    assert got.entries == [cfg, *entries(2, 5, term=3)]


def test_a_conflicting_suffix_replaces_the_old_one(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(entries=entries(1, 6, term=1)))
    st.save(Ready(hard_state=HardState(2, None, 0), entries=entries(4, 5, term=2)))
    st.close()
    assert reload(tmp_path).entries == [*entries(1, 3, term=1), *entries(4, 5, term=2)]


def test_snapshot_compacts_the_log_and_survives_reload(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(hard_state=HardState(2, "a", 8), entries=entries(1, 10, term=2)))
    snap = Snapshot(SnapshotMeta(8, 2, MEMBERS), b"state@8")
    st.save(Ready(snapshot=snap))
    st.save(Ready(entries=entries(11, 12, term=2)))
    st.close()
    got = reload(tmp_path)
    assert got.snapshot == snap
    assert got.entries == list(entries(9, 12, term=2))
    assert got.hard_state.commit == 8


def test_installed_snapshot_drops_a_conflicting_log(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(entries=entries(1, 10, term=1)))
    snap = Snapshot(SnapshotMeta(20, 3, MEMBERS), b"leader state")
    st.save(Ready(hard_state=HardState(3, None, 20), snapshot=snap))
    st.close()
    got = reload(tmp_path)
    assert got.snapshot == snap and got.entries == [] and got.last_index() == 20


# ---------------------------------------------------------------- torn and corrupt logs


def _log_with_three_batches(tmp_path) -> tuple[int, int]:
    """Returns the byte offsets where the last batch starts and the file ends."""
    st = opened(tmp_path)
    st.save(Ready(hard_state=HardState(1, "a", 0), entries=entries(1, 3)))
    st.save(Ready(entries=entries(4, 5)))
    middle = os.path.getsize(st.wal_path)
    st.save(Ready(entries=entries(6, 6)))
    end = os.path.getsize(st.wal_path)
    st.close()
    return middle, end


def test_every_truncation_of_the_last_record_is_a_torn_tail(tmp_path, caplog):
    middle, end = _log_with_three_batches(tmp_path)
    wal = tmp_path / "raft.wal"
    full = wal.read_bytes()
    for cut in range(middle + 1, end):
        wal.write_bytes(full[:cut])
        with caplog.at_level(logging.WARNING):
            got = reload(tmp_path)
        assert [e.index for e in got.entries] == [1, 2, 3, 4, 5], cut
        assert os.path.getsize(wal) == middle, "the torn record must be cut off"
    assert "torn or corrupt record at the end" in caplog.text


def test_after_a_torn_tail_the_log_keeps_working(tmp_path):
    _, end = _log_with_three_batches(tmp_path)
    wal = tmp_path / "raft.wal"
    wal.write_bytes(wal.read_bytes()[: end - 3])
    st = opened(tmp_path)
    st.save(Ready(entries=entries(6, 7, term=2)))
    st.close()
    assert [(e.index, e.term) for e in reload(tmp_path).entries][-2:] == [(6, 2), (7, 2)]


def test_bit_flip_in_the_last_record_is_cut_off_with_a_warning(tmp_path, caplog):
    _, end = _log_with_three_batches(tmp_path)
    wal = tmp_path / "raft.wal"
    data = bytearray(wal.read_bytes())
    data[end - 2] ^= 0x10
    wal.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        got = reload(tmp_path)
    assert got.last_index() == 5
    assert "torn or corrupt record" in caplog.text


def test_zero_filled_tail_is_a_torn_write(tmp_path):
    _log_with_three_batches(tmp_path)
    wal = tmp_path / "raft.wal"
    wal.write_bytes(wal.read_bytes() + b"\0" * 4096)
    assert reload(tmp_path).last_index() == 6


@pytest.mark.parametrize("where", ["payload", "length", "crc"])
def test_corruption_in_the_middle_is_a_clear_error(tmp_path, where):
    middle, _ = _log_with_three_batches(tmp_path)
    wal = tmp_path / "raft.wal"
    data = bytearray(wal.read_bytes())
    record_start = middle - (11 + 17 + len(b"cmd-5-1"))  # the record holding entry 5
    offset = {"payload": middle - 2, "length": record_start + 3, "crc": record_start + 7}[where]
    data[offset] ^= 0x01
    wal.write_bytes(bytes(data))
    with pytest.raises(RaftStorageError, match=r"corrupt record at byte \d+ with valid records after it") as exc:
        reload(tmp_path)
    assert str(tmp_path / "raft.wal") in str(exc.value)
    assert wal.read_bytes() == bytes(data), "a corrupt log must not be modified"


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "raft.wal").write_bytes(b"PK\x03\x04 definitely not ours")
    with pytest.raises(RaftStorageError, match="bad header"):
        reload(tmp_path)


def test_torn_header_of_a_new_log_starts_empty(tmp_path):
    (tmp_path / "raft.wal").write_bytes(b"AGDR")
    got = reload(tmp_path)
    assert got.is_empty()


def test_corrupt_snapshot_is_a_clear_error(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(entries=entries(1, 4)))
    st.save(Ready(snapshot=Snapshot(SnapshotMeta(4, 1, MEMBERS), b"x" * 100)))
    st.close()
    snap = tmp_path / "raft.snap"
    data = bytearray(snap.read_bytes())
    data[-5] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(RaftStorageError, match="snapshot checksum mismatch"):
        reload(tmp_path)


def test_missing_snapshot_is_a_clear_error(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(entries=entries(1, 4)))
    st.save(Ready(snapshot=Snapshot(SnapshotMeta(4, 1, MEMBERS), b"s")))
    st.close()
    (tmp_path / "raft.snap").unlink()
    with pytest.raises(RaftStorageError, match="snapshot is missing"):
        reload(tmp_path)


# ---------------------------------------------------------------- crash points during a snapshot


def test_crash_after_writing_a_compaction_snapshot_before_the_log_rewrite(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(hard_state=HardState(1, None, 6), entries=entries(1, 8)))
    st._write_snapshot(Snapshot(SnapshotMeta(6, 1, MEMBERS), b"state@6"))  # then the process dies
    st.close()
    got = reload(tmp_path)
    assert got.snapshot.meta.index == 6
    assert [e.index for e in got.entries] == [7, 8]  # the log agrees at 6: keep what follows


def test_crash_after_writing_an_installed_snapshot_before_the_log_rewrite(tmp_path):
    st = opened(tmp_path)
    st.save(Ready(entries=entries(1, 8, term=1)))
    st._write_snapshot(Snapshot(SnapshotMeta(6, 4, MEMBERS), b"leader state"))  # then the process dies
    st.close()
    got = reload(tmp_path)
    assert got.snapshot.meta.term == 4
    assert got.entries == []  # our entries disagree with the snapshot: none may survive


# ---------------------------------------------------------------- identity and locking


def test_data_dir_of_another_node_is_refused(tmp_path):
    st = opened(tmp_path, node="a")
    st.close()
    with pytest.raises(RaftStorageError, match="belongs to node 'a', not 'b'"):
        reload(tmp_path, node="b")


def test_two_processes_cannot_share_a_data_dir(tmp_path):
    st = opened(tmp_path)
    with pytest.raises(RaftStorageError, match="another agentd process"):
        reload(tmp_path)
    st.close()
    reload(tmp_path)


# ---------------------------------------------------------------- fsync discipline


class FsyncLog:
    def __init__(self):
        self.calls = []

    def __call__(self, fd):
        self.calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)


def test_entries_and_votes_are_fsynced_before_save_returns(tmp_path):
    rec = FsyncLog()
    st = opened(tmp_path, fsync=rec)
    rec.calls.clear()
    st.save(Ready(entries=entries(1, 2)))
    assert rec.calls == [str(tmp_path / "raft.wal")]
    rec.calls.clear()
    st.save(Ready(hard_state=HardState(5, "b", 0)))
    assert rec.calls == [str(tmp_path / "raft.wal")], "a vote must be durable before it is sent"
    st.close()


def test_a_commit_index_alone_is_not_fsynced(tmp_path):
    rec = FsyncLog()
    st = opened(tmp_path, fsync=rec)
    st.save(Ready(hard_state=HardState(1, None, 0), entries=entries(1, 3)))
    rec.calls.clear()
    st.save(Ready(hard_state=HardState(1, None, 3)))
    assert rec.calls == []
    st.close()
    assert reload(tmp_path).hard_state.commit == 3  # written, just not forced


def test_snapshot_is_fsynced_with_its_directory_before_the_log_moves_on(tmp_path):
    rec = FsyncLog()
    st = opened(tmp_path, fsync=rec)
    st.save(Ready(entries=entries(1, 4)))
    rec.calls.clear()
    st.save(Ready(snapshot=Snapshot(SnapshotMeta(3, 1, MEMBERS), b"s")))
    d = str(tmp_path)
    assert rec.calls == [d + "/raft.snap.tmp", d, d + "/raft.wal.tmp", d]
    st.close()


def test_memory_storage_has_the_same_semantics(tmp_path):
    fs, ms = opened(tmp_path), MemoryStorage("a")
    batches = [
        Ready(hard_state=HardState(1, "a", 0), entries=entries(1, 6)),
        Ready(hard_state=HardState(2, None, 3), entries=entries(5, 7, term=2)),
        Ready(snapshot=Snapshot(SnapshotMeta(4, 1, MEMBERS), b"s4")),
        Ready(entries=entries(8, 9, term=2)),
        Ready(snapshot=Snapshot(SnapshotMeta(12, 3, MEMBERS), b"s12")),
    ]
    for rd in batches:
        fs.save(rd)
        ms.save(rd)
    fs.close()
    got, want = reload(tmp_path), ms.load()
    assert (got.hard_state, got.snapshot, got.entries) == (want.hard_state, want.snapshot, want.entries)
