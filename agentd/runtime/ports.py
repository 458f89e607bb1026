"""Ports: handed out from a configured range, checked free before a launch.

A model server that loses the race for its port dies after loading gigabytes
of weights with a one-line bind error buried in its log. Checking first turns
that into an explicit reason naming the port (and its holder, when the OS
tells us), before anything is spawned.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable, Iterable

import psutil

from agentd.errors import RuntimeFailure


class PortInUse(RuntimeFailure):
    def __init__(self, host: str, port: int, holder: str = ""):
        self.host = host
        self.port = port
        self.holder = holder
        by = f" by {holder}" if holder else ""
        super().__init__(f"port {port} on {host} is already in use{by}")


class PortRangeExhausted(RuntimeFailure):
    pass


def _bind_address(host: str) -> str:
    return "" if host in ("", "0.0.0.0", "*") else host


def is_free(host: str, port: int) -> bool:
    """True if a server could bind host:port now (SO_REUSEADDR, as servers set it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_bind_address(host), port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # not one of our addresses: check the wildcard instead
                return is_free("0.0.0.0", port)
            return False
    return True


def holder_of(port: int) -> str:
    """"pid 123 (llama-server)" for the listener on `port`, or "" when the OS won't say."""
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                try:
                    return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
                except psutil.Error:
                    return f"pid {c.pid}"
    return ""


def check_free(endpoints: Iterable[tuple[str, int]]) -> None:
    """Raise PortInUse naming the first endpoint that cannot be bound."""
    for host, port in endpoints:
        if not is_free(host, port):
            raise PortInUse(host, port, holder_of(port))


class PortAllocator:
    """Free ports from [low, high], skipping those agentd already handed out.

    `in_use()` returns the ports our own instances hold, so two instances
    starting at once never get the same port even before either has bound it.
    """

    def __init__(self, low: int, high: int, in_use: Callable[[], set[int]] = set, host: str = "0.0.0.0"):
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        self.low, self.high, self.in_use, self.host = low, high, in_use, host
        self._next = low

    def allocate(self, count: int = 1) -> list[int]:
        """`count` consecutive free ports (Ray wants blocks for its workers)."""
        taken = self.in_use()
        span = self.high - self.low + 1
        for i in range(span):
            start = self.low + (self._next - self.low + i) % span
            block = list(range(start, start + count))
            if block[-1] > self.high:
                continue
            if any(p in taken for p in block) or not all(is_free(self.host, p) for p in block):
                continue
            self._next = block[-1] + 1 if block[-1] < self.high else self.low
            return block
        raise PortRangeExhausted(
            f"no {count} free consecutive port(s) left in {self.low}-{self.high}; widen the range in the configuration"
        )
