"""TensorRT: engine builds from model.onnx and a runner for them. The only importer of TensorRT.

Works with the ``tensorrt`` package (10.x, 11.x) and with ``tensorrt_rtx`` (TensorRT for RTX GPUs,
same Python API family), whichever imports first. Device buffers are torch CUDA tensors (no pycuda);
inference is ``execute_async_v3`` on a torch CUDA stream, optionally captured in a CUDA graph.

Reduced precision and spikes: every network is built *strongly typed* (TensorRT 11 knows no other kind;
10.x and TensorRT-RTX accept the flag), so precision lives in the graph, not in builder flags. For
``fp16``/``bf16`` :func:`build_engine` parses :func:`~snncompile.mixed_precision.mixed_precision`'s
rewrite of the model: convolutions and matrix multiplies in the reduced type, the LIF/NeuNorm arithmetic
and the threshold compare in fp32 (a membrane rounded to 16 bits near V_th would flip a spike);
``verify --precision fp16`` measures the flips that remain. ``fp32`` clears TF32; ``tf32`` allows it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ConfigError, ExportError, MissingDependencyError, RunnerUnavailableError
from ..onnx_files import require_own_external_data
from ..text import shell_path
from .base import PRECISIONS, Runner, TensorSpec

__all__ = ["engine_name", "tensorrt_module", "parse_profile", "profile_shapes", "BuildOptions", "build_engine",
           "TrtRunner", "ENGINE_FORMAT", "ENGINE_PRECISION", "gpu_identity"]

ENGINE_FORMAT = 2  # 2: strongly typed, precision in the graph (1 used builder flags)


# The metapackages import as tensorrt / tensorrt_rtx; their -cuXX bindings wheels installed alone (as on
# a machine without internet, from carried wheels) import as *_bindings, with the same API.
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_bindings", "tensorrt_rtx_bindings")


def tensorrt_module():
    """The first of :data:`TENSORRT_MODULES` that imports, else a one-line error naming the pip extra."""
    for name in TENSORRT_MODULES:
        try:
            return __import__(name)
        except ImportError:
            continue
    raise MissingDependencyError("TensorRT (tensorrt or tensorrt_rtx)", "trt",
                                 "or 'snncompile[trt-rtx]': TensorRT-RTX, which builds engines without a GPU")


def parse_profile(text: str) -> tuple[int, int, int]:
    """``'1:16:128'`` -> (min, opt, max) batch sizes with 1 <= min <= opt <= max."""
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--batch expects MIN:OPT:MAX integers, got {text!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {text!r}")
    return lo, opt, hi


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"
    batch: tuple[int, int, int] = (1, 16, 128)
    workspace_mb: int = 4096
    timing_cache: Path | None = None

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_mb < 16:
            raise ConfigError(f"--workspace must be at least 16 MB, got {self.workspace_mb}")


# the engine precision each runner precision runs on: tf32x2 (a split export, fp32-accurate) is built with TF32
ENGINE_PRECISION = {"tf32x2": "tf32"}


def engine_name(model_file: str, precision: str) -> str:
    """``model.onnx`` at fp16 -> ``model_fp16.plan``."""
    return f"{Path(model_file).stem}_{precision}.plan"


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise RunnerUnavailableError("TensorRT needs a CUDA GPU and none is visible")
    return torch


def gpu_identity() -> dict:
    torch = _require_cuda()
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


# TensorRT for RTX runs engines on RTX-class GPUs only: by default compute capability 8.0, 8.6, 8.9 and
# 12.x (7.5 only when the build asks for it). It still parses and builds anywhere, even with no GPU at
# all (its ahead-of-time build: the engine is portable and its kernels are compiled where it loads), so
# `snncompile build` works on a CPU-only machine or an H100 (9.0), where no runner does.
RTX_RUNTIME_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0", "12.1")


def is_rtx(module_name: str) -> bool:
    """TensorRT-RTX (``tensorrt_rtx`` or its bindings wheel) rather than TensorRT."""
    return module_name.startswith("tensorrt_rtx")


def runtime_reason(module: str, compute_capability: str) -> str | None:
    """Why engines cannot run on this GPU with this TensorRT package, or None when they can."""
    if is_rtx(module) and compute_capability not in RTX_RUNTIME_CAPABILITIES:
        return (f"tensorrt_rtx runs engines only on compute capability {', '.join(RTX_RUNTIME_CAPABILITIES)}, this GPU "
                f"is {compute_capability} (`snncompile build` still parses and builds; install tensorrt to run them)")
    return None


def build_target(trt) -> dict:
    """What an engine is built for: this GPU (TensorRT: engines are tuned for the GPU they are built on);
    for TensorRT-RTX, any supported GPU, and no GPU is needed to build (``portable``)."""
    if not is_rtx(trt.__name__):
        return {**gpu_identity(), "portable": False}
    import torch

    built_on = torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else "no GPU (ahead-of-time build)"
    return {"gpu": built_on, "compute_capability": f"any of {', '.join(RTX_RUNTIME_CAPABILITIES)}", "portable": True}


def _strongly_typed_flags(trt) -> int:
    """``create_network`` flags: strongly typed where the package has the flag (all of 10.x, 11.x, RTX)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _model_bytes(onnx_path: Path, precision: str, typed: bool = False) -> tuple[bytes, int]:
    """The ONNX the builder parses: the file itself for fp32/tf32 or an export already typed for
    ``precision``, else its mixed-precision rewrite (and how many convs/matmuls it moved to ``precision``)."""
    if precision in ("fp32", "tf32") or typed:
        return onnx_path.read_bytes(), 0
    import onnx

    from ..mixed_precision import mixed_precision

    typed, reduced = mixed_precision(onnx.load(str(onnx_path)), precision)
    return typed.SerializeToString(), reduced


