"""Issue 19, copies between hosts: the raw byte stream beside gRPC (agentd/api/transfer.py).

Real sockets on loopback, real certificates from a cluster CA, a real gRPC server with the Models service:
a ticket is redeemed once, by the caller it was issued for (its node certificate), and the bytes arrive
whole from any offset; a Fetcher copies and verifies a file over the stream, and over Models.Fetch from a
holder that has no transfer listener (an older agent).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import grpc
import pytest

from agentd.api.fetch import Fetcher, ModelsService
from agentd.api.transfer import Receive, TransferBroken, TransferRefused, TransferServer
from agentd.security import ca as C
from agentd.security.tunnel import client_context, peer_refusal, server_context
from agentd.types import HeldModel, ModelFile
from agentd.v1 import models_pb2_grpc as mpb_grpc

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    authority = C.create_ca()
    for name, role in (("holder", C.ROLE_NODE), ("gpu-1", C.ROLE_NODE), ("gpu-2", C.ROLE_NODE), ("alice", "admin")):
        C.save_identity(root / name, "node", C.issue_identity(authority, name, role=role, addresses=["127.0.0.1"]))
    return root


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("src") / "big.gguf"
    data = os.urandom(9 * MiB + 12345)  # more than two receive buffers, and not a multiple of one
    path.write_bytes(data)
    return path, data


def server(dirs: Path | None) -> TransferServer:
    if dirs is None:
        return TransferServer("127.0.0.1", 0, context=lambda: None)
    return TransferServer("127.0.0.1", 0, context=lambda: server_context(dirs / "holder"),
                          peer_refusal=lambda s, caller: peer_refusal(s, frozenset({caller})))


def receive(tmp: Path, srv: TransferServer, ticket: str, ctx, want: int) -> tuple[int, bytes, str]:
    out_path = tmp / "out"
    sha = hashlib.sha256()
    seen = []
    with open(out_path, "ab", buffering=0) as out:
        r = Receive(("127.0.0.1", srv.port), ticket, ctx, C.NODE_SAN, out, sha, seen.append)
        got = r.run(want)
    assert sum(seen) == got
    return got, out_path.read_bytes(), sha.hexdigest()


@pytest.mark.parametrize("offset", [0, 1, 4 * MiB, 9 * MiB + 12345])
def test_plain_stream_sends_the_file_from_the_offset(tmp_path, blob, offset):
    path, data = blob
    srv = server(None)
    try:
        got, out, sha = receive(tmp_path, srv, srv.issue("", path, offset), None, len(data) - offset)
    finally:
        srv.close()
    assert got == len(data) - offset
    assert out == data[offset:]
    assert sha == hashlib.sha256(data[offset:]).hexdigest()


def test_mtls_stream_for_the_ticket_s_caller(tmp_path, dirs, blob):
    path, data = blob
    srv = server(dirs)
    try:
        got, out, sha = receive(tmp_path, srv, srv.issue("gpu-1", path, 0), client_context(dirs / "gpu-1"), len(data))
    finally:
        srv.close()
    assert (got, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert out == data


def test_a_ticket_is_used_once_and_only_by_its_caller(tmp_path, dirs, blob):
    path, data = blob
    srv = server(dirs)
    try:
        ticket = srv.issue("gpu-1", path, 0)
        with pytest.raises(TransferRefused, match="not one this tunnel serves"):  # another node's certificate
            receive(tmp_path, srv, ticket, client_context(dirs / "gpu-2"), len(data))
        with pytest.raises(TransferRefused, match="unknown or expired"):  # redeemed (and refused) already
            receive(tmp_path, srv, ticket, client_context(dirs / "gpu-1"), len(data))
        with pytest.raises(TransferRefused, match="has role 'admin'"):
            receive(tmp_path, srv, srv.issue("alice", path, 0), client_context(dirs / "alice"), len(data))
        with pytest.raises(TransferRefused, match="unknown or expired"):
            receive(tmp_path, srv, "made-up", client_context(dirs / "gpu-1"), len(data))
    finally:
        srv.close()


def test_an_expired_ticket_is_refused(tmp_path, blob):
    path, data = blob
    now = [100.0]
    srv = TransferServer("127.0.0.1", 0, context=lambda: None, clock=lambda: now[0])
    try:
        ticket = srv.issue("", path, 0)
        now[0] += 31
        with pytest.raises(TransferRefused, match="expired"):
            receive(tmp_path, srv, ticket, None, len(data))
    finally:
        srv.close()


def test_a_client_without_a_certificate_gets_nothing(tmp_path, dirs, blob):
    import ssl

    path, data = blob
    srv = server(dirs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(dirs / "holder" / C.CA_CERT)
    try:
        with pytest.raises((TransferBroken, TransferRefused)):
            receive(tmp_path, srv, srv.issue("gpu-1", path, 0), ctx, len(data))
    finally:
        srv.close()
    assert not (tmp_path / "out").exists() or (tmp_path / "out").read_bytes() == b""


def test_a_closed_port_is_a_broken_transfer(tmp_path, blob):
    srv = server(None)
    srv.close()
    with pytest.raises(TransferBroken, match="cannot connect"):
        receive(tmp_path, srv, "x", None, 10)


@pytest.mark.parametrize("secure", [False, True])
def test_every_byte_before_the_holder_stops_is_written_and_hashed(tmp_path, dirs, blob, secure):
    """The file ends before `want` (as when a holder goes away): the last, partial piece is kept for a resume."""
    from agentd.api import transfer

    path, data = blob
    assert len(data) % transfer.PIECE  # the last piece is a partial one
    srv = server(dirs if secure else None)
    sha, seen = hashlib.sha256(), []
    try:
        with open(tmp_path / "out", "ab", buffering=0) as out:
            r = Receive(("127.0.0.1", srv.port), srv.issue("gpu-1" if secure else "", path, 0),
                        client_context(dirs / "gpu-1") if secure else None, C.NODE_SAN, out, sha, seen.append)
            with pytest.raises(TransferBroken, match=f"closed the stream after {len(data)} of {len(data) + 1000}"):
                r.run(len(data) + 1000)
    finally:
        srv.close()
    assert sum(seen) == len(data)
    assert (tmp_path / "out").read_bytes() == data
    assert sha.hexdigest() == hashlib.sha256(data).hexdigest()


def test_cancel_ends_the_copy_and_what_was_written_is_what_was_hashed(tmp_path, blob):
    path, data = blob
    srv = server(None)
    sha, seen = hashlib.sha256(), []

    def on_bytes(n: int) -> None:
        seen.append(n)
        r.cancel()  # from the receiving thread itself: the next receive finds the socket shut

    try:
        with open(tmp_path / "out", "ab", buffering=0) as out:
            r = Receive(("127.0.0.1", srv.port), srv.issue("", path, 0), None, C.NODE_SAN, out, sha, on_bytes)
            with pytest.raises(TransferBroken, match="cancelled"):
                r.run(len(data))
    finally:
        srv.close()
    written = (tmp_path / "out").read_bytes()
    assert 0 < len(written) == sum(seen) < len(data)
    assert written == data[:len(written)]
    assert sha.hexdigest() == hashlib.sha256(written).hexdigest()


def test_a_hash_that_fails_ends_the_copy_with_its_error_and_does_not_hang(tmp_path, blob):
    """The hashing thread's failure reaches the receiving thread: more pieces than are in flight still flow."""
    from agentd.api import transfer

    path, data = blob
    assert len(data) > transfer.PIECE * (transfer.PIECES + 1)

    class BrokenSha:
        def update(self, data) -> None:
            raise MemoryError("no room to hash")

    srv = server(None)
    try:
        with open(tmp_path / "out", "ab", buffering=0) as out:
            r = Receive(("127.0.0.1", srv.port), srv.issue("", path, 0), None, C.NODE_SAN, out, BrokenSha(),
                        lambda n: None)
            with pytest.raises(MemoryError, match="no room to hash"):
                r.run(len(data))
    finally:
        srv.close()


