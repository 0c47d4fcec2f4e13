"""MNIST from the standard IDX files (optionally gzip'ed) in a folder the user names."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import RELATIVE_ROOT, Dataset, Split

__all__ = ["read_idx", "load_mnist", "MNIST_FILES"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw): magic 0x0000 | dtype | ndim, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: truncated or padded IDX file (expected {expected} bytes for {dims}, got {len(raw)})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_mnist(root: str | Path) -> Dataset:
    """MNIST as ``[N, 1, 28, 28]`` float32 in [0, 1] (60,000 train / 10,000 test)."""
    if not root:
        raise ConfigError("MNIST needs data.root: --set data.root=/path/to/mnist (a folder with the 4 IDX files)")
    root = Path(root).expanduser()
    paths = {k: _find(root, v) for k, v in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"MNIST files missing in {root}: {', '.join(missing)} (each may also end in .gz); "
                        f"--set data.root=DIR with the folder holding them ({RELATIVE_ROOT})")
    arrays = {k: read_idx(p) for k, p in paths.items()}

    def split(prefix: str) -> Split:
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {prefix} images {images.shape} and labels {labels.shape} do not match")
        if not np.issubdtype(labels.dtype, np.integer):  # a float IDX (type 0x0D) may hold NaN: int() raised
            raise DataError(f"MNIST {prefix} labels must be integers, the file holds {labels.dtype.name}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
            raise DataError(f"MNIST {prefix} labels must be digits 0-9, found {int(labels.min())}..{int(labels.max())}")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return Split(x, torch.from_numpy(labels.astype(np.int64)))

    train, test = split("train"), split("test")
    if train.x.shape[1:] != test.x.shape[1:]:  # else a shape error from torch at the first test batch
        raise DataError(f"MNIST train images are {tuple(train.x.shape[2:])} but test images "
                        f"{tuple(test.x.shape[2:])} in {root}: the files come from two different sets")
    return Dataset(
        name="mnist",
        train=train,
        test=test,
        classes=[str(i) for i in range(10)],
        info={"source": str(root)},
    )
