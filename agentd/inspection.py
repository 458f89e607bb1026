"""Model inspection off the event loop, bounded in time and in threads.

The leader reads the headers of the model a user names. That path is user
input: a FIFO blocks open() until someone writes to it, and a file on a hung
NFS mount blocks even stat(). Read on the event loop, either one stopped the
leader from answering Raft, so it lost leadership, and the retried call then
wedged each new leader in turn (issue 14). So:

- relative paths are refused: they would resolve against the leader's working
  directory (the CLI makes an existing local path absolute before sending it);
- FIFOs, devices and sockets are refused by the reader itself
  (`agentd.modelinfo.regular`), before anything blocks;
- the read runs in a daemon thread of its own, with a timeout. A thread stuck
  in the kernel cannot be cancelled, so it is counted until it returns; when
  `threads` are stuck, further inspections are refused at once rather than
  queued, and the default executor (which Raft's fsyncs use) is never
  touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable

from agentd.errors import InvalidInput, NotAvailable
from agentd.types import ModelInfo

INSPECT_TIMEOUT = 10.0
INSPECT_THREADS = 4


class BoundedInspector:
    def __init__(self, inspect: Callable[[str], ModelInfo], *, timeout: float = INSPECT_TIMEOUT,
                 threads: int = INSPECT_THREADS):
        self._inspect = inspect
        self.timeout = timeout
        self.threads = threads
        self.busy = 0  # threads running an inspection, stuck ones included

    async def __call__(self, path: str) -> ModelInfo:
        if not os.path.isabs(path):
            raise InvalidInput(f"model path must be absolute, got {path!r} (it is read on the leader and on "
                               "the hosts that run it, not where the client runs)", where="model")
        if self.busy >= self.threads:
            raise NotAvailable(f"{self.busy} earlier model inspections are still blocked (a hung mount?); "
                               "not starting another")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ModelInfo] = loop.create_future()

        def settle(result: ModelInfo | None, error: BaseException | None) -> None:
            self.busy -= 1  # when the thread really returns, not when the caller stopped waiting
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result, error = self._inspect(path), None
            except BaseException as exc:  # handed to the waiting coroutine
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed while the thread was stuck
                loop.call_soon_threadsafe(settle, result, error)

        # A daemon thread, not an executor: a thread stuck in the kernel must not keep agentd from exiting.
        self.busy += 1
        threading.Thread(target=work, name="model-inspect", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late error is nobody's to log
            raise InvalidInput(f"reading the model did not finish within {self.timeout:g} s (a hung network "
                               "mount?); the file must be readable on the leader", where=f"model {path}") from None
