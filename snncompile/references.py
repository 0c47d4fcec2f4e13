"""An export's reference files, read and checked against the export they belong to.

``reference_inputs*.npz`` holds ``random`` ``[T, N_random, C, H, W]`` float32 and, when the export had the
dataset, ``real`` ``[T, N_real, C, H, W]`` float32 with ``real_labels`` ``[N_real]`` integers.
``reference_outputs*.npz`` holds the torch outputs on them, ``{split}/scores`` ``[N_split, classes]`` (and
``{split}/rates`` where the export had --rates; exports at one T share the files, so only the scores, which
verify compares, are checked). verify and bench read both; a file of the wrong shape (another export's,
edited, or written by an older snncompile) is one line naming the export command that writes both again,
not an axis error from a runtime halfway through verify, or a KeyError. So is a file of the right shape whose
hash is not the one its export recorded in the manifest (inputs replaced by zeros passed verify).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import read_manifest, sha256_file
from .errors import ArtifactError
from .exports import export_command, export_reference_paths, read_reference
from .runs import load_run_config

__all__ = ["read_references"]


def read_references(run_dir: Path, export: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(inputs, outputs)``: both reference files of manifest entry ``export``, read whole and checked (see the
    module docstring for their layout). Raises ArtifactError naming the file, what is wrong and the export command."""
    run_dir = Path(run_dir)
    inputs_path, outputs_path = export_reference_paths(run_dir, export)
    inputs = read_reference(inputs_path, run_dir, export)
    outputs = read_reference(outputs_path, run_dir, export)
    sample_shape = tuple(load_run_config(run_dir).model.input_shape)
    for path, problem in ((inputs_path, _inputs_problem(inputs, int(export["T"]), sample_shape)),
                          (outputs_path, _outputs_problem(outputs, inputs))):
        if problem:
            raise ArtifactError(f"{path} is not this export's ({problem}): export again: "
                                f"`{export_command(run_dir, export)}`")
    # after the reads and shape checks, whose messages say more
    recorded = read_manifest(run_dir).get("artifacts", {})
    for path in (inputs_path, outputs_path):
        # verify vouches for the export on these inputs: files replaced since (one sample of zeros passed) are not
        # the export's. Unrecorded ones (an export killed before it recorded them) are read and checked as they are.
        entry = recorded.get(path.name)
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if sha256 is not None and sha256_file(path) != sha256:
            raise ArtifactError(f"{path} is not the file its export wrote (sha256 mismatch): export again: "
                                f"`{export_command(run_dir, export)}`")
    return inputs, outputs


def _inputs_problem(inputs: dict[str, np.ndarray], steps: int, sample_shape: tuple[int, ...]) -> str | None:
    """What is wrong with the reference inputs of an export at T = ``steps`` of ``sample_shape`` samples, or None."""
    if "random" not in inputs:
        return "no 'random' array"
    if ("real" in inputs) != ("real_labels" in inputs):
        return "'real' and 'real_labels' must come together"
    for split in ("random", "real"):
        x = inputs.get(split)
        if x is None:
            continue
        expected = f"[{steps}, N, {', '.join(map(str, sample_shape))}] float32"
        if x.dtype != np.float32 or x.ndim != 2 + len(sample_shape) or x.shape[0] != steps or x.shape[2:] != sample_shape:
            return f"'{split}' is {list(x.shape)} {x.dtype}, expected {expected}"
    if "real" in inputs:
        labels = inputs["real_labels"]
        if labels.shape != (inputs["real"].shape[1],) or not np.issubdtype(labels.dtype, np.integer):
            return (f"'real_labels' is {list(labels.shape)} {labels.dtype}, expected "
                    f"[{inputs['real'].shape[1]}] integers, one per real sample")
    return None


def _outputs_problem(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the stored torch scores ``{split}/scores`` for ``inputs``' splits, or None."""
    for split in ("random", "real"):
        if split not in inputs:
            continue
        n, scores = inputs[split].shape[1], outputs.get(f"{split}/scores")
        if scores is None:
            return f"no '{split}/scores' array"
        if scores.ndim != 2 or scores.shape[0] != n:
            return f"'{split}/scores' is {list(scores.shape)}, expected [{n}, classes], one row per '{split}' input"
    return None
