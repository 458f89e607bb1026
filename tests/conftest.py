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


def pytest_collection_modifyitems(config, items):
    """The `oracle` group (tests/test_llamacpp_oracle.py: the whole llama.cpp projection grid, live) runs
    only when asked: `-m oracle` (or any marker expression naming it), or AGENTD_ORACLE=1 as scripts/test
    sets it."""
    if os.environ.get("AGENTD_ORACLE") == "1" or "oracle" in (config.getoption("markexpr") or ""):
        return
    dropped = [i for i in items if i.get_closest_marker("oracle")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not i.get_closest_marker("oracle")]
