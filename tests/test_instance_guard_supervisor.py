"""The instance guard as agentd's supervisor launches it: the library is preloaded into a real instance process
and its children, with the policy the assignment implies; the serving port stays open to everyone while another
listener in the same process tree takes only the instance's hosts (127.0.0.2 and 127.0.0.3 here; 127.0.0.4 is a
stranger). Insecure instances and `instance_guard = "off"` run without it; a secure launch where it cannot be
built fails, saying what to do."""

from __future__ import annotations

import dataclasses
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agentd.runtime import guard as runtime_guard
from agentd.security import guard, native
from agentd.testing.localcluster import free_port
from agentd.testing.toy_runtime import FAST, make
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

# Serves HTTP on its endpoint (0.0.0.0: the guard, not the bind, decides) and starts a child that listens on
# every interface too (a rendezvous store's place); the child's port goes to <sick>.side.
SERVER = r"""
import http.server, subprocess, sys, time
port, sick = int(sys.argv[1]), sys.argv[2]
child = r'''
import socket, sys
s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen(8)
open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1]))
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    c, _ = s.accept(); c.sendall(b"store\n"); c.close()
'''
subprocess.Popen([sys.executable, "-c", child, sick + ".side"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", port), H).serve_forever()
"""


def two_host_assignment(api_key: str = "k", addresses: tuple[str, str] = ("127.0.0.2", "127.0.0.3")) -> Assignment:
    """Part 0 (main) on h1 at 127.0.0.2, part 1 on h2 at 127.0.0.3: h1's supervisor runs part 0 only."""
    return Assignment(
        deployment="guarded", replica=0, generation=1, term=1, model="m", runtime="toy",
        options=RuntimeOptions(env={"script": SERVER}),
        plan=ReplicaPlan(parts=(Part(host="h1", role="main"), Part(host="h2", role="worker"))),
        endpoints=(PartEndpoint(host="h1", address=addresses[0], port=free_port()),
                   PartEndpoint(host="h2", address=addresses[1], port=free_port())),
        api_key=api_key)


def talk(port: int, source: str) -> bytes:
    with socket.socket() as c:
        c.settimeout(20)
        c.bind((source, 0))
        c.connect(("127.0.0.2", port))
        try:
            return c.recv(100)
        except ConnectionResetError:
            return b""


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


def side_port(tmp_path: Path) -> int:
    side = tmp_path / "sick-0.side"
    deadline = time.monotonic() + 20
    while not side.exists():
        assert time.monotonic() < deadline, "the child listener did not start"
        time.sleep(0.05)
    return int(side.read_text())


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


async def test_a_secure_instance_runs_guarded_with_the_policy_of_its_assignment(tmp_path, plugins, guard_library):
    sup = make(tmp_path, plugins, node="h1")
    a = two_host_assignment()
    try:
        await sup.apply([a])
        st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=20)
        (proc,) = st.processes
        child = children(proc.pid)
        assert len(child) == 1
        for pid in (proc.pid, child[0]):
            assert str(guard_library) in Path(f"/proc/{pid}/maps").read_text()  # loaded, in the child too
            env = environ(pid)
            assert env["LD_PRELOAD"] == str(guard_library)
            assert env[guard.ALLOW_ENV] == "127.0.0.1,::1,127.0.0.2,127.0.0.3"
            assert env[guard.OPEN_PORTS_ENV] == str(a.endpoints[0].port)  # the serving endpoint
        port = side_port(tmp_path)
        with urllib.request.urlopen(f"http://127.0.0.2:{a.endpoints[0].port}/", timeout=20) as r:
            assert r.read() == b"ok"
        assert talk(port, "127.0.0.4") == b""  # a stranger: closed at once
        assert talk(port, "127.0.0.3") == b"store\n"  # the instance's other host
        assert talk(port, "127.0.0.1") == b"store\n"  # this host's own loopback
        log = sup.log_files(a.instance_id, "db")[0].read_text()
        assert "agentd guard: refused 127.0.0.4:" in log and f"on port {port} (not a host of this instance)" in log
    finally:
        await sup.apply([])


async def test_the_serving_port_is_open_to_anyone(tmp_path, plugins, guard_library):
    sup = make(tmp_path, plugins, node="h1")
    a = two_host_assignment()
    try:
        await sup.apply([a])
        await sup.wait_for(a.instance_id, ["RUNNING"], timeout=20)
        with socket.socket() as c:
            c.settimeout(20)
            c.bind(("127.0.0.4", 0))
            c.connect(("127.0.0.2", a.endpoints[0].port))
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        await sup.apply([])