# --------------------------------------------------------------------------- the Fetcher over both paths


def held(path: Path, data: bytes) -> HeldModel:
    from agentd.modelinfo import inspect_model
    from agentd.testing.gguf import write_tiny_llama_gguf

    # A holder serves only models it could run: the facts are irrelevant to the copy, any will do.
    info = inspect_model(write_tiny_llama_gguf(path.parent / "facts.gguf"))
    sha = hashlib.sha256(data).hexdigest()
    return HeldModel(name="big", digest="sha256:" + sha, path=str(path), size=len(data),
                     files=(ModelFile(name=path.name, size=len(data), sha256=sha),), info=info)


async def fetch_once(tmp: Path, model: HeldModel, *, transfer: TransferServer | None, client: bool,
                     **fetcher_args) -> tuple[str, int]:
    """Serve `model` over a real gRPC server and fetch it into tmp/dest; (the fetch's state, Opens issued)."""
    opened = []
    if transfer is not None:
        issue = transfer.issue
        transfer.issue = lambda *a: opened.append(a) or issue(*a)

    async def locate(digest, caller):
        return model, []

    grpc_server = grpc.aio.server()
    service = ModelsService(models=lambda: [model], locate=locate, transfer=transfer)
    mpb_grpc.add_ModelsServicer_to_server(service, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def where(digest):
        return model, [("holder", f"127.0.0.1:{port}")]

    done = asyncio.Event()
    fetcher = Fetcher(node="me", model_dir=tmp / "dest", channel=lambda a: channel, locate=where,
                      on_change=done.set, transfer_context=(lambda: None) if client else None, **fetcher_args)
    try:
        f = fetcher.ensure("big", model.digest)
        async with asyncio.timeout(60):
            await done.wait()
        return f"{f.state} {f.reason}", len(opened)
    finally:
        await fetcher.close()
        await channel.close()
        await grpc_server.stop(None)
        service.close()


@pytest.mark.parametrize("holder_has_transfer", [True, False])
def test_fetcher_copies_and_verifies_over_the_stream_or_fetch(tmp_path, blob, holder_has_transfer):
    path, data = blob
    model = held(path, data)
    srv = server(None) if holder_has_transfer else None
    state, opens = asyncio.run(fetch_once(tmp_path, model, transfer=srv, client=True))
    assert state.startswith("DONE"), state
    assert opens == (1 if holder_has_transfer else 0)
    assert (tmp_path / "dest" / path.name).read_bytes() == data
    assert not list((tmp_path / "dest").glob(".fetch-*"))


def test_the_rate_limit_paces_the_stream_after_every_piece(tmp_path, blob, monkeypatch):
    """model_fetch_rate on the raw stream: after each piece the receiving thread waits until the bytes so far are
    due at that rate. The clock stands still, so each wait asked for is (bytes so far) / rate."""
    from agentd.api import transfer

    path, data = blob
    waits: list[float] = []
    monkeypatch.setattr(transfer.Receive, "pause", lambda self, seconds: waits.append(seconds))
    rate = 100 * MiB
    state, _ = asyncio.run(fetch_once(tmp_path, held(path, data), transfer=server(None), client=True, rate=rate,
                                      clock=lambda: 1000.0))
    assert state.startswith("DONE"), state
    assert len(waits) == -(-len(data) // transfer.PIECE)
    assert waits == sorted(waits)
    assert waits[-1] == pytest.approx(len(data) / rate)


def test_fetcher_resumes_a_partial_file_over_the_stream(tmp_path, blob):
    path, data = blob
    model = held(path, data)
    tmp = tmp_path / "dest" / f".fetch-{model.digest.removeprefix('sha256:')[:16]}"
    tmp.mkdir(parents=True)
    (tmp / (path.name + ".partial")).write_bytes(data[: 5 * MiB + 7])
    srv = server(None)
    state, opens = asyncio.run(fetch_once(tmp_path, model, transfer=srv, client=True))
    assert state.startswith("DONE"), state
    assert opens == 1  # from the partial's end: one stream, no restart from zero
    assert (tmp_path / "dest" / path.name).read_bytes() == data


def test_a_corrupt_stream_is_discarded_not_installed(tmp_path, blob):
    path, data = blob
    bad = tmp_path / "src" / path.name
    bad.parent.mkdir()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the holder's bytes no longer match its manifest
    model = held(path, data).model_copy(update={"path": str(bad)})
    state, _ = asyncio.run(fetch_once(tmp_path, model, transfer=server(None), client=True))
    assert state.startswith("FATAL") and "does not match the model's digest" in state, state
    assert not (tmp_path / "dest" / path.name).exists()


# --------------------------------------------------------------------------- a FATAL fetch is tried again


class Holder:
    """A holder agent's Models service and transfer listener on loopback, counting the Opens it answers."""

    def __init__(self, model: HeldModel):
        self.model = model
        self.opens = 0
        self.transfer = server(None)
        issue = self.transfer.issue

        def counted(*a):
            self.opens += 1
            return issue(*a)

        self.transfer.issue = counted

    async def start(self) -> str:
        async def locate(digest, caller):
            return self.model, []

        self.grpc = grpc.aio.server()
        self.service = ModelsService(models=lambda: [self.model], locate=locate, transfer=self.transfer)
        mpb_grpc.add_ModelsServicer_to_server(self.service, self.grpc)
        port = self.grpc.add_insecure_port("127.0.0.1:0")
        await self.grpc.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.grpc.stop(None)
        self.service.close()


async def fetch_with_retries(tmp: Path, blob, *, good_holder_after_first_failure: bool):
    path, data = blob
    model = held(path, data)
    bad_path = tmp / "bad" / path.name
    bad_path.parent.mkdir()
    bad_path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    bad, good = Holder(model.model_copy(update={"path": str(bad_path)})), Holder(model)
    addresses = {"bad": await bad.start(), "good": await good.start()}
    channels = {a: grpc.aio.insecure_channel(a) for a in addresses.values()}
    holders = [("bad", addresses["bad"])]

    async def where(digest):
        return model, list(holders)

    fetcher = Fetcher(node="me", model_dir=tmp / "dest", channel=channels.__getitem__, locate=where,
                      transfer_context=lambda: None, retry_rounds=3, retry_base=0.2, retry_cap=0.4)
    reasons = []
    try:
        async with asyncio.timeout(90):
            while True:  # as the reconciler does: ensure() on every pass
                f = fetcher.ensure("big", model.digest)
                if f.state == "FATAL" and (not reasons or reasons[-1] != f.reason):
                    reasons.append(f.reason)
                    if good_holder_after_first_failure:
                        holders.append(("good", addresses["good"]))
                if f.state == "DONE" or (f.state == "FATAL" and f.retry_at is None):
                    break
                await asyncio.sleep(0.05)
        return f, reasons, bad.opens, good.opens
    finally:
        await fetcher.close()
        for c in channels.values():
            await c.close()
        await bad.stop()
        await good.stop()


def test_a_failed_fetch_is_retried_from_a_new_holder_not_the_corrupt_one(tmp_path, blob):
    f, reasons, bad_opens, good_opens = asyncio.run(
        fetch_with_retries(tmp_path, blob, good_holder_after_first_failure=True))
    assert f.state == "DONE", f.reason
    assert "does not match the model's digest" in reasons[0] and "retry 1 of 3 in" in reasons[0], reasons
    assert (bad_opens, good_opens) == (1, 1)  # the corrupt copy was read once, never again
    assert (tmp_path / "dest" / Path(f.path).name).read_bytes() == blob[1]


def test_a_corrupt_only_holder_is_not_retried_forever(tmp_path, blob):
    f, reasons, bad_opens, _ = asyncio.run(fetch_with_retries(tmp_path, blob, good_holder_after_first_failure=False))
    assert f.state == "FATAL" and f.retry_at is None
    assert [r.split("; retry ")[-1][:4] for r in reasons[:3]] == ["1 of", "2 of", "3 of"], reasons
    assert "gave up after 3 retries" in f.reason and "no other host holds a copy to try" in f.reason, f.reason
    assert bad_opens == 1  # each retry saw that the only holder's copy had failed verification
    assert not (tmp_path / "dest" / "big.gguf").exists()

