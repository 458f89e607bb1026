"""Ports in agentd's ranges that someone else holds, for the host's report.

On a shared machine a leftover llama-server, a developer's notebook or another
service may listen on a port the coordinator would hand to a model server. The
host reports such listeners (in the inventory refresher's worker thread: the
socket table is read from /proc) and the coordinator skips them; a clash found
only at spawn time is repaired by the coordinator with new ports (docs/runtime.md).

Finding the process behind a socket means reading the fd links of every
process (psutil.net_connections): a voter of a fleet of 2,048 hosts holds
thousands of sockets, and that scan was half its CPU (issue 16). The listeners
in the ranges come from the kernel (netlink sock_diag, listeners only; else
/proc/net/tcp{,6}) as (port, socket inode), and only a listener not seen at
the last refresh has its owner looked up, newest process first.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psutil

from agentd.logs import fields

log = logging.getLogger("agentd.inventory")


PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column

# The listeners of the last call and their owners: ((port, inode) set, (((port, inode), pid or None), ...)).
# One refresher thread calls this; the lock is for tests that call it too.
_last: tuple[frozenset[tuple[int, int]], tuple[tuple[tuple[int, int], int | None], ...]] | None = None
_lock = threading.Lock()


def _in(port: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def listening_sockets(ranges: Sequence[tuple[int, int]], paths: Sequence[str] = PROC_NET_TCP
                      ) -> frozenset[tuple[int, int]] | None:
    """(port, socket inode) of every TCP listener in `ranges`: asked of the kernel over netlink (sock_diag,
    listeners only), else read from /proc/net/tcp{,6}, which lists every socket (a voter of a large fleet
    holds thousands: generating the table was a third of the leader's CPU at 1,024 hosts); None when
    neither can be read (not Linux)."""
    found = netlink_listeners()
    if found is not None:
        return frozenset((port, inode) for port, inode in found if _in(port, ranges))
    return proc_listeners(ranges, paths)


def netlink_listeners() -> set[tuple[int, int]] | None:
    """(port, inode) of the TCP listeners of this network namespace from NETLINK_SOCK_DIAG, IPv4 and IPv6;
    None when netlink is not there or answers garbage."""
    import socket
    import struct

    netlink_sock_diag, sock_diag_by_family, tcp_listen = 4, 20, 10
    nlm_f_request, nlm_f_dump, nlmsg_done, nlmsg_error = 1, 0x300, 3, 2
    out: set[tuple[int, int]] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_sock_diag) as s:
            s.settimeout(2.0)
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
                # inet_diag_req_v2: family, protocol, ext, pad, states; then an empty inet_diag_sockid
                req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << tcp_listen) + bytes(48)
                s.send(struct.pack("=IHHII", 16 + len(req), sock_diag_by_family, nlm_f_request | nlm_f_dump,
                                   seq, 0) + req)
                done = False
                while not done:
                    buf = s.recv(1 << 16)
                    if not buf:
                        return None
                    off = 0
                    while off + 16 <= len(buf):
                        length, kind = struct.unpack_from("=IH", buf, off)
                        if length < 16:
                            return None
                        if kind == nlmsg_done:
                            done = True
                            break
                        if kind == nlmsg_error:
                            return None
                        # inet_diag_msg: family, state, timer, retrans, sockid (sport big-endian first, 48
                        # bytes), expires, rqueue, wqueue, uid, inode
                        body = off + 16
                        if length >= 16 + 72 and buf[body + 1] == tcp_listen:
                            port = struct.unpack_from(">H", buf, body + 4)[0]
                            inode = struct.unpack_from("=I", buf, body + 68)[0]
                            out.add((port, inode))
                        off += (length + 3) & ~3
    except (OSError, struct.error, ValueError):
        return None
    return out


def proc_listeners(ranges: Sequence[tuple[int, int]], paths: Sequence[str] = PROC_NET_TCP
                   ) -> frozenset[tuple[int, int]] | None:
    """The same from /proc/net/tcp{,6}: every socket of the namespace, one line each."""
    found = set()
    read_any = False
    for path in paths:
        try:
            with open(path) as f:
                next(f, None)  # the header
                for line in f:
                    # " 0A " can only be the st column (the others are longer hex or decimal): skip the
                    # thousands of connected sockets without splitting them
                    if " 0A " not in line:
                        continue
                    cols = line.split()
                    if len(cols) < 10 or cols[3] != _LISTEN:
                        continue
                    port = int(cols[1].rpartition(":")[2], 16)
                    if _in(port, ranges):
                        found.add((port, int(cols[9])))
            read_any = True
        except (OSError, ValueError):
            continue  # no IPv6 table, say; the other still counts
    return frozenset(found) if read_any else None


def socket_owners(inodes: set[int], proc: str = "/proc") -> dict[int, int]:
    """inode -> pid of the processes holding these sockets, newest process first (a new listener is mostly a
    new process's), stopping once every one is found; an inode of a process we may not read is left out."""
    want = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, int] = {}
    try:
        pids = sorted((int(n) for n in os.listdir(proc) if n.isdigit()), reverse=True)
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                inode = want.get(os.readlink(f"{proc}/{pid}/fd/{fd}"))
            except OSError:
                continue
            if inode is not None and inode not in found:
                found[inode] = pid
                if len(found) == len(want):
                    return found
    return found


def foreign_listeners(ranges: Sequence[tuple[int, int]], is_owned: Callable[[int], bool],
                      connections: Callable[..., Iterable[Any]] = psutil.net_connections) -> tuple[int, ...]:
    """Sorted TCP ports in `ranges` with a listener that is not agentd's (`is_owned(pid)` false, or no pid:
    a process of another user, whose pid the OS does not tell us). With the default `connections`, the
    listeners come from the kernel's socket table and only a new listener's owner is looked up
    (`socket_owners`); psutil's scan of every connection is the fallback."""
    global _last
    with _lock:
        rows = listening_sockets(ranges) if connections is psutil.net_connections else None
        if rows is not None:
            known = dict(_last[1]) if _last is not None else {}
            new = {key[1] for key in rows if key not in known}
            owners = socket_owners(new) if new else {}
            current = {key: known[key] if key in known else owners.get(key[1]) for key in rows}
            _last = (rows, tuple(current.items()))
            listeners = tuple((port, pid) for (port, _), pid in current.items())
        else:
            try:
                conns = list(connections(kind="tcp"))
            except (psutil.Error, OSError) as exc:
                log.warning("cannot list listening sockets; ports held by other processes are not reported",
                            extra=fields(error=str(exc)))
                return ()
            listeners = tuple((c.laddr.port, c.pid) for c in conns
                              if c.status == psutil.CONN_LISTEN and c.laddr and _in(c.laddr.port, ranges))
    return tuple(sorted({port for port, pid in listeners if not (pid and is_owned(pid))}))
