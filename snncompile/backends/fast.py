"""``torch-fast``: the fastest PyTorch inference of an unrolled export we can build.

Same graph module as the torch reference (:class:`~snncompile.graphs.UnrolledGraph`), run for speed:

- layer-major always (each conv/linear once on ``[T*B, ...]``), whatever order the file was exported in;
- the LIF scan of each layer as one fused Triton kernel (on CUDA when Triton imports; on the CPU the
  kernel runs only in Triton's interpreter, which tests use);
- on CUDA, the whole forward captured once per input shape in a CUDA graph and replayed: one launch
  per call instead of hundreds of kernel launches from Python;
- on CUDA, cuDNN autotuned (``torch.backends.cudnn.benchmark``): each convolution shape is timed over
  cuDNN's algorithms once, in the warm-up before the capture, and the fastest is kept (neither this pick
  nor the heuristic one sums in the CPU reference's order; verify classifies the numerical flips either
  may cause); ``autotune=False`` keeps cuDNN's heuristic pick, PyTorch's default;
- ``precision``: ``fp32`` (TF32 off, spike-for-spike with the reference), ``tf32x2`` (fp32-accurate:
  the layers that read spikes run as two TF32 tensor-core passes, see :mod:`snncompile.split_tf32`;
  verified at the fp32 preset), ``tf32``, or ``fp16``/``bf16`` autocast for convs/linears; the membrane
  recurrence and the threshold compare stay fp32 (the LIF cell and the kernel upcast), and
  ``verify --precision`` reports the flips that remain;
- ``pad_channels``: convs whose input channel count is not a multiple of it run on zero-padded copies
  of input and weight (:attr:`~snncompile.models.SpikingNetwork.pad_conv_channels`; same function, for
  cuDNN's tensor-core kernels, which want multiples of 8: bench-nmnist's input conv has 2 channels);
- ``channels_last``: conv weights, hence the convs' outputs and the currents the fused LIF kernels read,
  in channels_last, the layout cuDNN's tensor-core kernels compute in. In NCHW cuDNN transposes to it and
  back around each convolution: a fifth of the GPU time of a bf16 training step on an H200 (the
  ``bench train`` profile). The same function, verified like any other torch-fast;
- ``fuse_input_conv``: the input conv (few channels, :func:`~snncompile.kernels.input_conv.conv_fuses_with_lif`),
  its LIF and the pool after it as one kernel, which never writes the conv's output, the network's largest
  tensor (:mod:`snncompile.kernels.input_conv`; fp32 sums at every precision; needs the fused LIF);
- an exact-arithmetic model (``model.exact``) at fp32 on CUDA runs its convolutions without cuDNN
  (:func:`~snncompile.torch_settings.cudnn_disabled`): on an H200, with cuDNN's autotuned algorithms, its
  membranes differed from the CPU reference's in 830 M of ~2.5 G values, while ONNX Runtime CPU matched
  all of them. Direct sums are exact on the model's grids in any order; cuDNN's transformed algorithms are
  not. Slower, and the bench table says so ("convs without cuDNN").
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, RunnerUnavailableError
from .base import TORCH_FAST_PRECISIONS
from ..torch_settings import cudnn_autotuning, cudnn_disabled, no_tf32, tf32_math
from .pt import TorchRunner

__all__ = ["TorchFastRunner"]

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchFastRunner(TorchRunner):
    """Layer-major, fused LIF, CUDA-graph replay; see the module docstring."""

    name = "torch-fast"

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", device: str = "auto", precision: str = "fp32",
                 fused: bool | None = None, cuda_graph: bool | None = None, autotune: bool = True, pad_channels: int = 1,
                 channels_last: bool = False, fuse_input_conv: bool = False):
        if precision not in TORCH_FAST_PRECISIONS:
            raise ConfigError(f"torch-fast precision must be one of {', '.join(TORCH_FAST_PRECISIONS)}, got {precision!r}")
        if pad_channels < 1:
            raise ConfigError(f"torch-fast pad_channels must be >= 1 (1: no padding), got {pad_channels}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(run_dir, model_file, device)
        if self.form != "unrolled":
            raise ConfigError(f"torch-fast runs unrolled exports; {model_file} is a {self.form!r} export")
        on_cuda = self.device.type == "cuda"
        if fused is None:
            from ..kernels import fused_kernels_available

            fused = on_cuda and fused_kernels_available()
        if cuda_graph and not on_cuda:
            raise RunnerUnavailableError("torch-fast: CUDA graphs need a CUDA device")
        self.graph.order = "layer"
        self.graph.net.fused_lif = bool(fused)
        self.precision = precision
        self.autotune = autotune
        self.split_layers = 0
        if precision == "tf32x2":
            from ..split_tf32 import apply_split_tf32

            self.split_layers = apply_split_tf32(self.graph.net)
        self.graph.net.pad_conv_channels = pad_channels  # after the split: its convs compute their own way
        self.padded = pad_channels if self.graph.net.pads_conv_channels(pad_channels) else 1
        self.channels_last = channels_last
        if channels_last:  # in place, after the split: its stacked weights are the convs' weights then
            self.graph.net.to(memory_format=torch.channels_last)
        if fuse_input_conv and not fused:
            raise RunnerUnavailableError("torch-fast --fuse-input-conv needs the fused LIF kernels (CUDA and Triton)")
        if fuse_input_conv and not self.graph.net.fuses_an_input_conv():
            from ..kernels.input_conv import MAX_TAPS

            raise ConfigError(f"torch-fast --fuse-input-conv: this network has no stride-1 conv of at most {MAX_TAPS} "
                              "terms per output (input channels x kernel area) followed by a LIF")
        self.fuse_input_conv = bool(fuse_input_conv)
        self.graph.net.fuse_input_conv = self.fuse_input_conv
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.direct_convs = on_cuda and self.exact_model and precision == "fp32"
        self._captured: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.cuda.CUDAGraph]] = {}

    def _numerics(self):
        """The context the forward runs in: TF32 off for fp32, autocast for fp16/bf16, cuDNN autotuning."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(cudnn_autotuning(self.autotune))
        if self.precision in ("fp32", "tf32x2"):  # tf32x2: only the split layers enable TF32, for themselves
            stack.enter_context(no_tf32())
        elif self.precision == "tf32":
            stack.enter_context(tf32_math(True))
        if self.direct_convs:
            stack.enter_context(cudnn_disabled())
        if self.precision in _AUTOCAST:
            # no weight-cast cache: cached casts must not outlive a CUDA-graph capture
            stack.enter_context(torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision], cache_enabled=False))
        return stack

    def timing_mode(self, handle) -> str:
        mode = super().timing_mode(handle)
        return ", ".join(filter(None, [mode, "convs without cuDNN (exact model)" if self.direct_convs else "",
                                       f"input channels padded to {self.padded}" if self.padded > 1 else "",
                                       "channels_last" if self.channels_last else "",
                                       "input conv fused" if self.fuse_input_conv else ""]))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._numerics():
            return self.graph(x)

    def _capture(self, x: torch.Tensor):
        """A CUDA graph of the forward for ``x``'s shape: (static input, static outputs, graph)."""
        key = tuple(x.shape)
        if key not in self._captured:
            static_in = x.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            self._captured[key] = (static_in, static_out, graph)
        return self._captured[key]

    def prepare(self, feed: dict[str, np.ndarray]):
        (x,) = super().prepare(feed)
        return self._capture(x) if self.cuda_graph else x

    def run_prepared(self, handle) -> None:
        if self.cuda_graph:
            handle[2].replay()
        else:
            self._forward(handle)
        self._wait()

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(feed["input"])).to(self.device)
        if self.cuda_graph:
            static_in, outs, graph = self._capture(x)
            static_in.copy_(x)
            graph.replay()
        else:
            outs = self._forward(x)
        return {name: out.float().cpu().numpy() for name, out in zip(self._outputs, outs)}

    def close(self) -> None:
        self._captured.clear()
