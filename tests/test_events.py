"""Event datasets: real on-disk formats written here, read through tonic, binned, cached, trained on."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tonic")

from click.testing import CliRunner  # noqa: E402

from conftest import REPO  # noqa: E402
from event_files import (make_nmnist, random_events, write_aedat2, write_aedat2_raw, write_aedat4,  # noqa: E402
                         write_gesture_npy, write_nmnist_bin)
from snncompile.cli import cli  # noqa: E402
from snncompile.config import load_config  # noqa: E402
from snncompile.data import load_dataset  # noqa: E402
from snncompile.data.events import SOURCES, FrameSpec, events_to_frames, list_samples, read_events  # noqa: E402
from snncompile.data.frame_cache import load_frames  # noqa: E402
from snncompile.errors import DataError, MissingDependencyError  # noqa: E402

X, Y, P, T = [1, 5, 33, 0], [2, 7, 0, 33], [1, 0, 1, 0], [0, 1000, 70_000, 8_388_000]


def test_nmnist_bin_round_trip(tmp_path):
    path = tmp_path / "a.bin"
    write_nmnist_bin(path, X, Y, P, T)
    ev = read_events("nmnist", path)
    assert ev["x"].tolist() == X and ev["y"].tolist() == Y and ev["p"].tolist() == P and ev["t"].tolist() == T


def test_aedat2_round_trip(tmp_path):
    path = tmp_path / "cifar10_cat_0.aedat"
    write_aedat2(path, [0, 127, 64], [5, 0, 127], [1, 0, 1], [10, 20, 4_000_000])
    ev = read_events("dvs_cifar10", path)
    assert ev["x"].tolist() == [0, 127, 64] and ev["y"].tolist() == [5, 0, 127]
    assert ev["p"].tolist() == [1, 0, 1] and ev["t"].tolist() == [10, 20, 4_000_000]


def test_aedat4_round_trip_through_the_aedat_decoder(tmp_path):
    """tonic's CIFAR10-DVS download (.aedat4), read by the real `aedat` decoder (no tonic needed): events in two
    packets come back in order with their fields where tonic's dtype puts them (t, x, y, on)."""
    pytest.importorskip("aedat")
    pytest.importorskip("flatbuffers")
    x, y, p, t = random_events(np.random.default_rng(0), 1001, 128, 128, 2_000_000)
    path = tmp_path / "cifar10_cat_0.aedat4"
    write_aedat4(path, x, y, p, t, events_per_packet=600)
    ev = read_events("dvs_cifar10", path)
    assert {k: ev[k].dtype for k in "xypt"} == dict.fromkeys("xypt", np.dtype(np.int64))
    assert (ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist(), ev["t"].tolist()) == (
        x.tolist(), y.tolist(), p.tolist(), t.tolist())


def test_aedat4_without_events_is_one_line(tmp_path):
    pytest.importorskip("aedat")
    pytest.importorskip("flatbuffers")
    path = tmp_path / "cifar10_cat_0.aedat4"
    write_aedat4(path, [], [], [], [])
    with pytest.raises(DataError, match=r"cifar10_cat_0.aedat4: an AEDAT 4 file without events \(a truncated copy\?\)$"):
        read_events("dvs_cifar10", path)
    path.write_bytes(path.read_bytes()[:20])  # cut inside its header
    with pytest.raises(DataError, match=r"cifar10_cat_0.aedat4: cannot decode \(") as err:
        read_events("dvs_cifar10", path)
    assert "\n" not in str(err.value)


def test_aedat2_addresses_decode_as_dat2mat_by_hand(tmp_path):
    """dat2mat.m, CIFAR10-DVS's own loader: x = 127 - bits 1-7, y = bits 8-14 (not mirrored), ON where bit 0
    is 0. Address (7 << 8) | (5 << 1) | 0: x 122, y 7, ON; (0 << 8) | (127 << 1) | 1: x 0, y 0, OFF."""
    path = tmp_path / "cifar10_cat_0.aedat"
    write_aedat2_raw(path, [(7 << 8) | (5 << 1), (127 << 1) | 1], [10, 20])
    ev = read_events("dvs_cifar10", path)
    assert (ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist()) == ([122, 0], [7, 0], [1, 0])


