"""Ports in agentd's ranges that someone else holds, for the host's report.

On a shared machine a leftover llama-server, a developer's notebook or another
service may listen on a port the coordinator would hand to a model server. The
host reports such listeners (in the inventory refresher's worker thread: the
socket table is read from /proc) and the coordinator skips them; a clash found
only at spawn time is repaired by the coordinator with new ports (docs/runtime.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psutil

from agentd.logs import fields

log = logging.getLogger("agentd.inventory")


def foreign_listeners(ranges: Sequence[tuple[int, int]], is_owned: Callable[[int], bool],
                      connections: Callable[..., Iterable[Any]] = psutil.net_connections) -> tuple[int, ...]:
    """Sorted TCP ports in `ranges` with a listener that is not agentd's (`is_owned(pid)` false, or no pid:
    a process of another user, whose pid the OS does not tell us)."""
    try:
        conns = list(connections(kind="tcp"))
    except (psutil.Error, OSError) as exc:
        log.warning("cannot list listening sockets; ports held by other processes are not reported",
                    extra=fields(error=str(exc)))
        return ()
    ports = set()
    for c in conns:
        if c.status != psutil.CONN_LISTEN or not c.laddr:
            continue
        port = c.laddr.port
        if not any(lo <= port <= hi for lo, hi in ranges):
            continue
        if c.pid and is_owned(c.pid):
            continue
        ports.add(port)
    return tuple(sorted(ports))
