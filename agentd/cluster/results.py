"""What applying a committed entry yields: its result, and the events it publishes.

Their own module so that every part of the state machine (agentd/cluster/state.py
and the maintenance records of agentd/cluster/maintenance.py) builds them
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ApplyResult:
    ok: bool
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StateEvent:
    """What changed, for Watch streams and the local reconciler."""

    # deployment.created|updated|deleted, assignment.set|removed, node.up|down|cordoned|uncordoned, key.*, token.*
    kind: str
    name: str
    index: int
    term: int
    data: dict[str, Any] = field(default_factory=dict)
