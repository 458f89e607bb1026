"""systemd's notify protocol for the agent: READY=1 once it serves and is in the cluster, STATUS= lines,
EXTEND_TIMEOUT_USEC= while it catches up on a long log, WATCHDOG=1 from the event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agentd.api.sdnotify import SdNotifier, status_line, watchdog_interval
from agentd.logs import fields

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon

log = logging.getLogger(__name__)


class Systemd:
    def __init__(self, d: Daemon):
        self.d = d
        self.watchdog = watchdog_interval()  # read before from_environ(unset=True) removes WATCHDOG_USEC
        self.notifier = SdNotifier.from_environ(unset=True)

    async def run(self) -> None:
        """READY=1 once gRPC serves (it does before this loop starts) and the agent is in the cluster and caught
        up; STATUS= lines; EXTEND_TIMEOUT_USEC= while it catches up on a long log; WATCHDOG=1 from the loop."""
        raft, notifier = self.d.raft, self.notifier
        interval = self.watchdog
        ready_sent = False
        applied = raft.last_applied
        while True:
            if not ready_sent and raft.leader_id and self.d.synced:
                notifier.ready(self.status_text())
                ready_sent = True
                log.info("told systemd we are ready", extra=fields(node=self.d.node, enabled=notifier.enabled))
            elif ready_sent:
                notifier.status(self.status_text())
            else:
                waiting = ("waiting for a leader" if not raft.leader_id
                           else f"catching up with the cluster state (applied {raft.last_applied})")
                notifier.status(waiting)
                if raft.last_applied > applied:  # progress: do not let TimeoutStartSec cut a long catch-up
                    notifier.extend_timeout(30.0)
                applied = raft.last_applied
            if interval:
                notifier.watchdog()
            period = min(interval / 2 if interval else 2.0, 2.0)
            await asyncio.sleep(period if ready_sent else min(period, 0.1))  # READY promptly once in

    def status_text(self) -> str:
        sts = self.d.supervisor.status()
        return status_line(leader=self.d.raft.leader_id, term=self.d.raft.term,
                           instances_running=sum(1 for s in sts if s.state == "RUNNING"),
                           instances_total=len(sts))
