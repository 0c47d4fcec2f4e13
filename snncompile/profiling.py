"""Where repeated calls spend their time, for ``bench train --profile`` and ``bench --profile``: torch.profiler's
table (torch's operators, every CUDA kernel of the process), ONNX Runtime's own profile for its CPU provider and
OpenVINO's performance counters, whose work torch's profiler does not see."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

__all__ = ["ort_profile_table", "ov_profile_table", "profile_calls"]


@contextmanager
def _native_stderr_silenced():
    """The process's stderr (file descriptor 2) sent to /dev/null for the block. Kineto writes a
    ``USDT:... profiler_start`` and a ``profiler_stop`` line there from C++ as torch.profiler starts and stops (no
    logging setting turns them off): noise above a table the user reads. Only the start and the stop are
    silenced, so anything the profiled calls print still shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def profile_calls(call: Callable[[], None], cuda: bool, calls: int = 3, rows: int = 20, what: str = "calls") -> str:
    """Run ``call`` ``calls`` times under torch.profiler; return its table of the top ``rows`` GPU kernels
    by self time when ``cuda`` (every CUDA kernel of the process, ONNX Runtime's included), else of the top
    CPU operators (torch's only). ``what`` names the calls in the heading ("steps", "batches").

    A second table splits the top operators by their input shapes: an ``aten::copy_`` or ``aten::sum`` row
    of the first adds up every copy or sum of the step, and only the shapes tell which tensors they are
    (the H200's bf16 bench-cifar step: 33 copies and 8 sums per step, 0.95 and 0.57 ms, not yet placed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prof = torch_profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])],
                         record_shapes=True)
    with _native_stderr_silenced():
        prof.start()
    try:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=rows)
    return (f"{'GPU kernels' if cuda else 'CPU operators'} of {calls} {what}, by self time:\n{table}\n"
            f"The same {what}, operators split by input shapes:\n{by_shape}")


def ort_profile_table(events: list[dict], runs: int, what: str, rows: int = 20) -> str:
    """ONNX Runtime's profile (the events of its JSON trace) of the last ``runs`` session runs, as two tables:
    time per operator type, then the ``rows`` slowest nodes. Earlier runs (warm-up) are left out: a node event
    counts when it starts inside one of those runs' ``model_run`` spans. Each node's time is its median over the
    runs: on a busy machine one stalled thread can add milliseconds to whichever node it hits (seen on 2 cores),
    which a sum would pin on that node. ``what`` heads it ("10 batches")."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    spans = spans[-runs:] if runs > 0 else []
    durations: dict[str, list[int]] = {}  # node -> its duration in each run, us
    about: dict[str, tuple[str, str]] = {}  # node -> (operator, output shape)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in spans):
            continue
        node, args = e["name"].removesuffix("_kernel_time"), e.get("args", {})
        shapes = [list(t.values())[0] for t in args.get("output_type_shape", []) if t]
        durations.setdefault(node, []).append(e["dur"])
        about[node] = (args.get("op_name", "?"), "x".join(map(str, shapes[0])) if shapes else "")
    median = {node: float(np.median(d)) for node, d in durations.items()}
    run_ms = float(np.median([hi - lo for lo, hi in spans])) / 1e3 if spans else 0.0
    total = sum(median.values()) or 1.0
    head = (f"ONNX Runtime's profiler, {what} ({len(spans)} session runs; per run, medians: {run_ms:.3f} ms, its nodes "
            f"{total / 1e3:.3f} ms; the profiler's own cost per node is in both)")
    return _node_tables(head, median, about, "output shape", rows)


def ov_profile_table(runs: list[dict[str, tuple[str, str, float]]], last: int, what: str, rows: int = 20) -> str:
    """OpenVINO's performance counters (``OpenVinoCpuRunner.profiled_runs``) of the last ``last`` inferences as
    :func:`ort_profile_table`'s two tables, each node with the kernel the plugin ran it with (ISA and precision,
    e.g. ``brgconv_avx512_f32``); medians over the inferences, as there. ``what`` heads it ("10 batches")."""
    runs = runs[-last:] if last > 0 else []
    durations: dict[str, list[float]] = {}
    about: dict[str, tuple[str, str]] = {}  # node -> (operation, kernel)
    for run in runs:
        for node, (operation, kernel, us) in run.items():
            durations.setdefault(node, []).append(us)
            about[node] = (operation, kernel)
    median = {node: float(np.median(d)) for node, d in durations.items()}
    total = sum(median.values()) or 1.0
    head = f"OpenVINO's performance counters, {what} ({len(runs)} inferences; its nodes {total / 1e3:.3f} ms per run, medians)"
    return _node_tables(head, median, about, "kernel", rows)


def _node_tables(head: str, median: dict[str, float], about: dict[str, tuple[str, str]], detail: str, rows: int) -> str:
    """Markdown: ``head``, time per operator (summed over its nodes), then the ``rows`` slowest nodes with their
    operator and ``detail`` (``about[node]`` is ``(operator, detail)``); ``median`` is each node's us per run."""
    total = sum(median.values()) or 1.0
    by_op: dict[str, list] = {}  # operator -> [nodes, us per run]
    for node, us in median.items():
        row = by_op.setdefault(about[node][0], [0, 0.0])
        row[0] += 1
        row[1] += us
    lines = [f"{head}, operators by time per run:", "", "| operator | nodes | us per run | share |", "|---|---|---|---|"]
    for op, (nodes, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {op} | {nodes} | {us:.1f} | {100 * us / total:.1f} % |")
    lines += ["", f"The {min(rows, len(median))} slowest nodes (median per run):", "",
              f"| node | operator | {detail} | us | share |", "|---|---|---|---|---|"]
    for node, us in sorted(median.items(), key=lambda kv: -kv[1])[:rows]:
        op, extra = about[node]
        lines.append(f"| {node} | {op} | {extra} | {us:.1f} | {100 * us / total:.1f} % |")
    return "\n".join(lines)
