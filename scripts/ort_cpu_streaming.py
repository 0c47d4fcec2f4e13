"""ONNX Runtime CPU: a run's unrolled model.onnx (one call per batch of T steps) against its step form
model_step.onnx streamed (T calls, each call's next.* states fed to the next as state.*).

Usage: python scripts/ort_cpu_streaming.py RUN_DIR [ITERS]   (export both first: snncompile export RUN and
snncompile export RUN --form step). As scripts/ort_cpu_layouts.py: both sessions in one process, calls
alternating, 2 intra-op threads without spinning. Prints one markdown row: median ms per batch of T steps at
batch 1 (ITERS) and 32 (ITERS/4, at least 3), each with the stream's time over the unrolled call's and the
stream's median per step. The two must predict the same class for every sample (a readout head's scores may
differ in their last bits: the stream adds its outputs step by step).
"""

import sys
import time

import numpy as np
import onnxruntime as ort


def _session(path: str):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _stream(session, x: np.ndarray) -> np.ndarray:
    """T calls of the step model from zero states; the last call's scores."""
    states = {i.name: np.zeros([x.shape[1], *i.shape[1:]], np.float32)
              for i in session.get_inputs() if i.name != "input"}
    names = [o.name for o in session.get_outputs()]
    for frame in x:
        out = dict(zip(names, session.run(names, {"input": frame, **states})))
        states = {name: out["next." + name.removeprefix("state.")] for name in states}
    return out["scores"]


def main(run: str, iters: int) -> None:
    unrolled, step = _session(f"{run}/model.onnx"), _session(f"{run}/model_step.onnx")
    shape = unrolled.get_inputs()[0].shape  # [T, batch, ...]
    row = []
    for batch, calls in ((1, iters), (32, max(3, iters // 4))):
        x = (np.random.default_rng(0).random([shape[0], batch, *shape[2:]]) < 0.2).astype(np.float32)
        whole = unrolled.run(None, {"input": x})[0]
        if not np.array_equal(whole.argmax(1), _stream(step, x).argmax(1)):
            sys.exit(f"{run}: the stream and the unrolled model predict differently at batch {batch}")
        times: list[list[float]] = [[], []]
        for _ in range(calls):
            for i, call in enumerate((lambda: unrolled.run(None, {"input": x}), lambda: _stream(step, x))):
                t0 = time.perf_counter()
                call()
                times[i].append(time.perf_counter() - t0)
        a, b = (1e3 * float(np.median(t)) for t in times)
        row += [f"{a:.3g}", f"{b:.3g}", f"{b / a:.2f}x", f"{b / shape[0]:.3g}"]
    print(f"| {run.rstrip('/').split('/')[-2]} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12)
