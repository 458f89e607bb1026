"""Rebuild a member after its disk died (issue 20 item 4), with real agents and a real llama-server.

Host b's agent dies with its disk (SIGKILL, then its whole data directory is
deleted) while its llama-server runs on. b rejoins with an empty data
directory at the same path: it finds the llama-server of its previous life
by the owner variables in its environment, adopts it (same pid, no second
copy, no "port in use" FATAL), and the replica serves throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request

import psutil
import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]




@pytest.mark.skipif(not llama_cpp_present(), reason=NO_LLAMA_CPP)
def test_a_member_rebuilt_on_an_empty_data_dir_adopts_the_model_server_of_its_previous_life(tmp_path):
    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, wait_for
    from agentd.v1 import control_pb2 as pb

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "abc"],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 20}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})

    def servers() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline"])
                if "llama-server" in " ".join(p.info["cmdline"] or []) and str(model) in " ".join(p.info["cmdline"])}

    def completion(via: str) -> int:
        req = urllib.request.Request(f"http://{c.agents[via].http_listen}/v1/completions", method="POST",
                                     data=json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status

    def local_running() -> list[pb.Instance]:
        """b's own supervisor (`agentd ps --local`): the leader may still hold b's report from its last life."""
        with c.agents["b"].client(timeout=5) as client:
            rows = list(client.call("ListInstances", pb.ListInstancesRequest(local=True)).instances)
        return rows if rows and all(i.state == "RUNNING" for i in rows) else []

    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["a"].client(timeout=60) as client:
            client.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=1,
                                            options=pb.RuntimeOptions(ctx_size=256), pin=[pb.GpuPin(host="b")]))
        (before,) = wait_for(lambda: running(c, "a", "tiny"), 90, "tiny running on b")
        assert before.host == "b" and servers() == {before.pid}

        c.kill("b", signal.SIGKILL)  # the disk dies under the agent
        shutil.rmtree(c.agents["b"].data_dir)
        assert servers() == {before.pid} and completion("a") == 200  # served meanwhile

        c.start_agent("b")  # an empty data directory at the same path; --join the others
        (after,) = wait_for(lambda: local_running(), 90, "b's new agent to run tiny")
        assert after.pid == before.pid
        assert (after.instance_id, after.endpoint, after.restarts) == (before.instance_id, before.endpoint, 0)
        assert servers() == {before.pid}  # adopted, not started a second time
        log = c.agents["b"].log_file.read_text()
        assert f"found {before.instance_id}/main still running as pid {before.pid} without a record" in log
        assert "FATAL" not in log and "already in use" not in log
        assert completion("b") == 200 and completion("c") == 200
        # From now on it has a record again: a plain restart adopts it as usual.
        c.restart("b")
        (again,) = wait_for(lambda: local_running(), 90, "b's next agent to run tiny")
        assert again.pid == before.pid
    finally:
        c.stop()
        for pid in servers():
            os.kill(pid, signal.SIGKILL)
