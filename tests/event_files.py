"""Writers for tiny event files in each dataset's real on-disk format (used by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_nmnist_bin(path: Path, x, y, p, t) -> None:
    """N-MNIST's 40-bit events: x (8), y (8), polarity (1) + timestamp (23, microseconds)."""
    x, y, p, t = (np.asarray(a, np.int64) for a in (x, y, p, t))
    raw = np.zeros((len(x), 5), np.uint8)
    raw[:, 0] = x
    raw[:, 1] = y
    raw[:, 2] = (p << 7) | ((t >> 16) & 0x7F)
    raw[:, 3] = (t >> 8) & 0xFF
    raw[:, 4] = t & 0xFF
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw.tobytes())


def write_aedat2(path: Path, x, y, p, t) -> None:
    """AEDAT 2.0 as CIFAR10-DVS ships it, events in dat2mat.m's coordinates: see :func:`write_aedat2_raw`;
    DVS128 addresses with x in bits 1-7 (mirrored), y in bits 8-14, bit 0 = 1 - polarity."""
    x, y, p = (np.asarray(a, np.int64) for a in (x, y, p))
    write_aedat2_raw(path, (y << 8) | ((127 - x) << 1) | (1 - p), t)


def write_aedat2_raw(path: Path, addresses, timestamps) -> None:
    """'#' header lines (CRLF), then big-endian (address, timestamp) uint32 pairs."""
    body = np.zeros(len(addresses), np.dtype([("address", ">u4"), ("timeStamp", ">u4")]))
    body["address"], body["timeStamp"] = addresses, timestamps
    header = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body.tobytes())


# AEDAT 4.0 (iniVation DV, tonic's CIFAR10-DVS download), as the `aedat` package decodes it: the magic line, a
# size-prefixed IOHeader flatbuffer (file identifier IOHE) whose description XML declares the streams, then packets
# of (u32 stream id, u32 length, size-prefixed EventPacket flatbuffer, identifier EVTS). Uncompressed, so only
# flatbuffers (an onnxruntime dependency) is needed to write one.
_AEDAT4_EVENT = np.dtype({"names": ["t", "x", "y", "on"], "formats": ["<i8", "<i2", "<i2", "u1"],
                          "offsets": [0, 8, 10, 12], "itemsize": 16})  # the schema's struct, padded to int64's 8
_AEDAT4_STREAMS = ('<dv version="2.0"><node name="outInfo" path="/mainloop/Recorder/outInfo/">'
                   '<node name="0" path="/mainloop/Recorder/outInfo/0/">'
                   '<attr key="compression" type="string">NONE</attr>'
                   '<attr key="typeIdentifier" type="string">EVTS</attr>'
                   '<node name="info" path="/mainloop/Recorder/outInfo/0/info/">'
                   '<attr key="sizeX" type="int">{w}</attr><attr key="sizeY" type="int">{h}</attr>'
                   '</node></node></node></dv>')


def write_aedat4(path: Path, x, y, p, t, width=128, height=128, events_per_packet=None) -> None:
    """One event stream (id 0) of ``t`` (us), ``x``, ``y``, ``p`` (1 = ON), in packets of at most
    ``events_per_packet`` events (default: one packet)."""
    import flatbuffers

    header = flatbuffers.Builder(1024)
    description = header.CreateString(_AEDAT4_STREAMS.format(w=width, h=height))
    header.StartObject(3)  # table IOHeader: compression (default NONE), file_data_position, description
    header.PrependInt64Slot(1, -1, -1)  # -1: no file data table; the decoder reads packets to the end of the file
    header.PrependUOffsetTRelativeSlot(2, description, 0)
    header.FinishSizePrefixed(header.EndObject(), file_identifier=b"IOHE")
    events = np.zeros(len(t), _AEDAT4_EVENT)  # zeros: the 3 padding bytes too
    events["t"], events["x"], events["y"], events["on"] = t, x, y, np.asarray(p, bool)
    step = events_per_packet or max(len(events), 1)
    packets = []
    for start in range(0, len(events), step):
        raw = events[start:start + step].tobytes()
        b = flatbuffers.Builder(len(raw) + 64)
        # a vector of 16-byte structs copied in at once (the builder's numpy helper takes scalar types only)
        b.StartVector(_AEDAT4_EVENT.itemsize, len(raw) // _AEDAT4_EVENT.itemsize, 8)
        b.head -= len(raw)
        b.Bytes[b.head:b.head + len(raw)] = raw
        vector = b.EndVector()
        b.StartObject(1)  # table EventPacket { elements: [Event] }
        b.PrependUOffsetTRelativeSlot(0, vector, 0)
        b.FinishSizePrefixed(b.EndObject(), file_identifier=b"EVTS")
        body = bytes(b.Output())
        packets.append(np.array([0, len(body)], "<u4").tobytes() + body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"#!AER-DAT4.0\r\n" + bytes(header.Output()) + b"".join(packets))


def write_gesture_npy(path: Path, x, y, p, t_ms) -> None:
    """tonic's DVS Gesture release: one [N, 4] array per sample, columns x, y, p, t (milliseconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([x, y, p, t_ms], axis=1).astype(np.float64))


def random_events(rng, n, width, height, duration_us):
    t = np.sort(rng.integers(0, duration_us, n))
    return rng.integers(0, width, n), rng.integers(0, height, n), rng.integers(0, 2, n), t


def make_nmnist(root: Path, per_class_train=4, per_class_test=2, events=300, seed=0) -> Path:
    """root/NMNIST/{Train,Test}/<digit>/NNNNN.bin with events concentrated on a digit-dependent row,
    so a tiny network can learn something."""
    rng = np.random.default_rng(seed)
    for split, n in (("Train", per_class_train), ("Test", per_class_test)):
        for digit in range(10):
            for i in range(n):
                x, y, p, t = random_events(rng, events, 34, 34, 300_000)
                y = np.where(rng.random(events) < 0.7, 3 * digit + 1, y)  # label-dependent structure
                write_nmnist_bin(root / "NMNIST" / split / str(digit) / f"{i:05d}.bin", x, y, p, t)
    return root
