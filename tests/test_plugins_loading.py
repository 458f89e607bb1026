from importlib.metadata import EntryPoint

import pytest

from agentd.errors import InvalidInput, PluginError
from agentd.plugins import PluginManager, RuntimeInfo, hookimpl

GROUP = "agentd.plugins"


def test_builtin_plugins_load_through_entry_points():
    mgr = PluginManager.load()
    names = {p.name for p in mgr.loaded}
    assert {"vllm", "llamabox", "sglang"} <= names
    # Registered through the installed distributions, exactly like a third-party plugin.
    dists = {p.name: p.distribution for p in mgr.loaded}
    assert dists["vllm"] == "agentd-vllm" and dists["llamabox"] == "agentd-llamabox"
    assert dists["sglang"] == "agentd-sglang" and mgr.failures == []
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
    with pytest.raises(InvalidInput, match=r"unknown runtime 'tgi'.*llamabox"):
        mgr.runtime("tgi")


def test_third_party_runtime_registers_through_the_same_hooks():
    class SGLang:
        @hookimpl
        def agentd_runtime(self):
            return RuntimeInfo(name="sglang", formats=("safetensors",))

    mgr = PluginManager.load(allow=["vllm", "llamabox"])  # without the installed sglang plugin
    mgr.register(SGLang(), name="sglang")
    assert "sglang" in mgr.runtimes()


def test_cli_env_allowlist_and_disable():
    from tests.conftest import run_cli

    proc = run_cli("plugins", "--json", env={"AGENTD_DISABLE_PLUGINS": "llamabox,sglang"})
    assert proc.returncode == 0, proc.stderr
    import json

    assert [p["name"] for p in json.loads(proc.stdout)["plugins"]] == ["vllm"]
    proc = run_cli("plugins", "--json", env={"AGENTD_PLUGINS": "llamabox"})
    assert [p["name"] for p in json.loads(proc.stdout)["plugins"]] == ["llamabox"]


# --------------------------------------------------------------------------- the plugin API version and unknown hooks

def _plugin_module(tmp_path, monkeypatch, name: str, body: str) -> EntryPoint:
    """A third-party plugin module written to disk and named by an entry point, as pip would install it."""
    (tmp_path / f"{name}.py").write_text("from agentd.plugins.api import RuntimeInfo, hookimpl\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return EntryPoint(name=name, value=name, group=GROUP)


RUNTIME = "@hookimpl\ndef agentd_runtime():\n    return RuntimeInfo(name={name!r}, formats=('gguf',))\n"


def test_a_plugin_for_another_major_api_version_is_refused_naming_both(tmp_path, monkeypatch):
    from agentd.plugins.api import API_VERSION

    major = int(API_VERSION.split(".")[0])
    old = _plugin_module(tmp_path, monkeypatch, "agentd_test_old",
                         f'AGENTD_PLUGIN_API = "{major + 1}.0"\n' + RUNTIME.format(name="old"))
    ok = EntryPoint(name="vllm", value="agentd_vllm.plugin", group=GROUP)
    mgr = PluginManager.load(entry_points_=[old, ok])
    assert [p.name for p in mgr.loaded] == ["vllm"]
    assert [f.name for f in mgr.failures] == ["agentd_test_old"]
    err = mgr.failures[0].error
    assert f"written for plugin API {major + 1}.0" in err and f"offers {API_VERSION}" in err
    assert "agentd_test_old" in err
    assert "old" not in mgr.runtimes()  # nothing of it was registered


def test_a_plugin_for_a_newer_minor_version_loads_with_a_warning(tmp_path, monkeypatch, caplog):
    from agentd.plugins.api import API_VERSION

    major, minor = (int(x) for x in API_VERSION.split("."))
    ep = _plugin_module(tmp_path, monkeypatch, "agentd_test_newer",
                        f'AGENTD_PLUGIN_API = "{major}.{minor + 1}"\n' + RUNTIME.format(name="newer"))
    with caplog.at_level("WARNING", logger="agentd.plugins.manager"):
        mgr = PluginManager.load(entry_points_=[ep])
    assert [p.name for p in mgr.loaded] == ["agentd_test_newer"] and mgr.failures == []
    assert "newer" in mgr.runtimes()
    assert any("newer plugin API" in r.getMessage() for r in caplog.records)


def test_a_plugin_that_declares_no_api_version_or_a_malformed_one_is_refused(tmp_path, monkeypatch):
    none = _plugin_module(tmp_path, monkeypatch, "agentd_test_undeclared", RUNTIME.format(name="a"))
    bad = _plugin_module(tmp_path, monkeypatch, "agentd_test_badversion",
                         'AGENTD_PLUGIN_API = "one"\n' + RUNTIME.format(name="b"))
    mgr = PluginManager.load(entry_points_=[none, bad])
    assert mgr.loaded == []
    errors = {f.name: f.error for f in mgr.failures}
    assert "declares no plugin API version" in errors["agentd_test_undeclared"]
    assert "'one'" in errors["agentd_test_badversion"]


def test_a_misspelled_hook_is_refused_by_name_and_the_others_still_load(tmp_path, monkeypatch):
    typo = _plugin_module(tmp_path, monkeypatch, "agentd_test_typo",
                          'AGENTD_PLUGIN_API = "1.0"\n' + RUNTIME.format(name="typo")
                          + "@hookimpl\ndef agentd_constrains(runtime, model, spec):\n    return None\n")
    eps = [typo, EntryPoint(name="vllm", value="agentd_vllm.plugin", group=GROUP),
           EntryPoint(name="llamabox", value="agentd_llamabox.plugin", group=GROUP)]
    mgr = PluginManager.load(entry_points_=eps)
    assert sorted(p.name for p in mgr.loaded) == ["llamabox", "vllm"]
    assert [f.name for f in mgr.failures] == ["agentd_test_typo"]
    assert "unknown hook(s) agentd_constrains" in mgr.failures[0].error
    # It was taken out again whole: its valid hooks are not called either, and later checks pass.
    assert "typo" not in mgr.runtimes()
    mgr.pm.check_pending()


def test_an_in_process_plugin_with_an_unknown_hook_is_refused_too():
    class Typo:
        @hookimpl
        def agentd_lauch(self, assignment, part_index, ctx):
            return None

    mgr = PluginManager.load(entry_points_=[])
    with pytest.raises(PluginError, match=r"unknown hook.*agentd_lauch"):
        mgr.register(Typo(), name="typo")
    assert mgr.loaded == [] and mgr.pm.get_plugin("typo") is None


def test_each_installed_plugin_declares_the_same_api_version_in_its_metadata_and_its_module():
    import importlib
    from importlib.metadata import entry_points

    from agentd.cli.basic import declared_plugin_api

    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    assert {"vllm", "llamabox"} <= set(eps)
    for name, ep in eps.items():
        module = importlib.import_module(ep.value.partition(":")[0])
        assert declared_plugin_api(ep.dist) == module.AGENTD_PLUGIN_API, name
