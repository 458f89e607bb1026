"""Supervisor mechanics with a third-party runtime plugin whose "model server" is a tiny real HTTP server.

The llama.cpp tests (test_runtime_llamabox.py) cover the real model servers;
these cover the paths that are hard to provoke with them: liveness failures,
port conflicts, plugins that refuse or break, orphans, and ordering.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from agentd.runtime import Supervisor
from agentd.runtime.process import group_members
from agentd.runtime.standalone import kill_recorded
from agentd.testing.toy_runtime import make, toy_assignment


@pytest.fixture(autouse=True)
def _reap(tmp_path):
    """Whatever a failing test left running is killed: every spawned process is recorded under tmp_path."""
    yield
    kill_recorded(tmp_path)


def edges(sup: Supervisor, name: str) -> list[str]:
    return [f"{e.old}->{e.new}" for e in sup.events if e.key.endswith("/" + name)]


async def test_dependency_first_dependents_restarted_after_it_and_delete_stops_in_order(tmp_path, plugins, toy):
    seen = []
    sup = make(tmp_path, plugins, on_event=seen.append)
    a = toy_assignment()
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=10)
    starts = [e.key.split("/")[1] for e in sup.events if str(e.new) == "STARTING"]
    assert starts == ["db", "api"]
    pids = {p.name: p.pid for p in st.processes}
    os.kill(pids["db"], signal.SIGKILL)
    await sup.wait_for(a.instance_id, ["BACKOFF"], timeout=5)
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=10)
    new = {p.name: p.pid for p in st.processes}
    assert new["db"] != pids["db"] and new["api"] != pids["api"]
    assert edges(sup, "api")[-3:] == ["RUNNING->PENDING", "PENDING->STARTING", "STARTING->RUNNING"]
    assert st.restarts == 2  # db crashed, api followed
    assert seen == list(sup.events)  # the callback saw every edge
    out = await sup.apply([])
    assert out == [f"{a.instance_id}: stopped (db: stopped; api: stopped)"]
    stops = [e.key.split("/")[1] for e in sup.events if str(e.new) == "STOPPED"]
    assert stops == ["api", "db"]  # dependents first
    assert toy.stopped == [(a.instance_id, 0), (a.instance_id, 1)]
    assert not (tmp_path / "data" / "runtime" / "work" / a.instance_id).exists()  # scratch removed
    assert len(sup.log_files(a.instance_id, "db")) == 2  # logs kept: this run and the one before the crash
    assert all(group_members(p) == [] for p in new.values())


async def test_remote_endpoint_is_waited_for_and_only_local_parts_run(tmp_path, plugins):
    a = toy_assignment(hosts=("h2", "h1"))  # db on another host
    sup = make(tmp_path, plugins)
    await sup.apply([a])
    await asyncio.sleep(0.3)
    st = sup.instance(a.instance_id)
    assert [p.name for p in st.processes] == ["api"]
    assert st.state == "PENDING" and f"waiting for 127.0.0.1:{a.endpoints[0].port} to accept connections" in st.reason
    other = make(tmp_path / "h2", plugins, node="h2")
    await other.apply([a])
    await sup.wait_for(a.instance_id, ["RUNNING"], timeout=10)
    assert await sup.apply([toy_assignment(hosts=("h3", "h3"), name="elsewhere"), a]) == []  # not ours; unchanged
    await sup.apply([])
    await other.apply([])


async def test_liveness_failures_in_a_row_kill_and_restart(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    a = toy_assignment()
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=10)
    api = next(p for p in st.processes if p.name == "api")
    (tmp_path / "sick-1").touch()
    st = await sup.wait_for(a.instance_id, ["BACKOFF"], timeout=5)
    assert "api: liveness failed: /health failed 2 times in a row (last: toy says sick); killing pid" in st.reason
    (tmp_path / "sick-1").unlink()
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=10)
    assert next(p for p in st.processes if p.name == "api").pid != api.pid
    assert group_members(api.pid) == []
    await sup.apply([])


async def test_a_process_that_keeps_exiting_on_start_becomes_fatal_with_its_log(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    a = toy_assignment(parts=1, script="import sys; print('cannot open weights.bin', flush=True); sys.exit(3)")
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["FATAL"], timeout=10)
    assert st.reason == ("db: exited with code 3 during startup, 2 times in a row | last log lines: "
                         "cannot open weights.bin")
    assert edges(sup, "db") == ["PENDING->STARTING", "STARTING->BACKOFF", "BACKOFF->PENDING", "PENDING->STARTING",
                                "STARTING->FATAL"]
    # An operator retry starts over; a delete from FATAL completes.
    await sup.restart(a.instance_id)
    await sup.wait_for(a.instance_id, ["STARTING", "BACKOFF", "PENDING"], timeout=5)
    await sup.wait_for(a.instance_id, ["FATAL"], timeout=10)
    await sup.apply([])
    assert edges(sup, "db")[-1] == "FATAL->STOPPED"


async def test_a_taken_port_is_an_explicit_reason_nothing_is_spawned_and_it_is_reported_never_fatal(tmp_path,
                                                                                                    plugins):
    """A port someone else holds is not this process's failure: it waits in BACKOFF, reports the port (the
    coordinator gives the replica new ports, docs/runtime.md), and starts once the holder has gone."""
    sup = make(tmp_path, plugins)
    a = toy_assignment(parts=1)
    port = a.endpoints[0].port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        await sup.apply([a])
        st = await sup.wait_for(a.instance_id, ["BACKOFF"], timeout=10)
        assert st.reason.startswith(f"db: port {port} on 127.0.0.1 is already in use by pid {os.getpid()}")
        assert "asked the coordinator for another port" in st.reason
        assert [p.port_in_use for p in st.processes] == [port]
        # More attempts than start_retries: still no FATAL, still nothing spawned.
        deadline = asyncio.get_running_loop().time() + 10
        while edges(sup, "db").count("BACKOFF->PENDING") < sup.config.start_retries + 1:
            assert asyncio.get_running_loop().time() < deadline, edges(sup, "db")
            await asyncio.sleep(0.05)
        assert "FATAL" not in sup.instance(a.instance_id).state
        assert "PENDING->STARTING" not in edges(sup, "db")
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=20)
    assert [p.port_in_use for p in st.processes] == [0]
    await sup.apply([])


async def test_plugin_refusal_bug_or_absence_is_a_fatal_instance_not_a_crash(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    refused, crashed = toy_assignment(refuse=1, name="refused"), toy_assignment(crash=1, name="crashed")
    unknown = toy_assignment(name="unknown").model_copy(update={"runtime": "sglang"})
    out = await sup.apply([refused, crashed, unknown])
    assert out == [
        "refused-r0-g1: FATAL: the toy plugin cannot launch part 0: toy cannot run this",
        "crashed-r0-g1: FATAL: the toy plugin failed building part 0: ZeroDivisionError: plugin bug",
        "unknown-r0-g1: FATAL: no loaded plugin launches runtime 'sglang'",
    ]
    assert {s.instance_id: s.state for s in sup.status()} == dict.fromkeys(
        ["refused-r0-g1", "crashed-r0-g1", "unknown-r0-g1"], "FATAL")
    assert await sup.apply([]) == [f"{i}-r0-g1: stopped (nothing was running)" for i in ("refused", "crashed",
                                                                                          "unknown")]


async def test_missing_binary_is_fatal_at_once(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    a = toy_assignment(parts=1, binary=str(tmp_path / "gone"))
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["FATAL"], timeout=5)
    assert st.reason == f"db: binary {tmp_path / 'gone'} does not exist"
    await sup.apply([])


async def test_a_new_supervisor_adopts_what_is_still_desired_and_kills_orphans(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    keep, drop = toy_assignment(name="keep"), toy_assignment(parts=1, name="drop")
    await sup.apply([keep, drop])
    kept = {p.name: p.pid for p in (await sup.wait_for(keep.instance_id, ["RUNNING"], 10)).processes}
    dropped = (await sup.wait_for(drop.instance_id, ["RUNNING"], 10)).processes[0].pid
    await sup.close()  # agentd exits (upgrade): the servers keep running
    assert all(group_members(p) for p in [*kept.values(), dropped])

    sup2 = make(tmp_path, plugins)
    found = await sup2.start()
    assert sorted(found) == sorted([f"found keep-r0-g1/db still running as pid {kept['db']}",
                                    f"found keep-r0-g1/api still running as pid {kept['api']}",
                                    f"found drop-r0-g1/db still running as pid {dropped}"])
    assert group_members(dropped)  # nothing is killed before the desired state is known
    out = await sup2.apply([keep])
    assert out[0].startswith(f"drop-r0-g1/db: killed orphan pid {dropped} (no longer desired")
    assert out[1] == f"keep-r0-g1: adopting db (pid {kept['db']}), api (pid {kept['api']}); supervising db, api"
    st = await sup2.wait_for(keep.instance_id, ["RUNNING"], 10)
    assert {p.name: p.pid for p in st.processes} == kept and st.restarts == 0
    assert group_members(dropped) == []
    # The adopted ones are watched like our own: kill one, it comes back and its dependent follows.
    os.kill(kept["db"], signal.SIGKILL)
    st = await sup2.wait_for(keep.instance_id, ["BACKOFF"], 5)
    assert "db: exited (adopted process: exit status unknown); restarting in" in st.reason
    st = await sup2.wait_for(keep.instance_id, ["RUNNING"], 10)
    assert all(p.pid != kept[p.name] for p in st.processes)
    await sup2.close(stop_processes=True)
    assert all(group_members(p.pid) == [] for p in st.processes)


async def test_a_changed_assignment_under_the_same_id_is_not_adopted(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    a = toy_assignment(parts=1)
    await sup.apply([a])
    old = (await sup.wait_for(a.instance_id, ["RUNNING"], 10)).processes[0].pid
    await sup.close()
    changed = a.model_copy(update={"term": 2})  # same instance id, other content
    sup2 = make(tmp_path, plugins)
    out = await sup2.apply([changed])
    assert out[0].startswith(f"toy-r0-g1/db: killed orphan pid {old} (its assignment changed")
    st = await sup2.wait_for(a.instance_id, ["RUNNING"], 10)
    assert st.processes[0].pid != old
    await sup2.apply([])


async def test_kill_recorded_cleans_up_after_an_abandoned_supervisor(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    a = toy_assignment()
    await sup.apply([a])
    pids = [p.pid for p in (await sup.wait_for(a.instance_id, ["RUNNING"], 10)).processes]
    await sup.close()  # abandoned: the servers run on
    assert all(group_members(p) for p in pids)
    assert sorted(kill_recorded(tmp_path)) == sorted(pids)
    for p in pids:
        for _ in range(100):
            if not group_members(p):
                break
            await asyncio.sleep(0.02)
        assert group_members(p) == []


async def test_a_new_generation_on_the_same_port_replaces_the_old_one_cleanly(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    old = toy_assignment(parts=1)
    await sup.apply([old])
    old_pid = (await sup.wait_for(old.instance_id, ["RUNNING"], 10)).processes[0].pid
    new = old.model_copy(update={"generation": 2})  # re-placed onto the same host and port
    out = await sup.apply([new])
    assert out == [f"{old.instance_id}: stopped (db: stopped)", f"{new.instance_id}: launching db"]
    st = await sup.wait_for(new.instance_id, ["RUNNING"], 10)
    assert st.restarts == 0 and group_members(old_pid) == []
    assert [f"{e.old}->{e.new}" for e in sup.history(new.instance_id)] == ["PENDING->STARTING", "STARTING->RUNNING"]
    await sup.apply([])
