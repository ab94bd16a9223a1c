"""`raytrain infer --video` with an av_tse_asr model: the target written per mixture, bad inputs one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from datasets_prep.av import video_frames
from raytrain import av_infer
from raytrain.cli import main
from raytrain.config import load_config
from raytrain.models import build_model

SR = 8000
ARGS = {"sample_rate": SR, "video_size": 24, "encoder": {"d_model": 32, "ffn": 64, "layers": 1, "heads": 2},
        "separator": {"dim": 16, "blocks": 1, "heads": 2, "ff": 32}}
FRAMES = video_frames(SR, SR)  # one second: 25


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("av_tse_asr", dict(ARGS)).eval()


def _wav(path: Path, seconds: float = 1.0, channels: int = 1, sr: int = SR) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)
    sf.write(str(path), np.stack([wave] * channels, axis=1), sr, subtype="PCM_16")
    return path


def _video(path: Path, frames: int = FRAMES, size: int = 24, channels: int | None = None,
           dtype: type = np.uint8) -> Path:
    shape = (frames, size, size) if channels is None else (frames, size, size, channels)
    arr = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    if path.suffix == ".npz":
        np.savez(path, video=arr)
    else:
        np.save(path, arr)
    return path


def test_writes_the_target_and_prints_the_transcript(model, tmp_path, capsys) -> None:
    a, b = _wav(tmp_path / "a.wav"), _wav(tmp_path / "b.wav", sr=16000)  # b: resampled to the model's rate
    assert av_infer.run(model, _video(tmp_path / "lips.npy"), [str(a), str(b)], tmp_path / "out") == 0
    lines = capsys.readouterr().out.splitlines()
    for wav, line in zip((a, b), lines, strict=True):
        out = tmp_path / "out" / f"{wav.stem}_target.wav"
        wave, sr = sf.read(str(out))
        assert sr == SR and len(wave) == SR
        assert line.startswith(f"{wav} -> {out}  \"") and line.endswith('"')


@pytest.mark.parametrize("frames", [FRAMES - 1, FRAMES + 1])
def test_one_frame_off_is_padded_or_cut(model, tmp_path, frames) -> None:
    video = _video(tmp_path / "lips.npz", frames=frames, channels=1)
    assert av_infer.run(model, video, [str(_wav(tmp_path / "m.wav"))], tmp_path / "out") == 0
    assert sf.info(str(tmp_path / "out" / "m_target.wav")).frames == SR


def test_bad_inputs_are_one_line_naming_the_file(model, tmp_path) -> None:
    mix = _wav(tmp_path / "mix.wav")
    cases = [
        (_video(tmp_path / "long.npy", frames=FRAMES + 2), mix,
         f"{tmp_path / 'long.npy'}: {FRAMES + 2} video frames; {mix} (1.00 s) needs {FRAMES} at 25"),
        (_video(tmp_path / "big.npy", size=32, channels=3), mix,
         f"{tmp_path / 'big.npy'}: frames are 32x32x3 (height x width x channels); this model takes 24x24x1"),
        (_video(tmp_path / "float.npy", dtype=np.float32), mix, "video frames are float32; give uint8 frames"),
        (_video(tmp_path / "ok.npy"), _wav(tmp_path / "stereo.wav", channels=2),
         f"{tmp_path / 'stereo.wav'}: mixture has 2 channels; give a mono recording"),
        (_video(tmp_path / "ok.npy"), tmp_path / "gone.wav", f"{tmp_path / 'gone.wav'}: mixture not found"),
        (tmp_path / "gone.npy", mix, f"{tmp_path / 'gone.npy'}: video not found"),
    ]
    for video, wav, why in cases:
        with pytest.raises(av_infer.AVInputError) as exc:
            av_infer.run(model, video, [str(wav)], tmp_path / "out")
        assert why in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()  # every input is checked before anything is written


def test_an_integer_video_in_range_is_taken(model, tmp_path) -> None:
    video = _video(tmp_path / "lips.npy", dtype=np.int64)
    assert av_infer.read_video(video, (24, 24, 1)).dtype == np.uint8


def _run_folder(tmp_path: Path, model: torch.nn.Module, name: str = "av_tse_asr",
                args: dict | None = None) -> Path:
    """A run folder as the pipeline leaves it: config.yaml, summary.json and phase `a`'s best weights."""
    cfg = load_config(raw={"name": "unit", "data": {"tr": {"shards": "nowhere"}},
                           "model": {"name": name, "args": args or ARGS},
                           "defaults": {"train": ["tr"], "losses": {"si_sdr_pit": 1.0}}, "phases": [{"name": "a"}]})
    run = tmp_path / "runs" / "unit" / "20261203-000000"
    weights = run / "a" / "best" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save(model.state_dict(), weights)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run / "summary.json").write_text(json.dumps({"pipeline": "unit", "run_id": "r", "phases": {
        "a": {"status": "finished", "best_checkpoint": str(weights)}}}))
    return run


def test_cli_infer_with_video(model, tmp_path, capsys) -> None:
    run, mix = _run_folder(tmp_path, model), _wav(tmp_path / "mix.wav")
    out = tmp_path / "out"
    assert main(["infer", str(run), "--video", str(_video(tmp_path / "lips.npy")), str(mix), "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{mix} -> {out / 'mix_target.wav'}  \"")
    bad = _video(tmp_path / "short.npy", frames=FRAMES - 2)
    assert main(["infer", str(run), str(mix), "--video", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: {FRAMES - 2} video frames") and len(err.splitlines()) == 1
    assert main(["infer", str(run), str(mix)]) == 2
    assert "pass --video" in capsys.readouterr().err


def test_cli_video_for_a_model_that_is_not_audio_visual(tmp_path, capsys) -> None:
    args = {"sample_rate": SR, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 8, "msk_kernel_size": 3,
            "msk_num_feats": 8, "msk_num_hidden_feats": 16, "msk_num_layers": 1, "msk_num_stacks": 1}
    run = _run_folder(tmp_path, build_model("convtasnet", dict(args)), "convtasnet", args)
    mix = _wav(tmp_path / "mix.wav")
    assert main(["infer", str(run), "--video", str(_video(tmp_path / "lips.npy")), str(mix)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run}: --video is for audio-visual models") and len(err.splitlines()) == 1
