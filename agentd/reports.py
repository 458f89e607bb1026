"""The leader's side of host reports: what a report, a stream of reports or a voter's relayed batch does to
the coordinator's soft state (docs/cluster.md, "Liveness by lease" and "Reports through a voter").

Coordinator layer (shared/DESIGN.md section 2): it knows the coordinator and the replicated state, never
gRPC. The API (`agentd/api/control.py`, AgentService) translates messages into the plain values taken here
and turns `AgentdError`s into status codes: `InvalidInput` (not an inventory, a first message that lacks
what a first message carries) is INVALID_ARGUMENT, `PeerError` (a removed host, an incompatible agent) is
FAILED_PRECONDITION.

One `HostSession` holds what one stream said of one host, on a host's own stream to the leader and inside
a voter's relay stream alike, so both paths renew a lease and replace a report by the same rules.

A stream's first message may name the host's inventory by its digest (`inventory_digest`) instead of carrying
it: a host that falls back to the leader, a voter's relay stream that re-opens, a host back on a stream after a
leader change. The leader takes it from its inventory cache when it holds that very inventory (it is soft
state, kept across terms: a voter elected again holds what it was told when it led), and raises
`ResendInventory` when not, so that only what it lacks crosses the wire (docs/cluster.md, "Reports through a
voter").
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from agentd import formats
from agentd.coordinator import Coordinator, InstanceReport, NodeReport, removed_message
from agentd.errors import InvalidInput, PeerError, validation_message
from agentd.logs import fields
from agentd.types import HostInventory
from agentd.version import AGENT_VERSION, PeerVersion, incompatibility

log = logging.getLogger(__name__)

Restarts = list[tuple[str, int, str]]  # (address, port, reason) of peer processes restarted


def inventory_digest(inventory_json: str) -> bytes:
    """What names an inventory on the report path (ReportUpdate.inventory_digest): SHA-256 of its JSON."""
    return hashlib.sha256(inventory_json.encode()).digest()


class ResendInventory(Exception):
    """An update named its host's inventory by a digest this leader does not hold: nothing of it was taken,
    and the reporter (the host, or the voter that relays it) sends it again with the inventory."""


@dataclass
class ReportDesk:
    """Where reports arrive on the leader: validation, the inventory cache, recording, lease renewal.

    `invite(node)`: whether that host should join Raft as a standby learner (the daemon decides);
    `on_instance_state(report)`: a reported part changed state (Control's Watch publishes it);
    `on_inventory(how)`: an inventory arrived `whole` (its JSON crossed), `named` (by a digest this leader
    holds) or `asked` (by a digest it does not hold: it comes again whole) - the daemon's metrics.
    """

    coordinator: Coordinator
    on_instance_state: Callable[[InstanceReport], None] = lambda report: None
    invite: Callable[[str], bool] = lambda node: False
    on_inventory: Callable[[str], None] = lambda how: None
    # node -> (inventory JSON, its digest, parsed): a host's heartbeats mostly repeat its inventory, and at
    # hundreds of hosts validating it again was the coordinator's largest cost per report. The digest is the
    # leader's own, so a host's word is never taken for what the leader holds.
    _inventories: dict[str, tuple[str, bytes, HostInventory]] = field(default_factory=dict)
    # node -> the address of the voter a watcher last said it watches from (agentd nodes: WATCHES); soft
    # state, as the reports themselves: a new leader learns it from each watcher's next stream.
    watching: dict[str, str] = field(default_factory=dict)

    def admit(self, node: str) -> None:
        """Refuse a host `agentd nodes rm` removed."""
        if self.coordinator.state.removed(node):
            raise PeerError(removed_message(node))

    def agent(self, node: str, version: str, state_format: int, wire_version: int,
              upgrade_required: str) -> PeerVersion:
        """The reporting agent's version, refused when this leader cannot work with it."""
        agent = PeerVersion.reported(version, state_format, wire_version, upgrade_required[:1000])
        if why := incompatibility(AGENT_VERSION, agent.version):
            log.warning("report from an incompatible agent refused", extra=fields(node=node, reason=why))
            raise PeerError(f"report from {node!r} refused: {why}")
        return agent

    def inventory(self, node: str, inventory_json: str) -> HostInventory:
        self.on_inventory("whole")
        cached = self._inventories.get(node)
        if cached is not None and cached[0] == inventory_json:
            return cached[2]
        try:
            # A newer agent may report fields this one does not know: safe to leave out of an inventory.
            inventory = formats.validate_lenient(HostInventory, inventory_json)
        except ValidationError as exc:
            why = validation_message(exc, root="inventory_json")
            log.warning("garbage report refused", extra=fields(node=node, error=why[:200]))
            raise InvalidInput(f"report from {node!r}: not a host inventory: {why}") from None
        if inventory.name != node:
            raise InvalidInput(f"report from {node!r} carries the inventory of {inventory.name!r}")
        self._inventories[node] = (inventory_json, inventory_digest(inventory_json), inventory)
        return inventory

    def held(self, node: str, digest: bytes) -> HostInventory:
        """The inventory of `node` this leader holds under `digest`; ResendInventory when it holds another or
        none (a leader elected for the first time, a host whose inventory changed meanwhile)."""
        cached = self._inventories.get(node)
        if cached is None or cached[1] != digest:
            self.on_inventory("asked")
            raise ResendInventory(node)
        self.on_inventory("named")
        return cached[2]

    def activity(self, node: str, activity: dict[str, tuple[float, int]]) -> None:
        self.coordinator.on_activity(node, activity)

    def accept(self, inventory: HostInventory, instances: list[InstanceReport],
               agent: PeerVersion = PeerVersion(), via: str = "") -> Restarts:
        """Record a host's report (also the leader's own); returns the peer restarts that host must act on."""
        previous = self.coordinator.reports.get(inventory.name)
        before = {(i.instance_id, i.part): i.state for i in previous.instances} if previous else {}
        self.coordinator.on_report(inventory, instances, agent)
        rep = self.coordinator.reports.get(inventory.name)
        if rep is not None:
            rep.via = via
        for i in instances:
            if before.get((i.instance_id, i.part)) != i.state:
                self.on_instance_state(i)
        return self.coordinator.take_peer_restarts(inventory.name)

    def session(self, node: str, via: str = "") -> HostSession:
        return HostSession(self, node, via)


@dataclass
class HostSession:
    """What one stream has said of one host: each update carries only what changed, and an update that
    changed nothing renews the host's lease (Coordinator.renew) without touching its report."""

    desk: ReportDesk
    node: str
    via: str = ""  # the voter that relays this host's reports; "" on the host's own stream
    inventory: HostInventory | None = None
    instances: list[InstanceReport] = field(default_factory=list)
    agent: PeerVersion = field(default_factory=PeerVersion)
    recorded: NodeReport | None = None  # the coordinator's report this session last wrote

    def apply(self, *, inventory_json: str = "", instances: list[InstanceReport] | None = None,
              agent: tuple[str, int, int, str] | None = None,
              activity: dict[str, tuple[float, int]] | None = None, watches: str = "",
              inventory_digest: bytes = b"") -> Restarts:
        """One update: empty/None arguments are unchanged; `inventory_digest` without `inventory_json` names an
        inventory this leader may hold (ResendInventory when it does not: then nothing of the update is
        taken). Returns the peer restarts the host must act on."""
        desk = self.desk
        desk.admit(self.node)
        named = desk.held(self.node, inventory_digest) if inventory_digest and not inventory_json else None
        if watches:
            desk.watching[self.node] = watches[:300]
        changed = False
        if agent is not None:
            self.agent = desk.agent(self.node, *agent)
            changed = True
        if inventory_json:
            self.inventory = desk.inventory(self.node, inventory_json)
            changed = True
        elif named is not None:
            self.inventory = named
            changed = True
        if self.inventory is None:
            raise InvalidInput(f"the first report of {self.node!r} on a stream carries its inventory and agent "
                               "version")
        if instances is not None:
            self.instances = instances
            changed = True
        if activity is not None:
            desk.activity(self.node, activity)
        # A bare renewal keeps the report this session recorded; one recorded since by anything else (another
        # stream or a unary Report of the same host) is replaced by what this session knows.
        coordinator = desk.coordinator
        if changed or coordinator.reports.get(self.node) is not self.recorded or not coordinator.renew(self.node):
            restarts = desk.accept(self.inventory, self.instances, self.agent, self.via)
            self.recorded = coordinator.reports.get(self.node)
            return restarts
        self.recorded.via = self.via
        return coordinator.take_peer_restarts(self.node)

    def renew(self) -> Restarts:
        """The host's lease, vouched for by the voter that holds its stream (a relay's `live` list). A report
        recorded since by another stream is that stream's: the host moved (to the leader, or to another
        voter) and the voter that vouches still heard it lately; its word neither renews nor replaces it."""
        current = self.desk.coordinator.reports.get(self.node)
        if current is not None and self.recorded is not None and current is not self.recorded:
            return []
        return self.apply()
