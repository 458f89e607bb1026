"""Property tests over random small clusters.

Whatever is placed satisfies every rule (re-checked independently in
tests/scenarios/build.py) and never over-commits a GPU, replicas and
existing assignments included. Whatever is refused really has no valid
layout: a brute force over every GPU subset (and shape, main server and
output device) of the same small cluster, with the plugin's own memory
estimate, finds none.
"""

from __future__ import annotations

import itertools

from agentd_llamabox.placement import estimate as llama_estimate
from agentd_vllm.placement import PP_ARCHITECTURES, max_model_len
from agentd_vllm.placement import estimate as vllm_estimate
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agentd.placement import Sharded, place
from agentd.placement.snapshot import Snapshot
from agentd.types import Assignment, ClusterInventory, Part, PartEndpoint, ReplicaPlan
from tests.scenarios.build import (
    GiB,
    assert_llamabox_rules,
    assert_vllm_rules,
    builtin_plugins,
    gguf_model,
    gpu,
    host,
    model,
    spec,
)

PLUGINS = builtin_plugins()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clusters(draw, max_hosts: int = 3, max_gpus: int = 4, max_total: int = 8):
    n_hosts = draw(st.integers(1, max_hosts))
    hosts, left = [], max_total
    for h in range(n_hosts):
        n = draw(st.integers(1, max(1, min(max_gpus, left - (n_hosts - h - 1)))))
        left -= n
        gpus = []
        for i in range(n):
            total = draw(st.sampled_from([16, 24, 40, 80]))
            used = total * draw(st.sampled_from([0, 0, 0, 0.05, 0.25, 0.6, 0.95]))
            owned = draw(st.booleans()) if used else False
            gpus.append(gpu(i, total, 0 if owned else used, owned_gib=used if owned else 0, host=f"h{h}",
                            pid=100 + 10 * h + i))
        hosts.append(host(f"h{h}", gpus=gpus, ram_gib=draw(st.sampled_from([16, 64, 512]))))
    return ClusterInventory(hosts=tuple(hosts))


@st.composite
def existing_for(draw, c: ClusterInventory):
    """Zero or one agentd assignment already booking memory on a random GPU."""
    if not draw(st.booleans()):
        return []
    h = draw(st.sampled_from(c.hosts))
    g = draw(st.sampled_from(h.gpus))
    mem = int(g.memory_total * draw(st.sampled_from([0.1, 0.5, 0.9])))
    part = Part(host=h.name, gpus=(g.index,), role="main", memory=(mem,))
    return [Assignment(deployment="other", replica=0, term=1, model="x", runtime="vllm",
                       plan=ReplicaPlan(parts=(part,)), endpoints=(PartEndpoint(host=h.name, address="a", port=1),))]


heads_kv = st.sampled_from([(8, 8), (12, 4), (28, 4), (32, 8), (40, 8), (64, 8), (14, 2), (6, 1), (7, 7), (9, 3),
                            (15, 5)])


