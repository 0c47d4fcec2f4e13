"""ONNX Runtime runners (CPU and CUDA execution providers). The only importer of onnxruntime.

Both runners run one *shape-specialized* session per batch size: the export's named dynamic
dimensions (``batch``) are fixed with ONNX Runtime's free-dimension overrides, so its constant folding
removes the graph's shape arithmetic (Shape/Gather/Expand, ~10 % of the nodes) and every remaining node
computes on tensors. On the CPU that is 1-14 % faster and bit-identical; on CUDA it is what lets the
whole graph sit on the GPU and be captured in a CUDA graph (``ort-cuda``)."""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, InputError, first_line
from ..onnx_files import require_own_external_data
from ..text import counted
from .base import Runner, TensorSpec, usable_cpus, validate_feed

__all__ = ["OrtCpuRunner", "OrtCudaRunner", "BoundStream", "cuda_provider_options", "session_outputs", "free_dimensions",
           "usable_cpus"]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
MAX_SESSIONS = 4  # shape-specialized sessions kept per runner (verify uses 2 batch sizes, bench 3)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def free_dimensions(feed: dict[str, np.ndarray], declared: dict[str, tuple]) -> tuple[tuple[str, int], ...]:
    """The value ``feed`` gives each named dynamic dimension of the graph inputs, e.g. ``(("batch", 16),)``.

    ``declared`` maps input names to ONNX Runtime's shapes (ints, or strings for named dimensions)."""
    sizes: dict[str, int] = {}
    for name, shape in declared.items():
        for axis, dim in enumerate(shape):
            if isinstance(dim, str) and dim:
                size = int(feed[name].shape[axis])
                if sizes.setdefault(dim, size) != size:
                    raise InputError(f"input {name!r}: axis {axis} ({dim}) is {size}, another input gives {dim} = {sizes[dim]}")
    return tuple(sorted(sizes.items()))


def _numpy_type(ort_type: str) -> type:
    """numpy scalar type of an ONNX Runtime tensor type string (``tensor(float)`` -> ``np.float32``)."""
    if ort_type not in _ORT_TYPES:
        raise ArtifactError(f"unsupported tensor type {ort_type} at the graph boundary")
    return np.dtype(_ORT_TYPES[ort_type]).type


@dataclass
class BoundStream:
    """A step-form export's T calls on one shape-specialized session, every tensor bound in place on the
    runner's device (IO binding): between its calls a stream moves nothing between host and device, where a
    stream of ``session.run`` calls would take every state to the host and back at every step.

    Call t reads frame t and the states call t-1 wrote, and writes its own: the states live in three buffer
    sets, ``zeros`` (what call 0 reads; never written, so a stream starts from rest without a reset copy)
    and two that calls alternate between (call t writes set ``t % 2``, call t+1 reads it). Outputs that are
    not states (``scores``) share one buffer: the last call's value is the stream's.

    On a CUDA-graph session each call has a graph of its own (``gpu_graph_id`` t+1: a captured graph
    replays the addresses it was captured with, and each call's differ). Timed streams wait for the device
    once, after the last call: the others return as soon as they are queued
    (``disable_synchronize_execution_providers``), so the device never idles between a stream's calls, which
    follow each other on its one stream. A stream whose outputs are collected waits at every call, as the
    copies to the host must.
    """

    session: object
    bindings: list  # one IOBinding per call
    run_options: list  # per call, RunOptions (or None) that wait for the device (collected streams)
    timed_options: list  # the same, but only the last call waits (timed streams)
    frames: list  # T OrtValues [B, ...]: call t's input
    output_names: list[str]  # what copy_outputs_to_cpu returns, in its order
    mode: str  # how the calls execute, for bench's table

    def load(self, x: np.ndarray) -> None:
        """Copy ``x [T, B, ...]`` into the bound frames (in place: their addresses must not change)."""
        for frame, x_t in zip(self.frames, x):
            frame.update_inplace(np.ascontiguousarray(x_t))

    def run(self, collect: bool = False) -> list[dict[str, np.ndarray]]:
        """The T calls on the loaded frames; with ``collect``, every call's outputs copied to the host."""
        outputs = []
        for binding, options in zip(self.bindings, self.run_options if collect else self.timed_options):
            self.session.run_with_iobinding(binding, options)
            if collect:
                outputs.append(dict(zip(self.output_names, binding.copy_outputs_to_cpu())))
        self.bindings[-1].synchronize_outputs()  # return only once the stream's results are complete
        return outputs

    def release(self) -> None:
        for binding in self.bindings:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()


