"""What a training step keeps for backward: measured, and with spikes kept compactly.

Autograd saves the input of every conv, linear and pooling layer for the weight gradient. In an SNN
those inputs are mostly spike tensors ``[T*B, C, H, W]`` of exact 0/1 values, stored by default in the
compute dtype (4 bytes in fp32, 2 in bf16). Inside :class:`SavedActivations` with ``compact=True``, a
tensor the network registered with :func:`mark_spikes` is saved as uint8 (1 byte) and turned back into
its dtype, exactly, when backward reads it: gradients are bit-identical, activation memory smaller.

The same hooks tally the bytes autograd holds (each storage once), so the saving is measured on any
device, CPU included (``snncompile bench train`` prints it).

Safety: a storage address is only trusted while the spike tensor registered for it is alive (weak
reference): once freed, the caching allocator may hand the same address to a non-binary tensor.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["SavedActivations", "mark_spikes"]

_ACTIVE: ContextVar["SavedActivations | None"] = ContextVar("snncompile_saved_activations", default=None)
_COMPACTIBLE = (torch.float32, torch.bfloat16, torch.float16)


def mark_spikes(spikes: Tensor) -> Tensor:
    """Register ``spikes`` (0/1 values) with the active :class:`SavedActivations`, if any; returns it.

    A no-op under ``torch.compile``: Dynamo cannot trace ``ContextVar.get`` and broke the graph after every
    LIF step (23 breaks in the digits network at T = 4; compiled inference 2.5-5.5x slower at batch 1-32), and compiled
    code does not run eager saved-tensor hooks anyway."""
    if torch.compiler.is_compiling():
        return spikes
    active = _ACTIVE.get()
    if active is not None and active.compact and spikes.dtype in _COMPACTIBLE:
        active._spikes[spikes.untyped_storage().data_ptr()] = weakref.ref(spikes)
    return spikes


class _Packed:
    """A spike tensor saved as uint8, with the dtype to restore."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: Tensor, dtype: torch.dtype):
        self.data, self.dtype = data, dtype


class SavedActivations:
    """Context for a forward pass: compacts registered spikes (``compact``) and counts saved bytes.

    ``saved_bytes``: bytes autograd kept for backward during the context (each storage counted once,
    parameters included), after compaction.
    """

    def __init__(self, compact: bool = True):
        self.compact = compact
        self._spikes: dict[int, weakref.ref] = {}
        self._storages: dict[int, int] = {}
        self._token = None
        self._hooks = None

    @property
    def saved_bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: Tensor):
        storage = t.untyped_storage()
        ref = self._spikes.get(storage.data_ptr()) if self.compact else None
        if ref is not None and ref() is not None and t.dtype in _COMPACTIBLE:
            packed = t.to(torch.uint8)
            self._storages[packed.untyped_storage().data_ptr()] = packed.untyped_storage().nbytes()
            return _Packed(packed, t.dtype)
        self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @staticmethod
    def _unpack(saved):
        return saved.data.to(saved.dtype) if isinstance(saved, _Packed) else saved

    def __enter__(self) -> "SavedActivations":
        self._token = _ACTIVE.set(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        _ACTIVE.reset(self._token)
        self._spikes.clear()
