"""A mutual-TLS TCP tunnel between two cluster hosts, for helpers that have no authentication of their own.

ggml's RPC server (`ggml-rpc-server`) listens with no authentication, serves
one client at a time, and lets its client allocate buffers and write tensors
(issue 14, item 2). The design (docs/security.md, "Helpers behind a
tunnel"): the helper listens on 127.0.0.1 only, and the traffic between the
main server's host and the helper's host crosses an mTLS tunnel made of two
halves, each a small process of the same instance:

- the **exit** on the helper's host listens on the host's internal address,
  requires a client certificate from the cluster CA with role `node` and,
  when `allow` names hosts, one of those node names (the host that runs the
  instance's main server), and forwards to the helper on 127.0.0.1;
- the **entry** on the main server's host listens on 127.0.0.1 and forwards
  each connection over TLS to the exit, verifying the exit's certificate
  against the cluster CA (by the shared node name, as every agentd client).

Both use the host's node certificate (`tls_dir/node.crt`, `node.key`). Bytes
are copied as they come, with TCP_NODELAY on every socket: the RPC protocol
is many small request/response round trips per token. A half-close crosses
to plain TCP but not to TLS (asyncio's TLS cannot send one): there it closes
the connection, which request/response protocols such as ggml RPC never
notice. benchmarks/security.py --rpc measures the cost.

Run one half: `python -m agentd.security.tunnel exit --listen 10.0.0.3:41000
--to 127.0.0.1:41001 --tls-dir /var/lib/agentd/tls --allow gpu-1`, or
`... entry --listen 127.0.0.1:41002 --to 10.0.0.3:41000 --tls-dir ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from agentd.security.ca import CA_CERT, NODE_SAN, ROLE_NODE, cert_name, cert_role

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


def server_context(tls_dir: Path, name: str = "node") -> ssl.SSLContext:
    """TLS server side that requires a client certificate from the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
    ctx.load_verify_locations(tls_dir / CA_CERT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls_dir: Path, name: str = "node") -> ssl.SSLContext:
    """TLS client side: presents this host's certificate, trusts only the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
    ctx.load_verify_locations(tls_dir / CA_CERT)
    ctx.check_hostname = True
    return ctx


def peer_refusal(ssl_object: ssl.SSLObject | None, allow: frozenset[str]) -> str:
    """Why the verified peer may not use this exit ("" when it may): role node, and one of `allow` if given."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return "no client certificate"
    cert = x509.load_der_x509_certificate(der)
    if cert_role(cert) != ROLE_NODE:
        return f"certificate of {cert_name(cert)!r} has role {cert_role(cert)!r}, not {ROLE_NODE!r}"
    if allow and cert_name(cert) not in allow:
        return f"host {cert_name(cert)!r} is not one this tunnel serves ({', '.join(sorted(allow))})"
    return ""


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Relay(asyncio.Protocol):
    """One side of a spliced connection: what it receives is written to its peer's transport.

    Transports and callbacks, not streams: no task wakes per chunk, which is most of a small message's cost.
    Flow control goes across: when the peer cannot take more, this side stops reading. A half-close is
    passed on where the other side can write one (plain TCP); over TLS, which cannot, it closes both.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def attach(self, peer: _Relay) -> None:
        self.peer, peer.peer = peer, self
        for data in self.pending:
            peer.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()
        if self.eof:
            self._pass_eof()
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            return self._pass_eof()
        return True

    def _pass_eof(self) -> bool:
        t = self.peer.transport if self.peer is not None else None
        if t is not None and t.can_write_eof():
            t.write_eof()
            return True  # keep our side open for the answer
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def close(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


class _Accepted(_Relay):
    """The side a client connects to: reading waits until the far side is connected."""

    def __init__(self, connect, check=None) -> None:
        super().__init__()
        self._connect = connect
        self._check = check

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._check is not None and (why := self._check(transport)):
            log.warning("tunnel refused a connection",
                        extra={"peer": str(transport.get_extra_info("peername")), "reason": why})
            transport.close()
            return
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            _, far = await asyncio.wait_for(self._connect(_Relay), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.warning("tunnel could not reach its other end", extra={"error": str(exc)})
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None:  # the client left meanwhile
            far.transport.close()
            return
        self.attach(far)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def serve_exit(listen: str, target: str, ctx: ssl.SSLContext, allow: Iterable[str] = ()) -> asyncio.Server:
    """TLS on `listen` -> plain TCP to `target` (the helper on 127.0.0.1), for allowed cluster hosts only."""
    allowed = frozenset(allow)
    thost, tport = _split(target)
    loop = asyncio.get_running_loop()

    def check(transport: asyncio.BaseTransport) -> str:
        return peer_refusal(transport.get_extra_info("ssl_object"), allowed)

    def connect(factory):
        return loop.create_connection(factory, thost, tport)

    host, port = _split(listen)
    return await loop.create_server(lambda: _Accepted(connect, check), host, port, ssl=ctx,
                                    ssl_handshake_timeout=CONNECT_TIMEOUT)


async def serve_entry(listen: str, remote: str, ctx: ssl.SSLContext) -> asyncio.Server:
    """Plain TCP on `listen` (127.0.0.1) -> TLS to the exit at `remote`, verified against the cluster CA."""
    rhost, rport = _split(remote)
    loop = asyncio.get_running_loop()

    def connect(factory):
        return loop.create_connection(factory, rhost, rport, ssl=ctx, server_hostname=NODE_SAN,
                                      ssl_handshake_timeout=CONNECT_TIMEOUT)

    host, port = _split(listen)
    return await loop.create_server(lambda: _Accepted(connect), host, port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agentd.security.tunnel", description=__doc__.split("\n")[0])
    ap.add_argument("side", choices=("exit", "entry"))
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--to", required=True, metavar="HOST:PORT")
    ap.add_argument("--tls-dir", required=True, type=Path, help="holds ca.crt, node.crt and node.key")
    ap.add_argument("--allow", action="append", default=[], metavar="NODE",
                    help="exit: a node name whose certificate may connect (repeatable; default: any node)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tunnel %(levelname)s %(message)s")

    async def run() -> None:
        if args.side == "exit":
            server = await serve_exit(args.listen, args.to, server_context(args.tls_dir), args.allow)
        else:
            server = await serve_entry(args.listen, args.to, client_context(args.tls_dir))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("%s %s -> %s", args.side, args.listen, args.to)
        async with server:
            await stop.wait()

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"tunnel: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
