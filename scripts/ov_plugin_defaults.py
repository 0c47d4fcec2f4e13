"""Verify ov-cpu as OpenVINO's CPU plugin computes by default, without the runner's fp32 settings.

The runner compiles with INFERENCE_PRECISION_HINT=f32 and EXECUTION_MODE_HINT=ACCURACY. This shows what those
settings prevent on this CPU: the plugin's own defaults, judged by verify at fp32 tolerances. Nothing is written
into the run directory (the report goes to a copy of it).

Usage: python scripts/ov_plugin_defaults.py RUN_DIR [--test-set]
"""

import shutil
import sys
import tempfile
from pathlib import Path

import openvino

import snncompile.backends.ov as ov_backend
from snncompile.compare import verify_run
from snncompile.verify_report import format_report


RUNNER_CONFIG = ov_backend.compile_config


def plugin_defaults(threads: int, profile: bool = False) -> dict[str, str]:
    """The runner's settings less the two that pin fp32 (threads and counters as the runner sets them)."""
    config = RUNNER_CONFIG(threads, profile)
    del config["INFERENCE_PRECISION_HINT"], config["EXECUTION_MODE_HINT"]
    return config


def main() -> None:
    run = Path(sys.argv[1])
    inputs = "test" if "--test-set" in sys.argv[2:] else "reference"
    hint = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    print(f"OpenVINO {openvino.__version__}, CPU plugin default INFERENCE_PRECISION_HINT: {hint}")
    ov_backend.compile_config = plugin_defaults
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy)
        print(format_report(verify_run(copy, "ov-cpu", "fp32", inputs=inputs)))


if __name__ == "__main__":
    main()