def _run_options(entries: dict[str, str]):
    """RunOptions with these config entries; None for none (a RunOptions passed at all costs ~25 us per run on
    the CPU provider: a quarter of a small model's step at batch 1)."""
    if not entries:
        return None
    options = _onnxruntime().RunOptions()
    for key, value in entries.items():
        options.add_run_config_entry(key, value)
    return options


class _OrtRunner(Runner):
    provider = "CPUExecutionProvider"
    provider_options: dict[str, str] = {}
    device = "cpu"  # where bound buffers live (IO binding)
    asynchronous = False  # whether a run may return before its provider has finished (a GPU's: it waits unless told)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        ort = _onnxruntime()
        if ort is None:
            return "onnxruntime is not installed: pip install 'snncompile[onnx]'"
        if cls.provider not in ort.get_available_providers():
            return f"{cls.provider} is not in this onnxruntime build (pip install onnxruntime-gpu for CUDA)"
        return None

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", threads: int = 0, profile: bool = False):
        self.path = Path(run_dir) / model_file
        if not self.path.is_file():
            from ..exports import missing_export

            raise missing_export(run_dir, model_file)
        require_own_external_data(self.path)  # before ONNX Runtime reads any file the model names
        self.threads = threads
        # profile: ONNX Runtime's profiler on in every session (a slower run: for `bench --profile` alone), its
        # traces in a directory of the runner's own until profiled_events() reads them
        self._profile_dir = tempfile.mkdtemp(prefix="snncompile-ort-profile-") if profile else None
        # The dynamic session validates the file and declares the inputs, then goes: runs use
        # specialized ones (it would hold a second copy of the weights on the GPU)
        session = self._open(())
        declared = session.get_inputs()
        self._declared = {i.name: tuple(i.shape) for i in declared}
        self._inputs = [
            TensorSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), _ORT_TYPES.get(i.type, i.type))
            for i in declared
        ]
        self._outputs = [o.name for o in session.get_outputs()]
        self._output_shapes = {o.name: tuple(o.shape) for o in session.get_outputs()}
        self._types = {t.name: t.type for t in [*declared, *session.get_outputs()]}  # ONNX Runtime's type strings
        self._specialized: OrderedDict = OrderedDict()
        self._streams: dict = {}  # dims -> BoundStream on that specialized session

    def timing_mode(self, handle) -> str:
        return f"CPU, {counted(self._intra_op_threads(), 'thread')}"

    def _intra_op_threads(self) -> int:
        return self.threads or usable_cpus()

    def _session_options(self, dims: tuple[tuple[str, int], ...]):
        ort = _onnxruntime()
        opts = ort.SessionOptions()
        # Intra-op threads: one per usable CPU (the affinity mask) by default; inter-op parallelism buys nothing
        # for a straight-line unrolled graph and contends with intra-op threads.
        opts.intra_op_num_threads = self._intra_op_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        for name, size in dims:
            opts.add_free_dimension_override_by_name(name, size)
        if self._profile_dir and dims:  # the dynamic session only validates the file: nothing to profile
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(self._profile_dir) / "ort")
        return opts

    def profiled_events(self) -> list[dict]:
        """Every event ONNX Runtime's profiler recorded in this runner's sessions (made with ``profile=True``),
        read from the traces it writes when profiling ends, which it then does: call once, after the runs."""
        import json

        if self._profile_dir is None:
            raise ValueError("profiled_events needs a runner made with profile=True")
        events: list[dict] = []
        for specialized in self._specialized.values():
            trace = Path(self._session_of(specialized).end_profiling())
            events += json.loads(trace.read_text())  # ONNX Runtime's own JSON, from this process
            trace.unlink()
        return events

    def _create(self, dims: tuple[tuple[str, int], ...], extra_options: dict[str, str] | None = None,
                cpu_fallback: bool = True):
        """An InferenceSession with the named dimensions ``dims`` fixed (none: the dynamic graph).
        ``cpu_fallback=False``: fail rather than place any node on the CPU provider."""
        ort = _onnxruntime()
        opts = self._session_options(dims)
        if not cpu_fallback:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options = {**self.provider_options, **(extra_options or {})}
        return ort.InferenceSession(str(self.path), sess_options=opts, providers=[(self.provider, options)])

    def _open(self, dims: tuple[tuple[str, int], ...]):
        """:meth:`_create` with ONNX Runtime's errors as one line naming the file."""
        try:
            return self._create(dims)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            hint = ""
            if "NOT_IMPLEMENTED" in str(e):  # e.g. a bf16 Conv on the CPU provider: the file is fine, the build lacks it
                hint = (f"; this ONNX Runtime's {self.provider} has no kernel for it at the file's precision: "
                        "another runner checks it (torch-fast, ov-cpu, or ort-cuda on a GPU)")
            raise ArtifactError(f"{self.path} cannot be loaded by ONNX Runtime: {first_line(e)}{hint}") from None

    def _specialized_for(self, feed: dict[str, np.ndarray]):
        """The shape-specialized runtime object for ``feed``'s dimensions, created on first use (LRU)."""
        return self._specialized[self._dims_for(feed)]

    def _dims_for(self, feed: dict[str, np.ndarray]) -> tuple[tuple[str, int], ...]:
        """``feed``'s named dimensions, with a specialized object made for them (the least recently used one
        and its stream released when :data:`MAX_SESSIONS` are held). ``feed`` may hold only the inputs that
        name them."""
        dims = free_dimensions(feed, {name: shape for name, shape in self._declared.items() if name in feed})
        if dims in self._specialized:
            self._specialized.move_to_end(dims)
        else:
            while len(self._specialized) >= MAX_SESSIONS:
                old, specialized = self._specialized.popitem(last=False)
                self._release_stream(old)
                self._release(specialized)
            self._specialized[dims] = self._specialize(dims)
        return dims

    def _specialize(self, dims):
        return self._open(dims)

    def _session_of(self, specialized):
        """The InferenceSession of a :meth:`_specialize` result."""
        return specialized

    def _graphs(self, specialized) -> bool:
        """Whether that session captures CUDA graphs (then each bound call needs a graph id of its own)."""
        return False

    def _release(self, specialized) -> None:
        """Free what :meth:`_specialize` made (sessions go with their last reference)."""

    def _release_stream(self, dims) -> None:
        stream = self._streams.pop(dims, None)
        if stream is not None:
            stream.release()

    def _buffer(self, name: str, shape: tuple, sizes: dict[str, int]):
        """A device buffer for tensor ``name`` of the graph, its named dimensions taken from ``sizes``."""
        ort = _onnxruntime()
        fixed = [sizes.get(d, d) for d in shape]
        if not all(isinstance(d, int) for d in fixed):
            raise ArtifactError(f"{self.path}: {name!r} has a shape the inputs do not fix: {list(shape)}")
        return ort.OrtValue.ortvalue_from_shape_and_type(fixed, _numpy_type(self._types[name]), self.device, 0)

    def bind_stream(self, x: np.ndarray, state: str = "state.", next_state: str = "next.") -> BoundStream:
        """The :class:`BoundStream` of a step-form file for ``x [T, B, ...]`` (made on first use per batch size
        and kept with its session: a stream's graphs stay valid only with its buffers), ``x`` loaded into it."""
        dims = self._dims_for({"input": x[0]})
        stream = self._streams.get(dims)
        if stream is None or len(stream.frames) != len(x):
            self._release_stream(dims)
            stream = self._streams[dims] = self._bind_stream(dims, len(x), state, next_state)
        stream.load(x)
        return stream

    def _bind_stream(self, dims, steps: int, state: str, next_state: str) -> BoundStream:
        specialized = self._specialized[dims]
        session, sizes = self._session_of(specialized), dict(dims)
        states = [n for n in self._declared if n != "input"]  # output_sum and the state.* tensors
        written = {n: next_state + n.removeprefix(state) for n in states}  # the output that carries each forward
        declared = {**self._declared, **self._output_shapes}
        zeros = {n: self._buffer(n, declared[n], sizes) for n in states}
        for name, value in zeros.items():
            value.update_inplace(np.zeros(value.shape(), _numpy_type(self._types[name])))
        sets = [{n: self._buffer(n, declared[n], sizes) for n in states} for _ in range(2)]
        shared = {n: self._buffer(n, declared[n], sizes) for n in self._outputs if n not in written.values()}
        frames = [self._buffer("input", declared["input"], sizes) for _ in range(steps)]
        bindings, options, timed = [], [], []
        for t in range(steps):
            targets = {**shared, **{written[n]: sets[t % 2][n] for n in states}}
            binding = session.io_binding()
            binding.bind_ortvalue_input("input", frames[t])
            for name in states:
                binding.bind_ortvalue_input(name, (zeros if t == 0 else sets[(t - 1) % 2])[name])
            for name in self._outputs:  # bound in the graph's order: copy_outputs_to_cpu returns them so
                binding.bind_ortvalue_output(name, targets[name])
            bindings.append(binding)
            graph = {"gpu_graph_id": str(t + 1)} if self._graphs(specialized) else {}  # 0 is the session's own, -1 none
            queued = {"disable_synchronize_execution_providers": "1"} if self.asynchronous and t < steps - 1 else {}
            options.append(_run_options(graph))
            timed.append(_run_options({**graph, **queued}))
        mode = ", ".join(filter(None, [self.timing_mode(specialized), f"{steps} step calls, states bound in place"]))
        return BoundStream(session, bindings, options, timed, frames, list(self._outputs), mode)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._specialized_for(feed)
        outs = session.run(self._outputs, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return dict(zip(self._outputs, outs))

    def close(self) -> None:
        for dims in list(self._streams):
            self._release_stream(dims)
        for specialized in self._specialized.values():
            self._release(specialized)
        self._specialized.clear()
        if self._profile_dir:
            shutil.rmtree(self._profile_dir, ignore_errors=True)


class OrtCpuRunner(_OrtRunner):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"


@dataclass
class _BoundSession:
    """One CUDA session for one input shape, with its inputs and outputs bound to fixed GPU buffers
    (what CUDA-graph replay requires: the captured kernels read and write those addresses)."""

    session: object
    binding: object
    inputs: dict = field(default_factory=dict)  # name -> OrtValue on the GPU
    outputs: dict = field(default_factory=dict)
    cuda_graph: bool = False
    note: str = ""  # why there is no CUDA graph


class OrtCudaRunner(_OrtRunner):
    """CUDA provider, one shape-specialized session per batch size with inputs and outputs bound on the
    GPU (IO binding: timed calls move nothing across PCIe), captured in a CUDA graph when every node of
    the specialized graph runs on the CUDA provider (ONNX Runtime captures on an early run and replays
    it after). ``cuda_graph=False``: plain launches, for comparison."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    # The CUDA provider runs float convolutions and GEMMs in TF32 unless told otherwise (10-bit mantissa
    # inputs): off, so the graph computes what it says and verifies spike for spike against fp32 ...
    provider_options = {"use_tf32": "0"}
    device = "cuda"  # where the bound buffers live
    asynchronous = True
    graph_options = {"enable_cuda_graph": "1"}

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", threads: int = 0, cuda_graph: bool = True,
                 profile: bool = False):
        # ... except on a tf32x2 export, whose split weights are made for TF32 (fp32-accurate under it)
        self.provider_options = cuda_provider_options(run_dir, model_file)
        self.cuda_graph = cuda_graph
        super().__init__(run_dir, model_file, threads, profile)

    def _specialize(self, dims) -> _BoundSession:
        session, note = None, "" if self.cuda_graph else "CUDA graph off"
        if self.cuda_graph:
            try:  # all nodes on CUDA or no graph: a node left on the CPU would break capture
                session = self._create(dims, self.graph_options, cpu_fallback=False)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own error types, reported as the reason
                note = f"no CUDA graph: {first_line(e)}"
        bound = _BoundSession(session or self._open(dims), None, cuda_graph=session is not None, note=note)
        bound.binding = bound.session.io_binding()
        sizes = dict(dims)
        for name, shape in self._declared.items():
            bound.inputs[name] = self._buffer(name, shape, sizes)
            bound.binding.bind_ortvalue_input(name, bound.inputs[name])
        for name in self._outputs:
            bound.outputs[name] = self._buffer(name, self._output_shapes[name], sizes)
            bound.binding.bind_ortvalue_output(name, bound.outputs[name])
        return bound

    def _session_of(self, specialized: _BoundSession):
        return specialized.session

    def _graphs(self, specialized: _BoundSession) -> bool:
        return specialized.cuda_graph

    def _load(self, feed: dict[str, np.ndarray]) -> _BoundSession:
        bound = self._specialized_for(feed)
        for name, arr in feed.items():  # into the bound buffers: their addresses must not change
            bound.inputs[name].update_inplace(np.ascontiguousarray(arr))
        return bound

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bound = self._load(feed)
        self.run_prepared(bound)
        return dict(zip(self._outputs, bound.binding.copy_outputs_to_cpu()))  # bound in this order

    def prepare(self, feed: dict[str, np.ndarray]) -> _BoundSession:
        validate_feed(feed, self.inputs)
        return self._load(feed)

    def run_prepared(self, handle: _BoundSession) -> None:
        handle.session.run_with_iobinding(handle.binding)
        handle.binding.synchronize_outputs()  # return only once the results are on the GPU

    def timing_mode(self, handle: _BoundSession) -> str:
        return "CUDA graph" if handle.cuda_graph else handle.note

    def _release(self, specialized: _BoundSession) -> None:
        specialized.binding.clear_binding_inputs()
        specialized.binding.clear_binding_outputs()


def cuda_provider_options(run_dir: Path, model_file: str) -> dict[str, str]:
    """CUDA provider options for an export: TF32 only for a ``tf32x2`` export (split weights); for an
    exact-arithmetic model (``model.exact``), cuDNN's implicit-GEMM convolution always (``DEFAULT``).

    The provider times every cuDNN algorithm by default and keeps the fastest, which may be Winograd or FFT:
    those transform their operands, which rounds, and an exact model's sums would no longer be exact. The
    implicit GEMM sums the products themselves, exact on the model's grids in any order (as torch's runners
    convolve such a model without cuDNN)."""
    from ..artifacts import read_manifest
    from ..runs import CONFIG, load_run_config

    run_dir = Path(run_dir)
    entry = read_manifest(run_dir).get("exports", {}).get(model_file, {})
    options = {"use_tf32": "1" if entry.get("precision") == "tf32x2" else "0"}
    if (run_dir / CONFIG).is_file() and load_run_config(run_dir).model.exact:
        options["cudnn_conv_algo_search"] = "DEFAULT"
    return options


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
