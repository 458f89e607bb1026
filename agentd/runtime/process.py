"""Spawning, adopting and stopping process trees.

Every process is spawned from an argv list (never through a shell, so no
argument is ever re-parsed) in a new session, which makes it the leader of
its own process group: a signal to agentd's terminal does not reach it, agentd
can die without taking it along, and stopping it means signalling one group.
Some runtimes escape their group (Ray daemonises its raylet; a crash handler
may fork gdb), so a stop also signals every descendant found at that moment.

A process adopted after an agentd restart is not our child: we cannot
waitpid() it, so its exit is watched through a pidfd (Linux 5.3+), with a
slow poll as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agentd.errors import BinaryNotUsable
from agentd.security.files import private_dir

_CREATE_TIME_TOLERANCE = 0.05  # seconds; psutil derives it from clock ticks since boot


def resolve_program(program: str, env: dict[str, str]) -> str:
    """The absolute path that will be executed, or BinaryNotUsable saying why not."""
    if os.sep in program:
        p = Path(program)
        if not p.exists():
            raise BinaryNotUsable(f"binary {program} does not exist")
        if p.is_dir():
            raise BinaryNotUsable(f"binary {program} is a directory, not a program")
        if not os.access(p, os.X_OK):
            raise BinaryNotUsable(f"binary {program} is not executable (check its permissions)")
        return str(p)
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if not found:
        raise BinaryNotUsable(f"binary {program!r} not found on PATH")
    return found


def process_create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_same_process(pid: int, create_time: float) -> bool:
    """The pid is alive (not a zombie) and is still the process started at `create_time`."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(p.create_time() - create_time) <= _CREATE_TIME_TOLERANCE
    except psutil.Error:
        return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`, read from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        # rest[0] = state, rest[1] = ppid, rest[2] = pgrp
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class ProcessHandle:
    """A process we started or adopted: its identity and a way to await its exit.

    Deliberately built on subprocess.Popen and a pidfd rather than asyncio's
    subprocess transport: closing (or garbage-collecting) an asyncio
    transport kills a still-running child, and the model server must outlive
    this agentd.
    """

    pid: int
    pgid: int
    create_time: float
    adopted: bool = False
    returncode: int | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False)
    _exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _watch: asyncio.Task | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_exit(), name=f"watch-pid-{self.pid}")

    async def _watch_exit(self) -> None:
        if self._popen is not None:
            await _wait_pid_exit(self.pid, lambda: self._popen.poll() is None)
            # Exited, but a debugger may still trace it (a crashing llama-server forks gdb): the status can
            # be collected only once it lets go. Poll rather than block the event loop in waitpid().
            while self._popen.poll() is None:
                await asyncio.sleep(0.05)
            self.returncode = self._popen.returncode
        else:
            await _wait_pid_exit(self.pid, lambda: is_same_process(self.pid, self.create_time))
        self._exited.set()

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def wait(self) -> int | None:
        """The exit status (negative: killed by that signal); None for an adopted process."""
        await self._exited.wait()
        return self.returncode

    def alive(self) -> bool:
        return not self._exited.is_set() and is_same_process(self.pid, self.create_time)

    def close(self) -> None:
        """Stop watching; the process itself is left alone.

        A child of ours that has exited is reaped first: otherwise its zombie
        stays in `ps` until subprocess's next spawn happens to collect it. One
        that cannot be reaped yet (still traced by a debugger) keeps its watch,
        which reaps it as soon as it can.
        """
        if self._watch is None or self._watch.done():
            return
        if self._popen is not None and self._popen.poll() is None and not _alive(self.pid):
            return
        self._watch.cancel()


async def _wait_pid_exit(pid: int, running: Callable[[], bool]) -> None:
    """Wait until `running()` turns false, woken by a pidfd when the kernel has one."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        fd = None
    if fd is None:
        while running():
            await asyncio.sleep(0.5)
        return
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        if running():  # it may have exited before the pidfd was opened
            await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def spawn(argv: list[str], env: dict[str, str], cwd: str | None, log_fd: int) -> ProcessHandle:
    """Start `argv` in its own session with stdout and stderr on `log_fd`."""
    program = resolve_program(argv[0], env)
    if cwd is not None:
        private_dir(Path(cwd))
    try:
        proc = subprocess.Popen(
            [program, *argv[1:]], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
        )
    except PermissionError as exc:
        raise BinaryNotUsable(f"binary {program} cannot be executed: {exc.strerror}") from None
    except OSError as exc:
        raise BinaryNotUsable(f"binary {program} failed to start: {exc.strerror or exc}") from None
    ct = process_create_time(proc.pid) or time.time()
    return ProcessHandle(pid=proc.pid, pgid=proc.pid, create_time=ct, _popen=proc)


def adopt(pid: int, pgid: int, create_time: float) -> ProcessHandle | None:
    """A handle on a process recorded by an earlier agentd, if it is still that process."""
    if not is_same_process(pid, create_time):
        return None
    return ProcessHandle(pid=pid, pgid=pgid, create_time=create_time, adopted=True)


@dataclass(frozen=True)
class StopOutcome:
    signalled: tuple[int, ...]  # pids that got the stop signal
    killed: tuple[int, ...]  # pids that outlived the grace period and got SIGKILL
    survivors: tuple[int, ...]  # pids still there after SIGKILL (stuck in the kernel, e.g. a hung GPU driver)

    @property
    def sentence(self) -> str:
        if self.survivors:
            return f"{len(self.survivors)} process(es) survived SIGKILL: {', '.join(map(str, self.survivors))}"
        if self.killed:
            return f"stopped ({len(self.killed)} process(es) needed SIGKILL after the grace period)"
        return "stopped"


def _tree(pid: int, pgid: int) -> set[int]:
    members = set(group_members(pgid))
    if _alive(pid):
        members.add(pid)
        members.update(descendants(pid))
    return {p for p in members if p != os.getpid()}


def _signal_all(pgid: int, pids: set[int], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


async def _wait_gone(pids: set[int], deadline: float, poll: float) -> set[int]:
    left = {p for p in pids if _alive(p)}
    while left and time.monotonic() < deadline:
        await asyncio.sleep(poll)
        left = {p for p in left if _alive(p)}
    return left


async def stop_tree(pid: int, pgid: int, *, sig: int = signal.SIGTERM, grace: float = 10.0,
                    poll: float = 0.05) -> StopOutcome:
    """SIGTERM (or `sig`) to the group and every descendant, wait `grace`, SIGKILL what is left."""
    targets = _tree(pid, pgid)
    if not targets:
        return StopOutcome((), (), ())
    _signal_all(pgid, targets, sig)
    left = await _wait_gone(targets, time.monotonic() + grace, poll)
    # Anything spawned during the grace period belongs to the tree too.
    left |= {p for p in _tree(pid, pgid) if p not in targets}
    killed: set[int] = set()
    if left:
        killed = set(left)
        _signal_all(pgid, left, signal.SIGKILL)
        left = await _wait_gone(left, time.monotonic() + 5.0, poll)
    return StopOutcome(tuple(sorted(targets)), tuple(sorted(killed)), tuple(sorted(left)))
