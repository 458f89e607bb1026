"""`agentd logs`: an instance part's log on this host, the current run or the previous one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from agentd.cluster.state import ClusterState
from agentd.errors import InvalidInput
from agentd.runtime import Supervisor, logfiles
from agentd.v1 import control_pb2 as pb


class InstanceLogs:
    def __init__(self, node: str, state: ClusterState, supervisor: Supervisor):
        self.node = node
        self.state = state
        self.supervisor = supervisor

    async def read(self, request: pb.LogsRequest) -> AsyncIterator[bytes]:
        """An instance part's log on this host: the current run, or the previous one."""
        a = self._assignment(request.instance_id)
        part = request.part
        if part < 0:
            part = next((i for i, p in enumerate(a.plan.parts) if p.role == "main"), 0)
        st = self.supervisor.instance(a.instance_id)
        procs = [p for p in (st.processes if st else ()) if p.part_index == part]
        if not procs:
            raise InvalidInput(f"{a.instance_id} part {part} has no process on {self.node}")
        runs = self.supervisor.log_files(a.instance_id, procs[0].name)
        index = 1 if request.previous else 0
        if len(runs) <= index or not runs[index].exists():
            raise InvalidInput(f"{a.instance_id} part {part} has no {'previous ' if request.previous else ''}log")
        path = runs[index]
        if request.tail_lines > 0:
            lines = logfiles.tail(path, request.tail_lines)
            yield ("\n".join(lines) + "\n").encode() if lines else b""
            if request.follow:
                async for chunk in logfiles.follow(path, from_start=False):
                    yield chunk
            return
        if request.follow and not request.previous:
            async for chunk in logfiles.follow(path):
                yield chunk
            return
        with open(path, "rb") as f:
            while chunk := f.read(65536):
                yield chunk

    def _assignment(self, instance_id: str) -> Any:
        for a in self.state.incarnations():
            if instance_id in (a.instance_id, f"{a.deployment}-r{a.replica}"):
                return a
        raise InvalidInput(f"no instance {instance_id!r}")
