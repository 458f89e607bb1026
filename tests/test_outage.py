"""During an outage (issue 20 item 7): with no leader, an agent still says what runs on its own host.

Three real agents, one llama-server replica on each host; two agents are
killed (SIGKILL: their model servers keep running, as after a crash). The
survivor has no quorum, so `agentd ps` fails with "no leader", but
`agentd ps --local` lists its host's instance from its own supervisor (RUNNING,
with its pid) and `agentd ls --local` counts that replica ready instead of 0.
"""

from __future__ import annotations

import json
import signal

import pytest

from agentd.testing.binaries import NO_LLAMA_CPP, llama_cpp_present
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]




@pytest.mark.skipif(not llama_cpp_present(), reason=NO_LLAMA_CPP)
def test_with_no_leader_ps_and_ls_local_show_this_hosts_instances_from_its_supervisor(tmp_path):
    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.testing.localcluster import LocalCluster, free_port_block, running, simulated_host, wait_for
    from agentd.v1 import control_pb2 as pb

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    base = free_port_block()
    c = LocalCluster(tmp_path / "c", hosts=[simulated_host(n, gpus=1, gpu_gib=8) for n in "abc"],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 20}]", "AGENTD_RUNTIME_STOP_GRACE": "1s"})
    env = {"AGENTD_INSECURE": "1"}

    def cli(*args: str):
        return run_cli(*args, "--server", c.agents["c"].listen, env=env)

    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["a"].client(timeout=60) as client:
            client.deploy(pb.DeploymentSpec(name="tiny", model=str(model), runtime="llamabox", replicas=3,
                                            strategy="spread", options=pb.RuntimeOptions(ctx_size=256)))
        rows = wait_for(lambda: (r := running(c, "a", "tiny")) and len(r) == 3 and r, 90, "3 replicas running")
        mine = [i for i in rows if i.host == "c"]
        assert len(mine) == 1

        # While the cluster is whole, --local already answers from c's supervisor, for c's host only.
        r = cli("--json", "ps", "--local")
        assert r.returncode == 0, r.stderr
        local = json.loads(r.stdout)["instances"]
        assert [(i["instance_id"], i["host"], i["state"], int(i["pid"])) for i in local] == \
            [(mine[0].instance_id, "c", "RUNNING", mine[0].pid)]

        # The outage: two of three agents die; c alone has no quorum and, after an election timeout, no leader.
        for name in "ab":
            c.kill(name, signal.SIGKILL)
        wait_for(lambda: not cli("--json", "status").returncode
                 and not json.loads(cli("--json", "status").stdout).get("leader_id"), 30, "c to lose its leader")
        r = cli("ps")
        assert r.returncode == 3 and "no leader" in r.stderr, (r.returncode, r.stderr)
        r = cli("--json", "ps", "--local")
        assert r.returncode == 0, r.stderr
        local = json.loads(r.stdout)["instances"]
        assert [(i["instance_id"], i["host"], i["state"], int(i["pid"])) for i in local] == \
            [(mine[0].instance_id, "c", "RUNNING", mine[0].pid)]
        r = cli("ps", "--local", "tiny")  # the table, filtered by deployment
        assert r.returncode == 0 and mine[0].instance_id in r.stdout and "RUNNING" in r.stdout
        r = cli("--json", "ls", "--local")
        assert r.returncode == 0, r.stderr
        (dep,) = json.loads(r.stdout)["deployments"]
        assert (dep["name"], dep["replicas"], dep["ready"]) == ("tiny", 3, 1)  # c's own replica; not 0
        r = cli("ls")
        assert r.returncode == 3 and "no leader" in r.stderr
    finally:
        c.stop()
