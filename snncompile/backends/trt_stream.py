"""A step-form TensorRT engine's T calls with every tensor bound in place on the GPU: the TensorRT runner's
counterpart of ONNX Runtime's :class:`~.ort.BoundStream` (the same buffer scheme, the same interface for
:class:`~snncompile.streaming.StreamedRunner`). Imports no TensorRT: it drives the runner's execution context."""

from __future__ import annotations

import numpy as np

__all__ = ["TrtStream"]


class TrtStream:
    """Call t reads frame t and the states call t-1 wrote, and writes its own, all in torch CUDA tensors whose
    addresses the engine's execution context is given before each call (``set_tensor_address``). The states live
    in three buffer sets: ``zeros`` (what call 0 reads, never written, so a stream starts from rest without a
    reset copy) and two that the calls alternate between (call t writes set ``t % 2``, call t+1 reads it).
    Outputs that are not states (``scores``) share one buffer: the last call's value is the stream's.

    Timed streams queue their T calls on the runner's CUDA stream and wait once, after the last; with
    ``cuda_graph`` the T calls are captured as one CUDA graph (after one stream run eagerly: TensorRT allocates
    on its first launch) and replayed. A stream whose outputs are collected waits at every call, to copy each
    call's outputs to the host before call t+2 writes over its state set.

    Args:
        runner: the :class:`~.trt.TrtRunner` of a step-form engine (inputs ``input``, ``output_sum`` and the
            ``state.*`` tensors, outputs ``scores`` and the ``next.*`` ones).
        steps: T, the calls of one stream.
        batch: the batch size every tensor of this stream has (its dimension 0).
        state, next_state: the prefixes of a state's input and of the output that carries it forward.
    """

    def __init__(self, runner, steps: int, batch: int, state: str = "state.", next_state: str = "next."):
        import torch

        self.runner = runner
        context = runner.context
        self.shapes = {s.name: (batch, *s.shape[1:]) for s in runner.inputs}  # every input is [B, ...]
        runner.set_shapes(self.shapes)  # the outputs' shapes follow from the inputs'
        out_shapes = {n: tuple(context.get_tensor_shape(n)) for n in runner.output_names}

        def empty(name: str):
            return torch.empty({**self.shapes, **out_shapes}[name], dtype=torch.float32, device="cuda")

        carried = [n for n in self.shapes if n != "input"]  # output_sum and the state.* tensors
        written = {n: next_state + n.removeprefix(state) for n in carried}
        zeros = {n: torch.zeros(self.shapes[n], dtype=torch.float32, device="cuda") for n in carried}
        sets = [{n: empty(n) for n in carried} for _ in range(2)]
        shared = {n: empty(n) for n in runner.output_names if n not in written.values()}
        self.frames = torch.empty((steps, *self.shapes["input"]), dtype=torch.float32, device="cuda")
        # per call: the tensors it writes (what a collected stream copies out) and the address of every tensor
        self.targets = [{**shared, **{written[n]: sets[t % 2][n] for n in carried}} for t in range(steps)]
        self.addresses = [
            {"input": self.frames[t].data_ptr(),
             **{n: (zeros if t == 0 else sets[(t - 1) % 2])[n].data_ptr() for n in carried},
             **{n: tensor.data_ptr() for n, tensor in self.targets[t].items()}}
            for t in range(steps)]
        self._buffers = (zeros, sets, shared)  # held: the addresses above point into them
        self.cuda_graph = runner.cuda_graph
        self._graph = None
        self.mode = ", ".join(filter(None, ["CUDA graph" if self.cuda_graph else "",
                                            f"{steps} step calls, states bound in place"]))
        torch.cuda.synchronize()  # the zeros were written on the default stream; the calls run on the runner's

    def load(self, x: np.ndarray) -> None:
        """Copy ``x [T, B, ...]`` into the bound frames (in place: the addresses, and a captured graph, stay valid)."""
        import torch

        with torch.cuda.stream(self.runner.stream):  # ordered with the calls, which run on the runner's stream
            self.frames.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))

    def _call(self, t: int) -> None:
        context = self.runner.context
        for name, address in self.addresses[t].items():
            context.set_tensor_address(name, address)
        self.runner.launch()

    def _enqueue(self) -> None:
        for t in range(len(self.addresses)):
            self._call(t)

    def run(self, collect: bool = False) -> list[dict[str, np.ndarray]]:
        """The T calls on the loaded frames; with ``collect``, every call's outputs copied to the host."""
        import torch

        stream = self.runner.stream
        self.runner.set_shapes(self.shapes)  # the context may have run another batch size since
        outputs = []
        if collect:
            for t, targets in enumerate(self.targets):
                self._call(t)
                stream.synchronize()
                outputs.append({n: tensor.cpu().numpy() for n, tensor in targets.items()})
            return outputs
        if self.cuda_graph:
            if self._graph is None:
                self._enqueue()  # TensorRT allocates lazily on its first launches; capture after them
                stream.synchronize()
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=stream):
                    self._enqueue()
            with torch.cuda.stream(stream):  # replay() launches on the current stream: make it the runner's
                self._graph.replay()
        else:
            self._enqueue()
        stream.synchronize()
        return outputs