@pytest.mark.parametrize("api_key,mode", [("", "required"), ("k", "off")])
async def test_insecure_instances_and_the_opt_out_run_without_it(tmp_path, plugins, api_key, mode):
    sup = make(tmp_path, plugins, node="h1", config=dataclasses.replace(FAST, instance_guard=mode))
    a = two_host_assignment(api_key=api_key)
    try:
        await sup.apply([a])
        st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=20)
        env = environ(st.processes[0].pid)
        assert "LD_PRELOAD" not in env and guard.ALLOW_ENV not in env
        assert talk(side_port(tmp_path), "127.0.0.4") == b"store\n"  # the hole, open
    finally:
        await sup.apply([])


async def test_a_secure_launch_without_the_guard_fails_and_says_what_to_do(tmp_path, plugins, monkeypatch):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: no compiler here' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(native, "build_dirs", lambda: [tmp_path / "build"])
    sup = make(tmp_path, plugins, node="h1")
    a = two_host_assignment()
    out = await sup.apply([a])
    assert "FATAL: the instance guard is required in a secure cluster and is unavailable here" in out[0]
    st = sup.instance(a.instance_id)
    assert st.state == "FATAL" and "cc: no compiler here" in st.reason and 'instance_guard = "off"' in st.reason
    await sup.apply([])


async def test_a_preload_the_process_already_had_is_kept_after_the_guard(guard_library):
    policy = await runtime_guard.policy(two_host_assignment(), runtime_guard.REQUIRED)
    from agentd.plugins.api import Endpoint, ProcessSpec

    spec = ProcessSpec(name="x", argv=(sys.executable,), listen=Endpoint(host="127.0.0.9", port=9))
    env = policy.env(spec, "/opt/jemalloc.so")  # not the serving endpoint: nothing open
    assert env == {"LD_PRELOAD": f"{guard_library} /opt/jemalloc.so",
                   guard.ALLOW_ENV: "127.0.0.1,::1,127.0.0.2,127.0.0.3", guard.OPEN_PORTS_ENV: ""}


async def test_a_second_network_can_be_let_in_by_setting(tmp_path, plugins, guard_library):
    """instance_guard_allow: the hosts' NCCL may leave from addresses that are not their endpoints'."""
    sup = make(tmp_path, plugins, node="h1",
               config=dataclasses.replace(FAST, instance_guard_allow=("127.0.0.4/31",)))
    a = two_host_assignment()
    try:
        await sup.apply([a])
        st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=20)
        assert environ(st.processes[0].pid)[guard.ALLOW_ENV] == "127.0.0.1,::1,127.0.0.4/31,127.0.0.2,127.0.0.3"
        port = side_port(tmp_path)
        assert talk(port, "127.0.0.5") == b"store\n"
        assert talk(port, "127.0.0.6") == b""
    finally:
        await sup.apply([])


def test_the_settings_of_the_guard_are_checked_at_load(tmp_path):
    from agentd.config import load_settings
    from agentd.errors import ConfigError
    from agentd.runtime import SupervisorConfig

    s = load_settings(data_dir=str(tmp_path), instance_guard_allow="10.1.0.7/16, fd00::1")
    assert s.instance_guard_allow == ["10.1.0.0/16", "fd00::1/128"] and s.instance_guard == "required"
    assert SupervisorConfig.from_settings(s).instance_guard_allow == ("10.1.0.0/16", "fd00::1/128")
    why = re.escape("instance_guard_allow: '10.1.0.300' is not an address or a CIDR block")
    with pytest.raises(ConfigError, match=why):
        load_settings(data_dir=str(tmp_path), instance_guard_allow="10.1.0.300")
    with pytest.raises(ConfigError, match="instance_guard"):
        load_settings(data_dir=str(tmp_path), instance_guard="maybe")


async def test_host_names_are_resolved_and_zones_dropped(guard_library):
    from agentd.errors import RuntimeFailure

    p = await runtime_guard.policy(two_host_assignment(addresses=("fe80::1%lo", "localhost")), runtime_guard.REQUIRED)
    assert p.allow[:3] == ("127.0.0.1", "::1", "fe80::1")  # localhost: nothing new
    with pytest.raises(RuntimeFailure, match=re.escape("cannot resolve the instance's host 'no-such-host.invalid'")):
        await runtime_guard.policy(two_host_assignment(addresses=("127.0.0.2", "no-such-host.invalid")),
                                   runtime_guard.REQUIRED)
