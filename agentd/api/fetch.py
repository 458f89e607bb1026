"""Copies of model files between agents (docs/models.md, "Copies between hosts").

A host assigned a part whose model it lacks fetches the files from a peer that holds them, before the
part is launched:

- by digest only: the request names the model's digest and one of the file names the holder itself
  listed; the holder maps them to its own path, so a caller can never name a path;
- over the agents' own gRPC channel (mTLS and the node role in a secure cluster);
- resumable: each file is written to `<dir>/.fetch-<digest>/<file>.partial`, and a retry (another holder,
  or this one after an agent restart) asks from the bytes already there;
- verified: the sha256 is computed while writing (the prefix of a resumed file is hashed first) and
  compared with the holder's manifest; a mismatch discards the file and fetches it again, up to a limit,
  so bad bytes are never served; verified files are renamed into place, the model's directory last;
- bounded: a few fetches at a time, an optional byte rate, and blocking file I/O in threads of its own
  (never on the event loop, never on the default executor);
- a full disk ends the fetch at once: the partial files are removed and the reason reported (FATAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agentd.api.transfer import Receive, TransferBroken, TransferRefused, TransferServer, write_all
from agentd.logs import fields
from agentd.security.ca import NODE_SAN
from agentd.types import GiB, HeldModel, ModelFile, held_copy
from agentd.v1 import models_pb2 as mpb
from agentd.v1 import models_pb2_grpc as mpb_grpc

log = logging.getLogger("agentd.fetch")

CHUNK = 1024 * 1024  # gRPC messages: 4 MiB ones let the event loop lag past 50 ms under load
ATTEMPTS = 6  # per fetch: a dead holder, a corrupt copy; then the fetch fails with the last reason
RETRY_DELAY = 0.5
# A failed fetch (FATAL) is tried again while its assignment stands, this many times, after a backoff that
# doubles from RETRY_BASE up to RETRY_CAP seconds (a full disk freed, a holder back, a new holder reported).
RETRY_ROUNDS = 8
RETRY_BASE = 10.0
RETRY_CAP = 300.0


# --------------------------------------------------------------------------- the holder's side


class ModelsService(mpb_grpc.ModelsServicer):
    """Serves this host's model files by digest, and (on the leader) where a model's copies are."""

    def __init__(self, *, models: Callable[[], Sequence[HeldModel]],
                 locate: Callable[[str, str], Awaitable[tuple[HeldModel | None, list[tuple[str, str]]]]],
                 users: Callable[[HeldModel], list[str]] = lambda m: [],
                 removed: Callable[[], None] = lambda: None,
                 threads: int = 4, chunk: int = CHUNK, transfer: TransferServer | None = None):
        self._models = models
        self.transfer = transfer  # the raw byte stream's listener (Open); None: Fetch only
        self._locate = locate
        self._users = users
        self._removed = removed
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="agentd-fetch-serve")
        self.chunk = chunk

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def Locate(self, request, context):
        caller = _caller_name(context)
        model, holders = await self._locate(request.digest, caller)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no host reports a complete copy of {request.digest}")
        return mpb.LocateReply(model_json=model.model_dump_json(),
                               holders=[mpb.Holder(host=h, address=a) for h, a in holders])

    async def _file(self, request, context) -> tuple[ModelFile, Path]:
        copy = held_copy(self._models(), f"@{request.digest}") if request.digest else None
        if copy is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this host holds no complete copy of {request.digest}")
        entry = next((f for f in copy.files if f.name == request.file), None)
        if entry is None:  # only names from our own manifest: never a path the caller chose
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.file!r} is not a file of {request.digest}")
        return entry, model_base(copy) / entry.name

    async def Open(self, request, context):
        """A ticket for the file as a raw byte stream (agentd/api/transfer.py): the same checks as Fetch."""
        if self.transfer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this agent serves copies over Fetch only")
        entry, path = await self._file(request, context)
        ticket = self.transfer.issue(_caller_name(context), path, request.offset)
        return mpb.OpenReply(ticket=ticket, port=self.transfer.port, size=entry.size, sha256=entry.sha256)

    async def Fetch(self, request, context):
        entry, path = await self._file(request, context)
        loop = asyncio.get_running_loop()
        try:
            f = await loop.run_in_executor(self._pool, _open_at, path, request.offset)
        except OSError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read {entry.name}: {exc.strerror or exc}")
        ahead = loop.run_in_executor(self._pool, f.read, self.chunk)
        try:
            offset = request.offset
            first = True
            while True:
                data = await ahead
                if data:  # read the next chunk while this one is sent
                    ahead = loop.run_in_executor(self._pool, f.read, self.chunk)
                if not data:
                    if first:
                        yield mpb.FileChunk(offset=offset, size=entry.size, sha256=entry.sha256)
                    return
                if first:
                    yield mpb.FileChunk(data=data, offset=offset, size=entry.size, sha256=entry.sha256)
                    first = False
                else:
                    yield mpb.FileChunk(data=data, offset=offset)
                offset += len(data)
        finally:
            with contextlib.suppress(Exception):  # a read ahead still running when the caller went away
                await ahead
            await loop.run_in_executor(self._pool, f.close)


    async def Remove(self, request, context):
        """Delete this host's copy of a model no deployment uses (`agentd model rm`)."""
        copy = next((m for m in self._models() if request.digest and m.digest == request.digest), None)
        if copy is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this host holds no copy of {request.digest}")
        users = self._users(copy)
        if users:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{copy.name} is used by deployment(s) {', '.join(sorted(users))}: delete or "
                                "change them first")
        if copy.revision:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{copy.path} is in a Hugging Face cache: remove it with `huggingface-cli "
                                "delete-cache`, which keeps the cache consistent")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, _remove_copy, copy)
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"cannot delete {copy.path}: {exc.strerror or exc}")
        log.info(f"deleted the copy of {copy.name}@{copy.digest[:19]} at {copy.path}")
        self._removed()
        return mpb.RemoveReply(path=copy.path, bytes=copy.size)


