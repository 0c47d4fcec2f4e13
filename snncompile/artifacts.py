"""Run directories, atomic writes, hashes and manifest.json.

Every artifact goes through :func:`atomic_write`: written to a temporary file in the same folder,
flushed and fsync'ed, then renamed over the target, so a crash or an exception mid-write leaves the
previous version (or nothing), never half a file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import ArtifactError
from .export_entries import export_entry_problem
from .scratch import claim, owner_tag

__all__ = ["MANIFEST", "RUN_FORMAT", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "write_recorded_json", "interrupts_deferred", "require_writable", "sha256_file", "read_manifest",
           "update_manifest", "run_dir_lock", "record_artifact", "new_run_dir", "environment", "artifact_as_recorded",
           "atomic_save", "forget_artifact", "fsync_path", "sha256_model", "sole_trainer"]

MANIFEST = "manifest.json"
RUN_FORMAT = 1  # bump when the layout of a run directory changes incompatibly


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc, kernel 4.7+): setting it and
    putting it back, the only portable way, briefly gives every other thread's new files 0o022."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:  # at least our own writers never see each other's temporary value
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temp file next to ``path``; on clean exit fsync and rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}-", suffix=".tmp", dir=path.parent)
        claim(fd)  # while it is open: remove_orphans takes only what no live process holds
    except OSError as e:  # a read-only or full file system, no permission: the target's name, not the temp file's
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        # mkstemp makes the file private (0600); the artifact gets what open() would give it (0666 - umask)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself, or a power loss may bring back the old file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the renames into it), to the disk: a file written by a library
    (ONNX, numpy) into a staging folder is renamed into place only once it is there, so that a power loss cannot
    leave a recorded artifact empty or cut short."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not Path(path).is_dir():
            raise
        # a folder that Windows cannot open, or a FUSE or network mount cannot flush: the renames stand, as before


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(path: str | Path, writer: Callable[[io.IOBase], None]) -> None:
    """Atomically write whatever ``writer(fileobj)`` writes (e.g. ``torch.save``)."""
    with atomic_write(path, "wb") as f:
        writer(f)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or a SIGTERM until the block ends, then act on it: for commits of several files and
    the manifest entry that describes them, each write atomic but the set only consistent once all are done.
    Outside the main thread, where Python cannot set signal handlers, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # the first signal that was not ignored (a SIGINT to a process started with `&` must not hide a SIGTERM after it)
    acted = [signum for signum in caught if previous[signum] != signal.SIG_IGN]
    if not acted:
        return
    signum, handler = acted[0], previous[acted[0]]
    if handler == signal.SIG_DFL:  # a SIGTERM nobody handles: the process ends now, as it would have
        signal.raise_signal(signum)
    elif callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)  # the caller's own handler, called late
    else:
        raise KeyboardInterrupt


def require_writable(folder: str | Path, why: str) -> None:
    """One line before any work when ``folder`` cannot take new files (a read-only mount, no permission): a
    command that would compute for minutes and then fail to save says so first. ``why``: what it would write."""
    folder = Path(folder)
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write in {folder} ({why}): it is read-only here; copy the run directory "
                            "somewhere writable")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_model(path: str | Path) -> str:
    """SHA-256 of an ONNX model as it runs: the file, and its external weights (``<file>.data``, written past
    protobuf's 2 GB) when it has them; the file's own hash otherwise (:func:`sha256_file`)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if not data.is_file():
        return sha256_file(path)
    return hashlib.sha256(f"{sha256_file(path)}:{sha256_file(data)}".encode()).hexdigest()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """Load ``manifest.json``; one-line errors for a missing, corrupt or foreign-format run dir."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{run_dir} is not a run directory: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is corrupt (not UTF-8 text)") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is corrupt (a JSON {type(manifest).__name__}, not an object)")
    got = manifest.get("run_format")
    if got != RUN_FORMAT:
        raise ArtifactError(
            f"{run_dir} was written by snncompile {manifest.get('snncompile_version', '?')} with run format "
            f"{got}; this is snncompile {__version__} expecting run format {RUN_FORMAT}: re-train or re-export"
        )
    # the tables every command reads with .get(): anything else was an AttributeError traceback
    wrong = [key for key in ("exports", "artifacts", "training") if not isinstance(manifest.get(key, {}), dict)]
    # one level down too: every export's entry is read with .get() ("T", "form"), so an entry edited to a string
    # or null was an AttributeError traceback
    if not wrong:
        wrong = [f"exports[{name!r}]" for name, entry in manifest.get("exports", {}).items() if not isinstance(entry, dict)]
    if wrong:
        raise ArtifactError(f"{path} is corrupt ({', '.join(wrong)} is not a JSON object)")
    # each entry's names become paths and its values go into the commands we print: held to what export writes
    for name, entry in manifest.get("exports", {}).items():
        if (problem := export_entry_problem(name, entry)) is not None:
            raise ArtifactError(f"{path} is corrupt ({problem}): restore it, or remove that entry and export again")
    return manifest


def update_manifest(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the manifest (top-level keys; dicts merged one level deep) atomically."""
    path = Path(run_dir) / MANIFEST
    with run_dir_lock(Path(run_dir)):  # two commands on one run (verify and bench) must not lose each other's keys
        manifest = read_manifest(run_dir) if path.exists() else {"run_format": RUN_FORMAT}
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        manifest["snncompile_version"] = __version__
        manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(path, manifest)
    return manifest


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive advisory lock on the run directory itself, for a read-modify-write of one of its JSON files
    (POSIX ``flock``, no extra file; where there is none, e.g. Windows, no lock). Reentrant within a thread, so
    that a holder can record what it wrote (:func:`record_artifact`) before another process reads it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    key = os.path.realpath(run_dir)
    held = _LOCKS_HELD.__dict__.setdefault("dirs", set())
    if key in held:  # a second flock on another descriptor of the same folder would wait for the first forever
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)  # closing releases the lock


