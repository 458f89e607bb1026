"""The in-memory Raft log: a snapshot base plus the entries after it.

The whole uncompacted log lives in memory (the control plane's log is small
and compacted past a threshold), so the core never reads storage. Entries not
yet handed to storage are tracked by `unstable_from`, and the membership in
force is derived from the log itself (a configuration takes effect when it is
appended, not when it commits; dissertation §4.1), so truncating a
conflicting CONFIG entry rolls the membership back with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from agentd.cluster.raft.types import Entry, EntryKind, Membership, Snapshot, SnapshotMeta


class LogInvariantError(AssertionError):
    """The log was asked to do something Raft's safety argument forbids (a bug, never input)."""


class RaftLog:
    def __init__(self, snapshot: Snapshot | None, entries: Sequence[Entry], commit: int) -> None:
        self.snapshot = snapshot
        meta = snapshot.meta if snapshot else SnapshotMeta(0, 0, Membership())
        self.snap_index = meta.index
        self.snap_term = meta.term
        self._snap_membership = meta.membership
        self._entries: list[Entry] = []
        self._configs: list[tuple[int, Membership]] = []
        for e in entries:
            if e.index <= self.snap_index:
                continue
            if e.index != self.snap_index + len(self._entries) + 1:
                raise LogInvariantError(f"entries are not contiguous at index {e.index}")
            self._push(e)
        self.committed = max(commit, self.snap_index)
        if self.committed > self.last_index():
            # A commit index beyond the durable log cannot be trusted.
            self.committed = self.last_index()
        self.applied = self.snap_index  # handed to the state machine
        self.unstable_from = self.last_index() + 1  # first entry not yet given to storage

    # ---------------------------------------------------------------- reads

    def last_index(self) -> int:
        return self.snap_index + len(self._entries)

    def first_index(self) -> int:
        return self.snap_index + 1

    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snap_term

    def term(self, index: int) -> int | None:
        """The term of entry `index`, or None when compacted away or beyond the end."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index():
            return None
        return self._entries[index - self.snap_index - 1].term

    def entry(self, index: int) -> Entry:
        return self._entries[index - self.snap_index - 1]

    def matches(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries with lo <= index < hi (at least one if any, then up to max_bytes)."""
        lo = max(lo, self.first_index())
        hi = min(hi, self.last_index() + 1)
        if lo >= hi:
            return []
        out = self._entries[lo - self.snap_index - 1 : hi - self.snap_index - 1]
        if max_bytes is not None:
            size = 0
            for n, e in enumerate(out):
                size += len(e.data) + 32
                if size > max_bytes and n > 0:
                    return out[:n]
        return out

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a candidate's log is at least as up to date as ours."""
        return last_term > self.last_term() or (last_term == self.last_term() and last_index >= self.last_index())

    def membership(self) -> Membership:
        """The latest configuration in the log, committed or not."""
        return self._configs[-1][1] if self._configs else self._snap_membership

    def membership_at(self, index: int) -> Membership:
        found = self._snap_membership
        for i, m in self._configs:
            if i > index:
                break
            found = m
        return found

    def last_config_index(self) -> int:
        return self._configs[-1][0] if self._configs else self.snap_index

    def unstable(self) -> list[Entry]:
        return self.entries(self.unstable_from, self.last_index() + 1)

    def next_committed(self) -> list[Entry]:
        """Committed entries not yet handed out for applying; marks them handed out."""
        out = self.entries(self.applied + 1, self.committed + 1)
        self.applied = self.committed
        return out

    def conflict_hint(self, index: int) -> tuple[int, int]:
        """For a rejected append at `index`: where the leader should probe next.

        Returns (hint_index, hint_term): with hint_term 0 the follower's log
        ends before `index`; otherwise hint_index is the first entry we hold of
        the term we have at `index`, so the leader can skip that whole term.
        """
        if index > self.last_index():
            return self.last_index() + 1, 0
        term = self.term(index)
        if term is None:  # compacted: everything up to the snapshot is committed
            return self.snap_index + 1, 0
        i = index
        while i - 1 > self.snap_index and self.term(i - 1) == term:
            i -= 1
        return i, term

    def last_index_of_term(self, term: int, at_most: int) -> int | None:
        """The highest index <= at_most holding an entry of `term` (leader side of the hint)."""
        i = min(at_most, self.last_index())
        while i > self.snap_index:
            t = self.entry(i).term
            if t == term:
                return i
            if t < term:
                return None
            i -= 1
        return None

    # ---------------------------------------------------------------- writes

    def _push(self, e: Entry) -> None:
        self._entries.append(e)
        if e.kind == EntryKind.CONFIG:
            self._configs.append((e.index, Membership.decode(e.data)))

    def append(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.index != self.last_index() + 1:
                raise LogInvariantError(f"append at {e.index} after {self.last_index()}")
            self._push(e)

    def truncate_from(self, index: int) -> None:
        if index <= self.committed:
            raise LogInvariantError(f"truncating committed entry {index} (commit {self.committed})")
        del self._entries[index - self.snap_index - 1 :]
        while self._configs and self._configs[-1][0] >= index:
            self._configs.pop()
        self.unstable_from = min(self.unstable_from, index)

    def maybe_append(self, prev_index: int, prev_term: int, entries: Sequence[Entry]) -> int | None:
        """Follower side of AppendEntries; the index of the last new entry, or None on mismatch."""
        if not self.matches(prev_index, prev_term):
            return None
        for n, e in enumerate(entries):
            if e.index <= self.snap_index:
                continue
            have = self.term(e.index)
            if have == e.term:
                continue
            if have is not None:
                self.truncate_from(e.index)
            self.append(entries[n:])
            break
        return prev_index + len(entries)

    def commit_to(self, index: int) -> bool:
        index = min(index, self.last_index())
        if index > self.committed:
            self.committed = index
            return True
        return False

    def mark_stable(self) -> None:
        self.unstable_from = self.last_index() + 1

    def restore(self, snapshot: Snapshot) -> None:
        """Install a leader's snapshot, keeping the entries after it if our log agrees (§7)."""
        meta = snapshot.meta
        keep: list[Entry] = []
        if self.matches(meta.index, meta.term):
            keep = self.entries(meta.index + 1, self.last_index() + 1)
        self.snapshot = snapshot
        self.snap_index, self.snap_term, self._snap_membership = meta.index, meta.term, meta.membership
        self._entries, self._configs = [], []
        for e in keep:
            self._push(e)
        self.committed = max(self.committed, meta.index)
        self.applied = max(self.applied, meta.index)
        self.unstable_from = max(self.unstable_from, meta.index + 1) if keep else meta.index + 1

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Replace entries up to `index` (already applied) by the state machine's snapshot."""
        if index <= self.snap_index:
            raise LogInvariantError(f"snapshot at {index} is not newer than {self.snap_index}")
        if index > self.applied:
            raise LogInvariantError(f"snapshot at {index} is beyond applied {self.applied}")
        meta = SnapshotMeta(index, self.entry(index).term, self.membership_at(index))
        snapshot = Snapshot(meta, data)
        del self._entries[: index - self.snap_index]
        self._configs = [(i, m) for i, m in self._configs if i > index]
        self.snapshot = snapshot
        self.snap_index, self.snap_term, self._snap_membership = meta.index, meta.term, meta.membership
        return snapshot
