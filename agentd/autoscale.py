"""Replicas by load (issue 21 item 4, docs/on-demand.md "Replicas by load"): the decision, as a pure function.

The coordinator observes, per autoscaled deployment, how many requests wait on
it (outstanding at every agent's /v1/ proxy, or queued in the model servers as
they report themselves) and asks `decide` what to do, passing back what the
previous call remembered (`Memory`). The rule is the Kubernetes HPA's, with
its stabilisation windows made explicit:

- **Up** when the average queue per replica has stayed above `target_queue`
  for `up_after` seconds: to ceil(queue / target_queue) replicas, at most
  `max_replicas`.
- **Down** by one when it has stayed below `down_ratio` x `target_queue`
  (hysteresis: a load between the two lines changes nothing) for the longer
  `down_after`, and only while every live host's report is fresh: a proxy
  whose report is late (partitioned, or its host is slow) may be sending
  traffic nobody here sees. A late report never holds a scale-up back: what
  is missing can only add to the queue.
- A **cool-down** of `cooldown` seconds after any change, so a new replica's
  load time does not read as a need for yet another one.
- **Bounds** first: below `min_replicas` (at least 1) or above `max_replicas`
  is corrected at once, with no window. The last replica is never removed by
  load: going to zero is the idle unload's (`idle_unload`, min_replicas 0).

No clock, no I/O: `now` comes in, and the returned `Decision` carries its
sentence for the log and its reason for the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

UP = "up"
DOWN = "down"


@dataclass(frozen=True)
class ReplicaReading:
    """One proxy's view of one replica: its own requests there, and the model server's reading of itself."""

    outstanding: int = 0
    running: int = 0
    waiting: int = 0
    capacity: int = 0


@dataclass(frozen=True)
class DeploymentActivity:
    """What one agent's /v1/ proxy says of one deployment in its report."""

    idle_seconds: float = 0.0
    in_flight: int = 0  # requests it forwards or holds now
    held: int = 0  # of which held (waking, or every replica full)
    replicas: Mapping[str, ReplicaReading] = field(default_factory=dict)  # instance id -> reading


def replica_queue(readings: list[ReplicaReading]) -> int:
    """One replica's queue from every proxy's reading of it: the proxies' requests summed, or what the server
    says it runs and queues (the same requests seen from the other side, plus any sent past the proxies),
    whichever is larger. The server's reading is the same for every proxy, so the freshest (largest) counts."""
    proxied = sum(r.outstanding for r in readings)
    server = max((r.running + r.waiting for r in readings), default=0)
    return max(proxied, server)


def deployment_queue(activities: list[DeploymentActivity], instances: set[str]) -> int:
    """Requests waiting on a deployment across the cluster: the replicas' queues (of `instances`, the ones it
    has now) plus what proxies hold, or every proxy's in-flight count, whichever is larger."""
    per: dict[str, list[ReplicaReading]] = {}
    for act in activities:
        for iid, reading in act.replicas.items():
            if iid in instances:
                per.setdefault(iid, []).append(reading)
    from_replicas = sum(replica_queue(rs) for rs in per.values()) + sum(a.held for a in activities)
    return max(from_replicas, sum(a.in_flight for a in activities))


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_queue: float
    up_after: float = 15.0
    down_after: float = 120.0
    cooldown: float = 60.0
    down_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.max_replicas < 1 or not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replica bounds {self.min_replicas}-{self.max_replicas} are not 0 <= min <= max, "
                             "max >= 1")
        if not self.target_queue > 0:
            raise ValueError(f"target_queue must be > 0, got {self.target_queue}")
        if self.up_after < 0 or self.down_after < 0 or self.cooldown < 0:
            raise ValueError("up_after, down_after and cooldown must be >= 0")
        if not 0 <= self.down_ratio < 1:
            raise ValueError(f"down_ratio must be in [0, 1), got {self.down_ratio}")