_LOCKS_HELD = threading.local()  # the run dirs whose lock this thread holds


@contextlib.contextmanager
def sole_trainer(run_dir: Path) -> Iterator[None]:
    """Refuses, in one line, a second process that would train ``run_dir`` while this one does (two `train
    --resume` of one run both trained, overwrote each other's checkpoints and wrote every epoch twice into
    metrics.jsonl). An exclusive ``flock`` on the run's config.toml, which training never replaces: no lock file
    is left behind, and the lock goes with the process however it ends. No lock where there is no flock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(run_dir / "config.toml", os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"{run_dir} is being trained by another process: wait for it to finish, or stop "
                                "it first") from None
        yield
    finally:
        os.close(fd)


def record_artifact(run_dir: str | Path, name: str, **extra: Any) -> dict[str, Any]:
    """Hash ``run_dir/name`` and record it under ``artifacts`` in the manifest."""
    path = Path(run_dir) / name
    entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size, **extra}
    return update_manifest(run_dir, artifacts={name: entry})


def artifact_as_recorded(run_dir: str | Path, name: str) -> bool:
    """Whether ``run_dir/name`` is the file the manifest recorded (its SHA-256, or the one
    :func:`write_recorded_json` announced before a rename the process was killed after): False for a file edited,
    replaced or never recorded since, whose contents a command merging into it (verify.json, bench.json) must not
    carry forward as its own."""
    entry = read_manifest(run_dir).get("artifacts", {}).get(name)
    path = Path(run_dir) / name
    if not isinstance(entry, dict) or not path.is_file():
        return False
    return sha256_file(path) in (entry.get("sha256"), entry.get("pending_sha256"))


def write_recorded_json(run_dir: str | Path, name: str, obj: Any) -> None:
    """Write ``run_dir/name`` atomically and record it, so that a kill at any point leaves a file the manifest
    vouches for (:func:`artifact_as_recorded`): its hash is announced (``pending_sha256``) before the rename and
    recorded after it. Killed between a plain write and its record, the next merge found a file it did not
    recognise and dropped every earlier report in it. Under the run dir's lock: merges of the same file wait."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    with run_dir_lock(Path(run_dir)):
        entry = read_manifest(run_dir).get("artifacts", {}).get(name)
        entry = dict(entry) if isinstance(entry, dict) else {}
        update_manifest(run_dir, artifacts={name: {**entry, "pending_sha256": hashlib.sha256(data).hexdigest()}})
        atomic_write_bytes(Path(run_dir) / name, data)
        record_artifact(run_dir, name)  # the entry anew: the pending hash goes


def forget_artifact(run_dir: str | Path, name: str) -> None:
    """Remove ``run_dir/name`` and its ``artifacts`` entry (an earlier command's output this one replaced by
    nothing, e.g. a plot it could not draw)."""
    (Path(run_dir) / name).unlink(missing_ok=True)
    with run_dir_lock(Path(run_dir)):  # update_manifest merges; removing a key is a read-modify-write of its own
        manifest = read_manifest(run_dir)
        if manifest.get("artifacts", {}).pop(name, None) is not None:
            atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def new_run_dir(root: str | Path, model_name: str) -> Path:
    """Create ``root/<model>/<UTC timestamp>[-n]/`` and return it."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / model_name
    for n in range(1000):
        candidate = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise ArtifactError(f"could not create a new run directory under {base}")


def environment() -> dict[str, str | None]:
    """Versions of everything that shapes the numbers: python, torch, CUDA, GPU, and the runtimes that run
    exports (onnxruntime, OpenVINO, TensorRT, triton; None where not installed), so that figures measured under one
    version are not mixed with another's (bench keeps earlier rows only under the same environment)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(*distributions: str) -> str | None:
        # read from the wheel's metadata: importing a runtime can take seconds or initialise CUDA
        for name in distributions:
            with contextlib.suppress(PackageNotFoundError):
                return version(name)
        return None

    def tensorrt() -> str | None:
        # the metapackage, its -cuXX wheel, or a _cuXX_bindings wheel installed alone (see backends/trt.py);
        # tensorrt_rtx is another product, so it is named
        for family in ("tensorrt", "tensorrt_rtx"):
            found = installed(*(family + suffix for suffix in
                                ("", "-cu13", "-cu12", "-cu11", "_cu13_bindings", "_cu12_bindings", "_cu11_bindings")))
            if found:
                return f"{family} {found}"
        return None

    env: dict[str, str | None] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "snncompile": __version__,
        "onnxruntime": installed("onnxruntime", "onnxruntime-gpu"),
        "openvino": installed("openvino"),
        "tensorrt": tensorrt(),
        "triton": installed("triton", "pytorch-triton"),
    }
    if torch.cuda.is_available():
        env["cuda"] = str(torch.version.cuda)
        env["gpu"] = torch.cuda.get_device_name()
    return env
