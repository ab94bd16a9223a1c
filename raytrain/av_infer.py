"""`raytrain infer --video` with an audio-visual target-speaker model (`av_tse_asr`): the target talker's speech
extracted from each mixture, and its transcript.

    raytrain infer runs/av_tse_asr/<id> --video target_lips.npy mixture.wav [more.wav ...] -o out/

The video is the target talker's lips at 25 frames a second: a uint8 array (frames, H, W) (grey) or
(frames, H, W, C) in a `.npy`, or a `.npz` holding one array (or one named `video`); it is loaded as data
(no pickles). Its frame count must match each mixture's length (25 per second; one frame more or less is padded
or cut) and its frame size the model's. Each mixture (mono, any rate: resampled to the model's) gives
`<out>/<mixture stem>_target.wav` at the model's rate; printed per file: `<mixture> -> <output>  "<transcript>"`.
A file that does not fit raises `AVInputError`, one line naming it; the command prints it and exits 2 before
writing anything.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from datasets_prep.av import video_frames
from raytrain.infer import InputError, open_audio
from raytrain.models.av import AVTSEASR


class AVInputError(InputError):
    """A mixture or video that the model cannot take; the message names the file and the reason."""


def read_mixture(path: str | Path, sample_rate: int) -> tuple[np.ndarray, float]:
    """Mono float32 audio at `sample_rate` and its duration in seconds; AVInputError if missing, not audio,
    empty or not mono."""
    p = Path(path)
    wave, sr = open_audio(p, "mixture", AVInputError, max_channels=None)  # empty or unreadable: one line
    if wave.shape[1] != 1:
        raise AVInputError(f"{p}: mixture has {wave.shape[1]} channels; give a mono recording")
    mono = wave[:, 0]
    if sr != sample_rate:
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, sample_rate).numpy()
    return np.asarray(mono, dtype=np.float32), len(wave) / sr


def read_video(path: str | Path, size: tuple[int, int, int]) -> np.ndarray:
    """uint8 frames (frames, H, W, C) from a .npy or .npz; AVInputError unless (H, W, C) is `size`."""
    p = Path(path)
    if not p.is_file():
        raise AVInputError(f"{p}: video not found")
    if p.suffix not in (".npy", ".npz"):
        raise AVInputError(f"{p}: give the video as a .npy or .npz array of uint8 frames")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = list(data.keys())
                if "video" not in keys and len(keys) != 1:
                    raise AVInputError(f"{p}: holds arrays {keys}; give one array, or name the video's 'video'")
                data = data["video" if "video" in keys else keys[0]]
    except AVInputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise AVInputError(f"{p}: not an array file np.load reads without pickles ({exc})") from None
    video = np.asarray(data)
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4:
        raise AVInputError(f"{p}: video is an array of shape {video.shape}; give (frames, H, W) or "
                           "(frames, H, W, C) uint8 frames")
    if video.dtype != np.uint8:
        if not np.issubdtype(video.dtype, np.integer) or video.size and (video.min() < 0 or video.max() > 255):
            raise AVInputError(f"{p}: video frames are {video.dtype}; give uint8 frames (0..255)")
        video = video.astype(np.uint8)
    if tuple(video.shape[1:]) != size:
        fmt = "x".join
        raise AVInputError(f"{p}: frames are {fmt(map(str, video.shape[1:]))} (height x width x channels); this "
                           f"model takes {fmt(map(str, size))}")
    return video


def fit_video(video: np.ndarray, video_path: str | Path, audio_path: str | Path, samples: int, seconds: float,
              sample_rate: int) -> np.ndarray:
    """`video` padded (its last frame repeated) or cut to the frames `samples` of audio need; AVInputError if it
    is more than one frame off."""
    need = video_frames(samples, sample_rate)
    have = len(video)
    if abs(have - need) > 1 or have == 0:
        raise AVInputError(f"{video_path}: {have} video frames; {audio_path} ({seconds:.2f} s) needs {need} at 25 "
                           "frames a second (one frame more or less is padded or cut)")
    return np.concatenate([video, video[-1:]]) if have < need else video[:need]


def run(model: AVTSEASR, video_path: str | Path, inputs: list[str], out_dir: str | Path) -> int:
    """Extracts and transcribes the target talker from each mixture in `inputs` (see the module docstring);
    every input is checked before any is written. Returns 0; raises AVInputError for a file that does not fit."""
    model.eval()
    video = read_video(video_path, (model.video_size, model.video_size, model.video_channels))
    jobs = []
    for path in inputs:
        mix, seconds = read_mixture(path, model.sample_rate)
        jobs.append((path, mix, fit_video(video, video_path, path, len(mix), seconds, model.sample_rate)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path, mix, frames in jobs:
        est, text = model.extract(torch.from_numpy(mix), torch.from_numpy(np.ascontiguousarray(frames)))
        target = out / f"{Path(path).stem}_target.wav"
        sf.write(str(target), np.clip(est.numpy(), -1.0, 1.0), model.sample_rate, subtype="PCM_16")
        print(f'{path} -> {target}  "{text}"')
    return 0
