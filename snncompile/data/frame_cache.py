"""On-disk cache of event frames, built once in parallel and reused safely.

An entry is a folder named after a SHA-256 key over everything that shapes the frames: dataset, split,
every :class:`~snncompile.data.events.FrameSpec` field, the split seed, the cache format and the list of
source files with their sizes and mtimes. Change any one and the key changes, so stale frames are never
served. Inside: ``shard-NNNNN.npy`` files (``[n, T, P, H, W]`` uint16) plus ``index.json`` with each
shard's SHA-256; every file is written atomically, the index last. A shard that is missing, truncated
or fails its hash is rebuilt on the next load.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write, atomic_write_json, sha256_file
from .events import SOURCES, FrameSpec, events_to_frames, read_events

__all__ = ["CACHE_FORMAT", "cache_key", "load_frames", "default_cache_dir"]

# Part of every key: bumped whenever decoding or binning changes what frames a file gives (2: CIFAR10-DVS
# .aedat y no longer mirrored and its timestamps continued after a backward step, DVS Gesture's rounded).
CACHE_FORMAT = 2
SHARD = 256  # samples per shard file


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "snncompile" / "frames"


def cache_key(name: str, split: str, spec: FrameSpec, files: list[tuple[Path, int]], split_seed: int) -> str:
    """SHA-256 over dataset, split, frame spec, seed, format and the source files' identity."""
    h = hashlib.sha256()
    h.update(json.dumps({"dataset": name, "split": split, "spec": asdict(spec), "split_seed": split_seed,
                         "format": CACHE_FORMAT}, sort_keys=True).encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _build_shard(args) -> tuple[str, str, int]:
    """Worker: decode and bin one shard's files, write it atomically; returns (file, sha256, n)."""
    name, spec, paths, out = args
    source = SOURCES[name]
    frames = np.stack([events_to_frames(read_events(name, Path(p)), source, spec) for p in paths])
    with atomic_write(out, "wb") as f:
        np.save(f, frames, allow_pickle=False)
    return out.name, sha256_file(out), len(paths)


def _shard_ok(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_file(path) == sha


def _known_shards(index_path: Path, key: str) -> dict[str, str]:
    """{shard file: sha256} from an entry's index.json; empty (so every shard is rebuilt) when the index is
    missing, of another key, or damaged in any way: the cache is derived data, rebuilt rather than reported."""
    try:
        index = json.loads(index_path.read_bytes())
        shards = index["shards"] if index["key"] == key else {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in shards.items()):
            return {}
        return dict(shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, not JSON/UTF-8, wrong shape
        return {}


def load_frames(name: str, split: str, spec: FrameSpec, files: list[tuple[Path, int]], cache_dir: Path,
                split_seed: int = 0, workers: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Frames ``[N, T, P, H, W]`` uint16 and labels ``[N]`` for ``files``, from the cache or built now.

    Returns (frames, labels, info) where info says whether the entry was hit, built or repaired.
    """
    from tqdm.auto import tqdm

    key = cache_key(name, split, spec, files, split_seed)
    entry = Path(cache_dir).expanduser() / f"{name}-{split}-{key[:20]}"
    index_path = entry / "index.json"
    shards = [(f"shard-{i // SHARD:05d}.npy", files[i : i + SHARD]) for i in range(0, len(files), SHARD)]
    known = _known_shards(index_path, key)
    todo = [(fname, chunk) for fname, chunk in shards if not (fname in known and _shard_ok(entry / fname, known[fname]))]
    status = "hit" if not todo else ("built" if not known else f"repaired {len(todo)} shard(s)")
    if todo:
        new_entry = not entry.exists()
        entry.mkdir(parents=True, exist_ok=True)
        jobs = [(name, spec, [str(p) for p, _ in chunk], entry / fname) for fname, chunk in todo]
        n_workers = workers or max(1, (os.cpu_count() or 2))
        bar = tqdm(total=sum(len(c) for _, c in todo), desc=f"frames {name}/{split}", unit="sample", disable=not progress)
        results = []
        try:
            if n_workers == 1 or len(jobs) == 1:
                for job in jobs:
                    results.append(_build_shard(job))
                    bar.update(results[-1][2])
            else:
                with ProcessPoolExecutor(n_workers) as pool:
                    for res in pool.map(_build_shard, jobs):
                        results.append(res)
                        bar.update(res[2])
        except BaseException:
            if new_entry and not any(entry.iterdir()):  # no empty hashed folder left behind by a failed first build
                entry.rmdir()
            raise
        finally:
            bar.close()  # before the error is printed: it was printed inside the bar's line, then the bar again
        known = {**known, **{fname: sha for fname, sha, _ in results}}
        atomic_write_json(index_path, {"key": key, "format": CACHE_FORMAT, "dataset": name, "split": split,
                                       "spec": asdict(spec), "samples": len(files), "shards": known})
    frames = np.concatenate([np.load(entry / fname, allow_pickle=False) for fname, _ in shards])
    labels = np.array([label for _, label in files], np.int64)
    return frames, labels, {"cache": str(entry), "status": status}
