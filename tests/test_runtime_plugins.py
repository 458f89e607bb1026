"""The act hooks of the built-in plugins: plans in, exact command lines out (no binaries needed)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
from agentd_llamabox import process as lb
from agentd_vllm import process as vl

from agentd.config import load_settings
from agentd.errors import InvalidInput
from agentd.plugins import PluginManager
from agentd.plugins.api import Endpoint
from agentd.runtime import HttpProbe, ProbeResult, TcpProbe
from agentd.testing.launches import launch_context as ctx
from agentd.testing.launches import vllm_assignment
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions


def llama(model: str, parts: list[Part], ports: list[int], args=(), **opts) -> Assignment:
    return Assignment(deployment="chat", replica=0, term=1, model=model, runtime="llamabox",
                      options=RuntimeOptions(**opts), plan=ReplicaPlan(parts=tuple(parts), args=tuple(args)),
                      endpoints=tuple(PartEndpoint(host=p.host, address=f"10.0.0.{i + 1}", port=port)
                                      for i, (p, port) in enumerate(zip(parts, ports, strict=True))))


@pytest.fixture
def model(tmp_path) -> str:
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")
    return str(p)


@pytest.fixture
def bins(tmp_path):
    return {"llama_server_binary": "/opt/llama/llama-server", "rpc_server_binary": "/opt/llama/ggml-rpc-server"}


def test_llamabox_main_with_two_gpus_and_two_rpc_servers(tmp_path, model, bins):
    parts = [Part(host="a", role="main", gpus=(1, 0), layers=30, cpu_layers=0, layer_split=(10, 20),
                  env={"CUDA_VISIBLE_DEVICES": "1,0"}),
             Part(host="b", role="rpc", gpus=(0,), layers=25), Part(host="c", role="rpc", gpus=(3,), layers=25)]
    a = llama(model, parts, [40000, 40001, 40002], args=("--n-gpu-layers", "80", "--tensor-split", "25,25,10,21",
                                                          "--split-mode", "layer"), ctx_size=8192,
              extra_args=("--parallel", "4"))
    [spec] = lb.agentd_launch(a, 0, ctx(tmp_path, **bins))
    assert spec.argv == (
        "/opt/llama/llama-server", "-m", model, "--host", "10.0.0.1", "--port", "40000", "--alias", "chat",
        "--rpc", "10.0.0.2:40001,10.0.0.3:40002", "-ngl", "81", "--tensor-split", "25,25,10,21",
        "--ctx-size", "8192", "--fit", "off", "--threads-http", "64", "--split-mode", "layer",
            "--parallel", "4")
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "1,0"}
    assert spec.wait_for == tuple(e for e in spec.wait_for)  # rpc endpoints, in --rpc order
    assert [str(e) for e in spec.wait_for] == ["10.0.0.2:40001", "10.0.0.3:40002"]
    assert spec.ready == HttpProbe(host="10.0.0.1", port=40000, path="/health")
    assert spec.env_remove_prefixes == ("LLAMA_ARG_",) and spec.gpus == (1, 0)
    [rpc] = lb.agentd_launch(a, 2, ctx(tmp_path, node="c", **bins))
    assert rpc.argv == ("/opt/llama/ggml-rpc-server", "-H", "10.0.0.3", "-p", "40002")
    assert rpc.env == {"CUDA_VISIBLE_DEVICES": "3"}  # derived from the part's GPUs when the plan has no env
    assert rpc.ready == TcpProbe(host="10.0.0.3", port=40002) and rpc.name == "rpc-2" and rpc.role == "rpc"


def test_partial_offload_keeps_the_output_weight_on_the_cpu(tmp_path, model, bins):
    parts = [Part(host="a", role="main", gpus=(0,), layers=10, cpu_layers=20, layer_split=(10,)),
             Part(host="b", role="rpc", gpus=(0,), layers=50)]
    [spec] = lb.agentd_launch(llama(model, parts, [1, 2]), 0, ctx(tmp_path, **bins))
    argv = spec.argv
    # llama.cpp offloads the top -ngl "slots" and the output layer is the topmost: 60 layers + its slot.
    assert argv[argv.index("-ngl") + 1] == "61" and argv[argv.index("--tensor-split") + 1] == "50,11"
    # output.weight, or token_embd.weight's copy for a tied output (named after the embedding).
    assert argv[argv.index("--override-tensor") + 1] == r"^(output|token_embd)\.weight$=CPU"
    assert "--no-op-offload" in argv  # no host weights copied into GPU compute buffers the plan did not book
    extra = llama(model, parts, [1, 2], extra_args=("--op-offload",))
    [spec] = lb.agentd_launch(extra, 0, ctx(tmp_path, **bins))
    assert "--no-op-offload" not in spec.argv and "--op-offload" in spec.argv


def test_simulated_gpus_keep_the_main_share_in_ram(tmp_path, model, bins):
    parts = [Part(host="a", role="main", gpus=(0,), layers=2, cpu_layers=0),
             Part(host="b", role="rpc", gpus=(0,), layers=1), Part(host="c", role="rpc", gpus=(0,), layers=1)]
    [spec] = lb.agentd_launch(llama(model, parts, [1, 2, 3], args=("--n-gpu-layers", "5")), 0,
                              ctx(tmp_path, simulated=True, **bins))
    argv = spec.argv
    assert argv[argv.index("-ngl") + 1] == "3" and argv[argv.index("--tensor-split") + 1] == "1,2"
    assert "--override-tensor" in argv and "5" not in argv and spec.gpus == ()
    one = [Part(host="a", role="main", gpus=(0,), layers=4, cpu_layers=0)]
    [spec] = lb.agentd_launch(llama(model, one, [1]), 0, ctx(tmp_path, simulated=True, **bins))
    assert spec.argv[spec.argv.index("-ngl") + 1] == "0" and "--tensor-split" not in spec.argv


def test_an_rpc_server_without_gpus_runs_the_cpu_backend_on_its_hosts_ram(tmp_path, model, bins):
    """Issue 17 item 4: a CPU-only main and an rpc part serving another CPU-only host's RAM (Part.ram)."""
    parts = [Part(host="a", role="main", gpus=(), layers=0, cpu_layers=5, ram=3 << 30,
                  env={"CUDA_VISIBLE_DEVICES": ""}),
             Part(host="b", role="rpc", gpus=(), layers=3, layer_split=(3,), ram=2 << 30,
                  env={"CUDA_VISIBLE_DEVICES": ""})]
    a = llama(model, parts, [1, 2], args=("--n-gpu-layers", "3"))
    [main] = lb.agentd_launch(a, 0, ctx(tmp_path, **bins))
    argv = main.argv
    # One device (the rpc-server) holds 3 layers and the output slot; the output weight stays in RAM.
    assert argv[argv.index("-ngl") + 1] == "4" and "--tensor-split" not in argv
    assert argv[argv.index("--override-tensor") + 1] == r"^(output|token_embd)\.weight$=CPU"
    [rpc] = lb.agentd_launch(a, 1, ctx(tmp_path, node="b", **bins))
    assert rpc.argv[:5] == ("/opt/llama/ggml-rpc-server", "-H", "10.0.0.2", "-p", "2")
    assert rpc.argv[5:7] == ("-d", "CPU") and rpc.argv[7] == "-t" and int(rpc.argv[8]) >= 1
    assert rpc.env == {"CUDA_VISIBLE_DEVICES": ""} and rpc.gpus == ()  # no GPU list: ggml's CPU backend only