def _layer_bytes(draw, c: ClusterInventory, layers: int) -> int:
    """Sized against the cluster, so that many draws sit near the edge of fitting."""
    total = sum(g.memory_total for h in c.hosts for g in h.gpus)
    share = draw(st.sampled_from([0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3]))
    if draw(st.booleans()):  # or sized against one GPU
        total = max(g.memory_total for h in c.hosts for g in h.gpus) * draw(st.sampled_from([1, 2, 3]))
    return max(64 * 2**20, int(total * share / layers) // 2**20 * 2**20)


@st.composite
def vllm_models(draw, c: ClusterInventory):
    heads, kv = draw(heads_kv)
    layers = draw(st.integers(1, 12))
    return model(layers=layers, layer_bytes=_layer_bytes(draw, c, layers), heads=heads, kv_heads=kv,
                 ctx=draw(st.sampled_from([2048, 8192, 32768])),
                 arch=draw(st.sampled_from(["LlamaForCausalLM", "LlamaForCausalLM", "MllamaForConditionalGeneration"])))


@st.composite
def llama_models(draw, c: ClusterInventory):
    heads, kv = draw(heads_kv)
    layers = draw(st.integers(1, 16))
    return gguf_model(layers=layers, layer_bytes=_layer_bytes(draw, c, layers), heads=heads, kv_heads=kv,
                      ctx=draw(st.sampled_from([2048, 8192])), embed=int(draw(st.sampled_from([0.25, 2])) * GiB))


# --------------------------------------------------------------------------- brute force


def _free(c: ClusterInventory, existing=()) -> dict[str, list]:
    return {hv.name: list(hv.gpus) for hv in Snapshot.build(c, existing).hosts}


def vllm_feasible(m, s, c, existing=()) -> bool:
    if max_model_len(m, s) > m.context_length:
        return False
    util = s.options.gpu_memory_utilization or 0.9
    free = _free(c, existing)
    usable = {h: [g for g in gs if g.free >= util * g.total] for h, gs in free.items()}
    kv, L = m.num_key_value_heads, m.num_hidden_layers

    def rules(tp, pp):
        return (m.num_attention_heads % tp == 0 and ((kv % tp == 0) if tp <= kv else (tp % kv == 0))
                and pp <= L and (pp == 1 or m.architecture in PP_ARCHITECTURES))

    for gs in usable.values():  # one host: every subset, every (tp, pp) splitting it
        for n in range(1, len(gs) + 1):
            for subset in itertools.combinations(gs, n):
                for tp in range(1, n + 1):
                    if n % tp or not rules(tp, n // tp):
                        continue
                    need = vllm_estimate(m, s, Sharded(tp, n // tp)).per_gpu
                    if all(need <= int(util * g.total) for g in subset):
                        return True
    names = list(usable)
    for pp in range(2, len(names) + 1):  # several hosts: one stage per host, tp GPUs each
        for hosts in itertools.combinations(names, pp):
            for tp in range(1, 1 + min(len(usable[h]) for h in hosts)):
                if not rules(tp, pp):
                    continue
                need = vllm_estimate(m, s, Sharded(tp, pp, hosts=pp)).per_gpu
                if all(any(all(need <= int(util * g.total) for g in sub)
                           for sub in itertools.combinations(usable[h], tp)) for h in hosts):
                    return True
    return False


def llama_feasible(m, s, c, existing=()) -> bool:
    """Every main host, every subset of its GPUs and of the other GPUs, every output device."""
    d = llama_estimate(m, s)
    size = d.layer_bytes[0]
    assert all(b == size for b in d.layer_bytes), "brute force assumes equal layers"
    L = d.layers
    free = _free(c, existing)
    ram = {h.name: h.memory_available for h in c.hosts}

    def cap(g, extra=0):
        return max(0, (g.free - d.device_overhead - extra) // size) if g.free >= d.device_overhead + extra else -1

    for full in ([True, False] if s.options.allow_cpu_offload else [True]):
        # The last device holds the output layer (full) or only its norm (partial, which keeps at
        # least one layer and the output weight in RAM): docs/placement.md, "the output rule".
        out = d.output_bytes + d.output_overhead if full else d.output_norm_bytes
        on_gpus = L if full else L - 1
        for main, mine in free.items():
            others = [g for h, gs in free.items() if h != main for g in gs]
            for k in range(1, len(mine) + 1):
                for M in itertools.combinations(mine, k):
                    for o in M:
                        caps = [cap(g, out if g is o else 0) for g in M]
                        if min(caps) < 0 or caps[M.index(o)] < (0 if full else 1):
                            continue  # partial: the norm goes with the top layer, so its GPU holds one
                        main_layers = min(sum(caps), on_gpus)
                        if main_layers < 1:
                            continue
                        for r in range(len(others) + 1):
                            for R in itertools.combinations(others, r):
                                rc = [cap(g) for g in R]
                                if rc and min(rc) < 1:
                                    continue
                                gpu_layers = min(on_gpus, main_layers + sum(rc))
                                if full and gpu_layers == L and d.ram_for(0) <= ram[main]:
                                    return True
                                if not full and d.ram_for(L - gpu_layers) <= ram[main]:
                                    return True
    return False


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(data=st.data())
def test_vllm_placed_is_valid_refused_is_infeasible(data):
    c = data.draw(clusters())
    m = data.draw(vllm_models(c))
    existing = data.draw(existing_for(c))
    s = spec("vllm", util=data.draw(st.sampled_from([None, 0.5, 0.8, 0.95])),
             ctx=data.draw(st.sampled_from([None, None, 4096, 65536])),
             strategy=data.draw(st.sampled_from(["binpack", "spread"])), replicas=data.draw(st.integers(1, 2)))
    plan = place(c, m, s, existing, plugins=PLUGINS)
    event(f"placed={plan.placed}")
    if plan.placed:
        assert len(plan.replicas) == s.replicas
        assert_vllm_rules(plan, m, s, c, existing)
        for rp in plan.replicas:
            hosts = len({p.host for p in rp.parts})
            need = vllm_estimate(m, s, Sharded(rp.tensor_parallel, rp.pipeline_parallel, hosts)).per_gpu
            assert all(need <= mem for p in rp.parts for mem in p.memory)
    else:
        assert plan.replicas == () and plan.diagnosis is not None
        assert plan.diagnosis.message.startswith(f"0/{len(c.hosts)} hosts can run m (vllm")
        if s.replicas == 1:
            assert not vllm_feasible(m, s, c, existing), plan.diagnosis.message


@SETTINGS
@given(data=st.data())
def test_llamabox_placed_is_valid_refused_is_infeasible(data):
    c = data.draw(clusters(max_hosts=4, max_gpus=3, max_total=6))
    m = data.draw(llama_models(c))
    existing = data.draw(existing_for(c))
    s = spec("llamabox", offload=data.draw(st.booleans()), strategy=data.draw(st.sampled_from(["binpack", "spread"])),
             replicas=data.draw(st.integers(1, 2)))
    plan = place(c, m, s, existing, plugins=PLUGINS)
    event(f"placed={plan.placed}" + (f" partial={bool(plan.replicas[0].parts[0].cpu_layers)}" if plan.placed else ""))
    if plan.placed:
        assert len(plan.replicas) == s.replicas
        assert_llamabox_rules(plan, m, s, c, existing)
    else:
        assert plan.replicas == () and plan.diagnosis is not None and plan.diagnosis.reasons
        if s.replicas == 1:
            assert not llama_feasible(m, s, c, existing), plan.diagnosis.message


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_same_input_same_plan_whatever_the_host_order(data):
    c = data.draw(clusters())
    runtime = data.draw(st.sampled_from(["vllm", "llamabox"]))
    m = data.draw(vllm_models(c) if runtime == "vllm" else llama_models(c))
    s = spec(runtime, strategy=data.draw(st.sampled_from(["binpack", "spread"])), replicas=data.draw(st.integers(1, 3)))
    first = place(c, m, s, plugins=PLUGINS)
    again = place(c, m, s, plugins=PLUGINS)
    shuffled = place(ClusterInventory(hosts=tuple(reversed(c.hosts))), m, s, plugins=PLUGINS)
    assert first == again == shuffled


def test_brute_force_itself_finds_layouts():
    """The oracles can say yes: a refused-means-infeasible check that never says yes proves nothing."""
    c = ClusterInventory(hosts=(host("a", 2, 24), host("b", 1, 24)))
    assert vllm_feasible(model(layers=4, layer_bytes=8 * GiB, ctx=2048), spec("vllm"), c)
    assert not vllm_feasible(model(layers=4, layer_bytes=30 * GiB, ctx=2048), spec("vllm"), c)
    assert llama_feasible(gguf_model(layers=6, layer_bytes=7 * GiB), spec("llamabox"), c)
    assert not llama_feasible(gguf_model(layers=12, layer_bytes=7 * GiB), spec("llamabox"), c)
