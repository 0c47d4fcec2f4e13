"""Atomic artifact writes: nothing half-written, and the permissions a plain open() would give."""

import os

import pytest

from snncompile.artifacts import atomic_write_text


def test_atomic_write_gives_the_umask_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "c.txt"
    with pytest.raises(RuntimeError):
        from snncompile.artifacts import atomic_write

        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
