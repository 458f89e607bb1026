"""The shipped unit parses with systemd's own checker and keeps the properties operators rely on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.config import Settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "agentd.service"
ENV_EXAMPLE = ROOT / "systemd" / "agentd.env.example"


def directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values, keeping repeated keys (DeviceAllow=) that configparser would merge."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def verify(unit_text: str, tmp_path: Path) -> list[str]:
    """Problems `systemd-analyze verify` finds in the unit (it exits 0 on mere warnings, so read stderr too)."""
    # verify needs ExecStart's binary to exist: point it at this venv's agentd, keep everything else.
    agentd = Path(sys.executable).with_name("agentd")
    path = tmp_path / "agentd.service"
    path.write_text(re.sub(r"^ExecStart=/usr/local/bin/agentd", f"ExecStart={agentd}", unit_text, flags=re.M))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60)
    problems = [ln for ln in proc.stderr.splitlines() if "agentd.service" in ln]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return problems


@pytest.fixture
def analyzer():
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing in CI: scripts/bootstrap --test installs Debian's systemd package")
        pytest.skip("systemd-analyze not installed (apt-get install systemd); CI runs this test")


def test_unit_passes_systemd_analyze_verify(analyzer, tmp_path):
    assert verify(UNIT.read_text(), tmp_path) == []


def test_the_verify_check_catches_mistakes(analyzer, tmp_path):
    broken = UNIT.read_text().replace("KillMode=process", "KillMode=processs").replace("TasksMax=", "TasksMaxx=")
    problems = verify(broken, tmp_path)
    assert any("processs" in p for p in problems) and any("TasksMaxx" in p for p in problems)


def test_unit_keeps_model_servers_across_restarts_and_allows_gpus():
    d = directives(UNIT.read_text())
    assert d["Service.Type"] == ["notify"]
    assert d["Service.ExecStart"] == ["/usr/local/bin/agentd serve"]
    assert d["Service.KillMode"] == ["process"], "control-group or mixed would kill model servers on restart"
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.WatchdogSec"] and d["Service.RestartKillSignal"] == ["SIGUSR2"]
    assert d["Service.EnvironmentFile"] == ["-/etc/agentd/agentd.env"]
    assert d["Service.StateDirectory"] == ["agentd"]
    allowed = {v.split()[0] for v in d["Service.DeviceAllow"]}
    assert {"char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "char-nvidia-caps"} <= allowed
    assert "Service.PrivateDevices" not in d, "PrivateDevices hides the GPUs"
    assert "Service.PrivateTmp" not in d, "a private /tmp is torn down under surviving model servers"
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_every_variable_in_the_env_example_is_a_setting():
    names = re.findall(r"^#?(AGENTD_[A-Z_]+)=", ENV_EXAMPLE.read_text(), flags=re.M)
    assert len(names) >= 5
    fields = {f.upper() for f in Settings.model_fields}
    assert [n for n in names if n.removeprefix("AGENTD_") not in fields] == []
