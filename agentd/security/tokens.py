"""One-time, expiring join tokens: how a new host gets its node certificate.

The scheme (kubeadm's bootstrap tokens, made single-use):

    <id>.<secret>.<ca-pin>      e.g.  k7qz3m2a.3n5x...(32).9f86d08...(64 hex)

* `id` (8 chars) names the token in the store; it is not secret.
* `secret` (32 base32 chars, 160 bits) is never stored: the store keeps
  SHA-256(id:secret). A fast hash is right here because the secret is random,
  not a password; there is nothing to brute-force by dictionary.
* `ca-pin` is the SHA-256 of the cluster CA's public key (SubjectPublicKeyInfo).
  The joining host fetches the CA from the peer over TLS it does not yet
  trust, and accepts it only if its key hashes to the pin. So a man in the
  middle can neither impersonate the cluster (wrong pin) nor reuse a token he
  sees (the channel is encrypted once the CA is pinned, and the secret goes
  only over that channel).

The joining host then sends the token and a CSR over TLS; the signer checks
and consumes the token through the replicated store (one Raft entry, so a
token cannot be used twice even on two different signers at once) and returns
a certificate with the `node` role. The private key never leaves the joiner.

Everything below is pure: the clock and the random bytes are arguments, and
the store is a plain dict of frozen records, so `consume` can run inside the
replicated state machine and decide identically on every node.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from agentd.errors import InvalidInput

ID_CHARS = 8
SECRET_CHARS = 32
DEFAULT_TTL = 3600.0
MAX_TTL = 7 * 24 * 3600.0
_TOKEN_RE = re.compile(r"^([a-z2-7]{8})\.([a-z2-7]{32})\.([0-9a-f]{64})$")

TokenStore = Mapping[str, "JoinTokenRecord"]


@dataclass(frozen=True)
class JoinTokenRecord:
    """What the cluster keeps about a token: never the secret itself."""

    id: str
    secret_hash: str
    created_at: float
    expires_at: float
    description: str = ""
    node_name: str | None = None  # when set, only a CSR for this name is signed
    used_at: float | None = None
    used_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JoinTokenRecord:
        try:
            return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})
        except TypeError as exc:
            raise InvalidInput(f"invalid join token record: {exc}") from None


@dataclass(frozen=True)
class ParsedToken:
    id: str
    secret: str
    ca_pin: str  # "sha256:<hex>", comparable with ca.ca_fingerprint()

    @property
    def secret_hash(self) -> str:
        return hash_secret(self.id, self.secret)


@dataclass(frozen=True)
class TokenDecision:
    """The outcome of checking a token; `reason` is the sentence logged and returned to the joiner."""

    ok: bool
    reason: str
    record: JoinTokenRecord | None = None


def hash_secret(token_id: str, secret: str) -> str:
    return hashlib.sha256(f"{token_id}:{secret}".encode()).hexdigest()


def _b32(raw: bytes, n: int) -> str:
    return base64.b32encode(raw).decode().lower().rstrip("=")[:n]


def create_join_token(ca_pin: str, *, now: float, ttl: float = DEFAULT_TTL, description: str = "",
                      node_name: str | None = None,
                      random_bytes: Callable[[int], bytes]) -> tuple[str, JoinTokenRecord]:
    """A new token string (shown once) and the record to store. `random_bytes` is `secrets.token_bytes`."""
    if not 0 < ttl <= MAX_TTL:
        raise InvalidInput(f"a join token must expire within 7 days (got a TTL of {ttl:g}s)")
    pin = _pin_hex(ca_pin)
    token_id = _b32(random_bytes(5), ID_CHARS)
    secret = _b32(random_bytes(20), SECRET_CHARS)
    record = JoinTokenRecord(id=token_id, secret_hash=hash_secret(token_id, secret), created_at=now,
                             expires_at=now + ttl, description=description, node_name=node_name)
    return f"{token_id}.{secret}.{pin}", record


def parse_join_token(text: str) -> ParsedToken:
    m = _TOKEN_RE.fullmatch((text or "").strip())
    if not m:
        raise InvalidInput("a join token looks like <8 chars>.<32 chars>.<64 hex digits> "
                           "(as printed by 'agentd token create'); this one does not")
    return ParsedToken(id=m.group(1), secret=m.group(2), ca_pin="sha256:" + m.group(3))


def _pin_hex(ca_pin: str) -> str:
    hexpart = ca_pin.removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise InvalidInput(f"{ca_pin!r} is not a CA pin (sha256:<64 hex digits>)")
    return hexpart


def add_token(store: TokenStore, record: JoinTokenRecord) -> dict[str, JoinTokenRecord]:
    if record.id in store:
        raise InvalidInput(f"join token {record.id} already exists")
    return {**store, record.id: record}


def check_token(store: TokenStore, token_id: str, secret_hash: str, *, now: float,
                node_name: str | None = None) -> TokenDecision:
    """Would `consume_token` accept? Lets a signer refuse garbage without a Raft round trip."""
    rec = store.get(token_id)
    if rec is None:
        return TokenDecision(False, f"join token {token_id} is unknown (revoked, pruned or never created)")
    # Compare before looking at state, so timing says nothing about a token's state to someone without its secret.
    if not hmac.compare_digest(rec.secret_hash, secret_hash):
        return TokenDecision(False, f"join token {token_id}: wrong secret")
    if rec.used_at is not None:
        return TokenDecision(False, f"join token {token_id} was already used by {rec.used_by or 'a host'}; "
                                    "tokens are single-use, create a new one")
    if now >= rec.expires_at:
        return TokenDecision(False, f"join token {token_id} expired {now - rec.expires_at:.0f}s ago; create a new one")
    if rec.node_name is not None and node_name != rec.node_name:
        return TokenDecision(False, f"join token {token_id} is for host {rec.node_name!r}, not {node_name!r}")
    return TokenDecision(True, f"join token {token_id} is valid", rec)


def consume_token(store: TokenStore, token_id: str, secret_hash: str, *, now: float,
                  node_name: str) -> tuple[dict[str, JoinTokenRecord], TokenDecision]:
    """Check and mark used in one step. On refusal the store is returned unchanged."""
    decision = check_token(store, token_id, secret_hash, now=now, node_name=node_name)
    if not decision.ok or decision.record is None:
        return dict(store), decision
    used = replace(decision.record, used_at=now, used_by=node_name)
    return {**store, token_id: used}, TokenDecision(True, f"join token {token_id} used by {node_name}", used)


def revoke_token(store: TokenStore, token_id: str) -> dict[str, JoinTokenRecord]:
    if token_id not in store:
        raise InvalidInput(f"no join token {token_id}")
    return {k: v for k, v in store.items() if k != token_id}


def prune_tokens(store: TokenStore, *, now: float, keep: float = 24 * 3600.0) -> dict[str, JoinTokenRecord]:
    """Drop tokens expired (or used) more than `keep` seconds ago; the record of recent use is kept for audit."""
    return {k: v for k, v in store.items() if max(v.expires_at, v.used_at or 0.0) + keep > now}
