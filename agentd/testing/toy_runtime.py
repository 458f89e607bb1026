"""A toy runtime plugin and a supervisor to run it, for tests of agentd.runtime: part 0 "db" (TCP-ready) and
part 1 "api" (HTTP-ready) that waits for db, both small Python HTTP servers; options steer failures.

Shared by tests/test_runtime_supervisor.py and the runtime test modules that build on it, so that no test module
imports another. The fixtures `toy` and `plugins` that go with it are in tests/conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agentd.config import load_settings
from agentd.errors import InvalidInput
from agentd.plugins import hookimpl
from agentd.runtime import Endpoint, HealthVerdict, HttpProbe, ProcessSpec, Supervisor, SupervisorConfig, TcpProbe
from agentd.runtime.backoff import BackoffPolicy
from agentd.testing.localcluster import free_port
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

SERVER = r"""
import http.server, os, sys
port, sick = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if os.path.exists(sick) else 200
        self.send_response(code); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
print("toy server on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""

FAST = SupervisorConfig(startup_timeout=10, ready_poll=0.05, health_interval=0.1, health_timeout=0.5,
                        liveness_failures=2, stop_grace=2, start_retries=2, dependency_poll=0.05,
                        backoff=BackoffPolicy(initial=0.1, maximum=0.5, jitter=0.0, stable_after=30))


class Toy:
    """A runtime plugin: part 0 "db" (TCP-ready), part 1 "api" that waits for db. Options steer failures."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.stopped: list[tuple[str, int]] = []

    @hookimpl
    def agentd_launch(self, assignment, part_index, ctx):
        if assignment.runtime != "toy":
            return None
        env = assignment.options.env
        if env.get("refuse"):
            raise InvalidInput("toy cannot run this")
        if env.get("crash"):
            raise ZeroDivisionError("plugin bug")
        ep = assignment.endpoints[part_index]
        mine = Endpoint(host=ep.address, port=ep.port)
        argv = (env.get("binary", sys.executable), "-c", env.get("script", SERVER), str(ep.port),
                str(self.tmp / f"sick-{part_index}"))
        others = tuple(Endpoint(host=e.address, port=e.port) for i, e in enumerate(assignment.endpoints)
                       if i < part_index)
        probe = TcpProbe(host=ep.address, port=ep.port) if part_index == 0 else HttpProbe(host=ep.address,
                                                                                          port=ep.port)
        return [ProcessSpec(name="db" if part_index == 0 else "api", argv=argv, part_index=part_index,
                            listen=mine, ports=(mine,), ready=probe, wait_for=others, cwd=str(ctx.work_dir))]

    @hookimpl
    def agentd_health(self, assignment, part_index, process, result):
        if assignment.runtime == "toy" and result.status == 500:
            return HealthVerdict(ready=False, alive=False, detail="toy says sick")
        return None

    @hookimpl
    def agentd_stop(self, assignment, part_index, ctx):
        if assignment.runtime == "toy":
            self.stopped.append((assignment.instance_id, part_index))


def make(tmp: Path, plugins, node="h1", **kw) -> Supervisor:
    s = load_settings(data_dir=str(tmp / "data"), node_name=node)
    return Supervisor(node=node, data_dir=tmp / "data", plugins=plugins, settings=s, config=kw.pop("config", FAST),
                      **kw)


def toy_assignment(parts: int = 2, hosts=("h1", "h1"), gen: int = 1, name: str = "toy", **env) -> Assignment:
    ports = [free_port() for _ in range(parts)]
    return Assignment(
        deployment=name, replica=0, generation=gen, term=1, model="m", runtime="toy",
        options=RuntimeOptions(env={k: str(v) for k, v in env.items()}),
        plan=ReplicaPlan(parts=tuple(Part(host=hosts[i], role="main" if i == 0 else "worker")
                                     for i in range(parts))),
        endpoints=tuple(PartEndpoint(host=hosts[i], address="127.0.0.1", port=p) for i, p in enumerate(ports)))
