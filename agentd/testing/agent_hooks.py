"""Test hooks of a real agent process: the faults and the wrong clock that cluster tests inject.

Not part of a production agent. An agent loads this module only when `AGENTD_TEST_HOOKS` names it (the one seam,
`agentd.agent.wiring.load_test_hooks`, which loads nothing outside `agentd.testing`); LocalCluster sets it for
every agent it starts. Then, at start:

* `AGENTD_TEST_FAULT_FILE`: the agent follows that JSON file every 100 ms; `{"partition": ["b", "c"]}` cuts
  all Raft traffic to and from those peers (agentd/testing/partition.py wraps the Raft transport), `[]` heals.
  Each change is logged as "fault injection: partition" (LocalCluster.partition waits for that line).
* `AGENTD_TEST_CLOCK_SKEW`: seconds this agent's wall clock reads off (issue 14's tests of the cluster clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from agentd.logs import fields
from agentd.testing.partition import Partition

log = logging.getLogger(__name__)
FAULT_FILE_ENV = "AGENTD_TEST_FAULT_FILE"  # JSON {"partition": [peer ids]} cuts Raft traffic
CLOCK_SKEW_ENV = "AGENTD_TEST_CLOCK_SKEW"  # seconds this agent's wall clock reads off


async def install(d: Any, stack: contextlib.AsyncExitStack) -> None:
    """Called first in `Daemon._start`, before anything serves; what it starts it stops through `stack`."""
    skew = float(os.environ.get(CLOCK_SKEW_ENV) or 0)
    if skew:
        log.warning("test hook: this agent's wall clock reads off", extra=fields(node=d.node, seconds=skew))
        d.wall = lambda: time.time() + skew
    path = os.environ.get(FAULT_FILE_ENV)
    if path:
        partition = Partition(d.raft.transport)
        task = asyncio.get_running_loop().create_task(follow(d.node, Path(path), partition), name="agentd-faults")
        stack.push_async_callback(_cancel, task)


async def follow(node: str, path: Path, partition: Partition) -> None:
    """Apply the partition the fault file names, whenever it changes."""
    log.warning("fault injection enabled", extra=fields(node=node, file=str(path)))
    current: tuple[str, ...] = ()
    while True:
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
            peers = tuple(sorted(str(p) for p in data.get("partition", [])))
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("unreadable fault file", extra=fields(file=str(path), error=str(exc)))
            peers = current
        if peers != current:
            log.warning("fault injection: partition", extra=fields(node=node, peers=list(peers)))
            partition.set(peers)
            current = peers
        await asyncio.sleep(0.1)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
