"""rpc-servers on hosts without GPUs (issue 17 item 4): a host's RAM as an rpc device, and RAM bookings.

The runtime declares RuntimeInfo.host_memory (llamabox does); with --allow-cpu-offload each candidate host
without GPUs offers its RAM as one rpc device, after every GPU, and the bytes a part holds there are
booked (`Part.ram`) so that a later deployment is not promised the same RAM.
"""

from __future__ import annotations

import pytest
from agentd_llamabox.placement import estimate

from agentd.placement import place
from agentd.types import HostInventory
from tests.scenarios.build import GiB, assert_llamabox_rules, builtin_plugins, cluster, gguf_model, host, spec


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


def _cpu_host(name: str, ram_gib: float) -> HostInventory:
    return HostInventory(name=name, cpu_count=32, memory_total=int(ram_gib * GiB),
                         memory_available=int(ram_gib * GiB))


def _model():
    return gguf_model(layers=8, layer_bytes=2 * GiB, vocab=32000)


def _existing(plan) -> list:
    return list(plan.replicas)  # placed plans count as existing assignments (Snapshot.build)


def test_a_cpu_only_host_takes_an_rpc_server_part_with_its_ram_booked(plugins):
    m, s = _model(), spec("llamabox", offload=True)
    # Neither host's RAM holds all 8 layers (16 GiB and host buffers): the main keeps some in its RAM,
    # the rest goes to the other host's RAM through an rpc-server.
    c = cluster(_cpu_host("a", 13), _cpu_host("b", 13))
    plan = place(c, m, s, plugins=plugins)
    assert plan.diagnosis is None
    main, rpc = plan.replicas[0].parts
    assert (main.host, main.role, main.gpus) == ("a", "main", ())
    assert (rpc.host, rpc.role, rpc.gpus, rpc.memory) == ("b", "rpc", (), ())
    assert main.cpu_layers >= 1 and main.cpu_layers + rpc.layers == 8 and rpc.layer_split == (rpc.layers,)
    d = estimate(m, s, "partial")
    assert main.ram == d.ram_for(main.cpu_layers, pipeline=False)
    assert rpc.ram == sum(d.layer_bytes[main.cpu_layers:]) + d.device_overhead
    assert "--tensor-split" not in plan.replicas[0].args  # one device: the rpc-server's CPU backend
    assert plan.replicas[0].args[plan.replicas[0].args.index("--n-gpu-layers") + 1] == str(rpc.layers)
    assert rpc.env.get("CUDA_VISIBLE_DEVICES", "") == ""  # no GPU list: ggml's CPU backend
    assert_llamabox_rules(plan, m, s, c)
    # `agentd plan` shows both parts on RAM with the GiB booked there.
    from agentd.cli.plan import render

    table = render(s, plan)
    assert f"  rpc   b     RAM   {rpc.layers}       -           {rpc.ram / GiB:.1f}" in table, table
    # The field is in the JSON only when set (versioning: since_format 2).
    assert "ram" in rpc.model_dump(mode="json") and "ram" not in host("g", 1).model_dump(mode="json")


def test_two_deployments_do_not_double_book_the_same_ram(plugins):
    m, s = _model(), spec("llamabox", offload=True)
    c = cluster(_cpu_host("a", 13), _cpu_host("b", 13), _cpu_host("c", 13))
    first = place(c, m, s, plugins=plugins)
    hosts_first = {p.host for p in first.replicas[0].parts}
    assert first.diagnosis is None and len(hosts_first) == 2
    existing = _existing(first)
    second = place(c, m, spec("llamabox", name="second", offload=True), existing, plugins=plugins)
    # 13 GiB per host, ~10 GiB of the first deployment on each of two: the second cannot fit anywhere
    # without the third host, and never on the RAM the first booked.
    assert second.diagnosis is None, second.diagnosis
    for p in second.replicas[0].parts:
        assert p.ram > 0
    assert_llamabox_rules(second, m, s, c, existing)
    # Without the bookings (no existing plans) the same cluster would reuse host a or b.
    by_host: dict[str, int] = {}
    for plan in (first, second):
        for p in plan.replicas[0].parts:
            by_host[p.host] = by_host.get(p.host, 0) + p.ram
    assert all(v <= 13 * GiB for v in by_host.values()), by_host
    # A third deployment finds every host's RAM promised: refused, not double-booked.
    third = place(c, m, spec("llamabox", name="third", offload=True), existing + _existing(second),
                  plugins=plugins)
    assert third.diagnosis is not None and not third.replicas