def test_llama_box_binaries_get_their_own_flags_and_counting(tmp_path, model):
    s = {"llama_server_binary": "/opt/llama-box", "rpc_server_binary": "/opt/llama-box-rpc"}
    parts = [Part(host="a", role="main", gpus=(0,), layers=10, cpu_layers=20, layer_split=(10,)),
             Part(host="b", role="rpc", gpus=(0,), layers=50)]
    a = llama(model, parts, [1, 2])
    [spec] = lb.agentd_launch(a, 0, ctx(tmp_path, **s))
    argv = spec.argv
    assert argv[argv.index("-ngl") + 1] == "60" and argv[argv.index("--tensor-split") + 1] == "50,10"
    assert "--fit" not in argv and "--override-tensor" not in argv and "--no-op-offload" not in argv
    [rpc] = lb.agentd_launch(a, 1, ctx(tmp_path, node="b", **s))
    assert rpc.argv == ("/opt/llama-box-rpc", "--rpc-server-host", "10.0.0.2", "--rpc-server-port", "2",
                        "--rpc-server-main-gpu", "0")


def test_llamabox_refuses_what_it_cannot_run(tmp_path, bins):
    a = llama(str(tmp_path / "absent.gguf"), [Part(host="a", role="main", gpus=(0,), layers=1)], [1])
    with pytest.raises(InvalidInput, match=f"model file {tmp_path / 'absent.gguf'} not found on a"):
        lb.agentd_launch(a, 0, ctx(tmp_path, **bins))
    w = llama(str(tmp_path), [Part(host="a", role="worker")], [1])
    with pytest.raises(InvalidInput, match="llamabox has no part role 'worker'"):
        lb.agentd_launch(w, 0, ctx(tmp_path, **bins))
    assert lb.agentd_launch(a.model_copy(update={"runtime": "vllm"}), 0, ctx(tmp_path)) is None