def profile_shapes(name: str, shape: tuple[int, ...], batch: tuple[int, int, int]) -> list[list[int]]:
    """The (min, opt, max) shapes of the network input ``name`` of ``shape``, whose one dynamic dimension (-1) is the
    batch: ``input [T, -1, C, H, W]`` of an unrolled export, or every input of a step export (``input``,
    ``output_sum``, each ``state.*``: ``[-1, ...]``)."""
    dynamic = [axis for axis, size in enumerate(shape) if size < 0]
    if len(dynamic) != 1:
        raise ExportError(f"input {name} of shape {tuple(shape)} has {len(dynamic)} dynamic dimensions: an engine's "
                          "profile takes one, the batch (export it again with this snncompile)")
    return [[size if size >= 0 else b for size in shape] for b in batch]


def build_engine(onnx_path: Path, engine_path: Path, options: BuildOptions, steps: int, typed: bool = False,
                 form: str = "unrolled") -> dict:
    """Parse ``onnx_path``, build for this GPU (TensorRT-RTX: for any RTX GPU, with or without one here),
    write the engine atomically; returns the sidecar dict. Every input's batch dimension spans
    ``options.batch`` in the engine's one profile. ``typed``: the export is already in ``options.precision``
    (model_fp16.onnx, ...), parsed as it is. ``steps`` and ``form``: the export's T and form, for the sidecar."""
    from ..artifacts import atomic_write_bytes

    options.validate()
    trt = tensorrt_module()
    gpu = build_target(trt)
    require_own_external_data(onnx_path)  # before the parser (or onnx.load) reads any file the model names
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))  # explicit batch is the only mode since 10
    parser = trt.OnnxParser(network, logger)
    model, reduced = _model_bytes(onnx_path, options.precision, typed)
    # path: where external weights (model.onnx.data) are looked up
    if not parser.parse(model, str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node_name() if hasattr(err, "node_name") else f"node #{err.node()}"
            errors.append(f"{node}: {err.desc()}")
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors)[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if hasattr(trt.BuilderFlag, "TF32"):  # TF32 would round fp32 conv inputs to 10 mantissa bits
        (config.set_flag if options.precision == "tf32" else config.clear_flag)(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *profile_shapes(tensor.name, tuple(tensor.shape), options.batch))
    lo, opt, hi = options.batch
    config.add_optimization_profile(profile)
    cache = None
    if not is_rtx(trt.__name__):  # TensorRT-RTX tunes nothing at build time: its timing-cache calls are no-ops
        cache_blob = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see the log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    if options.timing_cache and cache is not None:
        atomic_write_bytes(options.timing_cache, bytes(cache.serialize()))
    return {
        "format": ENGINE_FORMAT,
        "tensorrt": f"{trt.__name__} {trt.__version__}",
        **gpu,
        "precision": options.precision,
        "strongly_typed": bool(_strongly_typed_flags(trt)),
        "reduced_precision_nodes": reduced,
        "profile": {"min": lo, "opt": opt, "max": hi},
        "T": steps,
        "form": form,
        "build_seconds": round(seconds, 2),
        "layers": network.num_layers,
        "onnx": onnx_path.name,
    }


def rebuild_command(run_dir: Path, model_file: str, precision: str, batch: str | None = None) -> str:
    """The ``snncompile build`` command that writes this engine again: its export, its precision (build's
    default would write ``<model>_fp32.plan`` beside a stale fp16 one) and, when given, a batch profile."""
    # quoted: the profile and precision are read from the engine's sidecar, which a user can edit
    options = "".join([f" --model {shell_path(model_file)}" if model_file != "model.onnx" else "",
                       f" --precision {shell_path(precision)}" if precision != "fp32" else "",
                       f" --batch {shell_path(batch)}" if batch else ""])
    return f"`snncompile build {shell_path(run_dir)}{options}`"


def _recorded_profile(sidecar: dict) -> str | None:
    """The ``--batch MIN:OPT:MAX`` the engine was built with (its sidecar's ``profile``), so that a rebuild writes
    the same engine, not one with build's default profile."""
    p = sidecar.get("profile")
    return f"{p['min']}:{p['opt']}:{p['max']}" if isinstance(p, dict) and {"min", "opt", "max"} <= p.keys() else None


def check_engine_matches(sidecar: dict, run_dir: Path, model_file: str) -> None:
    """One-line error when an engine was built by another TensorRT or for another GPU (a portable
    TensorRT-RTX engine only needs the same TensorRT-RTX; whether it runs on this GPU is the runner's
    availability)."""
    trt = tensorrt_module()
    here = {"tensorrt": f"{trt.__name__} {trt.__version__}", **gpu_identity()}
    keys = ("tensorrt",) if sidecar.get("portable") else ("tensorrt", "gpu", "compute_capability")
    precision = sidecar.get("precision", "fp32")
    for key in keys:
        if sidecar.get(key) != here[key]:
            raise ArtifactError(f"{engine_name(model_file, precision)} was built for {key} {sidecar.get(key)!r}, this "
                                f"machine has {here[key]!r}: rebuild it with "
                                f"{rebuild_command(run_dir, model_file, precision, _recorded_profile(sidecar))}")


def check_engine_recorded(run_dir: Path, engine_path: Path, model_file: str, precision: str) -> None:
    """One-line error unless the engine and its sidecar are the files build recorded in the manifest (their
    SHA-256): a TensorRT engine is deserialized as compiled code for the GPU, so one copied in from elsewhere or
    edited, and a sidecar edited to pass the checks below, are not opened."""
    from ..artifacts import artifact_as_recorded

    for path in (engine_path, engine_path.with_suffix(".json")):
        if not artifact_as_recorded(run_dir, path.name):
            raise ArtifactError(f"{path} is not the file build wrote (not recorded, or its sha256 differs): rebuild "
                                f"it with {rebuild_command(run_dir, model_file, precision)}")


def check_engine_current(sidecar: dict, run_dir: Path, model_file: str) -> None:
    """One-line error when the engine was built from another ``model_file`` than the one exported now (a
    re-export, e.g. after more training or at another T, leaves the old engine behind)."""
    from ..artifacts import read_manifest

    export = read_manifest(run_dir).get("exports", {}).get(model_file, {})
    built_from = sidecar.get("onnx_sha256")
    if built_from is not None and built_from != export.get("sha256"):
        precision = sidecar.get("precision", "fp32")
        raise ArtifactError(f"{engine_name(model_file, precision)} was built from an earlier {model_file}: rebuild it "
                            f"with {rebuild_command(run_dir, model_file, precision, _recorded_profile(sidecar))}")


MAX_STREAMS = 4  # bound streams kept per runner (each holds T frames and three state sets on the GPU)


class TrtRunner(Runner):
    """Runs ``<model>_<precision>.plan`` (:func:`engine_name`); inputs/outputs live in torch CUDA tensors."""

    name = "trt"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            trt = tensorrt_module()
        except MissingDependencyError as e:
            return str(e)
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible"
        return runtime_reason(trt.__name__, gpu_identity()["compute_capability"])

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", precision: str = "fp32", cuda_graph: bool = True):
        torch = _require_cuda()
        trt = tensorrt_module()
        precision = ENGINE_PRECISION.get(precision, precision)
        engine_path = Path(run_dir) / engine_name(model_file, precision)
        sidecar_path = engine_path.with_suffix(".json")
        if not engine_path.is_file() or not sidecar_path.is_file():
            raise ArtifactError(f"no {engine_path.name} in {run_dir}: run "
                                f"{rebuild_command(Path(run_dir), model_file, precision)}")
        check_engine_recorded(Path(run_dir), engine_path, model_file, precision)
        sidecar = json.loads(sidecar_path.read_text())
        check_engine_matches(sidecar, Path(run_dir), model_file)
        check_engine_current(sidecar, Path(run_dir), model_file)
        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{engine_path} could not be deserialized (corrupt, or another TensorRT build)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        self._graph = None
        self._rebuild = (Path(run_dir), model_file, precision)  # for the batch-profile error
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._inputs = [TensorSpec(n, tuple(None if d < 0 else d for d in self.engine.get_tensor_shape(n)), "float32")
                        for n in self._input_names]
        self._shapes: dict[str, tuple] = {}  # the input shapes the context was last given
        self._streams: dict = {}  # (T, batch) -> TrtStream of a step-form engine

    def set_shapes(self, shapes: dict[str, tuple]) -> None:
        """Give the execution context these input shapes (when they are not the ones it has); one line naming
        the rebuild when one is outside the engine's profile."""
        if shapes == self._shapes:
            return
        self._shapes = {}
        for n, shape in shapes.items():
            if not self.context.set_input_shape(n, shape):  # False, not an exception, past the profile
                lo, opt, hi = self.engine.get_tensor_profile_shape(n, 0)
                axis = [d for d in self.engine.get_tensor_shape(n)].index(-1)  # the batch: [T, B, ...] or [B, ...]
                batch = shape[axis]
                profile = f"{min(lo[axis], batch)}:{opt[axis]}:{max(hi[axis], batch)}"
                raise ConfigError(f"{n} of shape {tuple(shape)} is outside the engine's profile ({tuple(lo)} to "
                                  f"{tuple(hi)}): build it again with "
                                  f"{rebuild_command(*self._rebuild, batch=profile)}")
        self._shapes = dict(shapes)

    def prepare(self, feed: dict[str, np.ndarray]):
        super().prepare(feed)
        torch = self._torch
        bufs = {n: torch.from_numpy(np.ascontiguousarray(feed[n])).cuda() for n in self._input_names}
        self.set_shapes({n: tuple(t.shape) for n, t in bufs.items()})
        for n in self._outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            bufs[n] = torch.empty(shape, dtype=torch.float32, device="cuda")
        self._graph = None
        return bufs

    def launch(self) -> None:
        """Queue one execution of the engine on :attr:`stream` with the context's shapes and addresses."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _bind(self, bufs: dict) -> None:
        """The context's shapes and addresses for a :meth:`prepare` handle (a stream may have set others since)."""
        self.set_shapes({n: tuple(bufs[n].shape) for n in self._input_names})
        for n, t in bufs.items():
            self.context.set_tensor_address(n, t.data_ptr())

    def run_prepared(self, handle) -> None:
        torch = self._torch
        if self.cuda_graph:
            if self._graph is None:
                self._bind(handle)
                self.launch()  # TensorRT allocates lazily on the first launch; capture after it
                self.stream.synchronize()
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=self.stream):
                    self.launch()
            with torch.cuda.stream(self.stream):  # replay() launches on the current stream: make it ours,
                self._graph.replay()  # or the synchronize below would not wait for the graph
        else:
            self._bind(handle)
            self.launch()
        self.stream.synchronize()

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bufs = self.prepare(feed)
        self._bind(bufs)
        self.launch()  # one call on fresh buffers: a graph would be captured for a single replay
        self.stream.synchronize()
        return {n: bufs[n].cpu().numpy() for n in self._outputs}

    def bind_stream(self, x: np.ndarray, state: str = "state.", next_state: str = "next."):
        """The :class:`~.trt_stream.TrtStream` of a step-form engine for ``x [T, B, ...]`` (made on first use per T
        and batch size, kept: a captured stream's graph stays valid only with its buffers), ``x`` loaded into it."""
        from .trt_stream import TrtStream

        key = (len(x), x.shape[1])
        stream = self._streams.get(key)
        if stream is None:
            if len(self._streams) >= MAX_STREAMS:  # verify uses 2 batch sizes, bench 3: drop the oldest
                self._streams.pop(next(iter(self._streams)))
            stream = self._streams[key] = TrtStream(self, len(x), x.shape[1], state, next_state)
        stream.load(x)
        return stream

    def close(self) -> None:
        self._streams.clear()
        self._graph = None
