"""Temporary files and staging folders: named after their owner, locked while it lives, removed once orphaned.

Every command writes whole files through a temporary file or a staging folder beside their destination and
renames them into place. A process killed outright (SIGKILL, a power loss) runs no cleanup, and what it left
(a staging folder with the model twice, a half-written checkpoint of hundreds of MB) stayed forever. Each such
entry is named ``<host>_<pid>`` (:func:`owner_tag`) and its owner holds an exclusive ``flock`` on it while it
lives, so :func:`remove_orphans` can tell the left-behind from the in-use: by the lock, which is released with
the process however it ends and is seen across PID namespaces (containers sharing a host name), not by the PID
alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["claim", "owner_tag", "remove_orphans", "staging_folder"]

# staging folders ".<kind>-<host>_<pid>-<random>" (export, extract), and atomic_write's temporary files
# ".<artifact>.<host>_<pid>-<random>.tmp"
_STAGING = re.compile(r"\.(?:export|extract)-(?P<host>\w+)_(?P<pid>\d{1,10})-\w+")
_TEMPORARY = re.compile(r"\..+\.(?P<host>\w+)_(?P<pid>\d{1,10})-\w+\.tmp")


def owner_tag() -> str:
    """``<host>_<pid>``: who made a temporary file or staging folder."""
    return f"{socket.gethostname().replace('-', '_').replace('.', '_')}_{os.getpid()}"


def claim(fd: int) -> None:
    """Hold an exclusive lock on the open file or folder ``fd`` until it is closed: :func:`remove_orphans` leaves
    it be. Without ``flock`` (Windows) nothing is locked, and nothing is ever removed either."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # just made by this process: no one else holds it


@contextlib.contextmanager
def staging_folder(parent: Path, kind: str) -> Iterator[Path]:
    """A new folder ``parent/.<kind>-<host>_<pid>-*`` for files that move into ``parent`` once whole; claimed
    while the block runs, then removed with whatever is left in it."""
    path = Path(tempfile.mkdtemp(prefix=f".{kind}-{owner_tag()}-", dir=parent))
    fd = os.open(path, os.O_RDONLY)
    try:
        claim(fd)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_orphans(folder: str | Path) -> list[str]:
    """Remove the temporary files and staging folders in ``folder`` (a run directory, a fetched dataset's) that
    no live process holds, made by a process of this host that is gone; another host's stay (its locks may not
    reach here). Returns their names."""
    try:
        import fcntl
    except ImportError:
        return []
    host = owner_tag().rsplit("_", 1)[0]
    removed = []
    for path in Path(folder).glob(".*"):
        match = _STAGING.fullmatch(path.name) or _TEMPORARY.fullmatch(path.name)
        if match is None or match["host"] != host or path.is_symlink() or _alive(int(match["pid"])):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner lives (in another PID namespace: its PID looked free here)
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process in this PID namespace (the lock decides for the others). Checked as well as
    the lock: in the instant between a temporary file's creation and its claim only the PID says it is in use."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; no PID at all: leave it be
        return True
    return True
