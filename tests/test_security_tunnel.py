"""Issue 14, item 2 (building block): the mTLS tunnel that puts a helper such as ggml-rpc-server on 127.0.0.1.

Real sockets on loopback, real certificates from a cluster CA: only a node
certificate of that CA, for an allowed host, gets through the exit; bytes
pass unchanged both ways; the exit's own port speaks only TLS. Every test runs
against both relays: the Python one (in this process) and the C one
(agentd/security/relay.c, run as agentd does: `python -m agentd.security.tunnel`,
which execs it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentd.security import ca as C
from agentd.security import native, relay
from agentd.security.tunnel import client_context, serve_entry, serve_exit, server_context
from agentd.testing.localcluster import free_port


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tunnel")
    authority = C.create_ca()
    for name, role in (("gpu-1", C.ROLE_NODE), ("gpu-2", C.ROLE_NODE), ("rpc-host", C.ROLE_NODE), ("alice", "admin")):
        d = root / name
        ident = C.issue_identity(authority, name, role=role, addresses=["127.0.0.1"])
        C.save_identity(d, "node", ident)
    other = C.create_ca()
    C.save_identity(root / "foreign", "node", C.issue_identity(other, "gpu-1", role=C.ROLE_NODE,
                                                               addresses=["127.0.0.1"]))
    return root


@pytest.fixture(params=["python", "c"])
def impl(request) -> str:
    return request.param


class Half:
    """One tunnel half run as agentd runs it: `python -m agentd.security.tunnel SIDE ...` in a process."""

    def __init__(self, side: str, to: str, tls_dir: Path, allow=(), env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = tls_dir.parent / f"{side}-{self.port}.log"
        argv = [sys.executable, "-m", "agentd.security.tunnel", side, "--listen", f"127.0.0.1:{self.port}",
                "--to", to, "--tls-dir", str(tls_dir)]
        for host in allow:
            argv += ["--allow", host]
        self.argv = argv
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                         env={**os.environ, relay.IMPLEMENTATION_ENV: "c", **(env or {})})
        ready = f"{side} 127.0.0.1:{self.port} -> {to}"
        deadline = time.monotonic() + 60
        while ready not in self.logged():
            assert self.proc.poll() is None, self.logged()
            assert time.monotonic() < deadline, self.logged()
            time.sleep(0.05)

    def logged(self) -> str:
        return self.log.read_text()

    def program(self) -> str:
        return Path(os.readlink(f"/proc/{self.proc.pid}/exe")).name

    def runs_c(self) -> bool:
        """The C relay runs, under the command line agentd launched (the supervisor adopts strays by it)."""
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        return self.program().startswith(relay.NAME) and [a.decode() for a in cmdline] == self.argv

    def close(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(10) == 0, self.logged()


def start_exit(impl: str, dirs: Path, target_port: int, allow=("gpu-1",)):
    if impl == "python":
        return serve_exit("127.0.0.1:0", f"127.0.0.1:{target_port}", server_context(dirs / "rpc-host"), allow)
    half = Half("exit", f"127.0.0.1:{target_port}", dirs / "rpc-host", allow)
    assert half.runs_c(), "AGENTD_TUNNEL=c"
    return half


def start_entry(impl: str, dirs: Path, client: str, exit_port: int):
    if impl == "python":
        return serve_entry("127.0.0.1:0", f"127.0.0.1:{exit_port}", client_context(dirs / client))
    half = Half("entry", f"127.0.0.1:{exit_port}", dirs / client)
    assert half.runs_c(), "AGENTD_TUNNEL=c"
    return half


async def echo_server() -> tuple[asyncio.Server, int]:
    async def handle(r, w):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def through(port: int, payload: bytes) -> bytes:
    """Send `payload`, read as many bytes back (a request/response client, as ggml RPC's: no half-close)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(payload)
        await w.drain()
        async with asyncio.timeout(10):
            return await r.readexactly(len(payload))
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        w.close()


async def tunnel(impl, dirs, client: str, allow=("gpu-1",)):
    helper, helper_port = await echo_server()
    exit_ = start_exit(impl, dirs, helper_port, allow)
    entry = start_entry(impl, dirs, client, exit_.port)
    return [helper, exit_, entry], entry.port, exit_.port


async def close(servers) -> None:
    for s in servers:
        s.close()


async def test_bytes_pass_unchanged_both_ways(impl, dirs):
    servers, port, _ = await tunnel(impl, dirs, "gpu-1")
    try:
        assert await through(port, b"HELLO") == b"HELLO"
        big = os.urandom(8 << 20)
        got = await through(port, big)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    finally:
        await close(servers)


@pytest.mark.parametrize("client", ["gpu-2", "alice", "foreign"])
async def test_only_the_allowed_cluster_host_gets_through(impl, dirs, client, caplog):
    """gpu-2: a cluster node, not the instance's main host; alice: an admin certificate; foreign: another CA."""
    servers, port, _ = await tunnel(impl, dirs, client)
    reasons = {"gpu-2": "host 'gpu-2' is not one this tunnel serves (gpu-1)",
               "alice": "certificate of 'alice' has role 'admin', not 'node'"}
    try:
        assert await through(port, b"HELLO") == b""
        if client in reasons:  # the exit says why, in the same words from either relay
            logged = servers[1].logged() if impl == "c" else caplog.text
            assert f"tunnel refused a connection: {reasons[client]} (from ('127.0.0.1', " in logged
    finally:
        await close(servers)


async def test_any_node_when_no_host_is_named_and_plain_tcp_never(impl, dirs):
    servers, port, exit_port = await tunnel(impl, dirs, "gpu-2", allow=())
    try:
        assert await through(port, b"HELLO") == b"HELLO"
        assert await through(exit_port, b"HELLO") == b"", "the exit speaks only TLS"
    finally:
        await close(servers)


async def test_a_tls_record_without_data_does_not_stall_the_other_direction(impl, dirs):
    """A TLS 1.3 session ticket reaches the entry before any data: it must not block the relay thread.

    (Found by the e2e test: the entry sat in a blocking TLS read of the ticket while llama-server's first
    request waited to be forwarded.) The exit here sends tickets on purpose.
    """
    helper, helper_port = await echo_server()
    ctx = server_context(dirs / "rpc-host")
    ctx.num_tickets = 2
    exit_ = serve_exit("127.0.0.1:0", f"127.0.0.1:{helper_port}", ctx, ("gpu-1",))
    entry = start_entry(impl, dirs, "gpu-1", exit_.port)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", entry.port)
        await asyncio.sleep(0.5)  # the handshake and the tickets are done before the first byte is sent
        for i in range(3):
            w.write(b"ping%d" % i)
            async with asyncio.timeout(5):
                assert await r.readexactly(5) == b"ping%d" % i
        w.close()
    finally:
        await close([helper, exit_, entry])


def _tls_client_sending_data_with_its_finished(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """A TLS client whose first application data leaves in the same send as its handshake's last flight."""
    import socket

    from agentd.security.ca import NODE_SAN

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=NODE_SAN)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        obj.write(payload)
        sock.sendall(outgoing.read())  # Finished and the data together
        got = b""
        while len(got) < len(payload):
            try:
                got += obj.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
        return got


async def test_data_that_arrives_with_the_handshake_is_relayed(impl, dirs):
    """The exit reads the client's Finished and its first request in one recv: the request is not left behind."""
    helper, helper_port = await echo_server()
    exit_ = start_exit(impl, dirs, helper_port)
    try:
        payload = b"first request" * 100
        got = await asyncio.wait_for(asyncio.to_thread(
            _tls_client_sending_data_with_its_finished, exit_.port, client_context(dirs / "gpu-1"), payload), 15)
        assert got == payload
    finally:
        await close([helper, exit_])


async def test_many_small_round_trips_in_turn_then_a_large_one(impl, dirs):
    """ggml RPC's pattern: many small request/response exchanges on one connection, then a tensor upload."""
    servers, port, _ = await tunnel(impl, dirs, "gpu-1")
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for i in range(300):
            msg = b"%d:" % i + b"x" * (i % 97)
            w.write(msg)
            async with asyncio.timeout(5):
                assert await r.readexactly(len(msg)) == msg
        big = os.urandom(3 << 20)
        w.write(big)
        async with asyncio.timeout(30):
            assert await r.readexactly(len(big)) == big
        w.close()
    finally:
        await close(servers)


async def test_a_tls_client_without_a_certificate_is_refused(impl, dirs):
    """TLS that trusts the cluster CA but presents no certificate of its own gets nothing from the exit."""
    helper, helper_port = await echo_server()
    exit_ = start_exit(impl, dirs, helper_port, allow=())
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(dirs / "rpc-host" / C.CA_CERT)

    def attempt() -> bytes:
        try:
            return _tls_client_sending_data_with_its_finished(exit_.port, anonymous, b"HELLO")
        except (ssl.SSLError, OSError):  # TLS 1.3: the handshake completes, then the exit's alert or its close
            return b""

    try:
        assert await asyncio.wait_for(asyncio.to_thread(attempt), 15) == b""
    finally:
        await close([helper, exit_])


@pytest.fixture
def no_compiler(tmp_path, monkeypatch) -> Path:
    """CC is a compiler that fails (and counts its calls); relay.py builds into tmp_path/build."""
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\necho run >> {tmp_path / 'calls'}\necho 'cc: no compiler here' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(native, "build_dirs", lambda: [tmp_path / "build"])
    return tmp_path


def test_a_failed_build_says_why_and_only_the_build_command_tries_again(no_compiler):
    for _ in range(2):
        with pytest.raises(relay.Unavailable, match="cc: no compiler here"):
            relay.binary()
    assert (no_compiler / "calls").read_text() == "run\n"
    with pytest.raises(relay.Unavailable, match="cc: no compiler here"):
        relay.binary(retry=True)  # python -m agentd.security.relay: scripts/bootstrap run again tries again
    assert (no_compiler / "calls").read_text() == "run\nrun\n"
    assert not [p for p in (no_compiler / "build").iterdir() if p.name.startswith(relay.NAME) and
                not p.name.endswith(".failed")]


async def test_without_the_c_relay_the_python_one_serves_and_the_log_says_why(dirs, no_compiler):
    """As agentd runs a tunnel on a host with no C compiler: the same command line, relayed in Python."""
    helper, helper_port = await echo_server()
    build = no_compiler / "build"
    patch = (f"import sys; from pathlib import Path; import agentd.security.native as n; "
             f"n.build_dirs = lambda: [Path({str(build)!r})]; from agentd.security.tunnel import main; "
             f"sys.exit(main(sys.argv[1:]))")
    port = free_port()
    log = no_compiler / "exit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", patch, "exit", "--listen", f"127.0.0.1:{port}", "--to",
                                 f"127.0.0.1:{helper_port}", "--tls-dir", str(dirs / "rpc-host")],
                                stdout=out, stderr=out, env={**os.environ})
    entry = serve_entry("127.0.0.1:0", f"127.0.0.1:{port}", client_context(dirs / "gpu-1"))
    try:
        deadline = time.monotonic() + 60
        while "exit 127.0.0.1" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        assert await through(entry.port, b"HELLO") == b"HELLO"
        assert "the C relay is unavailable, relaying in Python: " in log.read_text()
        assert "cc: no compiler here" in log.read_text()
        assert Path(os.readlink(f"/proc/{proc.pid}/exe")).name.startswith("python")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        await close([helper, entry])


