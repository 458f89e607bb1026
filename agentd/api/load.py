"""What each replica's model server says of its own load, for the /v1/ proxy's routing (issue 21 item 3).

The proxy's own counters see only the requests that pass through this agent;
a replica that another agent's proxy (or a long generation) keeps busy looks
idle from here. So each agent polls, about twice a second, the load path a
runtime plugin names (`agentd_load_path`, llamabox: `/slots`) on every replica
it sent a request to in the last `ttl` seconds, and reads the answer with
`agentd_read_load` into (busy, capacity) or (busy, capacity, waiting). The
balancer uses it per request from memory: polling is off the request path, so
routing adds no round trip. A reading older than three poll periods is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import aiohttp

if TYPE_CHECKING:
    from agentd.api.openai_proxy import Endpoint

log = logging.getLogger(__name__)


class Reading(NamedTuple):
    """What one model server said of its load: requests it runs now, how many it can run at once (0: it does
    not say, as vLLM), and requests waiting in its own queue (llama-server's /slots does not say: 0)."""

    busy: int
    capacity: int
    waiting: int = 0


def as_reading(value: Sequence[int] | None) -> Reading | None:
    """A hook's (busy, capacity) or (busy, capacity, waiting), checked; None for anything else."""
    if value is None or len(value) not in (2, 3):
        return None
    return Reading(*(max(0, int(v)) for v in value))


class LoadBoard:
    def __init__(self, *, path: Callable[[str], str | None],
                 read: Callable[[str, int, bytes], Sequence[int] | None],
                 period: float = 0.5, ttl: float = 30.0, timeout: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._path = path
        self._read = read
        self.period = period
        self.ttl = ttl
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._seen: dict[str, tuple[Endpoint, float]] = {}  # instance id -> (endpoint, last routed to)
        self._model: dict[str, str] = {}  # instance id -> the deployment it serves (metrics labels)
        self._load: dict[str, tuple[Reading, float]] = {}  # instance id -> (reading, when read)
        self._paths: dict[str, str | None] = {}  # runtime -> its load path (asked once)
        # Called after every poll round (the proxy lets requests waiting for room re-check, and sets its gauges).
        self.on_poll: Callable[[], None] | None = None

    def seen(self, endpoints: Sequence[Endpoint], model: str = "") -> None:
        now = self._clock()
        for e in endpoints:
            if e.ready and e.runtime:
                self._seen[e.instance_id] = (e, now)
                if model:
                    self._model[e.instance_id] = model

    def load(self, instance_id: str) -> Reading | None:
        got = self._load.get(instance_id)
        if got is None or self._clock() - got[1] > 3 * self.period:
            return None
        return got[0]

    def set(self, instance_id: str, busy: int, capacity: int, waiting: int = 0) -> None:
        """A reading (the poller's; tests set one directly)."""
        self._load[instance_id] = (Reading(busy, capacity, waiting), self._clock())

    def polled(self) -> dict[str, str]:
        """The replicas polled now: instance id -> its deployment."""
        return {iid: self._model.get(iid, "") for iid in self._seen}

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        now = self._clock()
        for iid in [i for i, (_, at) in self._seen.items() if now - at > self.ttl]:
            self._seen.pop(iid, None)
            self._model.pop(iid, None)
            self._load.pop(iid, None)
        await asyncio.gather(*(self._poll(session, e) for e, _ in list(self._seen.values())))
        if self.on_poll is not None:
            self.on_poll()

    async def _poll(self, session: aiohttp.ClientSession, e: Endpoint) -> None:
        if e.runtime not in self._paths:
            self._paths[e.runtime] = self._path(e.runtime)
        path = self._paths[e.runtime]
        if not path:
            return
        reading = await read_load(session, e.url, path, e.api_key, e.runtime, self._read, self._timeout)
        if reading is None:
            self._load.pop(e.instance_id, None)
        else:
            self._load[e.instance_id] = (reading, self._clock())

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.poll_once(session)
            await asyncio.sleep(self.period)


async def read_load(session: aiohttp.ClientSession, url: str, path: str, api_key: str | None, runtime: str,
                    read: Callable[[str, int, bytes], Sequence[int] | None],
                    timeout: aiohttp.ClientTimeout) -> Reading | None:
    """One GET of a model server's load path (`url` is its base), read by its plugin; None when it does not
    answer or the answer is unreadable."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(url.rstrip("/") + path, headers=headers, timeout=timeout) as r:
            body = await r.read()
            status = r.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    try:
        return as_reading(read(runtime, status, body))
    except Exception:  # a plugin's bug must not stop the caller
        log.exception("agentd_read_load failed", extra={"runtime": runtime})
        return None
