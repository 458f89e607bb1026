"""A host whose disk died: the model servers of its previous life are found without records (issue 20 item 4).

The supervisor of a fresh, empty data directory at the same path finds the
processes an earlier agentd started there (they carry their owner's data
directory, instance and process name in their environment): it adopts those
that run exactly what it would launch now, and stops the others, before
anything is launched in their place. Real processes (toy HTTP servers) here;
tests/test_rebuild.py does it with real agents and a real llama-server.
"""

from __future__ import annotations

import os
import shutil
import signal

from agentd.runtime.process import group_members
from agentd.runtime.strays import OWNER_DATA_DIR, find_strays
from agentd.testing.toy_runtime import make, toy_assignment


def _lose_the_disk(tmp_path) -> None:
    shutil.rmtree(tmp_path / "data")  # records, logs, work dirs: all gone


def _kill(*pids: int) -> None:
    for pid in pids:
        if group_members(pid):
            os.killpg(pid, signal.SIGKILL)


async def test_after_the_records_are_lost_what_still_matches_is_adopted_and_the_rest_stopped(tmp_path, plugins):
    sup = make(tmp_path, plugins)
    keep, drop, moved = toy_assignment(name="keep"), toy_assignment(parts=1, name="drop"), toy_assignment(
        parts=1, name="moved")
    await sup.apply([keep, drop, moved])
    kept = {p.name: p.pid for p in (await sup.wait_for(keep.instance_id, ["RUNNING"], 10)).processes}
    dropped = (await sup.wait_for(drop.instance_id, ["RUNNING"], 10)).processes[0].pid
    old_moved = (await sup.wait_for(moved.instance_id, ["RUNNING"], 10)).processes[0].pid
    await sup.close()  # the agent dies with its disk; the servers keep running
    try:
        _lose_the_disk(tmp_path)
        assert sorted((s.instance_id, s.process, s.pid) for s in find_strays(tmp_path / "data")) == sorted(
            [(keep.instance_id, "db", kept["db"]), (keep.instance_id, "api", kept["api"]),
             (drop.instance_id, "db", dropped), (moved.instance_id, "db", old_moved)])
        assert find_strays(tmp_path / "elsewhere") == []  # another data directory's processes are not ours

        sup2 = make(tmp_path, plugins)
        found = await sup2.start()
        assert f"found keep-r0-g1/db still running as pid {kept['db']} without a record (an earlier agentd on " \
               "this data directory started it)" in found
        assert group_members(dropped)  # nothing is stopped before the desired state is known
        # `moved` is still desired, on another port now (its command line differs): stopped, then launched anew.
        moved2 = moved.model_copy(update={"endpoints": (moved.endpoints[0].model_copy(
            update={"port": toy_assignment(parts=1).endpoints[0].port}),)})
        out = await sup2.apply([keep, moved2])
        assert any(s.startswith(f"drop-r0-g1/db: stopped pid {dropped} of an earlier agentd on this data directory "
                                "(no longer desired") for s in out), out
        assert f"keep-r0-g1: adopting db (pid {kept['db']}), api (pid {kept['api']}); supervising db, api" in out
        st = await sup2.wait_for(keep.instance_id, ["RUNNING"], 10)
        assert {p.name: p.pid for p in st.processes} == kept
        assert group_members(dropped) == [] and group_members(old_moved) == []
        st = await sup2.wait_for(moved.instance_id, ["RUNNING"], 10)
        assert st.processes[0].pid != old_moved
        # Adopted from now on like any other: a record exists again, so a plain restart adopts as usual.
        assert (tmp_path / "data" / "runtime" / "records" / keep.instance_id / "db.json").exists()
        with open(f"/proc/{st.processes[0].pid}/environ", "rb") as f:
            assert f"{OWNER_DATA_DIR}={(tmp_path / 'data').resolve()}".encode() in f.read().split(b"\0")
        await sup2.apply([])
        assert all(group_members(p) == [] for p in kept.values())
    finally:
        _kill(*kept.values(), dropped, old_moved)
