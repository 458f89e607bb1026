"""A replica that a drain replaced answers the requests it holds before it stops (docs/operations.md, "Cordon and
drain").

A drain promotes a replica's successor once it runs, and the entry that does so
removes the old incarnation from the state. Every proxy stops routing to the old
one as it applies that entry, but requests already on its model server (a long
generation, a stream) were cut when it stopped at once. So each host that runs a
part of a replaced incarnation keeps it, outside the state, until its main server
says it works on nothing and nothing waits there on two polls in a row (the
runtime's load path: the hook the proxy balances with), or `drain_handoff_timeout`
passes; then the reconciler stops it as it stops anything else.

Only a replacement that could run beside it is a hand-off: the state holds a newer
generation of the same replica on none of its GPUs and ports (`successor_of`). A
deleted deployment, a replica scaled down (which has its own leave step) or one
re-placed onto what it holds stops at once, as before. The host reports what it
keeps, and the leader counts it as left to move, so `agentd drain` returns once
nothing of the host's old replicas runs, and keeps its GPUs and ports booked
meanwhile (`Coordinator.booked`). An agentd restarted meanwhile adopts it and
keeps it on (`Supervisor.assignments` names the survivors it found).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp

from agentd.agent.http import url_host
from agentd.api.load import read_load
from agentd.cluster.maintenance import MaintenanceState
from agentd.logs import fields
from agentd.types import Assignment

log = logging.getLogger(__name__)

SETTLE = 1.0  # seconds before the first poll: a proxy still routing from the entry before the promotion is done
PERIOD = 0.25  # between polls
IDLE_POLLS = 2  # idle readings in a row before it stops


@dataclass
class _Handoff:
    assignment: Assignment  # as the supervisor runs it (with its server's key)
    since: float
    task: asyncio.Task[None] | None = None
    done: bool = False


class Handoffs:
    """The replaced incarnations this host keeps running for now (`keep`, once per reconcile)."""

    def __init__(self, *, load_path: Callable[[str], str | None],
                 read: Callable[[str, int, bytes], Sequence[int] | None], timeout: float,
                 wake: Callable[[], None], node: str = "", clock: Callable[[], float] = time.monotonic,
                 settle: float = SETTLE, period: float = PERIOD):
        self._load_path = load_path
        self._read = read
        self.timeout = timeout
        self._wake = wake
        self.node = node
        self._clock = clock
        self.settle = settle
        self.period = period
        self._kept: dict[str, _Handoff] = {}

    def keep(self, state: MaintenanceState, running: Iterable[Assignment], desired: set[str]) -> list[Assignment]:
        """Of the incarnations the supervisor is `running`, those not `desired` any more that a successor in
        `state` replaced (`successor_of`) and that still answer requests."""
        now = self._clock()
        kept: dict[str, _Handoff] = {}
        for a in running:
            iid = a.instance_id
            if iid in desired:
                continue
            h = self._kept.get(iid)
            new = state.successor_of(a)
            if new is None:
                continue  # deleted, scaled down or re-placed: it stops now
            if h is None:
                if self.timeout <= 0:
                    continue
                h = _Handoff(a, now)
                h.task = asyncio.get_running_loop().create_task(self._watch(h), name=f"handoff {iid}")
                log.info(f"{iid} was replaced by {new.instance_id}: it answers the requests it holds before it "
                         "stops", extra=fields(node=self.node, instance=iid))
            kept[iid] = h
        for iid, h in self._kept.items():
            if iid not in kept and h.task is not None:
                h.task.cancel()
        self._kept = kept
        return [h.assignment for h in kept.values() if not h.done]

    def replaced(self) -> set[str]:
        """The replaced incarnations this host still runs (answering their requests, or being stopped): the
        reporter reports them, so the leader counts them as left to move until they are gone."""
        return set(self._kept)

    def close(self) -> None:
        for h in self._kept.values():
            if h.task is not None:
                h.task.cancel()
        self._kept.clear()

    async def _watch(self, h: _Handoff) -> None:
        a = h.assignment
        try:
            why = await self._until_idle(a, h.since)
        except Exception as exc:  # a plugin's load hook failed: no reason to keep it
            why = f"its load could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        h.done = True
        log.info(f"{a.instance_id}: stopping, {why}", extra=fields(node=self.node, instance=a.instance_id))
        self._wake()

    async def _until_idle(self, a: Assignment, since: float) -> str:
        main = next((i for i, p in enumerate(a.plan.parts) if p.role == "main"), 0)
        ep = a.endpoints[main]
        url = f"http://{url_host(ep.address)}:{ep.port}"
        poll_timeout = aiohttp.ClientTimeout(total=max(0.2, min(1.0, self.period * 4)))
        idle, first, path = 0, True, None
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(self.period)
                elapsed = self._clock() - since
                if elapsed >= self.timeout:
                    return f"still busy after {self.timeout:g}s (drain_handoff_timeout)"
                if elapsed < self.settle:
                    continue
                if first:
                    path, first = self._load_path(a.runtime), False
                if not path:
                    return "its runtime does not say how busy it is"
                reading = await read_load(session, url, path, a.api_key, a.runtime, self._read, poll_timeout)
                if reading is None:
                    return "its model server does not answer"
                idle = idle + 1 if reading.busy == 0 and reading.waiting == 0 else 0
                if idle >= IDLE_POLLS:
                    return f"its requests answered after {elapsed:.1f}s"
