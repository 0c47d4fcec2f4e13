"""snncompile: train spiking networks with STBP, export them to ONNX, verify every runtime.

Only the core (torch, numpy, click) is imported here; ONNX, ONNX Runtime, OpenVINO, TensorRT and tonic
load lazily inside the modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
