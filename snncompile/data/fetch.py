"""`snncompile data fetch NAME`: download an event dataset into tonic's layout, checking MD5 sums.

The URLs and checksums are tonic's own (the releases tonic reads), so a fetched folder is exactly
what ``data.root`` expects. Needs network access and the ``data`` extra.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..artifacts import interrupts_deferred
from ..errors import ConfigError, DataError, MissingDependencyError
from ..scratch import remove_orphans, staging_folder

__all__ = ["fetch"]


_FETCHABLE = ("nmnist", "dvs_gesture", "dvs_cifar10")


def _tonic():
    """tonic's datasets and download helpers, or the error naming the extra (tonic is optional, GPL-3.0)."""
    try:
        from tonic import datasets, download_utils
    except ImportError:
        raise MissingDependencyError("tonic", "data") from None
    return datasets, download_utils


def _archives(datasets, name: str):
    """tonic's dataset class for ``name`` (one of ``_FETCHABLE``) and its (url, filename, md5) archives."""
    if name == "dvs_cifar10":
        c = datasets.CIFAR10DVS
        return c, [(c.url, c.filename, c.file_md5)]
    c = {"nmnist": datasets.NMNIST, "dvs_gesture": datasets.DVSGesture}[name]
    return c, [(c.train_url, c.train_filename, c.train_md5), (c.test_url, c.test_filename, c.test_md5)]


def fetch(name: str, root: str | Path) -> Path:
    """Download and extract ``name`` under ``root/<tonic folder>``; returns that folder."""
    if name not in _FETCHABLE:  # said whether tonic is installed or not
        raise ConfigError(f"nothing to fetch for {name!r} (fetchable: {', '.join(_FETCHABLE)})")
    datasets, utils = _tonic()
    cls, archives = _archives(datasets, name)
    folder = Path(root).expanduser() / cls.__name__
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder)  # what an extraction killed outright left
    for i, (url, filename, md5) in enumerate(archives):
        target = folder / filename
        try:
            if not (target.is_file() and utils.check_integrity(str(target), md5)):
                utils.download_url(url, str(folder), filename=filename, md5=md5)
            _extract_whole(utils, target, folder)
        except Exception as e:  # urllib, http and checksum errors all end here
            # every archive still to come, not only this one: offline, the test split's would fail next
            missing = [f"{f} (md5 {m})" for _, f, m in archives[i:]
                       if not ((folder / f).is_file() and utils.check_integrity(str(folder / f), m))]
            missing = missing or [f"{filename} (md5 {md5})"]  # downloaded, but the extraction failed
            raise DataError(f"downloading {url} failed ({type(e).__name__}: {str(e)[:120]}); "
                            f"place {' and '.join(missing)} in {folder} by hand and run again") from None
    if name == "dvs_cifar10":
        for inner in getattr(cls, "data_filename", []):
            if (folder / inner).is_file():
                _extract_whole(utils, folder / inner, folder)
    return folder


def _extract_whole(utils, archive: Path, folder: Path) -> None:
    """Extract ``archive`` into ``folder`` whole or not at all: into a staging folder first, then each top-level
    entry renamed into place, replacing what an interrupted fetch left. Extracted in place, a Ctrl-C left a
    class folder with part of its recordings, which the loaders accept (every class has samples) and train on."""
    with staging_folder(folder, "extract") as staging:
        utils.extract_archive(str(archive), str(staging))
        with interrupts_deferred():  # the renames: every entry of the archive, or its earlier state
            for entry in sorted(staging.iterdir()):
                dest = folder / entry.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                elif dest.exists() or dest.is_symlink():
                    dest.unlink()
                entry.replace(dest)