@dataclass(frozen=True)
class Observation:
    replicas: int  # replicas the deployment has now (those being removed not counted)
    queue: float  # requests waiting on it across the cluster (deployment_queue)
    fresh: bool = True  # every live host's report is within the freshness bound
    stale_hosts: tuple[str, ...] = ()  # when not fresh: whose reports are late (for the sentence)


@dataclass(frozen=True)
class Memory:
    """What the scaler remembers between calls (soft state on the leader; a new leader starts afresh)."""

    above_since: float | None = None
    below_since: float | None = None
    last_change: float = -math.inf


@dataclass(frozen=True)
class Decision:
    desired: int
    direction: str  # UP, DOWN or "" (no change)
    reason: str  # "queue", "bounds" or "" (for the scale events metric)
    sentence: str
    memory: Memory

    @property
    def change(self) -> bool:
        return bool(self.direction)


def decide(policy: Policy, obs: Observation, memory: Memory, now: float, name: str = "") -> Decision:
    who = f"deployment {name}: " if name else ""
    n = obs.replicas
    floor = max(policy.min_replicas, 1)
    if n < 0 or obs.queue < 0:
        raise ValueError(f"replicas and queue must be >= 0, got {n} and {obs.queue}")
    changed = Memory(last_change=now)
    if n < floor:
        return Decision(floor, UP, "bounds", f"{who}{n} replica(s), below min_replicas {floor}: scale to {floor}",
                        changed)
    if n > policy.max_replicas:
        return Decision(n - 1, DOWN, "bounds",
                        f"{who}{n} replica(s), above max_replicas {policy.max_replicas}: remove one", changed)
    avg = obs.queue / n
    low = policy.target_queue * policy.down_ratio
    cooling = now - memory.last_change < policy.cooldown
    if avg > policy.target_queue:
        since = memory.above_since if memory.above_since is not None else now
        kept = Memory(above_since=since, last_change=memory.last_change)
        want = min(policy.max_replicas, max(n + 1, math.ceil(obs.queue / policy.target_queue)))
        if n >= policy.max_replicas:
            return Decision(n, "", "", f"{who}queue {avg:.2f} per replica above target {policy.target_queue:g}, "
                            f"at max_replicas {policy.max_replicas}", kept)
        if now - since < policy.up_after or cooling:
            return Decision(n, "", "", f"{who}queue {avg:.2f} per replica above target {policy.target_queue:g} "
                            f"for {now - since:.1f}s (window {policy.up_after:g}s"
                            f"{', cooling down' if cooling else ''})", kept)
        return Decision(want, UP, "queue", f"{who}queue {avg:.2f} per replica above target "
                        f"{policy.target_queue:g} for {now - since:.1f}s: scale {n} -> {want}", changed)
    if avg < low and n > floor:
        if not obs.fresh:  # the window restarts once every proxy is heard again
            late = ", ".join(obs.stale_hosts[:5])
            return Decision(n, "", "", f"{who}queue {avg:.2f} per replica below {low:g}, but reports are late"
                            f"{' from ' + late if late else ''}: not scaling down on a guess",
                            Memory(last_change=memory.last_change))
        since = memory.below_since if memory.below_since is not None else now
        kept = Memory(below_since=since, last_change=memory.last_change)
        if now - since < policy.down_after or cooling:
            return Decision(n, "", "", f"{who}queue {avg:.2f} per replica below {low:g} for {now - since:.1f}s "
                            f"(window {policy.down_after:g}s{', cooling down' if cooling else ''})", kept)
        return Decision(n - 1, DOWN, "queue", f"{who}queue {avg:.2f} per replica below {low:g} for "
                        f"{now - since:.1f}s: scale {n} -> {n - 1}", changed)
    return Decision(n, "", "", f"{who}queue {avg:.2f} per replica, target {policy.target_queue:g}: steady",
                    Memory(last_change=memory.last_change))


def least_loaded(queues: Mapping[int, int]) -> int:
    """The replica to remove: the fewest requests waiting on it, the highest index among equals (the newest)."""
    if not queues:
        raise ValueError("no replica to choose from")
    return min(queues, key=lambda r: (queues[r], -r))
