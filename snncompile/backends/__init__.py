"""Runners: one interface over torch, ONNX Runtime, OpenVINO and TensorRT (DESIGN.md rule 2).

Each runtime is imported only inside its own module, and only when a runner of it is created, so
``snncompile`` works with none of the optional runtimes installed.
"""

from .base import RUNNERS, Runner, TensorSpec, available_runners, create_runner, default_runners, runner_options, validate_feed

__all__ = ["RUNNERS", "Runner", "TensorSpec", "available_runners", "create_runner", "default_runners", "runner_options",
           "validate_feed"]
