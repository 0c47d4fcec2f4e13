"""A step-form export (``model_step.onnx``) streamed over T steps, behind the unrolled model's interface.

A streaming deployment (an event camera's frames as they come) runs the step form: one call per timestep,
every state an explicit input and output. :class:`StreamedRunner` wraps any runner of that file and feeds it
``input [T, B, ...]`` one step at a time from zero states, each call's ``next.*`` outputs becoming the next
call's ``state.*`` inputs. It returns what an unrolled ``_layers`` export returns, so verify compares every
LIF layer's spikes and membranes step by step and bench times a batch of T steps, both unchanged::

    scores [B, classes], <lif>.spikes [T, B, ...], <lif>.membrane [T, B, ...]

(the step graph's ``next.<lif>.o`` and ``next.<lif>.u`` of each step, stacked over time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import Runner, TensorSpec, validate_feed
from .errors import ArtifactError

__all__ = ["STREAM_RUNNERS", "StreamedRunner", "streamed"]

STATE, NEXT = "state.", "next."
# The runners that run a step-form file: the torch module, ONNX Runtime, OpenVINO, and TensorRT on an engine built
# from it (`snncompile build RUN --model model_step.onnx`); torch-fast and the per-timestep references take unrolled
# exports
STREAM_RUNNERS = ("torch", "ort-cpu", "ort-cuda", "ov-cpu", "trt")


@dataclass
class _Stream:
    """One prepared input for a runner without bound streams: its T step inputs ``[B, ...]`` each and the zero
    states a stream starts from, run as T ``infer`` calls (states through the host between them)."""

    inner: Runner
    steps: list[np.ndarray]
    zeros: dict[str, np.ndarray]

    def run(self, collect: bool = False) -> list[dict[str, np.ndarray]]:
        """The T calls; every call's outputs (collected or not: they are on the host anyway)."""
        states = self.zeros
        outputs = []
        for x_t in self.steps:
            out = self.inner.infer({"input": x_t, **states})
            states = {name: out[NEXT + name.removeprefix(STATE)] for name in states}
            outputs.append(out)
        return outputs


class StreamedRunner(Runner):
    """Runs a step-form export's runner over T steps: ``infer({"input": [T, B, ...]})`` -> scores and every
    LIF layer's spikes and membranes ``[T, B, ...]``.

    A runner with bound streams (``bind_stream``: ONNX Runtime's :class:`~.backends.ort.BoundStream`, OpenVINO's
    :class:`~.backends.ov.OvStream`, TensorRT's :class:`~.backends.trt_stream.TrtStream`) keeps the states where it computes, in place, between calls; any
    other is called with host arrays.

    Args:
        step_runner: a runner of the step-form file (inputs ``input [B, ...]``, ``output_sum`` and the
            ``state.*`` tensors; outputs ``scores``, ``next.output_sum`` and the ``next.*`` states).
        steps: T, the number of calls one input makes.
        bind_states: use the runner's bound streams where it has them (False: states through the host,
            to measure what binding saves).
    """

    def __init__(self, step_runner: Runner, steps: int, bind_states: bool = True):
        self.inner = step_runner
        self.steps = steps
        self.name = step_runner.name
        self.bound = bind_states and hasattr(step_runner, "bind_stream")
        specs = {s.name: s for s in step_runner.inputs}
        missing = [n for n in ("input", "output_sum") if n not in specs]
        carried = ["output_sum"] + [n for n in specs if n.startswith(STATE)]
        unanswered = [NEXT + n.removeprefix(STATE) for n in carried if NEXT + n.removeprefix(STATE) not in step_runner.output_names]
        if missing or unanswered or "scores" not in step_runner.output_names:
            raise ArtifactError(f"not a step-form export: inputs or outputs missing ({', '.join(missing + unanswered)})")
        self._state_specs = [specs[n] for n in carried]
        self._lifs = [n[len(STATE):-len(".u")] for n in specs if n.startswith(STATE) and n.endswith(".u")]
        frame = specs["input"]
        self._inputs = [TensorSpec("input", (steps, *frame.shape), frame.dtype)]
        self._outputs = ["scores"] + [f"{lif}.{kind}" for lif in self._lifs for kind in ("spikes", "membrane")]
        # the flags that describe how the inner runner computes (bench's rows, verify's report)
        self.cuda_graph = getattr(step_runner, "cuda_graph", False)

    def prepare(self, feed: dict[str, np.ndarray]):
        """``feed``'s T frames placed for the calls: a bound stream with them loaded, or a :class:`_Stream`."""
        validate_feed(feed, self.inputs)
        x = feed["input"]
        if self.bound:
            return self.inner.bind_stream(x, STATE, NEXT)
        # zeros shaped like each state with the batch of this input: the states' other dimensions are fixed
        zeros = {s.name: np.zeros((x.shape[1], *s.shape[1:]), dtype=s.dtype) for s in self._state_specs}
        return _Stream(self.inner, [np.ascontiguousarray(x[t]) for t in range(self.steps)], zeros)

    def run_prepared(self, handle) -> None:
        handle.run()

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.prepare(feed).run(collect=True)
        result = {"scores": outputs[-1]["scores"]}
        for lif in self._lifs:
            result[f"{lif}.spikes"] = np.stack([out[f"{NEXT}{lif}.o"] for out in outputs])
            result[f"{lif}.membrane"] = np.stack([out[f"{NEXT}{lif}.u"] for out in outputs])
        return result

    def timing_mode(self, handle) -> str:
        if self.bound:
            return handle.mode
        inner = self.inner.timing_mode(self.inner.prepare({"input": handle.steps[0], **handle.zeros}))
        return ", ".join(filter(None, [inner, f"{self.steps} step calls"]))

    def close(self) -> None:
        self.inner.close()


def streamed(runner: Runner, export: dict) -> Runner:
    """``runner`` of the export whose manifest entry is ``export``, streamed over its T steps (:class:`StreamedRunner`)
    when that is the step form; else ``runner`` itself."""
    if export.get("form") != "step":
        return runner
    try:
        return StreamedRunner(runner, int(export["T"]))
    except Exception:
        runner.close()
        raise
