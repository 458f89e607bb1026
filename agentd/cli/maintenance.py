"""`agentd cordon`, `agentd uncordon`, `agentd drain`: kubectl's verbs for hosts and single GPUs.

A TARGET is a host name, HOST:INDEX for one GPU, or a GPU UUID. The state lives
in the replicated log, so it survives restarts and failovers; the leader does the
moving (agentd/drains.py). `drain` waits and shows progress; when it gives up
(`--timeout`), the host stays cordoned and the coordinator keeps draining it:
`agentd uncordon` cancels.
"""

from __future__ import annotations

import argparse
import sys
import time

from agentd.cli.common import EXIT_UNAVAILABLE, client_options, emit
from agentd.errors import InvalidInput

TARGET_HELP = "a host name, HOST:INDEX for one GPU, or a GPU UUID"


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    cparents = [*parents, client_options()]

    p = sub.add_parser("cordon", parents=cparents, help="give a host or GPU no new parts",
                       description="Mark a host, or one GPU, so placement gives it no new parts (deploys, scale-ups, "
                       "re-placements). What runs there keeps running. Survives restarts and failovers.")
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("--reason", default="", help="shown in `agentd nodes` and in placement diagnoses")
    p.set_defaults(func=cmd_cordon)

    p = sub.add_parser("uncordon", parents=cparents, help="let a host or GPU take new parts again",
                       description="Lift a cordon (and stop a drain in progress: replicas already moved stay where "
                       "they are).")
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.set_defaults(func=cmd_uncordon)

    p = sub.add_parser("drain", parents=cparents, help="cordon a host or GPU and move its replicas away",
                       description="Cordon TARGET, then move every replica with a part there: each one's "
                       "successor is placed elsewhere and must be running before the old one stops, so a "
                       "deployment with room elsewhere never loses a ready replica. A replica with no room "
                       "elsewhere waits (or, with --force, is stopped). Returns when nothing is left to move.")
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("--reason", default="", help="shown in `agentd nodes` and in placement diagnoses")
    p.add_argument("--force", action="store_true",
                   help="stop a replica that has no room elsewhere instead of waiting for room")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="give up waiting after this long (default 600; the drain goes on in the background)")
    p.set_defaults(func=cmd_drain)


def _client(args: argparse.Namespace):
    from agentd.api.client import ControlClient

    return ControlClient.for_cli(getattr(args, "server", None))


def _what(reply) -> str:
    return reply.host if reply.gpu < 0 else f"{reply.host} GPU {reply.gpu}"


def cmd_cordon(args: argparse.Namespace) -> int:
    from agentd.v1 import control_pb2 as pb

    with _client(args) as c:
        r = c.call("Cordon", pb.CordonRequest(target=args.target, reason=args.reason))
    emit(args, {"message": r.message, "index": r.index, "host": r.host, "gpu": None if r.gpu < 0 else r.gpu},
         lambda: f"{_what(r)} cordoned: no new parts there")
    return 0


def cmd_uncordon(args: argparse.Namespace) -> int:
    from agentd.v1 import control_pb2 as pb

    with _client(args) as c:
        r = c.call("Uncordon", pb.UncordonRequest(target=args.target))
    emit(args, {"message": r.message, "index": r.index, "host": r.host, "gpu": None if r.gpu < 0 else r.gpu},
         lambda: f"{_what(r)} uncordoned")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from agentd.v1 import control_pb2 as pb

    if not args.timeout > 0:
        raise InvalidInput(f"--timeout {args.timeout:g}: give a positive number of seconds")
    json_out = bool(getattr(args, "json", False))
    with _client(args) as c:
        r = c.call("Cordon", pb.CordonRequest(target=args.target, reason=args.reason, drain=True, force=args.force))
        if not json_out:
            print(f"{_what(r)} cordoned; moving its replicas (each successor runs before the old one stops)",
                  flush=True)
        deadline = time.monotonic() + args.timeout
        start, last, first_left = time.monotonic(), None, None
        while True:
            node = next((n for n in c.nodes() if n.name == r.host), None)
            left, blocked = (node.draining, node.drain_blocked) if node is not None else (0, "")
            first_left = left if first_left is None else first_left
            if (left, blocked) != last and not json_out:
                print(f"  {left} replica(s) left to move" + (f"; waiting: {blocked}" if blocked else ""),
                      flush=True)
                last = (left, blocked)
            if left == 0:
                emit(args, {"host": r.host, "gpu": None if r.gpu < 0 else r.gpu, "drained": True,
                            "moved": first_left, "seconds": round(time.monotonic() - start, 1)},
                     lambda: f"{_what(r)} drained in {time.monotonic() - start:.1f}s")
                return 0
            if time.monotonic() > deadline:
                why = f"; waiting: {blocked}" if blocked else ""
                print(f"agentd: drain of {_what(r)} not done after {args.timeout:g}s: {left} replica(s) left{why}. "
                      "It stays cordoned and the drain goes on; `agentd uncordon` cancels it", file=sys.stderr)
                return EXIT_UNAVAILABLE
            time.sleep(0.5)
