"""OpenVINO runner (its CPU plugin): a second, independent consumer of the exported ONNX. The only importer of
openvino.

OpenVINO reads the ONNX file with its own frontend and computes with its own kernels (oneDNN and its own
JIT code), none of it shared with ONNX Runtime: a file that verifies on both is standard ONNX as two
runtimes read it, not one runtime's dialect.

Like the ONNX Runtime runners, it compiles one *shape-specialized* model per batch size (the named dynamic
dimensions fixed by ``reshape``), which lets the plugin pick its kernels for the actual shapes.

Numerics: the CPU plugin's default ``INFERENCE_PRECISION_HINT`` is bf16 on every CPU with bf16 instructions
(AVX512-BF16, AMX), which flips spikes by the thousand on an fp32 network. The runner compiles with the
hint at f32 and ``EXECUTION_MODE_HINT`` ACCURACY (no precision-lowering rewrites), so an fp32 graph computes
in fp32. A fp16 or bf16 export is judged by verify at its own precision's tolerances, as on ONNX Runtime, whatever
precision the plugin computes its 16-bit nodes at on the CPU at hand."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, InputError
from ..onnx_files import require_own_external_data
from ..text import counted
from .base import Runner, TensorSpec, usable_cpus

__all__ = ["OpenVinoCpuRunner", "OvStream", "compile_config"]

MAX_COMPILED = 4  # shape-specialized compiled models kept per runner (verify uses 2 batch sizes, bench 3)


def _openvino():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def compile_config(threads: int, profile: bool = False) -> dict[str, str]:
    """The CPU plugin's settings: fp32 arithmetic as written, one inference at a time on ``threads`` threads
    (latency: bench times one batch after another, verify runs them in turn); ``profile``: its per-node
    performance counters on."""
    return {
        "INFERENCE_PRECISION_HINT": "f32",
        "EXECUTION_MODE_HINT": "ACCURACY",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "PERF_COUNT": "YES" if profile else "NO",
    }


@dataclass
class OvStream:
    """A step-form export's T calls on two infer requests of one compiled model, every state passed from call to
    call in place: what ``BoundStream`` is for ONNX Runtime. The even calls run on one request, the odd ones on
    the other; each request writes its states into host buffers of ours that the other request reads them from
    (bound once: a request cannot read the tensors it writes), so no call copies a state. Call 0 reads the odd
    request's buffers, zeroed before each stream. Frames are host arrays the input tensors share.
    """

    requests: list  # call t's infer request: the first request for even t, the second for odd t
    opening_states: list[np.ndarray]  # the state buffers call 0 reads (the odd request writes them): zeroed per stream
    # every state buffer, held here: a request bound to a buffer's Tensor does not keep the array alive
    state_buffers: list[np.ndarray]
    frames: list[np.ndarray]  # T arrays [B, ...], call t's input, shared with ``frame_tensors``
    frame_tensors: list
    output_names: list[str]
    mode: str  # how the calls execute, for bench's table
    profiled: list | None = None  # the runner's per-inference profiles, when it profiles

    def load(self, x: np.ndarray) -> None:
        """Copy ``x [T, B, ...]`` into the frames (in place: their tensors share them)."""
        for frame, x_t in zip(self.frames, x):
            np.copyto(frame, x_t)

    def run(self, collect: bool = False) -> list[dict[str, np.ndarray]]:
        """The T calls on the loaded frames; with ``collect``, every call's outputs copied out."""
        for state in self.opening_states:
            state.fill(0)
        outputs = []
        for request, frame in zip(self.requests, self.frame_tensors):
            request.set_tensor("input", frame)
            # not infer(): it wraps every output, states included, in a dict of arrays (copies, by default)
            request.start_async()
            request.wait()
            if self.profiled is not None:
                self.profiled.append(_executed_nodes(request))
            if collect:
                outputs.append({name: request.get_tensor(name).data.copy() for name in self.output_names})
        return outputs


