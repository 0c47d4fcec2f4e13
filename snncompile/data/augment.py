"""Training-time augmentation on a batch: random shift (pad + crop, torchvision's RandomCrop) and an optional
horizontal flip, for static images and event frames alike.

The trainer calls the augmentation of its dataset once per batch with a seeded generator, so a resumed epoch
replays the same shifts. Padding is filled with what an empty pixel is *after* normalisation (black for images,
no events for frames), because the datasets are normalised once at load time and augmented afterwards.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, InputError

__all__ = ["random_shift", "make_augment", "Augment"]


def random_shift(x: Tensor, generator: torch.Generator, *, padding: int, flip: bool = False,
                 fill: float | Sequence[float] = 0.0) -> Tensor:
    """Pad every sample by ``padding`` and crop it back at its own random offset; mirror it left-right with
    probability 0.5 when ``flip``.

    Offsets are uniform in ``0..2*padding`` per axis (torchvision's RandomCrop). All draws come from
    ``generator`` (on its device, normally the CPU) and are applied on ``x``'s device, so the result depends
    only on the generator's state: 2 draws per call, 3 with ``flip`` (row offsets, column offsets, flips).

    Args:
        x: ``[B, C, H, W]`` images or ``[B, T, C, H, W]`` event frames (every step of a sample gets the same
            shift, as a camera moved once per recording).
        generator: the source of all randomness.
        padding: pixels of padding per side; 0 crops nothing (flip only).
        flip: also mirror half of the samples left-right (wrong for digits and for DVS Gesture, whose
            classes a mirror swaps; right for CIFAR10 and CIFAR10-DVS).
        fill: the padding value, one float or one per channel ``C``.

    Returns:
        Same shape, dtype and device as ``x``; ``x`` is not modified.
    """
    if x.ndim not in (4, 5):
        raise InputError(f"random_shift expects [B, C, H, W] or [B, T, C, H, W], got shape {list(x.shape)}")
    if x.ndim == 5:  # frames: one shift per sample over all its steps
        b, t, c, h, w = x.shape
        fill_c = torch.as_tensor(fill, dtype=x.dtype).expand(c)
        flat = random_shift(x.reshape(b, t * c, h, w), generator, padding=padding, flip=flip,
                            fill=fill_c.repeat(t).tolist())
        return flat.view(b, t, c, h, w)
    b, c, h, w = x.shape
    span = 2 * padding + 1
    dev = generator.device
    dy = torch.randint(0, span, (b,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, span, (b,), generator=generator, device=dev).to(x.device)
    padded = x
    if padding:
        # A per-channel canvas with the image copied in (F.pad takes one constant for every channel).
        fill_c = torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        padded = fill_c.expand(b, c, h + 2 * padding, w + 2 * padding).clone()  # [B, C, H+2p, W+2p]
        padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    if flip:
        mirrored = (torch.rand(b, generator=generator, device=dev) < 0.5).to(x.device)
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)  # a flip reads the crop right to left
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


Augment = Callable[[Tensor, torch.Generator], Tensor]


def make_augment(kind: str, padding: int, fill: float | Sequence[float], paper_default: str) -> tuple[Augment | None, str]:
    """The batch augmentation ``(x, generator) -> x`` that ``data.augment = kind`` asks for (None for none) and
    one line describing it for the manifest.

    ``kind`` is one of config's choices: 'auto' (``paper_default``, what the paper did on this dataset),
    'none', 'shift' or 'shift-flip'.
    """
    kind = paper_default if kind == "auto" else kind
    if kind == "none":
        return None, "none"
    if kind not in ("shift", "shift-flip") or padding < 0:
        raise ConfigError(f"data.augment={kind!r} with data.augment_pad={padding}: need shift or shift-flip, pad >= 0")
    flip = kind == "shift-flip"
    text = f"random shift (pad {padding}, crop back)" + (" + horizontal flip" if flip else "")
    return partial(random_shift, padding=padding, flip=flip, fill=fill), text
