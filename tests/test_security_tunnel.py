"""Issue 14, item 2 (building block): the mTLS tunnel that puts a helper such as ggml-rpc-server on 127.0.0.1.

Real sockets on loopback, real certificates from a cluster CA: only a node
certificate of that CA, for an allowed host, gets through the exit; bytes
pass unchanged both ways; the exit's own port speaks only TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl

import pytest

from agentd.security import ca as C
from agentd.security.tunnel import client_context, serve_entry, serve_exit, server_context


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


async def tunnel(dirs, client: str, allow=("gpu-1",)):
    helper, helper_port = await echo_server()
    exit_ = serve_exit("127.0.0.1:0", f"127.0.0.1:{helper_port}", server_context(dirs / "rpc-host"), allow)
    entry = serve_entry("127.0.0.1:0", f"127.0.0.1:{exit_.port}", client_context(dirs / client))
    return [helper, exit_, entry], entry.port, exit_.port


async def close(servers) -> None:
    for s in servers:
        s.close()


async def test_bytes_pass_unchanged_both_ways(dirs):
    servers, port, _ = await tunnel(dirs, "gpu-1")
    try:
        assert await through(port, b"HELLO") == b"HELLO"
        big = os.urandom(8 << 20)
        got = await through(port, big)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    finally:
        await close(servers)


@pytest.mark.parametrize("client", ["gpu-2", "alice", "foreign"])
async def test_only_the_allowed_cluster_host_gets_through(dirs, client):
    """gpu-2: a cluster node, not the instance's main host; alice: an admin certificate; foreign: another CA."""
    servers, port, _ = await tunnel(dirs, client)
    try:
        assert await through(port, b"HELLO") == b""
    finally:
        await close(servers)


async def test_any_node_when_no_host_is_named_and_plain_tcp_never(dirs):
    servers, port, exit_port = await tunnel(dirs, "gpu-2", allow=())
    try:
        assert await through(port, b"HELLO") == b"HELLO"
        assert await through(exit_port, b"HELLO") == b"", "the exit speaks only TLS"
    finally:
        await close(servers)


async def test_a_tls_record_without_data_does_not_stall_the_other_direction(dirs):
    """A TLS 1.3 session ticket reaches the entry before any data: it must not block the relay thread.

    (Found by the e2e test: the entry sat in a blocking TLS read of the ticket while llama-server's first
    request waited to be forwarded.) The exit here sends tickets on purpose.
    """
    helper, helper_port = await echo_server()
    ctx = server_context(dirs / "rpc-host")
    ctx.num_tickets = 2
    exit_ = serve_exit("127.0.0.1:0", f"127.0.0.1:{helper_port}", ctx, ("gpu-1",))
    entry = serve_entry("127.0.0.1:0", f"127.0.0.1:{exit_.port}", client_context(dirs / "gpu-1"))
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


async def test_data_that_arrives_with_the_handshake_is_relayed(dirs):
    """The exit reads the client's Finished and its first request in one recv: the request is not left behind."""
    helper, helper_port = await echo_server()
    exit_ = serve_exit("127.0.0.1:0", f"127.0.0.1:{helper_port}", server_context(dirs / "rpc-host"), ("gpu-1",))
    try:
        payload = b"first request" * 100
        got = await asyncio.wait_for(asyncio.to_thread(
            _tls_client_sending_data_with_its_finished, exit_.port, client_context(dirs / "gpu-1"), payload), 15)
        assert got == payload
    finally:
        await close([helper, exit_])


async def test_many_small_round_trips_in_turn_then_a_large_one(dirs):
    """ggml RPC's pattern: many small request/response exchanges on one connection, then a tensor upload."""
    servers, port, _ = await tunnel(dirs, "gpu-1")
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
