"""CIFAR10 reader: batch files made here in the real on-disk format (pickled dicts with
bytes keys, as the official python version ships them), the restricted unpickler, and the trainer with the paper's augmentation."""

import builtins
import codecs
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from snncompile.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_FOLDER,
    load_cifar10,
    read_cifar_pickle,
)
from snncompile.errors import DataError

ALL_FILES = "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"


def batch_dict(data: np.ndarray, labels: list[int], name: str, str_keys: bool = False) -> dict:
    d = {
        b"batch_label": name.encode(),
        b"labels": list(labels),
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return {k.decode(): v for k, v in d.items()} if str_keys else d


def make_cifar(folder, n_train=3, n_test=4, meta=True, str_keys=False, label_names=None):
    """Write data_batch_1..5, test_batch (and batches.meta) like the official files; return the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump(batch_dict(data, labels, name, str_keys), f, protocol=2)
        out[name] = (data, labels)
    if meta:
        names = label_names or [c.encode() for c in CIFAR10_CLASSES]
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"num_cases_per_batch": n_train, b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return out


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch dict exactly as Python 2's cPickle (protocol 2) wrote the official files: str keys as BINSTRING,
    numpy.core.multiarray._reconstruct, dtype state with '|' byte order, raw data as one BINSTRING."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + i(data.shape[0]) + b"J" + struct.pack("<i", data.shape[1]) + b"\x86" + dtype
             + b"\x89" + s(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(i(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"labels") + label_list
            + s(b"data") + array + s(b"filenames") + b"](" + s(b"a.png") + b"e" + b"u.")


# --- reading -------------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_values(tmp_path):
    folder = tmp_path / CIFAR10_FOLDER
    arrays = make_cifar(folder)
    ds = load_cifar10(folder)
    assert ds.name == "cifar10" and ds.static and ds.classes == CIFAR10_CLASSES
    assert ds.train.x.shape == (15, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64 and ds.train.y.shape == (15,)
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0
    train_data = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(ds.train.y.numpy(), train_labels)
    np.testing.assert_array_equal(ds.test.y.numpy(), arrays["test_batch"][1])
    np.testing.assert_allclose(ds.train.x.numpy().reshape(15, -1) * 255, train_data, atol=1e-4)
    np.testing.assert_allclose(ds.test.x.numpy().reshape(4, -1) * 255, arrays["test_batch"][0], atol=1e-4)
    assert ds.info["source"] == str(folder)


def test_one_pixel_lands_in_channel_row_col(tmp_path):
    folder = tmp_path / CIFAR10_FOLDER
    make_cifar(folder)
    data = np.zeros((2, 3072), np.uint8)
    row, col = 5, 7  # R, G and B planes of 1024 values each, every plane row-major 32x32
    data[1, row * 32 + col] = 11
    data[1, 1024 + row * 32 + col] = 22
    data[1, 2048 + row * 32 + col] = 33
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch_dict(data, [4, 9], "b2"), f, protocol=2)
    ds = load_cifar10(folder)
    x = ds.train.x[3 + 1]  # batch 1 has 3 samples; second sample of batch 2
    np.testing.assert_allclose(x[:, row, col].numpy() * 255, [11, 22, 33], atol=1e-4)
    assert float(x.sum()) * 255 == pytest.approx(66, abs=1e-3)  # nothing anywhere else (e.g. not at (7, 5))
    assert ds.train.y[3:5].tolist() == [4, 9]


def test_root_may_be_the_parent_folder(tmp_path):
    folder = tmp_path / CIFAR10_FOLDER
    make_cifar(folder)
    a, b = load_cifar10(tmp_path), load_cifar10(str(folder))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.info["source"] == str(folder) == b.info["source"]


def test_class_names_from_meta_or_default(tmp_path):
    custom = [f"c{i}".encode() for i in range(10)]
    make_cifar(tmp_path / "with", label_names=custom)
    assert load_cifar10(tmp_path / "with").classes == [f"c{i}" for i in range(10)]
    make_cifar(tmp_path / "without", meta=False)
    assert load_cifar10(tmp_path / "without").classes == CIFAR10_CLASSES


def test_str_keys_are_accepted(tmp_path):
    make_cifar(tmp_path, str_keys=True)
    assert load_cifar10(tmp_path).train.x.shape == (15, 3, 32, 32)


def test_empty_bytes_in_protocol_2(tmp_path):
    """Python 3 writes b"" under protocol 2 as a call of __builtin__.bytes(); that one call is allowed."""
    path = tmp_path / "empty"
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"", b"filenames": [b"", b"x"]}, f, protocol=2)
    assert read_cifar_pickle(path) == {"batch_label": b"", "filenames": [b"", b"x"]}


def test_python2_official_layout(tmp_path):
    """The official files come from Python 2: numpy.core.multiarray globals and BINSTRING raw data."""
    make_cifar(tmp_path)
    data = np.random.default_rng(1).integers(0, 256, (2, 3072)).astype(np.uint8)
    (tmp_path / "test_batch").write_bytes(py2_pickle(data, [3, 300 - 293]))
    raw = read_cifar_pickle(tmp_path / "test_batch")
    assert set(raw) == {"batch_label", "labels", "data", "filenames"}
    ds = load_cifar10(tmp_path)
    assert ds.test.y.tolist() == [3, 7]
    np.testing.assert_allclose(ds.test.x.numpy().reshape(2, -1) * 255, data, atol=1e-4)


# --- errors --------------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("where", ["nowhere", "empty"])
def test_missing_folder_names_files_and_layout(tmp_path, where):
    root = tmp_path / where
    if where == "empty":
        root.mkdir()
    with pytest.raises(DataError) as e:
        load_cifar10(root)
    msg = one_line(e)
    assert ALL_FILES in msg and CIFAR10_FOLDER in msg and "python version" in msg and str(root) in msg


def test_missing_one_batch_names_only_that_file(tmp_path):
    folder = tmp_path / CIFAR10_FOLDER
    make_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path)
    msg = one_line(e)
    assert f"missing in {folder}: data_batch_3 (" in msg


def test_empty_root_asks_for_data_root():
    from snncompile.errors import ConfigError

    with pytest.raises(ConfigError, match="data.root"):  # the config's to fix (exit 2), not the data's
        load_cifar10("")


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "kind, forbidden",
    [("system", "system"), ("print", "builtins.print"), ("exec", "builtins.exec"), ("class", "_Payload")],
)
def test_malicious_pickle_is_rejected_and_nothing_runs(tmp_path, capsys, kind, forbidden):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = {
        "system": _Payload(os.system, f"echo pwned > {marker}"),
        "print": _Payload(builtins.print, "pwned"),
        "exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "class": _Payload(_Payload, print, "pwned"),
    }[kind]
    data = np.zeros((3, 3072), np.uint8)
    evil = batch_dict(data, [0, 1, 2], "evil")
    evil[b"filenames"] = payload  # hidden in a value of an otherwise valid batch
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(evil, f, protocol=2)
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path)
    msg = one_line(e)
    assert "forbidden global" in msg and forbidden in msg and "data_batch_1" in msg
    assert not marker.exists()
    assert "pwned" not in capsys.readouterr().out


def test_codecs_encode_is_narrowed_to_latin1(tmp_path):
    path = tmp_path / "odd"
    with open(path, "wb") as f:
        pickle.dump({b"x": _Payload(codecs.encode, "abc", "rot13")}, f, protocol=2)
    with pytest.raises(DataError, match="only allowed as encode"):
        read_cifar_pickle(path)


@pytest.mark.parametrize("cut", [0.5, 0.99, 0])
def test_truncated_or_garbage_file_is_one_line(tmp_path, cut):
    make_cifar(tmp_path)
    path = tmp_path / "data_batch_4"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)] if cut else b"\x00garbage, not a pickle")
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path)
    msg = one_line(e)
    assert "data_batch_4" in msg and "truncated or corrupt" in msg


@pytest.mark.parametrize(
    "batch, match",
    [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"data must be uint8 \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "data must be uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, "2 images but 3 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels must lie in 0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "not a CIFAR10 batch"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_bad_batch_contents(tmp_path, batch, match):
    make_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match=match) as e:
        load_cifar10(tmp_path)
    one_line(e)


def test_bad_meta(tmp_path):
    make_cifar(tmp_path, label_names=[b"a", b"b"])
    with pytest.raises(DataError, match="label_names must be a list of 10"):
        load_cifar10(tmp_path)


# --- augmentation (the functions themselves: test_augment.py) ---------------------------------------------


def test_trainer_trains_on_cifar10_files_with_augmentation(tmp_path, monkeypatch):
    """End to end through the same path users run: files -> load_dataset -> augmentation -> trainer; every
    training batch goes through the dataset's augmentation (with the epoch's generator), no test batch does."""
    import snncompile.train as train_module
    from snncompile.config import load_config
    from snncompile.train import train
    from conftest import REPO

    make_cifar(tmp_path / "cifar-10-batches-py", n_train=8, n_test=8)  # 8 per batch file: 40 training images
    cfg = load_config(REPO / "models" / "cifar10.toml", [
        f"data.root='{tmp_path}'", "model.arch='8C3-AP2-16FC-Voting'", "model.T=2", "train.epochs=2",
        "data.batch_size=8", "train.threads=1"])
    augmented = []
    real_load = train_module.load_dataset

    def load_with_spy(*args, **kwargs):
        ds = real_load(*args, **kwargs)
        augment = ds.augment

        def spy(x, generator):
            augmented.append((tuple(x.shape), generator))
            return augment(x, generator)

        ds.augment = spy
        return ds

    monkeypatch.setattr(train_module, "load_dataset", load_with_spy)
    result = train(cfg, tmp_path / "runs", progress=False, echo=lambda s: None)
    manifest = (result.run_dir / "manifest.json").read_text()
    assert "random shift (pad 4, crop back) + horizontal flip" in manifest and result.epochs_done == 2
    assert [shape for shape, _ in augmented] == [(8, 3, 32, 32)] * 10  # 5 batches x 2 epochs, the test set never
    assert all(isinstance(g, torch.Generator) for _, g in augmented)
    assert len({id(g) for _, g in augmented[:5]}) == 1 and augmented[4][1] is not augmented[5][1]  # one per epoch
