"""API keys for the OpenAI-compatible entry point, and admin bearer tokens for the Control API.

A key looks like `agd_<id>_<secret>`: `id` (10 base32 chars) finds the record,
`secret` (52 base32 chars, 256 bits) proves possession. The store keeps only
SHA-256(id:secret) and compares in constant time. A plain hash, not a
password KDF, is the right tool: the secret is random, so there is no
dictionary to try, and every proxied request verifies a key.

A key belongs to a tenant and may be limited to some models. Admin keys
(`admin=True`) may use every model and act as bearer tokens for Control calls.

Revocation is a state change (the record stays, with `revoked_at`), so the
daemon can replicate it as one Raft entry and every node refuses the key as
soon as it applies that entry. The store is a plain dict of frozen records and
every function here is pure, clock and randomness passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from agentd.errors import InvalidInput
from agentd.security.ca import check_name

KEY_PREFIX = "agd"
_KEY_RE = re.compile(r"^agd_([a-z2-7]{10})_([a-z2-7]{52})$")
ALL_MODELS = "*"

KeyStore = Mapping[str, "ApiKeyRecord"]


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    secret_hash: str
    tenant: str
    created_at: float
    name: str = ""
    models: tuple[str, ...] = ()  # empty: every model of the tenant
    admin: bool = False
    expires_at: float | None = None
    revoked_at: float | None = None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ApiKeyRecord:
        try:
            fields = {k: data[k] for k in data if k in cls.__dataclass_fields__}
            fields["models"] = tuple(fields.get("models", ()))
            return cls(**fields)
        except TypeError as exc:
            raise InvalidInput(f"invalid API key record: {exc}") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling, as far as authorization cares."""

    key_id: str
    tenant: str
    models: frozenset[str] | None = None  # None: every model of the tenant
    admin: bool = False

    def may_use(self, model: str, model_tenant: str) -> bool:
        if self.admin:
            return True
        if model_tenant != self.tenant:
            return False
        return self.models is None or model in self.models


def hash_secret(key_id: str, secret: str) -> str:
    return hashlib.sha256(f"{key_id}:{secret}".encode()).hexdigest()


def _b32(raw: bytes, n: int) -> str:
    return base64.b32encode(raw).decode().lower().rstrip("=")[:n]


MAX_TTL = 10 * 365 * 86400.0


def new_api_key(*, tenant: str, now: float, random_bytes: Callable[[int], bytes], models: Iterable[str] = (),
                name: str = "", admin: bool = False, ttl: float | None = None) -> tuple[str, ApiKeyRecord]:
    """The key (shown to the user once, never stored) and its record. `random_bytes` is `secrets.token_bytes`."""
    check_name(tenant, "tenant")
    models = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    if ALL_MODELS in models:
        models = ()
    for m in models:
        check_name(m, "model name")
    if ttl is not None and not 0 < ttl <= MAX_TTL:  # NaN and inf fail this too: a key that never expires
        raise InvalidInput(f"an API key's lifetime must be positive and at most {MAX_TTL // 86400:.0f} days "
                           f"(got {ttl:g}s); leave it out for a key that does not expire")
    if len(name) > 200:
        raise InvalidInput("an API key's name is at most 200 characters")
    key_id = _b32(random_bytes(7), 10)
    secret = _b32(random_bytes(33), 52)
    record = ApiKeyRecord(id=key_id, secret_hash=hash_secret(key_id, secret), tenant=tenant, created_at=now,
                          name=name, models=models, admin=admin,
                          expires_at=None if ttl is None else now + ttl)
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


def parse_key(presented: str) -> tuple[str, str] | None:
    m = _KEY_RE.fullmatch(presented or "")
    return (m.group(1), m.group(2)) if m else None


def add_key(store: KeyStore, record: ApiKeyRecord) -> dict[str, ApiKeyRecord]:
    if record.id in store:
        raise InvalidInput(f"API key {record.id} already exists")
    return {**store, record.id: record}


def revoke_key(store: KeyStore, key_id: str, *, now: float) -> tuple[dict[str, ApiKeyRecord], ApiKeyRecord]:
    """Mark a key revoked; revoking twice keeps the first time. Unknown ids are an error the user sees."""
    rec = store.get(key_id)
    if rec is None:
        raise InvalidInput(f"no API key with id {key_id!r} (see 'agentd keys ls')")
    if rec.revoked_at is not None:
        return dict(store), rec
    rec = replace(rec, revoked_at=now)
    return {**store, key_id: rec}, rec


def verify_key(store: KeyStore, presented: str, *, now: float) -> Principal | None:
    """The caller's principal, or None for a malformed, unknown, wrong, revoked or expired key."""
    parsed = parse_key(presented)
    if parsed is None:
        return None
    key_id, secret = parsed
    rec = store.get(key_id)
    if rec is None:
        return None
    if not hmac.compare_digest(rec.secret_hash, hash_secret(key_id, secret)):
        return None
    if rec.state(now) != "active":
        return None
    return Principal(key_id=rec.id, tenant=rec.tenant, models=frozenset(rec.models) or None, admin=rec.admin)


def list_keys(store: KeyStore) -> list[ApiKeyRecord]:
    return sorted(store.values(), key=lambda r: (r.tenant, r.created_at, r.id))


# ---------------------------------------------------------------- model servers' own keys

MODEL_SERVER_KEY_PREFIX = "agdsrv"


def new_cluster_secret(random_bytes: Callable[[int], bytes]) -> str:
    """256 random bits, hex: kept in the replicated state, the root of every model server's key."""
    return random_bytes(32).hex()


def model_server_key(cluster_secret: str, instance_id: str) -> str:
    """The API key one instance's model server is started with.

    Any agent may proxy to any replica, so every agent must know every
    server's key without it being stored anywhere: it is an HMAC of the
    instance id under the cluster secret. A new generation of a replica gets a
    new key; knowing one server's key tells nothing about another's.
    """
    if not cluster_secret:
        raise InvalidInput("no cluster secret yet: model server keys cannot be derived")
    mac = hmac.new(cluster_secret.encode(), f"model-server:{instance_id}".encode(), hashlib.sha256)
    return f"{MODEL_SERVER_KEY_PREFIX}_{mac.hexdigest()}"


# ---------------------------------------------------------------- JSON form of a store


def store_to_json(store: KeyStore) -> dict[str, Any]:
    return {"version": 1, "keys": [r.to_json() for r in list_keys(store)]}


def store_from_json(data: Any, where: str = "API key store") -> dict[str, ApiKeyRecord]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise InvalidInput("expected {\"version\": 1, \"keys\": [...]}", where=where)
    out: dict[str, ApiKeyRecord] = {}
    for i, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise InvalidInput(f"keys[{i}] is not an object", where=where)
        try:
            rec = ApiKeyRecord.from_json(item)
        except InvalidInput as exc:
            raise InvalidInput(f"keys[{i}]: {exc}", where=where) from None
        out[rec.id] = rec
    return out
