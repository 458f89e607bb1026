"""The supervisor's parts, each against the real thing: files, sockets, processes, an HTTP server, fake NVML."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from agentd.inventory.fakenvml import FakeGpu, FakeNvml
from agentd.inventory.nvml import NvmlReader
from agentd.runtime import logfiles
from agentd.runtime.binaries import find_binary
from agentd.runtime.gpu import verify_gpu_release
from agentd.runtime.health import Liveness, probe_http, probe_tcp
from agentd.runtime.ports import PortAllocator, PortInUse, PortRangeExhausted, check_free, is_free
from agentd.runtime.process import (
    BinaryNotUsable,
    adopt,
    group_members,
    is_same_process,
    resolve_program,
    spawn,
    stop_tree,
)
from agentd.runtime.records import ProcessRecord, RecordStore, fingerprint
from agentd.runtime.spec import HealthVerdict, HttpProbe, ProcessSpec
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan

# --------------------------------------------------------------------------- records


def _assignment(gen: int = 1) -> Assignment:
    return Assignment(deployment="d", replica=0, generation=gen, term=3, model="/m.gguf", runtime="llamabox",
                      plan=ReplicaPlan(parts=(Part(host="h", role="main", gpus=(0,)),)),
                      endpoints=(PartEndpoint(host="h", address="127.0.0.1", port=40001),))


def _record(iid="d-r0-g1", name="main", pid=123) -> ProcessRecord:
    a = _assignment()
    return ProcessRecord(instance_id=iid, process=name, pid=pid, pgid=pid, create_time=1.5, argv=("x", "-y"),
                         fingerprint=fingerprint(a), spec=ProcessSpec(name=name, argv=("x", "-y")),
                         assignment=a, started_at=2.0)


def test_records_round_trip_atomically_and_are_removed_with_their_dir(tmp_path):
    store = RecordStore(tmp_path / "records")
    rec = _record()
    store.write(rec)
    store.write(_record(name="rpc-1", pid=124))
    assert sorted(os.listdir(tmp_path / "records" / "d-r0-g1")) == ["main.json", "rpc-1.json"]  # no temp files
    assert store.load_all() == [rec, _record(name="rpc-1", pid=124)]
    store.remove("d-r0-g1", "main")
    store.remove("d-r0-g1", "rpc-1")
    store.remove("d-r0-g1", "rpc-1")  # idempotent
    assert not (tmp_path / "records" / "d-r0-g1").exists()


def test_a_corrupt_record_is_set_aside_not_fatal(tmp_path, caplog):
    store = RecordStore(tmp_path)
    store.write(_record())
    (tmp_path / "x-r0-g1").mkdir()
    (tmp_path / "x-r0-g1" / "main.json").write_text('{"instance_id": "x-r0-g1", "pid": ')
    assert [r.instance_id for r in store.load_all()] == ["d-r0-g1"]
    assert (tmp_path / "x-r0-g1" / "main.corrupt").exists()
    assert "process record unreadable" in caplog.text


def test_fingerprint_changes_with_the_assignment():
    assert fingerprint(_assignment()) == fingerprint(_assignment())
    assert fingerprint(_assignment()) != fingerprint(_assignment(gen=2))


# --------------------------------------------------------------------------- ports


def test_a_port_in_use_is_an_error_naming_the_port_and_its_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not is_free("127.0.0.1", port)
        with pytest.raises(PortInUse) as err:
            check_free([("127.0.0.1", port)])
        import psutil

        name = psutil.Process().name()
        assert str(err.value) == f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()} ({name})"
        assert err.value.port == port
    assert is_free("127.0.0.1", port)


def test_allocator_skips_ports_in_use_and_ports_we_handed_out(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        lo = busy.getsockname()[1]
        ours = {lo + 1}
        alloc = PortAllocator(lo, lo + 4, in_use=lambda: ours)
        assert alloc.allocate() == [lo + 2]
        ours.add(lo + 2)
        assert alloc.allocate(2) == [lo + 3, lo + 4]
        ours.update({lo + 3, lo + 4})
        with pytest.raises(PortRangeExhausted, match="no 1 free consecutive port"):
            alloc.allocate()


# --------------------------------------------------------------------------- log files


def test_each_run_gets_a_file_and_previous_runs_are_kept_up_to_keep(tmp_path):
    logs = logfiles.LogFiles(tmp_path, keep=2)
    for run in range(4):
        fd = logs.open_run("i", "main", f"run {run}")
        os.write(fd, f"line of run {run}\n".encode())
        os.close(fd)
    runs = logs.runs("i", "main")
    assert [p.name for p in runs] == ["main.log", "main.log.1", "main.log.2"]
    assert [logfiles.tail(p, 1)[0] for p in runs] == ["line of run 3", "line of run 2", "line of run 1"]
    assert "=== agentd" in runs[0].read_text() and "run 3" in runs[0].read_text()


def test_copy_truncate_caps_a_running_file_the_child_keeps_writing(tmp_path):
    logs = logfiles.LogFiles(tmp_path, keep=3, max_bytes=100)
    fd = logs.open_run("i", "main", "h")
    os.write(fd, b"x" * 200 + b"\n")
    assert logs.enforce_size("i", "main")
    os.write(fd, b"after\n")  # O_APPEND: lands at the new end, no hole
    os.close(fd)
    cur = logs.path("i", "main")
    assert cur.read_bytes() == b"after\n"
    assert (tmp_path / "i" / "main.log.1").stat().st_size > 200
    assert not logs.enforce_size("i", "main")


def test_tail_reads_only_the_end():
    assert logfiles.tail(Path("/nonexistent"), 3) == []


async def test_follow_streams_across_truncation_and_a_new_run(tmp_path):
    logs = logfiles.LogFiles(tmp_path, keep=2, max_bytes=10)
    fd = logs.open_run("i", "p", "first")
    stop = asyncio.Event()
    got = bytearray()

    async def reader():
        async for chunk in logfiles.follow(logs.path("i", "p"), poll=0.02, stop=stop):
            got.extend(chunk)

    task = asyncio.create_task(reader())
    os.write(fd, b"one\n")
    await asyncio.sleep(0.1)
    logs.enforce_size("i", "p")
    os.write(fd, b"two\n")
    await asyncio.sleep(0.1)
    os.close(fd)
    fd = logs.open_run("i", "p", "second")
    os.write(fd, b"three\n")
    os.close(fd)
    await asyncio.sleep(0.15)
    stop.set()
    await asyncio.wait_for(task, 2)
    text = got.decode()
    assert text.index("one") < text.index("two") < text.index("three")
    assert "second" in text


# --------------------------------------------------------------------------- probes


async def _server(handler):
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_http_probe_reads_status_and_body_on_its_own_connection():
    seen = []

    async def handler(r, w):
        seen.append(await r.readuntil(b"\r\n\r\n"))
        w.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 24\r\n\r\n{\"error\":\"Loading model\"}")
        await w.drain()
        w.close()

    srv, port = await _server(handler)
    async with srv:
        res = await probe_http(HttpProbe(host="127.0.0.1", port=port), timeout=1)
    assert (res.ok, res.status) == (False, 503) and "Loading model" in res.body
    assert b"GET /health HTTP/1.1" in seen[0] and b"Connection: close" in seen[0]


async def test_a_busy_server_times_out_the_probe_without_hanging_it():
    async def handler(r, w):
        await asyncio.sleep(5)  # busy: never answers in time

    srv, port = await _server(handler)
    async with srv:
        t0 = time.monotonic()
        res = await probe_http(HttpProbe(host="127.0.0.1", port=port), timeout=0.2)
    assert res.timed_out and time.monotonic() - t0 < 1
    assert res.error == f"no answer from 127.0.0.1:{port} within 0.2s"


async def test_refused_and_garbage_answers_are_failures_with_reasons():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = await probe_http(HttpProbe(host="127.0.0.1", port=port), timeout=1)
    assert not res.ok and res.error.startswith(f"cannot connect to 127.0.0.1:{port}")
    assert not (await probe_tcp("127.0.0.1", port, 1)).ok

    async def garbage(r, w):
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await w.drain()
        w.close()

    srv, port = await _server(garbage)
    async with srv:
        res = await probe_http(HttpProbe(host="127.0.0.1", port=port), timeout=1)
        assert (await probe_tcp("127.0.0.1", port, 1)).ok
    assert not res.ok and res.error.startswith("not HTTP")


def test_liveness_needs_n_failures_in_a_row_and_loading_is_not_failing():
    lv = Liveness(failures_allowed=3)
    bad, ok = HealthVerdict(ready=False, alive=False, detail="refused"), HealthVerdict(ready=True)
    loading = HealthVerdict(ready=False, alive=True, detail="loading")
    assert [lv.record(v) for v in (bad, bad, ok, bad, loading, bad, bad)] == [False] * 7
    assert lv.record(bad) is True and lv.last_detail == "refused" and lv.consecutive == 3


# --------------------------------------------------------------------------- processes

TREE = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn child: needs SIGKILL
kids = [subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(60)"])]
if os.fork() == 0:  # a grandchild that leaves the group: found as a descendant
    os.setsid()
    time.sleep(60)
    os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


async def test_spawn_runs_in_its_own_group_and_stop_kills_the_whole_tree(tmp_path):
    log = tmp_path / "tree.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    h = await spawn([sys.executable, "-c", TREE], dict(os.environ), str(tmp_path / "cwd"), fd)
    os.close(fd)
    assert h.pgid == h.pid and os.getpgid(h.pid) == h.pid and os.getsid(h.pid) == h.pid
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(group_members(h.pgid)) == 2
    assert is_same_process(h.pid, h.create_time) and not is_same_process(h.pid, h.create_time + 10)
    outcome = await stop_tree(h.pid, h.pgid, grace=0.3)
    assert len(outcome.signalled) == 3  # the leader, its child, and its forked child that left the group
    assert set(outcome.killed) == set(outcome.signalled)  # all ignored SIGTERM
    assert outcome.survivors == () and "needed SIGKILL" in outcome.sentence
    assert await asyncio.wait_for(h.wait(), 5) == -signal.SIGKILL
    assert group_members(h.pgid) == []


async def test_a_polite_process_stops_on_sigterm_and_reports_its_status(tmp_path):
    h = await spawn(["sleep", "30"], dict(os.environ), None, os.open(os.devnull, os.O_WRONLY))
    outcome = await stop_tree(h.pid, h.pgid, grace=5)
    assert outcome.killed == () and outcome.sentence == "stopped"
    assert await h.wait() == -signal.SIGTERM


async def test_adopt_watches_a_process_that_is_not_our_child():
    # A process whose parent is gone (double fork through `sh -c ... &`): reparented, like after agentd died.
    out = await asyncio.create_subprocess_exec("sh", "-c", "setsid sleep 30 >/dev/null 2>&1 & echo $!",
                                               stdout=asyncio.subprocess.PIPE)
    pid = int((await out.communicate())[0])
    from agentd.runtime.process import process_create_time

    h = adopt(pid, pid, process_create_time(pid))
    assert h is not None and h.adopted and h.alive()
    assert adopt(pid, pid, process_create_time(pid) - 100) is None  # same pid, another process
    os.kill(pid, signal.SIGKILL)
    assert await asyncio.wait_for(h.wait(), 5) is None  # exit seen via pidfd; status unknowable
    assert not h.alive()


def test_binaries_missing_not_executable_or_a_directory_are_named(tmp_path):
    f = tmp_path / "tool"
    f.write_text("#!/bin/sh\n")
    with pytest.raises(BinaryNotUsable, match=f"binary {f} is not executable"):
        resolve_program(str(f), {})
    with pytest.raises(BinaryNotUsable, match=f"binary {tmp_path} is a directory"):
        resolve_program(str(tmp_path), {})
    with pytest.raises(BinaryNotUsable, match="binary 'no-such-tool' not found on PATH"):
        resolve_program("no-such-tool", {"PATH": str(tmp_path)})
    f.chmod(0o755)
    assert resolve_program("tool", {"PATH": str(tmp_path)}) == str(f)
    assert find_binary("", ("other", "tool"), [tmp_path]) == str(f)
    assert find_binary("/configured/wins", ("tool",), [tmp_path]) == "/configured/wins"
    with pytest.raises(BinaryNotUsable, match=r"none of a, b found .*; set some_setting"):
        find_binary("", ("a", "b"), [tmp_path], setting="some_setting")


# --------------------------------------------------------------------------- GPU memory release


async def test_gpu_release_is_verified_through_nvml_when_present():
    gpu = FakeGpu(uuid="GPU-0", compute_processes=[(4242, 2 * 1024**3), (999, 1024**3)])
    reader = NvmlReader(FakeNvml([gpu, FakeGpu(uuid="GPU-1", pci_bus_id="00000000:01:00.0")]))
    held = await verify_gpu_release(reader, [0], [4242], timeout=0.2, poll=0.05)
    assert held == "GPU 0 still holds 2.0 GiB for pid 4242 0.2s after stop"
    gpu.compute_processes = [(999, 1024**3)]  # only someone else's process is left
    assert await verify_gpu_release(reader, [0], [4242]) == "GPU memory released on GPU 0"
    assert await verify_gpu_release(reader, [], [4242]) == ""


async def test_gpu_release_without_nvml_is_a_note_not_an_error():
    assert await verify_gpu_release(None, [0], [1]) == "GPU memory release not verified (NVML not present)"
    reader = NvmlReader(FakeNvml(init_error=12))
    note = await verify_gpu_release(reader, [0], [1])
    assert note.startswith("GPU memory release not verified (NVML library not found")


def test_records_are_json_a_human_can_read(tmp_path):
    store = RecordStore(tmp_path)
    store.write(_record())
    data = json.loads((tmp_path / "d-r0-g1" / "main.json").read_text())
    assert data["pid"] == 123 and data["argv"] == ["x", "-y"] and data["spec"]["name"] == "main"
