"""What binding a stream's states in place saves on ONNX Runtime: a run's step-form export (model_step.onnx)
streamed by the runner as verify and bench stream it (``BoundStream``: the T frames and every state bound on the
runner's device, each call writing the buffers the next reads) against the same runner called T times with
host arrays (every state out to the host and back in at every step).

Usage: python scripts/ort_streaming_binding.py RUN_DIR [RUNNER [BATCHES [ITERS]]]
    RUNNER ort-cpu (default) or ort-cuda; BATCHES comma-separated (default 1,32); ITERS timed streams per batch
    (default 20; a quarter at batches over 8, at least 3). Export the step form first: snncompile export RUN --form step.

Both ways share one runner (the same shape-specialized sessions, so the same kernels) and alternate call by call.
Prints one markdown row per batch: median ms per stream of T steps each way, their ratio, and whether the two
gave the same bits (scores and every layer's spikes and membranes of every step).
"""

import sys
import time
from pathlib import Path

import numpy as np

from snncompile.artifacts import read_manifest
from snncompile.backends import create_runner
from snncompile.errors import SnnCompileError
from snncompile.streaming import StreamedRunner


def main(run: Path, runner_name: str, batches: list[int], iters: int) -> None:
    try:
        manifest = read_manifest(run)
        export = manifest.get("exports", {}).get("model_step.onnx")
    except SnnCompileError as e:  # not a run directory, or a corrupt manifest: one line
        sys.exit(str(e))
    if export is None:
        sys.exit(f"{run}: no step-form export: snncompile export {run} --form step")
    inner = create_runner(runner_name, run, "model_step.onnx")
    with StreamedRunner(inner, int(export["T"])) as bound:
        host = StreamedRunner(inner, int(export["T"]), bind_states=False)
        frame = bound.inputs[0].shape
        print("| model | runner | batch | bound (ms) | host (ms) | bound / host | same bits |\n|---|---|---|---|---|---|---|")
        for batch in batches:
            x = (np.random.default_rng(batch).random([frame[0], batch, *frame[2:]]) < 0.2).astype(np.float32)
            got, want = bound.infer({"input": x}), host.infer({"input": x})
            if not np.array_equal(got["scores"].argmax(1), want["scores"].argmax(1)):
                sys.exit(f"{run}: the two streams predict differently at batch {batch}")
            same = all(np.array_equal(got[name], want[name]) for name in want)
            handles = [(bound, bound.prepare({"input": x})), (host, host.prepare({"input": x}))]
            times: list[list[float]] = [[], []]
            for i in range(2 + (iters if batch <= 8 else max(3, iters // 4))):
                for (streamer, handle), spent in zip(handles, times):
                    t0 = time.perf_counter()
                    streamer.run_prepared(handle)
                    if i >= 2:  # two warm-up streams each (ONNX Runtime captures its CUDA graphs on early runs)
                        spent.append(time.perf_counter() - t0)
            a, b = (1e3 * float(np.median(t)) for t in times)
            print(f"| {manifest.get('model', run.parent.name)} | {runner_name} | {batch} | {a:.3g} | {b:.3g} | {a / b:.2f}x "
                  f"| {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    main(Path(args[0]), args[1] if len(args) > 1 else "ort-cpu",
         [int(b) for b in (args[2] if len(args) > 2 else "1,32").split(",")], int(args[3]) if len(args) > 3 else 20)
