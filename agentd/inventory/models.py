"""The models in this host's model directories: what the host reports so the cluster knows where bytes are.

`ModelCatalog.scan()` runs in the inventory refresher's worker thread (never on
the event loop). It finds GGUF models (a file, or the whole set of a split
model) and Hugging Face directories (those with a config.json), reads their
facts from the headers, and reports each with its files, sizes and content
digest. Hashing a 100 GiB model takes minutes, so it is not done by the scan:
files without a known digest are handed to one hashing thread of the
catalog's own, the model is reported with digest "" meanwhile, and the
finished digest is cached on disk by path, size and mtime, so a restart does
not hash again. A model that cannot be used (a truncated GGUF, a bad
config.json, missing shards) is reported with the reason, never raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from agentd.errors import AgentdError
from agentd.logs import fields
from agentd.modelinfo import inspect_model
from agentd.modelinfo.gguf import SPLIT_RE
from agentd.types import HeldModel, ModelFile, ModelInfo

log = logging.getLogger("agentd.inventory")

DIGEST_CACHE = "model-digests.json"
CHUNK = 8 * 1024 * 1024
PARTIAL_SUFFIX = ".partial"  # a copy being fetched: never a model of its own
MAX_DEPTH = 4  # how deep below a model directory models are looked for (ORG/NAME, and a little more)


@dataclass(frozen=True)
class FileKey:
    path: str
    size: int
    mtime_ns: int


def file_key(path: Path) -> FileKey:
    st = path.stat()
    return FileKey(str(path), st.st_size, st.st_mtime_ns)


def sha256_file(path: Path, *, chunk: int = CHUNK, stop: threading.Event | None = None) -> str:
    """The file's sha256 (hex), read in chunks: a worker thread's job, never the event loop's."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            if stop is not None and stop.is_set():
                raise InterruptedError("hashing stopped")
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def model_digest(files: Iterable[ModelFile]) -> str:
    """The catalog key of a model: the file's sha256 for one file, else the sha256 of the manifest."""
    files = sorted(files, key=lambda f: f.name)
    if not files or any(not f.sha256 for f in files):
        return ""
    if len(files) == 1:
        return "sha256:" + files[0].sha256
    manifest = "".join(f"{f.name}\t{f.size}\t{f.sha256}\n" for f in files)
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


