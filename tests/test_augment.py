"""Training augmentation: random shift (pad + crop) with optional flip, checked against an explicit enumeration of
every possible outcome; its per-channel fill; event frames; what data.augment picks per dataset."""

import numpy as np
import pytest
import torch

from snncompile.config import load_config
from snncompile.data import load_dataset
from snncompile.data.augment import make_augment, random_shift
from snncompile.errors import ConfigError, InputError

from conftest import REPO


def distinct_images(b: int, c: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    """Every value distinct and non-zero, so a crop/flip is identified uniquely and padding shows as its fill."""
    return (torch.arange(b * c * h * w, dtype=torch.float32) + 1).view(b, c, h, w)


def reference_candidates(img: np.ndarray, pad: int = 4, fill=(0.0, 0.0, 0.0)):
    """All RandomCrop(pad)+flip outcomes of one [C, H, W] image, by explicit padding and slicing."""
    c, h, w = img.shape
    padded = np.empty((c, h + 2 * pad, w + 2 * pad), img.dtype)
    padded[:] = np.asarray(fill, img.dtype)[:c, None, None]
    padded[:, pad : pad + h, pad : pad + w] = img
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, :, ::-1]


def match(img: np.ndarray, out: np.ndarray, **kw) -> list:
    return [p for p, cand in reference_candidates(img, **kw) if np.array_equal(cand, out)]


def test_shape_dtype_and_input_untouched():
    x = torch.randn(5, 3, 32, 32)
    before = x.clone()
    y = random_shift(x, torch.Generator().manual_seed(0), padding=4, flip=True)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.equal(x, before)


def test_is_seeded_and_the_generator_advances():
    x = torch.randn(16, 3, 32, 32)
    a = random_shift(x, torch.Generator().manual_seed(3), padding=4, flip=True)
    b = random_shift(x, torch.Generator().manual_seed(3), padding=4, flip=True)
    c = random_shift(x, torch.Generator().manual_seed(4), padding=4, flip=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)
    assert not torch.equal(random_shift(x, g, padding=4), random_shift(x, g, padding=4))


def test_each_sample_is_a_zero_padded_crop_and_maybe_a_flip():
    x = distinct_images(64)
    y = random_shift(x, torch.Generator().manual_seed(1), padding=4, flip=True).numpy()
    seen = []
    for i in range(len(x)):
        matches = match(x[i].numpy(), y[i])
        assert len(matches) == 1, f"sample {i}: {len(matches)} matching crops"
        seen.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in seen}) > 20  # offsets vary per sample
    assert any(dy != 4 or dx != 4 for dy, dx, _ in seen)  # content really shifts (zeros come in)
    assert (y == 0).any()


def test_offsets_and_flips_are_spread_over_a_batch():
    x = distinct_images(256, c=1, h=8, w=8)
    y = random_shift(x, torch.Generator().manual_seed(0), padding=2, flip=True)
    offsets, flips = set(), 0
    for i in range(256):
        (p,) = match(x[i].numpy(), y[i].numpy(), pad=2)
        offsets.add(p[:2])
        flips += p[2]
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}  # every offset 0..2*pad occurs
    assert 0.35 * 256 < flips < 0.65 * 256


def test_without_flip_nothing_is_mirrored():
    x = distinct_images(128, c=1, h=8, w=8)
    y = random_shift(x, torch.Generator().manual_seed(0), padding=2)
    for i in range(128):
        (p,) = match(x[i].numpy(), y[i].numpy(), pad=2)
        assert p[2] is False


def test_flip_only_with_no_padding_mirrors_about_half():
    x = distinct_images(256)
    y = random_shift(x, torch.Generator().manual_seed(7), padding=0, flip=True)
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())
    assert 0.35 * 256 < int(flipped.sum()) < 0.65 * 256


