"""Issue 14, item 2: a split llama.cpp model's rpc-server is reachable only by its own main server.

Two real agents with mutual TLS (LocalCluster(secure=True)), one 0.272 GiB
simulated GPU each, so the 8-layer model is split: llama-server on a, a real
ggml-rpc-server on b. The attack: ggml-rpc-server listened on b's address
with no authentication; anyone who connected first (after the main server
died) got HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY answers, could allocate
buffers and write tensors, and held the deployment STARTING by keeping the
connection. Now it listens on 127.0.0.1 and b's endpoint is a tunnel exit
that admits only a's node certificate.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from agentd.errors import NotAvailable
from agentd.security import ca as C
from agentd.security import guard, relay
from agentd.security.tunnel import client_context
from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import security_pb2 as spb

pytestmark = pytest.mark.slow




if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)


def cmdlines(root: Path) -> dict[str, list[str]]:
    """This test's processes by program: llama-server, ggml-rpc-server and the tunnels."""
    out: dict[str, list[str]] = {}
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info["cmdline"] or []
        if not str(p.info["cwd"] or "").startswith(str(root)) or not cmd:
            continue
        prog = "tunnel-" + cmd[3] if "agentd.security.tunnel" in cmd else Path(cmd[0]).name
        out[prog] = cmd
    return out


def tunnel_programs(root: Path) -> list[str]:
    """The programs the tunnels run: where the C relay builds, `python -m agentd.security.tunnel` execs it and
    keeps its command line, and /proc/PID/exe names the relay's binary."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd", "exe"]):
        if str(p.info["cwd"] or "").startswith(str(root)) and "agentd.security.tunnel" in (p.info["cmdline"] or []):
            out.append(Path(p.info["exe"] or "?").name)
    return sorted(out)


def guard_loaded(root: Path) -> dict[str, bool]:
    """This test's instance processes (they run in an instance's work dir), and whether the instance guard is
    preloaded in each (docs/security.md)."""
    out = {}
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cwd = str(p.info["cwd"] or "")
        if cwd.startswith(str(root)) and "/runtime/work/" in cwd and p.info["cmdline"]:
            with contextlib.suppress(OSError):
                out[" ".join(p.info["cmdline"][:4])] = guard.NAME in Path(f"/proc/{p.pid}/maps").read_text()
    return out


def after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def talk(address: str, payload: bytes, context: ssl.SSLContext | None = None, source: str = "") -> bytes:
    """What comes back within 3 s for `payload` sent to `address`, plain or over TLS, from `source` if given."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3, source_address=(source, 0) if source else None) as raw:
        s = context.wrap_socket(raw, server_hostname=C.NODE_SAN) if context else raw
        try:
            s.sendall(payload)
            return s.recv(4096)
        except (OSError, ssl.SSLError):
            return b""


def pids(c: LocalCluster) -> dict[int, int]:
    """Part -> pid of its first process (llama-server, ggml-rpc-server), for RUNNING parts only.

    {} while the cluster has no leader (an election under a loaded machine): the callers poll until a deadline.
    """
    try:
        with c.any_client(timeout=5) as cl:
            parts = cl.call("ListInstances", pb.ListInstancesRequest(deployment="split")).instances
    except NotAvailable:
        return {}
    return {i.part: (i.pid if i.state == "RUNNING" else 0) for i in parts}


