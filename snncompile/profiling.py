"""Where repeated calls spend their time: torch.profiler's table, for ``bench train --profile`` and
``bench --profile``."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["profile_calls"]


def profile_calls(call: Callable[[], None], cuda: bool, calls: int = 3, rows: int = 20, what: str = "calls") -> str:
    """Run ``call`` ``calls`` times under torch.profiler; return its table of the top ``rows`` GPU kernels
    by self time when ``cuda`` (every CUDA kernel of the process, ONNX Runtime's included), else of the top
    CPU operators (torch's only). ``what`` names the calls in the heading ("steps", "batches").

    A second table splits the top operators by their input shapes: an ``aten::copy_`` or ``aten::sum`` row
    of the first adds up every copy or sum of the step, and only the shapes tell which tensors they are
    (the H200's bf16 bench-cifar step: 33 copies and 8 sums per step, 0.95 and 0.57 ms, not yet placed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])],
                       record_shapes=True) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=rows)
    return (f"{'GPU kernels' if cuda else 'CPU operators'} of {calls} {what}, by self time:\n{table}\n"
            f"The same {what}, operators split by input shapes:\n{by_shape}")
