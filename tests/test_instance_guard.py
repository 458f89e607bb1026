"""The instance guard (agentd/security/guard.c) with real sockets: a listener runs in a Python subprocess with the
library preloaded, clients connect from chosen loopback addresses (127.0.0.x stands for the hosts).

A refused client sees its connection closed at once (EOF or a reset), an allowed one is served, and the
listener goes on: blocking and non-blocking (asyncio) listeners, accept4's flags, open ports, IPv4-mapped
peers of a dual-stack listener, CIDR blocks, AF_UNIX untouched, and a malformed policy refusing everyone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentd.security import guard
from agentd.testing.localcluster import free_port

# The listener: serves "hello <nonblock> <cloexec>" to each connection it accepts, forever. MODE picks how it
# accepts: socket.accept (blocking), asyncio (non-blocking, EAGAIN after a refusal), or libc's accept4 with
# SOCK_NONBLOCK|SOCK_CLOEXEC called through ctypes (the flags must reach the connection it returns).
LISTENER = r"""
import asyncio, ctypes, fcntl, os, socket, sys
mode, family, where, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def flags(fd):
    return f"hello {int(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK))} " \
           f"{int(bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))}\n".encode()

if family == "unix":
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(where)
else:
    lsock = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET, socket.SOCK_STREAM)
    if family == "inet6":
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((where, port))
lsock.listen(16)
print("PORT", lsock.getsockname()[1] if family != "unix" else 0, flush=True)

if mode == "blocking":
    while True:
        conn, _ = lsock.accept()
        conn.sendall(flags(conn.fileno()))
        conn.close()
elif mode == "accept4":
    libc = ctypes.CDLL(None, use_errno=True)
    while True:
        fd = libc.accept4(lsock.fileno(), None, None, os.O_NONBLOCK | os.O_CLOEXEC)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        os.write(fd, flags(fd))
        os.close(fd)
else:
    async def serve(reader, writer):
        writer.write(flags(writer.get_extra_info("socket").fileno()))
        await writer.drain()
        writer.close()

    async def main():
        lsock.setblocking(False)
        server = await asyncio.start_server(serve, sock=lsock)
        await server.serve_forever()
    asyncio.run(main())
