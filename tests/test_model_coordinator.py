"""Issue 19 in the coordinator: deploy by catalog name from the hosts' reports, and free disk promised to
fetches that have not happened yet is never counted twice."""

from __future__ import annotations

import os

import pytest

from agentd.errors import InvalidInput, Unplaceable
from agentd.modelinfo import inspect_model
from agentd.testing.coordinator_world import World, host, hosts_of, spec
from agentd.types import HeldModel, HostInventory, ModelFile

DIGEST = "sha256:" + "e" * 64


def holding(h: dict, path: str) -> dict:
    size = os.path.getsize(path)
    copy = HeldModel(name="m", digest=DIGEST, path=path, size=size, info=inspect_model(path),
                     files=(ModelFile(name=os.path.basename(path), size=size, sha256="e" * 64),))
    return {**h, "models": [copy.model_dump(mode="json")], "model_dirs": [os.path.dirname(path)],
            "model_disk_free": 10 * size}


def with_free(h: dict, free: int, dirs: tuple[str, ...] = ("/var/lib/agentd/models",)) -> dict:
    return {**h, "model_disk_free": free, "model_dirs": list(dirs)}


async def test_two_deploys_never_count_on_the_same_free_disk(placer, models):
    size = os.path.getsize(models["tiny"])
    room = size + size // 2  # room for one copy, not two
    w = World(placer, [holding(host("a", gpu_gib=24, used_gib=23.99), models["tiny"]),
                       with_free(host("b", gpu_gib=24), room), with_free(host("c", gpu_gib=24), room)]).start()
    await w.coord.deploy(spec("one", "m"))
    await w.coord.deploy(spec("two", "m"))
    first, second = (w.state.assignments_for(n)[0] for n in ("one", "two"))
    assert first.model == f"m@{DIGEST}" and second.model == f"m@{DIGEST}"
    assert sorted(hosts_of(first) + hosts_of(second)) == ["b", "c"]  # the second did not reuse the first's room
    with pytest.raises(Unplaceable, match="too little free disk in its model directory"):
        await w.coord.deploy(spec("three", "m"))
    # Once b reports its copy, it holds the model: nothing is promised there any more.
    b = w.hosts["b"]
    held = HostInventory.model_validate(holding(host("b", gpu_gib=24), models["tiny"]))
    w.hosts["b"] = b.model_copy(update={"models": held.models})
    w.report("b")
    await w.coord.deploy(spec("three", "m"))
    assert hosts_of(w.state.assignments_for("three")[0]) == ["b"]


async def test_a_name_no_host_holds_says_where_it_looked(placer, models):
    w = World(placer, [with_free(host("a"), 1 << 30, ("/srv/models", "/data/hub"))]).start()
    with pytest.raises(InvalidInput, match=r"no host holds a model nope \(looked in a: /srv/models, /data/hub\)"):
        await w.coord.deploy(spec("x", "nope"))
    with pytest.raises(InvalidInput, match="relative paths are refused"):
        await w.coord.deploy(spec("x", "./m.gguf"))
