"""Builders shared by the export/verify/backend tests: tiny trained-shape runs without training."""

from __future__ import annotations

from pathlib import Path

from snncompile.config import Config, load_config
from snncompile.init_run import init_run


def conv_input_channels(monkeypatch, in_channels: int | None = None) -> list[int]:
    """From here on, the channel count of every input a conv is given (only convs built for ``in_channels``
    input channels, when given): what ``pad_conv_channels`` padded them to."""
    import torch

    seen: list[int] = []
    real = torch.nn.Conv2d._conv_forward

    def conv_forward(conv, x, weight, bias):
        if in_channels is None or conv.in_channels == in_channels:
            seen.append(x.shape[1])
        return real(conv, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", conv_forward)
    return seen


def make_run(root: Path, cfg: Config, seed: int = 0) -> Path:
    """A run directory with a freshly initialised checkpoint whose every layer spikes."""
    return init_run(cfg, root, seed)[0]


def tiny_zoo_config(path: str | Path) -> Config:
    """A zoo entry at 1/16 width, T = 4, real data off (seeded random references only)."""
    cfg = load_config(path)
    from snncompile.models import parse_architecture

    specs = parse_architecture(cfg.model.arch, width_divisor=16)
    tokens = []
    for s in specs:
        tokens.append({"conv": f"{s.size}C{s.kernel}", "pool": f"AP{s.size}", "fc": f"{s.size}FC",
                       "voting": "Voting", "readout": str(s.size)}[s.kind])
    cfg.model.arch = "-".join(tokens)
    cfg.model.T = 4
    return cfg


def reference_file(run: Path, kind: str = "inputs", model_file: str | None = None) -> Path:
    """The reference inputs (or ``kind="outputs"``) that ``model_file`` (default: the one verify checks) was
    exported with: their names carry the export's T and sample counts when those are not the defaults."""
    import json

    from snncompile.compare import default_model_file
    from snncompile.exports import export_reference_paths

    exports = json.loads((Path(run) / "manifest.json").read_text())["exports"]
    paths = export_reference_paths(run, exports[model_file or default_model_file(exports)])
    return paths[0] if kind == "inputs" else paths[1]


def replace_checkpoint(run: Path, scale: float = 1.5, by_hand: bool = False, **fields) -> None:
    """Stand-in for `train --resume`: the run's checkpoint gets other weights (every parameter scaled), and
    ``fields`` (e.g. ``epoch``), recorded in the manifest as training records it; ``by_hand``: not recorded."""
    import torch

    from snncompile.artifacts import record_artifact
    from snncompile.runs import CHECKPOINT, load_checkpoint

    state = load_checkpoint(run / CHECKPOINT)
    state["model"] = {k: v * scale if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({**state, **fields}, run / CHECKPOINT)
    if not by_hand:
        record_artifact(run, CHECKPOINT)


def wrapped_ctrl_c(*args, **kwargs):
    """Raise what torch.onnx.export raised on a Ctrl-C during its lazy imports: the KeyboardInterrupt, wrapped
    into an AttributeError (a module half imported) and then into the exporter's own error. Takes any
    arguments, to stand in for the exporter."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
    except AttributeError as e:
        raise RuntimeError("Failed to export the model with torch.export. This is step 1/3") from e


def ort_cuda_on_the_cpu(graphs: bool = False):
    """ort-cuda's IO-binding path (fixed buffers, in-place input updates, copy-out) on ONNX Runtime's CPU
    provider: the same calls the CUDA runner makes, checkable without a GPU. The CUDA-graph option is
    the CUDA provider's, so it is left out here (the request still goes through its fallback path).
    ``graphs``: treat every session as capturing graphs, so bound streams pass their graph ids (which the
    CPU provider ignores)."""
    from snncompile.backends.ort import OrtCudaRunner

    class BoundOnCpu(OrtCudaRunner):
        provider = "CPUExecutionProvider"
        device = "cpu"
        graph_options: dict = {}

        def _graphs(self, specialized) -> bool:
            return graphs or specialized.cuda_graph

    return BoundOnCpu
