"""Owner-only files and directories, whatever the umask.

The Raft log holds the cluster secret, from which every model server's key is
derived, so anything agentd writes under its data directory must be readable
by the agentd user alone. Creating with an explicit mode is not enough on its
own (the mode is masked by the umask, and an older agentd or another tool may
have created the directory 0755), so directories are chmod'ed after mkdir and
`tighten_tree` repairs an older data directory on start.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# Public by design (docs/security.md, Files): certificates are not secrets.
PUBLIC_SUFFIXES = (".crt",)


def private_dir(path: Path) -> Path:
    """mkdir -p where every directory it creates, and the leaf, is 0700.

    mkdir's mode is masked by the umask, and `parents=True` gives the parents
    the default mode, so each created directory is chmod'ed. Existing parents
    (`/var/lib`, a test's tmp dir) are not agentd's and are left alone.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass
        os.chmod(d, PRIVATE_DIR)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def open_private(path: Path, flags: int) -> int:
    """os.open with O_CREAT and mode 0600 enforced by fchmod (an existing file keeps nothing wider)."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def touch_private(path: Path) -> Path:
    os.close(open_private(Path(path), os.O_WRONLY))
    return Path(path)


def tighten_tree(root: Path, *, public_suffixes: tuple[str, ...] = PUBLIC_SUFFIXES) -> list[str]:
    """Remove group and other bits from every directory and regular file under `root` that this user owns.

    Returns the paths changed, so the caller can log that it did so. Symbolic
    links are not followed (a link inside the data dir must not make agentd
    chmod a file elsewhere); files owned by another user and special files are
    left alone; certificates (`*.crt`) keep their read bits.
    """
    root = Path(root)
    uid = os.geteuid()
    changed: list[str] = []

    def fix(path: str, st: os.stat_result, want: int) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid or mode & ~want & 0o077 == 0:
            return
        try:
            os.chmod(path, mode & ~(0o077 & ~want), follow_symlinks=False)
        except (NotImplementedError, OSError):
            return
        changed.append(path)

    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return changed
    if not stat.S_ISDIR(top.st_mode):
        return changed
    fix(str(root), top, 0)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                fix(p, st, 0)
            elif stat.S_ISREG(st.st_mode):
                fix(p, st, 0o044 if name.endswith(public_suffixes) else 0)
    return changed
