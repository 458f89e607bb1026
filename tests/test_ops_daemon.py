"""Operations against a real `agentd serve` process: sd_notify, health, metrics, signals and draining.

One agent (insecure, so the warning is checked too) runs with NOTIFY_SOCKET
pointing at a unix datagram socket this test reads, and WATCHDOG_USEC set.
It serves a real llama-server; then SIGUSR2 (restart) must leave it running
even with a drain requested, the next agent adopts it, and SIGTERM with the
drain file stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentd.api.client import CannotPlace
from agentd.api.drain import drain_file, request_drain
from agentd.security.tls import INSECURE_WARNING
from agentd.testing.gguf import llama_spec, write_header_only_gguf, write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


class NotifyListener:
    """A stand-in for systemd's notification socket: collects (monotonic time, {KEY: value}) datagrams."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0, after: float = 0.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, m in list(self.messages):
                if at >= after and key in m and (value is None or m[key] == value):
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages[-5:]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(agent) -> dict[tuple[str, tuple], float]:
    code, text = get(f"http://{agent.http_listen}/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_running(c, name: str, timeout: float = 60.0, not_pid: int = 0) -> pb.Instance:
    deadline = time.monotonic() + timeout
    while True:
        with c.any_client(timeout=5) as cl:
            parts = cl.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances
        if parts and all(p.state == "RUNNING" and p.pid and p.pid != not_pid for p in parts):
            return parts[0]
        assert time.monotonic() < deadline, parts
        time.sleep(0.1)


def test_agent_lifecycle_under_a_service_manager(tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host("a", gpus=1, gpu_gib=1.0)],
                     extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    a = c.agents["a"]
    try:
        started = time.monotonic()
        c.start_agent("a", join=[])
        ready = notify.wait_for("READY", "1")
        # READY means serving and in the cluster: the very next call finds a leader, /readyz agrees.
        with a.client(timeout=2) as cl:
            assert cl.status().leader_id == "a"
        assert get(f"http://{a.http_listen}/readyz")[0] == 200
        assert get(f"http://{a.http_listen}/healthz") == (200, '{"status": "ok"}')
        assert ready["STATUS"].startswith("leader a, term ")
        log = a.log_file.read_text()
        assert log.index("caught up with the cluster state") < log.index("told systemd we are ready")
        assert INSECURE_WARNING in log
        notify.wait_for("WATCHDOG", "1", after=started)
        notify.wait_for("STATUS", "leader a, term 2, 0/0 instances running")

        # A model that fits, one that does not; then a model server crash.
        model = tmp_path / "tiny.gguf"
        write_tiny_llama_gguf(model, n_layers=8, hidden=256, ffn=512)
        huge = tmp_path / "huge.gguf"
        write_header_only_gguf(huge, llama_spec())
        c.wait_for_inventories()
        with a.client() as cl:
            cl.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1,
                                        options=pb.RuntimeOptions(ctx_size=256)))
            with pytest.raises(CannotPlace, match=r"0/1 hosts can run huge"):
                cl.deploy(pb.DeploymentSpec(name="huge", model=str(huge), runtime="llamabox", replicas=1))
        first = wait_running(c, "tiny")
        os.kill(first.pid, signal.SIGKILL)
        server = wait_running(c, "tiny", not_pid=first.pid)
        time.sleep(1.2)  # one report interval: the gauges follow the supervisor
        m = metrics(a)
        assert value(m, "agentd_raft_is_leader") == 1 and value(m, "agentd_raft_term") >= 2
        assert value(m, "agentd_raft_leader", leader="a") == 1
        assert value(m, "agentd_raft_elections_total") >= 1
        assert value(m, "agentd_raft_commit_index") >= 3 and value(m, "agentd_raft_applied_index") >= 3
        assert value(m, "agentd_placement_duration_seconds_count", result="placed") >= 1
        assert value(m, "agentd_placement_duration_seconds_count", result="unplaceable") >= 1
        assert any(k[0] == "agentd_placement_unplaceable_total" and v >= 1 for k, v in m.items())
        gpu = {"host": "a", "gpu": "0", "uuid": "GPU-sim-a-0"}
        assert value(m, "agentd_gpu_memory_total_bytes", **gpu) == 2**30
        assert value(m, "agentd_gpu_memory_assigned_bytes", **gpu) > 0
        assert value(m, "agentd_instances", state="running") == 1
        assert value(m, "agentd_instance_restarts_total", deployment="tiny") == 1
        notify.wait_for("STATUS", "leader a, term 2, 1/1 instances running")

        # SIGUSR2 = exit for a restart: never drains, even when a drain was asked for.
        request_drain(a.data_dir)
        before = time.monotonic()
        a.proc.send_signal(signal.SIGUSR2)
        assert a.proc.wait(30) == 0
        stopping = notify.wait_for("STOPPING", "1", after=before)
        assert "exiting for a restart: model servers keep running" in stopping["STATUS"]
        assert alive(server.pid) and drain_file(a.data_dir).exists()

        # The next agent adopts the running server (same pid), then SIGTERM with the drain file stops it.
        c.start_agent("a", join=[])
        notify.wait_for("READY", "1", after=before)
        assert wait_running(c, "tiny").pid == server.pid
        before = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0
        status = notify.wait_for("STOPPING", "1", after=before)["STATUS"]
        assert "stopping this host's model servers before exit" in status
        assert not alive(server.pid) and not drain_file(a.data_dir).exists()
        events = [json.loads(line) for line in a.log_file.read_text().splitlines() if line.startswith("{")]
        assert any(e["msg"].startswith("stopping this host's model servers before exit") for e in events)
    finally:
        c.stop()
        notify.close()