def test_llamabox_reads_loading_as_alive_not_ready():
    a = llama("/m", [Part(host="a", role="main")], [1])
    v = lb.agentd_health(a, 0, None, ProbeResult(ok=False, status=503, body='{"error":{"message":"Loading model"}}'))
    assert (v.ready, v.alive) == (False, True)
    assert lb.agentd_health(a, 0, None, ProbeResult(ok=False, status=500)) is None


def test_binary_discovery_prefers_settings_then_the_package_then_path(tmp_path, monkeypatch):
    s = load_settings(data_dir=str(tmp_path))
    monkeypatch.setattr(lb, "_package_bin_dirs", lambda: [tmp_path / "pkg"])
    (tmp_path / "pkg").mkdir()
    (tmp_path / "path").mkdir()
    for d, n in (("pkg", "llama-server"), ("path", "llama-box"), ("path", "rpc-server")):
        f = tmp_path / d / n
        f.write_text("#!/bin/sh\n")
        f.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert lb.main_binary(s) == str(tmp_path / "pkg" / "llama-server")
    assert lb.rpc_binary(s) == str(tmp_path / "path" / "rpc-server")
    (tmp_path / "pkg" / "llama-server").unlink()
    assert lb.main_binary(s) == str(tmp_path / "path" / "llama-box")


# --------------------------------------------------------------------------- vLLM


def test_vllm_single_host_command_line(tmp_path):
    a = vllm_assignment(["a"], gpu_memory_utilization=0.85, ctx_size=4096, extra_args=("--enforce-eager",))
    [spec] = vl.agentd_launch(a, 0, ctx(tmp_path, vllm_binary="/venv/bin/vllm"))
    assert spec.argv == ("/venv/bin/vllm", "serve", "/models/qwen", "--host", "10.1.0.1", "--port", "40100",
                         "--served-model-name", "qwen", "--tensor-parallel-size", "2", "--pipeline-parallel-size",
                         "1", "--gpu-memory-utilization", "0.85", "--max-model-len", "4096", "--enforce-eager")
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "0,1"} and spec.ready == HttpProbe(host="10.1.0.1", port=40100)
    plan_args = a.model_copy(update={"plan": a.plan.model_copy(update={"args": ("--max-model-len", "2048")})})
    [spec] = vl.agentd_launch(plan_args, 0, ctx(tmp_path, vllm_binary="/venv/bin/vllm"))
    assert spec.argv.count("--max-model-len") == 1 and spec.argv[-1] == "--enforce-eager"


def test_vllm_multi_host_runs_ray_with_explicit_ports_outside_the_ephemeral_range(tmp_path):
    a = vllm_assignment(["a", "b"], tp=2, pp=2)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ray").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "ray").chmod(0o755)
    settings = {"vllm_binary": str(tmp_path / "bin" / "vllm"), "ray_port_range": (23000, 23999)}
    head_spec, serve = vl.agentd_launch(a, 0, ctx(tmp_path, **settings))
    [worker] = vl.agentd_launch(a, 1, ctx(tmp_path / "b", node="b", **settings))
    head_port = vl.ray_head_port(a.instance_id, (23000, 23999))
    assert head_spec.listen.port == head_port and 23000 <= head_port <= 23999
    assert head_spec.argv[:3] == (str(tmp_path / "bin" / "ray"), "start", "--block")
    assert ("--head" in head_spec.argv and "--port" in head_spec.argv
            and head_spec.argv[head_spec.argv.index("--port") + 1] == str(head_port))
    assert worker.argv[worker.argv.index("--address") + 1] == f"10.1.0.1:{head_port}"
    # vllm serve waits for the head and for every worker's raylet, which listens on the worker part's endpoint.
    assert worker.wait_for == (head_spec.listen,) and worker.listen == Endpoint(host="10.1.0.2", port=40101)
    assert serve.wait_for == (head_spec.listen, worker.listen)
    assert worker.argv[worker.argv.index("--node-manager-port") + 1] == "40101" and worker.listen in worker.ports
    assert serve.argv[-2:] == ("--distributed-executor-backend", "ray")
    assert serve.env["RAY_ADDRESS"] == f"10.1.0.1:{head_port}" and serve.env["VLLM_HOST_IP"] == "10.1.0.1"
    for spec in (head_spec, worker):
        flags = dict(itertools.pairwise(spec.argv))
        own = ("--node-manager-port",) if spec is head_spec else ()  # a worker's is its part's endpoint (above)
        ports = [int(flags[f]) for f in (*own, "--object-manager-port", "--runtime-env-agent-port",
                                         "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
                                         "--metrics-export-port", "--min-worker-port", "--max-worker-port")]
        assert all(23000 <= p <= 23999 for p in ports)  # the kernel's ephemeral range starts at 32768 by default,
        # but a configured range keeps Ray off whatever this host uses; and none collides with the head
        assert head_port not in ports and len(set(ports)) == len(ports)
        assert int(flags["--max-worker-port"]) - int(flags["--min-worker-port"]) == vl.RAY_WORKER_PORTS - 1
        temp = Path(flags["--temp-dir"])
        assert temp.parent.stat().st_mode & 0o777 == 0o700 and len(str(temp)) <= vl.RAY_TEMP_DIR_MAX
    # An insecure cluster (no instance key): no Ray token.
    assert "RAY_AUTH_MODE" not in head_spec.env and "RAY_AUTH_MODE" not in serve.env
    vl.remove_ray_temp_dir(tmp_path / "work")
    vl.remove_ray_temp_dir(tmp_path / "b" / "work")


