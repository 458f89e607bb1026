"""One lifecycle for the agent (agentd/agent/wiring.py): a failure anywhere in start-up stops what had started.

Before the split, a failed HTTP bind raised out of `Daemon.run()` past `shutdown()`: the gRPC server, the Raft
loop and its data-directory lock stayed up in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.agent.wiring import Daemon
from agentd.cli.common import EXIT_UNAVAILABLE
from agentd.config import load_settings
from agentd.errors import NotAvailable
from agentd.testing.localcluster import LocalCluster, free_port, simulated_host


@contextlib.contextmanager
def held_port() -> tuple[socket.socket, int]:
    """A loopback port something else is listening on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s, s.getsockname()[1]
    finally:
        s.close()


def can_bind(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def settings_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_port: int):
    (tmp_path / "none.toml").touch()
    monkeypatch.setenv("AGENTD_CONFIG", str(tmp_path / "none.toml"))
    inventory = tmp_path / "a.inventory.json"
    inventory.write_text(json.dumps(simulated_host("a")))
    return load_settings(node_name="a", listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{http_port}",
                         data_dir=tmp_path / "a", simulate_inventory=inventory, insecure=True)


@pytest.mark.slow
def test_a_taken_http_port_stops_the_agent_with_a_clear_error(tmp_path):
    """A real `agentd serve` whose HTTP port is taken exits non-zero, naming the port, and leaves nothing."""
    cluster = LocalCluster(root=tmp_path, hosts=[simulated_host("a")])
    agent = cluster.agents["a"]
    grpc_port = int(agent.listen.rpartition(":")[2])
    with held_port() as (_, held):
        agent.http_listen = f"127.0.0.1:{held}"
        cluster.start_agent("a", join=[])
        try:
            rc = agent.proc.wait(timeout=60)
        finally:
            cluster.stop(timeout=5)
    log = agent.log_file.read_text()
    assert rc == EXIT_UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{held} for HTTP" in log
    assert "agent could not start; stopped what had started" in log
    assert can_bind(grpc_port)
    with pytest.raises(ProcessLookupError):  # nothing of its process group (model servers) outlives it
        os.killpg(agent.proc.pid, 0)


def test_a_start_up_failure_unwinds_in_process(tmp_path, monkeypatch):
    """In one process: after a failed HTTP bind the gRPC port is free again and no task of the agent runs."""
    with held_port() as (_, held):
        settings = settings_for(tmp_path, monkeypatch, held)

        async def main() -> None:
            d = Daemon(settings)
            with pytest.raises(NotAvailable, match=f"cannot listen on 127.0.0.1:{held} for HTTP"):
                await d.run()
            assert can_bind(int(settings.listen.rpartition(":")[2]))
            assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

        asyncio.run(main())


def test_a_failure_after_raft_started_releases_its_lock_and_ports(tmp_path, monkeypatch):
    """A failure after Raft has taken the data directory's lock: the lock, both ports and every task are given
    back, and the signal handlers are not left installed."""
    settings = settings_for(tmp_path, monkeypatch, free_port())

    async def main() -> None:
        d = Daemon(settings)

        async def broken(*_: object) -> None:
            assert not any(lock_is_free(p) for p in d.data_dir.rglob("raft.lock")), "Raft holds its lock now"
            raise RuntimeError("injected start-up failure")

        monkeypatch.setattr(d._health, "set", broken)
        with pytest.raises(RuntimeError, match="injected"):
            await d.run()
        locks = list(d.data_dir.rglob("raft.lock"))
        assert locks, "Raft had started"
        assert all(lock_is_free(p) for p in locks)
        assert can_bind(int(settings.listen.rpartition(":")[2]))
        assert can_bind(int(settings.http_listen.rpartition(":")[2]))
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)

    asyncio.run(main())


def test_test_hooks_load_only_from_agentd_testing(monkeypatch):
    from agentd.agent.wiring import TEST_HOOKS_ENV, load_test_hooks
    from agentd.errors import ConfigError

    monkeypatch.delenv(TEST_HOOKS_ENV, raising=False)
    assert load_test_hooks() is None
    monkeypatch.setenv(TEST_HOOKS_ENV, "os")
    with pytest.raises(ConfigError, match=r"agentd\.testing only"):
        load_test_hooks()
    monkeypatch.setenv(TEST_HOOKS_ENV, "agentd.testing.agent_hooks")
    assert load_test_hooks().install


def test_a_production_agent_imports_no_test_code():
    code = ("import sys, agentd.agent.wiring, agentd.cli.main; "
            "print(sorted(m for m in sys.modules if m.startswith('agentd.testing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")})
    assert out.stdout.strip() == "[]"


def test_a_loop_that_loses_its_cancellation_does_not_hang_the_stop(tmp_path, monkeypatch, caplog):
    """Python 3.11's wait_for and timeout() can lose a cancellation that arrives as what they wait for completes;
    a loop that went on after it used to keep the agent from ever exiting (SIGTERM right after start-up)."""
    settings = settings_for(tmp_path, monkeypatch, free_port())

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # what a lost cancellation looks like from outside: the task runs on
        await asyncio.Event().wait()

    async def main() -> int:
        d = Daemon(settings)
        run = asyncio.create_task(d.run())
        while not d._tasks and not run.done():
            await asyncio.sleep(0.01)
        d.spawn(stubborn(), "stubborn")
        d.stop()
        return await asyncio.wait_for(run, 60)  # a hang guard, not a timing assertion

    with caplog.at_level("WARNING", logger="agentd.agent.wiring"):
        assert asyncio.run(main()) == 0
    assert "cancelling again what ignored a cancellation" in caplog.text
