"""The torch runner: the exported graph's own torch module, fp32 with TF32 off (the reference)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, RunnerUnavailableError
from ..graphs import StepGraph, UnrolledGraph
from ..runs import load_network
from ..text import counted
from ..torch_settings import cudnn_disabled, no_tf32
from .base import Runner, TensorSpec

__all__ = ["PerTimestepRunner", "TorchLoopRunner", "TorchRunner", "export_entry"]


def export_entry(run_dir: Path, model_file: str) -> dict:
    """The manifest's record of an export (T, form, outputs) or a one-line error."""
    from ..artifacts import read_manifest

    entry = read_manifest(run_dir).get("exports", {}).get(model_file)
    if entry is None:
        from ..exports import missing_export

        raise missing_export(run_dir, model_file)
    return entry


class TorchRunner(Runner):
    """Runs a run's checkpoint through the same graph module that was exported."""

    name = "torch"

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", device: str = "cpu"):
        if device == "cuda" and not torch.cuda.is_available():
            raise RunnerUnavailableError("torch runner on cuda: no CUDA GPU visible")
        entry = export_entry(run_dir, model_file)
        cfg, net = load_network(run_dir)
        self.device = torch.device(device)
        self.steps = int(entry["T"])
        self.form = entry["form"]
        self.exact_model = bool(cfg.model.exact)
        if self.form == "step":
            self.graph = StepGraph(net, self.steps)
        else:
            self.graph = UnrolledGraph(net, rates=entry["rates"], layers=entry["layers"], order=entry.get("order", "layer"))
        self.graph.to(self.device).eval()
        # in the order the module takes them (the manifest stores its keys sorted: state.lif1.o before .u)
        names = self.graph.input_names if self.form == "step" else list(entry["inputs"])
        self._inputs = [TensorSpec(n, tuple(entry["inputs"][n]), "float32") for n in names]
        self._outputs = list(entry["outputs"])

    def prepare(self, feed: dict[str, np.ndarray]):
        super().prepare(feed)
        return [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self.device) for s in self._inputs]

    def fp32_numerics(self) -> contextlib.ExitStack:
        """fp32 as the reference computes it: TF32 off, and for an exact model on CUDA convolutions without
        cuDNN (:func:`cudnn_disabled`: its Winograd/FFT algorithms would round the exact sums)."""
        stack = contextlib.ExitStack()
        stack.enter_context(no_tf32())
        if self.exact_model and self.device.type == "cuda":
            stack.enter_context(cudnn_disabled())
        return stack

    @torch.no_grad()
    def run_prepared(self, handle) -> None:
        with self.fp32_numerics():
            self.graph(*handle)
        self._wait()

    def timing_mode(self, handle) -> str:
        """On the CPU, with how many threads (a GPU machine's bench table shows the CPU rows as such)."""
        if self.device.type == "cpu":
            return f"CPU, {counted(torch.get_num_threads(), 'thread')}"
        return super().timing_mode(handle)

    def _wait(self) -> None:
        """Return only once the device has finished (timed calls include the GPU's work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self.device) for s in self._inputs]
        with self.fp32_numerics():
            outs = self.graph(*args)
        return {name: out.cpu().numpy() for name, out in zip(self._outputs, outs)}


class PerTimestepRunner(TorchRunner):
    """The exported graph's own module stepped through T in Python (the loop most SNN code runs), on the
    GPU when there is one: the base of the plain references ``torch-loop`` and ``torch-compile``."""

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(run_dir, model_file, device)
        if self.form != "unrolled":
            raise ConfigError(f"{self.name} runs unrolled exports; {model_file} is a {self.form!r} export")
        self.graph.order = "step"


class TorchLoopRunner(PerTimestepRunner):
    """``torch-loop`` (opt-in: ``--runners torch-loop``): the per-timestep loop eager, one launch per op,
    fp32 with TF32 off; the plain reference torch-fast and torch-compile are measured against, timed on
    the same card in the same run."""

    name = "torch-loop"