def test_the_relay_is_chosen_by_agentd_tunnel(dirs):
    """AGENTD_TUNNEL=python keeps the Python relay; a value that is neither c nor python is refused (exit 2)."""
    half = Half("entry", "127.0.0.1:9", dirs / "gpu-1", env={relay.IMPLEMENTATION_ENV: "python"})
    try:
        assert half.program().startswith("python")
    finally:
        half.close()
    bad = subprocess.run([sys.executable, "-m", "agentd.security.tunnel", "entry", "--listen", "127.0.0.1:0",
                          "--to", "127.0.0.1:9", "--tls-dir", str(dirs / "gpu-1")], capture_output=True, text=True,
                         env={**os.environ, relay.IMPLEMENTATION_ENV: "rust"}, timeout=60)
    assert bad.returncode == 2 and "AGENTD_TUNNEL='rust'" in bad.stderr


@pytest.mark.parametrize("choice", ["python", "c"])
def test_a_half_that_cannot_start_exits_1_and_says_why(dirs, tmp_path, choice):
    """The same contract from either relay: missing certificate files, or a port already taken."""
    env = {**os.environ, relay.IMPLEMENTATION_ENV: choice}
    tunnel = [sys.executable, "-m", "agentd.security.tunnel"]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        for tls_dir, listen in ((tmp_path / "none", f"127.0.0.1:{free_port()}"), (dirs / "gpu-1", f"127.0.0.1:{busy}")):
            done = subprocess.run([*tunnel, "entry", "--listen", listen, "--to", "127.0.0.1:9", "--tls-dir",
                                   str(tls_dir)], capture_output=True, text=True, env=env, timeout=60)
            assert done.returncode == 1 and done.stderr.startswith("tunnel: "), done.stderr
    done = subprocess.run([*tunnel, "entry", "--listen", "127.0.0.1:1"], capture_output=True, env=env, timeout=60)
    assert done.returncode == 2, "bad arguments: argparse's exit code, before any relay runs"


