"""The leader's half of cordon and drain (docs/operations.md, "Cordon and drain").

`cordon` resolves what the operator named (a host, HOST:INDEX, or a GPU UUID)
against what the hosts report and commits a cordon. `step`, called from the
coordinator's tick on whichever agent leads, moves the replicas of every drain
one decision at a time, surge first (agentd/cluster/maintenance.py): place a
successor elsewhere, wait until every part of it runs, then promote it, which
stops the old incarnation. Everything it needs to resume is in the replicated
state, so a drain survives a failover mid-way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentd.cluster.maintenance import Cordon, cordon_key
from agentd.cluster.state import (
    NODE_DOWN,
    ApplyResult,
    cordon_command,
    promote_command,
    retire_command,
    surge_cancel_command,
    surge_command,
    uncordon_command,
)
from agentd.errors import AgentdError, InvalidInput, PeerError
from agentd.runtime.states import LIVE_STATES
from agentd.types import Assignment

if TYPE_CHECKING:
    from agentd.coordinator import Coordinator

RETRY_AFTER = 5.0  # seconds before a replica that found no room is tried again


@dataclass(frozen=True)
class Target:
    host: str
    gpu: int | None = None
    uuid: str = ""

    @property
    def key(self) -> str:
        return cordon_key(self.host, self.gpu)


class Drains:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        # (deployment, replica) -> why it cannot move now; soft state, shown by `agentd nodes`
        self.blocked: dict[tuple[str, int], str] = {}
        # (deployment, replica) -> the last surge generation given out, so a retry gets a fresh instance id
        self._last_surge: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ operator requests

    def resolve(self, target: str) -> Target:
        """A host name, HOST:INDEX or a GPU UUID, checked against the hosts the cluster knows."""
        target = target.strip()
        if not target:
            raise InvalidInput("name a host, HOST:INDEX or a GPU UUID")
        known = set(self.c.reports) | set(self.c.state.nodes) | set(self.c.consensus.members)
        if target in known:
            return Target(target)
        for name, rep in sorted(self.c.reports.items()):
            for g in rep.inventory.gpus:
                if g.uuid == target:
                    return Target(name, g.index, g.uuid)
        host, sep, index = target.rpartition(":")
        if sep and host in known and index.isdigit():
            rep = self.c.reports.get(host)
            if rep is not None and not any(g.index == int(index) for g in rep.inventory.gpus):
                have = ", ".join(str(g.index) for g in rep.inventory.gpus) or "none"
                raise InvalidInput(f"host {host} has no GPU {index} (its GPUs: {have})")
            return Target(host, int(index))
        raise InvalidInput(f"no host or GPU named {target!r}: name a host from `agentd nodes`, HOST:INDEX or a "
                           "GPU UUID")

    async def cordon(self, target: str, reason: str = "", drain: bool = False,
                     force: bool = False) -> tuple[ApplyResult, int, Target]:
        await self.c._require_leader()
        t = self.resolve(target)
        node = self.c.state.nodes.get(t.host)
        if drain and node is not None and node.state == NODE_DOWN:
            raise PeerError(f"host {t.host} is down: its replicas are re-placed by the down-host rule already; "
                            "cordon it, or remove it for good with `agentd nodes rm`")
        c = Cordon(host=t.host, gpu=t.gpu, uuid=t.uuid, reason=reason, drain=drain, force=force)
        async with self.c._lock:
            result, index = await self.c._commit(cordon_command(c))
        self.c._report_arrived.set()  # wake a placement that waits
        return result, index, t

    async def uncordon(self, target: str) -> tuple[ApplyResult, int, Target]:
        await self.c._require_leader()
        t = self.resolve(target)
        if t.key not in self.c.state.cordons:
            raise InvalidInput(f"{t.key} is not cordoned")
        async with self.c._lock:
            result, index = await self.c._commit(uncordon_command(t.host, t.gpu))
        return result, index, t

    # ------------------------------------------------------------------ progress, for `agentd nodes`

    def remaining(self, host: str) -> tuple[int, str]:
        """Replicas a drain of `host` (or of its GPUs) still has to move, and why the first blocked one waits.
        A replaced incarnation that the host still reports running counts until it stops: it answers the
        requests it holds first (agentd/agent/handoff.py; one that must stop first stops at once, and so
        drops out of the host's report by itself)."""
        left, why = 0, ""
        st = self.c.state
        for a in st.all_assignments():
            if any(c.host == host for c in st.draining(a)):
                left += 1
                why = why or self.blocked.get((a.deployment, a.replica), "")
        rep = self.c.reports.get(host)
        if rep is not None and any(c.drain for c in st.cordons_of(host)):
            live = {a.instance_id for a in st.incarnations()}
            lingering = sorted({i.instance_id for i in rep.instances
                                if i.instance_id not in live and i.state in LIVE_STATES
                                and (cur := st.assignments.get((i.deployment, i.replica))) is not None
                                and cur.generation > i.generation})
            left += len(lingering)
            if lingering and not why:
                why = (f"{lingering[0]} answers the requests it holds" if len(lingering) == 1
                       else f"{', '.join(lingering)} answer the requests they hold")
        return left, why

    # ------------------------------------------------------------------ the loop

    async def step(self) -> list[str]:
        """One round of every drain; returns its decisions, one sentence each."""
        st = self.c.state
        if not st.surges and not any(c.drain for c in st.cordons.values()):
            self.blocked.clear()
            return []
        decisions: list[str] = []
        async with self.c._lock:
            decisions += await self._settle_surges()
            decisions += await self._start_surges()
        return decisions

    async def _settle_surges(self) -> list[str]:
        """Promote each surge that runs, cancel one that failed or whose drain was lifted."""
        st, out = self.c.state, []
        reports = self.c.instances()
        running = {(i.instance_id, i.part) for i in reports if i.state == "RUNNING"}
        fatal = {i.instance_id: i.reason for i in reports if i.state == "FATAL"}
        down = {n for n, rec in st.nodes.items() if rec.state == NODE_DOWN}
        for key, s in sorted(st.surges.items()):
            current = st.assignments.get(key)
            hosts = sorted({p.host for p in s.plan.parts})
            if current is None or not st.draining(current):
                await self.c._commit(surge_cancel_command(s))
                out.append(f"{s.instance_id} cancelled: its replica is no longer drained")
            elif s.instance_id in fatal or set(hosts) & down:
                await self.c._commit(surge_cancel_command(s))
                why = fatal.get(s.instance_id) or f"host(s) {', '.join(sorted(set(hosts) & down))} down"
                self.blocked[key] = f"successor {s.instance_id} failed: {why}"
                self.c._replace_after[key] = self.c.clock() + RETRY_AFTER
                out.append(f"{s.instance_id} failed ({why}); {current.instance_id} keeps running, retried later")
            elif all((s.instance_id, i) in running for i in range(len(s.plan.parts))):
                await self.c._commit(promote_command(s))
                self.blocked.pop(key, None)
                out.append(f"{s.instance_id} on {', '.join(hosts)} is ready: it replaces {current.instance_id} "
                           f"on {', '.join(sorted({p.host for p in current.plan.parts}))}")
        return out

    async def _start_surges(self) -> list[str]:
        st, out = self.c.state, []
        now = self.c.clock()
        for a in st.all_assignments():
            key = (a.deployment, a.replica)
            cordons = st.draining(a)
            if not cordons or key in st.surges or now < self.c._replace_after.get(key, 0.0):
                continue
            record = st.deployment(a.deployment)
            if record is None:
                continue
            where = ", ".join(sorted({c.key for c in cordons}))
            spec = record.spec.model_copy(update={"replicas": 1})
            try:
                model = await self.c._model(spec, check_options=False)
            except AgentdError as exc:
                out += await self._no_room(a, cordons, str(exc))
                continue
            # The old incarnation keeps its memory until its successor runs: it stays booked.
            plan = self.c._place(self.c.snapshot(), model, spec, self.c.booked())
            if not plan.placed:
                out += await self._no_room(a, cordons, plan.diagnosis.message if plan.diagnosis else "no layout")
                continue
            prev = a.model_copy(update={"generation": max(a.generation, self._last_surge.get(key, 0))})
            new = self.c._assignments(record.spec, plan, [a.replica], {a.replica: prev})[0]
            self._last_surge[key] = new.generation
            await self.c._commit(surge_command(new))
            self.blocked.pop(key, None)
            out.append(f"draining {where}: {a.instance_id} gets a successor {new.instance_id} on "
                       f"{', '.join(sorted({p.host for p in new.plan.parts}))} before it stops")
        return out

    async def _no_room(self, a: Assignment, cordons: list[Cordon], why: str) -> list[str]:
        key = (a.deployment, a.replica)
        if any(c.force for c in cordons):
            await self.c._commit(retire_command(a))
            self.blocked.pop(key, None)
            return [f"{a.instance_id} stopped without a successor (--force): {why}"]
        self.blocked[key] = f"{a.instance_id}: no room elsewhere: {why}"
        self.c._replace_after[key] = self.c.clock() + RETRY_AFTER
        return [f"{a.instance_id} waits: no room elsewhere ({why}); `agentd drain --force` stops it instead"]