def test_aedat2_timestamps_continue_after_a_backward_step_as_dat2mat(tmp_path):
    """A timestamp stepping backwards (the 32-bit counter wrapping, or a clock reset): what follows continues
    from the timestamp before it. Four events 0.5 ms apart across the 2^32 us wrap bin one per step."""
    from snncompile.data.events import FrameSpec, events_to_frames

    path = tmp_path / "cifar10_cat_0.aedat"
    wrap = 2**32
    write_aedat2_raw(path, [0, 0, 0, 0, 0], [wrap - 1000, wrap - 500, 100, 600, 50])
    t = read_events("dvs_cifar10", path)["t"]
    # after the wrap: + (2^32 - 500); after the reset at the end: + the time before it as offset, 2^32 + 100
    assert t.tolist() == [wrap - 1000, wrap - 500, wrap - 400, wrap + 100, wrap + 150]
    events = {"x": np.full(4, 127), "y": np.zeros(4, np.int64), "p": np.ones(4, np.int64), "t": t[:4]}
    frames = events_to_frames(events, SOURCES["dvs_cifar10"], FrameSpec(steps=4))
    assert frames.reshape(4, -1).sum(1).tolist() == [1, 1, 1, 1]


def test_gesture_npy_round_trip(tmp_path):
    path = tmp_path / "user01_led" / "3.npy"
    write_gesture_npy(path, np.array([3, 100]), np.array([4, 127]), np.array([0, 1]), np.array([1.5, 2000.0]))
    ev = read_events("dvs_gesture", path)
    assert ev["x"].tolist() == [3, 100] and ev["t"].tolist() == [1500, 2_000_000]
    write_gesture_npy(path, np.array([0]), np.array([0]), np.array([0]), np.array([1.001]))
    assert read_events("dvs_gesture", path)["t"].tolist() == [1001]  # 1.001 * 1000 is 1000.999...: rounded


