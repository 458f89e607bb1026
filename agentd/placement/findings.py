"""Collecting rejections and turning them into a Kubernetes-FitError-style diagnosis.

Rejections are grouped by (subject, reason) and counted; each group keeps
the instance that came closest to fitting (its numbers are shown) and the
first few places it happened. The message reads like the scheduler's:

    0/12 hosts can run deepseek-r1 (llamabox): 8 main-server candidates cannot
    hold one layer (needs 21.9 GiB, largest free 11.0 GiB), 4 hosts excluded by selector rack=b

Groups are ordered by count (most first), then by pipeline stage (host,
device, shape, candidate), then by text, so the same input always gives the
same message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentd.placement.constraints import Rejection
from agentd.placement.units import plural
from agentd.types import Diagnosis, Reason

STATIC, HOST, DEVICE, SHAPE, CANDIDATE = range(5)
MAX_WHERE = 8
MAX_FIXES = 64


@dataclass
class Group:
    stage: int
    order: int
    first: Rejection
    best: Rejection
    count: int = 0
    wheres: list[str] = field(default_factory=list)
    fixes: dict[str, None] = field(default_factory=dict)  # an ordered set

    def add(self, r: Rejection) -> None:
        self.count += 1
        if r.closeness > self.best.closeness:
            self.best = r
        if r.where and len(self.wheres) < MAX_WHERE and r.where not in self.wheres:
            self.wheres.append(r.where)
        if r.fix and len(self.fixes) < MAX_FIXES:
            self.fixes[r.fix_text()] = None

    @property
    def subjects(self) -> str:
        return plural(self.count, self.first.subject, self.first.subject_plural or None)

    def text(self) -> str:
        detail = self.best.detail_text()
        if self.first.list_where and self.wheres:
            more = ", ..." if self.count > len(self.wheres) else ""
            detail = f"{detail}: {', '.join(self.wheres)}{more}" if detail else ", ".join(self.wheres) + more
        return f"{self.count} {self.subjects} {self.first.reason}" + (f" ({detail})" if detail else "")

    def reason(self) -> Reason:
        plural_subject = self.first.subject_plural or self.first.subject + "s"
        details = {"subject": self.first.subject, "stage": _STAGE_NAMES[self.stage], "detail": self.best.detail_text(),
                   **self.best.details}
        if self.wheres:
            details["where"] = list(self.wheres)
        if self.fixes:
            details["fixes"] = list(self.fixes)
        return Reason(reason=f"{plural_subject} {self.first.reason}", count=self.count, details=details)


_STAGE_NAMES = {STATIC: "request", HOST: "host", DEVICE: "device", SHAPE: "shape", CANDIDATE: "candidate"}


class Findings:
    """Every rejection of one placement attempt.

    Host and device rejections arrive in bulk (one tuple per host, cached
    across replicas) and are only needed when the attempt fails, so they are
    queued as is and grouped on first read, in arrival order: a successful
    placement never pays for grouping thousands of them.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], Group] = {}
        self._queued: list[tuple[int, tuple[Rejection, ...]]] = []

    def add(self, stage: int, r: Rejection) -> None:
        self._queued.append((stage, (r,)))

    def _add(self, stage: int, r: Rejection) -> None:
        g = self._groups.get(r.key)
        if g is None:
            g = self._groups[r.key] = Group(stage, len(self._groups), r, r)
        g.add(r)

    def add_all(self, stage: int, rs: tuple[Rejection, ...]) -> None:
        """Queue rejections of one stage; they are grouped when the findings are read."""
        self._queued.append((stage, rs))

    def _flush(self) -> None:
        """Group the queued rejections: `_add` and `Group.add`, inlined (a failure on a big cluster
        groups thousands of device rejections)."""
        queued, self._queued = self._queued, []
        groups = self._groups
        for stage, rs in queued:
            g = None
            gkey = None
            for r in rs:
                key = (r[0], r[1])  # Rejection.key
                if key != gkey:
                    gkey = key
                    g = groups.get(key)
                    if g is None:
                        g = groups[key] = Group(stage, len(groups), r, r)
                g.count += 1
                if r[5] > g.best[5]:  # closeness
                    g.best = r
                where = r[4]
                if where and len(g.wheres) < MAX_WHERE and where not in g.wheres:
                    g.wheres.append(where)
                if r[6] and len(g.fixes) < MAX_FIXES:  # fix
                    g.fixes[r.fix_text()] = None

    def extend(self, stage: int, rs) -> None:
        self._queued.append((stage, tuple(rs)))

    def __bool__(self) -> bool:
        return bool(self._groups) or any(self._queued)

    def groups(self) -> list[Group]:
        self._flush()
        return sorted(self._groups.values(), key=lambda g: (-g.count, g.stage, g.first.subject, g.first.reason))

    def near_miss(self) -> Rejection | None:
        """The layout or candidate that came closest to fitting."""
        self._flush()
        best = None
        for g in self._groups.values():
            if g.stage >= SHAPE and g.best.closeness > 0 and (best is None or g.best.closeness > best.closeness):
                best = g.best
        return best

    def fixes(self) -> list[str]:
        out: list[str] = []
        for g in self.groups():
            out += [f for f in g.fixes if f not in out]
        return out

    def has_detail(self, key: str) -> list[Rejection]:
        self._flush()
        return [g.best for g in self._groups.values() if key in g.best.details]

    def diagnosis(self, headline: str, suggestions: list[str]) -> Diagnosis:
        groups = self.groups()
        body = ", ".join(g.text() for g in groups) or "no candidate was found"
        near = self.near_miss()
        near_text = None
        if near is not None:
            near_text = f"{near.subject} {near.where} {near.reason}".replace("  ", " ")
            if near.detail_text():
                near_text += f": {near.detail_text()}"
        return Diagnosis(
            message=f"{headline}: {body}",
            reasons=tuple(g.reason() for g in groups),
            near_miss=near_text,
            suggestions=tuple(suggestions),
        )
