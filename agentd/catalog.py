"""The cluster's model catalog: which host holds which model, keyed by content digest (docs/models.md).

Built from the host inventories alone (each host reports the models in its model directories), so the
coordinator never opens a model file to plan a deploy by name, and `agentd model ls` shows the same view
from ListNodes. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agentd.errors import InvalidInput

__all__ = ["Broken", "CatalogEntry", "build", "held_copy", "holders", "resolve"]
from agentd.types import HostInventory, ModelInfo, ModelRef, held_copy, parse_model_ref


@dataclass
class CatalogEntry:
    """One model content (one digest) and where it is."""

    name: str
    digest: str
    size: int
    format: str
    info: ModelInfo | None
    holders: list[str] = field(default_factory=list)  # hosts with a complete, usable copy
    partial: list[str] = field(default_factory=list)  # hosts with part of it (a fetch in progress)
    names: set[str] = field(default_factory=set)  # every name hosts report for this digest
    conflict: str = ""  # another digest reported under the same name
    revisions: set[str] = field(default_factory=set)  # Hugging Face cache: commits and refs naming it

    def as_json(self) -> dict:
        return {"name": self.name, "digest": self.digest, "size": self.size, "format": self.format,
                "holders": self.holders, "partial": self.partial, "names": sorted(self.names),
                "conflict": self.conflict, "revisions": sorted(self.revisions),
                "info": None if self.info is None else self.info.model_dump(mode="json")}


@dataclass
class Broken:
    host: str
    name: str
    path: str
    reason: str


def build(hosts: Iterable[HostInventory]) -> tuple[list[CatalogEntry], list[Broken]]:
    """Entries sorted by name then digest, and the broken models with their reasons."""
    by_digest: dict[str, CatalogEntry] = {}
    broken: list[Broken] = []
    for h in hosts:
        for m in h.models:
            if m.broken:
                broken.append(Broken(h.name, m.name, m.path, m.broken))
                continue
            if not m.digest:
                continue  # still being hashed: not a catalog entry yet
            e = by_digest.get(m.digest)
            if e is None:
                e = by_digest[m.digest] = CatalogEntry(m.name, m.digest, m.size, m.format, m.info)
            e.names.add(m.name)
            e.revisions.update(r for r in (m.revision, *m.refs) if r)
            if e.info is None and m.info is not None:
                e.info = m.info
            (e.holders if m.usable else e.partial).append(h.name)
    entries = sorted(by_digest.values(), key=lambda e: (e.name, e.digest))
    digests_by_name: dict[str, set[str]] = {}
    for e in entries:
        for n in e.names:
            digests_by_name.setdefault(n, set()).add(e.digest)
    for e in entries:
        others = sorted({d for n in e.names for d in digests_by_name[n]} - {e.digest})
        if others:
            e.conflict = f"the same name is reported with {len(others)} other digest(s): " + ", ".join(
                _short(d) for d in others)
    return entries, broken


def _short(digest: str) -> str:
    return digest[:19]


def holders(hosts: Iterable[HostInventory], model: str) -> frozenset[str]:
    """The hosts that hold a usable copy of `model`."""
    return frozenset(h.name for h in hosts if held_copy(h.models, model) is not None)


def resolve(model: str, hosts: Sequence[HostInventory]) -> tuple[str, ModelInfo]:
    """`NAME[@sha256:DIGEST]` (or `hf:ORG/NAME`) to `NAME@sha256:DIGEST` and the facts its holders reported.

    InvalidInput when no host holds it (naming where it looked) or when the name is ambiguous (naming the
    digests to choose from). Absolute paths are not resolved here: the coordinator inspects them.
    """
    try:
        ref = parse_model_ref(model)
    except ValueError as exc:
        raise InvalidInput(str(exc), where="model") from None
    if ref.kind == "path":
        raise InvalidInput(f"{model} is a path, not a catalog name", where="model")
    entries, broken = build(hosts)
    name = ref.name
    matches = [e for e in entries if (name in e.names or (ref.digest and e.digest == ref.digest))
               and (not ref.digest or e.digest == ref.digest)]
    if ref.kind == "hf" and (ref.pattern or not matches):
        # A GGUF repository: its files are catalog names ORG/NAME/<file without .gguf>, chosen by the pattern
        # (or the repository's only GGUF model when none is given).
        matches = [e for e in entries if e.format == "gguf" and _gguf_in_repo(e, name, ref.pattern)]
        names = sorted({n for e in matches for n in e.names if n.startswith(name + "/")})
        if len({e.digest for e in matches}) > 1:
            raise InvalidInput(f"{ref.text} matches {len(names)} GGUF models of {name} ({', '.join(names)}): "
                               f"name one with a file pattern, hf:{name}:PATTERN (a quantization such as "
                               "Q4_K_M, or a glob)", where="model")
        if names:
            name = names[0]
    if ref.revision:  # hf:ORG/NAME@REV: a ref (main, a tag) or a commit, as the hub cache names them
        matches = [e for e in matches if ref.revision in e.revisions
                   or (len(ref.revision) >= 7 and any(r.startswith(ref.revision) for r in e.revisions))]
    usable = [e for e in matches if e.info is not None and (e.holders or e.partial)]
    if not usable:
        raise InvalidInput(_not_found(ref, hosts, broken, [e for e in matches if e.info is None]), where="model")
    if len(usable) > 1:
        choices = "; ".join(f"{name}@{e.digest} on {', '.join(e.holders or e.partial)}" for e in usable)
        raise InvalidInput(f"{name} is ambiguous: hosts hold {len(usable)} different models under this name "
                           f"({choices}); name the digest", where="model")
    e = usable[0]
    assert e.info is not None
    return f"{name}@{e.digest}", e.info


def _gguf_in_repo(e: CatalogEntry, repo: str, pattern: str) -> bool:
    """Whether `e` is a GGUF model of the Hugging Face repository `repo` whose file matches `pattern`."""
    import fnmatch

    for n in e.names:
        if not n.startswith(repo + "/"):
            continue
        stem = n[len(repo) + 1:].lower()
        p = pattern.lower()
        if not p or fnmatch.fnmatchcase(stem, p) or (not any(c in p for c in "*?") and p in stem):
            return True
    return False


def _not_found(ref: ModelRef, hosts: Sequence[HostInventory], broken: list[Broken],
               unreadable: list[CatalogEntry]) -> str:
    what = ref.text
    looked = "; ".join(f"{h.name}: {', '.join(h.model_dirs) or 'no model directories reported'}"
                       for h in hosts) or "no host has reported yet"
    text = f"no host holds a model {what} (looked in {looked}); `agentd model ls` lists the catalog"
    bad = [b for b in broken if b.name == ref.name]
    if bad:
        text += "; broken copies: " + "; ".join(f"{b.path} on {b.host}: {b.reason}" for b in bad)
    if unreadable:
        text += "; found only without readable facts on " + ", ".join(sorted({h for e in unreadable
                                                                               for h in e.holders + e.partial}))
    return text