def test_gesture_npy_that_is_not_a_plain_array_is_one_line(tmp_path):
    text = tmp_path / "user01_led" / "3.npy"
    text.parent.mkdir()
    text.write_text("1 2 0 1.5\n")
    with pytest.raises(DataError, match=r"3.npy: not a NumPy .npy file \(it does not start with numpy's header\)$"):
        read_events("dvs_gesture", text)
    objects = tmp_path / "user01_led" / "4.npy"
    np.save(objects, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # what np.save of a dict list gives
    with pytest.raises(DataError, match=r"4.npy: holds Python objects, which are not loaded \(unpickling runs code\)"):
        read_events("dvs_gesture", objects)


def test_frames_by_hand():
    src = SOURCES["nmnist"]
    # t = 0, 100, 200, 399 us over T = 2 equal bins of the 400 us span: bins 0, 0, 1, 1
    ev = {"x": np.array([0, 0, 3, 33]), "y": np.array([0, 0, 2, 33]), "p": np.array([1, 1, 0, 1]),
          "t": np.array([0, 100, 200, 399])}
    f = events_to_frames(ev, src, FrameSpec(steps=2))
    assert f.shape == (2, 2, 34, 34) and f.dtype == np.uint16 and f.sum() == 4
    assert f[0, 1, 0, 0] == 2 and f[1, 0, 2, 3] == 1 and f[1, 1, 33, 33] == 1
    # fixed 150 us windows: bins 0, 0, 1, 2 -> the last one falls outside T = 2
    g = events_to_frames(ev, src, FrameSpec(steps=2, binning="window", bin_us=150))
    assert g.sum() == 3 and g[1, 0, 2, 3] == 1
    # downsample 2 -> 17 x 17, merge polarity, binary clip
    h = events_to_frames(ev, src, FrameSpec(steps=2, downsample=2, polarity="merge", clip=1))
    assert h.shape == (2, 1, 17, 17) and h[0, 0, 0, 0] == 1 and h[1, 0, 1, 1] == 1 and h[1, 0, 16, 16] == 1


def test_missing_folder_names_layout(tmp_path):
    with pytest.raises(DataError, match="NMNIST/Train and NMNIST/Test with one folder per digit") as err:
        list_samples("nmnist", tmp_path / "nope", True)
    assert "\n" not in str(err.value)
    # the fetch command as it runs: --root is required, and it is this data.root (it said `data fetch nmnist`)
    assert f"(`snncompile data fetch nmnist --root {tmp_path / 'nope'}`, or https://" in str(err.value)
    with pytest.raises(DataError, match="no training samples") as err:
        list_samples("dvs_gesture", tmp_path, True)
    assert str(err.value).endswith(f"<label>.npy (`snncompile data fetch dvs_gesture --root {tmp_path}`)")


def test_dvs_cifar10_seeded_9_to_1_split(tmp_path):
    for cls in SOURCES["dvs_cifar10"].classes:
        for i in range(10):
            write_aedat2(tmp_path / "CIFAR10DVS" / cls / f"cifar10_{cls}_{i}.aedat", [1], [1], [1], [5])
    train, test = list_samples("dvs_cifar10", tmp_path, True, 0), list_samples("dvs_cifar10", tmp_path, False, 0)
    assert len(train) == 90 and len(test) == 10 and not {p for p, _ in train} & {p for p, _ in test}
    assert sorted(label for _, label in test) == list(range(10))
    assert list_samples("dvs_cifar10", tmp_path, False, 0) == test
    assert list_samples("dvs_cifar10", tmp_path, False, 1) != test
    # each class splits on its own: recordings missing from the first class leave every other class's split
    for i in range(4, 10):
        (tmp_path / "CIFAR10DVS" / "airplane" / f"cifar10_airplane_{i}.aedat").unlink()
    fewer = list_samples("dvs_cifar10", tmp_path, False, 0)
    assert [s for s in fewer if s[1] > 0] == [s for s in test if s[1] > 0]


def test_a_small_or_incomplete_copy_of_a_class_per_folder_dataset(tmp_path):
    """Five recordings a class had no test split (round(0.5) is 0) and said "no test samples"; a class missing
    altogether (an incomplete download) trained on the other nine without a word."""
    for cls in SOURCES["dvs_cifar10"].classes:
        for i in range(5):
            write_aedat2(tmp_path / "CIFAR10DVS" / cls / f"cifar10_{cls}_{i}.aedat", [1], [1], [1], [5])
    train, test = list_samples("dvs_cifar10", tmp_path, True, 0), list_samples("dvs_cifar10", tmp_path, False, 0)
    assert len(train) == 40 and len(test) == 10
    for f in (tmp_path / "CIFAR10DVS" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"^dvs_cifar10: no training samples of class cat under .* \(an incomplete copy\?\)"):
        list_samples("dvs_cifar10", tmp_path, True, 0)
    make_nmnist(tmp_path / "nm", per_class_train=1, per_class_test=1, events=10)
    for digit in (7, 9):
        for f in (tmp_path / "nm" / "NMNIST" / "Test" / str(digit)).iterdir():
            f.unlink()
    assert len(list_samples("nmnist", tmp_path / "nm", True)) == 10
    with pytest.raises(DataError, match=r"^nmnist: no test samples of class 7, 9 under "):
        list_samples("nmnist", tmp_path / "nm", False)


def test_dvs_gesture_reads_any_user_folder_and_wants_every_gesture(tmp_path):
    """Its labels are file names, so a folder skipped (one not named userNN_lighting was, silently) or a copy
    without some gesture trained on fewer classes without a word."""
    split = tmp_path / "DVSGesture" / "ibmGestureTest"
    one = (np.array([1]), np.array([1]), np.array([0]), np.array([1.0]))
    for label in range(11):
        write_gesture_npy(split / ("user24" if label == 10 else "user24_led") / f"{label}.npy", *one)
    assert sorted(label for _, label in list_samples("dvs_gesture", tmp_path, False)) == list(range(11))
    (split / "user24" / "10.npy").unlink()
    with pytest.raises(DataError, match=r"^dvs_gesture: no test samples of class 10 under .* \(an incomplete copy\?\)"):
        list_samples("dvs_gesture", tmp_path, False)


def test_a_truncated_nmnist_file_is_named_with_its_reason_and_leaves_no_cache_folder(tmp_path):
    """It said "operands could not be broadcast together with shapes (101,) (100,)", and the failed first build
    left an empty hashed folder in the cache."""
    make_nmnist(tmp_path / "data", per_class_train=1, per_class_test=1, events=30)
    files = list_samples("nmnist", tmp_path / "data", True)
    cut = files[3][0]
    cut.write_bytes(cut.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"^.*\.bin: 148 bytes is not a whole number of 5-byte N-MNIST events \(a "
                                        r"truncated copy\?\)$"):
        load_frames("nmnist", "train", FrameSpec(steps=2), files, tmp_path / "cache", workers=1, progress=False)
    assert not list((tmp_path / "cache").iterdir())


def test_cache_hit_rebuild_on_any_parameter_and_repair(tmp_path):
    make_nmnist(tmp_path / "data", per_class_train=2, per_class_test=1, events=50)
    files = list_samples("nmnist", tmp_path / "data", True)
    cache = tmp_path / "cache"
    spec = FrameSpec(steps=4)
    a, labels, info = load_frames("nmnist", "train", spec, files, cache, progress=False)
    assert info["status"] == "built" and a.shape == (20, 4, 2, 34, 34) and labels.tolist() == sorted(labels.tolist())
    first_entry = info["cache"]
    _, _, info = load_frames("nmnist", "train", spec, files, cache, progress=False)
    assert info["status"] == "hit"
    entries = {info["cache"]}
    for changed in (FrameSpec(steps=5), FrameSpec(steps=4, binning="window", bin_us=5000),
                    FrameSpec(steps=4, bin_us=20_000, binning="window"), FrameSpec(steps=4, downsample=2)):
        b, _, info = load_frames("nmnist", "train", changed, files, cache, progress=False)
        assert info["status"] == "built" and info["cache"] not in entries
        entries.add(info["cache"])
    assert b.shape == (20, 4, 2, 17, 17)
    # truncate the first entry's shard: detected by its hash, rebuilt, same frames
    shard = next(Path(first_entry).glob("shard-*.npy"))
    shard.write_bytes(shard.read_bytes()[:100])
    c, _, info = load_frames("nmnist", "train", spec, files, cache, progress=False)
    assert info["status"] == "repaired 1 shard(s)" and np.array_equal(a, c)


@pytest.mark.parametrize("damage", [b"\xff\xfe not text", b"[]", b'{"key": "KEY", "shards": []}',
                                    b'{"key": "KEY", "shards": {"shard-00000.npy": 7}}', b'{"shards": {}}'])
def test_a_damaged_cache_index_is_rebuilt_not_a_traceback(tmp_path, damage):
    """Each of these gave a traceback (UnicodeDecodeError, AttributeError, TypeError) in every later run, and
    the user had to find the hashed cache folder to delete it."""
    make_nmnist(tmp_path / "data", per_class_train=1, per_class_test=1, events=20)
    files = list_samples("nmnist", tmp_path / "data", True)
    spec = FrameSpec(steps=2)
    built, _, info = load_frames("nmnist", "train", spec, files, tmp_path / "cache", progress=False)
    index = Path(info["cache"]) / "index.json"
    key = __import__("json").loads(index.read_text())["key"]
    index.write_bytes(damage.replace(b"KEY", key.encode()))
    again, _, info = load_frames("nmnist", "train", spec, files, tmp_path / "cache", progress=False)
    assert info["status"] == "built" and np.array_equal(built, again)
    _, _, info = load_frames("nmnist", "train", spec, files, tmp_path / "cache", progress=False)
    assert info["status"] == "hit"  # the index was written anew


def test_changing_T_in_config_rebuilds(tmp_path):
    make_nmnist(tmp_path / "data", per_class_train=1, per_class_test=1, events=30)
    base = ["data.root=" + repr(str(tmp_path / "data")), "data.cache_dir=" + repr(str(tmp_path / "cache"))]
    ds4 = load_dataset(load_config(REPO / "models" / "nmnist.toml", base + ["model.T=4"]), progress=False)
    ds6 = load_dataset(load_config(REPO / "models" / "nmnist.toml", base + ["model.T=6"]), progress=False)
    assert ds4.train.x.shape[1] == 4 and ds6.train.x.shape[1] == 6
    assert ds4.info["train_cache"]["cache"] != ds6.info["train_cache"]["cache"]
    assert ds6.info["train_cache"]["status"] == "built"


def test_a_wrong_input_shape_is_said_before_any_frame_is_built(tmp_path):
    """It was said after both splits' frame caches were built: minutes on the real datasets."""
    from snncompile.errors import ConfigError

    make_nmnist(tmp_path / "data", per_class_train=1, per_class_test=1, events=30)
    cfg = load_config(REPO / "models" / "nmnist.toml", ["data.root=" + repr(str(tmp_path / "data")),
                                                         "data.cache_dir=" + repr(str(tmp_path / "cache")),
                                                         "model.input_shape=[2, 32, 32]"])
    with pytest.raises(ConfigError, match=r"model.input_shape is \[2, 32, 32\] but nmnist frames are \[2, 34, 34\]"):
        load_dataset(cfg, progress=False)
    assert not (tmp_path / "cache").exists()


def test_training_end_to_end_on_nmnist_files(tmp_path):
    make_nmnist(tmp_path / "data", per_class_train=6, per_class_test=2)
    result = CliRunner().invoke(cli, [
        "train", str(REPO / "models" / "nmnist.toml"), "--out", str(tmp_path / "runs"), "--no-progress",
        "--set", f"data.root='{tmp_path / 'data'}'", "--set", f"data.cache_dir='{tmp_path / 'cache'}'",
        "--set", "model.arch='8C3-AP2-16C3-AP2-64FC-Voting'", "--set", "model.T=4", "--set", "train.epochs=2",
        "--set", "data.batch_size=20", "--set", "train.lr=3e-3", "--set", "data.num_workers=2",
    ])
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output
    run = next((tmp_path / "runs" / "nmnist").iterdir())
    manifest = (run / "manifest.json").read_text()
    assert '"binning": "count"' in manifest and '"status": "built"' in manifest
    other_T = CliRunner().invoke(cli, ["export", str(run), "--T", "3", "--samples", "2"])
    assert other_T.exit_code == 0, other_T.output
    assert other_T.stderr.strip() == ("note: no real reference inputs (the test frames are binned into 4 steps, not "
                                      "the export's T = 3; export at T = 4 to verify on them)")  # it blamed the dataset


def test_without_tonic_the_error_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tonic(name, *args, **kwargs):
        if name.startswith("tonic"):
            raise ImportError("no tonic")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tonic)
    path = tmp_path / "a.bin"
    write_nmnist_bin(path, X, Y, P, T)
    with pytest.raises(MissingDependencyError, match=r"pip install 'snncompile\[data\]'"):
        read_events("nmnist", path)


