"""Export every models/*.toml at tiny size (1/16 width, T = 4, weights scaled so every layer fires)
and verify ONNX Runtime CPU (or each runner named) against torch fp32; prints the table quoted in the README
(membranes off: membrane values not bit-equal to torch's, across every layer and step), a row per model and
runner.

    python scripts/zoo_equivalence.py [--samples 256] [--runner ort-cpu --runner ov-cpu]
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import make_run, tiny_zoo_config  # noqa: E402

from snncompile.compare import verify_runs  # noqa: E402
from snncompile.export_onnx import export_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--runner", action="append", dest="runners", help="runner to verify (repeatable; default ort-cpu)")
    args = parser.parse_args()
    print(f"{'model':<14}{'runner':>8}{'inputs':>8}{'neuron-steps':>14}{'flips':>7}{'numerical':>11}{'real':>6}{'propagated':>12}"
          f"{'membranes off':>15}{'top-1 agree':>13}{'export s':>10}{'verdict':>9}")
    for path in sorted(glob.glob(str(REPO / "models" / "*.toml"))):
        with tempfile.TemporaryDirectory() as tmp:
            run = make_run(Path(tmp), tiny_zoo_config(path))
            t0 = time.perf_counter()
            export_run(run, layers=True, n_random=args.samples, n_real=args.samples)
            seconds = time.perf_counter() - t0
            reports = verify_runs(run, dict.fromkeys(args.runners or ["ort-cpu"]), "fp32")  # one torch reference pass
        for name, r in reports.items():
            layers = r["layers"].values()
            total = lambda key: sum(s[key] for s in layers)  # noqa: E731
            steps = sum(s["neurons_per_step"] * len(s["flips_per_step"]) for s in layers)
            print(f"{Path(path).stem:<14}{name:>8}{sum(r['inputs'].values()):>8}{steps:>14,}{total('flips'):>7}"
                  f"{total('numerical'):>11}{total('real'):>6}{total('propagated'):>12}{total('membranes_differing'):>15,}"
                  f"{r['top1']['agree']:>7}/{r['top1']['total']:<5}{seconds:>10.1f}"
                  f"{'PASSED' if r['passed'] else 'FAILED':>9}")


if __name__ == "__main__":
    main()
