"""Neuromorphic event datasets: N-MNIST, CIFAR10-DVS and DVS128 Gesture, read through tonic.

tonic (GPL-3.0, the optional ``data`` extra) decodes each dataset's own file format; this module
finds the files in tonic's folder layout (without letting tonic download anything), and turns an
event stream into frames ``[T, P, H, W]`` of event counts with the binning chosen in the model TOML.

On-disk layouts (``data.root`` may be tonic's ``save_to`` folder or the dataset folder inside it):

- N-MNIST: ``NMNIST/Train/<digit>/*.bin`` and ``NMNIST/Test/<digit>/*.bin`` (the original 40-bit
  event files of Orchard et al.). 34 x 34 sensor.
- CIFAR10-DVS: ``CIFAR10DVS/<class>/*.aedat`` (the original AEDAT 2.0 release, DVS128 addresses) or
  ``*.aedat4`` (tonic's download, needs the ``aedat`` package). 128 x 128 sensor, no official split:
  a seeded 9:1 split per class.
- DVS128 Gesture: ``DVSGesture/ibmGestureTrain/<user>_<lighting>/<label>.npy`` and
  ``ibmGestureTest/...`` (tonic's preprocessed release: columns x, y, p, t in ms). 128 x 128 sensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, MissingDependencyError, SnnCompileError
from ..text import shell_path

__all__ = ["EventSource", "SOURCES", "FrameSpec", "list_samples", "read_events", "events_to_frames", "split_name"]


@dataclass(frozen=True)
class EventSource:
    """Where a dataset lives and how big its sensor is."""

    name: str
    folder: str  # tonic's dataset folder name
    width: int
    height: int
    classes: tuple[str, ...]
    layout: str  # the files data.root must hold
    url: str = ""  # where to get them by hand

    def expected(self, root: str | Path) -> str:
        """The layout, and the commands that produce it in ``root`` (data fetch requires its --root)."""
        by_hand = f", or {self.url}" if self.url else ""
        return f"{self.layout} (`snncompile data fetch {self.name} --root {shell_path(root)}`{by_hand})"


SOURCES = {
    "nmnist": EventSource("nmnist", "NMNIST", 34, 34, tuple(str(i) for i in range(10)),
                          "NMNIST/Train and NMNIST/Test with one folder per digit of .bin files",
                          "https://www.garrickorchard.com/datasets/n-mnist"),
    "dvs_cifar10": EventSource("dvs_cifar10", "CIFAR10DVS", 128, 128,
                               ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
                               "CIFAR10DVS/<class>/*.aedat, one folder per class",
                               "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671"),
    "dvs_gesture": EventSource("dvs_gesture", "DVSGesture", 128, 128, tuple(str(i) for i in range(11)),
                               "DVSGesture/ibmGestureTrain and ibmGestureTest with <user>_<lighting>/<label>.npy"),
}


@dataclass(frozen=True)
class FrameSpec:
    """How events become frames; every field is part of the frame-cache key.

    steps: T, the number of frames.
    binning: 'count' = T equal-duration bins over each sample; 'window' = bins of ``bin_us``
        microseconds from the first event (events after T windows are dropped).
    bin_us: window length for 'window' binning.
    downsample: integer spatial factor (x // k, y // k; the ragged edge is cropped).
    polarity: 'split' = 2 channels (OFF, ON); 'merge' = 1 channel with both.
    clip: 0 keeps event counts; n > 0 clips each count at n (1 = binary frames).
    """

    steps: int
    binning: str = "count"
    bin_us: int = 10_000
    downsample: int = 1
    polarity: str = "split"
    clip: int = 0

    def frame_shape(self, source: EventSource) -> tuple[int, int, int]:
        channels = 2 if self.polarity == "split" else 1
        return channels, source.height // self.downsample, source.width // self.downsample


def _tonic_io():
    try:
        import tonic.io
    except ImportError:
        raise MissingDependencyError("tonic", "data") from None
    return tonic.io


def _dataset_folder(root: Path, source: EventSource) -> Path:
    root = Path(root).expanduser()
    folder = root / source.folder if (root / source.folder).is_dir() else root
    if not folder.is_dir():
        raise DataError(f"{source.name}: folder {root} not found; expected {source.expected(root)}")
    return folder


def split_name(source: EventSource, train: bool) -> str:
    return {"nmnist": ("Train", "Test"), "dvs_gesture": ("ibmGestureTrain", "ibmGestureTest")}.get(
        source.name, ("train", "test"))[0 if train else 1]


def list_samples(name: str, root: str | Path, train: bool, split_seed: int = 0) -> list[tuple[Path, int]]:
    """Every (file, label) of one split, in a stable order; one-line error naming the layout."""
    source = SOURCES[name]
    folder = _dataset_folder(Path(root), source)
    samples: list[tuple[Path, int]] = []
    if name == "nmnist":
        base = folder / split_name(source, train)
        for digit in range(10):
            samples += [(p, digit) for p in sorted((base / str(digit)).glob("*.bin"))]
    elif name == "dvs_gesture":
        base = folder / split_name(source, train)
        for sub in sorted(p for p in base.glob("*") if p.is_dir()):  # tonic's userNN_lighting, or any name
            samples += [(p, int(p.stem)) for p in sorted(sub.glob("*.npy")) if p.stem.isdigit()]
        stray = next((path for path, label in samples if label >= len(source.classes)), None)
        if stray is not None:
            raise DataError(f"{stray}: label {stray.stem} is outside {source.name}'s {len(source.classes)} classes "
                            f"(0-{len(source.classes) - 1})")
    else:  # dvs_cifar10: no official split, seeded 9:1 within each class
        for label, cls in enumerate(source.classes):
            # one generator per class: a class's split does not depend on how many recordings the classes
            # before it have (an incomplete download of one class would otherwise reshuffle all later ones)
            rng = np.random.default_rng([split_seed, label])
            # one entry per recording: the original release (.aedat) and tonic's conversion (.aedat4) of the
            # same one would otherwise be split independently, one copy in train and one in test
            recordings = {f.stem: f for f in sorted((folder / cls).glob("*.aedat4"))}
            recordings.update({f.stem: f for f in sorted((folder / cls).glob("*.aedat"))})  # needs no extra
            files = sorted(recordings.values(), key=lambda f: (f.suffix, f.name))
            order = rng.permutation(len(files))
            # a tenth, and at least one of a class with two or more (round(0.5) is 0: five per class had no test split)
            n_test = max(1, round(len(files) * 0.1)) if len(files) >= 2 else 0
            chosen = order[n_test:] if train else order[:n_test]
            samples += [(files[i], label) for i in sorted(chosen)]
    if not samples:
        raise DataError(f"{source.name}: no {'training' if train else 'test'} samples under {folder}; expected {source.expected(root)}")
    # every split of each dataset holds every class: a missing one is an incomplete copy, not a choice
    present = {label for _, label in samples}
    missing = [cls for label, cls in enumerate(source.classes) if label not in present]
    if missing:
        raise DataError(f"{source.name}: no {'training' if train else 'test'} samples of class "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} under {folder} (an "
                        f"incomplete copy?); expected {source.expected(root)}")
    return samples


def read_events(name: str, path: Path) -> dict[str, np.ndarray]:
    """Decode one sample file into int64 arrays x, y, p (0/1) and t (microseconds)."""
    try:
        if name == "nmnist":
            size = path.stat().st_size
            if size % 5:  # tonic's decoder failed on it with a numpy broadcast error
                raise DataError(f"{path}: {size} bytes is not a whole number of 5-byte N-MNIST events (a truncated copy?)")
            io = _tonic_io()
            ev = io.read_mnist_file(str(path), dtype=np.dtype([("x", int), ("y", int), ("t", int), ("p", int)]))
            return {k: np.asarray(ev[k], np.int64) for k in ("x", "y", "p", "t")}
        if name == "dvs_gesture":
            arr = _load_plain_npy(path)
            if arr.ndim != 2 or arr.shape[1] != 4:
                raise DataError(f"{path}: expected an [N, 4] array (x, y, p, t), got {arr.shape}")
            # ms -> us, rounded: 1.001 ms * 1000 is 1000.9999... in binary floating point
            return {"x": arr[:, 0].astype(np.int64), "y": arr[:, 1].astype(np.int64), "p": arr[:, 2].astype(np.int64),
                    "t": np.rint(arr[:, 3].astype(np.float64) * 1000).astype(np.int64)}
        if path.suffix == ".aedat4":
            return _read_aedat4(path)
        io = _tonic_io()
        version, start, _ = io.read_aedat_header_from_file(str(path))
        raw = io.get_aer_events_from_file(str(path), version, start)
        addr = raw["address"].astype(np.int64)
        # DVS128 address layout as decoded by the dataset's own MATLAB loader (dat2mat.m): x in bits 1-7,
        # mirrored; y in bits 8-14 as is; polarity bit 0, inverted (0 = ON).
        return {"x": 127 - ((addr & 0xFE) >> 1), "y": (addr & 0x7F00) >> 8, "p": 1 - (addr & 1),
                "t": _continue_after_backward_steps(raw["timeStamp"].astype(np.int64))}
    except SnnCompileError:
        raise
    except Exception as e:  # noqa: BLE001  tonic's decoders fail on malformed files with any type (UnboundLocalError on
        # an AEDAT file without a header, NotImplementedError on AEDAT 1.x/3.x, a bare Exception on an empty .aedat4)
        raise DataError(f"{path}: cannot decode ({type(e).__name__}: {str(e)[:120]})") from None


def _read_aedat4(path: Path) -> dict[str, np.ndarray]:
    """The events of an AEDAT 4.0 file (tonic's CIFAR10-DVS download): its first event stream, every packet.
    Read with the `aedat` decoder directly, not tonic's wrapper, which failed on a file without event packets
    with numpy's "need at least one array to concatenate"."""
    try:
        import aedat
    except ImportError:
        raise MissingDependencyError("aedat (to read .aedat4)", "data") from None
    decoder = aedat.Decoder(str(path))
    streams = [i for i, stream in decoder.id_to_stream().items() if stream["type"] == "events"]
    if not streams:
        raise DataError(f"{path}: an AEDAT 4 file without an event stream")
    packets = [packet["events"] for packet in decoder if packet["stream_id"] == min(streams)]
    if not packets:
        raise DataError(f"{path}: an AEDAT 4 file without events (a truncated copy?)")
    ev = np.concatenate(packets)
    return {"t": ev["t"].astype(np.int64), "x": ev["x"].astype(np.int64), "y": ev["y"].astype(np.int64),
            "p": ev["on"].astype(np.int64)}


def _load_plain_npy(path: Path) -> np.ndarray:
    """A ``.npy`` file's numeric array. numpy's own errors point the wrong way here: a text file renamed ``.npy``
    reads as "pickled data ... load it unsafely", and unpickling a file is what we never do."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise DataError(f"{path}: not a NumPy .npy file (it does not start with numpy's header)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):  # "Object arrays cannot be loaded when allow_pickle=False"
            raise DataError(f"{path}: holds Python objects, which are not loaded (unpickling runs code); save the "
                            "events as a plain numeric [N, 4] array") from None
        raise


def _continue_after_backward_steps(t: np.ndarray) -> np.ndarray:
    """Timestamps ``[N]`` (us) that step backwards (the recorder's clock reset, or its 32-bit counter wrapping
    after 71 minutes) continued as dat2mat.m does: the run of events after a backward step, up to the next
    one, is offset by the timestamp just before it (as already offset itself)."""
    backward = np.flatnonzero(t[:-1] > t[1:])
    t = t.copy()
    for k, last in zip(backward, [*backward[1:], len(t) - 1]):  # ascending: t[k] is already offset
        t[k + 1 : last + 1] += t[k]
    return t


def events_to_frames(events: dict[str, np.ndarray], source: EventSource, spec: FrameSpec) -> np.ndarray:
    """Bin one sample's events into ``[T, P, H, W]`` uint16 event counts (see :class:`FrameSpec`)."""
    channels, height, width = spec.frame_shape(source)
    frames = np.zeros(spec.steps * channels * height * width, np.int64)
    x, y, p, t = events["x"], events["y"], events["p"], events["t"]
    if len(t):
        t = t - t.min()
        if spec.binning == "count":
            bins = (t * spec.steps) // (int(t.max()) + 1)
        else:
            bins = t // spec.bin_us
        xs, ys = x // spec.downsample, y // spec.downsample
        ch = p.clip(0, 1) if channels == 2 else np.zeros_like(p)
        keep = (bins < spec.steps) & (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        flat = ((bins * channels + ch) * height + ys) * width + xs
        frames += np.bincount(flat[keep], minlength=frames.size)
    if spec.clip:
        frames = np.minimum(frames, spec.clip)
    return np.minimum(frames, np.iinfo(np.uint16).max).astype(np.uint16).reshape(spec.steps, channels, height, width)