def test_vllm_stop_hook_removes_the_ray_session_dir(tmp_path):
    a = vllm_assignment(["a", "b"])
    c = ctx(tmp_path)
    d = vl.ray_temp_dir(c.work_dir)
    (d / "session_x").mkdir(parents=True)
    vl.agentd_stop(a, 0, c)
    assert not d.exists() and not d.parent.exists() and not (c.work_dir / "ray-tmp").exists()


def test_vllm_ray_temp_dir_is_private_and_never_a_predictable_tmp_path(tmp_path):
    """Issue 14 item 2: Ray chmods its temp dir 0777 itself, so it sits in a 0700 dir of ours: the work dir when
    short, else (Ray's AF_UNIX socket paths would pass 107 bytes) a mkdtemp dir linked from the work dir, found again
    on restart."""
    short = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))
    try:
        d = vl.ray_temp_dir(short / "i")
        assert d == short / "i" / "ray" and d.parent.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(short)
    work = tmp_path / ("x" * 60) / "inst"
    d = vl.ray_temp_dir(work)
    parent = d.parent
    assert (work / "ray-tmp").is_symlink() and parent.stat().st_mode & 0o777 == 0o700
    assert len(str(d)) <= vl.RAY_TEMP_DIR_MAX and parent.name.startswith("agentd-ray-") and parent.name != "agentd-ray-"
    d.mkdir(mode=0o777)
    d.chmod(0o777)  # what Ray does to it
    assert vl.ray_temp_dir(work) == d  # the same dir for the next process of the instance
    # A link to a dir someone else could enter is not used: a new private one replaces it.
    (work / "ray-tmp").unlink()
    shutil.rmtree(parent)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    (work / "ray-tmp").symlink_to(loose)
    d2 = vl.ray_temp_dir(work)
    assert d2.parent != loose and d2.parent.stat().st_mode & 0o777 == 0o700
    vl.remove_ray_temp_dir(work)
    assert not d2.parent.exists() and not (work / "ray-tmp").exists() and loose.exists()


def test_vllm_secure_multi_host_closes_the_ray_cluster_with_a_per_instance_token(tmp_path):
    """Issue 14 item 2: head, workers and vllm serve (the Ray driver) get RAY_AUTH_MODE=token and a 0600 token file
    derived from the instance key; another instance gets another token; a user cannot override it."""
    a = vllm_assignment(["a", "b"], tp=2, pp=2).model_copy(update={"api_key": "agdsrv_k1"})
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ray").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "ray").chmod(0o755)
    settings = {"vllm_binary": str(tmp_path / "bin" / "vllm"), "ray_port_range": (23000, 23999)}
    head, serve = vl.agentd_launch(a, 0, ctx(tmp_path, **settings))
    [worker] = vl.agentd_launch(a, 1, ctx(tmp_path / "b", node="b", **settings))
    token = vl.ray_auth_token("agdsrv_k1")
    assert token != vl.ray_auth_token("agdsrv_k2") and "agdsrv_k1" not in token
    for spec in (head, serve, worker):
        assert spec.env["RAY_AUTH_MODE"] == "token"
        path = Path(spec.env["RAY_AUTH_TOKEN_PATH"])
        assert path.read_text() == token and path.stat().st_mode & 0o777 == 0o600
        assert token not in " ".join(spec.argv)
    reserved = vl.agentd_reserved_launch("vllm")
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} <= set(reserved.env)
    vl.agentd_stop(a, 0, ctx(tmp_path, **settings))
    assert not Path(head.env["RAY_AUTH_TOKEN_PATH"]).exists()
    vl.remove_ray_temp_dir(tmp_path / "b" / "work")


def test_the_hooks_are_registered_through_the_entry_points():
    pm = PluginManager.load()
    impls = {i.plugin_name for i in pm.hook.agentd_launch.get_hookimpls()}
    assert {"llamabox", "vllm"} <= impls