def test_the_extra_an_aedat4_file_asks_for_installs_its_reader(tmp_path, monkeypatch):
    """The message named the data extra, which held tonic only: installing it did not help."""
    import builtins
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    real_import = builtins.__import__

    def without_aedat(name, *args, **kwargs):
        if name == "aedat":
            raise ImportError("No module named 'aedat'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_aedat)
    path = tmp_path / "x.aedat4"
    path.write_bytes(b"#!AER-DAT4.0\r\n")
    with pytest.raises(MissingDependencyError, match=r"pip install 'snncompile\[data\]'") as err:
        read_events("dvs_cifar10", path)
    assert "aedat" in str(err.value)
    assert any(req.split(">")[0].split("=")[0].strip() == "aedat" for req in extras["data"])


def test_limit_keeps_every_class(tmp_path):
    """Event datasets list their files class by class: data.limit_* takes a seeded, class-balanced sample
    (the first N files would have held digits 0-3 only)."""
    make_nmnist(tmp_path / "data", per_class_train=5, per_class_test=3, events=20)
    cfg = load_config(REPO / "models" / "nmnist.toml", [
        "data.root=" + repr(str(tmp_path / "data")), "data.cache_dir=" + repr(str(tmp_path / "cache")),
        "data.limit_train=20", "data.limit_test=10", "model.T=2"])
    ds = load_dataset(cfg, progress=False)
    assert torch.bincount(ds.train.y, minlength=10).tolist() == [2] * 10
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [1] * 10


def test_dvs_cifar10_recording_in_both_formats_is_one_sample(tmp_path):
    """The original .aedat and tonic's .aedat4 of one recording must not land on both sides of the split."""
    for cls in SOURCES["dvs_cifar10"].classes:
        for i in range(10):
            write_aedat2(tmp_path / "CIFAR10DVS" / cls / f"cifar10_{cls}_{i}.aedat", [1], [1], [1], [5])
            (tmp_path / "CIFAR10DVS" / cls / f"cifar10_{cls}_{i}.aedat4").write_bytes(b"not read")
    train, test = list_samples("dvs_cifar10", tmp_path, True, 0), list_samples("dvs_cifar10", tmp_path, False, 0)
    assert len(train) == 90 and len(test) == 10
    assert not {p.stem for p, _ in train} & {p.stem for p, _ in test}
    assert {p.suffix for p, _ in train + test} == {".aedat"}  # the format read without an extra package


@pytest.mark.parametrize("content", [b"", b"no header line\n" + bytes(64), b"#!AER-DAT1.0\r\n" + bytes(64)],
                         ids=["empty", "no-header", "version-1"])
def test_malformed_aedat_is_one_line(tmp_path, content):
    path = tmp_path / "bad.aedat"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.aedat: cannot decode") as err:
        read_events("dvs_cifar10", path)
    assert "\n" not in str(err.value)


def test_gesture_label_outside_its_classes_is_one_line(tmp_path):
    write_gesture_npy(tmp_path / "DVSGesture" / "ibmGestureTrain" / "user01_led" / "11.npy", np.array([1]),
                      np.array([1]), np.array([0]), np.array([1.0]))
    with pytest.raises(DataError, match="11.npy: label 11 is outside dvs_gesture's 11 classes"):
        list_samples("dvs_gesture", tmp_path, True)


def test_missing_dependency_error_survives_a_worker_process():
    """Raised in a frame-cache worker, it must reach the parent as itself (its one-line message), not as a
    BrokenProcessPool from failing to rebuild it."""
    import pickle

    err = pickle.loads(pickle.dumps(MissingDependencyError("aedat (to read .aedat4)", "data")))
    assert isinstance(err, MissingDependencyError) and str(err) == "aedat (to read .aedat4) is not installed: pip install 'snncompile[data]'"
    assert (err.package, err.extra) == ("aedat (to read .aedat4)", "data")
