"""Issue 19 part 3, the pure half: placement prefers hosts holding the model's files and keeps fetches off
full disks; which parts need the files is the runtime's (agentd_model_file_roles)."""

from __future__ import annotations

import pytest

from agentd.placement import place
from agentd.types import HeldModel, ModelFile
from tests.scenarios.build import GiB, builtin_plugins, cluster, gguf_model, host, model, spec

DIGEST = "sha256:" + "d" * 64
REF = f"m@{DIGEST}"


@pytest.fixture(scope="module")
def plugins():
    return builtin_plugins()


def holding(h, info, size=20 * GiB, free=None):
    copy = HeldModel(name="m", digest=DIGEST, path="/models/m", size=size,
                     files=(ModelFile(name="m.gguf", size=size, sha256="d" * 64),), info=info)
    return h.model_copy(update={"models": (copy,), "model_disk_free": free})


def with_free(h, free):
    return h.model_copy(update={"model_disk_free": free})


def test_binpack_takes_the_fuller_host_without_a_catalog_and_the_holder_with_one(plugins):
    info = gguf_model(layers=8, layer_bytes=1 * GiB)
    empty, fuller = host("a", n=1, total_gib=80), host("b", n=1, total_gib=80, used={0: 40})
    s = spec("llamabox").model_copy(update={"model": REF})
    plain = place(cluster(empty, fuller), info, s, plugins=plugins)
    assert [p.host for p in plain.replicas[0].parts] == ["b"]  # binpack: the fuller host
    held = place(cluster(holding(empty, info, free=100 * GiB), with_free(fuller, 100 * GiB)), info, s,
                 plugins=plugins)
    assert [p.host for p in held.replicas[0].parts] == ["a"]  # the holder first


def test_a_host_that_would_fetch_needs_room_in_its_model_dir(plugins):
    info = gguf_model(layers=8, layer_bytes=1 * GiB)
    s = spec("llamabox").model_copy(update={"model": REF})
    # The holder is full (GPU busy); b must fetch 20 GiB and has 5 GiB free: nowhere to go.
    busy = holding(host("a", n=1, total_gib=80, used={0: 79}), info, free=1 * GiB)
    plan = place(cluster(busy, with_free(host("b", n=1, total_gib=80), 5 * GiB)), info, s, plugins=plugins)
    assert not plan.placed
    assert "too little free disk in its model directory" in plan.diagnosis.message
    assert "needs 20.00 GiB, 5.00 GiB free" in str(plan.diagnosis.model_dump())
    # With room it fetches.
    plan = place(cluster(busy, with_free(host("b", n=1, total_gib=80), 50 * GiB)), info, s, plugins=plugins)
    assert plan.placed and [p.host for p in plan.replicas[0].parts] == ["b"]


def test_llamabox_rpc_hosts_need_no_disk_for_the_model(plugins):
    # 30 GiB of layers: the holder's main (a, 20 GiB GPU) offloads to an rpc-server on b, whose disk is full.
    info = gguf_model(layers=30, layer_bytes=1 * GiB)
    s = spec("llamabox").model_copy(update={"model": REF})
    a = holding(host("a", n=1, total_gib=20), info, free=0)
    b = with_free(host("b", n=1, total_gib=20), 0)
    plan = place(cluster(a, b), info, s, plugins=plugins)
    assert plan.placed
    assert [(p.host, p.role) for p in plan.replicas[0].parts] == [("a", "main"), ("b", "rpc")]


def test_vllm_workers_need_the_files_too(plugins):
    info = model(layers=32, layer_bytes=4 * GiB)  # 128 GiB: two hosts of one 80 GiB GPU, PP=2
    s = spec("vllm").model_copy(update={"model": REF})
    a = holding(host("a", n=1, total_gib=80), info, free=0)
    b = with_free(host("b", n=1, total_gib=80), 0)
    plan = place(cluster(a, b), info, s, plugins=plugins)
    assert not plan.placed and "too little free disk" in plan.diagnosis.message
    plan = place(cluster(a, with_free(b, 500 * GiB)), info, s, plugins=plugins)
    assert plan.placed and {p.host for p in plan.replicas[0].parts} == {"a", "b"}
