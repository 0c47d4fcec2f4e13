"""keep_freed_memory: large CPU blocks come from the heap (no per-allocation mmap) under glibc."""

import os

import pytest

from snncompile import host_memory


# Run in a fresh interpreter: once any test has applied the setting (every CLI test does), freed heap
# blocks big enough for the control's tensor are already there, and the control would prove nothing.
_PROBE = """
import ctypes, torch
from snncompile import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = host_memory._glibc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print("skip")
    raise SystemExit
libc.mallinfo2.restype = MallInfo2
size = 64 * 2**20 // 4  # 64 MiB of fp32: over glibc's largest mmap threshold (32 MiB)
grown = []
for apply in (False, True):
    if apply:
        assert host_memory.keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    t = torch.empty(size)
    grown.append(libc.mallinfo2().hblkhd - before)
    del t
print(*grown)
"""


def test_large_tensors_come_from_the_heap_once_applied():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_OUT_ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True).stdout
    if out.strip() == "skip":
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    control, applied = (int(v) for v in out.split())
    assert control >= 64 * 2**20  # glibc's default: a block that large is mmapped
    assert applied == 0  # once applied: from the heap


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