class OpenVinoCpuRunner(Runner):
    """One ONNX export on OpenVINO's CPU plugin: ``infer({name: array}) -> {name: array}``.

    Args:
        run_dir: the run directory holding the export.
        model_file: which export (``model.onnx``, ``model_layers.onnx``, ``model_step.onnx``, ...).
        threads: the plugin's inference threads (0: one per usable core, as ``ort-cpu``).
        profile: the plugin's performance counters on (a slower run: for ``bench --profile`` alone); each
            inference's executed nodes are kept for :meth:`profiled_runs`.
    """

    name = "ov-cpu"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _openvino() is None:
            return "openvino is not installed: pip install 'snncompile[openvino]'"
        return None

    def __init__(self, run_dir: Path, model_file: str = "model.onnx", threads: int = 0, profile: bool = False):
        self.path = Path(run_dir) / model_file
        if not self.path.is_file():
            from ..exports import missing_export

            raise missing_export(run_dir, model_file)
        require_own_external_data(self.path)  # before OpenVINO reads any file the model names
        self.threads = threads or usable_cpus()
        self.profile = profile
        self._profiled: list[dict[str, tuple[str, str, float]]] = []
        openvino = _openvino()
        self._core = openvino.Core()
        # its ONNX frontend by name: Core.read_model tries every frontend on a file it cannot parse (TensorFlow's
        # prints parse errors to stderr) and then says only that none could read it
        onnx_frontend = openvino.frontend.FrontEndManager().load_by_framework("onnx")
        try:
            self._model = onnx_frontend.convert(onnx_frontend.load(str(self.path)))
        except Exception as e:  # openvino raises its own GeneralFailure/RuntimeError types
            raise ArtifactError(f"{self.path} cannot be loaded by OpenVINO: {_message(e)}") from None
        if not self._model.inputs or not self._model.outputs:  # an empty file reads as a model without a graph
            raise ArtifactError(f"{self.path} cannot be loaded by OpenVINO: it has no graph (no inputs or outputs)")
        self._inputs = [TensorSpec(port.get_any_name(), _dims(port.get_partial_shape()), _dtype(port))
                        for port in self._model.inputs]
        self._outputs = [port.get_any_name() for port in self._model.outputs]
        self._requests: OrderedDict = OrderedDict()  # input shapes -> an infer request of a compiled model
        self._streams: dict = {}  # input shapes -> the OvStream on that compiled model

    def timing_mode(self, handle) -> str:
        # what the plugin runs: it caps INFERENCE_NUM_THREADS at the cores it may use (--threads 8 on 2 cores is 2)
        threads = int(self._request_for(handle).get_compiled_model().get_property("INFERENCE_NUM_THREADS"))
        return f"CPU, {counted(threads, 'thread')}"

    def _request_for(self, feed: dict[str, np.ndarray]):
        """The infer request of the model compiled for ``feed``'s shapes, compiled on first use (LRU)."""
        shapes = tuple((name, feed[name].shape) for name in sorted(feed))
        if shapes in self._requests:
            self._requests.move_to_end(shapes)
            return self._requests[shapes]
        self._require_one_batch(feed)
        while len(self._requests) >= MAX_COMPILED:
            old, _ = self._requests.popitem(last=False)
            self._streams.pop(old, None)
        model = self._model.clone()
        try:  # shapes the graph cannot take fail here (validate_feed checks only each input on its own)
            model.reshape({name: list(shape) for name, shape in shapes})
        except Exception as e:
            raise InputError(f"OpenVINO cannot fix {self.path.name}'s inputs at these shapes: {_message(e)}") from None
        try:
            compiled = self._core.compile_model(model, "CPU", compile_config(self.threads, self.profile))
        except Exception as e:
            raise ArtifactError(f"{self.path} cannot be compiled by OpenVINO's CPU plugin: {_message(e)}") from None
        request = self._requests[shapes] = compiled.create_infer_request()
        return request

    def _require_one_batch(self, feed: dict[str, np.ndarray]) -> None:
        """One-line :class:`InputError` unless every input's dynamic axes (an export's one named dimension,
        ``batch``) have one size, and that size is not 0 (the plugin's shape inference refuses an empty batch)."""
        sizes = [(spec.name, axis, feed[spec.name].shape[axis]) for spec in self.inputs
                 for axis, dim in enumerate(spec.shape) if dim is None and spec.name in feed]
        for name, axis, size in sizes:
            if size == 0:
                raise InputError(f"input {name!r}: axis {axis} (batch) is 0: OpenVINO runs no empty batch")
            if size != sizes[0][2]:
                raise InputError(f"input {name!r}: axis {axis} (batch) is {size}, input {sizes[0][0]!r} gives "
                                 f"batch = {sizes[0][2]}")

    def _infer(self, feed: dict[str, np.ndarray], copies: bool):
        """One inference on ``feed`` (host arrays it reads in place); returns the outputs, as arrays of their own
        with ``copies`` (else views of the request's tensors, which its next inference overwrites)."""
        request = self._request_for(feed)
        outputs = request.infer(feed, share_inputs=True, share_outputs=not copies)
        if self.profile:
            self._profiled.append(_executed_nodes(request))
        return outputs

    def bind_stream(self, x: np.ndarray, state: str = "state.", next_state: str = "next.") -> OvStream:
        """The :class:`OvStream` of a step-form file for ``x [T, B, ...]`` (made on first use per batch size and
        kept), ``x`` loaded into it."""
        batch = x.shape[1]
        feed = {spec.name: np.zeros([batch if d is None else d for d in spec.shape], spec.dtype)
                for spec in self.inputs}
        shapes = tuple((name, feed[name].shape) for name in sorted(feed))
        stream = self._streams.get(shapes)
        if stream is None or len(stream.frames) != len(x):
            compiled = self._request_for(feed).get_compiled_model()
            even, odd = compiled.create_infer_request(), compiled.create_infer_request()
            carried = {name: next_state + name.removeprefix(state) for name in feed if name != "input"}
            opening_states, state_buffers = [], []
            for name, written in carried.items():  # each request writes the buffers the other reads
                by_even, by_odd = _buffer(compiled.output(written)), _buffer(compiled.output(written))
                even.set_tensor(written, by_even[1])
                odd.set_tensor(name, by_even[1])
                odd.set_tensor(written, by_odd[1])
                even.set_tensor(name, by_odd[1])
                opening_states.append(by_odd[0])
                state_buffers += [by_even[0], by_odd[0]]
            frames = [np.zeros_like(feed["input"]) for _ in range(len(x))]
            tensor = _openvino().Tensor
            mode = f"{self.timing_mode(feed)}, {len(x)} step calls, states bound in place"
            stream = self._streams[shapes] = OvStream(
                [even if t % 2 == 0 else odd for t in range(len(x))], opening_states, state_buffers, frames,
                [tensor(frame, shared_memory=True) for frame in frames], list(self._outputs), mode,
                self._profiled if self.profile else None)
        stream.load(x)
        return stream

    def profiled_runs(self) -> list[dict[str, tuple[str, str, float]]]:
        """Per inference of a runner made with ``profile=True``, in order: every node the plugin executed, as
        ``{node: (operation, kernel, microseconds)}`` (the kernel names the ISA and precision,
        ``brgconv_avx512_f32``)."""
        if not self.profile:
            raise ValueError("profiled_runs needs a runner made with profile=True")
        return self._profiled

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._infer({name: np.ascontiguousarray(arr) for name, arr in feed.items()}, copies=True)
        return {name: outputs[name] for name in self._outputs}

    def run_prepared(self, handle) -> None:
        # the inputs are host arrays already (nothing to move), and the results stay in the request's tensors:
        # a timed call computes, as ort-cpu's, and copies nothing out
        self._infer(handle, copies=False)

    def close(self) -> None:
        self._streams.clear()
        self._requests.clear()