class DigestCache:
    """sha256 per (path, size, mtime), kept in the data directory so a restart does not hash again."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, int, str]] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                raw = json.loads(path.read_text())
                self._entries = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in raw.items()}

    def get(self, key: FileKey) -> str:
        with self._lock:
            hit = self._entries.get(key.path)
        return hit[2] if hit is not None and hit[:2] == (key.size, key.mtime_ns) else ""

    def put(self, key: FileKey, digest: str) -> None:
        with self._lock:
            self._entries[key.path] = (key.size, key.mtime_ns, digest)
            data = json.dumps({k: list(v) for k, v in sorted(self._entries.items())})
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save the model digest cache", extra=fields(path=str(self.path), error=str(exc)))


class Hasher:
    """One daemon thread that hashes the files it is given, one at a time, and caches the digests."""

    def __init__(self, cache: DigestCache, on_done: Callable[[], None] = lambda: None):
        self.cache = cache
        self.on_done = on_done
        self._queue: queue.Queue[FileKey] = queue.Queue()
        self._queued: set[FileKey] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: dict[str, str] = {}  # path -> why it could not be hashed

    def want(self, key: FileKey) -> None:
        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="agentd-model-hash", daemon=True)
                self._thread.start()
        self._queue.put(key)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queued)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                path = Path(key.path)
                if file_key(path) == key:  # changed since it was queued: the next scan queues it again
                    digest = sha256_file(path, stop=self._stop)
                    if file_key(path) == key:
                        self.cache.put(key, digest)
                        self.errors.pop(key.path, None)
            except InterruptedError:
                return
            except OSError as exc:
                self.errors[key.path] = f"cannot read {key.path}: {exc.strerror or exc}"
            finally:
                with self._lock:
                    self._queued.discard(key)
            try:
                self.on_done()
            except Exception:  # the loop may be closing
                log.debug("model hash listener failed", exc_info=True)


class ModelCatalog:
    """Scans `dirs` for models; call `scan()` from a worker thread (the inventory collect)."""

    def __init__(self, dirs: Iterable[Path], cache_file: Path | None = None,
                 on_digest: Callable[[], None] = lambda: None,
                 inspect: Callable[[Path], ModelInfo] = inspect_model):
        self.dirs = tuple(Path(d) for d in dirs)
        self.hasher = Hasher(DigestCache(cache_file), lambda: self.on_digest())
        self.on_digest = on_digest
        self._inspect = inspect
        self._facts: dict[tuple[FileKey, ...], ModelInfo | str] = {}  # header reads, by the files' keys

    def close(self) -> None:
        self.hasher.stop()

    def disk_free(self) -> int | None:
        """Bytes free in the first model directory (where fetched copies go), or None when unknown."""
        for d in self.dirs[:1]:
            with contextlib.suppress(OSError):
                st = os.statvfs(d if d.exists() else d.parent)
                return st.f_bavail * st.f_frsize
        return None

    def scan(self) -> tuple[HeldModel, ...]:
        out: list[HeldModel] = []
        for root in self.dirs:
            if not root.is_dir():
                continue
            if is_hf_cache(root):
                for kind, name, path, files, revision, refs in _hf_cache(root):
                    held = self._held(kind, name, path, files)
                    out.append(held.model_copy(update={"revision": revision, "refs": refs}))
                continue
            for kind, name, path, files in _find(root):
                out.append(self._held(kind, name, path, files))
        return tuple(sorted(out, key=lambda m: (m.name, m.path)))

    def _held(self, kind: str, name: str, path: Path, files: list[Path]) -> HeldModel:
        fmt = "hf" if kind == "hf" else "gguf"
        base = path if kind == "hf" else path.parent
        try:
            keys = tuple(file_key(f) for f in files)
        except OSError as exc:
            return HeldModel(name=name, path=str(path), format=fmt, complete=False,
                             broken=f"cannot read: {exc.strerror or exc}")
        mfiles = []
        for f, key in zip(files, keys, strict=True):
            digest = self.hasher.cache.get(key)
            if not digest:
                self.hasher.want(key)
            mfiles.append(ModelFile(name=str(f.relative_to(base)), size=key.size, sha256=digest))
        size = sum(k.size for k in keys)
        complete, why = True, ""
        if kind == "split":
            m = SPLIT_RE.match(path.name)
            count = int(m["count"]) if m else 1
            if len(files) != count:
                complete, why = False, f"{len(files)} of {count} shards present"
        errors = [self.hasher.errors[str(f)] for f in files if str(f) in self.hasher.errors]
        info: ModelInfo | None = None
        if complete:
            facts = self._facts.get(keys)
            if facts is None:
                try:
                    facts = self._inspect(path)
                except AgentdError as exc:
                    facts = str(exc)
                except Exception as exc:  # a reader bug must not take the inventory down
                    facts = f"{type(exc).__name__}: {exc}"
                self._facts[keys] = facts
            if isinstance(facts, str):
                why = facts
            else:
                info = facts
        why = why or "; ".join(errors)
        return HeldModel(name=name, digest=model_digest(mfiles) if complete else "", path=str(path), format=fmt,
                         size=size, files=tuple(mfiles), complete=complete, broken=why if complete else "",
                         info=info)


def _find(root: Path) -> Iterable[tuple[str, str, Path, list[Path]]]:
    """(kind, name, path, files) for each model under `root`: "hf" directories (config.json), "gguf" files
    and "split" GGUF sets. A Hugging Face directory is one model, whatever it holds."""
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        names = {e.name for e in entries}
        if d != root and "config.json" in names:
            yield "hf", d.relative_to(root).as_posix(), d, sorted(_files_below(d))
            continue
        splits: dict[str, list[Path]] = {}
        for e in entries:
            if e.name.startswith(".") or e.name.endswith(PARTIAL_SUFFIX):
                continue
            if e.is_dir(follow_symlinks=False):
                if depth + 1 < MAX_DEPTH:
                    stack.append((Path(e.path), depth + 1))
                continue
            if not e.name.lower().endswith(".gguf") or e.name.lower().startswith("mmproj"):
                continue
            if not e.is_file():
                continue
            prefix = (Path(e.path).relative_to(root).parent / e.name[:-5]).as_posix()
            m = SPLIT_RE.match(e.name)
            if m:
                splits.setdefault((Path(e.path).relative_to(root).parent / m["prefix"]).as_posix(), []).append(
                    Path(e.path))
            else:
                yield "gguf", prefix, Path(e.path), [Path(e.path)]
        for name, shards in splits.items():
            shards.sort()
            yield "split", name, shards[0], shards


def is_hf_cache(d: Path) -> bool:
    """A Hugging Face hub cache (`models--ORG--NAME/snapshots/REV/...`), as huggingface_hub lays it out."""
    try:
        return any(e.name.startswith("models--") and e.is_dir() for e in os.scandir(d))
    except OSError:
        return False


def _hf_cache(root: Path) -> Iterable[tuple[str, str, Path, list[Path], str, tuple[str, ...]]]:
    """(kind, name, path, files, commit, refs) for each model of each revision in a hub cache, read with
    huggingface_hub's own cache scanner (its layout is the library's to know, not ours):

    - a revision with a config.json is one "hf" model named ORG/NAME, its path the snapshot directory;
    - a revision without one (a GGUF repository) gives each GGUF file or split set in it as a model named
      ORG/NAME/<its path in the repository without .gguf> (`hf:ORG/NAME:PATTERN` picks one), as `_find`
      would name it in a model directory holding ORG/NAME/ - which is where a fetched copy goes.
    """
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(root)
    except Exception as exc:  # a corrupt cache: report nothing from it, say why once
        log.warning("cannot read the Hugging Face cache", extra=fields(path=str(root), error=str(exc)))
        return
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            names = {f.file_name for f in rev.files}
            snapshot = Path(rev.snapshot_path)
            refs = tuple(sorted(rev.refs))
            if "config.json" in names:
                files = sorted(Path(f.file_path) for f in rev.files)
                yield "hf", repo.repo_id, snapshot, files, rev.commit_hash, refs
                continue
            ggufs = [Path(f.file_path) for f in rev.files if f.file_name.lower().endswith(".gguf")
                     and not f.file_name.lower().startswith("mmproj")]
            splits: dict[str, list[Path]] = {}
            for p in sorted(ggufs):
                rel = p.relative_to(snapshot)
                m = SPLIT_RE.match(p.name)
                if m:
                    splits.setdefault((rel.parent / m["prefix"]).as_posix(), []).append(p)
                else:
                    yield "gguf", f"{repo.repo_id}/{(rel.parent / p.name[:-5]).as_posix()}", p, [p], \
                        rev.commit_hash, refs
            for prefix, shards in splits.items():
                yield "split", f"{repo.repo_id}/{prefix}", shards[0], shards, rev.commit_hash, refs


def _files_below(d: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        for n in filenames:
            p = Path(dirpath) / n
            if not n.startswith(".") and not n.endswith(PARTIAL_SUFFIX) and p.is_file():
                yield p

