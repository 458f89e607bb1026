"""What each replica's model server says of its own load, for the /v1/ proxy's routing (issue 21 item 3).

The proxy's own counters see only the requests that pass through this agent;
a replica that another agent's proxy (or a long generation) keeps busy looks
idle from here. So each agent polls, about twice a second, the load path a
runtime plugin names (`agentd_load_path`, llamabox: `/slots`) on every replica
it sent a request to in the last `ttl` seconds, and reads the answer with
`agentd_read_load` into (busy, capacity). The balancer uses it per request
from memory: polling is off the request path, so routing adds no round trip.
A reading older than three poll periods is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from agentd.api.openai_proxy import Endpoint

log = logging.getLogger(__name__)


class LoadBoard:
    def __init__(self, *, path: Callable[[str], str | None], read: Callable[[str, int, bytes], tuple[int, int] | None],
                 period: float = 0.5, ttl: float = 30.0, timeout: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._path = path
        self._read = read
        self.period = period
        self.ttl = ttl
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._seen: dict[str, tuple[Endpoint, float]] = {}  # instance id -> (endpoint, last routed to)
        self._load: dict[str, tuple[int, int, float]] = {}  # instance id -> (busy, capacity, when read)
        self._paths: dict[str, str | None] = {}  # runtime -> its load path (asked once)

    def seen(self, endpoints: Sequence[Endpoint]) -> None:
        now = self._clock()
        for e in endpoints:
            if e.ready and e.runtime:
                self._seen[e.instance_id] = (e, now)

    def load(self, instance_id: str) -> tuple[int, int] | None:
        got = self._load.get(instance_id)
        if got is None or self._clock() - got[2] > 3 * self.period:
            return None
        return got[0], got[1]

    def set(self, instance_id: str, busy: int, capacity: int) -> None:
        """A reading (the poller's; tests set one directly)."""
        self._load[instance_id] = (busy, capacity, self._clock())

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        now = self._clock()
        for iid in [i for i, (_, at) in self._seen.items() if now - at > self.ttl]:
            self._seen.pop(iid, None)
            self._load.pop(iid, None)
        await asyncio.gather(*(self._poll(session, e) for e, _ in list(self._seen.values())))

    async def _poll(self, session: aiohttp.ClientSession, e: Endpoint) -> None:
        if e.runtime not in self._paths:
            self._paths[e.runtime] = self._path(e.runtime)
        path = self._paths[e.runtime]
        if not path:
            return
        headers = {"Authorization": f"Bearer {e.api_key}"} if e.api_key else {}
        try:
            async with session.get(e.url.rstrip("/") + path, headers=headers, timeout=self._timeout) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            self._load.pop(e.instance_id, None)
            return
        try:
            reading = self._read(e.runtime, status, body)
        except Exception:  # a plugin's bug must not stop the poller
            log.exception("agentd_read_load failed", extra={"runtime": e.runtime})
            reading = None
        if reading is None:
            self._load.pop(e.instance_id, None)
        else:
            self.set(e.instance_id, max(0, int(reading[0])), max(0, int(reading[1])))

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.poll_once(session)
            await asyncio.sleep(self.period)
