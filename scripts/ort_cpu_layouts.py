"""ONNX Runtime CPU: a run's layer-major model.onnx against its per-timestep model_per_step.onnx.

Usage: python scripts/ort_cpu_layouts.py RUN_DIR [ITERS]   (export both first: snncompile export RUN and
snncompile export RUN --order step). Both sessions live in one process and their calls alternate, so
machine noise hits both alike; 2 intra-op threads without spinning (a spinning pool would steal the
other session's cores). Prints one markdown row: median ms at batch 1 (ITERS calls) and batch 32
(ITERS/4, at least 3), each with layer-major's time over per-timestep's. Scores must agree exactly.
"""

import sys
import time

import numpy as np
import onnxruntime as ort


def main(run: str, iters: int) -> None:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(f"{run}/{name}", opts, providers=["CPUExecutionProvider"])
                for name in ("model.onnx", "model_per_step.onnx")]
    shape = sessions[0].get_inputs()[0].shape  # [T, batch, ...]
    row = []
    for batch, calls in ((1, iters), (32, max(3, iters // 4))):
        x = (np.random.default_rng(0).random([shape[0], batch, *shape[2:]]) < 0.2).astype(np.float32)
        layer, step = (s.run(None, {"input": x})[0] for s in sessions)
        if not np.array_equal(layer, step):
            sys.exit(f"{run}: the two layouts' scores differ at batch {batch}")
        times: list[list[float]] = [[], []]
        for _ in range(calls):
            for i, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                times[i].append(time.perf_counter() - t0)
        a, b = (1e3 * float(np.median(t)) for t in times)
        row += [f"{a:.3g}", f"{b:.3g}", f"{a / b:.2f}x"]
    print(f"| {run.rstrip('/').split('/')[-2]} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12)