def _remove_copy(copy: HeldModel) -> None:
    if copy.format == "hf":
        shutil.rmtree(copy.path)
        return
    base = model_base(copy)
    for f in copy.files:
        with contextlib.suppress(FileNotFoundError):
            (base / f.name).unlink()


def _open_at(path: Path, offset: int):
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller, in the same pool
    f.seek(offset)
    return f


def _caller_name(context) -> str:
    with contextlib.suppress(Exception):
        from agentd.security.auth import current_caller

        caller = current_caller()
        if caller is not None:
            return caller.name
    return ""


def model_base(copy: HeldModel) -> Path:
    """The directory a model's file names are relative to: the HF directory, or the GGUF's directory."""
    return Path(copy.path) if copy.format == "hf" else Path(copy.path).parent


# --------------------------------------------------------------------------- the fetching side


class FetchFailed(Exception):
    """A fetch that will not be retried by itself: the reason is the part's FATAL reason."""


@dataclass
class Fetch:
    """One model being fetched to this host; `text` is what `agentd ps` shows."""

    digest: str
    name: str
    total: int = 0
    done: int = 0
    state: str = "FETCHING"  # FETCHING | DONE | FATAL
    reason: str = "waiting for a fetch slot"
    started: float = field(default_factory=time.monotonic)
    path: str = ""  # where the copy is, once DONE
    failures: int = 0  # fetches of this digest that ended FATAL
    retry_at: float | None = None  # when a FATAL fetch is tried again (None: not again)
    corrupt_from: set[str] = field(default_factory=set)  # holders whose copy failed verification: not asked again
    _rate: float = 0.0
    _last: tuple[float, int] = (0.0, 0)
    task: asyncio.Task | None = None

    def progress(self, now: float) -> None:
        t0, b0 = self._last
        if t0 == 0.0:
            self._last = (now, self.done)
            return
        if now - t0 >= 0.5:
            rate = (self.done - b0) / (now - t0)
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
            self._last = (now, self.done)
        self.reason = self.text()

    def text(self) -> str:
        pct = int(100 * self.done / self.total) if self.total else 0
        out = f"{pct}% of {self.total / GiB:.2f} GiB"
        if self._rate > 0:
            eta = (self.total - self.done) / self._rate
            out += f" {self._rate / GiB:.1f} GiB/s ETA {_duration(eta)}"
        return out


def _duration(s: float) -> str:
    if s < 60:
        return f"{int(s) + 1}s"
    if s < 3600:
        return f"{int(s // 60) + 1}m"
    return f"{s / 3600:.1f}h"


