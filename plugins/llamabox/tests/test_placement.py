"""llama-box placement: layer split over the main server's GPUs and rpc-servers, and the GPUStack seed case.

Seed case (issue 4): DeepSeek-R1 BF16 (about 1.2 TiB of weights) across several
workers. GPUStack picked a main server whose 8 x 24 GB GPUs could not hold a
single layer, although its own log had warned. Here the main server must hold
at least one layer on its own GPUs, always.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from agentd_llamabox.placement import CUDA_CONTEXT, N_UBATCH, estimate

from agentd.modelinfo import inspect_model
from agentd.placement import LayerSplit, place, plan_json
from agentd.testing.gguf import deepseek_r1_spec, write_header_only_gguf
from agentd.types import ClusterInventory, GpuPin
from tests.scenarios.build import (
    GiB,
    assert_llamabox_rules,
    builtin_plugins,
    cluster,
    gguf_model,
    gpu,
    host,
    spec,
)

ROOT = Path(__file__).resolve().parents[3]
SEED = ROOT / "examples" / "clusters" / "gpustack-deepseek-r1.json"


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """DeepSeek-R1 BF16 as llama.cpp's gguf-split writes it: 30 header-only shards."""
    path = write_header_only_gguf(tmp_path_factory.mktemp("r1") / "DeepSeek-R1-BF16.gguf",
                                  deepseek_r1_spec(tokenizer=False), shards=30)
    return inspect_model(path)


@pytest.fixture(scope="module")
def seed():
    return ClusterInventory.model_validate_json(SEED.read_text())


# --------------------------------------------------------------------------- the seed scenario


def test_seed_deepseek_main_server_holds_layers_on_its_own_gpus(plugins, deepseek, seed):
    assert len(deepseek.files) == 30 and deepseek.total_weight_bytes > 1.2 * 1024 * GiB
    s = spec("llamabox", name="deepseek-r1")
    plan = place(seed, deepseek, s, plugins=plugins)
    assert_llamabox_rules(plan, deepseek, s, seed)
    rp = plan.replicas[0]
    main, rpc = rp.parts[0], rp.parts[1:]
    # Rack a's RTX 4090s have 11 GiB free each: none of them can be the main server.
    assert main.host == "gpu-a100-1" and main.gpus == tuple(range(8)) and main.layers == 24
    assert main.cpu_layers == 0 and main.memory[-1] > main.memory[0]  # the last GPU also holds the output layer
    assert len(rpc) == 12 and {p.host for p in rpc} == {"gpu-a100-2", "gpu-a100-3"}
    assert rp.args[:6] == ("--ctx-size", "8192", "--n-gpu-layers", "62", "--split-mode", "layer")
    assert sum(p.layers for p in rp.parts) == 61


def test_seed_the_gpustack_choice_is_refused_with_the_reason(plugins, deepseek, seed):
    """Pin what GPUStack picked (a busy rack-a worker as main server): refused, never "fixed"."""
    pins = (GpuPin(host="worker-19", gpus=tuple(range(8))),
            *(GpuPin(host=f"gpu-a100-{n}", gpus=tuple(range(8))) for n in (1, 2, 3)))
    plan = place(seed, deepseek, spec("llamabox", name="deepseek-r1", pin=pins), plugins=plugins)
    assert not plan.placed
    assert plan.diagnosis.message == (
        "0/12 hosts can run deepseek-r1 (llamabox): 8 hosts not pinned, 1 main-server candidate cannot hold one "
        "layer (needs 22.3 GiB, largest free 11.0 GiB)")


def test_seed_with_selector_gives_the_fit_error_of_the_issue(plugins, deepseek, seed):
    plan = place(seed, deepseek, spec("llamabox", name="deepseek-r1", selector={"rack": "a"}), plugins=plugins)
    d = plan.diagnosis
    assert d.message == ("0/12 hosts can run deepseek-r1 (llamabox): 8 main-server candidates cannot hold one layer "
                         "(needs 22.3 GiB, largest free 11.0 GiB), 4 hosts excluded by selector rack=a")
    main_reason = d.reasons[0]
    assert main_reason.count == 8 and main_reason.details["largest_free"] == 11 * GiB
    assert d.near_miss == "main-server candidate worker-12 cannot hold one layer: needs 22.3 GiB, largest free 11.0 GiB"
    assert d.suggestions[0] == "free GPU 0 on worker-12 (13.0 GiB used by pid 4120)"
    assert d.suggestions[-1].startswith("drop the selector rack=a: full offload with the main server on gpu-a100-1")
    assert plan_json(plan)["diagnosis"]["reasons"][1] == {
        "reason": "hosts excluded by selector rack=a", "count": 4,
        "details": {"subject": "host", "stage": "host", "detail": "",
                    "where": ["gpu-a100-1", "gpu-a100-2", "gpu-a100-3", "gpu-a100-4"]}}


