"""The sd_notify protocol, spoken directly: no libsystemd, no dependency.

systemd (Type=notify) passes a unix datagram socket in NOTIFY_SOCKET. The
service sends newline-separated `KEY=value` assignments in one datagram:
READY=1 once it serves, STATUS= for `systemctl status`, WATCHDOG=1 at least
every WatchdogSec, STOPPING=1 when it begins to shut down. A path starting with
'@' is an abstract socket. Without NOTIFY_SOCKET (run by hand, in tests)
every call is a cheap no-op, so the daemon calls it unconditionally.

A notification that cannot be sent is logged, never raised: systemd being
gone must not take the cluster down with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping

from agentd.logs import fields

log = logging.getLogger(__name__)

ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when the watchdog is off or meant for another pid."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 1_000_000


class SdNotifier:
    """Sends notifications to the service manager; does nothing when there is none."""

    def __init__(self, socket_path: str | None):
        self.socket_path = socket_path or None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> SdNotifier:
        """The notifier systemd set up for us. `unset=True` removes the variables, so that
        processes we launch (model servers) do not inherit them and cannot pose as agentd."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        if unset:
            for key in ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; True if sent (False when disabled or on error)."""
        if self.socket_path is None:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not a single KEY=value assignment: {a!r}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), _address(self.socket_path))
            return True
        except OSError as exc:
            log.warning("could not notify systemd", extra=fields(socket=self.socket_path, error=str(exc)))
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (EXTEND_TIMEOUT_USEC), e.g. while waiting for a quorum or draining."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def status_line(*, leader: str | None, term: int, instances_running: int, instances_total: int,
                draining: bool = False) -> str:
    """The STATUS= text `systemctl status agentd` shows."""
    head = "draining" if draining else (f"leader {leader}" if leader else "no leader")
    return f"{head}, term {term}, {instances_running}/{instances_total} instances running"


async def watchdog_loop(notifier: SdNotifier, interval: float | None, *,
                        healthy: Callable[[], bool] = lambda: True,
                        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
    """Ping at half the watchdog interval while `healthy()` holds.

    The ping runs on the event loop, so a blocked loop stops pinging and
    systemd restarts us; `healthy` lets the daemon stop pinging on a hang the
    loop itself does not notice (a stuck reconciler). Returns at once when the
    watchdog is off.
    """
    if interval is None or not notifier.enabled:
        return
    period = interval / 2
    while True:
        if healthy():
            notifier.watchdog()
        else:
            log.error("not pinging the systemd watchdog: the daemon reports itself unhealthy",
                      extra=fields(interval=interval))
        await sleep(period)
