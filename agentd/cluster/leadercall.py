"""A call to the leader that is given up as soon as another leader is known.

A leader that hangs (SIGSTOP, a stalled machine) keeps its sockets open, so a
call to it waits for its whole deadline even though the cluster elected a
new leader meanwhile. An agent's report stuck that way kept the new
coordinator without any host's report for up to the report deadline (2 s),
and a Deploy it received meanwhile found "0/0 hosts" to place on
(benchmarks/failover.py, (e)).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from agentd.errors import NotAvailable

T = TypeVar("T")

LEADER_CHECK_PERIOD = 0.05  # while a call to the leader is in flight, how often to look whether the leader changed


class LeaderMoved(NotAvailable):
    """The leader changed while a call to the old one was in flight; the call was cancelled."""

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new
        super().__init__(f"the leader changed from {old} to {new} while the call was in flight; retry")


async def unless_leader_moves(call: Awaitable[T], leader_id: Callable[[], str | None],
                              period: float = LEADER_CHECK_PERIOD) -> T:
    """`await call`, unless `leader_id()` names another leader first: then cancel it and raise LeaderMoved.

    No leader known (an election in progress) is not a move: the old leader may still win it.
    """
    before = leader_id()
    task: asyncio.Future[Any] = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=period)
            if done:
                return task.result()
            now = leader_id()
            if now is not None and now != before:
                raise LeaderMoved(before or "?", now)
    finally:
        if not task.done():
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()  # a grpc.aio call: tell the server too
            task.cancel()
