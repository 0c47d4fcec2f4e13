"""What a manifest's export entry may hold: checked when the manifest is read, so that a hand-edited or
received run directory cannot steer a command through it.

Its names become paths (the export's own file, its reference files: one outside the run directory was read,
hashed and vouched for by verify) and its values are pasted into the commands we print for users to run
(``export_command``), so each is held to what export writes. Fields an older export did not record are not
required; commands that need them say so themselves.
"""

from __future__ import annotations

from pathlib import PurePath

from .config import MAX_STEPS
from .export_options import EXPORT_PRECISIONS

__all__ = ["export_entry_problem", "plain_file_name"]


def plain_file_name(name) -> bool:
    """True for a file name inside its folder: no folder part, no ``..``, not absolute, not hidden."""
    return isinstance(name, str) and name != "" and PurePath(name).name == name and not name.startswith(".")


def _count(value, low: int, high: int | None = None) -> bool:
    """An integer (JSON bools are not) from ``low`` to ``high``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


# field -> (its check, what it must be), for the fields an export writes
_FIELDS = {
    "T": (lambda v: _count(v, 1, MAX_STEPS), f"an integer 1 to {MAX_STEPS}"),
    "opset": (lambda v: _count(v, 1), "a positive integer"),
    "precision": (lambda v: v in EXPORT_PRECISIONS, f"one of {', '.join(EXPORT_PRECISIONS)}"),
    "order": (lambda v: v in ("layer", "step"), "'layer' or 'step'"),
    "form": (lambda v: v in ("unrolled", "step"), "'unrolled' or 'step'"),
    "layers": (lambda v: isinstance(v, bool), "true or false"),
    "rates": (lambda v: isinstance(v, bool), "true or false"),
    # [] on a step export from before the step form had references (export_reference_paths says so)
    "reference_files": (lambda v: isinstance(v, list) and len(v) in (0, 2) and all(map(plain_file_name, v)),
                        "two file names in the run directory"),
    "reference_samples": (lambda v: isinstance(v, list) and len(v) == 2 and all(_count(n, 0) for n in v),
                          "two sample counts"),
    "sha256": (lambda v: isinstance(v, str), "a hex digest"),
    "checkpoint_sha256": (lambda v: isinstance(v, str), "a hex digest"),
}


def export_entry_problem(name, entry: dict) -> str | None:
    """What is wrong with manifest entry ``exports[name]`` (already known to be a dict), or None."""
    if not plain_file_name(name):
        return f"exports[{name!r}]: not a file name in the run directory"
    for field, (ok, expected) in _FIELDS.items():
        if field in entry and not ok(entry[field]):
            return f"exports[{name!r}].{field} is {entry[field]!r}, expected {expected}"
    return None