class Fetcher:
    """Fetches models into `model_dir`, a few at a time; one Fetch per digest, shared by its instances."""

    def __init__(self, *, node: str, model_dir: Path, channel: Callable[[str], grpc.aio.Channel],
                 locate: Callable[[str], Awaitable[tuple[HeldModel, list[tuple[str, str]]]]],
                 on_file: Callable[[Path, str], None] = lambda p, sha: None,
                 on_change: Callable[[], None] = lambda: None,
                 concurrency: int = 2, rate: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 transfer_context: Callable[[], ssl.SSLContext | None] | None = None,
                 retry_rounds: int = RETRY_ROUNDS, retry_base: float = RETRY_BASE, retry_cap: float = RETRY_CAP):
        self.node = node
        self.model_dir = model_dir
        self._channel = channel
        self._locate = locate
        self._on_file = on_file
        self._on_change = on_change
        self._slots = asyncio.Semaphore(concurrency)
        self.rate = rate  # bytes per second, 0 = unlimited
        self.clock = clock
        self.fetches: dict[str, Fetch] = {}
        # Per fetch at most two at once (a Models.Fetch stream's write and hash; the raw stream's receive is one),
        # plus two for the others' small steps.
        self._pool = ThreadPoolExecutor(max_workers=2 * concurrency + 2, thread_name_prefix="agentd-fetch")
        # The raw byte stream (agentd/api/transfer.py): the TLS client context (None: plain TCP, an insecure
        # cluster); the attribute itself None: always Models.Fetch.
        self.transfer_context = transfer_context
        self.transfer_hostname = NODE_SAN  # the name a holder's certificate is checked for
        self.retry_rounds, self.retry_base, self.retry_cap = retry_rounds, retry_base, retry_cap

    def ensure(self, name: str, digest: str) -> Fetch:
        """The fetch of `digest`, started if it is not running, or started again once a FATAL one's backoff has
        passed (a bounded number of times; `forget` ends it)."""
        f = self.fetches.get(digest)
        if f is None or (f.state == "DONE" and not f.path):
            f = self.fetches[digest] = Fetch(digest=digest, name=name)
            f.task = asyncio.ensure_future(self._run(f))
        elif f.state == "FATAL" and f.retry_at is not None and self.clock() >= f.retry_at:
            log.info(f"{f.name}@{f.digest[:19]}: fetching again ({f.failures} of {self.retry_rounds}) after: "
                     f"{f.reason}", extra=fields(node=self.node))
            f.state, f.reason, f.retry_at = "FETCHING", "waiting for a fetch slot", None
            f.started, f.done, f._rate, f._last = self.clock(), 0, 0.0, (0.0, 0)
            f.task = asyncio.ensure_future(self._run(f))
        return f

    def forget(self, digest: str) -> None:
        f = self.fetches.pop(digest, None)
        if f is not None and f.task is not None and not f.task.done():
            f.task.cancel()

    async def close(self) -> None:
        for f in list(self.fetches.values()):
            if f.task is not None and not f.task.done():
                f.task.cancel()
                with contextlib.suppress(BaseException):
                    await f.task
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, f: Fetch) -> None:
        try:
            async with self._slots:
                f.path = await self._fetch(f)
            f.state, f.reason = "DONE", f"fetched {f.total / GiB:.2f} GiB in {self.clock() - f.started:.1f}s"
            log.info(f"{f.name}@{f.digest[:19]}: {f.reason}", extra=fields(node=self.node, path=f.path))
        except asyncio.CancelledError:
            raise
        except FetchFailed as exc:
            f.state, f.reason = "FATAL", self._failed(f, str(exc))
            log.warning(f"{f.name}@{f.digest[:19]}: fetch failed: {f.reason}", extra=fields(node=self.node))
        except Exception as exc:  # a bug: the part must still say why it does not start
            f.state, f.reason = "FATAL", self._failed(f, f"fetch failed: {type(exc).__name__}: {exc}")
            log.exception("model fetch failed", extra=fields(node=self.node, digest=f.digest))
        finally:
            self._on_change()

    def _failed(self, f: Fetch, reason: str) -> str:
        """Count a FATAL end and set when it is tried again; the part's reason says which."""
        f.failures += 1
        if f.failures > self.retry_rounds:
            f.retry_at = None
            return f"{reason} (gave up after {self.retry_rounds} retries: delete or re-deploy to fetch again)"
        delay = min(self.retry_cap, self.retry_base * 2 ** (f.failures - 1))
        f.retry_at = self.clock() + delay
        asyncio.get_running_loop().call_later(delay, self._on_change)  # the reconciler calls ensure again
        return f"{reason}; retry {f.failures} of {self.retry_rounds} in {_duration(delay)}"

    async def _fetch(self, f: Fetch) -> str:
        loop = asyncio.get_running_loop()
        last = "no holder reported"
        model: HeldModel | None = None
        tmp = self.model_dir / f".fetch-{f.digest.removeprefix('sha256:')[:16]}"
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_DELAY * attempt)
            try:
                model, holders = await self._locate(f.digest)
            except grpc.aio.AioRpcError as exc:
                last = f"cannot locate the model: {exc.details() or exc.code().name}"
                continue
            except LookupError as exc:
                last = str(exc)
                continue
            f.total = model.size
            holders = [h for h in holders if h[0] != self.node]
            good = [h for h in holders if h[0] not in f.corrupt_from]
            if holders and not good:  # asking a bad copy again would only fail the same way
                await loop.run_in_executor(self._pool, shutil.rmtree, tmp, True)
                raise FetchFailed(f"{last if attempt else 'the copies on ' + ', '.join(sorted(f.corrupt_from))}"
                                  f"{'' if attempt else ' failed verification before'}: no other host holds "
                                  "a copy to try")
            holders = good
            if not holders:
                last = "no other host holds a complete copy"
                continue
            host, address = holders[attempt % len(holders)]
            try:
                await loop.run_in_executor(self._pool, _mkdirs, tmp)
                for entry in model.files:
                    await self._file(f, model, entry, tmp, host, address)
                path, installed = await loop.run_in_executor(self._pool, _install, tmp, self.model_dir, model)
                for dest, sha in installed:
                    self._on_file(dest, sha)
                return path
            except grpc.aio.AioRpcError as exc:
                last = f"copy from {host} broke off: {exc.details() or exc.code().name}"
                log.info(f"{f.name}: {last}; resuming", extra=fields(node=self.node, attempt=attempt + 1))
            except TransferRefused as exc:
                last = f"{host} refused the copy: {exc}"
                log.info(f"{f.name}: {last}", extra=fields(node=self.node, attempt=attempt + 1))
            except TransferBroken as exc:
                last = f"copy from {host} broke off: {exc}"
                log.info(f"{f.name}: {last}; resuming", extra=fields(node=self.node, attempt=attempt + 1))
            except _Corrupt as exc:
                last = str(exc)
                f.corrupt_from.add(host)
                log.warning(f"{f.name}: {last}; fetching it again", extra=fields(node=self.node))
            except OSError as exc:
                await loop.run_in_executor(self._pool, shutil.rmtree, tmp, True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise FetchFailed(f"disk full in {self.model_dir} while fetching {f.name} "
                                      f"({f.total / GiB:.2f} GiB): the partial copy was removed") from None
                raise FetchFailed(f"cannot write the copy of {f.name} in {self.model_dir}: "
                                  f"{exc.strerror or exc}") from None
        with contextlib.suppress(OSError):
            await loop.run_in_executor(self._pool, shutil.rmtree, tmp, True)
        raise FetchFailed(f"fetching {f.name} failed after {ATTEMPTS} attempts: {last}")

    async def _file(self, f: Fetch, model: HeldModel, entry: ModelFile, tmp: Path, host: str, address: str) -> None:
        loop = asyncio.get_running_loop()
        final = tmp / entry.name
        partial = final.with_name(final.name + ".partial")
        done_before = sum(x.size for x in model.files if (tmp / x.name).exists())
        if final.exists():
            return  # verified and renamed by an earlier attempt
        h, offset = await loop.run_in_executor(self._pool, _hash_prefix, partial)
        f.done = done_before + offset
        stub = mpb_grpc.ModelsStub(self._channel(address))
        raw = await self._open(stub, model, entry, offset, host) if self.transfer_context is not None else None
        if raw is not None:
            offset = await self._receive(f, raw, address, partial, h, offset, entry)
        else:
            offset = await self._stream(f, stub, model, entry, partial, h, offset, host)
        if offset != entry.size or h.hexdigest() != entry.sha256:
            await loop.run_in_executor(self._pool, _unlink, partial)
            f.done -= offset
            got = "size " + str(offset) if offset != entry.size else "sha256 " + h.hexdigest()[:16]
            raise _Corrupt(f"{entry.name} from {host} does not match the model's digest ({got}, expected "
                           f"{entry.size} bytes, sha256 {entry.sha256[:16]}): discarded")
        await loop.run_in_executor(self._pool, os.replace, partial, final)

    async def _open(self, stub, model: HeldModel, entry: ModelFile, offset: int, host: str) -> mpb.OpenReply | None:
        """A ticket for the raw byte stream, or None when the holder serves Fetch only (an older agent)."""
        try:
            return await stub.Open(mpb.FetchRequest(digest=model.digest, file=entry.name, offset=offset),
                                   timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    async def _receive(self, f: Fetch, reply: mpb.OpenReply, address: str, partial: Path, h, offset: int,
                       entry: ModelFile) -> int:
        """The file's remaining bytes over the holder's transfer port, in threads; the offset reached."""
        loop = asyncio.get_running_loop()
        assert self.transfer_context is not None
        host = address.rpartition(":")[0].strip("[]")
        started, base = self.clock(), offset
        shown = [0.0]

        def on_bytes(n: int) -> None:  # in the receiving thread
            f.done += n
            now = self.clock()
            if now - shown[0] >= 0.25:
                shown[0] = now
                loop.call_soon_threadsafe(f.progress, now)
            if self.rate > 0:
                ahead = (f.done - base) / self.rate - (now - started)
                if ahead > 0:
                    receive.pause(ahead)

        ctx = await loop.run_in_executor(self._pool, self.transfer_context)
        out = await loop.run_in_executor(self._pool, _open_append, partial)
        receive = Receive((host, reply.port), reply.ticket, ctx, self.transfer_hostname, out, h, on_bytes)
        before = f.done
        try:
            await asyncio.shield(job := loop.run_in_executor(self._pool, receive.run, entry.size - offset))
        except asyncio.CancelledError:
            receive.cancel()
            with contextlib.suppress(BaseException):
                await job
            raise
        finally:
            await loop.run_in_executor(self._pool, out.close)
            f.progress(self.clock())
        return offset + (f.done - before)

    async def _stream(self, f: Fetch, stub, model: HeldModel, entry: ModelFile, partial: Path, h, offset: int,
                      host: str) -> int:
        """The file's remaining bytes over Models.Fetch (a holder without Open); the offset reached."""
        loop = asyncio.get_running_loop()
        call = stub.Fetch(mpb.FetchRequest(digest=model.digest, file=entry.name, offset=offset))
        out = await loop.run_in_executor(self._pool, _open_append, partial)
        started, sent = self.clock(), 0
        writing: asyncio.Future | None = None  # the previous chunk's write and hash, overlapping this receive
        try:
            async for chunk in call:
                if chunk.offset != offset:
                    raise _Corrupt(f"{entry.name} from {host}: chunk at {chunk.offset}, expected {offset}")
                if chunk.data:
                    if writing is not None:
                        await writing
                    # Written and hashed in two threads at once (both release the GIL), while the next
                    # chunk is received; each waits for the previous chunk's, so the order holds.
                    writing = asyncio.gather(loop.run_in_executor(self._pool, write_all, out, chunk.data),
                                             loop.run_in_executor(self._pool, h.update, chunk.data))
                    offset += len(chunk.data)
                    f.done += len(chunk.data)
                    f.progress(self.clock())
                    if self.rate > 0:
                        sent += len(chunk.data)
                        ahead = sent / self.rate - (self.clock() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            if writing is not None:
                await writing
                writing = None
        finally:
            call.cancel()  # a write that failed (disk full) must not leave the holder streaming
            if writing is not None:
                with contextlib.suppress(Exception):
                    await writing
            await loop.run_in_executor(self._pool, out.close)
        return offset


class _Corrupt(Exception):
    pass


def _mkdirs(p: Path) -> None:
    p.mkdir(parents=True, exist_ok=True)


def _hash_prefix(partial: Path) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    n = 0
    with contextlib.suppress(FileNotFoundError), open(partial, "rb", buffering=0) as f:
        while block := f.read(8 * CHUNK):
            h.update(block)
            n += len(block)
    return h, n


def _open_append(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    return open(p, "ab", buffering=0)


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def _install(tmp: Path, model_dir: Path, model: HeldModel) -> tuple[str, list[tuple[Path, str]]]:
    """Move the verified files into place (the GGUF files, or the HF directory in one rename); the model's
    path and each file's final path with its sha256."""
    if model.format == "hf":
        dest = model_dir / model.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            raise FetchFailed(f"{dest} exists already and is not this model: move it away, then restart the part")
        os.replace(tmp, dest)
        return str(dest), [(dest / e.name, e.sha256) for e in model.files]
    base = model_dir / Path(model.name).parent
    base.mkdir(parents=True, exist_ok=True)
    installed = []
    for entry in sorted(model.files, key=lambda x: x.name):
        dest = base / entry.name
        os.replace(tmp / entry.name, dest)
        installed.append((dest, entry.sha256))
    shutil.rmtree(tmp, ignore_errors=True)
    return str(base / Path(model.path).name), installed