async def test_the_c_relay_keeps_no_descriptor_of_an_ended_connection(dirs):
    """Served, refused (plain TCP to the exit, another node's certificate) and unreachable connections alike."""
    helper, helper_port = await echo_server()
    exit_ = start_exit("c", dirs, helper_port)
    entry, stranger = start_entry("c", dirs, "gpu-1", exit_.port), start_entry("c", dirs, "gpu-2", exit_.port)
    nowhere = start_entry("c", dirs, "gpu-1", free_port())  # nothing listens there

    def descriptors() -> list[int]:
        return [len(os.listdir(f"/proc/{h.proc.pid}/fd")) for h in (exit_, entry, stranger, nowhere)]

    before = descriptors()
    try:
        for _ in range(10):
            assert await through(entry.port, b"HELLO") == b"HELLO"
            assert await through(exit_.port, b"HELLO") == b""
            assert await through(stranger.port, b"HELLO") == b""
            assert await through(nowhere.port, b"HELLO") == b""
        deadline = time.monotonic() + 15
        while descriptors() != before:
            assert time.monotonic() < deadline, (before, descriptors())
            await asyncio.sleep(0.1)
    finally:
        await close([helper, exit_, entry, stranger, nowhere])


async def test_when_the_helper_closes_the_client_sees_the_end(impl, dirs):
    """The rpc-server dies or hangs up: llama-server's connection through both halves ends too, none hangs."""
    async def answer_once_then_close(r, w):
        w.write(await r.read(65536))
        await w.drain()
        w.close()

    helper = await asyncio.start_server(answer_once_then_close, "127.0.0.1", 0)
    exit_ = start_exit(impl, dirs, helper.sockets[0].getsockname()[1])
    entry = start_entry(impl, dirs, "gpu-1", exit_.port)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", entry.port)
        w.write(b"ping")
        async with asyncio.timeout(15):
            assert await r.readexactly(4) == b"ping"
            assert await r.read() == b"", "end of stream after the answer"
        w.close()
    finally:
        await close([helper, exit_, entry])


async def test_the_c_relay_stops_on_sigterm_with_connections_open(dirs):
    """The supervisor stops a tunnel with SIGTERM: it exits 0 at once, even while it relays."""
    helper, helper_port = await echo_server()
    exit_ = start_exit("c", dirs, helper_port)
    entry = start_entry("c", dirs, "gpu-1", exit_.port)
    streams = [await asyncio.open_connection("127.0.0.1", entry.port) for _ in range(3)]
    try:
        for r, w in streams:
            w.write(b"ping")
            async with asyncio.timeout(10):
                assert await r.readexactly(4) == b"ping"
        for half in (entry, exit_):
            half.close()  # SIGTERM; exit status 0 within 10 s
        for r, _ in streams:
            async with asyncio.timeout(10):
                assert await r.read() == b""
    finally:
        for _, w in streams:
            w.close()
        helper.close()
