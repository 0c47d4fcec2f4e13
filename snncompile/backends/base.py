"""The runner interface, input validation and the registry of runners."""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError, RunnerUnavailableError

__all__ = ["TensorSpec", "Runner", "validate_feed", "RUNNERS", "create_runner", "available_runners", "default_runners",
           "runner_options", "runner_numerics", "usable_cpus", "GRAPH_RUNNERS", "PRECISIONS", "PRECISION_RUNNERS",
           "TORCH_FAST_PRECISIONS"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` or a string for a dynamic dimension) and numpy dtype of one tensor."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str = "float32"

    def describe(self) -> str:
        dims = ", ".join("B" if d is None or isinstance(d, str) else str(d) for d in self.shape)
        return f"[{dims}] {self.dtype}"


def validate_feed(feed: dict[str, np.ndarray], specs: list[TensorSpec]) -> None:
    """One-line :class:`InputError` for a missing/unknown name, wrong rank, size or dtype."""
    expected = {s.name for s in specs}
    missing, extra = expected - set(feed), set(feed) - expected
    if missing or extra:
        raise InputError(f"inputs: expected {sorted(expected)}, got {sorted(feed)}")
    for spec in specs:
        arr = feed[spec.name]
        if not isinstance(arr, np.ndarray):  # a torch tensor said "expected ... float32, got ... torch.float32"
            hint = " (use .numpy())" if hasattr(arr, "numpy") else ""
            raise InputError(f"input {spec.name!r}: expected a numpy array ({spec.describe()}), got "
                             f"{type(arr).__module__}.{type(arr).__name__}{hint}")
        got = f"[{', '.join(map(str, arr.shape))}] {arr.dtype}"
        if arr.ndim != len(spec.shape) or str(arr.dtype) != spec.dtype:
            raise InputError(f"input {spec.name!r}: expected {spec.describe()}, got {got}")
        for axis, (want, have) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(want, int) and want != have:
                what = "T (axis 0)" if axis == 0 and spec.name == "input" and len(spec.shape) >= 3 else f"axis {axis}"
                raise InputError(f"input {spec.name!r}: {what} must be {want}, got {have}: expected {spec.describe()}, got {got}")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset) where the OS has one,
    else every CPU. More threads than that would only take turns on the same cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows: no affinity call
        return max(1, os.cpu_count() or 2)


class Runner(ABC):
    """Runs one exported model: ``infer({name: array}) -> {name: array}`` with stable names.

    An unrolled export takes ``{"input": [T, B, ...]}`` and answers ``scores [B, classes]`` (+ ``rates [B, N]``,
    + ``<lif>.spikes`` and ``<lif>.membrane`` ``[T, B, ...]`` per LIF layer of a ``--layers`` export); a step-form
    export takes one step, ``input [B, ...]``, ``output_sum [B, N]`` and the ``state.*`` tensors, and answers
    ``scores``, ``next.output_sum`` and the ``next.*`` states (:class:`~snncompile.streaming.StreamedRunner`
    runs it over T steps as an unrolled one)."""

    name: str = "runner"
    _inputs: list[TensorSpec]  # set by each runner's constructor
    _outputs: list[str]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this runner can run here, else a one-line reason (with the pip extra)."""
        return None

    @property
    def inputs(self) -> list[TensorSpec]:
        """What :meth:`infer` expects: names, shapes (None = dynamic) and dtypes."""
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        """Stable output names, in the order of the exported graph."""
        return self._outputs

    @abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feed`` against :attr:`inputs`, run, return every output by name."""
        validate_feed(feed, self.inputs)
        return self._run(feed)

    def prepare(self, feed: dict[str, np.ndarray]):
        """Validate ``feed`` and place it where this runner computes (e.g. on the GPU) for timing."""
        validate_feed(feed, self.inputs)
        return feed

    def run_prepared(self, handle) -> None:
        """Run on a :meth:`prepare` handle and return when the result is complete (benchmarks)."""
        self._run(handle)

    def timing_mode(self, handle) -> str:
        """How calls on a :meth:`prepare` handle execute, for the bench table: ``CUDA graph`` for a runner
        whose ``cuda_graph`` is on, else empty."""
        return "CUDA graph" if getattr(self, "cuda_graph", False) else ""

    def close(self) -> None:
        """Release runtime resources (sessions, device memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# name -> "module:Class"; modules are imported only when a runner is asked for.
RUNNERS: dict[str, str] = {
    "torch": "snncompile.backends.pt:TorchRunner",
    "torch-fast": "snncompile.backends.fast:TorchFastRunner",
    "torch-compile": "snncompile.backends.compiled:TorchCompileRunner",
    "torch-loop": "snncompile.backends.pt:TorchLoopRunner",
    "ort-cpu": "snncompile.backends.ort:OrtCpuRunner",
    "ort-cuda": "snncompile.backends.ort:OrtCudaRunner",
    "ov-cpu": "snncompile.backends.ov:OpenVinoCpuRunner",
    "trt": "snncompile.backends.trt:TrtRunner",
}


def _runner_class(name: str) -> type[Runner]:
    if name not in RUNNERS:
        raise ConfigError(f"unknown runner {name!r} (known: {', '.join(RUNNERS)})")
    module, cls = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def available_runners() -> dict[str, str | None]:
    """Every registered runner with None (available) or the reason it is not."""
    return {name: _runner_class(name).unavailable_reason() for name in RUNNERS}


# Runners used only when named, as references to measure against: torch-compile compiles per input
# shape (minutes on a big network); torch-loop is the plain eager per-timestep loop.
OPT_IN_RUNNERS = ("torch-compile", "torch-loop")


def default_runners(reference: bool = True) -> list[str]:
    """The runners a command uses when none are named: every available one but the opt-in ones (and
    but ``torch``, the reference itself, with ``reference=False``)."""
    return [name for name, why in available_runners().items()
            if why is None and name not in OPT_IN_RUNNERS and (reference or name != "torch")]


# Runners whose numerics follow a precision setting (TensorRT engines are built per precision), and
# the precisions they take (verify's tolerance presets have the same names).
PRECISION_RUNNERS = ("torch-fast", "trt")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# tf32x2: fp32-accurate spike layers on TF32 tensor cores (snncompile.split_tf32), torch-fast only
TORCH_FAST_PRECISIONS = PRECISIONS + ("tf32x2",)


# Runners that execute the ONNX file as written: a mixed-precision export (model_fp16.onnx) sets their numerics.
GRAPH_RUNNERS = ("ort-cpu", "ort-cuda", "ov-cpu")


def runner_numerics(name: str, requested: str = "fp32", model_precision: str = "fp32") -> str:
    """What runner ``name`` computes at (and is verified at): the export's own precision for the runners
    that run its graph as written, ``requested`` for those that take a precision, else fp32."""
    if name in GRAPH_RUNNERS:
        return model_precision
    if name == "trt" and requested == "tf32x2" and model_precision == "tf32x2":
        return "tf32x2"  # the split export's engine, built with TF32 on, held to fp32's tolerances
    if name not in PRECISION_RUNNERS or (requested == "tf32x2" and name != "torch-fast"):
        return "fp32"  # tf32x2 claims fp32 accuracy: the others are then run at fp32
    return requested


# Runners that replay a captured CUDA graph by default (torch-fast and torch-compile on CUDA only)
CUDA_GRAPH_RUNNERS = ("torch-fast", "torch-compile", "ort-cuda", "trt")
AUTOTUNE_RUNNERS = ("torch-fast",)  # cuDNN algorithms timed per shape, not picked by heuristic
THREAD_RUNNERS = ("ort-cpu", "ort-cuda", "ov-cpu")  # a thread count of their own (torch's runners share torch's)
PAD_CHANNEL_RUNNERS = ("torch-fast",)  # convs' input channels zero-padded (SpikingNetwork.pad_conv_channels)
CHANNELS_LAST_RUNNERS = ("torch-fast",)  # conv weights, hence activations, in channels_last
FUSE_INPUT_CONV_RUNNERS = ("torch-fast",)  # the input conv, its LIF and pool as one kernel (kernels.input_conv)


def runner_options(name: str, precision: str = "fp32", cuda_graph: bool = True, cudnn_autotune: bool = True,
                   pad_channels: int = 1, model_precision: str = "fp32", threads: int = 0,
                   channels_last: bool = False, fuse_input_conv: bool = False) -> dict:
    """Constructor options that make runner ``name`` compute at ``precision`` (none for the others);
    ``cuda_graph=False``: one launch per kernel instead of a graph replay, for the runners that graph;
    ``cudnn_autotune=False``: cuDNN's heuristic algorithm pick, for the runners that autotune;
    ``pad_channels > 1``: convs' input channels zero-padded to a multiple of it, for the runners that can;
    ``model_precision``: the export's (see :func:`runner_numerics`); ``threads``: ONNX Runtime's intra-op CPU
    threads, OpenVINO's inference threads (0: one per usable core; torch's runners use torch's own setting,
    :func:`~.pt.cpu_threads`);
    ``channels_last``: conv weights and activations in channels_last, for the runners that can;
    ``fuse_input_conv``: the input conv, its LIF and pool as one kernel, for the runners that can."""
    options: dict = {"precision": runner_numerics(name, precision, model_precision)} if name in PRECISION_RUNNERS else {}
    if not cuda_graph and name in CUDA_GRAPH_RUNNERS:
        options["cuda_graph"] = False
    if not cudnn_autotune and name in AUTOTUNE_RUNNERS:
        options["autotune"] = False
    if pad_channels > 1 and name in PAD_CHANNEL_RUNNERS:
        options["pad_channels"] = pad_channels
    if threads and name in THREAD_RUNNERS:
        options["threads"] = threads
    if channels_last and name in CHANNELS_LAST_RUNNERS:
        options["channels_last"] = True
    if fuse_input_conv and name in FUSE_INPUT_CONV_RUNNERS:
        options["fuse_input_conv"] = True
    return options


def create_runner(name: str, run_dir: str | Path, model_file: str = "model.onnx", **options) -> Runner:
    """Create runner ``name`` for the export ``model_file`` in ``run_dir``."""
    cls = _runner_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise RunnerUnavailableError(f"runner {name!r} is unavailable here: {reason}")
    return cls(Path(run_dir), model_file, **options)  # type: ignore[call-arg]
