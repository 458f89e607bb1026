"""Issue 14, item 2, the attack as it was measured: a torch.distributed TCPStore (SGLang's --dist-init-addr,
vLLM's rendezvous) listens on every interface with no authentication, so anyone who reaches the port writes keys
into the rendezvous. Under the instance guard, with the instance's hosts 127.0.0.2 and 127.0.0.3, a client from
127.0.0.4 cannot set a key while one from 127.0.0.3 can. Without the guard the same client from 127.0.0.4 does.

Real torch 2.x from `.venv-vllm` (the vllm tier). torch's client cannot choose its source address, so each client
connects through a small forwarder in this process that connects on to the store from the address under test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from agentd.security import guard

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if not PYTHON.exists():
    pytest.skip(f"{PYTHON} is absent: the vllm tier needs `scripts/bootstrap --vllm`", allow_module_level=True)

MASTER = r"""
import sys, time, torch.distributed as dist
store = dist.TCPStore("127.0.0.2", 0, is_master=True, wait_for_workers=False)
print("PORT", store.port, flush=True)
while True:
    time.sleep(60)
"""

CLIENT = r"""
import datetime, sys, torch.distributed as dist
port, action, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    s = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5))
    if action == "set":
        s.set(key, "written from outside")
        print("SET")
    else:
        print("PRESENT" if s.check([key]) else "ABSENT")
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
"""


class Forwarder:
    """127.0.0.1:port -> the store, each connection made anew from `source`."""

    def __init__(self, source: str, to: tuple[str, int]):
        self.source, self.to = source, to
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            up = socket.socket()
            try:
                up.bind((self.source, 0))
                up.connect(self.to)
            except OSError:
                down.close()
                up.close()
                continue
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def client(port: int, source: str, action: str, key: str) -> str:
    fwd = Forwarder(source, ("127.0.0.2", port))
    try:
        done = subprocess.run([str(PYTHON), "-c", CLIENT, str(fwd.port), action, key], capture_output=True,
                              text=True, timeout=120, check=False)
        return done.stdout.strip() or done.stderr.strip()[-500:]
    finally:
        fwd.close()


@pytest.fixture
def store(tmp_path, guard_library):
    started = []

    def start(guarded: bool) -> tuple[int, Path]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_GUARD_")}
        if guarded:
            env.update({"LD_PRELOAD": str(guard_library), guard.ALLOW_ENV: "127.0.0.1,::1,127.0.0.2,127.0.0.3",
                        guard.OPEN_PORTS_ENV: ""})
        log = tmp_path / f"store-{guarded}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([str(PYTHON), "-c", MASTER], env=env, stdout=subprocess.PIPE, stderr=err)
        started.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), f"the store did not start: {line!r} {log.read_text()}"
        return int(line.split()[1]), log

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_without_the_guard_a_stranger_writes_into_the_rendezvous(store):
    port, _ = store(guarded=False)
    assert client(port, "127.0.0.4", "set", "intruder") == "SET"
    assert client(port, "127.0.0.3", "check", "intruder") == "PRESENT"


def test_under_the_guard_only_the_instances_hosts_reach_the_store(store):
    port, log = store(guarded=True)
    refused = client(port, "127.0.0.4", "set", "intruder")
    assert refused.startswith("REFUSED"), refused
    assert client(port, "127.0.0.3", "set", "worker") == "SET"
    assert client(port, "127.0.0.3", "check", "worker") == "PRESENT"
    assert client(port, "127.0.0.3", "check", "intruder") == "ABSENT"
    assert "agentd guard: refused 127.0.0.4:" in log.read_text()
    assert f"on port {port} (not a host of this instance)" in log.read_text()
