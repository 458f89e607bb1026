"""Hosts whose CPU has AMX (HostInventory.cpu_features): llama.cpp's AMX buffers in the RAM booking.

On such a CPU llama.cpp keeps the quantized matrices of the layers left in RAM
in AMX buffers, each block of a row padded (Q8_0: 34 -> 38 bytes, Q4_K: 144 ->
148, ...; docs/placement.md). The padding below is counted from the tensors'
shapes, independently of the plugin's per-type table.
"""

from __future__ import annotations

import pytest
from agentd_llamabox import memory
from agentd_llamabox.placement import estimate

from agentd.modelinfo import inspect_model
from agentd.placement import place
from agentd.testing.gguf import deepseek_r1_spec, llama_spec, retype, write_header_only_gguf
from agentd.types import HostInventory
from tests.scenarios.build import GiB, builtin_plugins, cluster, spec

AMX = ("amx_bf16", "amx_int8", "amx_tile")
LAYERS, HIDDEN, FFN, VOCAB = 4, 512, 1536, 32000


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """A small llama in Q8_0 with a Q4_K ffn_down and an F16 attn_v (AMX keeps F16's size)."""
    p = tmp_path_factory.mktemp("amx") / "q8.gguf"
    s = llama_spec(n_layers=LAYERS, hidden=HIDDEN, heads=8, kv_heads=8, ffn=FFN, vocab=VOCAB, ctx=4096,
                   weight_type="Q8_0", output_type="Q8_0", layer_types={"ffn_down": "Q4_K", "attn_v": "F16"},
                   file_type="Q8_0")
    return inspect_model(str(write_header_only_gguf(p, s)))


def _padding_per_layer() -> int:
    """Rows x blocks per row x bytes AMX adds per block, tensor by tensor."""
    q8_rows = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
               "ffn_gate": (HIDDEN, FFN), "ffn_up": (HIDDEN, FFN)}  # (K, N): N rows of K elements
    q8 = sum(n * (k // 32) * 4 for k, n in q8_rows.values())
    q4k = HIDDEN * (FFN // 256) * 4  # ffn_down: K = FFN
    return q8 + q4k


def _cpu_host(name: str, ram_gib: float, features: tuple[str, ...] = ()) -> HostInventory:
    return HostInventory(name=name, cpu_count=32, memory_total=int(ram_gib * GiB),
                         memory_available=int(ram_gib * GiB), cpu_features=features)


def test_the_amx_term_is_the_padding_of_the_quantized_matrices(q8):
    pad = memory.amx_padding_of(q8)
    assert pad.per_layer == (_padding_per_layer(),) * LAYERS
    assert pad.output == VOCAB * (HIDDEN // 32) * 4  # output.weight, Q8_0


def test_a_host_with_amx_books_the_padding_of_the_layers_it_keeps(q8, plugins):
    s = spec("llamabox", offload=True)
    d = estimate(q8, s, "partial")
    per, out = _padding_per_layer(), VOCAB * (HIDDEN // 32) * 4
    # The output weight is in RAM (and in AMX's buffers) with any layer.
    for k in range(1, LAYERS + 1):
        assert d.ram_for(k, cpu_features=AMX) - d.ram_for(k) == k * per + out
    assert d.ram_for(LAYERS, cpu_features=("amx_bf16",)) == d.ram_for(LAYERS)  # the int8 kernels are what counts
    assert d.ram_for(0, cpu_features=AMX) == d.ram_for(0)  # full offload: nothing of the layers in RAM

    # Placed: the same model on a host without GPUs books more RAM where the CPU has AMX ...
    plain = place(cluster(_cpu_host("a", 64)), q8, s, plugins=plugins).replicas[0].parts[0]
    amx = place(cluster(_cpu_host("a", 64, AMX)), q8, s, plugins=plugins).replicas[0].parts[0]
    assert amx.ram - plain.ram == LAYERS * per + out
    # ... and a host that holds the model only without the padding is refused where it has AMX.
    tight = (plain.ram + (amx.ram - plain.ram) // 2) / GiB
    assert place(cluster(_cpu_host("a", tight)), q8, s, plugins=plugins).placed
    refused = place(cluster(_cpu_host("a", tight, AMX)), q8, s, plugins=plugins)
    assert not refused.placed and "too little RAM" in refused.diagnosis.message


def test_a_tied_output_weight_is_copied_into_amx_buffers(tmp_path):
    """Tied embeddings: token_embd stays mapped for the input lookup; the output matmul's copy goes to AMX."""
    def model(embd_type):
        s = llama_spec(n_layers=2, hidden=HIDDEN, heads=8, kv_heads=8, ffn=FFN, vocab=VOCAB, ctx=4096,
                       weight_type="F16", embd_type=embd_type, tied_embeddings=True)
        return inspect_model(str(write_header_only_gguf(tmp_path / f"{embd_type}.gguf", s)))

    f16, q8, bf16 = model("F16"), model("Q8_0"), model("BF16")
    assert memory.amx_padding_of(f16).output == VOCAB * HIDDEN * 2  # F16: a copy, no padding
    assert memory.amx_padding_of(q8).output == VOCAB * (HIDDEN // 32) * (34 + 4)  # a copy, padded
    assert memory.amx_padding_of(bf16).output == 0  # a type AMX does not take: no copy
    assert memory.amx_padding_of(f16).per_layer == (0, 0)  # F16 matrices keep their size


def test_the_inventory_field_is_sorted_and_left_out_when_empty():
    h = HostInventory(name="a", cpu_features=("amx_tile", "amx_int8", "amx_tile"))
    assert h.cpu_features == ("amx_int8", "amx_tile")
    assert "cpu_features" not in HostInventory(name="a").model_dump(mode="json")
    from agentd import formats

    assert "cpu_features" not in formats.dump(h, 1)  # a 0.1.0 leader reads the inventory without it


def test_mla_with_amx_types_on_an_amx_cpu_only_host_runs_without_repacking(tmp_path, plugins):
    """llama.cpp aborts building the context there (memory.amx_aborts_on_cpu_only): --no-repack."""
    base = deepseek_r1_spec(tokenizer=False)
    q8 = retype(base, {"attn_k_b": "Q8_0", "attn_v_b": "Q8_0"})
    m_q8 = inspect_model(str(write_header_only_gguf(tmp_path / "q8.gguf", q8)))
    m_bf16 = inspect_model(str(write_header_only_gguf(tmp_path / "bf16.gguf", base)))
    assert memory.amx_aborts_on_cpu_only(m_q8) and not memory.amx_aborts_on_cpu_only(m_bf16)
    s = spec("llamabox", offload=True)

    def args(m, features):
        plan = place(cluster(_cpu_host("a", 2048, features)), m, s, plugins=plugins)  # 2 TiB: holds the BF16
        assert plan.placed, plan.diagnosis
        return plan.replicas[0].args

    assert "--no-repack" in args(m_q8, AMX)
    assert "--no-repack" not in args(m_q8, ())
    assert "--no-repack" not in args(m_bf16, AMX)


def test_the_host_reads_its_cpu_flags():
    from agentd.inventory.host import cpu_features

    text = ("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert cpu_features(text) == ("amx_bf16", "amx_int8", "amx_tile")
    # A flag one CPU lacks is not the host's; no flags line (another OS's format): none.
    assert cpu_features(text + "processor\t: 2\nflags\t\t: fpu amx_tile\n") == ("amx_tile",)
    assert cpu_features("processor: 0\n") == ()


def test_a_simulated_host_has_the_cpu_its_file_declares(tmp_path):
    """Not the machine's: on this AMX machine a file without the field is a host without AMX."""
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
