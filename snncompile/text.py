"""Wording shared by the commands' output."""

from __future__ import annotations

__all__ = ["counted", "shell_path"]


def counted(n: int, noun: str) -> str:
    """``1 thread``, ``2 threads``: a count with its noun in the right number (regular plurals only)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shell_path(path) -> str:
    """``path`` as it must be typed into a shell: a command we suggest is copied and pasted as printed, and a
    folder with a space in its name split into two arguments."""
    import shlex

    return shlex.quote(str(path))
