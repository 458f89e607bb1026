"""Plugin code that may block, run off the event loop.

A runtime plugin's `agentd_launch` is ordinary synchronous code, and it may
touch user-given paths (llamabox checks that the model file exists). On a
hung network mount even stat() never returns; on the event loop that would
stop the host's agent: its Raft heartbeats, reports and every other instance
(DESIGN.md: nothing blocks the event loop). So the supervisor calls the hook
in a daemon thread with a timeout (a thread stuck in the kernel cannot be
cancelled; being a daemon it does not keep agentd from exiting), and the
context's callbacks that touch the supervisor's state (`port`, `ray_port`)
run on the loop, whichever thread calls them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def call_off_loop(fn: Callable[[], T], timeout: float, name: str = "plugin-call") -> T:
    """`fn()` in a daemon thread; TimeoutError after `timeout` seconds (the thread may still be running)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the waiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., T], timeout: float = 30.0) -> Callable[..., T]:
    """`fn` wrapped so that a call from another thread runs on `loop` (and waits for it)."""
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return fn(*args, **kwargs)
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout)
    return call
