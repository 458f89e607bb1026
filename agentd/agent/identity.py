"""Who this agent is on the wire: its node certificate, and which calls must come from the node they name."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from agentd.config import Settings
from agentd.coordinator import host_of
from agentd.errors import ConfigError, NotAvailable
from agentd.security.ca import CA_CERT
from agentd.security.tls import TlsIdentity, load_identity
from agentd.v1 import control_pb2 as pb
from agentd.v1 import raft_pb2 as raft_pb


def _claim(message_cls: Any, field: str) -> Any:
    def claimed(raw: Any) -> str | None:
        try:
            return getattr(message_cls.FromString(raw), field) if isinstance(raw, bytes) else None
        except (DecodeError, ValueError):
            return None  # the handler answers garbage itself
    return claimed


# A peer's certificate name must match the node it speaks for in these calls (agentd.security.auth).
NODE_CLAIMS = {
    "/agentd.v1.Raft/Send": _claim(raft_pb.RaftMessage, "sender"),
    "/agentd.v1.Raft/Join": _claim(raft_pb.RaftJoinRequest, "node_id"),  # a host may not re-address another
    "/agentd.v1.Raft/Leave": _claim(raft_pb.RaftLeaveRequest, "node_id"),  # nor remove another
    "/agentd.v1.Agent/Report": _claim(pb.ReportRequest, "node"),
}


def tls_identity(settings: Settings) -> TlsIdentity:
    """This agent's node identity, or one line telling the operator how to get one."""
    directory = settings.tls_directory
    if not (directory / "node.crt").exists() or not (directory / CA_CERT).exists():
        raise NotAvailable(
            f"no TLS identity for this agent in {directory} (node.crt, node.key, ca.crt): on the first host run "
            "'agentd init-ca'; on the others 'agentd join --token TOKEN --server ADDR' (or 'agentd serve --join "
            "ADDR --token TOKEN'); or pass --insecure for a test rig without TLS")
    identity = load_identity(directory, "node")
    if identity.role != "node":
        raise ConfigError(f"{directory / 'node.crt'} carries the role {identity.role!r}, not 'node'")
    if identity.name != settings.node_name:
        raise ConfigError(f"{directory / 'node.crt'} is for node {identity.name!r} but this agent's node_name is "
                          f"{settings.node_name!r}: pass --node-name {identity.name}, or join again under this name")
    return identity


def check_secure_addresses(settings: Settings) -> None:
    """Model servers bind the advertised address; a wildcard would expose them on every interface."""
    host = host_of(settings.advertise_address)
    if host in ("0.0.0.0", "::", "*"):
        raise ConfigError(f"the advertised address {settings.advertise_address} is a wildcard: set advertise to "
                          "this host's internal address (peers dial it, and model servers bind to it)")
