from importlib.metadata import EntryPoint

import pytest

from agentd.errors import InvalidInput
from agentd.plugins import PluginManager, RuntimeInfo, hookimpl

GROUP = "agentd.plugins"


def test_builtin_plugins_load_through_entry_points():
    mgr = PluginManager.load()
    names = {p.name for p in mgr.loaded}
    assert {"vllm", "llamabox"} <= names
    # Registered through the installed distributions, exactly like a third-party plugin.
    dists = {p.name: p.distribution for p in mgr.loaded}
    assert dists["vllm"] == "agentd-vllm" and dists["llamabox"] == "agentd-llamabox"
    assert mgr.runtimes()["llamabox"].formats == ("gguf",)


def test_broken_plugin_is_reported_by_name_and_skipped():
    eps = [
        EntryPoint(name="broken", value="agentd_no_such_module_xyz:plugin", group=GROUP),
        EntryPoint(name="vllm", value="agentd_vllm.plugin", group=GROUP),
    ]
    mgr = PluginManager.load(entry_points_=eps)
    assert [p.name for p in mgr.loaded] == ["vllm"]
    assert [f.name for f in mgr.failures] == ["broken"]
    assert "ModuleNotFoundError" in mgr.failures[0].error


def test_allowlist_and_disable():
    assert {p.name for p in PluginManager.load(allow=["vllm"]).loaded} == {"vllm"}
    assert "vllm" not in {p.name for p in PluginManager.load(disable=["vllm"]).loaded}


def test_unknown_runtime_is_invalid_input_naming_the_alternatives():
    mgr = PluginManager.load()
    with pytest.raises(InvalidInput, match=r"unknown runtime 'sglang'.*llamabox"):
        mgr.runtime("sglang")


def test_third_party_runtime_registers_through_the_same_hooks():
    class SGLang:
        @hookimpl
        def agentd_runtime(self):
            return RuntimeInfo(name="sglang", formats=("safetensors",))

    mgr = PluginManager.load()
    mgr.register(SGLang(), name="sglang")
    assert "sglang" in mgr.runtimes()


def test_cli_env_allowlist_and_disable():
    from tests.conftest import run_cli

    proc = run_cli("plugins", "--json", env={"AGENTD_DISABLE_PLUGINS": "llamabox"})
    assert proc.returncode == 0, proc.stderr
    import json

    assert [p["name"] for p in json.loads(proc.stdout)["plugins"]] == ["vllm"]
    proc = run_cli("plugins", "--json", env={"AGENTD_PLUGINS": "llamabox"})
    assert [p["name"] for p in json.loads(proc.stdout)["plugins"]] == ["llamabox"]
