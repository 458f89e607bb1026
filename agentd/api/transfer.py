"""The byte stream of a model copy: raw TLS beside gRPC, for throughput (docs/models.md, "Copies between hosts").

`Models.Fetch` streams a file as gRPC messages; in Python that costs about 2 CPU seconds per GiB on each side
in the gRPC runtime alone, and every message passes through the event loop. The copy's bytes therefore take a
plain stream instead, negotiated over gRPC so that nothing about *what* is sent changes:

1. the fetching agent calls `Models.Open` (node role, as `Fetch`) with the model's digest, a file name from the
   holder's manifest and an offset; the holder answers with a one-time ticket (random, 30 s, for that caller)
   and the port of its transfer listener;
2. the fetching agent connects to that port on the holder's address: mutual TLS with the node certificates
   (the holder requires a certificate of role `node` whose name is the ticket's caller; the caller checks
   the holder's certificate against the cluster CA), or plain TCP in an insecure cluster;
3. it sends the ticket and a newline; the holder answers `OK\\n` and the file's bytes from the offset to its
   end, or `ERR <reason>\\n`.

Both sides run in threads with blocking sockets (no event loop involved): the holder reads the file in pieces
into one buffer and sends each; the fetching side receives pieces into a few buffers and writes each in the
receiving thread, while it is still in the core's cache, and a second thread hashes them in order.
A holder without `Open` (an older agent) is fetched from over `Models.Fetch` as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agentd.fetch")

# The fetching side takes 256 KiB at a time and writes each piece in the receiving thread, while the piece is
# still in that core's cache; a second thread hashes it (_Hasher). Two 4 MiB buffers, one filling while another
# thread hashed *and* wrote the other, sent every byte through memory twice more: 3.7-4.0 CPU s/GiB against 1.6
# (docs/models.md).
PIECE = 256 * 1024
PIECES = 8  # in flight between the receiving and the hashing thread
# Files are written 16 KiB at a time: the page cache took 2 GiB of 16 KiB writes for 0.55-0.69 s of system
# time, of 32-256 KiB writes for 1.1-2.7 s and of 4 KiB writes for 1.7-2.0 s (`dd` from /dev/zero, ext4, this
# VM, alternating, 3 s apart). A bare Receive of 2 GiB: 2.1-2.6 CPU s/GiB against 2.5-3.3 with 256 KiB writes.
WRITE = 16 * 1024
# The holder reads the file in small pieces: each piece is still in the core's cache when it is encrypted. With
# 4 MiB pieces the copy out of the page cache and the encryption each went to L3/memory: 1.6-1.9 CPU s/GiB
# serving against 1.2-1.3 with 64 KiB (benchmarks/model_fetch.py; openssl s_server reads 16 KiB at a time).
SEND_PIECE = 64 * 1024
TICKET_TTL = 30.0
IO_TIMEOUT = 30.0  # a holder or a fetcher that sends nothing for this long is gone


@dataclass(frozen=True)
class Ticket:
    caller: str  # the node name the holder expects on the connection's certificate ("" when insecure)
    path: Path
    offset: int
    expires: float


class TransferServer:
    """The holder's listener: each connection redeems one ticket and receives one file from its offset."""

    def __init__(self, host: str, port: int, context: Callable[[], ssl.SSLContext | None],
                 peer_refusal: Callable[[ssl.SSLSocket, str], str] = lambda s, caller: "",
                 clock: Callable[[], float] = time.monotonic):
        self._context = context  # built per connection: renewed certificates are picked up
        self._refusal = peer_refusal
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}
        self._lock = threading.Lock()
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"agentd-transfer-{self.port}", daemon=True)
        self._thread.start()

    def issue(self, caller: str, path: Path, offset: int) -> str:
        now = self._clock()
        ticket = secrets.token_urlsafe(24)
        with self._lock:
            for k in [k for k, t in self._tickets.items() if t.expires < now]:
                del self._tickets[k]
            self._tickets[ticket] = Ticket(caller=caller, path=path, offset=offset, expires=now + TICKET_TTL)
        return ticket

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="agentd-transfer-send", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        peer = "?"
        try:
            peer = str(conn.getpeername()[0])
            conn.settimeout(IO_TIMEOUT)
            ctx = self._context()
            stream: socket.socket = ctx.wrap_socket(conn, server_side=True) if ctx is not None else conn
            with stream:
                line = _read_line(stream)
                with self._lock:
                    ticket = self._tickets.pop(line, None)
                if ticket is None or ticket.expires < self._clock():
                    return _refuse(stream, "unknown or expired ticket")
                if isinstance(stream, ssl.SSLSocket):
                    why = self._refusal(stream, ticket.caller)
                    if why:
                        log.warning(f"model transfer refused: {why}", extra={"peer": peer})
                        return _refuse(stream, why)
                self._send_file(stream, ticket)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info(f"model transfer to {peer} ended: {exc}")
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    @staticmethod
    def _send_file(stream: socket.socket, ticket: Ticket) -> None:
        try:
            f = open(ticket.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            return _refuse(stream, f"cannot read {ticket.path.name}: {exc.strerror or exc}")
        with f:
            stream.sendall(b"OK\n")
            if not isinstance(stream, ssl.SSLSocket):  # plain TCP: the kernel copies the file (sendfile)
                stream.sendfile(f, offset=ticket.offset)
                return
            f.seek(ticket.offset)
            buf = bytearray(SEND_PIECE)
            view = memoryview(buf)
            while n := f.readinto(buf):
                stream.sendall(view[:n])


def _refuse(stream: socket.socket, why: str) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        stream.sendall(b"ERR " + why.encode()[:400].replace(b"\n", b" ") + b"\n")


def _read_line(stream: socket.socket, limit: int = 512) -> str:
    out = bytearray()
    while not out.endswith(b"\n"):
        b = stream.recv(1)
        if not b:
            raise ValueError("connection closed before the line ended")
        out += b
        if len(out) > limit:
            raise ValueError("line too long")
    return out[:-1].decode("ascii", "replace")


class TransferRefused(Exception):
    """The holder said no (ERR): the reason is its sentence."""


class TransferBroken(Exception):
    """The connection failed or broke off (the bytes received so far are kept for a resume)."""


class Receive:
    """One file's bytes from a holder's transfer listener, appended to `out` and hashed into `sha` as they come.

    `run` blocks (a worker thread's job); `cancel` may be called from any thread and ends it within a recv.
    `on_bytes(n)` is called from the thread after each piece is written (progress, rate limit).
    """

    def __init__(self, address: tuple[str, int], ticket: str, context: ssl.SSLContext | None, server_hostname: str,
                 out, sha: hashlib._Hash, on_bytes: Callable[[int], None]):
        self.address = address
        self.ticket = ticket
        self.context = context
        self.server_hostname = server_hostname
        self.out = out
        self.sha = sha
        self.on_bytes = on_bytes
        self._raw: socket.socket | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()
        raw = self._raw
        if raw is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(raw, socket.SHUT_RDWR)

    def pause(self, seconds: float) -> None:
        """Sleep in the receiving thread (the bandwidth limit), woken early by `cancel`."""
        self._cancelled.wait(seconds)

    def run(self, want: int) -> int:
        """Receive up to `want` bytes; the number received (fewer when the holder closed early).

        Network trouble raises TransferBroken, a refusal TransferRefused; an OSError is the local disk's.
        """
        try:
            raw = socket.create_connection(self.address, timeout=IO_TIMEOUT)
        except OSError as exc:
            raise TransferBroken(f"cannot connect to {self.address[0]}:{self.address[1]}: "
                                 f"{exc.strerror or exc}") from None
        self._raw = raw
        with contextlib.ExitStack() as stack:
            stack.callback(raw.close)
            try:
                if self._cancelled.is_set():
                    raise TransferBroken("cancelled")
                stream = (self.context.wrap_socket(raw, server_hostname=self.server_hostname)
                          if self.context is not None else raw)
                stack.enter_context(stream)
                stream.sendall(self.ticket.encode() + b"\n")
                status = _read_line(stream)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise TransferBroken(f"transfer connection failed: {exc}") from None
            if status != "OK":
                raise TransferRefused(status.removeprefix("ERR ").strip() or "refused")
            got = self._pull(stream, want)
            if got < want:
                raise TransferBroken(f"the holder closed the stream after {got} of {want} bytes")
            return got

    def _pull(self, stream: socket.socket, want: int) -> int:
        hashing = _Hasher(self.sha)
        got = 0
        try:
            while got < want and not self._cancelled.is_set():
                buf = hashing.free_piece()
                view = memoryview(buf)
                room = min(PIECE, want - got)
                n = 0
                broken: Exception | None = None
                try:
                    while n < room:
                        k = stream.recv_into(view[n:room])
                        if not k:
                            break
                        n += k
                except (OSError, ssl.SSLError) as exc:
                    broken = exc
                # also what came before a break: it is written and hashed like the rest, for a resume
                write_all(self.out, view[:n])
                hashing.add(buf, n)
                if n:
                    got += n
                    self.on_bytes(n)
                if broken is not None:
                    raise TransferBroken(f"the copy broke off: {broken}") from None
                if n < room:
                    break  # the holder closed early: what came is kept for a resume
        finally:
            hashing.finish()  # every byte written is hashed before `sha` is read
        if self._cancelled.is_set():
            raise TransferBroken("cancelled")
        return got


class _Hasher:
    """Hashes the pieces a receiving thread wrote, in order, in a thread of its own.

    sha256 is a third of the fetching side's work (about 0.55 CPU s/GiB here, against 1.0-2.4 for the
    receive, decryption and writes): on a host with a core to spare the copy runs at the receive's speed.
    The receiving thread writes each piece while it is in its core's cache and passes the buffer on; a
    buffer comes back once hashed, so at most PIECES pieces are in flight.
    """

    def __init__(self, sha: hashlib._Hash):
        self._sha = sha
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        for _ in range(PIECES):
            self._free.put(bytearray(PIECE))
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="agentd-fetch-hash", daemon=True)
        self._thread.start()

    def free_piece(self) -> bytearray:
        return self._free.get()

    def add(self, buf: bytearray, n: int) -> None:
        self._full.put((buf, n))

    def finish(self) -> None:
        self._full.put(None)
        self._thread.join()
        if self._failed is not None:
            raise self._failed

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            if self._failed is None:
                try:
                    self._sha.update(memoryview(buf)[:n])
                except BaseException as exc:  # raised by finish(); the buffers keep coming back
                    self._failed = exc
            self._free.put(buf)


def write_all(out, data: bytes | memoryview) -> None:
    """All of `data` to the raw (unbuffered) file `out`, WRITE bytes at a time at most."""
    view = memoryview(data)
    fd = out.fileno()
    while view:
        view = view[os.write(fd, view[:WRITE]):]