def test_padding_takes_the_fill_of_each_channel():
    x = distinct_images(32, c=3, h=6, w=6)
    fill = (-0.5, -1.25, -2.0)
    y = random_shift(x, torch.Generator().manual_seed(2), padding=2, fill=fill).numpy()
    for i in range(32):
        assert len(match(x[i].numpy(), y[i], pad=2, fill=fill)) == 1
    for ch, value in enumerate(fill):  # some pixels of every channel came from the padding
        assert (y[:, ch] == value).any()


def test_event_frames_shift_every_step_of_a_sample_alike():
    b, t, c, h, w = 16, 4, 2, 8, 8
    frames = (torch.arange(b * t * c * h * w, dtype=torch.float32) + 1).view(b, t, c, h, w)
    y = random_shift(frames, torch.Generator().manual_seed(5), padding=2, flip=True)
    assert y.shape == frames.shape
    for i in range(b):
        per_step = {match(frames[i, s].numpy(), y[i, s].numpy(), pad=2, fill=(0.0, 0.0))[0] for s in range(t)}
        assert len(per_step) == 1  # one offset and flip for the whole recording


def test_rejects_wrong_rank():
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        random_shift(torch.zeros(3, 32, 32), torch.Generator(), padding=4)


def test_make_augment_resolves_auto_to_the_paper_default():
    assert make_augment("auto", 4, 0.0, "none") == (None, "none")
    fn, text = make_augment("auto", 4, 0.0, "shift-flip")
    assert fn is not None and text == "random shift (pad 4, crop back) + horizontal flip"
    fn, text = make_augment("shift", 2, 0.0, "shift-flip")
    assert text == "random shift (pad 2, crop back)"
    assert make_augment("none", 4, 0.0, "shift-flip") == (None, "none")


def test_config_rejects_unknown_augment_and_negative_pad():
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(REPO / "models" / "digits.toml", ["data.augment='rotate'"])
    with pytest.raises(ConfigError, match="data.augment_pad must be >= 0"):
        load_config(REPO / "models" / "digits.toml", ["data.augment='shift'", "data.augment_pad=-1"])


def test_digits_shift_pads_with_normalised_black():
    """digits are normalised with mean 0.5, std 0.5: a black (0) pixel becomes -1, and the padding must too."""
    cfg = load_config(REPO / "models" / "digits.toml", ["data.augment='shift'", "data.augment_pad=1"])
    ds = load_dataset(cfg, progress=False)
    assert ds.info["augment"] == "random shift (pad 1, crop back)"
    x = ds.train.x[:64]
    y = ds.augment(x, torch.Generator().manual_seed(0))
    assert float(x.min()) == -1.0  # the embedded digits do have black pixels
    for i in range(64):
        assert match(x[i].numpy(), y[i].numpy(), pad=1, fill=(-1.0,)), f"sample {i}"
    default = load_dataset(load_config(REPO / "models" / "digits.toml"), progress=False)
    assert default.augment is None and default.info["augment"] == "none"


def test_flipping_dvs_gesture_and_digits_is_refused():
    """DVS Gesture's classes name the hand and the direction: a mirrored right-hand wave is a left-hand wave;
    a mirrored digit is not that digit."""
    from types import SimpleNamespace

    from snncompile.config import DataConfig
    from snncompile.data import _set_augment

    with pytest.raises(ConfigError, match="shift-flip' on dvs_gesture: a mirrored right-hand wave is a left-hand"):
        _set_augment(SimpleNamespace(name="dvs_gesture", info={}), DataConfig(augment="shift-flip"), 0.0)
    for digits in ("digits", "mnist", "nmnist"):  # the README said "not for digits"; it was accepted
        with pytest.raises(ConfigError, match=f"shift-flip' on {digits}: a mirrored digit is not that digit"):
            _set_augment(SimpleNamespace(name=digits, info={}), DataConfig(augment="shift-flip"), 0.0)
    shifted = SimpleNamespace(name="dvs_gesture", info={})
    _set_augment(shifted, DataConfig(augment="shift", augment_pad=2), 0.0)
    assert shifted.info["augment"] == "random shift (pad 2, crop back)"