def test_a_rejected_main_server_is_logged(plugins, deepseek, seed, caplog):
    with caplog.at_level(logging.DEBUG, logger="agentd.placement"):
        place(seed, deepseek, spec("llamabox", selector={"rack": "a"}), plugins=plugins)
    assert ("rejected main-server candidate worker-19: cannot hold one layer "
            "(needs 22.3 GiB, largest free 11.0 GiB)") in caplog.messages


# --------------------------------------------------------------------------- memory


def test_layer_memory_comes_from_the_header_plus_kv_cache_and_buffers(deepseek):
    d = estimate(deepseek, spec("llamabox", ctx=4096))
    kv = 576 * 2 * 4096  # MLA latent + rope key, f16, per layer
    assert d.layer_bytes == tuple(b + kv for b in deepseek.layer_bytes)
    assert d.layer_bytes[0] < d.layer_bytes[3]  # three dense layers, then MoE
    assert d.output_bytes == deepseek.non_repeating_bytes["output"] + deepseek.non_repeating_bytes["output_norm"]
    # llama.cpp's compute buffers (agentd_llamabox/memory.py), u = one f32 row per ubatch token:
    u, h, mask = N_UBATCH * 4, 7168, 4096 * N_UBATCH * 2
    core = u * (128 * (2 * 512 + 3 * 64 + 128) + 2 * h)  # MLA's absorbed attention is the largest layer
    logits = N_UBATCH * 129280 * 4
    assert d.device_overhead == core + 14 * u * h + 4 * mask + u * 128 * 64 + CUDA_CONTEXT  # pipeline copies
    out = max(logits, core) + 9 * u * h + 4 * mask + CUDA_CONTEXT  # the output device's own (smaller) inputs
    assert d.device_overhead + d.output_overhead == max(out, d.device_overhead)
    assert d.single_device_overhead == max(logits + 4 * u * h, core + 2 * u * h) + mask + CUDA_CONTEXT
    assert d.cpu_fixed_bytes == deepseek.non_repeating_bytes["token_embd"] + 4 * u * h + mask + 4 * 129280 * 8
    assert d.pipeline_cpu_bytes == 6 * u * h + 3 * mask
    p = estimate(deepseek, spec("llamabox", ctx=4096), "partial")
    assert p.device_overhead == core + u * h + mask + CUDA_CONTEXT and p.output_overhead == 0


# --------------------------------------------------------------------------- ranking


def test_fewer_rpc_servers_beat_the_strategy(plugins):
    m = gguf_model(layers=10, layer_bytes=15 * GiB)
    # binpack prefers the fullest hosts, but only "big" holds the model without rpc-servers
    c = cluster(host("big", 2, 80), host("s1", 1, 24, used={0: 4}), host("s2", 1, 24, used={0: 4}))
    plan = place(c, m, spec("llamabox"), plugins=plugins)
    assert [(p.host, p.role) for p in plan.replicas[0].parts] == [("big", "main")]


def test_full_offload_before_partial(plugins):
    m = gguf_model(layers=6, layer_bytes=15 * GiB)
    c = cluster(host("a", 1, 48), host("b", 1, 80))
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=plugins)
    rp = plan.replicas[0]
    assert rp.parts[0].cpu_layers == 0 and len(rp.parts) == 2
    assert_llamabox_rules(plan, m, s, c)


def test_partial_offload_only_when_allowed_and_with_enough_ram(plugins):
    m = gguf_model(layers=8, layer_bytes=15 * GiB)
    c = cluster(host("a", 1, 48, ram_gib=256))
    refused = place(c, m, spec("llamabox", name="m"), plugins=plugins)
    msg = refused.diagnosis.message
    assert "1 main-server candidate cannot fit all layers on GPUs (CPU offload not allowed)" in msg
    assert any(x.startswith("allow CPU offload (--allow-cpu-offload): 5 of 8 layers would run from RAM on a")
               for x in refused.diagnosis.suggestions)
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=plugins)
    main = plan.replicas[0].parts[0]
    assert (main.layers, main.cpu_layers) == (3, 5)
    assert "--tensor-split" not in plan.replicas[0].args and "8" not in plan.replicas[0].args[3:4]
    assert plan.replicas[0].args[2:4] == ("--n-gpu-layers", "3")
    assert_llamabox_rules(plan, m, s, c)
    small_ram = cluster(host("a", 1, 48, ram_gib=40))
    short = place(small_ram, m, spec("llamabox", name="m", offload=True), plugins=plugins)
    assert "has too little RAM for the layers left on the CPU" in short.diagnosis.message


def test_partial_offload_adds_rpc_servers_only_for_ram(plugins):
    m = gguf_model(layers=8, layer_bytes=15 * GiB)
    c = cluster(host("a", 1, 48, ram_gib=60), host("b", 1, 48, ram_gib=8))
    s = spec("llamabox", offload=True)
    rp = place(c, m, s, plugins=plugins).replicas[0]
    assert [(p.host, p.role, p.layers) for p in rp.parts] == [("a", "main", 3), ("b", "rpc", 3)]
    assert rp.parts[0].cpu_layers == 2


