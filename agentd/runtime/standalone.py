"""Run one host's supervisor from a desired-state file, without the cluster.

    python -m agentd.runtime.standalone --node NAME --data-dir DIR --desired FILE [--status FILE]

FILE holds a JSON list of Assignments (agentd.types). It is re-read when it
changes, so editing it is "deploy" and "delete". The status (what `agentd ps`
shows for this host) is written to --status after every state change. On
SIGTERM or SIGINT the supervisor stops supervising and the model servers keep
running (as across an agentd upgrade) unless --stop-on-exit is given.

This is what the runtime tests and benchmarks use to kill -9 "agentd" and
start it again over the same data dir; it is also handy for trying a runtime
plugin by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from agentd.config import load_settings
from agentd.errors import AgentdError
from agentd.logs import setup_logging
from agentd.plugins import PluginManager
from agentd.runtime.process import descendants, group_members, is_same_process
from agentd.runtime.records import ProcessRecord, atomic_write
from agentd.runtime.supervisor import Supervisor
from agentd.types import Assignment

_ASSIGNMENTS = TypeAdapter(list[Assignment])


def read_desired(path: Path) -> list[Assignment]:
    if not path.exists():
        return []
    try:
        return _ASSIGNMENTS.validate_json(path.read_bytes())
    except ValidationError as exc:
        raise AgentdError(f"{path}: not a JSON list of assignments: {exc.errors()[0]['msg']}") from None


def kill_recorded(root: Path) -> list[int]:
    """SIGKILL every recorded process tree under `root` (a data dir, or any dir holding data dirs).

    For cleaning up after a crashed or aborted run: `--kill-recorded`, and
    the runtime tests' teardown. Only processes whose pid still has the
    recorded start time are touched.
    """
    killed = []
    for rec_path in sorted(Path(root).rglob("runtime/records/*/*.json")):
        try:
            rec = ProcessRecord.model_validate_json(rec_path.read_bytes())
        except (OSError, ValueError):
            continue
        if not is_same_process(rec.pid, rec.create_time):
            continue
        pids = {rec.pid, *descendants(rec.pid), *group_members(rec.pgid)}
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec.pgid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed.extend(sorted(pids))
    return killed


def write_status(sup: Supervisor, path: Path) -> None:
    data = {"node": sup.node, "instances": [s.model_dump(mode="json") for s in sup.status()]}
    atomic_write(path, json.dumps(data, indent=1).encode())


async def run(args: argparse.Namespace) -> int:
    overrides = json.loads(args.settings) if args.settings else {}
    settings = load_settings(node_name=args.node, data_dir=args.data_dir, **overrides)
    plugins = PluginManager.load(settings.plugins, settings.disable_plugins)
    status_path = Path(args.status) if args.status else None
    desired_path = Path(args.desired)
    dirty = asyncio.Event()
    sup = Supervisor(node=settings.node_name, data_dir=settings.data_dir, plugins=plugins, settings=settings,
                     simulated_gpus=args.simulated_gpus, on_event=lambda e: dirty.set())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sup.start()
    last_mtime = None
    while not stop.is_set():
        try:
            mtime = desired_path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = 0
        if mtime != last_mtime:
            last_mtime = mtime
            try:
                await sup.apply(read_desired(desired_path))
            except AgentdError as exc:
                print(f"standalone: {exc}", file=sys.stderr)
            dirty.set()
        if dirty.is_set() and status_path is not None:
            dirty.clear()
            write_status(sup, status_path)
        try:
            async with asyncio.timeout(0.2):
                await stop.wait()
        except TimeoutError:
            pass
    await sup.close(stop_processes=args.stop_on_exit)
    if status_path is not None:
        write_status(sup, status_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agentd.runtime.standalone", description=__doc__.split("\n")[0])
    p.add_argument("--node")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--desired", help="JSON list of assignments; re-read when it changes")
    p.add_argument("--kill-recorded", action="store_true",
                   help="SIGKILL every process recorded in --data-dir, then exit (cleanup after a crash)")
    p.add_argument("--status", help="write the status JSON here after every change")
    p.add_argument("--settings", help="JSON object of extra agentd settings (e.g. binaries, timings)")
    p.add_argument("--simulated-gpus", action="store_true")
    p.add_argument("--stop-on-exit", action="store_true")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.kill_recorded:
        print(" ".join(map(str, kill_recorded(Path(args.data_dir)))) or "nothing recorded is running")
        return 0
    if not args.node or not args.desired:
        p.error("--node and --desired are required")
    setup_logging("json", args.log_level)
    try:
        return asyncio.run(run(args))
    except AgentdError as exc:
        print(f"standalone: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
