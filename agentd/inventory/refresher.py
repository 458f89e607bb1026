"""Keeps this host's inventory fresh without ever blocking the event loop.

NVML calls can stall for seconds (a GPU falling off the bus, a driver
without persistence mode), and the same event loop answers Raft heartbeats:
a stalled loop would cost this node its leadership. So each collect runs in
its own daemon thread, never on the loop and never on the default executor
that other work shares. One collect runs at a time; a slow one delays the
next refresh instead of piling up threads. The threads are daemon threads
(unlike a ThreadPoolExecutor's, which the interpreter joins at exit) so a
collect stuck in the driver cannot keep the daemon from shutting down.

Only material changes (agentd.inventory.change) are published; the newest
inventory is always in `latest` for heartbeats.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agentd.errors import NotAvailable
from agentd.inventory.change import material_changes
from agentd.logs import fields
from agentd.types import HostInventory

log = logging.getLogger("agentd.inventory")

STUCK_PERIODS = 3  # a collect running this many periods is reported as stuck

OnChange = Callable[[HostInventory], Any] | asyncio.Queue


class InventoryRefresher:
    """Runs `collect` every `period` seconds in a worker thread; publishes material changes.

    on_change: a callable (sync or async) receiving the new inventory, or an
      asyncio.Queue that receives it (when full, the oldest event is dropped:
      only the newest inventory matters).
    Call `run()` as a task and `stop()` from the loop's thread to end it.
    """

    def __init__(self, collect: Callable[[], HostInventory], period: float, on_change: OnChange,
                 clock: Callable[[], float] = time.monotonic, *,
                 changes: Callable[[HostInventory | None, HostInventory], list[str]] = material_changes):
        if period <= 0:
            raise ValueError("the inventory refresh period must be positive")
        self._collect = collect
        self.period = period
        self._on_change = on_change
        self._clock = clock
        self._changes = changes
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._first = asyncio.Event()
        self._threads = 0
        self._last_error: str | None = None
        self._was_slow = False
        self.latest: HostInventory | None = None
        self.latest_at: float | None = None  # on `clock`, so callers can tell a stale inventory
        self.last_published: HostInventory | None = None
        self.refreshes = 0
        self.failures = 0
        self.published = 0

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ends `run()` promptly, even while a collect is stuck in its thread."""
        self._stop.set()

    def refresh_now(self) -> None:
        """Skips the rest of the current wait, e.g. right after a model process started."""
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            await self.refresh()
            elapsed = self._clock() - started
            self._note_duration(elapsed)
            await self._sleep(max(0.0, self.period - elapsed))

    # ------------------------------------------------------------------ one refresh

    async def refresh(self) -> str:
        """Collects once, publishes if material, and returns the sentence describing what happened."""
        try:
            inventory = await self._collect_in_thread()
        except asyncio.CancelledError:
            raise
        except _Stopped:
            return "inventory refresh abandoned: stopping"
        except Exception as exc:
            return self._failed(exc)
        self.refreshes += 1
        if self._last_error is not None:
            log.info("inventory refresh recovered", extra=fields(previous_error=self._last_error))
            self._last_error = None
        self.latest = inventory
        self.latest_at = self._clock()
        self._first.set()
        changes = self._changes(self.last_published, inventory)
        if not changes:
            return "inventory unchanged"
        sentence = "inventory changed: " + "; ".join(changes)
        log.info(sentence, extra=fields(gpus=len(inventory.gpus), warnings=len(inventory.warnings)))
        await self._publish(inventory)
        return sentence

    def _start_collect(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def deliver(ok: bool, value: Any) -> None:
            if future.done():  # stop() already gave up on this collect
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def work() -> None:
            try:
                value, ok = self._collect(), True
            except BaseException as exc:  # delivered to the loop, where it is logged
                value, ok = exc, False
            try:
                loop.call_soon_threadsafe(deliver, ok, value)
            except RuntimeError:  # the loop closed while we were stuck in the driver
                pass

        self._threads += 1
        threading.Thread(target=work, name=f"agentd-inventory-{self._threads}", daemon=True).start()
        return future

    async def _collect_in_thread(self) -> HostInventory:
        future = self._start_collect()
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({future, stopping}, timeout=STUCK_PERIODS * self.period,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:  # say so once, then keep waiting: the thread cannot be interrupted
                log.warning(f"inventory collect still running after {STUCK_PERIODS * self.period:g}s; "
                            "reporting the previous inventory until it returns",
                            extra=fields(period_s=self.period))
                await asyncio.wait({future, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not future.done():
            future.cancel()
            raise _Stopped
        result = future.result()
        if not isinstance(result, HostInventory):
            raise TypeError(f"collect returned {type(result).__name__}, not a HostInventory")
        return result

    def _failed(self, exc: Exception) -> str:
        self.failures += 1
        message = f"{type(exc).__name__}: {exc}"
        sentence = f"inventory refresh failed ({message}); keeping the previous inventory"
        if message != self._last_error:  # log each distinct failure once, not every period
            log.warning(sentence, extra=fields(error=message, failures=self.failures))
        else:
            log.debug(sentence, extra=fields(error=message, failures=self.failures))
        self._last_error = message
        return sentence

    async def _publish(self, inventory: HostInventory) -> None:
        self.last_published = inventory
        self.published += 1
        target = self._on_change
        try:
            if isinstance(target, asyncio.Queue):
                while True:
                    try:
                        target.put_nowait(inventory)
                        break
                    except asyncio.QueueFull:
                        target.get_nowait()
            else:
                result = target(inventory)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            log.exception("inventory change listener failed", extra=fields(error=str(exc)))

    def _note_duration(self, elapsed: float) -> None:
        slow = elapsed > self.period
        if slow and not self._was_slow:
            log.warning(f"inventory refresh took {elapsed:.1f}s, longer than the {self.period:g}s period",
                        extra=fields(elapsed_s=round(elapsed, 3), period_s=self.period))
        self._was_slow = slow

    async def _sleep(self, delay: float) -> None:
        if self._stop.is_set() or delay <= 0 or self._wake.is_set():
            self._wake.clear()
            return
        waiters = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._wake.clear()

    async def latest_inventory(self) -> HostInventory:
        """The newest inventory, waiting for the first one if none was taken yet."""
        if self.latest is None:
            waiters = [asyncio.ensure_future(self._first.wait()), asyncio.ensure_future(self._stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        if self.latest is None:
            raise NotAvailable("the inventory refresher stopped before taking a first inventory")
        return self.latest


class _Stopped(Exception):
    """The refresher was stopped while a collect was still running."""