def test_the_output_layer_goes_where_it_costs_least(plugins):
    m = gguf_model(layers=3, layer_bytes=14 * GiB, output=3 * GiB)
    c = cluster(host("a", gpus=[gpu(0, 30, host="a"), gpu(1, 18, host="a")]))
    rp = place(c, m, spec("llamabox"), plugins=plugins).replicas[0]
    assert [(p.host, p.gpus, p.layer_split) for p in rp.parts] == [("a", (0, 1), (2, 1))]  # output on GPU 1


def test_pinned_gpus_each_get_layers_in_proportion(plugins):
    m = gguf_model(layers=12, layer_bytes=2 * GiB)
    c = cluster(host("a", 2, 80), host("b", 1, 24), host("c", 1, 24))
    s = spec("llamabox", pin=(GpuPin(host="a", gpus=(1,)), GpuPin(host="b", gpus=(0,)), GpuPin(host="c", gpus=(0,))))
    plan = place(c, m, s, plugins=plugins)
    rp = plan.replicas[0]
    assert [(p.host, p.gpus) for p in rp.parts] == [("a", (1,)), ("c", (0,)), ("b", (0,))]
    assert rp.parts[0].layers > rp.parts[1].layers >= 1 and rp.parts[2].layers >= 1
    assert_llamabox_rules(plan, m, s, c)


def test_estimate_answers_only_layer_split_shapes():
    from agentd_llamabox.placement import agentd_estimate

    from agentd.placement import Sharded

    m = gguf_model()
    assert agentd_estimate(runtime="llamabox", model=m, spec=spec("llamabox"), shape=Sharded(2)) is None
    assert agentd_estimate(runtime="vllm", model=m, spec=spec("llamabox"), shape=LayerSplit()) is None


# --------------------------------------------------------------------------- hosts without GPUs


def _cpu_host(name: str, ram_gib: float):
    from agentd.types import HostInventory

    return HostInventory(name=name, cpu_count=32, memory_total=int(ram_gib * GiB), memory_available=int(ram_gib * GiB))


def test_a_host_without_gpus_serves_from_ram_when_the_deployment_allows_it(plugins):
    """llamabox declares RuntimeInfo.host_memory: with --allow-cpu-offload a CPU-only host is a main server
    whose layers are all in RAM (its own device), with the same RAM booking as partial offload."""
    m = gguf_model(layers=8, layer_bytes=2 * GiB, vocab=32000)
    c = cluster(_cpu_host("cpu1", 64))
    refused = place(c, m, spec("llamabox"), plugins=plugins)
    assert refused.diagnosis.message == "0/1 hosts can run m (llamabox): 1 host without GPUs"
    assert refused.diagnosis.suggestions == (
        "allow CPU offload (--allow-cpu-offload): 8 of 8 layers would run from RAM on cpu1",)
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=plugins)
    [main] = plan.replicas[0].parts
    assert (main.host, main.gpus, main.layers, main.cpu_layers, main.memory) == ("cpu1", (), 0, 8, ())
    assert plan.replicas[0].args[2:4] == ("--n-gpu-layers", "0")
    d = estimate(m, s, "partial")
    too_small = place(cluster(_cpu_host("cpu1", d.ram_for(8) / GiB - 0.1)), m, s, plugins=plugins)
    assert "has too little RAM for the layers left on the CPU" in too_small.diagnosis.message
    # vLLM declares no host memory: a CPU-only host stays out, whatever the deployment allows.
    from tests.scenarios.build import model

    vllm = place(c, model(layers=8), spec("vllm", offload=True), plugins=plugins)
    assert vllm.diagnosis.message == "0/1 hosts can run m (vllm): 1 host without GPUs"


def test_a_cpu_main_server_takes_rpc_servers_for_what_its_ram_cannot_hold(plugins):
    m = gguf_model(layers=8, layer_bytes=2 * GiB, vocab=32000)
    # the GPU host's own RAM is too small to be a partial-offload main; the CPU host's holds 5 layers
    c = cluster(_cpu_host("cpu1", 13), host("g", 1, 10, ram_gib=1))
    s = spec("llamabox", offload=True)
    plan = place(c, m, s, plugins=plugins)
    parts = plan.replicas[0].parts
    assert [(p.host, p.role, p.gpus) for p in parts] == [("cpu1", "main", ()), ("g", "rpc", (0,))]
    assert parts[0].cpu_layers + parts[1].layers == 8 and parts[0].cpu_layers >= 1
    assert_llamabox_rules(plan, m, s, c)


def test_a_gpu_host_beats_a_cpu_host(plugins):
    m = gguf_model(layers=8, layer_bytes=2 * GiB, vocab=32000)
    c = cluster(_cpu_host("cpu1", 512), host("g", 1, 24))
    plan = place(c, m, spec("llamabox", offload=True), plugins=plugins)
    assert [(p.host, p.cpu_layers) for p in plan.replicas[0].parts] == [("g", 0)]  # full offload first