def _executed_nodes(request) -> dict[str, tuple[str, str, float]]:
    """The nodes ``request``'s last inference executed (performance counters on), as
    ``{node: (operation, kernel, microseconds)}``."""
    return {info.node_name: (info.node_type, info.exec_type, info.real_time.total_seconds() * 1e6)
            for info in request.get_profiling_info() if info.status.name == "EXECUTED"}


def _buffer(port) -> tuple[np.ndarray, object]:
    """A zeroed host array of a compiled model's output ``port`` (its static shape and element type) and the
    Tensor that shares it."""
    array = np.zeros(list(port.get_shape()), port.get_element_type().to_dtype())
    return array, _openvino().Tensor(array, shared_memory=True)


def _message(error: Exception) -> str:
    """OpenVINO's own message in an exception's text: its last line (the lines before it name the C++ source
    lines the error passed through, ``Exception from src/...cpp:84:``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _dims(shape) -> tuple[int | None, ...]:
    """A PartialShape as TensorSpec dimensions: ints, None for a dynamic one (the batch)."""
    return tuple(dim.get_length() if dim.is_static else None for dim in shape)


def _dtype(port) -> str:
    """The numpy dtype name of a port's element type (``f32`` -> ``float32``)."""
    return np.dtype(port.get_element_type().to_dtype()).name