def complete(c: LocalCluster, key: str) -> int:
    req = urllib.request.Request(f"http://{c.agents['b'].http_listen}/v1/completions",
                                 data=json.dumps({"model": "split", "prompt": "Once upon a time",
                                                  "max_tokens": 5}).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def test_the_rpc_server_sits_behind_a_tunnel_only_its_main_host_passes(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_layers=8, hidden=256, ffn=512)
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=0.272, labels={"pool": "split"})
                                            for n in ("a", "b")],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 49}]"}, secure=True)
    # All agents share 127.0.0.1 here: b hands out its local ports (the rpc-server's) from its own range.
    c.agent_env["b"] = {"AGENTD_PORT_RANGE": f"[{base + 50},{base + 99}]"}
    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["a"].client(timeout=60) as cl:
            reply = cl.deploy(pb.DeploymentSpec(name="split", model=str(model), runtime="llamabox", replicas=1,
                                                selector={"pool": "split"}, options=pb.RuntimeOptions(ctx_size=256)))
            key = cl.call("CreateApiKey", spb.CreateApiKeyRequest(tenant="default")).key
        (a,) = json.loads(reply.deployment.assignments_json)
        assert [(p["host"], p["role"]) for p in a["plan"]["parts"]] == [("a", "main"), ("b", "rpc")]
        rpc_ep = f"{a['endpoints'][1]['address']}:{a['endpoints'][1]['port']}"

        deadline = time.monotonic() + 90
        while True:
            with c.any_client(timeout=5) as cl:
                states = [i.state for i in cl.call("ListInstances", pb.ListInstancesRequest(deployment="split"))
                          .instances]
            if states == ["RUNNING", "RUNNING"]:
                break
            assert time.monotonic() < deadline and "FATAL" not in states, states
            time.sleep(0.5)

        procs = cmdlines(c.root)
        rpc, exit_, entry, main = (procs["ggml-rpc-server"], procs["tunnel-exit"], procs["tunnel-entry"],
                                   procs["llama-server"])
        assert after(rpc, "-H") == "127.0.0.1" and after(rpc, "-p") != rpc_ep.rsplit(":", 1)[1]
        assert after(exit_, "--listen") == rpc_ep and after(exit_, "--to") == f"127.0.0.1:{after(rpc, '-p')}"
        assert after(exit_, "--allow") == "a"  # only the host that runs the main server
        programs = tunnel_programs(c.root)
        assert len(programs) == 2 and all(p.startswith(relay.NAME) for p in programs), \
            f"where the C relay builds (here), agentd's tunnels run it: {programs}"
        assert after(entry, "--to") == rpc_ep and after(main, "--rpc") == after(entry, "--listen")

        assert complete(c, key) == 5

        hello = bytes([14]) + (0).to_bytes(8, "little")  # a ggml RPC command, sent in the clear
        answer = talk(rpc_ep, hello)
        assert answer == b"" or answer[:1] == b"\x15", answer  # nothing, or a TLS alert: never an RPC answer
        ca = C.load_ca(c.agents["a"].tls_dir, need_key=True)
        C.save_identity(tmp_path / "intruder", "node", C.issue_identity(ca, "intruder", role=C.ROLE_NODE,
                                                                         addresses=["127.0.0.1"]))
        assert talk(rpc_ep, hello, client_context(tmp_path / "intruder")) == b"", \
            "a cluster node that does not run this instance's main server is refused"

        # The instance guard: every process of the instance (llama-server, rpc-server, both tunnels) runs with it,
        # so a stranger's address (127.0.0.4; the hosts share 127.0.0.1 here) is closed at once on the exit's
        # endpoint, before any TLS, while the serving endpoint answers anyone (its own key protects it).
        loaded = guard_loaded(c.root)
        assert len(loaded) == 4 and all(loaded.values()), loaded
        assert talk(rpc_ep, hello, source="127.0.0.4") == b""
        refusals = [ln for f in (c.root).rglob("*.log") for ln in f.read_text(errors="replace").splitlines()
                    if ln.startswith("agentd guard: refused 127.0.0.4:")]
        assert refusals and refusals[0].endswith(f"on port {rpc_ep.rsplit(':', 1)[1]} (not a host of this instance)")
        main_ep = f"{a['endpoints'][0]['address']}:{a['endpoints'][0]['port']}"
        assert talk(main_ep, b"GET /health HTTP/1.0\r\n\r\n", source="127.0.0.4").startswith(b"HTTP/1.1 200")

        # kill -9 the rpc-server: it restarts, then the exit after it, and the main side (entry, then
        # llama-server) after the coordinator passes the restart on: the split serves again.
        before = pids(c)
        os.kill(before[1], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not ((now := pids(c)) and now[0] != before[0] and now[1] != before[1] and 0 not in now.values()):
            assert time.monotonic() < deadline, (before, now)
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert complete(c, key) == 5
                break
            except (OSError, urllib.error.HTTPError):
                assert time.monotonic() < deadline
                time.sleep(0.5)
    finally:
        c.stop()
