"""Writers for tiny event files in each dataset's real on-disk format (used by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_nmnist_bin(path: Path, x, y, p, t) -> None:
    """N-MNIST's 40-bit events: x (8), y (8), polarity (1) + timestamp (23, microseconds)."""
    x, y, p, t = (np.asarray(a, np.int64) for a in (x, y, p, t))
    raw = np.zeros((len(x), 5), np.uint8)
    raw[:, 0] = x
    raw[:, 1] = y
    raw[:, 2] = (p << 7) | ((t >> 16) & 0x7F)
    raw[:, 3] = (t >> 8) & 0xFF
    raw[:, 4] = t & 0xFF
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw.tobytes())


def write_aedat2(path: Path, x, y, p, t) -> None:
    """AEDAT 2.0 as CIFAR10-DVS ships it, events in dat2mat.m's coordinates: see :func:`write_aedat2_raw`;
    DVS128 addresses with x in bits 1-7 (mirrored), y in bits 8-14, bit 0 = 1 - polarity."""
    x, y, p = (np.asarray(a, np.int64) for a in (x, y, p))
    write_aedat2_raw(path, (y << 8) | ((127 - x) << 1) | (1 - p), t)


def write_aedat2_raw(path: Path, addresses, timestamps) -> None:
    """'#' header lines (CRLF), then big-endian (address, timestamp) uint32 pairs."""
    body = np.zeros(len(addresses), np.dtype([("address", ">u4"), ("timeStamp", ">u4")]))
    body["address"], body["timeStamp"] = addresses, timestamps
    header = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body.tobytes())


def write_gesture_npy(path: Path, x, y, p, t_ms) -> None:
    """tonic's DVS Gesture release: one [N, 4] array per sample, columns x, y, p, t (milliseconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([x, y, p, t_ms], axis=1).astype(np.float64))


def random_events(rng, n, width, height, duration_us):
    t = np.sort(rng.integers(0, duration_us, n))
    return rng.integers(0, width, n), rng.integers(0, height, n), rng.integers(0, 2, n), t


def make_nmnist(root: Path, per_class_train=4, per_class_test=2, events=300, seed=0) -> Path:
    """root/NMNIST/{Train,Test}/<digit>/NNNNN.bin with events concentrated on a digit-dependent row,
    so a tiny network can learn something."""
    rng = np.random.default_rng(seed)
    for split, n in (("Train", per_class_train), ("Test", per_class_test)):
        for digit in range(10):
            for i in range(n):
                x, y, p, t = random_events(rng, events, 34, 34, 300_000)
                y = np.where(rng.random(events) < 0.7, 3 * digit + 1, y)  # label-dependent structure
                write_nmnist_bin(root / "NMNIST" / split / str(digit) / f"{i:05d}.bin", x, y, p, t)
    return root
