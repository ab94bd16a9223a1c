"""Reader for the ``<root>/<speaker>/<utt>.wav`` layout (VCTK, JVS, the espeak corpus).

Each audio file may have a ``<utt>.txt`` transcript beside it. Speakers and files are
visited in sorted order so the rows (and so the shards written from them) are
deterministic, which is what lets a re-run of prep skip finished shards.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

AUDIO_EXTS = (".wav", ".flac")


def read_speaker_dirs(root: str | os.PathLike, exts: tuple[str, ...] = AUDIO_EXTS) -> Iterator[dict]:
    """Yield {"id": "<speaker>/<stem>", "speaker", "text", "audio": float32 (T,), "sample_rate"}.

    Multichannel files keep their first channel (with a warning). Hidden files (temp files
    of an interrupted run) are ignored. A file soundfile cannot decode raises ``ValueError``
    naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder of <speaker>/<utt>.wav")
    for spk_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in spk_dir.iterdir()
                       if p.suffix.lower() in exts and not p.name.startswith(".") and p.is_file())
        for path in files:
            try:
                audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                raise ValueError(f"cannot read audio file {path}: {e} (delete or re-create it, then re-run)") from e
            if audio.shape[1] > 1:
                warnings.warn(f"{path} has {audio.shape[1]} channels: keeping the first", stacklevel=2)
            txt = path.with_suffix(".txt")
            text = txt.read_text(encoding="utf-8").strip() if txt.exists() else ""
            yield {
                "id": f"{spk_dir.name}/{path.stem}",
                "speaker": spk_dir.name,
                "text": text,
                "audio": np.ascontiguousarray(audio[:, 0]),
                "sample_rate": int(sr),
            }
