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
is many small request/response round trips per token (about 19 messages per
generated token), so each connection is relayed by a thread of its own that
polls both sockets and reads into reused buffers (see `_relay`).
benchmarks/security.py --rpc measures the cost.

`main` (how agentd runs a half) execs the same relay written in C
(agentd/security/relay.c, built by agentd/security/relay.py) where it builds:
same arguments, checks, log lines and exit codes, without a Python wake-up
per message. AGENTD_TUNNEL=python keeps this module's relay; =c requires C.

Run one half: `python -m agentd.security.tunnel exit --listen 10.0.0.3:41000
--to 127.0.0.1:41001 --tls-dir /var/lib/agentd/tls --allow gpu-1`, or
`... entry --listen 127.0.0.1:41002 --to 10.0.0.3:41000 --tls-dir ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509

from agentd.security import relay
from agentd.security.ca import CA_CERT, NODE_SAN, ROLE_NODE, cert_name, cert_role

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
RECV = 256 * 1024


def server_context(tls_dir: Path, name: str = "node") -> ssl.SSLContext:
    """TLS server side that requires a client certificate from the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
    ctx.load_verify_locations(tls_dir / CA_CERT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no resumption wanted; and no post-handshake records to read past
    return ctx


def client_context(tls_dir: Path, name: str = "node") -> ssl.SSLContext:
    """TLS client side: presents this host's certificate, trusts only the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
    ctx.load_verify_locations(tls_dir / CA_CERT)
    ctx.check_hostname = True
    return ctx


def peer_refusal(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, allow: frozenset[str]) -> str:
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


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Tls:
    """One TLS connection as an `ssl.SSLObject` over memory BIOs on a blocking socket.

    Used by one thread only (OpenSSL's rule). Memory BIOs let the relay read and write the raw socket itself,
    into one reused buffer: `SSLSocket.recv(n)` allocates an n-byte object per call, which at 256 KiB meant an
    mmap/munmap pair and page faults per message (measured: the larger part of the relay's own CPU per round
    trip besides the system calls).
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=None if server_side else NODE_SAN)

    def handshake(self) -> None:
        """Complete the handshake (certificate checks included) within the socket's timeout."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = self.sock.recv(RECV)
                if not data:
                    raise ConnectionError("connection closed during the TLS handshake") from None
                self.incoming.write(data)
        self.flush()

    def flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())


def _relay(tls: _Tls, plain: socket.socket) -> None:
    """Copy bytes between the TLS connection and the plain socket until either side closes, then close both.

    One thread per connection waits in `poll` on both raw sockets, so each TLS object is used by one thread
    (OpenSSL's rule) and a TLS record that carries no application data (a key update) never blocks the other
    direction. A message costs poll, one `recv_into` into a reused buffer, the TLS step in C and one send
    (benchmarks/security.py --rpc). A half-close ends the connection: request/response protocols such as
    ggml RPC never send one.
    """
    buf, clear = bytearray(RECV), bytearray(RECV)
    view, clear_view = memoryview(buf), memoryview(clear)
    sock, incoming, outgoing = tls.sock, tls.incoming, tls.outgoing
    obj = tls.obj  # obj.read(n, clear) decrypts into `clear`: no object per call
    poller = select.poll()
    tls_fd, plain_fd = sock.fileno(), plain.fileno()
    poller.register(tls_fd, select.POLLIN)
    poller.register(plain_fd, select.POLLIN)
    try:
        while True:
            while incoming.pending or obj.pending():  # decrypt what has come (also what came with the handshake)
                try:
                    n = obj.read(RECV, clear)
                except ssl.SSLWantReadError:
                    break  # half a record: wait for the rest
                if not n:
                    return
                plain.sendall(clear_view[:n])
            if outgoing.pending:  # TLS's own answers (a key update)
                sock.sendall(outgoing.read())
            for fd, _ in poller.poll():
                if fd == plain_fd:
                    n = plain.recv_into(buf)
                    if not n:
                        return
                    obj.write(view[:n])
                    sock.sendall(outgoing.read())
                else:
                    n = sock.recv_into(buf)
                    if not n:
                        return
                    incoming.write(view[:n])
    except (OSError, ssl.SSLError, ValueError):
        return
    finally:
        for s in (sock, plain):
            with contextlib.suppress(OSError):
                s.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Listener:
    """A listening socket whose connections are each handled by `handle(conn)` in a thread of their own."""

    def __init__(self, listen: str, handle: Callable[[socket.socket], None]):
        host, port = _split(listen)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self._handle = handle
        self._thread = threading.Thread(target=self._accept, name=f"tunnel-{self.port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            _nodelay(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def serve_exit(listen: str, target: str, ctx: ssl.SSLContext, allow: Iterable[str] = ()) -> Listener:
    """TLS on `listen` -> plain TCP to `target` (the helper on 127.0.0.1), for allowed cluster hosts only."""
    allowed = frozenset(allow)
    thost, tport = _split(target)

    def handle(conn: socket.socket) -> None:
        peer = conn.getpeername()
        tls = _Tls(conn, ctx, server_side=True)
        try:
            conn.settimeout(CONNECT_TIMEOUT)
            tls.handshake()
        except (OSError, ssl.SSLError) as exc:
            log.warning("tunnel refused a connection: %s (from %s)", exc, peer)
            conn.close()
            return
        why = peer_refusal(tls.obj, allowed)
        if why:
            log.warning("tunnel refused a connection: %s (from %s)", why, peer)
            conn.close()
            return
        try:
            upstream = socket.create_connection((thost, tport), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            log.warning("tunnel could not reach %s: %s", target, exc)
            conn.close()
            return
        _nodelay(upstream)
        conn.settimeout(None)
        upstream.settimeout(None)
        _relay(tls, upstream)

    return Listener(listen, handle)


def serve_entry(listen: str, remote: str, ctx: ssl.SSLContext) -> Listener:
    """Plain TCP on `listen` (127.0.0.1) -> TLS to the exit at `remote`, verified against the cluster CA."""
    rhost, rport = _split(remote)

    def handle(conn: socket.socket) -> None:
        raw = None
        try:
            raw = socket.create_connection((rhost, rport), timeout=CONNECT_TIMEOUT)
            _nodelay(raw)
            tls = _Tls(raw, ctx, server_side=False)
            tls.handshake()
        except (OSError, ssl.SSLError) as exc:
            log.warning("tunnel could not reach its exit %s: %s", remote, exc)
            conn.close()
            if raw is not None:
                raw.close()
            return
        raw.settimeout(None)
        _relay(tls, conn)

    return Listener(listen, handle)


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

    choice = os.environ.get(relay.IMPLEMENTATION_ENV, "")
    if choice not in ("", "c", "python"):
        print(f"tunnel: {relay.IMPLEMENTATION_ENV}={choice!r}: use 'c', 'python' or leave it unset", file=sys.stderr)
        return 2
    if choice != "python":
        try:
            binary = relay.binary()
        except (relay.Unavailable, OSError) as exc:
            if choice == "c":
                print(f"tunnel: the C relay is unavailable: {exc}", file=sys.stderr)
                return 1
            log.warning("the C relay is unavailable, relaying in Python: %s", exc)
        else:
            # the command line the plugin launches, spelt as it spells it (relay.c skips "-m agentd.security.tunnel"):
            # the supervisor adopts a stray tunnel only by an exact match
            argv = [sys.executable, "-m", "agentd.security.tunnel", args.side, "--listen", args.listen, "--to", args.to,
                    "--tls-dir", str(args.tls_dir)]
            for host in args.allow:
                argv += ["--allow", host]
            sys.stderr.flush()
            os.execv(binary, argv)  # same pid, command line, exit codes and log lines; never returns

    try:
        if args.side == "exit":
            listener = serve_exit(args.listen, args.to, server_context(args.tls_dir), args.allow)
        else:
            listener = serve_entry(args.listen, args.to, client_context(args.tls_dir))
    except OSError as exc:
        print(f"tunnel: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("%s %s -> %s", args.side, args.listen, args.to)
    while not stop.wait(3600):
        pass
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
