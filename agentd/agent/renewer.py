"""Renewing this host's certificate through the cluster (the pure rules are in agentd/security/renewal.py)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import grpc

from agentd.errors import AgentdError, NotAvailable
from agentd.logs import fields
from agentd.security import renewal
from agentd.security.ca import ROLE_NODE, IssuedIdentity, save_identity, sign_csr
from agentd.security.channel import channel_options
from agentd.security.tls import channel_credentials, load_identity
from agentd.v1 import security_pb2 as sec_pb
from agentd.v1 import security_pb2_grpc as sec_pb_grpc

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon

log = logging.getLogger(__name__)


class CertificateRenewer:
    """Renews once a third of the certificate's lifetime is left; swaps the credentials of every channel."""

    def __init__(self, d: Daemon):
        self.d = d

    async def run(self) -> None:
        """Checked at start and hourly, retried every minute after a failure."""
        while True:
            delay = renewal.CHECK_INTERVAL
            try:
                await self.renew()
            except (AgentdError, grpc.aio.AioRpcError, OSError) as exc:
                log.warning("could not renew this host's certificate; retrying", extra=fields(error=str(exc)[:300]))
                delay = renewal.RETRY_INTERVAL
            await asyncio.sleep(delay)

    async def renew(self) -> str:
        """Renew if due; returns the sentence logged ("" when not due)."""
        d = self.d
        assert d.identity is not None
        why = renewal.renewal_due(d.identity.cert_pem, dt.datetime.now(dt.UTC))
        if not why:
            return ""
        request = renewal.renewal_request(d.identity.cert_pem)
        if d.joins is not None and d.joins.signer:  # a signer renews itself
            cert = sign_csr(d.joins.ca, request.csr_pem, role=ROLE_NODE)
            ca_pem, signer = d.joins.ca.cert_pem, d.node
        else:
            cert, ca_pem, signer = await self._through_cluster(request.csr_pem)
        await asyncio.to_thread(save_identity, d.s.tls_directory, "node",
                                IssuedIdentity(key_pem=request.key_pem, cert_pem=cert, ca_pem=ca_pem))
        identity = await asyncio.to_thread(load_identity, d.s.tls_directory, "node")  # checks chain and key
        d.identity = identity
        credentials = channel_credentials(identity)
        d.raft.transport.set_credentials(credentials, channel_options())
        old = d.channels.set_credentials(credentials)
        d.spawn(_close_later(old), "close-old-channels")
        sentence = f"renewed this host's certificate: {why}"
        log.info(sentence, extra=fields(node=d.node, signer=signer))
        return sentence

    async def _through_cluster(self, csr_pem: bytes) -> tuple[bytes, bytes, str]:
        """Ask the members, the leader first, until a signer renews (the others answer 'not a signer')."""
        raft = self.d.raft
        own = getattr(raft.members.get(self.d.node), "address", None)
        order = [raft.leader_address or ""] + [getattr(m, "address", "") for _, m in sorted(raft.members.items())]
        tried, last = set(), "no member is known yet"
        for address in order:
            if not address or address == own or address in tried:
                continue
            tried.add(address)
            stub = sec_pb_grpc.SecurityStub(self.d.channels.get(address))
            try:
                reply = await stub.RenewCertificate(sec_pb.RenewCertificateRequest(csr_pem=csr_pem), timeout=10.0)
                return reply.cert_pem, reply.ca_pem, reply.signer
            except grpc.aio.AioRpcError as exc:
                last = f"{address}: {exc.code().name}: {exc.details()}"
        raise NotAvailable(f"no signer renewed this host's certificate ({last})")


async def _close_later(channels: list[Any], grace: float = 60.0) -> None:
    await asyncio.sleep(grace)  # calls in flight on the old channels finish first
    for ch in channels:
        with contextlib.suppress(Exception):
            await ch.close()
