"""Copies of models between hosts (docs/models.md): this host serves what it holds by digest, and fetches a
part's model from a peer before the part launches."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from agentd.api.fetch import Fetcher, ModelsService
from agentd.api.transfer import TransferServer
from agentd.catalog import held_copy
from agentd.errors import NotAvailable
from agentd.inventory.models import file_key
from agentd.security.tunnel import client_context, peer_refusal, server_context
from agentd.types import HeldModel
from agentd.v1 import models_pb2 as mpb
from agentd.v1 import models_pb2_grpc as mpb_grpc

if TYPE_CHECKING:
    from agentd.agent.wiring import Daemon


class ModelSharing:
    """The Models service and the fetcher, with what they ask of this agent (its inventory, the leader)."""

    def __init__(self, d: Daemon):
        self.d = d
        s = d.s
        tls = None if s.insecure else s.tls_directory
        host = s.listen.rpartition(":")[0].strip("[]")
        try:
            transfer = TransferServer(host, s.model_transfer_port,
                                      context=(lambda: server_context(tls)) if tls is not None else (lambda: None),
                                      peer_refusal=lambda sock, caller: peer_refusal(sock, frozenset({caller} - {""})))
        except OSError as exc:
            raise NotAvailable(f"cannot listen for model copies on {host}:{s.model_transfer_port} "
                               f"(model_transfer_port): {exc.strerror or exc}") from None
        self.service = ModelsService(models=self.held_models, locate=self.locate, users=self.model_users,
                                     removed=self.changed, transfer=transfer)
        self.fetcher = Fetcher(node=d.node, model_dir=s.model_directories[0], channel=d.channels.get,
                               locate=self.locate_remote, on_file=self.fetched_file, on_change=self.changed,
                               concurrency=s.model_fetch_concurrency, rate=s.model_fetch_rate,
                               transfer_context=(lambda: client_context(tls)) if tls is not None else (lambda: None))

    async def close(self) -> None:
        await self.fetcher.close()
        self.service.close()

    def model_users(self, copy: HeldModel) -> list[str]:
        """The deployments that use this copy: by digest (catalog names) or by its path (absolute paths)."""
        def uses(model: str) -> bool:
            return bool(copy.digest and model.endswith("@" + copy.digest)) or model.rstrip("/") == copy.path

        state = self.d.state
        users = {name for name, rec in state.deployments.items() if uses(rec.spec.model)}
        return sorted(users | {a.deployment for a in state.incarnations() if uses(a.model)})

    def held_models(self) -> tuple[HeldModel, ...]:
        inventory = self.d.refresher.latest
        return inventory.models if inventory is not None else ()

    async def locate(self, digest: str, caller: str) -> tuple[HeldModel | None, list[tuple[str, str]]]:
        """A model's manifest and the live hosts with a complete copy (the leader's reports)."""
        d = self.d
        if not d.raft.is_leader:
            model, holders = await self.locate_remote(digest)
            return model, [h for h in holders if h[0] != caller]
        live = {h.name for h in d.coordinator.live_hosts()}
        model, holders = None, []
        for name, rep in sorted(d.coordinator.reports.items()):
            copy = held_copy(rep.inventory.models, "@" + digest)
            if copy is None or name == caller or name not in live:
                continue
            model = model or copy
            holders.append((name, rep.inventory.address))
        return model, holders

    async def locate_remote(self, digest: str) -> tuple[HeldModel, list[tuple[str, str]]]:
        d = self.d
        if d.raft.is_leader:
            model, holders = await self.locate(digest, d.node)
            if model is None:
                raise LookupError(f"no live host reports a complete copy of {digest}")
            return model, holders
        if not d.raft.leader_address:
            raise LookupError("no leader to ask where the model is")
        stub = mpb_grpc.ModelsStub(d.channels.get(d.raft.leader_address))
        reply = await stub.Locate(mpb.LocateRequest(digest=digest), timeout=5.0)
        return HeldModel.model_validate_json(reply.model_json), [(h.host, h.address) for h in reply.holders]

    def fetched_file(self, path: Path, sha256: str) -> None:
        """A fetched file was verified while written: its digest goes to the cache, so it is not hashed again."""
        catalog = self.d.collector.catalog
        if catalog is not None:
            with contextlib.suppress(OSError):
                catalog.hasher.cache.put(file_key(path), sha256)

    def changed(self) -> None:
        self.d.refresher.refresh_now()
        self.d.reconciler.now.set()
        self.d.reporter.now.set()
