"""The life of one supervised process as an explicit state machine.

Modelled on supervisord's process states, with two differences: PENDING is
the wait *before* a spawn (ports, binaries, dependencies such as the RPC
servers a llama-server needs), and a restart asked for by a dependency goes
RUNNING → PENDING without the crash backoff, because it is not this process's
fault. Every change of state goes through `transition`, which refuses edges
not in `EDGES` and returns the event to log and publish, so the table below is
the whole truth about what can happen (and each edge has a test).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class State(enum.StrEnum):
    PENDING = "PENDING"  # waiting to spawn: dependencies, ports, backoff over
    STARTING = "STARTING"  # spawned (or adopted); readiness not passed yet
    RUNNING = "RUNNING"  # readiness passed; liveness watched
    BACKOFF = "BACKOFF"  # exited or failed; waiting before the next start
    FATAL = "FATAL"  # will not be retried without a new desired state or an explicit restart
    STOPPING = "STOPPING"  # stop asked: SIGTERM sent, grace running
    STOPPED = "STOPPED"  # stopped on purpose; nothing left running


EDGES: frozenset[tuple[State, State]] = frozenset(
    {
        (State.PENDING, State.STARTING),  # spawned, or found running and adopted
        (State.PENDING, State.BACKOFF),  # a retryable launch failure (port in use)
        (State.PENDING, State.FATAL),  # cannot launch at all (binary missing, plugin refused)
        (State.PENDING, State.STOPPED),  # stop asked before anything ran
        (State.STARTING, State.RUNNING),  # readiness passed
        (State.STARTING, State.BACKOFF),  # exited before it was ready
        (State.STARTING, State.FATAL),  # never became ready, or failed to start too often
        (State.STARTING, State.PENDING),  # a dependency restarted while this one was starting
        (State.STARTING, State.STOPPING),
        (State.RUNNING, State.BACKOFF),  # exited, or liveness failed and it was killed
        (State.RUNNING, State.PENDING),  # a dependency restarted: restart after it
        (State.RUNNING, State.STOPPING),
        (State.BACKOFF, State.PENDING),  # the backoff delay is over: try again
        (State.BACKOFF, State.STOPPED),  # stop asked while nothing ran
        (State.STOPPING, State.STOPPED),
        (State.FATAL, State.PENDING),  # explicit restart
        (State.FATAL, State.STOPPED),  # stop asked; nothing runs in FATAL
        (State.STOPPED, State.PENDING),  # started again
    }
)

# Edges that begin another attempt to run the process: counted as restarts.
RESTART_EDGES: frozenset[tuple[State, State]] = frozenset(
    {(State.BACKOFF, State.PENDING), (State.RUNNING, State.PENDING), (State.STARTING, State.PENDING)}
)

# States in which a process of ours may exist (and must be stopped on delete).
LIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})


class IllegalTransition(ValueError):
    """A transition the table does not allow: a bug in the supervisor, never user input."""


@dataclass(frozen=True)
class ProcState:
    """Where one process stands: the state, why, since when, and how often it was restarted."""

    key: str  # "<instance id>/<process name>"
    state: State = State.PENDING
    reason: str = "waiting to start"
    since: float = 0.0  # monotonic seconds
    restarts: int = 0


@dataclass(frozen=True)
class Event:
    """One edge taken: what `agentd ps`, the logs and the lead's reporting see."""

    key: str
    old: State
    new: State
    reason: str
    at: float
    restarts: int

    @property
    def sentence(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}: {self.reason}"


def transition(current: ProcState, new: State, reason: str, now: float) -> tuple[ProcState, Event]:
    """Take one edge of the machine, or raise IllegalTransition.

    Pure: returns the new state value and the event describing the edge; the
    caller stores the one and publishes the other.
    """
    edge = (current.state, new)
    if edge not in EDGES:
        raise IllegalTransition(f"{current.key}: {current.state} -> {new} is not a legal transition ({reason})")
    restarts = current.restarts + (1 if edge in RESTART_EDGES else 0)
    nxt = replace(current, state=new, reason=reason, since=now, restarts=restarts)
    return nxt, Event(key=current.key, old=current.state, new=new, reason=reason, at=now, restarts=restarts)
