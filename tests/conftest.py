"""Shared fixtures. Helpers that make models, hosts, clusters and deployments live in tests/scenarios/build.py;
a cluster of real agents on loopback is agentd.testing.localcluster.LocalCluster."""

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
