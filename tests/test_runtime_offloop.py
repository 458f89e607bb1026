"""A runtime plugin's launch hook that blocks (a model on a hung mount) does not stop the host's agent.

Issue 14, item 4, on the hosts: llamabox's launch hook stats the model file; on a hung NFS mount that never
returns. The supervisor now calls the hook in a daemon thread with a timeout, so the event loop goes on and
the instance fails with a reason that says why; port allocation still happens on the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from agentd.plugins import PluginManager, hookimpl
from agentd.runtime.offloop import call_off_loop, on_loop
from agentd.testing.toy_runtime import FAST, Toy, make, toy_assignment


class Hung(Toy):
    """The toy runtime, except that building part 0 hangs until released (a stat on a dead mount)."""

    def __init__(self, tmp, release: threading.Event):
        super().__init__(tmp)
        self.release = release
        self.ports: list[int] = []

    @hookimpl
    def agentd_launch(self, assignment, part_index, ctx):
        if assignment.runtime != "toy":
            return None
        self.ports.append(ctx.port("extra"))  # called from the hook's thread: allocated on the loop
        if assignment.options.env.get("hang"):
            self.release.wait(20)
        return super().agentd_launch(assignment, part_index, ctx)


async def test_a_hung_launch_hook_fails_the_instance_and_the_loop_goes_on(tmp_path):
    release = threading.Event()
    hung = Hung(tmp_path, release)
    pm = PluginManager()
    pm.register(hung, name="toy")
    sup = make(tmp_path, pm, config=replace(FAST, launch_timeout=0.5))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    t = asyncio.ensure_future(ticker())
    try:
        a = toy_assignment(parts=1, hosts=("h1",), hang=1)
        started = time.monotonic()
        await sup.apply([a])
        st = await sup.wait_for(a.instance_id, ["FATAL"], timeout=10)
        assert "did not finish building part 0 within 0.5s (a model path on a hung mount?)" in st.reason
        assert time.monotonic() - started < 5
        assert ticks >= 20, "the event loop kept running while the hook hung"
        assert hung.ports and all(p > 0 for p in hung.ports)
        ok = toy_assignment(parts=1, hosts=("h1",), name="fine")
        await sup.apply([a, ok])
        assert (await sup.wait_for(ok.instance_id, ["RUNNING"], timeout=10)).state == "RUNNING"
    finally:
        release.set()
        t.cancel()
        await sup.close(stop_processes=True)


async def test_call_off_loop_and_on_loop():
    loop = asyncio.get_running_loop()
    owner: list[str] = []

    def record() -> int:
        owner.append(threading.current_thread().name)
        return 7

    wrapped = on_loop(loop, record)
    assert await call_off_loop(lambda: wrapped() + 1, 5) == 8
    assert owner == [threading.current_thread().name], "the wrapped call ran on the loop's thread"
    with pytest.raises(ZeroDivisionError):
        await call_off_loop(lambda: 1 / 0, 5)
    stuck = threading.Event()
    with pytest.raises(TimeoutError):
        await call_off_loop(lambda: stuck.wait(10), 0.2)
    stuck.set()
