"""The replicated state machine: the cluster's desired state.

Every agent applies the same committed Raft entries in the same order, so
every agent holds the same deployments and assignments. Apply is pure and
deterministic: a command that breaks a rule is refused the same way on every
node (the result says why) and leaves the state untouched; it never raises.

Commands are JSON objects with an `op`. The coordinator builds them (see
`commands`), runs placement before proposing, and stamps each assignment with
its Raft term. Fencing lives here too: an assignment stamped with a term older
than the one already recorded for that replica is refused.

Versions (docs/versioning.md): every command carries `"v"`, the oldest state
format that can apply it (absent in entries written by agentd 0.1.0: format 1).
An entry or snapshot of a newer format than `STATE_FORMAT` raises
UpgradeRequired *before* anything changes: the node stops applying there instead
of skipping it, which would leave this copy of the state silently different from
the others. `cluster_format` is the newest format every member supports, raised by
the leader with a `cluster.format` entry; nothing newer is proposed before that
(`admit`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agentd import formats
from agentd.cluster import maintenance
from agentd.cluster.maintenance import MAINTENANCE_OPS, MaintenanceState
from agentd.cluster.results import ApplyResult, StateEvent
from agentd.errors import InvalidInput, UpgradeRequired
from agentd.logs import fields
from agentd.security import apikeys, tokens
from agentd.types import Assignment, DeploymentSpec
from agentd.version import AGENT_VERSION, BASELINE_STATE_FORMAT, STATE_FORMAT

log = logging.getLogger(__name__)

NODE_UP = "up"
NODE_DOWN = "down"
# `agentd nodes rm`: gone for good. Placement and re-placement treat it as down; it never comes back up under
# this name (its reports are refused, so are its joins), and the record stays as a tombstone that says so.
NODE_REMOVED = "removed"

# The state format in which each op appeared; an op not listed is from the first release. A new op is
# added here with the format that introduces it, and its builder passes that to `_encode`.
OP_SINCE: dict[str, int] = {"cluster.format": 2, "cert.revoke": 2, "node.remove": 2, **MAINTENANCE_OPS}


@dataclass
class DeploymentRecord:
    spec: DeploymentSpec
    created_index: int
    updated_index: int


# Host approval (issue 13): a held host gets no work; the operator's approval may dedicate it to tenants.
OP_SINCE.update({"node.hold": 2, "node.approve": 2, "secret.rotate": 2})

# Serving on demand (issue 21, docs/on-demand.md): a deployment unloaded after its idle time, placed again on wake.
OP_SINCE.update({"deployment.idle": 2, "deployment.wake": 2})
# Replicas by load (issue 21 item 4): a replica chosen for removal stops taking requests, then goes; new bounds.
OP_SINCE.update({"replica.leave": 2, "replica.remove": 2, "deployment.bounds": 2})

# The highest replica index + 1 of an autoscaled deployment (DeploymentSpec.max_replicas' bound).
REPLICA_INDEX_LIMIT = 10_000

# Labels only the operator sets (`agentd nodes approve NAME --tenant T`): a host's own report cannot claim them.
TENANT_LABEL_PREFIX = "tenant.agentd.io/"


@dataclass
class NodeRecord:
    name: str
    address: str = ""
    state: str = NODE_UP
    since_index: int = 0


class ClusterState(MaintenanceState):
    """Deployments, assignments, node states and access records, changed only through `apply`.

    Access records (docs/security.md): API keys and join tokens (hashes only,
    never secrets) and the cluster secret from which every agent derives a
    model server's own key. Times in these commands are the proposer's clock,
    carried in the command, so every node decides the same.
    """

    def __init__(self) -> None:
        self.deployments: dict[str, DeploymentRecord] = {}
        self.assignments: dict[tuple[str, int], Assignment] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.api_keys: dict[str, apikeys.ApiKeyRecord] = {}
        self.join_tokens: dict[str, tokens.JoinTokenRecord] = {}
        self.cluster_secret = ""
        # Revoked certificates: name -> when (the leader's clock). Every certificate of that name issued up to
        # then is refused on every call; one issued later (a re-join with a token bound to the name) is not.
        self.revoked_certs: dict[str, float] = {}
        # Hosts the operator has not approved yet (a join token made with needs_approval): placement skips them.
        self.held_hosts: set[str] = set()
        # After `secret.rotate`: the previous secret, kept for the instances that ran when it was rotated (their
        # servers were started with keys from it); new instances get keys from `cluster_secret`.
        self.legacy_secret = ""
        self.legacy_instances: frozenset[str] = frozenset()
        # Hosts the operator dedicated to tenants: they carry tenant.agentd.io/<tenant>=true.
        self.host_tenants: dict[str, tuple[str, ...]] = {}
        # Deployments unloaded after their idle_unload time: no assignments until a request wakes them.
        self.idle: set[str] = set()
        # Replicas of autoscaled deployments being scaled down: (deployment, replica) -> the generation chosen.
        # The proxies send them no new requests; the coordinator removes them once their requests are answered.
        self.leaving: dict[tuple[str, int], int] = {}
        self.cluster_format = BASELINE_STATE_FORMAT
        self._init_maintenance()
        self.last_index = 0
        self.last_term = 0
        self._listeners: list[Callable[[StateEvent], None]] = []

    # ------------------------------------------------------------------ reads

    def deployment(self, name: str) -> DeploymentRecord | None:
        return self.deployments.get(name)

    def assignments_for(self, deployment: str) -> list[Assignment]:
        return sorted((a for (d, _), a in self.assignments.items() if d == deployment), key=lambda a: a.replica)

    def replica_limit(self, spec: DeploymentSpec, replicas: int) -> int:
        """Replica indices run below this. An autoscaled deployment removes its least-loaded replica, whichever
        index it has, so its indices may have gaps (a new replica takes the lowest free one): any index up to
        the field's bound; its count is `spec.replicas`, which its own ops keep."""
        return max(replicas, REPLICA_INDEX_LIMIT) if spec.autoscaled else replicas

    def is_leaving(self, a: Assignment) -> bool:
        return self.leaving.get((a.deployment, a.replica)) == a.generation

    def assignments_on(self, host: str) -> list[Assignment]:
        """Incarnations (assignments and surges) with at least one part on `host`, in a stable order."""
        return [a for a in self.incarnations() if any(p.host == host for p in a.plan.parts)]

    def all_assignments(self) -> list[Assignment]:
        return sorted(self.assignments.values(), key=lambda a: (a.deployment, a.replica))

    def secret_for(self, instance_id: str) -> str:
        """The secret an instance's model-server key derives from: the one in force when it was started."""
        if self.legacy_secret and instance_id in self.legacy_instances:
            return self.legacy_secret
        return self.cluster_secret

    def trusted_labels(self, host: str, reported: dict[str, str]) -> dict[str, str]:
        """A host's labels as placement sees them: the tenant labels are the operator's, never the host's."""
        tenants = self.host_tenants.get(host, ())
        if not tenants and not any(k.startswith(TENANT_LABEL_PREFIX) for k in reported):
            return reported
        labels = {k: v for k, v in reported.items() if not k.startswith(TENANT_LABEL_PREFIX)}
        labels.update({f"{TENANT_LABEL_PREFIX}{t}": "true" for t in tenants})
        return labels

    def cert_revocation(self, name: str, issued_at: float) -> str:
        """Why the certificate of `name` issued at `issued_at` is refused ("" when it is not revoked).

        Certificate times have whole seconds: one issued in the second of its name's revocation counts as
        revoked (a re-issue a second later is not)."""
        at = self.revoked_certs.get(name)
        if at is None or issued_at > at:
            return ""
        return f"the certificate of {name!r} was revoked"

    def subscribe(self, listener: Callable[[StateEvent], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # ------------------------------------------------------------------ apply

    def apply(self, index: int, term: int, command: bytes) -> ApplyResult:
        """Apply one committed entry. Idempotent for indices already applied.

        Raises UpgradeRequired, with nothing applied, for an entry of a newer format than this agent knows.
        """
        if index <= self.last_index:
            return ApplyResult(True, f"entry {index} already applied")
        try:
            cmd = json.loads(command)
            if not isinstance(cmd, dict) or not isinstance(cmd.get("op"), str):
                raise ValueError("a command is a JSON object with an 'op'")
        except (ValueError, UnicodeDecodeError) as exc:
            self.last_index, self.last_term = index, term
            return self._refuse(index, f"malformed command: {exc}")
        needs = command_format(cmd)
        if needs > STATE_FORMAT:
            raise UpgradeRequired(f"log entry {index} ({cmd['op']!r}) needs state format {needs}; this agent "
                                  f"(agentd {AGENT_VERSION}) applies formats up to {STATE_FORMAT}: upgrade it")
        self.last_index, self.last_term = index, term
        handler = getattr(self, f"_op_{cmd['op'].replace('.', '_')}", None)
        if handler is None:
            return self._refuse(index, f"unknown op {cmd['op']!r}")
        events: list[StateEvent] = []
        try:
            result = handler(cmd, index, term, events)
        except (ValidationError, KeyError, TypeError, ValueError, InvalidInput) as exc:
            return self._refuse(index, f"invalid {cmd['op']} command: {_short(exc)}")
        for ev in events:
            for listener in list(self._listeners):
                try:
                    listener(ev)
                except Exception:  # a broken listener must not stop the state machine
                    log.exception("state listener failed", extra=fields(event=ev.kind))
        return result

    def admit(self, command: bytes) -> str:
        """Why the leader must not propose `command` now ("" when it may): it needs a newer state format than
        the cluster's oldest member supports. `cluster.format` itself is judged by whoever proposes it."""
        try:
            cmd = json.loads(command)
        except (ValueError, UnicodeDecodeError):
            return ""  # refused the same way on every node when applied
        if not isinstance(cmd, dict) or cmd.get("op") == "cluster.format":
            return ""
        needs = command_format(cmd)
        if needs > self.cluster_format:
            return (f"this change needs state format {needs}, but the cluster still runs format "
                    f"{self.cluster_format}: an agent in it runs an older agentd (see `agentd nodes`); "
                    "upgrade every agent, then retry")
        return ""

    def _refuse(self, index: int, why: str) -> ApplyResult:
        log.warning("refused entry", extra=fields(index=index, reason=why))
        return ApplyResult(False, why)

    def _op_deploy(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Create or replace a deployment and its assignments atomically."""
        spec = DeploymentSpec.model_validate(cmd["spec"])
        assignments = [Assignment.model_validate(a) for a in cmd.get("assignments", [])]
        why = self._check_assignments(spec.name, assignments, replicas=self.replica_limit(spec, spec.replicas))
        if why:
            return ApplyResult(False, why)
        existing = self.deployments.get(spec.name)
        if existing and not cmd.get("replace", False):
            return ApplyResult(False, f"deployment {spec.name!r} already exists")
        created = existing.created_index if existing else index
        self.deployments[spec.name] = DeploymentRecord(spec, created, index)
        self.idle.discard(spec.name)  # a (re)deploy places it now
        self._forget_leaving(spec.name)
        kind = "deployment.updated" if existing else "deployment.created"
        events.append(StateEvent(kind, spec.name, index, term, {"spec": spec.model_dump(mode="json")}))
        self._replace_assignments(spec.name, assignments, index, term, events)
        return ApplyResult(True, f"deployment {spec.name} {'updated' if existing else 'created'}",
                           {"replicas": len(assignments)})

    def _op_delete(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        name = cmd["name"]
        if name not in self.deployments:
            return ApplyResult(False, f"no deployment named {name!r}")
        del self.deployments[name]
        self.idle.discard(name)
        self._forget_leaving(name)
        self._replace_assignments(name, [], index, term, events)
        events.append(StateEvent("deployment.deleted", name, index, term))
        return ApplyResult(True, f"deployment {name} deleted")

    def _op_assign(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Set (or remove) assignments of one deployment: scale and re-placement use this."""
        name = cmd["name"]
        record = self.deployments.get(name)
        if record is None:
            return ApplyResult(False, f"no deployment named {name!r}")
        assignments = [Assignment.model_validate(a) for a in cmd.get("assignments", [])]
        replicas = int(cmd.get("replicas", record.spec.replicas))
        limit = self.replica_limit(record.spec, replicas)
        why = self._check_assignments(name, assignments, replicas=limit)
        if why:
            return ApplyResult(False, why)
        for a in assignments:
            current = self.assignments.get((name, a.replica))
            if current is not None and a.term < current.term:
                return ApplyResult(False, f"stale assignment for {name} replica {a.replica}: term {a.term} "
                                          f"is older than term {current.term} already recorded")
        if replicas != record.spec.replicas:
            record.spec = record.spec.model_copy(update={"replicas": replicas})
            events.append(StateEvent("deployment.updated", name, index, term,
                                     {"spec": record.spec.model_dump(mode="json")}))
        record.updated_index = index
        keep = {a.replica: a for a in self.assignments_for(name) if a.replica < limit}
        keep.update({a.replica: a for a in assignments})
        self._replace_assignments(name, list(keep.values()), index, term, events)
        return ApplyResult(True, f"deployment {name}: {len(assignments)} assignment(s) set, {replicas} replica(s)")

    def _op_deployment_idle(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Unload an idle deployment: every assignment (and surge) goes, the spec stays, marked IDLE."""
        name = str(cmd["name"])
        record = self.deployments.get(name)
        if record is None:
            return ApplyResult(False, f"no deployment named {name!r}")
        if name in self.idle:
            return ApplyResult(False, f"deployment {name} is idle already")
        self.idle.add(name)
        self._forget_leaving(name)
        record.updated_index = index
        self._replace_assignments(name, [], index, term, events)
        events.append(StateEvent("deployment.idle", name, index, term))
        return ApplyResult(True, f"deployment {name} is idle: its replicas stop until a request wakes it")

    def _op_deployment_wake(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Place an IDLE deployment again. Refused when it is not idle: of two wakes, the second places nothing."""
        name = str(cmd["name"])
        record = self.deployments.get(name)
        if record is None:
            return ApplyResult(False, f"no deployment named {name!r}")
        if name not in self.idle:
            return ApplyResult(False, f"deployment {name} is not idle")
        assignments = [Assignment.model_validate(a) for a in cmd.get("assignments", [])]
        why = self._check_assignments(name, assignments, replicas=self.replica_limit(record.spec,
                                                                                     record.spec.replicas))
        if why:
            return ApplyResult(False, why)
        self.idle.discard(name)
        if record.spec.autoscaled and len(assignments) != record.spec.replicas:  # woken at its lower bound
            record.spec = record.spec.model_copy(update={"replicas": len(assignments)})
        record.updated_index = index
        self._replace_assignments(name, assignments, index, term, events)
        events.append(StateEvent("deployment.woken", name, index, term, {"replicas": len(assignments)}))
        return ApplyResult(True, f"deployment {name} woken: {len(assignments)} replica(s) placed")

    def _op_replica_leave(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Scale-down, first step: the replica takes no new requests (the proxies skip it) but keeps running."""
        key = (str(cmd["deployment"]), int(cmd["replica"]))
        a = self.assignments.get(key)
        if a is None or a.generation != int(cmd["generation"]):
            return ApplyResult(False, f"no assignment generation {cmd['generation']} for {key[0]} replica {key[1]}")
        record = self.deployments[key[0]]
        if not record.spec.autoscaled:
            return ApplyResult(False, f"deployment {key[0]} is not scaled by load")
        if key in self.leaving:
            return ApplyResult(False, f"{a.instance_id} is leaving already")
        self.leaving[key] = a.generation
        events.append(StateEvent("replica.leaving", key[0], index, term,
                                 {"replica": a.replica, "instance_id": a.instance_id}))
        return ApplyResult(True, f"{a.instance_id} takes no new requests: it stops once its requests are answered")

    def _op_replica_remove(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Scale-down, second step: the replica (leaving, or above max_replicas) stops; one replica fewer."""
        key = (str(cmd["deployment"]), int(cmd["replica"]))
        a = self.assignments.get(key)
        if a is None or a.generation != int(cmd["generation"]):
            return ApplyResult(False, f"no assignment generation {cmd['generation']} for {key[0]} replica {key[1]}")
        record = self.deployments[key[0]]
        if not record.spec.autoscaled:
            return ApplyResult(False, f"deployment {key[0]} is not scaled by load")
        self.leaving.pop(key, None)
        keep = [x for x in self.assignments_for(key[0]) if x.replica != key[1]]
        record.spec = record.spec.model_copy(update={"replicas": len(keep)})
        record.updated_index = index
        events.append(StateEvent("deployment.updated", key[0], index, term,
                                 {"spec": record.spec.model_dump(mode="json")}))
        self._replace_assignments(key[0], keep, index, term, events)
        return ApplyResult(True, f"{a.instance_id} removed: {len(keep)} replica(s)")

    def _op_deployment_bounds(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """`agentd scale NAME --min-replicas N --max-replicas M` on an autoscaled deployment: new bounds; the
        coordinator brings the replica count inside them at its next tick."""
        name = str(cmd["name"])
        record = self.deployments.get(name)
        if record is None:
            return ApplyResult(False, f"no deployment named {name!r}")
        if not record.spec.autoscaled:
            return ApplyResult(False, f"deployment {name} is not scaled by load")
        update = {"min_replicas": int(cmd.get("min_replicas", record.spec.min_replicas)),
                  "max_replicas": int(cmd.get("max_replicas", record.spec.max_replicas))}
        spec = DeploymentSpec.model_validate({**record.spec.model_dump(mode="json"), **update})
        record.spec = spec
        record.updated_index = index
        events.append(StateEvent("deployment.updated", name, index, term, {"spec": spec.model_dump(mode="json")}))
        return ApplyResult(True, f"deployment {name}: replicas between {spec.min_replicas} and {spec.max_replicas}")

    def _forget_leaving(self, name: str) -> None:
        for key in [k for k in self.leaving if k[0] == name]:
            del self.leaving[key]

    def _op_node(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        name, state = cmd["name"], cmd["state"]
        if state not in (NODE_UP, NODE_DOWN):
            raise ValueError(f"node state must be {NODE_UP!r} or {NODE_DOWN!r}")
        rec = self.nodes.get(name)
        if rec is None:
            rec = self.nodes[name] = NodeRecord(name)
        if rec.state == NODE_REMOVED:
            return ApplyResult(False, f"node {name} was removed from the cluster at index {rec.since_index}")
        rec.address = cmd.get("address", rec.address) or rec.address
        if rec.state != state or rec.since_index == 0:
            rec.state, rec.since_index = state, index
            events.append(StateEvent(f"node.{state}", name, index, term, {"address": rec.address}))
        return ApplyResult(True, f"node {name} is {state}")

    def _op_node_remove(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """`agentd nodes rm`: the host is gone for good; its cordons go with it, its replicas are re-placed."""
        name = str(cmd["name"])
        if not name:
            raise ValueError("node.remove needs a name")
        rec = self.nodes.get(name)
        if rec is not None and rec.state == NODE_REMOVED:
            return ApplyResult(False, f"node {name} was removed already, at index {rec.since_index}")
        rec = self.nodes[name] = NodeRecord(name, rec.address if rec else "", NODE_REMOVED, index)
        for key in [k for k, c in self.cordons.items() if c.host == name]:
            del self.cordons[key]
        events.append(StateEvent("node.removed", name, index, term, {"address": rec.address}))
        return ApplyResult(True, f"node {name} removed")

    def removed(self, name: str) -> bool:
        rec = self.nodes.get(name)
        return rec is not None and rec.state == NODE_REMOVED

    # ------------------------------------------------------------------ access records

    def _op_key_add(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        record = apikeys.ApiKeyRecord.from_json(cmd["record"])
        try:
            self.api_keys = apikeys.add_key(self.api_keys, record)
        except InvalidInput as exc:
            return ApplyResult(False, str(exc))
        events.append(StateEvent("key.created", record.id, index, term, {"tenant": record.tenant,
                                                                        "admin": record.admin}))
        return ApplyResult(True, f"API key {record.id} created for tenant {record.tenant}")

    def _op_key_revoke(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        try:
            self.api_keys, record = apikeys.revoke_key(self.api_keys, str(cmd["id"]), now=float(cmd["at"]))
        except InvalidInput as exc:
            return ApplyResult(False, str(exc))
        events.append(StateEvent("key.revoked", record.id, index, term, {"tenant": record.tenant}))
        return ApplyResult(True, f"API key {record.id} revoked", {"revoked_at": record.revoked_at})

    def _op_token_add(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        record = tokens.JoinTokenRecord.from_json(cmd["record"])
        store = tokens.prune_tokens(self.join_tokens, now=record.created_at)
        try:
            self.join_tokens = tokens.add_token(store, record)
        except InvalidInput as exc:
            return ApplyResult(False, str(exc))
        events.append(StateEvent("token.created", record.id, index, term, {"expires_at": record.expires_at}))
        return ApplyResult(True, f"join token {record.id} created")

    def _op_token_consume(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Mark a join token used; of two signers racing with one token, the later entry is refused."""
        self.join_tokens, decision = tokens.consume_token(
            self.join_tokens, str(cmd["id"]), str(cmd["secret_hash"]), now=float(cmd["at"]),
            node_name=str(cmd["node_name"]))
        if decision.ok:
            events.append(StateEvent("token.used", str(cmd["id"]), index, term, {"node": cmd["node_name"]}))
        return ApplyResult(decision.ok, decision.reason)

    def _op_token_revoke(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        try:
            self.join_tokens = tokens.revoke_token(self.join_tokens, str(cmd["id"]))
        except InvalidInput as exc:
            return ApplyResult(False, str(exc))
        events.append(StateEvent("token.revoked", str(cmd["id"]), index, term))
        return ApplyResult(True, f"join token {cmd['id']} revoked")

    def _op_cert_revoke(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Revoke every certificate of a name issued up to `at`; a later revocation of the name moves it on."""
        name, at = str(cmd["name"]), float(cmd["at"])
        if not name or at != at or at in (float("inf"), float("-inf")):
            raise ValueError("cert.revoke needs a name and a finite time")
        self.revoked_certs[name] = max(at, self.revoked_certs.get(name, at))
        events.append(StateEvent("cert.revoked", name, index, term, {"at": self.revoked_certs[name]}))
        return ApplyResult(True, f"certificates of {name!r} issued up to {at:.0f} are revoked")

    def _op_secret_rotate(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """A new cluster secret for instances started from now on; running ones keep the one they have.

        Refused while an instance from before the previous rotation still runs: that secret would be lost
        and its server's key with it."""
        value = str(cmd["value"])
        if len(value) < 32:
            raise ValueError("the cluster secret must be at least 32 characters")
        if not self.cluster_secret:
            return ApplyResult(False, "there is no cluster secret to rotate yet")
        running = frozenset(a.instance_id for a in self.incarnations())
        older = sorted(self.legacy_instances & running)
        if older:
            return ApplyResult(False, f"{len(older)} instance(s) still run with the secret before the previous "
                                      f"rotation ({', '.join(older[:5])}): replace them first ('agentd deploy "
                                      "--replace'), then rotate again")
        self.legacy_secret, self.legacy_instances = self.cluster_secret, running
        self.cluster_secret = value
        events.append(StateEvent("secret.rotated", "", index, term, {"instances_on_old_secret": len(running)}))
        return ApplyResult(True, f"cluster secret rotated; {len(running)} running instance(s) keep keys from the "
                                 "previous one until they are replaced", {"instances_on_old_secret": len(running)})

    def _op_node_hold(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """A host that must wait for the operator's approval before it gets any work."""
        name = str(cmd["name"])
        if not name:
            raise ValueError("node.hold needs a name")
        self.held_hosts.add(name)
        events.append(StateEvent("node.held", name, index, term))
        return ApplyResult(True, f"host {name} gets no work until 'agentd nodes approve {name}'")

    def _op_node_approve(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        name, tenants = str(cmd["name"]), cmd.get("tenants", [])
        if not name or not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
            raise ValueError("node.approve needs a name and a list of tenant names")
        self.held_hosts.discard(name)
        if tenants:
            self.host_tenants[name] = tuple(sorted(set(tenants)))
        else:
            self.host_tenants.pop(name, None)
        events.append(StateEvent("node.approved", name, index, term, {"tenants": sorted(set(tenants))}))
        return ApplyResult(True, f"host {name} approved" + (f" for tenants {', '.join(sorted(set(tenants)))}"
                                                            if tenants else ""))

    def _op_secret_init(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Set the cluster secret once; the first entry wins, so two leaders proposing it agree."""
        value = str(cmd["value"])
        if len(value) < 32:
            raise ValueError("the cluster secret must be at least 32 characters")
        if self.cluster_secret:
            return ApplyResult(False, "the cluster secret is already set")
        self.cluster_secret = value
        return ApplyResult(True, "cluster secret set")

    def _op_cluster_format(self, cmd: dict, index: int, term: int, events: list[StateEvent]) -> ApplyResult:
        """Raise the cluster's state format: every member supports it, so newer entries may follow."""
        fmt = cmd["format"]
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise ValueError("format must be an integer")
        if fmt <= self.cluster_format:
            return ApplyResult(False, f"the cluster already runs state format {self.cluster_format}")
        self.cluster_format = fmt
        events.append(StateEvent("cluster.format", str(fmt), index, term, {"format": fmt}))
        return ApplyResult(True, f"cluster state format raised to {fmt}")

    def _check_assignments(self, name: str, assignments: Iterable[Assignment], replicas: int) -> str:
        seen = set()
        for a in assignments:
            if a.deployment != name:
                return f"assignment for {a.deployment!r} inside a command for {name!r}"
            if a.replica in seen:
                return f"replica {a.replica} of {name} assigned twice"
            if a.replica >= replicas:
                return f"replica {a.replica} of {name} is beyond replicas={replicas}"
            if len(a.endpoints) != len(a.plan.parts):
                return f"replica {a.replica} of {name}: {len(a.endpoints)} endpoints for {len(a.plan.parts)} parts"
            seen.add(a.replica)
        return ""

    def _replace_assignments(self, name: str, new: list[Assignment], index: int, term: int,
                             events: list[StateEvent]) -> None:
        old = {a.replica: a for a in self.assignments_for(name)}
        wanted = {a.replica: a for a in new}
        for replica, a in old.items():
            if wanted.get(replica) != a and (s := self.surges.pop((name, replica), None)) is not None:
                # a surge moves one incarnation; a new decision for the replica supersedes it
                events.append(StateEvent("assignment.removed", name, index, term,
                                         {"replica": replica, "instance_id": s.instance_id, "surge": True}))
            if replica not in wanted:
                del self.assignments[(name, replica)]
                events.append(StateEvent("assignment.removed", name, index, term,
                                         {"replica": replica, "instance_id": a.instance_id}))
        for replica, a in sorted(wanted.items()):
            if old.get(replica) != a:
                self.assignments[(name, replica)] = a
                events.append(StateEvent("assignment.set", name, index, term,
                                         {"replica": replica, "instance_id": a.instance_id,
                                          "hosts": sorted({p.host for p in a.plan.parts})}))

    # ------------------------------------------------------------------ snapshots

    def frozen_copy(self) -> ClusterState:
        """A copy that later applies do not change, cheap enough to take on the event loop: containers are
        copied one level deep and mutable records (dataclasses updated in place) are copied; the values inside
        them are immutable (pydantic values, frozen records) and shared. Serialise it in a worker thread."""
        clone = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, dict):
                setattr(clone, name, {k: _record_copy(v) for k, v in value.items()})
            elif isinstance(value, (list, set)):
                setattr(clone, name, type(value)(_record_copy(v) for v in value))
        clone._listeners = []
        return clone

    def snapshot_later(self) -> Callable[[], bytes]:
        """`snapshot` of this moment, to call later (in a worker thread): 10,000 deployments take a second or
        more to serialise, which on the event loop would stall heartbeats (Raft compaction uses this)."""
        return self.frozen_copy().snapshot

    def snapshot(self) -> bytes:
        return json.dumps({
            # The format a reader needs: the state may hold anything the cluster's format allows.
            "format": self.cluster_format,
            "cluster_format": self.cluster_format,
            "last_index": self.last_index,
            "last_term": self.last_term,
            "deployments": [
                {"spec": _dump(r.spec), "created_index": r.created_index,
                 "updated_index": r.updated_index}
                for r in sorted(self.deployments.values(), key=lambda r: r.spec.name)
            ],
            "assignments": [_dump(a) for a in self.all_assignments()],
            "nodes": [vars(n) for n in sorted(self.nodes.values(), key=lambda n: n.name)],
            "api_keys": [r.to_json() for r in apikeys.list_keys(self.api_keys)],
            "join_tokens": [t.to_json() for _, t in sorted(self.join_tokens.items())],
            "cluster_secret": self.cluster_secret,
            # Left out while empty, as every new field at its default (older readers ignore unknown keys).
            **({"revoked_certs": dict(sorted(self.revoked_certs.items()))} if self.revoked_certs else {}),
            **({"held_hosts": sorted(self.held_hosts)} if self.held_hosts else {}),
            **({"legacy_secret": self.legacy_secret, "legacy_instances": sorted(self.legacy_instances)}
               if self.legacy_secret else {}),
            **({"host_tenants": {k: list(v) for k, v in sorted(self.host_tenants.items())}}
               if self.host_tenants else {}),
            **({"idle": sorted(self.idle)} if self.idle else {}),
            **({"leaving": [[d, r, g] for (d, r), g in sorted(self.leaving.items())]} if self.leaving else {}),
            **self._maintenance_snapshot(),
        }, sort_keys=True).encode()

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's; raises UpgradeRequired, changing nothing, for a newer format."""
        raw = json.loads(data)
        needs = raw.get("format", BASELINE_STATE_FORMAT)
        if not isinstance(needs, int) or needs > STATE_FORMAT:
            raise UpgradeRequired(f"the snapshot at index {raw.get('last_index')} needs state format {needs}; "
                                  f"this agent (agentd {AGENT_VERSION}) reads formats up to {STATE_FORMAT}: "
                                  "upgrade it")
        self.deployments = {
            d["spec"]["name"]: DeploymentRecord(DeploymentSpec.model_validate(d["spec"]), d["created_index"],
                                                d["updated_index"])
            for d in raw["deployments"]
        }
        self.assignments = {}
        for a in raw["assignments"]:
            assignment = Assignment.model_validate(a)
            self.assignments[(assignment.deployment, assignment.replica)] = assignment
        self.nodes = {n["name"]: NodeRecord(**n) for n in raw["nodes"]}
        keys = [apikeys.ApiKeyRecord.from_json(k) for k in raw.get("api_keys", [])]
        self.api_keys = {k.id: k for k in keys}
        toks = [tokens.JoinTokenRecord.from_json(t) for t in raw.get("join_tokens", [])]
        self.join_tokens = {t.id: t for t in toks}
        self.cluster_secret = raw.get("cluster_secret", "")
        self.revoked_certs = {str(k): float(v) for k, v in raw.get("revoked_certs", {}).items()}
        self.held_hosts = {str(n) for n in raw.get("held_hosts", [])}
        self.legacy_secret = raw.get("legacy_secret", "")
        self.legacy_instances = frozenset(raw.get("legacy_instances", []))
        self.host_tenants = {str(k): tuple(v) for k, v in raw.get("host_tenants", {}).items()}
        self.idle = {str(n) for n in raw.get("idle", [])}
        self.leaving = {(str(d), int(r)): int(g) for d, r, g in raw.get("leaving", [])}
        self.cluster_format = raw.get("cluster_format", BASELINE_STATE_FORMAT)
        self._maintenance_restore(raw)
        self.last_index, self.last_term = raw["last_index"], raw["last_term"]


def _record_copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not value.__dataclass_params__.frozen:
        return copy.copy(value)
    if isinstance(value, (dict, list, set)):
        return copy.copy(value)
    return value


# ---------------------------------------------------------------------- command builders


def command_format(cmd: dict[str, Any]) -> int:
    """The state format a decoded command needs: its `"v"`, 1 for entries of agentd 0.1.0 (no `"v"`)."""
    v = cmd.get("v", BASELINE_STATE_FORMAT)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else STATE_FORMAT + 1


def _dump(value: Any) -> Any:
    """A value as the log stores it: new fields at their default are left out (agentd.formats)."""
    return formats.dump(value, STATE_FORMAT)


def _encode(cmd: dict[str, Any], *values: Any) -> bytes:
    """Stamp the command with the oldest format that can apply it: its op's, or a newer value's inside it."""
    need = max([OP_SINCE.get(cmd["op"], BASELINE_STATE_FORMAT), *(formats.needed_format(v) for v in values)])
    return json.dumps({**cmd, "v": need}, sort_keys=True, separators=(",", ":")).encode()


def deploy_command(spec: DeploymentSpec, assignments: Iterable[Assignment], replace: bool = False) -> bytes:
    assignments = list(assignments)
    return _encode({"op": "deploy", "spec": _dump(spec), "replace": replace,
                    "assignments": [_dump(a) for a in assignments]}, spec, assignments)


def delete_command(name: str) -> bytes:
    return _encode({"op": "delete", "name": name})


def assign_command(name: str, assignments: Iterable[Assignment], replicas: int) -> bytes:
    assignments = list(assignments)
    return _encode({"op": "assign", "name": name, "replicas": replicas,
                    "assignments": [_dump(a) for a in assignments]}, assignments)


def idle_command(name: str) -> bytes:
    return _encode({"op": "deployment.idle", "name": name})


def wake_command(name: str, assignments: Iterable[Assignment]) -> bytes:
    assignments = list(assignments)
    return _encode({"op": "deployment.wake", "name": name, "assignments": [_dump(a) for a in assignments]},
                   assignments)


def replica_leave_command(a: Assignment) -> bytes:
    return _encode({"op": "replica.leave", "deployment": a.deployment, "replica": a.replica,
                    "generation": a.generation})


def replica_remove_command(a: Assignment) -> bytes:
    return _encode({"op": "replica.remove", "deployment": a.deployment, "replica": a.replica,
                    "generation": a.generation})


def bounds_command(name: str, min_replicas: int | None, max_replicas: int | None) -> bytes:
    return _encode({"op": "deployment.bounds", "name": name,
                    **({"min_replicas": min_replicas} if min_replicas is not None else {}),
                    **({"max_replicas": max_replicas} if max_replicas is not None else {})})


def node_command(name: str, state: str, address: str = "") -> bytes:
    return _encode({"op": "node", "name": name, "state": state, "address": address})


def key_add_command(record: apikeys.ApiKeyRecord) -> bytes:
    return _encode({"op": "key.add", "record": record.to_json()})


def key_revoke_command(key_id: str, at: float) -> bytes:
    return _encode({"op": "key.revoke", "id": key_id, "at": at})


def token_add_command(record: tokens.JoinTokenRecord) -> bytes:
    return _encode({"op": "token.add", "record": record.to_json()})


def token_consume_command(token_id: str, secret_hash: str, node_name: str, at: float) -> bytes:
    return _encode({"op": "token.consume", "id": token_id, "secret_hash": secret_hash, "node_name": node_name,
                    "at": at})


def token_revoke_command(token_id: str) -> bytes:
    return _encode({"op": "token.revoke", "id": token_id})


def node_remove_command(name: str) -> bytes:
    return _encode({"op": "node.remove", "name": name})


def cert_revoke_command(name: str, at: float) -> bytes:
    return _encode({"op": "cert.revoke", "name": name, "at": at})


def secret_rotate_command(value: str) -> bytes:
    return _encode({"op": "secret.rotate", "value": value})


def node_hold_command(name: str) -> bytes:
    return _encode({"op": "node.hold", "name": name})


def node_approve_command(name: str, tenants: Iterable[str] = ()) -> bytes:
    return _encode({"op": "node.approve", "name": name, "tenants": sorted(set(tenants))})


def secret_init_command(value: str) -> bytes:
    return _encode({"op": "secret.init", "value": value})


def cordon_command(c: maintenance.Cordon) -> bytes:
    return _encode(maintenance.cordon_command(c))


def uncordon_command(host: str, gpu: int | None) -> bytes:
    return _encode(maintenance.uncordon_command(host, gpu))


def surge_command(a: Assignment) -> bytes:
    return _encode(maintenance.surge_command(a), a)


def surge_cancel_command(a: Assignment) -> bytes:
    return _encode(maintenance.surge_cancel_command(a))


def promote_command(a: Assignment) -> bytes:
    return _encode(maintenance.promote_command(a))


def retire_command(a: Assignment) -> bytes:
    return _encode(maintenance.retire_command(a))


def cluster_format_command(fmt: int) -> bytes:
    return _encode({"op": "cluster.format", "format": fmt})


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return str(exc)
