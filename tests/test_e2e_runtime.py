"""Model servers through the whole cluster: real `agentd serve` processes, real llama-server and ggml-rpc-server.

One cluster of three agents on loopback (simulated GPUs) serves the module;
each test deploys through the real CLI, looks only through the cluster's
interfaces (`agentd ps` and `agentd logs`, the gRPC calls behind them for
polling, the agents' HTTP port) plus psutil for "nothing left running", and
removes what it deployed. The first test runs the README's demo, which starts
a cluster of its own.

* a, b: one 0.272 GiB GPU each, label pool=split: the 8-layer tiny model
  does not fit one of them, so it is split main (a) + rpc (b);
* c: one 24 GiB GPU, label pool=solo, a 3 s startup timeout (the tiny model is
  ready in tens of milliseconds) for the never-ready case;
* b's llama-server binary is configured to a path the test controls (absent,
  then not executable); as the rpc host it runs only ggml-rpc-server.

The tests run in file order and share the cluster; a is the first agent, so it
leads until the adoption test kills it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import pytest
from gguf import GGUFWriter

from agentd.api.client import ControlClient
from agentd.errors import AgentdError
from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

T = TypeVar("T")
SERVER_NAMES = ("llama-server", "ggml-rpc-server")




if not llama_cpp_present():
    pytest.skip(NO_LLAMA_CPP, allow_module_level=True)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    fifo = d / "stuck-adapter.gguf"
    os.mkfifo(fifo)  # nobody ever writes: opening it blocks llama-server's model loading forever
    return {"tiny": write_tiny_llama_gguf(d / "tiny.gguf", n_layers=8, hidden=256, ffn=512),
            "small": write_tiny_llama_gguf(d / "small.gguf"),  # fits one 0.272 GiB GPU
            "refused": write_incomplete_llama_gguf(d / "incomplete.gguf"),
            "fifo": fifo}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("cluster")
    base = free_port_block()
    c = LocalCluster(
        root,
        hosts=[simulated_host("a", gpus=1, gpu_gib=0.272, labels={"pool": "split"}),
               simulated_host("b", gpus=1, gpu_gib=0.272, labels={"pool": "split"}),
               simulated_host("c", gpus=1, gpu_gib=24, labels={"pool": "solo"})],
        extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_RUNTIME_BACKOFF_INITIAL": "500ms",
                   "AGENTD_RUNTIME_STOP_GRACE": "1s"},
        agent_env={"b": {"AGENTD_LLAMA_SERVER_BINARY": str(root / "bin" / "llama-server")},
                   "c": {"AGENTD_RUNTIME_STARTUP_TIMEOUT": "3s"}},
    )
    try:
        c.start()
        c.wait_for_inventories()
        yield c
    finally:
        c.stop()
        left = model_servers(root)
        for p in left:
            p.kill()
        assert not left, f"model servers outlived the cluster: {left}"


# ---------------------------------------------------------------------- helpers


def write_incomplete_llama_gguf(path: Path) -> Path:
    """A llama GGUF that `agentd model inspect` accepts but llama.cpp refuses: output_norm.weight and the
    attention/FFN tensors it checks are missing (a truncated conversion)."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 64), dtype=np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((64, 64), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((128, 64), dtype=np.float32))
    w.add_tensor("output.weight", rng.standard_normal((4, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cli(c: LocalCluster, *args: str, via: str = "a", timeout: float = 90) -> subprocess.CompletedProcess:
    """The real `agentd` CLI against agent `via` (any agent forwards to the leader)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run([sys.executable, "-m", "agentd", *args, "--server", c.agents[via].listen],
                          capture_output=True, text=True, env=env, timeout=timeout)


def ps_rows(c: LocalCluster, name: str, via: str = "a") -> list[dict[str, str]]:
    """`agentd ps NAME` as a user reads it: the table, parsed by its header."""
    r = cli(c, "ps", name, via=via)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = lines[0]
    cols = [(m.start(), m.group()) for m in re.finditer(r"\S+", header)]
    rows = []
    for line in lines[1:]:
        row = {}
        for k, (start, col) in enumerate(cols):
            end = cols[k + 1][0] if k + 1 < len(cols) else None
            row[col] = line[start:end].strip() if end else line[start:].strip()
        rows.append(row)
    return rows


def wait_for(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `fn` until it returns something truthy; agents being restarted or re-electing are retried."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except AgentdError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")


def instances(c: LocalCluster, name: str) -> list[pb.Instance]:
    with c.any_client(timeout=5) as cl:
        return list(cl.call("ListInstances", pb.ListInstancesRequest(deployment=name)).instances)


def part(c: LocalCluster, name: str, index: int) -> pb.Instance | None:
    return next((i for i in instances(c, name) if i.part == index), None)


def deploy(c: LocalCluster, name: str, model: Path, *extra: str, wait: float = 60) -> tuple[int, dict, str]:
    """`agentd deploy --wait --json`: (exit code, the reply, stderr)."""
    r = cli(c, "deploy", name, "--model", str(model), "--runtime", "llamabox", "--ctx-size", "256",
            "--wait", str(wait), "--json", *extra, timeout=wait + 60)
    data = json.loads(r.stdout) if r.stdout.strip() else {}
    return r.returncode, data, r.stderr


def remove(c: LocalCluster, name: str, *, with_cli: bool = False) -> None:
    """Delete a deployment (`agentd rm`, or the same Delete call without the CLI's start-up cost)."""
    if with_cli:
        r = cli(c, "rm", name)
        assert r.returncode == 0 and r.stdout.strip() == f"deployment {name} deleted", r.stdout + r.stderr
    else:
        with c.any_client(timeout=10) as cl:
            cl.call("Delete", pb.DeleteRequest(name=name))
    wait_for(lambda: not instances(c, name), 30, f"{name} gone from agentd ps")


def post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def completion(endpoint: str) -> dict:
    """llama-server's own /completion, straight to the model server."""
    return post(f"http://{endpoint}/completion", {"prompt": "Hello", "n_predict": 6, "ignore_eos": True})


def openai_completion(c: LocalCluster, model: str, via: str) -> dict:
    """/v1/completions through an agent's HTTP port (the agent proxies to the replica)."""
    return post(f"http://{c.agents[via].http_listen}/v1/completions",
                {"model": model, "prompt": "Once upon a time", "max_tokens": 5})


def model_servers(root: Path) -> list[psutil.Process]:
    """llama-server / ggml-rpc-server processes that belong to this test: run from, or reading, under `root`."""
    out = []
    for p in psutil.process_iter(["name", "cmdline", "cwd"]):
        info = p.info
        if info["name"] not in SERVER_NAMES:
            continue
        where = [info["cwd"] or "", *(info["cmdline"] or [])]
        if any(str(x).startswith(str(root)) for x in where):
            out.append(p)
    return out


def assert_gone(pids: list[int], root: Path, timeout: float = 15, zombies_ok: bool = True) -> None:
    """The pids and every model server of the test are gone. A zombie counts as gone only with `zombies_ok`:
    processes an agentd adopted are reaped by init (or not, in some containers), but its own children must
    be reaped by agentd."""
    def left(p: int) -> bool:
        try:
            status = psutil.Process(p).status()
        except psutil.NoSuchProcess:
            return False
        return status != psutil.STATUS_ZOMBIE or not zombies_ok

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if left(p)]
        if not alive and not model_servers(root):
            return
        time.sleep(0.1)
    raise AssertionError(f"left running: pids {alive}, model servers {model_servers(root)}")


# ---------------------------------------------------------------------- the demo (the README's first command)
# First, so that it runs before the module's cluster starts.


def test_the_readme_demo_runs_keeps_the_cluster_and_stops_it(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert [ln for ln in quickstart.splitlines() if ln and not ln.startswith("#")] == ["scripts/demo", "scripts/test"]
    script = Path(__file__).resolve().parent.parent / "scripts" / "demo"
    assert os.access(script, os.X_OK) and "-m agentd.demo" in script.read_text()

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    d = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "agentd.demo", "--dir", str(d), "--keep"], capture_output=True,
                       text=True, env=env, timeout=180)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert "replica 0: a[0] main 5L, b[0] rpc 3L" in out and "all 2 part(s) running" in out
        assert "load_tensors: offloading 3 repeating layers to GPU" in out
        assert "model 'tiny', 12 tokens" in out and "OK: every step worked." in out
        server = re.search(r"export AGENTD_SERVER=(\S+)", out).group(1)  # as the printed instructions say
        with ControlClient(server, timeout=10) as c:
            kept = c.call("ListInstances", pb.ListInstancesRequest()).instances
        assert [(i.host, i.role, i.state) for i in kept] == [("a", "main", "RUNNING"), ("b", "rpc", "RUNNING")]
        pids = [a["pid"] for a in json.loads((d / "demo.json").read_text())["agents"].values()]
        assert len(model_servers(d)) == 2
    finally:
        stop = subprocess.run([sys.executable, "-m", "agentd.demo", "--stop", str(d)], capture_output=True,
                              text=True, env=env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "stopped; nothing left running" in stop.stdout
    assert model_servers(d) == []
    assert_gone(pids, d, timeout=1)  # the agents (their parent, the demo, has exited: init reaps them)


def test_the_cpu_only_demo_serves_from_ram(tmp_path):
    """`scripts/demo --cpu-only`: agents without GPUs, deployed with --allow-cpu-offload; llama-server on one
    of them holds every layer in RAM (the runtime declares host memory) and answers through the other."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    d = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "agentd.demo", "--dir", str(d), "--cpu-only"], capture_output=True,
                       text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "none with a GPU" in out and "all 1 part(s) running" in out
    assert "load_tensors: offloaded 0/9 layers to GPU" in out and "all 8 layers run from RAM" in out
    assert "model 'tiny', 12 tokens" in out and "OK: every step worked." in out
    assert model_servers(d) == []


# ---------------------------------------------------------------------- one host


def test_one_host_deploy_runs_and_answers(cluster, models):
    rc, data, err = deploy(cluster, "solo", models["tiny"], "--selector", "pool=solo")
    assert rc == 0, (data, err)
    (a,) = data["deployment"]["assignments"]
    assert [(p["host"], p["role"], p["layers"]) for p in a["plan"]["parts"]] == [("c", "main", 8)]
    (row,) = ps_rows(cluster, "solo")
    assert (row["HOST"], row["ROLE"], row["STATE"], row["RESTARTS"]) == ("c", "main", "RUNNING", "0")
    assert row["REASON"].startswith("ready after")
    for via in cluster.agents:  # the leader's answer through any agent, and each agent's own copy
        listed = {d["name"]: d for d in json.loads(cli(cluster, "ls", "--json", via=via).stdout)["deployments"]}
        assert listed["solo"]["ready"] == 1
        local = json.loads(cli(cluster, "ls", "--local", "--json", via=via).stdout)["deployments"]
        assert "solo" in {d["name"] for d in local}
    body = completion(row["ENDPOINT"])
    assert body["tokens_predicted"] == 6 and isinstance(body["content"], str)
    # Through another agent's OpenAI-compatible port: a proxies to the server c runs.
    out = openai_completion(cluster, "solo", via="a")
    assert out["object"] == "text_completion" and out["model"] == "solo"
    assert out["usage"]["completion_tokens"] == 5 and isinstance(out["choices"][0]["text"], str)


def test_kill_9_model_server_is_restarted_with_backoff(cluster):
    before = part(cluster, "solo", 0)
    assert before.state == "RUNNING" and before.pid
    os.kill(before.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    after = wait_for(lambda: (i := part(cluster, "solo", 0)) and i.state == "RUNNING" and i.pid != before.pid
                     and i, 20, "RUNNING again under a new pid")
    # The backoff was waited out: delays are never below the initial 500 ms. c's decision lines say so too.
    assert time.monotonic() - killed_at >= 0.5
    log = cluster.agents["c"].log_file.read_text()
    delay = re.search(r"solo-r0-g1/main: RUNNING -> BACKOFF: was killed by SIGKILL; restarting in ([\d.]+)s", log)
    assert delay and float(delay.group(1)) >= 0.5, log[-2000:]
    assert f"solo-r0-g1/main: BACKOFF -> PENDING: restarting after a {delay.group(1)}s backoff" in log
    (row,) = ps_rows(cluster, "solo")
    assert (row["STATE"], row["RESTARTS"]) == ("RUNNING", "1")
    assert completion(row["ENDPOINT"])["tokens_predicted"] == 6
    remove(cluster, "solo")
    assert_gone([before.pid, after.pid], cluster.root, zombies_ok=False)


# ---------------------------------------------------------------------- split over RPC


def test_split_deploy_offloads_the_planned_layers_to_the_rpc_host(cluster, models):
    rc, data, err = deploy(cluster, "split", models["tiny"], "--selector", "pool=split", "--arg=-lv", "--arg=4")
    assert rc == 0, (data, err)
    (a,) = data["deployment"]["assignments"]
    parts = a["plan"]["parts"]
    assert [(p["host"], p["role"]) for p in parts] == [("a", "main"), ("b", "rpc")]
    rpc_layers, main_layers = parts[1]["layers"], parts[0]["layers"]
    assert rpc_layers + main_layers == 8 and rpc_layers >= 1 and main_layers >= 1
    rows = ps_rows(cluster, "split", via="c")
    assert [(r["HOST"], r["ROLE"], r["STATE"]) for r in rows] == [("a", "main", "RUNNING"), ("b", "rpc", "RUNNING")]
    rpc_endpoint = rows[1]["ENDPOINT"]
    # The main server's log, fetched over gRPC through b (the log lives on a).
    r = cli(cluster, "logs", "split-r0", via="b")
    assert r.returncode == 0, r.stderr
    log = r.stdout
    assert f"--rpc {rpc_endpoint}" in log.splitlines()[0]  # the run header: the argv agentd started
    # Simulated GPUs: a's own layers stay in RAM; only the rpc part's planned layers are offloaded.
    assert f"offloading {rpc_layers} repeating layers to GPU" in log
    kv_total = float(re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*\d+ cells,\s+8 layers", log).group(1))
    kv_rpc = float(re.search(rf"RPC0\[{re.escape(rpc_endpoint)}\] KV buffer size =\s+([\d.]+) MiB", log).group(1))
    assert round(kv_rpc / (kv_total / 8)) == rpc_layers
    out = openai_completion(cluster, "split", via="b")
    assert out["usage"]["completion_tokens"] == 5


def test_kill_9_rpc_server_restarts_it_and_then_the_main_server(cluster):
    main, rpc = part(cluster, "split", 0), part(cluster, "split", 1)
    assert main.state == rpc.state == "RUNNING"
    os.kill(rpc.pid, signal.SIGKILL)

    def both_restarted():
        m, r = part(cluster, "split", 0), part(cluster, "split", 1)
        ok = (r.state == "RUNNING" and r.pid != rpc.pid and m.state == "RUNNING" and m.pid != main.pid)
        return ok and (m, r)

    m, r = wait_for(both_restarted, 30, "rpc-server and then llama-server restarted")
    assert r.restarts == rpc.restarts + 1 and m.restarts == main.restarts + 1
    # The main server was started after the new rpc-server, because of it (not after crashing on it).
    assert psutil.Process(m.pid).create_time() >= psutil.Process(r.pid).create_time()
    # ... restarted by its agent on the coordinator's word, not after crashing on its own (the decision line).
    said = f"split-r0-g1/main: RUNNING -> PENDING: restarting after 127.0.0.1:{r.endpoint.rpartition(':')[2]} restarted"
    assert said in cluster.agents["a"].log_file.read_text()
    rows = ps_rows(cluster, "split")
    assert [(x["STATE"], x["RESTARTS"]) for x in rows] == [("RUNNING", "1"), ("RUNNING", "1")]
    assert completion(rows[0]["ENDPOINT"])["tokens_predicted"] == 6


def test_kill_9_agentd_leaves_the_model_server_running_and_the_restarted_agent_adopts_it(cluster):
    main, rpc = part(cluster, "split", 0), part(cluster, "split", 1)
    assert main.host == "a" and main.state == "RUNNING"
    cluster.kill("a", signal.SIGKILL)  # the leader, and the host of the main server
    assert completion(main.endpoint)["tokens_predicted"] == 6  # serving on without its agent
    cluster.wait_for_leader(30, not_="a")
    cluster.start_agent("a")
    adopted = wait_for(lambda: (i := part(cluster, "split", 0)) and i.state == "RUNNING" and "adopted" in i.reason
                       and i, 30, "main adopted by the restarted agent")
    assert adopted.pid == main.pid and adopted.restarts == main.restarts
    assert psutil.Process(main.pid).is_running()
    assert part(cluster, "split", 1).pid == rpc.pid
    rows = ps_rows(cluster, "split", via="a")
    assert rows[0]["STATE"] == "RUNNING" and f"pid {main.pid}" in rows[0]["REASON"]
    assert openai_completion(cluster, "split", via="a")["usage"]["completion_tokens"] == 5


def test_delete_leaves_no_process_behind(cluster):
    pids = [i.pid for i in instances(cluster, "split")]
    assert len(pids) == 2 and all(pids)
    assert len(model_servers(cluster.root)) == 2
    remove(cluster, "split", with_cli=True)
    assert_gone(pids, cluster.root)


# ---------------------------------------------------------------------- bad input


def _fatal_row(cluster: LocalCluster, name: str) -> dict[str, str]:
    wait_for(lambda: (i := part(cluster, name, 0)) and i.state == "FATAL", 30, f"{name} FATAL")
    (row,) = ps_rows(cluster, name)
    assert row["STATE"] == "FATAL"
    return row


def test_a_deployment_that_cannot_be_placed_exits_3_with_the_diagnosis_and_commits_nothing(cluster, models):
    r = cli(cluster, "deploy", "nowhere", "--model", str(models["tiny"]), "--runtime", "llamabox",
            "--selector", "pool=split", "--pin", "a")
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("agentd: 0/3 hosts can run nowhere (llamabox): "), r.stderr
    assert "Traceback" not in r.stderr and instances(cluster, "nowhere") == []


def test_a_model_file_the_server_refuses_is_fatal_with_its_log(cluster, models):
    rc, data, _ = deploy(cluster, "refused", models["refused"], "--selector", "pool=solo")
    assert rc == 1 and data["deployment"]["assignments"]  # placed (our inspector accepts it), then failed
    assert [i["state"] for i in data["instances"]] == ["FATAL"]
    reason = _fatal_row(cluster, "refused")["REASON"]
    assert "exited with code 1 during startup, 3 times in a row | last log lines:" in reason
    assert "tensor 'output_norm.weight' not found" in reason
    remove(cluster, "refused")
    assert_gone([], cluster.root)


def test_a_server_that_never_becomes_ready_times_out_to_fatal(cluster, models):
    # The adapter "file" is a FIFO nobody writes: llama-server answers 503 "Loading model" forever, and
    # ignores SIGTERM while stuck (so the stop needs the SIGKILL after the grace).
    rc, data, _ = deploy(cluster, "stuck", models["tiny"], "--selector", "pool=solo",
                         "--arg=--lora", f"--arg={models['fifo']}")
    assert rc == 1 and [i["state"] for i in data["instances"]] == ["FATAL"]  # `deploy --wait` saw it fail
    row = _fatal_row(cluster, "stuck")
    assert row["REASON"].startswith("not ready after 3s (last probe: loading the model); stopped | last log lines:")
    assert "loading model" in row["REASON"]
    assert model_servers(cluster.root) == []  # killed at the timeout, before the deployment is removed
    remove(cluster, "stuck")


@pytest.mark.parametrize("kind", ["missing", "not-executable"])
def test_a_runtime_binary_that_cannot_run_is_fatal(cluster, models, kind):
    binary = cluster.root / "bin" / "llama-server"  # b's configured llama-server (see the module docstring)
    if kind == "missing":
        binary.unlink(missing_ok=True)
        expect = f"binary {binary} does not exist"
    else:
        binary.parent.mkdir(exist_ok=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o644)
        expect = f"binary {binary} is not executable"
    rc, data, _ = deploy(cluster, "nobin", models["small"], "--pin", "b")
    assert rc == 1 and [i["state"] for i in data["instances"]] == ["FATAL"], data
    row = _fatal_row(cluster, "nobin")
    assert row["HOST"] == "b" and row["REASON"].startswith(expect), row["REASON"]
    assert row["RESTARTS"] == "0"
    remove(cluster, "nobin")
    assert_gone([], cluster.root)

