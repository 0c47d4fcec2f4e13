"""CIFAR10 from the standard *python version* batch files, read with a restricted unpickler. (The paper's
training augmentation, RandomCrop(32, padding=4) + horizontal flip, is ``data.augment='auto'``: see augment.py.)

The batch files are pickles. They are never handed to plain ``pickle.load``: :class:`SafeUnpickler` resolves
only the handful of globals a pickled numpy array needs and rejects everything else with a
:class:`~snncompile.errors.DataError` before anything can run.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import RELATIVE_ROOT, Dataset, Split

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILE",
    "CIFAR10_META_FILE",
    "CIFAR10_CLASSES",
    "SafeUnpickler",
    "read_cifar_pickle",
    "load_cifar10",
]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_PIXELS = 3 * 32 * 32


def _numpy_multiarray_attr(name: str) -> Any:
    """``_reconstruct``/``scalar`` from numpy's C module (``numpy._core`` in 2.x, ``numpy.core`` before)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return getattr(multiarray, name)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` only as protocol-2 pickles use it for ``bytes``: ``encode(str, 'latin1')``."""
    latin1 = isinstance(encoding, str) and encoding.lower().replace("_", "-") in ("latin1", "latin-1", "iso-8859-1")
    if not isinstance(obj, str) or not latin1 or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), not {encoding!r}")
    return codecs.encode(obj, "latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``builtins.bytes`` as protocol-2 pickles use it for ``b''`` (called with no arguments)."""
    if args:
        raise pickle.UnpicklingError("builtins.bytes is only allowed without arguments (the empty bytes object)")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_multiarray_attr("_reconstruct")
    scalar = _numpy_multiarray_attr("scalar")
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
    }


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a pickled numpy array (and protocol-2 ``bytes``) needs.

    Any other global (``os.system``, ``builtins.eval``, a class, ...) raises :class:`DataError` naming it, so a
    crafted file is rejected before its payload is called. ``_codecs.encode`` and ``builtins.bytes`` are
    resolved to narrowed wrappers that accept only the calls protocol 2 itself emits.
    """

    def __init__(self, file: Any, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 files name Python 2 modules (``__builtin__.bytes``); map them as pickle itself would
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"forbidden global {module}.{name} in pickle (only numpy arrays are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("forbidden persistent id in pickle (only numpy arrays are allowed)")


def read_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Read one CIFAR batch (or ``batches.meta``) pickle safely.

    Args:
        path: the file, e.g. ``.../cifar-10-batches-py/data_batch_1``.

    Returns:
        The pickled dict with its keys decoded to ``str`` (the official files, written by Python 2, have
        ``bytes`` keys such as ``b"data"``; files with ``str`` keys are accepted too).

    Raises:
        DataError: unreadable, truncated or corrupt file, a forbidden global, or not a dict (one line).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except Exception as e:  # truncated/corrupt pickles raise EOFError, UnpicklingError, ValueError, ... by design
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"{path}: truncated or corrupt pickle ({detail})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _resolve_folder(root: Path) -> Path:
    needed = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    if all((root / n).is_file() for n in needed):
        return root
    if (root / CIFAR10_FOLDER).is_dir():
        return root / CIFAR10_FOLDER
    return root


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: not a CIFAR10 batch (keys {sorted(map(str, batch))}, expected data and labels)")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: data must be uint8 [N, {_PIXELS}], got {dtype} {shape}")
    try:
        labels = np.asarray(labels)
    except Exception:  # a ragged or odd list
        raise DataError(f"{path}: labels are not a list of integers") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers [N], got {labels.dtype} {labels.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"{path}: labels must lie in 0..9, got {int(labels.min())}..{int(labels.max())}")
    return data, labels.astype(np.int64)


def _read_classes(path: Path) -> list[str]:
    if not path.is_file():
        return list(CIFAR10_CLASSES)
    names = read_cifar_pickle(path).get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != len(CIFAR10_CLASSES):
        raise DataError(f"{path}: label_names must be a list of {len(CIFAR10_CLASSES)} names")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise DataError(f"{path}: label_names are not UTF-8") from None


def _to_split(batches: list[tuple[np.ndarray, np.ndarray]]) -> Split:
    data = np.concatenate([d for d, _ in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([y for _, y in batches]) if len(batches) > 1 else batches[0][1]
    # rows are 1024 R, 1024 G, 1024 B, each row-major 32x32: a plain reshape gives [N, C, H, W]
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32)).to(torch.float32).div_(255.0)
    return Split(x, torch.from_numpy(labels))


def load_cifar10(root: str | Path) -> Dataset:
    """CIFAR10 as ``[N, 3, 32, 32]`` float32 in [0, 1] (50,000 train / 10,000 test), labels int64 ``[N]``.

    Args:
        root: the ``cifar-10-batches-py`` folder of the python version, or the folder containing it.

    Returns:
        A static :class:`Dataset` named ``"cifar10"``; class names from ``batches.meta`` when present.

    Raises:
        ConfigError: no data.root. DataError: missing folder or files, corrupt or malicious pickles, wrong shapes
            (one line each).
    """
    if not root:
        raise ConfigError(f"CIFAR10 needs data.root: --set data.root=/path/to/{CIFAR10_FOLDER} (or its parent folder)")
    root = Path(root).expanduser()
    folder = _resolve_folder(root)
    needed = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        hint = "; extract cifar-10-python.tar.gz first" if (root / "cifar-10-python.tar.gz").is_file() else ""
        raise DataError(
            f"CIFAR10 files missing in {folder}: {', '.join(missing)} "
            f"(expected the python version, folder {CIFAR10_FOLDER} from {_URL}{hint}); --set data.root=DIR with "
            f"that folder or its parent ({RELATIVE_ROOT})"
        )
    classes = _read_classes(folder / CIFAR10_META_FILE)
    train = _to_split([_read_batch(folder / n) for n in CIFAR10_TRAIN_FILES])
    test = _to_split([_read_batch(folder / CIFAR10_TEST_FILE)])
    return Dataset(name="cifar10", train=train, test=test, classes=classes, static=True, info={"source": str(folder)})
