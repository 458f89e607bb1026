"""sd_notify against a real unix datagram socket, the watchdog loop, and the drain-on-stop contract."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid

import pytest

from agentd.api.drain import clear_drain_request, drain_decision, request_drain
from agentd.api.sdnotify import SdNotifier, status_line, watchdog_interval, watchdog_loop


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def test_ready_status_watchdog_stopping_are_real_datagrams(listener):
    path, sock = listener
    n = SdNotifier(path)
    assert n.ready("leader n1,  term 3\nignored newline")
    assert sock.recv(4096) == b"READY=1\nSTATUS=leader n1, term 3 ignored newline"
    assert n.status("joining") and sock.recv(4096) == b"STATUS=joining"
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert n.extend_timeout(1.5) and sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    assert n.stopping("draining") and sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    with pytest.raises(ValueError):
        n.notify("READY=1\nMAINPID=1")
    n.close()


def test_abstract_socket_address():
    name = f"agentd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert SdNotifier("@" + name).ready()
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_a_child_process_notifies_through_the_inherited_environment(listener):
    path, sock = listener
    code = "from agentd.api.sdnotify import SdNotifier; SdNotifier.from_environ().ready('up')"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "NOTIFY_SOCKET": path}, check=True, timeout=30)
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_no_socket_means_no_op_and_a_dead_socket_is_not_fatal(tmp_path, caplog):
    n = SdNotifier.from_environ({})
    assert not n.enabled and not n.ready()
    gone = SdNotifier(str(tmp_path / "nobody-listens.sock"))
    assert gone.watchdog() is False
    assert "could not notify systemd" in caplog.text


def test_from_environ_can_hide_the_socket_from_children():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1", "PATH": "/bin"}
    n = SdNotifier.from_environ(env, unset=True)
    assert n.socket_path == "/run/x" and env == {"PATH": "/bin"}


@pytest.mark.parametrize(("env", "pid", "expected"), [
    ({}, 10, None),
    ({"WATCHDOG_USEC": "30000000"}, 10, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, 10, None),
    ({"WATCHDOG_USEC": "soon"}, 10, None),
])
def test_watchdog_interval(env, pid, expected):
    assert watchdog_interval(env, pid) == expected


async def test_watchdog_loop_pings_at_half_interval_only_while_healthy(listener):
    path, sock = listener
    sock.setblocking(False)
    health = iter([True, True, False, True])
    sleeps: list[float] = []

    async def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 4:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await watchdog_loop(SdNotifier(path), 10.0, healthy=lambda: next(health), sleep=sleep)
    got = []
    while True:
        try:
            got.append(sock.recv(64))
        except BlockingIOError:
            break
    assert got == [b"WATCHDOG=1"] * 3 and sleeps == [5.0] * 4
    await watchdog_loop(SdNotifier(path), None, sleep=sleep)  # watchdog off: returns at once


def test_status_line():
    assert status_line(leader="n1", term=4, instances_running=2, instances_total=3) == \
        "leader n1, term 4, 2/3 instances running"
    assert status_line(leader=None, term=0, instances_running=0, instances_total=0).startswith("no leader")


def test_drain_contract(tmp_path):
    assert drain_decision(tmp_path, False)[0] is False
    assert drain_decision(tmp_path, True) == (
        True, "stopping this host's model servers before exit: stop_models_on_exit is set")
    (tmp_path / "drain-on-stop").touch()  # the file's name before 0.2.0 still works
    assert drain_decision(tmp_path, False)[0] is True
    clear_drain_request(tmp_path)
    assert not (tmp_path / "drain-on-stop").exists()
    path = request_drain(tmp_path / "state")
    ok, why = drain_decision(tmp_path / "state", False)
    assert ok and str(path) in why
    assert drain_decision(tmp_path / "state", True, restarting=True)[0] is False, "restarts never drain"
    clear_drain_request(tmp_path / "state")
    assert drain_decision(tmp_path / "state", False)[0] is False
    clear_drain_request(tmp_path / "state")  # idempotent
