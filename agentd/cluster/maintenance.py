"""Maintenance in the replicated state: cordons, and surge incarnations that let a drain move a replica
without a gap (docs/operations.md, "Cordon and drain").

A cordon marks a host, or one GPU of it, so placement gives it no new parts;
with `drain` set, the coordinator also moves every replica that has a part
there. It moves a replica *surge first*: it commits a second incarnation of the
replica elsewhere (a surge: same replica, next generation), waits until every
part of it runs, and only then promotes it, which removes the old incarnation
and so stops its processes. A deployment with capacity elsewhere therefore never
has fewer ready replicas than before the drain.

The records live in the state machine (`ClusterState` mixes this class in), so
they survive restarts and failovers, and every op here is of state format 2:
the leader writes none of them before every member runs a release that knows
them (docs/versioning.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agentd.cluster.results import ApplyResult, StateEvent
from agentd.types import Assignment

# Ops of this module and the state format that introduced them (merged into state.OP_SINCE).
MAINTENANCE_OPS = {"cordon": 2, "uncordon": 2, "surge": 2, "surge.cancel": 2, "promote": 2, "retire": 2}
# Incarnations a promotion replaced that each member remembers (`MaintenanceState.replaced`), newest kept.
REPLACED_REMEMBERED = 256


@dataclass(frozen=True)
class Cordon:
    """No new parts on `host` (all of it when `gpu` is None, else that GPU index)."""

    host: str
    gpu: int | None = None
    uuid: str = ""  # the GPU's UUID when the operator named it by UUID (shown back to them)
    reason: str = ""
    drain: bool = False  # also move the replicas that run there
    force: bool = False  # a replica with no room elsewhere is stopped instead of waited for
    since_index: int = 0

    @property
    def key(self) -> str:
        return cordon_key(self.host, self.gpu)

    def covers(self, host: str, gpus: tuple[int, ...] | list[int]) -> bool:
        return host == self.host and (self.gpu is None or self.gpu in gpus)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Cordon:
        gpu = raw.get("gpu")
        if gpu is not None and (not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 0):
            raise ValueError(f"gpu must be a GPU index, got {gpu!r}")
        host = raw["host"]
        if not isinstance(host, str) or not host:
            raise ValueError("host must be a host name")
        return cls(host=host, gpu=gpu, uuid=str(raw.get("uuid", "")), reason=str(raw.get("reason", ""))[:500],
                   drain=bool(raw.get("drain", False)), force=bool(raw.get("force", False)),
                   since_index=int(raw.get("since_index", 0)))


def cordon_key(host: str, gpu: int | None) -> str:
    return host if gpu is None else f"{host}:{gpu}"


class MaintenanceState:
    """The cordon and surge half of ClusterState: its records, reads and `_op_*` handlers."""

    cordons: dict[str, Cordon]
    surges: dict[tuple[str, int], Assignment]
    assignments: dict[tuple[str, int], Assignment]
    deployments: dict[str, Any]
    # The incarnations promotions replaced, by instance id: a host keeps one running while it answers the
    # requests it holds (agentd/agent/handoff.py), and the leader books those its hosts still report
    # (`Coordinator.booked`). Derived as entries apply, never in a snapshot: after a restore from one, a host's
    # hand-off in progress is not booked (it ends within drain_handoff_timeout).
    replaced: dict[str, Assignment]

    def _init_maintenance(self) -> None:
        self.cordons = {}
        self.surges = {}
        self.replaced = {}

    # ------------------------------------------------------------------ reads

    def cordons_of(self, host: str) -> list[Cordon]:
        return [c for c in self.cordons.values() if c.host == host]

    def draining(self, a: Assignment) -> list[Cordon]:
        """The drain cordons that cover a part of `a`."""
        return [c for c in self.cordons.values() if c.drain and any(c.covers(p.host, p.gpus) for p in a.plan.parts)]

    def successor_of(self, a: Assignment) -> Assignment | None:
        """The incarnation that replaced `a` and could run beside it (a drain's promoted surge, which did): the
        same replica's current assignment, of a newer generation, on none of `a`'s GPUs or ports. None for a
        deleted or scaled-down replica, and for one re-placed onto what `a` holds, which must stop first."""
        current = self.assignments.get((a.deployment, a.replica))
        if current is None or current.generation <= a.generation:
            return None
        def gpus(x: Assignment) -> set[tuple[str, int]]:
            return {(p.host, g) for p in x.plan.parts for g in p.gpus}

        def ports(x: Assignment) -> set[tuple[str, int]]:
            return {(e.host, e.port) for e in x.endpoints}

        return None if gpus(a) & gpus(current) or ports(a) & ports(current) else current

    def incarnations(self) -> list[Assignment]:
        """Everything that should run: each replica's assignment and, during a drain, its surge."""
        return sorted([*self.assignments.values(), *self.surges.values()],
                      key=lambda a: (a.deployment, a.replica, a.generation))

    def incarnations_for(self, deployment: str) -> list[Assignment]:
        return [a for a in self.incarnations() if a.deployment == deployment]

    # ------------------------------------------------------------------ ops

    def _op_cordon(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        c = Cordon.from_json({**cmd["cordon"], "since_index": index})
        old = self.cordons.get(c.key)
        if old is not None:
            c = Cordon(**{**c.to_json(), "since_index": old.since_index})
        self.cordons[c.key] = c
        events.append(StateEvent("node.cordoned", c.host, index, term, c.to_json()))
        what = "drained" if c.drain else "cordoned"
        return ApplyResult(True, f"{c.key} {what}")

    def _op_uncordon(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        key = cordon_key(str(cmd["host"]), cmd.get("gpu"))
        if key not in self.cordons:
            return ApplyResult(False, f"{key} is not cordoned")
        c = self.cordons.pop(key)
        events.append(StateEvent("node.uncordoned", c.host, index, term, c.to_json()))
        return ApplyResult(True, f"{key} uncordoned")

    def _op_surge(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        a = Assignment.model_validate(cmd["assignment"])
        key = (a.deployment, a.replica)
        current = self.assignments.get(key)
        if current is None:
            return ApplyResult(False, f"no assignment for {a.deployment} replica {a.replica} to surge")
        if a.generation <= current.generation or a.term < current.term:
            return ApplyResult(False, f"stale surge for {a.deployment} replica {a.replica}: generation "
                                      f"{a.generation}, term {a.term} after generation {current.generation}, "
                                      f"term {current.term}")
        if len(a.endpoints) != len(a.plan.parts):
            return ApplyResult(False, f"surge of {a.instance_id}: {len(a.endpoints)} endpoints for "
                                      f"{len(a.plan.parts)} parts")
        self.surges[key] = a
        events.append(StateEvent("assignment.set", a.deployment, index, term,
                                 {"replica": a.replica, "instance_id": a.instance_id, "surge": True,
                                  "hosts": sorted({p.host for p in a.plan.parts})}))
        return ApplyResult(True, f"{a.instance_id} surges for {current.instance_id}")

    def _op_surge_cancel(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        key = (str(cmd["deployment"]), int(cmd["replica"]))
        a = self.surges.get(key)
        if a is None or a.generation != int(cmd["generation"]):
            return ApplyResult(False, f"no surge generation {cmd['generation']} for {key[0]} replica {key[1]}")
        del self.surges[key]
        events.append(StateEvent("assignment.removed", a.deployment, index, term,
                                 {"replica": a.replica, "instance_id": a.instance_id, "surge": True}))
        return ApplyResult(True, f"surge {a.instance_id} cancelled")

    def _op_promote(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """The surge becomes the replica's assignment; the old incarnation is no longer wanted anywhere."""
        key = (str(cmd["deployment"]), int(cmd["replica"]))
        a = self.surges.get(key)
        if a is None or a.generation != int(cmd["generation"]):
            return ApplyResult(False, f"no surge generation {cmd['generation']} for {key[0]} replica {key[1]}")
        old = self.assignments.get(key)
        del self.surges[key]
        self.assignments[key] = a
        if old is not None:
            self.replaced[old.instance_id] = old
            if len(self.replaced) > REPLACED_REMEMBERED:
                del self.replaced[next(iter(self.replaced))]
            events.append(StateEvent("assignment.removed", a.deployment, index, term,
                                     {"replica": a.replica, "instance_id": old.instance_id}))
        events.append(StateEvent("assignment.set", a.deployment, index, term,
                                 {"replica": a.replica, "instance_id": a.instance_id,
                                  "hosts": sorted({p.host for p in a.plan.parts})}))
        return ApplyResult(True, f"{a.instance_id} replaces {old.instance_id if old else 'nothing'}")

    def _op_retire(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """`drain --force` with no room elsewhere: the replica stops, unplaced, until room appears."""
        key = (str(cmd["deployment"]), int(cmd["replica"]))
        a = self.assignments.get(key)
        if a is None or a.generation != int(cmd["generation"]):
            return ApplyResult(False, f"no assignment generation {cmd['generation']} for {key[0]} replica {key[1]}")
        del self.assignments[key]
        gone = [a]
        if (s := self.surges.pop(key, None)) is not None:
            gone.append(s)
        for x in gone:
            events.append(StateEvent("assignment.removed", x.deployment, index, term,
                                     {"replica": x.replica, "instance_id": x.instance_id}))
        return ApplyResult(True, f"{a.instance_id} stopped without a successor")

    def _drop_surges(self, deployment: str, keep_replicas: int | None = None) -> list[Assignment]:
        """Surges of a deleted, replaced or scaled-down deployment: they die with what they surged for."""
        gone = [k for k in self.surges if k[0] == deployment and (keep_replicas is None or k[1] >= keep_replicas)]
        return [self.surges.pop(k) for k in gone]

    # ------------------------------------------------------------------ snapshots

    def _maintenance_snapshot(self) -> dict[str, Any]:
        """Left out while empty (older readers ignore unknown keys, and an unused feature changes nothing)."""
        out: dict[str, Any] = {}
        if self.cordons:
            out["cordons"] = [c.to_json() for _, c in sorted(self.cordons.items())]
        if self.surges:
            out["surges"] = [a.model_dump(mode="json") for _, a in sorted(self.surges.items())]
        return out

    def _maintenance_restore(self, raw: dict[str, Any]) -> None:
        self.cordons = {c.key: c for c in (Cordon.from_json(x) for x in raw.get("cordons", []))}
        surges = [Assignment.model_validate(x) for x in raw.get("surges", [])]
        self.surges = {(a.deployment, a.replica): a for a in surges}
        self.replaced = {}


# ---------------------------------------------------------------------- command builders


def cordon_command(c: Cordon) -> dict[str, Any]:
    body = c.to_json()
    body.pop("since_index")
    return {"op": "cordon", "cordon": body}


def uncordon_command(host: str, gpu: int | None) -> dict[str, Any]:
    return {"op": "uncordon", "host": host, "gpu": gpu}


def surge_command(a: Assignment) -> dict[str, Any]:
    return {"op": "surge", "assignment": a.model_dump(mode="json")}


def surge_cancel_command(a: Assignment) -> dict[str, Any]:
    return {"op": "surge.cancel", "deployment": a.deployment, "replica": a.replica, "generation": a.generation}


def promote_command(a: Assignment) -> dict[str, Any]:
    return {"op": "promote", "deployment": a.deployment, "replica": a.replica, "generation": a.generation}


def retire_command(a: Assignment) -> dict[str, Any]:
    return {"op": "retire", "deployment": a.deployment, "replica": a.replica, "generation": a.generation}
