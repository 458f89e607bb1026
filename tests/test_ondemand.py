"""Serving on demand without processes (issue 21 items 1-2): the replicated records, the coordinator's idle
decision and wake, and the proxy's hold. The same with real agents and llama-servers: test_ondemand_e2e.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agentd.api.http import HttpOptions, ModelCard, make_http_app
from agentd.api.ondemand import Activity, WakeError, Waker
from agentd.cluster.state import ClusterState, delete_command, deploy_command, idle_command, wake_command
from agentd.coordinator import InstanceReport
from agentd.errors import Unplaceable
from agentd.testing.coordinator_world import World, host, spec
from agentd.types import DeploymentSpec

# ---------------------------------------------------------------------- the records


def _apply(world: World, command: bytes):
    return asyncio.run(world.raft.propose(command))


def _deployed(world: World, name: str = "m", idle_unload: float = 2.0, **kw) -> None:
    asyncio.run(world.coord.deploy(spec(name, kw.pop("model"), idle_unload=idle_unload, **kw)))


def test_idle_and_wake_are_format_2_and_round_trip_through_a_snapshot(placer, models):
    w = World(placer, [host("a")]).start()
    _deployed(w, model=models["tiny"])
    assert json.loads(idle_command("m"))["v"] == 2
    assert json.loads(wake_command("m", []))["v"] == 2
    assert _apply(w, idle_command("m")).ok
    assert w.state.idle == {"m"} and not w.state.assignments_for("m")
    again = _apply(w, idle_command("m"))
    assert not again.ok and "idle already" in again.message
    copy = ClusterState()
    copy.restore(w.state.snapshot())
    assert copy.idle == {"m"}
    # A deployment that never went idle writes nothing new (older readers see the snapshot they know).
    assert "idle" not in json.loads(ClusterState().snapshot())
    assert _apply(w, delete_command("m")).ok
    assert w.state.idle == set()


def test_a_spec_without_idle_unload_is_written_as_before():
    s = DeploymentSpec(name="m", model="/m.gguf", runtime="llamabox")
    assert "idle_unload" not in json.dumps(json.loads(deploy_command(s, []))["spec"])
    assert json.loads(deploy_command(s, []))["v"] == 1
    assert json.loads(deploy_command(s.model_copy(update={"idle_unload": 5.0}), []))["v"] == 2
    with pytest.raises(ValueError):
        DeploymentSpec(name="m", model="/m.gguf", runtime="llamabox", idle_unload=-1)


# ---------------------------------------------------------------------- the coordinator


def test_unloaded_after_its_idle_time_only_when_every_proxy_reported_fresh(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    w.coord.idle_report_max_age = 3.0
    _deployed(w, model=models["tiny"])
    _deployed(w, "keep", model=models["tiny"], idle_unload=0)

    def tick() -> list[str]:
        running: dict[str, list[InstanceReport]] = {}
        for a in w.state.incarnations():
            for k, p in enumerate(a.plan.parts):
                running.setdefault(p.host, []).append(InstanceReport(
                    instance_id=a.instance_id, deployment=a.deployment, replica=a.replica, generation=a.generation,
                    part=k, host=p.host, role=p.role, state="RUNNING"))
        w.report(instances=running)
        return [d for d in asyncio.run(w.coord.tick()) if d.startswith("deployment")]

    w.coord.on_activity("a", {})
    w.coord.on_activity("b", {"m": (0.0, 0)})
    assert not tick()
    w.clock.advance(1.5)
    w.coord.on_activity("a", {})
    w.coord.on_activity("b", {"m": (0.5, 1)})  # b's proxy forwards a request for it right now
    w.clock.advance(1.0)
    assert not tick()
    w.clock.advance(5.0)
    w.coord.on_activity("a", {})
    assert not tick(), "b's last activity report is stale: no unload on a guess"
    w.coord.on_activity("b", {"m": (2.5, 0)})
    decisions = tick()
    assert len(decisions) == 1 and decisions[0].startswith("deployment m: no request for 2.5s"), decisions
    assert w.state.idle == {"m"} and not w.state.assignments_for("m")
    assert w.state.assignments_for("keep"), "a deployment without idle_unload is never unloaded"
    # Scaling an idle deployment places nothing now: the next wake places that many.
    asyncio.run(w.coord.scale("m", 1))
    assert w.state.idle == {"m"} and not w.state.assignments_for("m")


def test_wake_places_once_on_what_fits_now_or_says_why_not(placer, models):
    w = World(placer, [host("a"), host("b")]).start()
    _deployed(w, model=models["tiny"])
    assert asyncio.run(w.coord.wake("m")) == (None, 0), "not idle: nothing to do"
    _apply(w, idle_command("m"))
    _deployed(w, "other", model=models["tiny"], idle_unload=0, pin=({"host": "a"},))

    async def many() -> list:
        return await asyncio.gather(*(w.coord.wake("m") for _ in range(5)))

    results = asyncio.run(many())
    assert sum(1 for r, _ in results if r is not None) == 1, results
    assert [p.host for a in w.state.assignments_for("m") for p in a.plan.parts] == ["b"]
    assert sum(1 for c in w.raft.proposed if c["op"] == "deployment.wake") == 1
    # No room left anywhere: Unplaceable with the diagnosis, nothing committed.
    _apply(w, idle_command("m"))
    _deployed(w, "third", model=models["tiny"], idle_unload=0, pin=({"host": "b"},))
    with pytest.raises(Unplaceable):
        asyncio.run(w.coord.wake("m"))
    assert w.state.idle == {"m"} and not w.state.assignments_for("m")


# ---------------------------------------------------------------------- the proxy's side


def test_activity_counts_in_flight_and_reports_the_first_request_at_once():
    now = [100.0]
    firsts: list[int] = []
    a = Activity(clock=lambda: now[0], on_first=lambda: firsts.append(1))
    with a.track("m"):
        now[0] += 2
        assert a.snapshot() == {"m": (2.0, 1)}
        with a.track("m"):
            pass
    now[0] += 3
    assert a.snapshot() == {"m": (3.0, 0)}
    assert len(firsts) == 1


def test_concurrent_holds_make_one_wake_and_a_failed_wake_tells_no_secrets():
    async def scenario() -> None:
        calls: list[str] = []
        ready = asyncio.Event()

        async def wake(model: str) -> None:
            calls.append(model)
            await asyncio.sleep(0.05)
            ready.set()

        w = Waker(wake=wake, ready=lambda m: _true_when(ready), timeout=5, poll=0.01)
        await asyncio.gather(*(w.hold("m", idle=True) for _ in range(20)))
        assert calls == ["m"] and w.held == 0

        async def fails(model: str) -> None:
            raise Unplaceable("0/2 hosts: host gpu-7 had 0.1 GiB free (tenant x uses 23 GiB)")

        w = Waker(wake=fails, ready=lambda m: _true_when(ready), timeout=5)
        with pytest.raises(WakeError) as info:
            await w.hold("m", idle=True)
        assert info.value.status == 503 and "gpu-7" not in info.value.message and "tenant" not in info.value.message

        never = asyncio.Event()
        w = Waker(wake=wake, ready=lambda m: _true_when(never), timeout=0.2, queue=1, poll=0.01)
        first = asyncio.ensure_future(w.hold("m", idle=False))
        await asyncio.sleep(0.02)
        with pytest.raises(WakeError) as full:
            await w.hold("m", idle=False)
        assert full.value.code == "wake_queue_full"
        with pytest.raises(WakeError) as late:
            await first
        assert late.value.code == "model_loading"

    asyncio.run(scenario())


async def _true_when(event: asyncio.Event) -> bool:
    return event.is_set()


def test_the_http_app_holds_a_request_for_an_idle_model_and_answers_503_in_openai_format():
    class Provider:
        metrics_registry = None

        def __init__(self) -> None:
            self.idle = True

        def alive(self) -> bool:
            return True

        def ready(self) -> tuple[bool, str]:
            return True, ""

        def routes(self, model: str) -> list:
            return []

        def models(self) -> list[ModelCard]:
            return [ModelCard(id="m", replicas=1, on_demand=True, idle=self.idle)]

        def verify_api_key(self, key: str):
            return None

    async def scenario() -> None:
        provider = Provider()

        async def wake(model: str) -> None:
            raise Unplaceable("host a-secret-host is full")

        waker = Waker(wake=wake, ready=lambda m: _false(), timeout=1)
        app = make_http_app(provider, options=HttpOptions(require_api_key=False), waker=waker)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
            body = await resp.json()
            assert resp.status == 503 and body["error"]["code"] == "model_unavailable"
            assert "a-secret-host" not in body["error"]["message"]
            assert resp.headers["Retry-After"]
            models = await (await client.get("/v1/models")).json()
            assert models["data"][0]["agentd"]["state"] == "idle"

    asyncio.run(scenario())


async def _false() -> bool:
    return False



def test_held_requests_and_wakes_are_metrics():
    from agentd.metrics import Metrics

    metrics = Metrics("n")

    async def scenario() -> None:
        async def wake(model: str) -> None:
            await asyncio.sleep(0.02)

        w = Waker(wake=wake, ready=lambda m: _true(), timeout=5, metrics=metrics)
        await asyncio.gather(*(w.hold("m", idle=True) for _ in range(3)))

    asyncio.run(scenario())
    text = metrics.render().decode()
    assert 'agentd_requests_held{model="m"} 0.0' in text
    assert 'agentd_wake_hold_seconds_count{model="m"} 3.0' in text
    assert 'agentd_wakes_total{model="m",result="woken"} 1.0' in text


async def _true() -> bool:
    return True


# ---------------------------------------------------------------------- wake: holders first, failures recorded


async def test_wake_prefers_a_host_that_holds_the_model_files_and_records_a_failed_wake(placer, models,
                                                                                           tmp_path):
    """Issue 19's placement scoring applies on wake as on deploy: the holder, not the first host with room;
    with the holder full, any host that fits (it will fetch). An unplaceable wake leaves its diagnosis with
    the leader for `agentd ps`/`ls`."""
    import os

    from agentd.modelinfo import inspect_model
    from agentd.types import HeldModel, ModelFile

    digest = "sha256:" + "e" * 64

    def holding(h: dict, path: str) -> dict:  # a host whose model directory holds catalog model "m"
        size = os.path.getsize(path)
        copy = HeldModel(name="m", digest=digest, path=path, size=size, info=inspect_model(path),
                         files=(ModelFile(name=os.path.basename(path), size=size, sha256="e" * 64),))
        return {**h, "models": [copy.model_dump(mode="json")], "model_dirs": [os.path.dirname(path)],
                "model_disk_free": 10 * size}

    def with_free(h: dict, free: int) -> dict:
        return {**h, "model_disk_free": free, "model_dirs": ["/var/lib/agentd/models"]}

    room = 64 << 20
    w = World(placer, [with_free(host("a", gpu_gib=24), room), with_free(host("b", gpu_gib=24), room),
                       holding(host("c", gpu_gib=24), models["tiny"])]).start()
    w.coord.idle_report_max_age = 3.0
    import shutil

    other = shutil.copy(models["tiny"], tmp_path / "other.gguf")
    await w.coord.deploy(spec("path", str(other)))  # a file no host reports holding: no holder to prefer
    assert [p.host for p in w.state.assignments_for("path")[0].plan.parts] != ["c"]
    await w.coord.deploy(spec("m", "m", idle_unload=2.0))
    assert w.state.assignments_for("m")[0].model == f"m@{digest}"
    await w.raft.propose(idle_command("m"))
    result, _ = await w.coord.wake("m")
    assert result is not None and [p.host for p in w.state.assignments_for("m")[0].plan.parts] == ["c"]
    # The holder full (cordoned): the wake goes to a host that fits now, and would fetch the files there.
    await w.raft.propose(idle_command("m"))
    from agentd.cluster.maintenance import Cordon
    from agentd.cluster.state import cordon_command

    await w.raft.propose(cordon_command(Cordon(host="c")))
    await w.coord.wake("m")
    assert [p.host for p in w.state.assignments_for("m")[0].plan.parts] in (["a"], ["b"])
    # Nowhere: Unplaceable, and the full diagnosis stays with the leader until a wake or deploy succeeds.
    await w.raft.propose(idle_command("m"))
    for h in ("a", "b"):
        await w.raft.propose(cordon_command(Cordon(host=h)))
    with pytest.raises(Unplaceable):
        await w.coord.wake("m")
    assert "cordoned" in w.coord.wake_failures["m"][1]
    from agentd.cluster.state import uncordon_command

    await w.raft.propose(uncordon_command("c", None))
    await w.coord.wake("m")
    assert "m" not in w.coord.wake_failures
