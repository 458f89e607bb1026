"""Security commands: `init-ca`, `certs issue`, `token create|ls|revoke`, `join`, `keys create|ls|revoke`.

`init-ca` and `certs issue` work on local files (they need the CA key, so they
run on a signer). Tokens and API keys live in the replicated cluster state:
those commands talk to an agent over gRPC with the caller's admin credentials
(agentd.api.client.ControlClient.for_cli), and any agent forwards them to the
leader. `join` runs on a new host, before its agent starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agentd.api.client import ControlClient
from agentd.cli.common import client_options, emit
from agentd.config import load_settings, parse_duration
from agentd.errors import AgentdError, InvalidInput
from agentd.security.ca import (
    ROLE_ADMIN,
    ROLE_NODE,
    ROLES,
    init_ca,
    issue_identity,
    load_ca,
    save_identity,
)
from agentd.v1 import security_pb2 as sec_pb


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
    s = csub.add_parser("revoke", parents=[*parents, client_options()],
                        help="revoke a host's or an admin's certificates",
                        description="Revoke every certificate issued so far for NAME (a host or an admin). Each "
                        "agent refuses it on every call and closes its open streams; a host of that name is "
                        "removed from the cluster. A new certificate for NAME takes a join token bound to it "
                        "('agentd token create --node NAME') or 'agentd certs issue' on a signer. Admin only.")
    s.add_argument("name", help="the certificate name: a node name, or an admin's name")
    s.set_defaults(func=cmd_certs_revoke)

    cparents = [*parents, client_options()]

    p = sub.add_parser("token", parents=parents, help="create and manage one-time join tokens",
                       description="Join tokens let a new host get its node certificate with "
                       "'agentd join --token'. Each is single-use and expires. Admin only.")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True, parser_class=type(p))
    s = tsub.add_parser("create", parents=cparents, help="create a token and print it once",
                        description="Create a one-time join token (printed once; the cluster keeps its hash).")
    s.add_argument("--ttl", default="1h", metavar="DURATION", help="lifetime, e.g. 30m, 1h, 2d (default 1h; max 7d)")
    s.add_argument("--node", "--node-name", dest="node_name", default="", metavar="NAME",
                   help="the host name the token is for: only a host of this name may use it (required "
                        "unless --any-node)")
    s.add_argument("--any-node", action="store_true",
                   help="a token any host name may use (whoever holds it chooses the name)")
    s.add_argument("--needs-approval", action="store_true",
                   help="the host gets no work until 'agentd nodes approve NAME'")
    s.add_argument("--description", default="", help="a note shown by 'agentd token ls'")
    s.set_defaults(func=cmd_token_create)
    s = tsub.add_parser("ls", parents=cparents, help="list join tokens (never their secrets)",
                        description="List join tokens: id, state, expiry, and who used them.")
    s.set_defaults(func=cmd_token_ls)
    s = tsub.add_parser("revoke", parents=cparents, help="delete an unused token",
                        description="Revoke a join token by its id (the part before the first dot).")
    s.add_argument("token_id")
    s.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser("join", parents=parents, help="get this host's node certificate with a join token",
                       description="Fetch the cluster CA (checked against the pin inside the token), send a "
                       "certificate request and write node.crt, node.key and ca.crt into tls_dir. Then start "
                       "the agent with 'agentd serve --join <peers>' (printed).")
    p.add_argument("--token", required=True, help="the token from 'agentd token create'")
    p.add_argument("--server", required=True, metavar="ADDR",
                   help="an agent's token port (HOST:7071) or gRPC port (HOST:7070)")
    p.add_argument("--node-name", help="this host's node name (default: node_name setting)")
    p.add_argument("--address", action="append", default=[], metavar="HOST",
                   help="an extra address or DNS name peers use to reach this host (repeatable)")
    p.add_argument("--dir", type=Path, help="where to write (default: tls_dir, i.e. <data_dir>/tls)")
    p.add_argument("--force", action="store_true", help="replace an existing node certificate")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("keys", parents=parents, help="manage API keys for the /v1/ endpoint",
                       description="Create, list and revoke API keys for the OpenAI-compatible /v1/ endpoint. "
                       "Keys live in the replicated cluster state: a revocation is refused on every agent at "
                       "once. A key is shown once at creation; only its hash is stored. Admin only.")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True, parser_class=type(p))
    s = ksub.add_parser("create", parents=cparents, help="create a key and print it once",
                        description="Create an API key for a tenant, optionally limited to some models.")
    s.add_argument("--tenant", required=True, help="the tenant the key acts for; it sees that tenant's models")
    s.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="limit the key to this model (repeatable; default: every model of the tenant)")
    s.add_argument("--name", default="", help="a label to recognise the key by in 'agentd keys ls'")
    s.add_argument("--admin", action="store_true",
                   help="an admin key: every model of every tenant, and Control calls as a bearer token")
    s.add_argument("--expires", metavar="DURATION", help="lifetime such as 90d, 12h or 30m (default: never)")
    s.set_defaults(func=cmd_keys_create)
    s = ksub.add_parser("ls", parents=cparents, help="list keys (never their secrets)",
                        description="List API keys with their tenant, models and state.")
    s.set_defaults(func=cmd_keys_ls)
    s = ksub.add_parser("revoke", parents=cparents, help="revoke a key",
                        description="Revoke an API key by its id; every agent refuses it from then on.")
    s.add_argument("key_id", help="the key's id, as 'agentd keys ls' shows it")
    s.set_defaults(func=cmd_keys_revoke)
    s = ksub.add_parser("rotate-secret", parents=cparents,
                        help="rotate the cluster secret model-server keys derive from",
                        description="Make a new cluster secret: instances started from now on get model-server keys "
                        "from it; running ones keep theirs until they are replaced ('agentd deploy --replace'). "
                        "Refused while an instance from before the previous rotation still runs.")
    s.set_defaults(func=cmd_keys_rotate_secret)


# ---------------------------------------------------------------- certificates


def cmd_init_ca(args: argparse.Namespace) -> int:
    from agentd.api.join_client import node_addresses

    settings = load_settings()
    directory = args.dir or settings.tls_directory
    name = args.node_name or settings.node_name
    addresses = node_addresses(settings, args.address)
    ca = init_ca(directory, force=args.force)
    save_identity(directory, "node", issue_identity(ca, name, role=ROLE_NODE, addresses=addresses))
    data = {"ca_dir": str(directory), "ca_pin": ca.fingerprint, "node": name,
            "files": [str(directory / f) for f in ("ca.crt", "ca.key", "node.crt", "node.key")]}
    emit(args, data, lambda: "\n".join([
        f"created the cluster CA and a node certificate for {name} in {directory}",
        f"CA pin: {ca.fingerprint}",
        f"keep {directory / 'ca.key'} secret: whoever holds it can add hosts and admins",
        "next: start the agent ('agentd serve'), issue your admin certificate with 'agentd certs issue --name "
        "<you> --out ~/.config/agentd/tls', and add hosts with 'agentd token create' + 'agentd join'",
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


def cmd_nodes_approve(args: argparse.Namespace) -> int:
    if not args.name:
        raise InvalidInput("agentd nodes approve NAME: give the host to approve")
    reply = _call(args, "ApproveNode", sec_pb.ApproveNodeRequest(name=args.name, tenants=args.tenant))
    emit(args, {"name": args.name, "tenants": sorted(set(args.tenant)), "message": reply.message}, reply.message)
    return 0


def cmd_keys_rotate_secret(args: argparse.Namespace) -> int:
    reply = _call(args, "RotateClusterSecret", sec_pb.RotateClusterSecretRequest())
    emit(args, {"message": reply.message, "instances_on_old_secret": reply.instances_on_old_secret,
                "lagging": list(reply.lagging)}, reply.message)
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    reply = _call(args, "RevokeCertificate", sec_pb.RevokeCertificateRequest(name=args.name))
    data = {"name": args.name, "message": reply.message, "index": reply.index, "lagging": list(reply.lagging),
            "removed": reply.removed}
    text = f"{reply.message}; " + ("every agent refuses them now" if not reply.lagging else
                                   f"not yet confirmed by {', '.join(reply.lagging)} (they refuse them once they "
                                   "catch up)")
    if reply.removed:
        text += f"; {args.name} was removed from the cluster"
    emit(args, data, text)
    return 0


# ---------------------------------------------------------------- join tokens


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient.for_cli(getattr(args, "server", None))


def _call(args: argparse.Namespace, method: str, request) -> object:
    with _client(args) as c:
        try:
            return c.call(method, request)
        except AgentdError as exc:
            if "UNIMPLEMENTED" in str(exc):
                raise InvalidInput(f"the agent at {c.address} does not manage keys or tokens "
                                   "(it runs with --insecure)") from None
            raise


def parse_lifetime(text: str, flag: str = "--expires") -> float:
    """A positive, finite lifetime: `0s` must not become 'never expires' (0 means that on the wire)."""
    text = text.strip()
    try:
        seconds = float(text[:-1]) * 86400 if text.endswith("d") else parse_duration(text)
    except ValueError:
        raise InvalidInput(f"{flag} {text!r}: use a duration such as 90d, 12h, 30m") from None
    if not 0 < seconds < float("inf"):  # also NaN ('nand') and inf ('infd')
        raise InvalidInput(f"{flag} {text!r}: the lifetime must be a positive duration such as 90d, 12h, 30m")
    return seconds


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def cmd_token_create(args: argparse.Namespace) -> int:
    ttl = parse_lifetime(args.ttl, "--ttl")
    if not args.node_name and not args.any_node:
        raise InvalidInput("give the host the token is for (--node NAME); a token any host may use needs --any-node")
    if args.node_name and args.any_node:
        raise InvalidInput("--node and --any-node exclude each other")
    reply = _call(args, "CreateJoinToken", sec_pb.CreateJoinTokenRequest(
        ttl_seconds=ttl, node_name=args.node_name, any_node=args.any_node, needs_approval=args.needs_approval,
        description=args.description))
    data = {"token": reply.token, **_token_dict(reply.info)}
    # Only the token on stdout, so `T=$(agentd token create)` captures just it; the hints go to stderr.
    emit(args, data, reply.token)
    if not getattr(args, "json", False):
        print(f"id {reply.info.id}, expires {_when(reply.info.expires_at)}"
              + (f", only for host {reply.info.node_name}" if reply.info.node_name else "") + ", single use\n"
              "on the new host: agentd join --token <token> --server <an agent's address>", file=sys.stderr)
    return 0


def cmd_token_ls(args: argparse.Namespace) -> int:
    reply = _call(args, "ListJoinTokens", sec_pb.ListJoinTokensRequest())
    rows = [_token_dict(t) for t in reply.tokens]

    def human() -> str:
        lines = [f"{'ID':<10} {'STATE':<8} {'EXPIRES':<17} {'HOST':<16} {'USED BY':<16} DESCRIPTION"]
        for t in reply.tokens:
            lines.append(f"{t.id:<10} {t.state:<8} {_when(t.expires_at):<17} {t.node_name or '-':<16} "
                         f"{t.used_by or '-':<16} {t.description}")
        return "\n".join(lines)

    emit(args, {"tokens": rows}, human)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    reply = _call(args, "RevokeJoinToken", sec_pb.RevokeJoinTokenRequest(id=args.token_id.split(".")[0]))
    emit(args, {"message": reply.message}, reply.message)
    return 0


def _token_dict(t) -> dict:
    return {"id": t.id, "state": t.state, "description": t.description, "node_name": t.node_name,
            "created_at": t.created_at, "expires_at": t.expires_at, "used_at": t.used_at or None,
            "used_by": t.used_by or None}


def cmd_join(args: argparse.Namespace) -> int:
    from agentd.api.join_client import join_cluster, node_addresses

    settings = load_settings()
    name = args.node_name or settings.node_name
    directory = args.dir or settings.tls_directory
    result = join_cluster(args.token, [args.server], tls_dir=directory, node_name=name,
                          addresses=node_addresses(settings, args.address), force=args.force)
    peers = ",".join(result.peers)
    data = {"node": name, "tls_dir": str(directory), "signer": result.signer, "peers": list(result.peers),
            "files": [str(directory / f) for f in ("node.crt", "node.key", "ca.crt")]}
    emit(args, data, lambda: "\n".join([
        f"joined: {result.signer} signed a node certificate for {name}; wrote node.crt, node.key, ca.crt in "
        f"{directory}",
        f"next: agentd serve --node-name {name} --join {peers}",
    ]))
    return 0


# ---------------------------------------------------------------- API keys


def cmd_keys_create(args: argparse.Namespace) -> int:
    ttl = parse_lifetime(args.expires) if args.expires else 0.0
    reply = _call(args, "CreateApiKey", sec_pb.CreateApiKeyRequest(
        tenant=args.tenant, models=args.model, name=args.name, admin=args.admin, ttl_seconds=ttl))
    info = reply.info
    data = {"key": reply.key, **_key_dict(info)}
    emit(args, data, reply.key)  # only the key on stdout (`K=$(agentd keys create ...)`), hints on stderr
    if not getattr(args, "json", False):
        print(f"id {info.id}, tenant {info.tenant}, models {','.join(info.models) or 'all'}"
              + (", admin" if info.admin else "") + ("" if not ttl else f", expires in {args.expires}") + "\n"
              "this is the only time the key is shown: store it now", file=sys.stderr)
    return 0


def cmd_keys_ls(args: argparse.Namespace) -> int:
    reply = _call(args, "ListApiKeys", sec_pb.ListApiKeysRequest())

    def human() -> str:
        lines = [f"{'ID':<12} {'TENANT':<16} {'STATE':<8} {'ADMIN':<6} {'CREATED':<17} {'MODELS':<24} NAME"]
        for r in reply.keys:
            lines.append(f"{r.id:<12} {r.tenant:<16} {r.state:<8} {'yes' if r.admin else 'no':<6} "
                         f"{_when(r.created_at):<17} {','.join(r.models) or 'all':<24} {r.name}")
        return "\n".join(lines)

    emit(args, {"keys": [_key_dict(r) for r in reply.keys]}, human)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    reply = _call(args, "RevokeApiKey", sec_pb.RevokeApiKeyRequest(id=args.key_id))
    lagging = list(reply.lagging)
    data = {**_key_dict(reply.info), "index": reply.index, "lagging": lagging}
    where = ("every agent refuses it now" if not lagging
             else f"not yet confirmed by {', '.join(lagging)} (unreachable; they refuse it once they catch up)")
    emit(args, data, f"revoked API key {reply.info.id} (tenant {reply.info.tenant}): {where}")
    return 0


def _key_dict(r) -> dict:
    return {"id": r.id, "name": r.name, "tenant": r.tenant, "models": list(r.models), "admin": r.admin,
            "state": r.state, "created_at": r.created_at, "expires_at": r.expires_at or None,
            "revoked_at": r.revoked_at or None}
