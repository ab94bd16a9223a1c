"""Values <-> the bytes a shard stores, by column role (``datasets_prep.columns``).

Audio is raw ``pcm_s16le`` mono bytes by default (``encode_pcm16``): half the size of float32,
no codec to install, and decoding is one ``np.frombuffer``; ``flac`` and ``f32le`` on request.
Video frames, tokens and feature frames are the raw little-endian bytes of the column's dtype:
the spec holds the shape of one time step, so the row's bytes say how many steps it has and
decoding is one ``np.frombuffer(...).reshape(-1, *frame_shape)``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from datasets_prep.columns import ARRAY_ROLES, AUDIO_FORMATS, ColumnSpec


def encode_pcm16(wave: np.ndarray) -> bytes:
    """float in [-1, 1] (any shape, usually (T,)) -> little-endian int16 bytes; values are clipped.

    Scale 32768 matches soundfile's int16 -> float conversion, so a PCM16 wav read as float
    and re-encoded gives back the exact same bytes.
    """
    x = np.clip(np.asarray(wave, dtype=np.float64) * 32768.0, -32768.0, 32767.0)
    return np.rint(x).astype("<i2").tobytes()


def decode_pcm16(data: bytes) -> np.ndarray:
    """pcm_s16le bytes -> float32 array of shape (T,) in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def encode_audio(wave: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    """float32 (T,) -> bytes in ``fmt``: ``pcm_s16le`` (default), ``flac`` (lossless 16-bit, ~half
    the size, costs a decode), or ``f32le`` (float32, no quantization, twice the size)."""
    if fmt == "pcm_s16le":
        return encode_pcm16(wave)
    if fmt == "f32le":
        return np.asarray(wave, dtype="<f4").tobytes()
    if fmt == "flac":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.clip(np.asarray(wave, dtype=np.float32), -1.0, 32767 / 32768), sample_rate,
                 format="FLAC", subtype="PCM_16")
        return buf.getvalue()
    raise ValueError(f"audio format {fmt!r} is unknown; use one of {AUDIO_FORMATS}")


def decode_audio(data: bytes, fmt: str = "pcm_s16le") -> np.ndarray:
    """bytes in ``fmt`` (see ``encode_audio``) -> float32 (T,)."""
    if fmt == "pcm_s16le":
        return decode_pcm16(data)
    if fmt == "f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if fmt == "flac":
        import soundfile as sf

        return sf.read(io.BytesIO(data), dtype="float32")[0]
    raise ValueError(f"audio format {fmt!r} is unknown; use one of {AUDIO_FORMATS}")


def audio_frames(data: bytes, fmt: str) -> int:
    """Samples of stored audio without decoding it (FLAC: from its header)."""
    if fmt == "pcm_s16le":
        return len(data) // 2
    if fmt == "f32le":
        return len(data) // 4
    import soundfile as sf

    return int(sf.info(io.BytesIO(data)).frames)


def encode_tokens(arr: np.ndarray) -> tuple[bytes, list[int], str]:
    """A numeric array (tokens, codes) -> (raw little-endian bytes, shape, dtype name), three columns of a row."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc":
        raise ValueError(f"tokens must be a numeric array, got dtype {arr.dtype}")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return little.tobytes(), [int(n) for n in arr.shape], arr.dtype.name


def decode_tokens(data: bytes, shape: list[int] | tuple[int, ...], dtype: str) -> np.ndarray:
    """``encode_tokens``' columns -> the array (a writable copy, native byte order)."""
    raw = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    return raw.astype(np.dtype(dtype)).reshape(tuple(int(n) for n in shape))


def encode_array(name: str, spec: ColumnSpec, value: Any) -> bytes:
    """A video / tokens / features value ``(T, *spec.frame_shape())`` -> little-endian bytes of the spec's
    dtype. Raises naming the column when the shape or dtype does not fit (floats are not rounded into
    tokens, nor into uint8 frames)."""
    arr = np.asarray(value)
    frame = spec.frame_shape()
    if arr.ndim != 1 + len(frame) or tuple(arr.shape[1:]) != frame:
        want = "(T" + "".join(f", {n}" for n in frame) + ")"
        raise ValueError(f"column {name!r} ({spec.role}) holds {want} arrays, got shape {tuple(arr.shape)}")
    dtype = np.dtype(str(spec.dtype))
    if arr.dtype != dtype:
        if arr.dtype.kind not in "biuf" or (dtype.kind in "biu" and arr.dtype.kind == "f"):
            raise ValueError(f"column {name!r} ({spec.role}) stores {dtype.name}, got {arr.dtype.name} values; "
                             "convert them first")
        cast = arr.astype(dtype)
        if dtype.kind in "biu" and not np.array_equal(cast, arr):
            raise ValueError(f"column {name!r}: values do not fit {dtype.name}")
        arr = cast
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<")).tobytes()


def decode_array(spec: ColumnSpec, data: bytes, shape: Any = None, dtype: str | None = None) -> np.ndarray:
    """``encode_array``'s bytes -> ``(T, *frame_shape)`` of the spec's dtype (a writable array). ``shape``
    and ``dtype``: the per-row companions of a ``shape_columns`` column."""
    if spec.shape_columns:
        return decode_tokens(data, shape, str(dtype or spec.dtype))
    dt = np.dtype(str(spec.dtype))
    return np.frombuffer(data, dtype=dt.newbyteorder("<")).astype(dt).reshape(-1, *spec.frame_shape())


def encode_value(name: str, spec: ColumnSpec, value: Any) -> Any:
    """A row's value -> what the shard stores: audio and arrays as bytes (bytes pass through as already
    encoded), text/id/label as str, meta as a plain Python value. None stays None."""
    if value is None:
        return None
    if spec.role == "audio":
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        wave = np.asarray(value)
        if wave.ndim != 1 or wave.dtype.kind != "f":
            raise ValueError(f"column {name!r} (audio) holds float (T,) waveforms, got {wave.dtype} {wave.shape}")
        return encode_audio(wave, str(spec.format), int(spec.sample_rate or 0))
    if spec.role in ARRAY_ROLES:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        return encode_array(name, spec, value)
    if spec.role in ("text", "id", "label"):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def frames(spec: ColumnSpec, stored: Any) -> int:
    """Time steps of a stored value (audio samples, video frames, tokens, feature frames)."""
    if stored is None:
        return 0
    if spec.role == "audio":
        return audio_frames(stored, str(spec.format))
    step = int(np.prod(spec.frame_shape(), dtype=np.int64)) * np.dtype(str(spec.dtype)).itemsize
    return len(stored) // step
