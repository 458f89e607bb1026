"""The refresher: worker-thread collects, material-change events, failures that do not stop it."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from agentd.errors import NotAvailable
from agentd.inventory import InventoryRefresher
from agentd.inventory.change import material_changes
from agentd.types import GiB, GpuInfo, GpuProcess, HostInventory, MiB

SAFETY = 10  # seconds; only guards against a hang, never asserted as a speed


def host(*, used=0, util=0.0, procs=(), warnings=(), available=48 * GiB, labels=None, gpus=1) -> HostInventory:
    return HostInventory(
        name="n", labels=labels or {}, cpu_count=8, memory_total=64 * GiB, memory_available=available,
        load_average=util * 4,
        gpus=tuple(GpuInfo(index=i, uuid=f"GPU-{i}", memory_total=80 * GiB, memory_used=used, utilization=util,
                           processes=tuple(procs)) for i in range(gpus)),
        warnings=tuple(warnings))


class Script:
    """A collect that returns prepared inventories (or raises prepared errors) and records its threads."""

    def __init__(self, *items):
        self.items = list(items)
        self.calls = 0
        self.threads: list[str] = []
        self.called = threading.Event()

    def __call__(self) -> HostInventory:
        self.threads.append(threading.current_thread().name)
        item = self.items[min(self.calls, len(self.items) - 1)]
        self.calls += 1
        self.called.set()
        if isinstance(item, Exception):
            raise item
        return item


# ---------------------------------------------------------------------------- what counts as a change


def test_first_inventory_and_material_changes_are_described():
    assert material_changes(None, host())[0].startswith("first inventory: 1 GPU(s), 8 CPU(s), 64.0 GiB RAM")
    assert material_changes(host(), host(used=10 * GiB)) == ["GPU 0 memory used 0.0 GiB -> 10.0 GiB"]
    assert material_changes(host(), host(gpus=2)) == ["GPU 1 (GPU-1) appeared"]
    assert material_changes(host(gpus=2), host()) == ["GPU 1 (GPU-1) is gone"]
    assert material_changes(host(), host(procs=[GpuProcess(pid=9, memory_used=MiB)])) == [
        "GPU 0 process 9 started (external)"]
    assert material_changes(host(procs=[GpuProcess(pid=9)]), host(procs=[GpuProcess(pid=9, owned=True)])) == [
        "GPU 0 process 9 is now agentd's"]
    assert material_changes(host(), host(warnings=["GPU x is lost"])) == ["new warning: GPU x is lost"]
    assert material_changes(host(warnings=["w"]), host()) == ["warning cleared: w"]
    assert material_changes(host(), host(labels={"rack": "b"})) == ["host labels changed from {} to {'rack': 'b'}"]


def test_churn_is_not_material():
    assert material_changes(host(util=0.1), host(used=100 * MiB, util=0.9, available=47 * GiB + 512 * MiB)) == []
    assert material_changes(host(), host(available=40 * GiB)) == ["host memory available 48.0 GiB -> 40.0 GiB"]


# ---------------------------------------------------------------------------- refresh cycle


async def test_publishes_only_material_changes_to_a_queue():
    queue: asyncio.Queue = asyncio.Queue()
    collect = Script(host(), host(util=0.5), host(used=20 * GiB))
    r = InventoryRefresher(collect, 60, queue)
    assert (await r.refresh()).startswith("inventory changed: first inventory")
    assert await r.refresh() == "inventory unchanged"
    assert r.latest.gpus[0].utilization == 0.5, "latest is always fresh, even without an event"
    assert await r.refresh() == "inventory changed: GPU 0 memory used 0.0 GiB -> 20.0 GiB"
    events = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [e.gpus[0].memory_used for e in events] == [0, 20 * GiB]
    assert (r.refreshes, r.published) == (3, 2)


async def test_a_full_queue_keeps_the_newest_inventory():
    queue: asyncio.Queue = asyncio.Queue(maxsize=1)
    r = InventoryRefresher(Script(host(), host(used=5 * GiB)), 60, queue)
    await r.refresh()
    await r.refresh()
    assert queue.qsize() == 1 and queue.get_nowait().gpus[0].memory_used == 5 * GiB


async def test_async_and_failing_listeners():
    seen = []

    async def listener(inv):
        seen.append(inv.gpus[0].memory_used)

    r = InventoryRefresher(Script(host(), host(used=GiB)), 60, listener)
    await r.refresh()
    await r.refresh()
    assert seen == [0, GiB]

    def broken(inv):
        raise RuntimeError("listener bug")

    r = InventoryRefresher(Script(host(), host(used=GiB)), 60, broken)
    await r.refresh()
    assert (await r.refresh()).startswith("inventory changed")
    assert r.published == 2


async def test_a_collect_that_raises_is_logged_once_and_the_previous_inventory_kept(caplog):
    caplog.set_level(logging.DEBUG, logger="agentd.inventory")
    boom = OSError("NVML hung up")
    r = InventoryRefresher(Script(host(), boom, boom, host(used=3 * GiB)), 60, lambda inv: None)
    await r.refresh()
    first_fail = await r.refresh()
    assert first_fail == "inventory refresh failed (OSError: NVML hung up); keeping the previous inventory"
    await r.refresh()
    assert r.latest.gpus[0].memory_used == 0 and r.failures == 2
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, "the same failure is not repeated at warning level every period"
    assert (await r.refresh()).startswith("inventory changed")
    assert any("recovered" in rec.getMessage() for rec in caplog.records)


async def test_a_collect_returning_garbage_is_a_failure_not_a_crash():
    r = InventoryRefresher(Script("not an inventory"), 60, lambda inv: None)
    r_task = asyncio.create_task(r.run())
    await asyncio.sleep(0)
    for _ in range(200):
        if r.failures:
            break
        await asyncio.sleep(0.01)
    r.stop()
    await asyncio.wait_for(r_task, SAFETY)
    assert r.failures >= 1 and r.latest is None


async def test_run_collects_in_a_worker_thread_and_stops():
    events: asyncio.Queue = asyncio.Queue()
    collect = Script(host())
    r = InventoryRefresher(collect, 0.01, events)
    task = asyncio.create_task(r.run())
    assert (await asyncio.wait_for(r.latest_inventory(), SAFETY)).name == "n"
    await asyncio.wait_for(events.get(), SAFETY)
    r.stop()
    await asyncio.wait_for(task, SAFETY)
    assert collect.threads and all(t.startswith("agentd-inventory") for t in collect.threads)
    assert threading.main_thread().name not in collect.threads


async def test_a_slow_collect_does_not_block_the_event_loop():
    release = threading.Event()
    started = threading.Event()
    finished = threading.Event()

    def slow_collect():
        started.set()
        release.wait(SAFETY)
        finished.set()
        return host()

    r = InventoryRefresher(slow_collect, 60, lambda inv: None)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(asyncio.to_thread(started.wait, SAFETY), SAFETY)
    # While collect is stuck in its thread, the loop keeps turning: count its iterations.
    ticks = 0
    for _ in range(1000):
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 1000 and not finished.is_set(), "the loop ran 1000 turns while collect was still blocked"
    release.set()
    await asyncio.wait_for(r.latest_inventory(), SAFETY)
    r.stop()
    await asyncio.wait_for(task, SAFETY)


async def test_a_stuck_collect_is_reported_and_stop_still_returns(caplog):
    caplog.set_level(logging.WARNING, logger="agentd.inventory")
    release = threading.Event()
    started = threading.Event()

    def stuck():
        started.set()
        release.wait(SAFETY)
        return host()

    r = InventoryRefresher(stuck, 0.01, lambda inv: None)
    task = asyncio.create_task(r.run())

    async def warned():
        while not any("still running" in rec.getMessage() for rec in caplog.records):
            await asyncio.sleep(0.005)

    await asyncio.wait_for(warned(), SAFETY)
    assert not task.done()
    assert started.is_set()
    r.stop()
    await asyncio.wait_for(task, SAFETY)
    assert not release.is_set() and r.latest is None
    with pytest.raises(NotAvailable):
        await r.latest_inventory()
    release.set()


async def test_refresh_now_skips_the_wait():
    collect = Script(host(), host(used=8 * GiB))
    events: asyncio.Queue = asyncio.Queue()
    r = InventoryRefresher(collect, 3600, events)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(events.get(), SAFETY)
    r.refresh_now()
    changed = await asyncio.wait_for(events.get(), SAFETY)
    assert changed.gpus[0].memory_used == 8 * GiB
    r.stop()
    await asyncio.wait_for(task, SAFETY)


async def test_a_collect_slower_than_the_period_is_warned_about_once(caplog):
    caplog.set_level(logging.WARNING, logger="agentd.inventory")
    now = [0.0]

    def clock():
        return now[0]

    def slow():
        now[0] += 10.0  # each collect "takes" 10 s on the injected clock
        return host()

    r = InventoryRefresher(slow, 5, lambda inv: None, clock=clock)
    task = asyncio.create_task(r.run())

    async def ran_four_collects():
        while now[0] < 40:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(ran_four_collects(), SAFETY)
    r.stop()
    await asyncio.wait_for(task, SAFETY)
    slow_warnings = [rec for rec in caplog.records if "longer than the 5s period" in rec.getMessage()]
    assert len(slow_warnings) == 1
    assert "took 10.0s" in slow_warnings[0].getMessage()


def test_the_period_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        InventoryRefresher(Script(host()), 0, lambda inv: None)
