"""Day-two operations: `agentd snapshot save|restore` (docs/operations.md, "Backup and restore").

`save` asks any agent for a consistent copy of the replicated state and writes
it to a file only its owner can read (it holds the cluster secret and the API
key hashes). `restore` is offline, like etcd's: it seeds a new data directory
from the file under a new cluster id; the agent started on that directory leads
a one-voter cluster that the other hosts join.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from agentd.cli.common import emit
from agentd.errors import InvalidInput


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshot", parents=parents, help="back up or restore the cluster's replicated state",
                       description="Back up the replicated state (deployments, assignments, API keys, join tokens, "
                                   "tenants, the cluster secret) and seed a new cluster from a backup.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = verbs.add_parser("save", parents=parents, help="write a consistent snapshot of the state to FILE",
                         description="Write a consistent snapshot (a linearizable read point: every write "
                                     "committed before the call is in it) to FILE, mode 0600. Any agent answers; "
                                     "it needs a leader. Back up the CA (data_dir/tls/ca.key, ca.crt) with it.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--server", metavar="ADDR", help="agent to talk to (default: this host's agent)")
    s.set_defaults(func=cmd_save)
    r = verbs.add_parser("restore", parents=parents, help="seed a new data directory from a snapshot FILE",
                         description="Offline: make DIR the data directory of a new one-voter cluster (a new "
                                     "cluster id) holding FILE's state. Start `agentd serve` on it, then join "
                                     "the other hosts. DIR must hold no Raft log; its tls/ and runtime/ are kept.")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--data-dir", required=True, metavar="DIR", help="the new agent's data directory")
    r.add_argument("--node-name", metavar="NAME", help="the restoring agent's name (default: from the config)")
    r.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address other agents reach it on (default: advertise, else listen, from the config)")
    r.set_defaults(func=cmd_restore)


def cmd_save(args: argparse.Namespace) -> int:
    from agentd.api.client import ControlClient
    from agentd.cluster import backup
    from agentd.v1 import control_pb2 as pb

    path = Path(args.file)
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory; give a file name")
    started = time.monotonic()
    with ControlClient.for_cli(args.server, timeout=120.0) as c:
        first: pb.SnapshotChunk | None = None
        parts: list[bytes] = []
        for chunk in c.stream("Snapshot", pb.SnapshotRequest()):
            first = first or chunk
            parts.append(chunk.data)
    if first is None:
        raise InvalidInput(f"the agent at {c.address} sent no snapshot")
    state = b"".join(parts)
    if len(state) != first.size:
        raise InvalidInput(f"the snapshot stream was cut short: {len(state)} of {first.size} bytes")
    from agentd.version import AGENT_VERSION

    data = backup.encode(state, index=first.index, term=first.term, cluster_id=first.cluster_id,
                         node=first.node_id, agent_version=AGENT_VERSION)
    backup.write_file(path, data)
    out = {"saved": str(path), "index": first.index, "term": first.term, "cluster_id": first.cluster_id,
           "node": first.node_id, "bytes": len(data), "seconds": round(time.monotonic() - started, 3)}
    emit(args, out, lambda: f"saved the state at index {first.index} (term {first.term}) from {first.node_id} "
                            f"to {path} ({len(data)} bytes, mode 0600); back up the CA (tls/ca.key) too")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from agentd.cluster import backup

    node, address = args.node_name, args.advertise
    if not node or not address:
        from agentd.config import load_settings

        settings = load_settings()
        node = node or settings.node_name
        address = address or settings.advertise_address
    out = backup.seed_data_dir(Path(args.file), Path(args.data_dir), node_id=node, address=address)
    emit(args, out, lambda: (
        f"restored the state at index {out['index']} into {out['data_dir']}: a new cluster "
        f"{out['cluster_id']} whose only voter is {node} ({address}); start it with "
        f"'agentd serve --data-dir {out['data_dir']} --node-name {node}' (no --join), then join the other hosts"))
    return 0
