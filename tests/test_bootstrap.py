"""scripts/bootstrap says at once, and plainly, when the disk cannot hold what it would install (a CI run once
failed 95 s in, inside pip, with "No space left on device"). A `df` on PATH reports the free space."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bootstrap"


def run(tmp_path: Path, free_mib: int, *args: str) -> subprocess.CompletedProcess[str]:
    checkout = tmp_path / "checkout"  # a fresh one: no environment installed yet
    (checkout / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPT, checkout / "scripts" / "bootstrap")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\necho 'Filesystem 1048576-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/vda 257000 250000 {free_mib} 99% /'\n")
    df.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp),
           "PYTHON": str(tmp_path / "no-python")}  # past the check, it stops at its first step
    return subprocess.run(["bash", str(checkout / "scripts" / "bootstrap"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_short_disk_is_refused_before_anything_is_installed_naming_what_it_needs(tmp_path):
    r = run(tmp_path, 287, "--test", "--vllm", "--sglang")
    assert r.returncode == 1
    assert f"287 MiB free on the disk that holds {tmp_path / 'checkout'}; this needs at least 8300 MiB" in r.stderr
    assert not (tmp_path / "checkout" / ".venv").exists()
    r = run(tmp_path, 4399, "--vllm")  # llama.cpp 600 + vLLM 3800; no tests, so nothing under $TMPDIR
    assert r.returncode == 1 and "needs at least 4400 MiB" in r.stderr


def test_enough_room_passes_the_check(tmp_path):
    r = run(tmp_path, 4400, "--vllm")
    assert r.returncode != 0 and "MiB free" not in r.stderr  # it went on, to the missing interpreter
    assert "no-python" in r.stderr
