"""Security commands: `agentd init-ca`, `agentd certs issue`, `agentd keys create|ls|revoke`.

These work on local files (the CA directory, the API key store file). Keys are
meant to live in the replicated store so that revocation is cluster-wide at
once; until the daemon serves them over gRPC, `--store` names the file an
agent reads them from.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from agentd.cli.main import emit
from agentd.config import load_settings, parse_duration
from agentd.errors import InvalidInput
from agentd.security import apikeys
from agentd.security.ca import (
    ROLE_ADMIN,
    ROLE_NODE,
    ROLES,
    init_ca,
    issue_identity,
    load_ca,
    save_identity,
)

DEFAULT_KEY_STORE = "apikeys.json"


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init-ca", parents=parents, help="create the cluster CA and this host's certificate",
                       description="Create the cluster certificate authority (ca.crt, ca.key) on the first host, "
                       "and a node certificate for this host. Prints the CA pin that join tokens carry.")
    p.add_argument("--dir", type=Path, help="where to write (default: tls_dir, i.e. <data_dir>/tls)")
    p.add_argument("--node-name", help="this host's node name (default: node_name setting)")
    p.add_argument("--address", action="append", default=[], metavar="HOST",
                   help="an extra address or DNS name peers use to reach this host (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing CA (every old certificate stops working)")
    p.set_defaults(func=cmd_init_ca)

    p = sub.add_parser("certs", parents=parents, help="issue certificates from the cluster CA",
                       description="Issue certificates on a host that holds the CA key.")
    csub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True, parser_class=type(p))
    s = csub.add_parser("issue", parents=parents, help="issue an admin or node certificate",
                        description="Issue a key and certificate signed by the cluster CA. Admin certificates "
                        "authorize Control calls; node certificates let a host join as a peer.")
    s.add_argument("--name", required=True, help="certificate name: the admin's name or the host's node name")
    s.add_argument("--role", choices=ROLES, default=ROLE_ADMIN, help="role granted (default: admin)")
    s.add_argument("--address", action="append", default=[], metavar="HOST",
                   help="node certificates: an address or DNS name of the host (repeatable)")
    s.add_argument("--out", type=Path, required=True,
                   help="directory for <role>.crt, <role>.key and ca.crt (created, owner-only)")
    s.add_argument("--ca-dir", type=Path, help="directory holding ca.crt and ca.key (default: tls_dir)")
    s.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    s.set_defaults(func=cmd_certs_issue)

    p = sub.add_parser("keys", parents=parents, help="manage API keys for the /v1/ endpoint",
                       description="Create, list and revoke API keys for the OpenAI-compatible /v1/ endpoint. "
                       "A key is shown once at creation; only its hash is stored.")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True, parser_class=type(p))
    store_help = f"API key store file (default: <data_dir>/{DEFAULT_KEY_STORE})"
    s = ksub.add_parser("create", parents=parents, help="create a key and print it once",
                        description="Create an API key for a tenant, optionally limited to some models.")
    s.add_argument("--tenant", required=True, help="the tenant the key acts for; it sees that tenant's models")
    s.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="limit the key to this model (repeatable; default: every model of the tenant)")
    s.add_argument("--name", default="", help="a label to recognise the key by in 'agentd keys ls'")
    s.add_argument("--admin", action="store_true",
                   help="an admin key: every model of every tenant, and Control calls as a bearer token")
    s.add_argument("--expires", metavar="DURATION", help="lifetime such as 90d, 12h or 30m (default: never)")
    s.add_argument("--store", type=Path, help=store_help)
    s.set_defaults(func=cmd_keys_create)
    s = ksub.add_parser("ls", parents=parents, help="list keys (never their secrets)",
                        description="List API keys with their tenant, models and state.")
    s.add_argument("--store", type=Path, help=store_help)
    s.set_defaults(func=cmd_keys_ls)
    s = ksub.add_parser("revoke", parents=parents, help="revoke a key",
                        description="Revoke an API key by its id; requests with it are refused from then on.")
    s.add_argument("key_id", help="the key's id, as 'agentd keys ls' shows it")
    s.add_argument("--store", type=Path, help=store_help)
    s.set_defaults(func=cmd_keys_revoke)


# ---------------------------------------------------------------- certificates


def cmd_init_ca(args: argparse.Namespace) -> int:
    settings = load_settings()
    directory = args.dir or settings.tls_directory
    name = args.node_name or settings.node_name
    addresses = [*args.address, settings.advertise_address, settings.listen, socket.getfqdn()]
    addresses = [a for a in addresses if not a.startswith("0.0.0.0") and not a.startswith("[::]")]
    ca = init_ca(directory, force=args.force)
    save_identity(directory, "node", issue_identity(ca, name, role=ROLE_NODE, addresses=addresses))
    data = {"ca_dir": str(directory), "ca_pin": ca.fingerprint, "node": name,
            "files": [str(directory / f) for f in ("ca.crt", "ca.key", "node.crt", "node.key")]}
    emit(args, data, lambda: "\n".join([
        f"created the cluster CA and a node certificate for {name} in {directory}",
        f"CA pin: {ca.fingerprint}",
        f"keep {directory / 'ca.key'} secret: whoever holds it can add hosts and admins",
        "next: 'agentd certs issue --name <you> --out <dir>' for an admin certificate",
    ]))
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise InvalidInput("--days must be at least 1")
    ca = load_ca(args.ca_dir or load_settings().tls_directory, need_key=True)
    identity = issue_identity(ca, args.name, role=args.role, addresses=args.address, validity_days=args.days)
    save_identity(args.out, args.role, identity)
    files = [str(args.out / f) for f in (f"{args.role}.crt", f"{args.role}.key", "ca.crt")]
    emit(args, {"name": args.name, "role": args.role, "files": files},
         f"issued {'an' if args.role == ROLE_ADMIN else 'a'} {args.role} certificate for {args.name}: "
         + ", ".join(files))
    return 0


# ---------------------------------------------------------------- API keys


def _store_path(args: argparse.Namespace) -> Path:
    return args.store or load_settings().data_dir / DEFAULT_KEY_STORE


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two `keys create` at once must not lose one of the keys."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def parse_lifetime(text: str) -> float:
    text = text.strip()
    try:
        if text.endswith("d"):
            return float(text[:-1]) * 86400
        return parse_duration(text)
    except ValueError:
        raise InvalidInput(f"--expires {text!r}: use a duration such as 90d, 12h, 30m") from None


def cmd_keys_create(args: argparse.Namespace) -> int:
    ttl = parse_lifetime(args.expires) if args.expires else None
    path = _store_path(args)
    now = time.time()
    with _locked(path):
        store = apikeys.load_store(path)
        secret, record = apikeys.new_api_key(tenant=args.tenant, models=args.model, name=args.name,
                                             admin=args.admin, ttl=ttl, now=now, random_bytes=secrets.token_bytes)
        apikeys.save_store(path, apikeys.add_key(store, record))
    data = {"key": secret, **_describe(record, now)}
    emit(args, data, lambda: "\n".join([
        secret,
        f"id {record.id}, tenant {record.tenant}, models {_models(record)}"
        + (", admin" if record.admin else "") + ("" if ttl is None else f", expires in {args.expires}"),
        "this is the only time the key is shown: store it now",
    ]))
    return 0


def cmd_keys_ls(args: argparse.Namespace) -> int:
    now = time.time()
    records = apikeys.list_keys(apikeys.load_store(_store_path(args)))
    rows = [_describe(r, now) for r in records]

    def human() -> str:
        lines = [f"{'ID':<12} {'TENANT':<16} {'STATE':<8} {'ADMIN':<6} {'CREATED':<17} {'MODELS':<24} NAME"]
        for r in records:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
            lines.append(f"{r.id:<12} {r.tenant:<16} {r.state(now):<8} {'yes' if r.admin else 'no':<6} "
                         f"{created:<17} {_models(r):<24} {r.name}")
        return "\n".join(lines)

    emit(args, {"keys": rows}, human)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    path = _store_path(args)
    now = time.time()
    with _locked(path):
        store, record = apikeys.revoke_key(apikeys.load_store(path), args.key_id, now=now)
        apikeys.save_store(path, store)
    emit(args, _describe(record, now), f"revoked API key {record.id} (tenant {record.tenant})")
    return 0


def _models(r: apikeys.ApiKeyRecord) -> str:
    return ",".join(r.models) if r.models else "all"


def _describe(r: apikeys.ApiKeyRecord, now: float) -> dict:
    return {"id": r.id, "name": r.name, "tenant": r.tenant, "models": list(r.models), "admin": r.admin,
            "state": r.state(now), "created_at": r.created_at, "expires_at": r.expires_at,
            "revoked_at": r.revoked_at}
