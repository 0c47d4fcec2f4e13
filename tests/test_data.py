"""Dataset readers: MNIST IDX files made here in the real on-disk format, digits split, batching."""

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import SHARED_MNIST
from snncompile.config import Config, apply_overrides
from snncompile.data import batches, load_dataset, to_time_major
from snncompile.data.digits import load_digits
from snncompile.data.mnist import MNIST_FILES, load_mnist, read_idx
from snncompile.errors import DataError


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_mnist(root, n_train=12, n_test=5, compress=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, arr in arrays.items():
        write_idx(root / (MNIST_FILES[key] + (".gz" if compress else "")), arr, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_idx(tmp_path, compress):
    arrays = make_mnist(tmp_path, compress=compress)
    ds = load_mnist(tmp_path)
    assert ds.train.x.shape == (12, 1, 28, 28) and ds.test.x.shape == (5, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and float(ds.train.x.max()) <= 1.0
    np.testing.assert_array_equal(ds.train.y.numpy(), arrays["train_labels"])
    np.testing.assert_allclose(ds.test.x[:, 0].numpy() * 255, arrays["test_images"], atol=1e-4)


def test_mnist_missing_folder_names_the_files(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte, train-labels-idx1-ubyte") as err:
        load_mnist(tmp_path / "nowhere")
    # the fix too: models/mnist.toml's relative root works only from a checkout beside shared/
    assert "--set data.root=DIR with the folder holding them (a relative data.root is read from the working" in str(err.value)


def test_truncated_idx_is_one_line(tmp_path):
    make_mnist(tmp_path, compress=False)
    path = tmp_path / MNIST_FILES["train_images"]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_corrupt_gzip_is_one_line(tmp_path):
    """A damaged deflate stream raises zlib.error, not OSError: still one line naming the file."""
    make_mnist(tmp_path, compress=True)
    path = tmp_path / (MNIST_FILES["train_images"] + ".gz")
    raw = bytearray(path.read_bytes())
    raw[10:40] = bytes(30)  # the first deflate block header, right after the 10-byte gzip header
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read") as err:
        load_mnist(tmp_path)
    assert "\n" not in str(err.value)


def test_mnist_labels_outside_0_to_9_are_one_line(tmp_path):
    arrays = make_mnist(tmp_path, compress=False)
    write_idx(tmp_path / MNIST_FILES["test_labels"], np.where(np.arange(5) == 2, 10, arrays["test_labels"]), False)
    with pytest.raises(DataError, match="MNIST test labels must be digits 0-9, found 0..10"):
        load_mnist(tmp_path)


def test_digits_split_is_seeded_and_disjoint():
    a, b = load_digits(0.2, 0), load_digits(0.2, 0)
    assert torch.equal(a.test.x, b.test.x) and len(a.test) == 359 and len(a.train) == 1438
    c = load_digits(0.2, 1)
    assert not torch.equal(a.test.y, c.test.y)
    from sklearn.datasets import load_digits as sklearn_digits

    def rows(x, y):  # each sample as a sortable (pixels..., label) tuple: the splits as a multiset of samples
        return sorted(map(tuple, torch.cat([x.flatten(1), y[:, None].float()], 1).tolist()))

    full = sklearn_digits()
    every = rows(torch.tensor(full.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(full.target))
    for split in (a, c):  # train and test together are the whole set, each sample once: a partition
        assert rows(torch.cat([split.train.x, split.test.x]), torch.cat([split.train.y, split.test.y])) == every


def test_load_dataset_normalises_and_checks_shape():
    cfg = apply_overrides(Config(), ["data.limit_train=10"])
    ds = load_dataset(cfg)
    assert len(ds.train) == 10 and float(ds.train.x.min()) == -1.0  # (0 - .5) / .5
    bad = apply_overrides(Config(), ["model.input_shape=[1, 28, 28]"])
    with pytest.raises(Exception, match=r"input_shape is \[1, 28, 28\] but digits frames are \[1, 8, 8\]"):
        load_dataset(bad)


def test_batches_are_time_major():
    ds = load_digits()
    x, y = next(batches(ds.train, 16, torch.Generator().manual_seed(0)))
    seq = to_time_major(x, 5, static=True)
    assert seq.shape == (5, 16, 1, 8, 8) and torch.equal(seq[3], x)
    frames = torch.rand(16, 5, 2, 4, 4)
    steps = to_time_major(frames, 5, static=False)
    assert steps.shape == (5, 16, 2, 4, 4)
    # frame t is step t (PAPER.md: events binned into T frames, fed in time order): a reversed order kept the shape
    assert all(torch.equal(steps[t], frames[:, t]) for t in range(5))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist not present")
def test_real_mnist():
    ds = load_mnist(SHARED_MNIST)
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert sorted(ds.test.y.unique().tolist()) == list(range(10))


def test_fetch_without_tonic_names_the_extra(tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from snncompile.cli import cli
    from snncompile.data.fetch import fetch
    from snncompile.errors import ConfigError, MissingDependencyError

    for module in ("tonic", "tonic.datasets", "tonic.download_utils"):
        monkeypatch.setitem(sys.modules, module, None)  # import tonic raises ImportError, as when not installed
    with pytest.raises(MissingDependencyError, match=r"tonic is not installed: pip install 'snncompile\[data\]'"):
        fetch("nmnist", tmp_path)
    with pytest.raises(ConfigError, match="nothing to fetch for 'mnist'"):  # said with or without tonic
        fetch("mnist", tmp_path)
    result = CliRunner().invoke(cli, ["data", "fetch", "nmnist", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "pip install 'snncompile[data]'" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_fetch_offline_names_every_archive_to_place_by_hand(tmp_path, monkeypatch):
    """It named the training archive only: placed by hand, the next run failed on the test archive."""
    from types import SimpleNamespace

    pytest.importorskip("tonic")
    import snncompile.data.fetch as fetch_module
    from snncompile.errors import DataError

    datasets, _ = fetch_module._tonic()

    def offline(url, *args, **kwargs):
        raise OSError("Network is unreachable")

    utils = SimpleNamespace(check_integrity=lambda path, md5: False, extract_archive=lambda path, to: None,
                            download_url=offline)
    monkeypatch.setattr(fetch_module, "_tonic", lambda: (datasets, utils))
    gesture = datasets.DVSGesture
    with pytest.raises(DataError) as err:
        fetch_module.fetch("dvs_gesture", tmp_path)
    assert str(err.value).endswith(
        f"place {gesture.train_filename} (md5 {gesture.train_md5}) and {gesture.test_filename} (md5 {gesture.test_md5}) "
        f"in {tmp_path / 'DVSGesture'} by hand and run again")


def test_an_interrupted_fetch_extracts_nothing_half(tmp_path, monkeypatch):
    """Extracted in place, a Ctrl-C left a class folder with part of its recordings, which the loaders accept (every
    class has samples). Archives placed by hand (offline) are extracted whole or not at all; a rerun completes."""
    import hashlib
    import zipfile
    from types import SimpleNamespace

    pytest.importorskip("tonic")
    import snncompile.data.fetch as fetch_module
    from tonic import download_utils

    folder = tmp_path / "NMNIST"
    folder.mkdir()
    archives = []
    for split in ("Train", "Test"):
        with zipfile.ZipFile(folder / f"{split.lower()}.zip", "w") as z:
            for i in range(3):
                z.writestr(f"{split}/0/{i:05d}.bin", b"\x00" * 5)
        md5 = hashlib.md5((folder / f"{split.lower()}.zip").read_bytes()).hexdigest()
        archives.append((f"http://offline/{split}", f"{split.lower()}.zip", md5))
    monkeypatch.setattr(fetch_module, "_archives", lambda datasets, name: (type("NMNIST", (), {}), archives))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    calls = []

    def interrupted(from_path, to_path):  # extracts part of the test archive, then the Ctrl-C
        calls.append(from_path)
        if from_path.endswith("test.zip") and len(calls) == 2:
            with zipfile.ZipFile(from_path) as z:
                z.extract(z.namelist()[0], to_path)
            raise KeyboardInterrupt
        return download_utils.extract_archive(from_path, to_path)

    utils = SimpleNamespace(check_integrity=download_utils.check_integrity, download_url=offline,
                            extract_archive=interrupted)
    monkeypatch.setattr(fetch_module, "_tonic", lambda: (None, utils))
    with pytest.raises(KeyboardInterrupt):
        fetch_module.fetch("nmnist", tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["Train", "test.zip", "train.zip"]  # no Test/ at all
    assert len(list((folder / "Train" / "0").iterdir())) == 3
    assert fetch_module.fetch("nmnist", tmp_path) == folder  # again: the archives are there, checked and extracted
    assert sorted(p.name for p in folder.iterdir()) == ["Test", "Train", "test.zip", "train.zip"]
    assert len(list((folder / "Test" / "0").iterdir())) == 3


def test_mnist_files_of_two_sets_or_float_labels_are_one_line(tmp_path):
    """Test images of 32x32 beside 28x28 training images were a torch shape error in epoch 1; a float label file
    (IDX type 0x0D) holding NaN was "cannot convert float NaN to integer"."""
    make_mnist(tmp_path, compress=False)
    write_idx(tmp_path / MNIST_FILES["test_images"], np.zeros((5, 32, 32)), compress=False)
    with pytest.raises(DataError, match=r"MNIST train images are \(28, 28\) but test images \(32, 32\) in .*: the "
                                        "files come from two different sets"):
        load_mnist(tmp_path)
    make_mnist(tmp_path, compress=False)
    labels = np.array([1.0, np.nan, 3.0, 4.0, 5.0], ">f4")
    (tmp_path / MNIST_FILES["test_labels"]).write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 5) + labels.tobytes())
    with pytest.raises(DataError, match="MNIST test labels must be integers, the file holds float32"):
        load_mnist(tmp_path)
