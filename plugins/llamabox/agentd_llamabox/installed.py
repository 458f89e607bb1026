"""Whether this host has llama-box / llama-server, and its version (agentd_installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from agentd.plugins.api import BinaryNotUsable, InstalledRuntime, hookimpl
from agentd_llamabox.process import main_binary

NAME = "llamabox"
_VERSION = re.compile(r"version:? *(\S+)")


def binary_version(binary: str, timeout: float = 5.0) -> str:
    """`llama-server --version` prints "version: 0.6.0-dev (build 0, ...)" (llama-box: "version: v0.0.140"); ""
    when it prints nothing we can read or does not answer in time."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = _VERSION.search(out.stdout + out.stderr)
    return m.group(1) if m else ""


@hookimpl
def agentd_installed(settings):
    try:
        binary = main_binary(settings)
    except BinaryNotUsable:
        return None
    path = binary if "/" in binary else shutil.which(binary)  # a configured value is returned unchecked
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return None
    return InstalledRuntime(NAME, binary_version(path))
