"""What each column of a dataset holds: its role and shape (``ColumnSpec``), as the manifest declares it.

Roles and their fields (every time-role value is an array whose first axis is time):

- ``audio``     float waveform ``(T,)`` at ``sample_rate``, stored as ``format`` (pcm_s16le, flac, f32le)
- ``video``     ``uint8`` frames ``(T, height, width, channels)`` at ``fps``
- ``tokens``    integer ids ``(T,)`` (or ``(T, codebooks)``) at ``rate`` per second; ``rate`` None: a
                sequence not tied to time (text tokens); ``vocab``: optional vocabulary size
- ``features``  frames ``(T, dims)`` (or ``(T,)`` without ``dims``) at ``frame_rate``, of ``dtype``
                (log-mels, latents, pitch)
- ``text``, ``id``, ``label``: strings; ``meta``: anything else (counts, paths, tags)

A manifest written since schema 2 lists them under ``roles``; an older one has none, and
``manifest_columns`` derives them from its ``kind``, ``audio_columns`` and prep steps, so shards
prepared before roles existed read unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, model_validator

Role = Literal["audio", "video", "tokens", "features", "text", "id", "label", "meta"]
ROLES: tuple[str, ...] = ("audio", "video", "tokens", "features", "text", "id", "label", "meta")
TIME_ROLES = ("audio", "video", "tokens", "features")  # arrays with a time axis first
ARRAY_ROLES = ("video", "tokens", "features")  # stored as raw little-endian bytes of `dtype`
AUDIO_FORMATS = ("pcm_s16le", "flac", "f32le")

# the fields each role may set; `role` and `shape_columns` are allowed everywhere
_FIELDS: dict[str, tuple[str, ...]] = {
    "audio": ("sample_rate", "format"),
    "video": ("fps", "height", "width", "channels", "dtype"),
    "tokens": ("rate", "vocab", "codebooks", "dtype"),
    "features": ("frame_rate", "dims", "dtype"),
    "text": (), "id": (), "label": (),
    "meta": ("dtype",),
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "audio": {"format": "pcm_s16le"}, "video": {"dtype": "uint8"},
    "tokens": {"dtype": "int64"}, "features": {"dtype": "float32"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {"audio": ("sample_rate",), "video": ("fps", "height", "width", "channels")}
_OPTIONAL_FIELDS = ("sample_rate", "format", "fps", "height", "width", "channels", "rate", "vocab", "codebooks",
                    "frame_rate", "dims", "dtype")

# names an old manifest (no `roles`) gives these roles; see `derive_columns`
TEXT_NAMES = ("text", "phonemes", "lyrics")
LABEL_NAMES = ("speaker", "speakers")


class ColumnSpec(BaseModel):
    """One column's role and shape. Build one with the role constructors::

        ColumnSpec.audio(16000)                       # (T,) float at 16 kHz, stored as PCM16
        ColumnSpec.video(fps=25, height=96, width=96, channels=1)
        ColumnSpec.tokens(rate=75)                    # (T,) int64 at 75 per second
        ColumnSpec.features(frame_rate=50, dims=8)    # (T, 8) float32 latents at 50 Hz
        ColumnSpec.like(latents[0], frame_rate=50)    # the same, dims and dtype read off an example
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    sample_rate: int | None = None
    format: str | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    rate: float | None = None
    vocab: int | None = None
    codebooks: int | None = None
    frame_rate: float | None = None
    dims: int | None = None
    dtype: str | None = None
    shape_columns: bool = False  # stored with per-row `<name>_shape` / `<name>_dtype` columns (JSONL token files)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("role") in _DEFAULTS and not data.get("shape_columns"):
            return {**_DEFAULTS[str(data["role"])], **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _check_role_fields(self) -> ColumnSpec:
        allowed = _FIELDS[self.role]
        extra = [f for f in _OPTIONAL_FIELDS if getattr(self, f) is not None and f not in allowed]
        if extra:
            raise ValueError(f"a {self.role!r} column has no {', '.join(extra)}; its fields are "
                             f"{', '.join(allowed) or '(none)'}")
        missing = [f for f in _REQUIRED.get(self.role, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.role!r} column needs {', '.join(missing)}")
        for f in ("sample_rate", "fps", "height", "width", "channels", "rate", "frame_rate", "dims", "codebooks",
                  "vocab"):
            value = getattr(self, f)
            if value is not None and not value > 0:
                raise ValueError(f"{f} must be > 0, got {value}")
        if self.format is not None and self.format not in AUDIO_FORMATS:
            raise ValueError(f"audio format {self.format!r} is unknown; use one of {AUDIO_FORMATS}")
        if self.role in ARRAY_ROLES and self.dtype is not None:
            kind = np.dtype(self.dtype).kind
            wanted = {"video": "u", "tokens": "biu", "features": "fiu"}[self.role]
            if kind not in wanted or (self.role == "video" and self.dtype != "uint8"):
                raise ValueError(f"a {self.role!r} column cannot hold dtype {self.dtype!r}"
                                 + (" (video frames are uint8)" if self.role == "video" else ""))
        return self

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def audio(cls, sample_rate: int, format: str = "pcm_s16le") -> ColumnSpec:
        return cls(role="audio", sample_rate=sample_rate, format=format)

    @classmethod
    def video(cls, fps: float, height: int, width: int, channels: int = 3) -> ColumnSpec:
        return cls(role="video", fps=fps, height=height, width=width, channels=channels)

    @classmethod
    def tokens(cls, rate: float | None = None, dtype: str = "int64", vocab: int | None = None,
               codebooks: int | None = None) -> ColumnSpec:
        return cls(role="tokens", rate=rate, dtype=dtype, vocab=vocab, codebooks=codebooks)

    @classmethod
    def features(cls, frame_rate: float | None = None, dims: int | None = None, dtype: str = "float32") -> ColumnSpec:
        return cls(role="features", frame_rate=frame_rate, dims=dims, dtype=dtype)

    @classmethod
    def text(cls) -> ColumnSpec:
        return cls(role="text")

    @classmethod
    def id(cls) -> ColumnSpec:
        return cls(role="id")

    @classmethod
    def label(cls) -> ColumnSpec:
        return cls(role="label")

    @classmethod
    def meta(cls, dtype: str | None = None) -> ColumnSpec:
        return cls(role="meta", dtype=dtype)

    @classmethod
    def like(cls, example: np.ndarray, *, frame_rate: float | None = None) -> ColumnSpec:
        """A ``features`` column for arrays shaped like ``example`` ``(T,)`` or ``(T, dims)`` (a model's
        output frames, one row's worth): its dims and dtype (float64 is stored as float32)."""
        arr = np.asarray(example)
        if arr.ndim not in (1, 2):
            raise ValueError(f"a features column holds (T,) or (T, dims) arrays, the example is {arr.shape}")
        dtype = "float32" if arr.dtype == np.float64 else arr.dtype.name
        return cls.features(frame_rate, dims=int(arr.shape[1]) if arr.ndim == 2 else None, dtype=dtype)

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def is_time(self) -> bool:
        """An array with time first: padded along it by the collate, cropped by ``aligned_crop``."""
        return self.role in TIME_ROLES

    def time_rate(self) -> float | None:
        """Samples, frames or tokens per second along the first axis; None for a column not tied to time."""
        return {"audio": self.sample_rate, "video": self.fps, "tokens": self.rate,
                "features": self.frame_rate}.get(self.role)

    def frame_shape(self) -> tuple[int, ...]:
        """The shape of one time step: ``(H, W, C)`` for video, ``(dims,)`` / ``(codebooks,)`` or ``()``."""
        if self.role == "video":
            return (int(self.height or 0), int(self.width or 0), int(self.channels or 0))
        if self.role == "features" and self.dims:
            return (self.dims,)
        if self.role == "tokens" and self.codebooks:
            return (self.codebooks,)
        return ()

    def arrow_type(self) -> pa.DataType | None:
        """How the column is stored; None: inferred from the values (a ``meta`` column without dtype)."""
        if self.role in ("audio", *ARRAY_ROLES):
            return pa.binary()
        if self.role in ("text", "id", "label"):
            return pa.string()
        if self.dtype is None:
            return None
        return pa.string() if self.dtype in ("str", "string") else pa.from_numpy_dtype(np.dtype(self.dtype))

    def to_json(self) -> dict[str, Any]:
        """The manifest entry: the role and the fields it sets."""
        return {"role": self.role, **self.model_dump(exclude_defaults=True, exclude={"role"})}


def companions(name: str, spec: ColumnSpec) -> list[str]:
    """Columns stored beside ``name`` that belong to it (per-row shape and dtype of JSONL token files)."""
    if not spec.shape_columns:
        return []
    return [f"{name}_shape"] + ([f"{name}_dtype"] if spec.dtype is None else [])


def _steps_of(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    steps = manifest.get("steps") or (manifest.get("prep") or {}).get("steps") or []
    return {str(s.get("step")): dict(s) for s in steps if isinstance(s, Mapping)}


def derive_columns(manifest: Mapping[str, Any]) -> dict[str, ColumnSpec]:
    """Roles of a manifest without a ``roles`` block (schema 1, and what ``datasets_prep.execute`` records
    about its shards): ``id``; ``speaker``/``speakers`` labels; the ``audio_columns`` at the manifest's
    rate and format; ``text``/``phonemes``/``lyrics`` text; ``mel``/``f0`` of the ``features`` step at its
    hop; a binary column with a ``<name>_shape`` column (token files) tokens; the rest ``meta``."""
    types: Mapping[str, str] = manifest.get("columns") or {}
    audio = list(manifest.get("audio_columns") or [])
    rate = manifest.get("sample_rate")
    fmt = manifest.get("audio_format") or "pcm_s16le"
    feats = _steps_of(manifest).get("features")
    frame_rate = 1000.0 / float(feats["hop_ms"]) if feats and feats.get("hop_ms") else None
    out: dict[str, ColumnSpec] = {}
    for name in audio:
        out[name] = ColumnSpec.audio(int(rate), fmt) if rate else ColumnSpec(role="meta")
    hidden = set()
    for name, typ in types.items():
        if typ == "binary" and f"{name}_shape" in types and name not in audio:
            spec = ColumnSpec(role="tokens", dtype=None, shape_columns=True)
            out[name] = spec
            hidden.update(companions(name, spec))
    for name, typ in types.items():
        if name in out or name in hidden:
            continue
        if name == "id":
            out[name] = ColumnSpec.id()
        elif name in LABEL_NAMES:
            out[name] = ColumnSpec.label()
        elif name in TEXT_NAMES and typ in ("string", "large_string"):
            out[name] = ColumnSpec.text()
        elif name in ("mel", "f0") and typ == "binary" and feats:
            dims = int(feats["n_mels"]) if name == "mel" and feats.get("n_mels") else None
            out[name] = ColumnSpec.features(frame_rate, dims=dims)
        else:
            out[name] = ColumnSpec.meta()
    order = list(types) + [n for n in audio if n not in types]
    return {n: out[n] for n in order if n in out}


def manifest_columns(manifest: Mapping[str, Any]) -> dict[str, ColumnSpec]:
    """``{column: ColumnSpec}`` of a dataset, in stored order: its ``roles`` block, or, for a manifest
    written before roles existed, ``derive_columns``. Companion columns (per-row shapes) are not listed."""
    roles = manifest.get("roles")
    if roles is None:
        return derive_columns(manifest)
    return {name: ColumnSpec.model_validate(spec) for name, spec in roles.items()}


def columns_json(columns: Mapping[str, ColumnSpec]) -> dict[str, dict[str, Any]]:
    """The manifest's ``roles`` block."""
    return {name: spec.to_json() for name, spec in columns.items()}
