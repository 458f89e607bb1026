"""Code of earlier releases for tests that mix them with this one: a git worktree of a tag, run with this venv.

`code_env(root)` is the environment that makes an agent (LocalCluster.agent_env) import that code ahead of
the installed agentd.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINE_TAG = "v0.1.0"
BASELINE_COMMIT = "b6539ee"  # what v0.1.0 tags, for a clone that came without tags


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)


def have_history() -> bool:
    return (REPO / ".git").exists()


@contextlib.contextmanager
def release_worktree(path: Path, tag: str = BASELINE_TAG, commit: str = BASELINE_COMMIT) -> Iterator[Path]:
    """A detached worktree of `tag` (or `commit` where the clone lacks the tag) at `path`, removed after."""
    ref = tag if _git("rev-parse", "-q", "--verify", f"refs/tags/{tag}").returncode == 0 else commit
    added = _git("worktree", "add", "--detach", str(path), ref)
    if added.returncode != 0:
        raise RuntimeError(f"git worktree add {ref}: {added.stderr.strip()}")
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))
        _git("worktree", "prune")


def code_env(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(str(p) for p in (root, root / "plugins" / "llamabox",
                                                           root / "plugins" / "vllm"))}
