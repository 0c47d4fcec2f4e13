"""ONNX Runtime runners (CPU and CUDA execution providers). The only importer of onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ArtifactError
from .base import Runner, TensorSpec

__all__ = ["OrtCpuRunner", "OrtCudaRunner", "cuda_provider_options", "session_outputs"]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


class _OrtRunner(Runner):
    provider = "CPUExecutionProvider"
    provider_options: dict[str, str] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        ort = _onnxruntime()
        if ort is None:
            return "onnxruntime is not installed: pip install 'snncompile[onnx]'"
        if cls.provider not in ort.get_available_providers():
            return f"{cls.provider} is not in this onnxruntime build (pip install onnxruntime-gpu for CUDA)"
        return None

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", threads: int = 0):
        ort = _onnxruntime()
        path = Path(run_dir) / model_file
        if not path.is_file():
            raise ArtifactError(f"model file not found: {path} (run `snncompile export {run_dir}` first)")
        opts = ort.SessionOptions()
        # Intra-op threads = physical cores by default; inter-op parallelism buys nothing for a
        # straight-line unrolled graph and contends with intra-op threads.
        opts.intra_op_num_threads = threads or max(1, (os.cpu_count() or 2))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=[(self.provider, dict(self.provider_options))])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path} cannot be loaded by ONNX Runtime: {first[:200]}") from None
        self._inputs = [
            TensorSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), _ORT_TYPES.get(i.type, i.type))
            for i in self.session.get_inputs()
        ]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._outputs, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return dict(zip(self._outputs, outs))

    def close(self) -> None:
        self.session = None


class OrtCpuRunner(_OrtRunner):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"


class OrtCudaRunner(_OrtRunner):
    """CUDA provider; benchmarks bind inputs and outputs on the GPU (IO binding), so timed calls move
    nothing across PCIe."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    # The CUDA provider runs float convolutions and GEMMs in TF32 unless told otherwise (10-bit mantissa
    # inputs): off, so the graph computes what it says and verifies spike for spike against fp32 ...
    provider_options = {"use_tf32": "0"}

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", threads: int = 0):
        # ... except on a tf32x2 export, whose split weights are made for TF32 (fp32-accurate under it)
        self.provider_options = cuda_provider_options(run_dir, model_file)
        super().__init__(run_dir, model_file, threads)

    def prepare(self, feed: dict[str, np.ndarray]):
        super().prepare(feed)
        ort = _onnxruntime()
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", 0))
        for name in self._outputs:
            binding.bind_output(name, "cuda", 0)
        return binding

    def run_prepared(self, handle) -> None:
        # run_with_iobinding returns after the CUDA stream finished (ORT synchronizes the run).
        self.session.run_with_iobinding(handle)


def cuda_provider_options(run_dir: Path, model_file: str) -> dict[str, str]:
    """CUDA provider options for an export: TF32 only for a ``tf32x2`` export (split weights)."""
    from ..artifacts import read_manifest

    entry = read_manifest(Path(run_dir)).get("exports", {}).get(model_file, {})
    return {"use_tf32": "1" if entry.get("precision") == "tf32x2" else "0"}


def session_outputs(path: Path, feed: dict[str, np.ndarray], literal: bool = False) -> dict[str, np.ndarray]:
    """Run an ONNX file once on the CPU provider (the exporter's checks). ``literal``: with ONNX Runtime's
    own graph rewrites off, so two graphs are compared as written (its rewrites, e.g. the blocked conv
    layout, apply to some graph shapes and not others and pick other summation orders)."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    if literal:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))