def test_two_replicas_of_one_deployment_book_ram_in_turn(plugins):
    m = _model()
    s = spec("llamabox", offload=True, replicas=2)
    c = cluster(_cpu_host("a", 13), _cpu_host("b", 13), _cpu_host("c", 13), _cpu_host("d", 13))
    plan = place(c, m, s, plugins=plugins)
    assert plan.diagnosis is None and len(plan.replicas) == 2
    ram: dict[str, int] = {}
    for rp in plan.replicas:
        for p in rp.parts:
            assert p.ram > 0
            ram[p.host] = ram.get(p.host, 0) + p.ram
    # The second replica sees the first's bookings: no host promised more than its 13 GiB.
    assert all(v <= 13 * GiB for v in ram.values()), ram
    assert_llamabox_rules(plan, m, s, c)


def test_the_main_still_holds_a_layer_on_its_own_ram(plugins):
    m, s = _model(), spec("llamabox", offload=True)
    # host a's RAM holds barely one layer (and the host-side buffers); b holds every other layer.
    d = estimate(m, s, "partial")
    c = cluster(_cpu_host("a", d.ram_for(1) / GiB + 0.01), _cpu_host("b", 15))
    plan = place(c, m, s, plugins=plugins)
    assert plan.diagnosis is None
    main = next(p for p in plan.replicas[0].parts if p.role == "main")
    assert main.cpu_layers >= 1 and not main.gpus
    assert_llamabox_rules(plan, m, s, c)


def test_gpus_come_before_a_hosts_ram(plugins):
    m, s = _model(), spec("llamabox", offload=True)
    # a or b as the main keeps 2 layers in RAM; g's GPU takes 3, the other CPU host's RAM the last 3.
    c = cluster(_cpu_host("a", 7), host("g", 1, 8, ram_gib=1), _cpu_host("b", 7))
    plan = place(c, m, s, plugins=plugins)
    assert plan.diagnosis is None
    parts = plan.replicas[0].parts
    assert (parts[0].host, parts[0].role) == ("a", "main")
    gpu_part = next(p for p in parts if p.host == "g")
    assert gpu_part.gpus == (0,) and gpu_part.ram == 0
    # Device order: llama.cpp lists --rpc devices in order; the GPU holds the layers right below the
    # main's, the RAM device the lowest ones.
    assert [p.host for p in parts[1:]] == ["b", "g"]
    assert_llamabox_rules(plan, m, s, c)


def test_without_cpu_offload_nothing_lands_on_ram(plugins):
    m = _model()
    c = cluster(_cpu_host("a", 64), host("g", 1, 8, ram_gib=1), _cpu_host("b", 64))
    plan = place(c, m, spec("llamabox"), plugins=plugins)
    assert plan.diagnosis is not None and not plan.replicas
    assert "2 hosts without GPUs" in plan.diagnosis.message
    # Full offload (tried first) never takes a RAM device: g's GPU cannot hold every layer, so the model
    # goes to partial offload, where b serves it from its own RAM rather than g + b's RAM over RPC.
    c = cluster(host("g", 1, 12, ram_gib=1), _cpu_host("b", 64))
    ok = place(c, m, spec("llamabox", offload=True), plugins=plugins)
    assert ok.diagnosis is None
    assert [(p.host, p.role, p.cpu_layers) for p in ok.replicas[0].parts] == [("b", "main", 8)]
