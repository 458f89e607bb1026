"""Shared fixtures. Helpers that make models, hosts, clusters and deployments live in tests/scenarios/build.py;
a cluster of real agents on loopback is agentd.testing.localcluster.LocalCluster. No test module imports another
(tests/test_no_cross_test_imports.py): what several share is a fixture here or a helper in agentd/testing/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch, tmp_path):
    """No test reads the machine's /etc/agentd or the developer's AGENTD_* variables."""
    for key in list(os.environ):
        if key.startswith("AGENTD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AGENTD_CONFIG", str(tmp_path / "absent-but-allowed.toml"))
    (tmp_path / "absent-but-allowed.toml").write_text("")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real `agentd` entry point in a subprocess, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
    )


# ---------------------------------------------------------------------- fixtures shared by several test modules
# (no test module imports another: tests/test_no_cross_test_imports.py). Their helpers live in agentd/testing/;
# a module that defines a fixture of the same name uses its own. Imports are inside the fixtures, so that a run of
# one pure test does not load gRPC.


@pytest.fixture(scope="module")
def placer():
    """The real placement with the installed runtime plugins."""
    from agentd.placement import Placer
    from agentd.plugins import PluginManager

    return Placer(PluginManager.load())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """For agentd.testing.coordinator_world: a 4-layer tiny GGUF (one fits a 0.272 GiB GPU) and an 8-layer,
    hidden-256 one that does not and is split main + rpc."""
    from agentd.testing.gguf import write_tiny_llama_gguf

    d = tmp_path_factory.mktemp("models")
    return {"tiny": str(write_tiny_llama_gguf(d / "tiny.gguf")),
            "split": str(write_tiny_llama_gguf(d / "split.gguf", n_layers=8, hidden=256, ffn=512))}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """For agentd.testing.control_world: the 4-layer tiny GGUF."""
    from agentd.testing.gguf import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
async def agents(placer):
    """agentd.testing.control_world's agents on real gRPC servers: a leads, b follows; a knows both hosts'
    inventories (one 0.272 GiB GPU each)."""
    from agentd.testing.control_world import Agent
    from agentd.testing.localcluster import simulated_host
    from agentd.types import HostInventory

    a, b = Agent("a", placer), Agent("b", placer)
    for x in (a, b):
        await x.server.start()
    a.lead()
    b.follow(a)
    for name in ("a", "b"):
        a.coordinator.on_report(HostInventory.model_validate(simulated_host(name, gpus=1, gpu_gib=0.272)), [])
    yield a, b
    for x in (a, b):
        await x.close()


@pytest.fixture
def toy(tmp_path):
    """agentd.testing.toy_runtime's plugin, writing under tmp_path."""
    from agentd.testing.toy_runtime import Toy

    return Toy(tmp_path)


@pytest.fixture
def plugins(toy):
    """A plugin manager holding only the toy runtime."""
    from agentd.plugins import PluginManager

    pm = PluginManager()
    pm.register(toy, name="toy")
    return pm


@pytest.fixture(scope="module")
def release_0_1_0(tmp_path_factory):
    """A worktree of v0.1.0 (agentd.testing.releases): its agentd and its plugins, run with this venv's packages.
    Run it with LocalCluster.agent_env[name] = code_env(path)."""
    from agentd.testing.releases import have_history, release_worktree

    if not have_history():
        if os.environ.get("CI") == "true":
            pytest.fail("the upgrade tests need the git history (the v0.1.0 tag)")
        pytest.skip("not a git checkout: the v0.1.0 code is not at hand")
    with release_worktree(tmp_path_factory.mktemp("release") / "v0.1.0") as path:
        yield path


@pytest.fixture(scope="session")
def guard_library() -> Path:
    """The instance guard's built library (agentd/security/guard.c); the test skips, saying why, where it cannot
    be built (no C compiler)."""
    from agentd.security import guard

    try:
        return guard.library()
    except guard.Unavailable as exc:
        pytest.skip(f"the instance guard cannot be built here: {exc}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A LocalCluster that the test body made and did not stop (a failure outside `with`, a forgotten stop()) is
    stopped here, with everything its agents started: its model servers would load every later test. Clusters
    made before the body (by fixtures) are their fixtures' business, even when the body restarts their agents."""
    before = _localcluster().last_serial() if _localcluster() else 0
    try:
        return (yield)
    finally:
        lc = _localcluster()
        for serial, cluster in sorted(lc.STARTED.items()) if lc else ():
            if serial > before:
                cluster.stop(timeout=10)


def _localcluster():
    """agentd.testing.localcluster where the session imported it (else no cluster exists, and gRPC stays unloaded)."""
    return sys.modules.get("agentd.testing.localcluster")


# Groups that run only when asked: marker -> the variable scripts/test sets to include them.
OPT_IN_GROUPS = {"oracle": "AGENTD_ORACLE", "vllm_multihost": "AGENTD_VLLM_MULTIHOST"}


def pytest_collection_modifyitems(config, items):
    """The `oracle` group (tests/test_llamacpp_oracle.py: the whole llama.cpp projection grid, live) and the
    `vllm_multihost` group (tests/test_vllm_multihost.py: Ray and vLLM across two addresses, GBs and minutes) run
    only when asked: `-m oracle` (or any marker expression naming the group), or AGENTD_ORACLE=1 /
    AGENTD_VLLM_MULTIHOST=1 as scripts/test sets them."""
    markexpr = config.getoption("markexpr") or ""
    for marker, var in OPT_IN_GROUPS.items():
        if os.environ.get(var) == "1" or marker in markexpr:
            continue
        dropped = [i for i in items if i.get_closest_marker(marker)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if not i.get_closest_marker(marker)]
