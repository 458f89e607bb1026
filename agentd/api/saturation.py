"""Requests for a model whose every replica is full wait here, in order, for a bounded time (issue 21 item 3).

Sending them on anyway would queue them inside one model server, behind
whatever it runs, with no way back out when another replica frees up first;
refusing them at once would turn every short burst into errors. So an agent
holds at most `queue` of them per model, first come first served, each for at
most `wait` seconds; beyond either bound the caller gets 429 with `Retry-After`
(OpenAI's clients retry that by themselves).

Who decides "full" is the proxy (`OpenAIProxy`): the `pick` callable each
waiter brings returns a replica with room, already counted as busy with this
request (reserved), or None. `kick(model)` re-asks for the oldest waiters
whenever something may have freed room: a request through this agent
finished, or the load board read the replicas again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class Saturated(Exception):
    """No room: `reason` is "queue_full" (too many waiting already) or "timeout" (waited `wait` seconds)."""

    def __init__(self, reason: str, waited: float = 0.0):
        super().__init__(reason)
        self.reason = reason
        self.waited = waited


@dataclass(eq=False)
class _Waiter(Generic[T]):
    pick: Callable[[], T | None]
    future: asyncio.Future[T] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission(Generic[T]):
    """Per-model FIFO of requests waiting for a replica with room."""

    def __init__(self, *, queue: int, wait: float, release: Callable[[T], None],
                 clock: Callable[[], float] = time.monotonic):
        if queue < 0 or wait < 0:
            raise ValueError("queue and wait must not be negative")
        self.queue = queue
        self.wait = wait
        self._release = release  # undo a pick's reservation that nobody will use
        self._clock = clock
        self._waiting: dict[str, deque[_Waiter[T]]] = {}

    def held(self, model: str) -> int:
        return sum(1 for w in self._waiting.get(model, ()) if not w.future.done())

    def models(self) -> list[str]:
        return list(self._waiting)

    async def admit(self, model: str, pick: Callable[[], T | None]) -> T:
        """Wait in line for `pick` to find room; raises Saturated when the line is full or the wait ends."""
        line = self._waiting.setdefault(model, deque())
        if self.held(model) >= self.queue:
            self._tidy(model)
            raise Saturated("queue_full")
        waiter: _Waiter[T] = _Waiter(pick)
        line.append(waiter)
        started = self._clock()
        self.kick(model)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), self.wait)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                # Picked in the same instant the wait ended or the client left: give the room back.
                self._release(waiter.future.result())
                self.kick(model)
            else:
                waiter.future.cancel()
            self._tidy(model)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Saturated("timeout", self._clock() - started) from None

    def kick(self, model: str | None = None) -> None:
        """Give room to the oldest waiters of `model` (None: of every model) while `pick` finds some."""
        for m in [model] if model is not None else list(self._waiting):
            line = self._waiting.get(m)
            while line:
                head = line[0]
                if head.future.done():
                    line.popleft()
                    continue
                got = head.pick()
                if got is None:
                    break
                line.popleft()
                head.future.set_result(got)
            self._tidy(m)

    def _tidy(self, model: str) -> None:
        line = self._waiting.get(model)
        if line is not None:
            while line and line[0].future.done():
                line.popleft()
            if not line:
                del self._waiting[model]
