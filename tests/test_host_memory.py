"""keep_freed_memory: large CPU blocks come from the heap (no per-allocation mmap) under glibc."""

import ctypes

import pytest
import torch

from snncompile import host_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes(libc) -> int:
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _libc_with_mallinfo2():
    libc = host_memory._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    return libc


def test_large_tensors_come_from_the_heap_once_applied():
    libc = _libc_with_mallinfo2()
    size = 64 * 2**20 // 4  # 64 MiB of fp32: over glibc's largest mmap threshold (32 MiB)
    libc.mallopt(-4, 65536)  # glibc's default M_MMAP_MAX: the control, a block that large is mmapped
    before = _mmapped_bytes(libc)
    t = torch.empty(size)
    assert _mmapped_bytes(libc) - before >= 64 * 2**20
    del t
    assert host_memory.keep_freed_memory()
    before = _mmapped_bytes(libc)
    t = torch.empty(size)
    assert _mmapped_bytes(libc) == before  # from the heap
    del t


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "system")
    assert host_memory.keep_freed_memory() is False


def test_a_misspelt_setting_is_one_line_naming_the_choices(monkeypatch):
    from click.testing import CliRunner

    from snncompile.cli import cli

    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "sytem")
    result = CliRunner().invoke(cli, ["init", "--help"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: SNNCOMPILE_MALLOC must be 'keep' (the default) or 'system', got 'sytem'"]
