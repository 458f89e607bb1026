"""Whether this host has SGLang, and its version (agentd_installed): the Python that would run
`-m sglang.launch_server` has an `sglang` distribution. Read from its metadata, never imported."""

from __future__ import annotations

import os
from pathlib import Path

from agentd.plugins.api import BinaryNotUsable, InstalledRuntime, find_binary, hookimpl
from agentd_sglang.process import PYTHON_VARIABLE

NAME = "sglang"


def sglang_version(python: str) -> str | None:
    env = Path(python).parent.parent  # a venv's bin/python links to the base interpreter: keep the venv
    for info in sorted(env.glob("lib/python3*/site-packages/sglang-*.dist-info")):
        return info.name[len("sglang-"):-len(".dist-info")]
    return None


@hookimpl
def agentd_installed(settings):
    try:
        python = find_binary(os.environ.get(PYTHON_VARIABLE, ""), ("python3", "python"), setting=PYTHON_VARIABLE)
    except BinaryNotUsable:
        return None
    version = sglang_version(python)
    return None if version is None else InstalledRuntime(NAME, version)