"""


class Listener:
    def __init__(self, tmp_path: Path, library: Path | None, mode: str, env: dict[str, str], family: str = "inet",
                 where: str = "0.0.0.0", port: int = 0):
        self.log = tmp_path / f"listener-{mode}-{family}.log"
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_GUARD_")}
        run_env.update(env)
        if library is not None:
            run_env["LD_PRELOAD"] = str(library)
        script = tmp_path / "listener.py"
        script.write_text(LISTENER)
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), mode, family, where, str(port)], env=run_env,
                                         stdout=subprocess.PIPE, stderr=err)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("PORT "), f"the listener did not start: {line!r} {self.log.read_text()}"
        self.port = int(line.split()[1])

    def stderr(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def listeners(tmp_path):
    started: list[Listener] = []

    def start(*args, **kwargs) -> Listener:
        started.append(Listener(tmp_path, *args, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.close()


def talk(port: int, source: str, to: str = "127.0.0.1") -> bytes:
    """What the listener sends a client connecting from `source`: b"" when it closed the connection at once."""
    family = socket.AF_INET6 if ":" in to else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(20)
        c.bind((source, 0))
        c.connect((to, port))
        try:
            return c.recv(100)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize("mode", ["blocking", "asyncio"])
def test_only_the_instances_hosts_are_served_and_the_listener_goes_on(listeners, guard_library, mode):
    srv = listeners(guard_library, mode, {guard.ALLOW_ENV: "127.0.0.2,127.0.0.3"})
    assert talk(srv.port, "127.0.0.2").startswith(b"hello")
    for _ in range(3):  # refused, and the accept that follows waits (blocking) or says EAGAIN (asyncio) as usual
        assert talk(srv.port, "127.0.0.4") == b""
    assert talk(srv.port, "127.0.0.3").startswith(b"hello")
    assert srv.proc.poll() is None
    refusals = [ln for ln in srv.stderr().splitlines() if ln.startswith("agentd guard: refused 127.0.0.4:")]
    assert len(refusals) == 3 and refusals[0].endswith(f"on port {srv.port} (not a host of this instance)"), \
        srv.stderr()


def test_without_the_guard_anyone_is_served(listeners):
    """The hole the guard closes: the same listener without the library serves 127.0.0.4."""
    srv = listeners(None, "blocking", {guard.ALLOW_ENV: "127.0.0.2"})
    assert talk(srv.port, "127.0.0.4").startswith(b"hello")


def test_accept4_keeps_its_flags(listeners, guard_library):
    srv = listeners(guard_library, "accept4", {guard.ALLOW_ENV: "127.0.0.2"})
    assert talk(srv.port, "127.0.0.4") == b""
    assert talk(srv.port, "127.0.0.2") == b"hello 1 1\n"  # SOCK_NONBLOCK and SOCK_CLOEXEC on the served one


def test_an_open_port_is_served_to_anyone(listeners, guard_library):
    port = free_port()
    srv = listeners(guard_library, "blocking", {guard.ALLOW_ENV: "127.0.0.2", guard.OPEN_PORTS_ENV: f"7,{port}"},
                    port=port)
    closed = listeners(guard_library, "blocking", {guard.ALLOW_ENV: "127.0.0.2", guard.OPEN_PORTS_ENV: "7"})
    assert talk(srv.port, "127.0.0.4").startswith(b"hello")
    assert talk(closed.port, "127.0.0.4") == b""


def test_cidr_blocks_and_ipv4_mapped_peers_of_a_dual_stack_listener(listeners, guard_library):
    srv = listeners(guard_library, "blocking", {guard.ALLOW_ENV: "127.0.0.0/31,::1"}, family="inet6", where="::")
    assert talk(srv.port, "127.0.0.1").startswith(b"hello")  # the peer is ::ffff:127.0.0.1
    assert talk(srv.port, "127.0.0.2") == b""
    assert talk(srv.port, "::1", to="::1").startswith(b"hello")
    assert "agentd guard: refused 127.0.0.2:" in srv.stderr()  # normalised, not ::ffff:127.0.0.2
    only_v4 = listeners(guard_library, "blocking", {guard.ALLOW_ENV: "127.0.0.1"}, family="inet6", where="::")
    assert talk(only_v4.port, "::1", to="::1") == b""
    assert "agentd guard: refused [::1]:" in only_v4.stderr()


def test_an_ipv4_mapped_rule_is_the_ipv4_address(listeners, guard_library):
    srv = listeners(guard_library, "blocking", {guard.ALLOW_ENV: "::ffff:127.0.0.2"})
    assert talk(srv.port, "127.0.0.2").startswith(b"hello")
    assert talk(srv.port, "127.0.0.4") == b""


def test_unix_sockets_pass(listeners, guard_library, tmp_path):
    path = str(tmp_path / "s.sock")
    srv = listeners(guard_library, "blocking", {guard.ALLOW_ENV: ""}, family="unix", where=path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(20)
        c.connect(path)
        assert c.recv(100).startswith(b"hello")
    assert srv.stderr() == ""


@pytest.mark.parametrize("policy", [
    {guard.ALLOW_ENV: "127.0.0.2,127.0.0.300"},
    {guard.ALLOW_ENV: "127.0.0.2/33"},
    {guard.ALLOW_ENV: "127.0.0.2/-1"},
    {guard.ALLOW_ENV: "127.0.0.2,"},
    {guard.ALLOW_ENV: "127.0.0.2", guard.OPEN_PORTS_ENV: "70000"},
    {},  # LD_PRELOAD without a policy
])
def test_a_malformed_policy_refuses_everyone(listeners, guard_library, policy):
    srv = listeners(guard_library, "blocking", policy)
    assert talk(srv.port, "127.0.0.2") == b""
    assert talk(srv.port, "127.0.0.1") == b""
    lines = srv.stderr().splitlines()
    assert lines[0].startswith("agentd guard: AGENTD_GUARD_") and "refusing every TCP connection" in lines[0], lines
    assert lines[1].endswith("(no valid policy)"), lines


def test_refusals_are_logged_at_most_twenty_per_window(listeners, guard_library):
    srv = listeners(guard_library, "blocking", {guard.ALLOW_ENV: "127.0.0.2"})
    for _ in range(25):
        assert talk(srv.port, "127.0.0.4") == b""
    assert talk(srv.port, "127.0.0.2").startswith(b"hello")
    time.sleep(0.1)
    assert srv.stderr().count("agentd guard: refused") <= 20 + 5  # a new 10 s window may begin meanwhile


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    from agentd.security import native

    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: no compiler here' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(native, "build_dirs", lambda: [tmp_path / "build"])
    with pytest.raises(guard.Unavailable, match="cc: no compiler here"):
        guard.library()
    assert [p.name for p in (tmp_path / "build").iterdir() if p.name.endswith(".so.failed")]


def test_a_built_library_is_found_without_a_compiler(guard_library, tmp_path, monkeypatch):
    """A host whose compiler went after the build (an image built in stages) still has its guard; one that never
    built it says why."""
    from agentd.security import native

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert guard.library() == guard_library
    monkeypatch.setattr(native, "build_dirs", lambda: [tmp_path / "build"])
    with pytest.raises(guard.Unavailable, match="no C compiler"):
        guard.library()
