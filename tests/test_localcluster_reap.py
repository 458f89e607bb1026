"""LocalCluster leaves nothing running: a model server whose agent was killed with -9, and whose process record
was lost, is still found (by the owner variables in its environment) and killed when the cluster stops.

Without this a test that kills an agent, or fails half-way, leaves llama-server (or vLLM, or Ray) running and
loading every later test on a 2-core CI machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, wait_for
from agentd.v1 import control_pb2 as pb


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_present(), reason=NO_LLAMA_CPP)
def test_stop_kills_the_model_server_of_an_agent_killed_with_minus_9_whose_records_are_gone(tmp_path):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host("a", gpus=1, gpu_gib=8)],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 20}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    with c:
        c.wait_for_inventories()
        with c.agents["a"].client(timeout=60) as client:
            client.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1,
                                            options=pb.RuntimeOptions(ctx_size=256)))
        (inst,) = wait_for(lambda: running(c, "a", "tiny"), 90, "tiny running")
        server = psutil.Process(inst.pid)
        assert "llama-server" in " ".join(server.cmdline())
        # A grandchild in a session of its own that outlives its parent (what Ray and vLLM's workers do),
        # started with the server's environment.
        env = server.environ()
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                                  start_new_session=True)
        agent_pid = c.agents["a"].proc.pid

        c.kill("a", signal.SIGKILL)
        shutil.rmtree(c.agents["a"].data_dir / "runtime" / "records")  # nothing names the server any more
        assert _alive(server.pid) and _alive(helper.pid), "kill -9 of the agent took its model server with it"
        assert {p.pid for p in c.leftovers()} >= {server.pid, helper.pid}
        assert agent_pid not in {p.pid for p in c.leftovers()}
    # `with` stopped the cluster.
    helper.poll()
    assert not _alive(server.pid), f"llama-server {server.pid} outlived its cluster"
    assert not _alive(helper.pid)
    assert c.leftovers() == []
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(model) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the instance left: {left}"


def test_reap_finds_a_process_by_the_cluster_mark_and_spares_other_clusters(tmp_path):
    """No agent needed: a process that carries this cluster's mark is reaped, one of another cluster is not."""
    c = LocalCluster(tmp_path / "c", hosts=[])
    other = LocalCluster(tmp_path / "c2", hosts=[])
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    mine = subprocess.Popen(sleep, env={**os.environ, "LOCALCLUSTER_ROOT": c.mark}, start_new_session=True)
    theirs = subprocess.Popen(sleep, env={**os.environ, "LOCALCLUSTER_ROOT": other.mark}, start_new_session=True)
    owned = subprocess.Popen(sleep, env={**os.environ, "AGENTD_OWNER_DATA_DIR": str(c.root / "a")},
                             start_new_session=True)
    try:
        wait_for(lambda: {mine.pid, owned.pid} <= {p.pid for p in c.leftovers()}, 10, "the marks to be readable")
        assert c.reap() == sorted([mine.pid, owned.pid])
        mine.wait(5), owned.wait(5)  # reap() waited for them already (psutil reaps its caller's children)
        assert theirs.poll() is None
    finally:
        for p in (mine, theirs, owned):
            p.kill()
            p.wait()


def test_the_conftest_stops_a_cluster_the_test_body_left_running():
    """tests/conftest.py's pytest_runtest_call: a cluster made in the body and not stopped is stopped after it,
    failed or not; one made before the body (by a fixture) is left to its fixture."""
    from agentd.testing import localcluster
    from tests.conftest import pytest_runtest_call

    class Cluster:
        stopped = 0

        def __init__(self, serial: int) -> None:
            self.serial = serial

        def stop(self, timeout: float = 30.0) -> None:
            self.stopped += 1
            localcluster.STARTED.pop(self.serial, None)

    fixture_made = Cluster(-1)  # made before the body (a serial no real cluster has)
    localcluster.STARTED[fixture_made.serial] = fixture_made
    hook = pytest_runtest_call(None)
    next(hook)
    body_made = LocalCluster(Path(tempfile.mkdtemp()), hosts=[])  # a real one: it takes the next serial
    assert body_made.serial > fixture_made.serial
    localcluster.STARTED[body_made.serial] = body_made  # as if it had started an agent
    try:
        with pytest.raises(AssertionError, match="the test failed"):
            hook.throw(AssertionError("the test failed"))
        assert body_made.serial not in localcluster.STARTED and fixture_made.stopped == 0
        assert localcluster.STARTED[fixture_made.serial] is fixture_made
    finally:
        localcluster.STARTED.pop(fixture_made.serial, None)
        localcluster.STARTED.pop(body_made.serial, None)
        shutil.rmtree(body_made.root, ignore_errors=True)
