"""`raytrain infer --ref` with a vc_flow model: files converted, per-file SECS and RTF, bad inputs one line each."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from raytrain import vc_infer
from raytrain.models import build_model

TINY = {"hidden": 16, "layers": 2, "content_hidden": 16, "content_layers": 1, "content_dim": 8,
        "griffin_lim_iters": 4, "sample_steps": 3}


def _say(path: Path, text: str, voice: str, sr: int | None = None) -> Path:
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is installed by `make test` (apt); install it to run these tests"
    subprocess.run([exe, "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    if sr is not None:  # another rate than the model's: infer resamples
        wave, rate = sf.read(str(path), dtype="float32")
        sf.write(str(path), wave, rate, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("vc_infer")
    short = tmp / "short.wav"
    sf.write(str(short), 0.1 * np.sin(np.arange(8000) / 5.0).astype(np.float32), 16000)
    silent = tmp / "silent.wav"
    sf.write(str(silent), np.zeros(48000, dtype=np.float32), 16000)
    text = tmp / "notes.wav"
    text.write_text("not audio")
    return {"ref": _say(tmp / "ref.wav", "please call stella and ask her to bring these things", "en+f3"),
            "a": _say(tmp / "a.wav", "the quick brown fox jumps over the lazy dog", "en+m1"),
            "b": _say(tmp / "b.wav", "six spoons of fresh snow peas", "en+m3", sr=22050),
            "short": short, "silent": silent, "text": text, "missing": tmp / "missing.wav"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vc_flow", dict(TINY)).eval()


def test_converts_every_good_file_and_names_each_bad_one(model, files, tmp_path, capsys) -> None:
    sources = [str(files[k]) for k in ("a", "missing", "text", "b", "silent", "short")]
    rc = vc_infer.run(model, files["ref"], sources, tmp_path / "out", steps=2)
    out, err = capsys.readouterr()
    assert rc == 1 and model.sample_steps == 2  # some files failed; --steps reached the sampler
    written = sorted(p.name for p in (tmp_path / "out").glob("*.wav"))
    assert written == ["a_to_ref.wav", "b_to_ref.wav"]
    for name in written:
        wave, sr = sf.read(str(tmp_path / "out" / name))
        assert sr == 16000 and len(wave) > 16000 and np.abs(wave).max() > 0
    lines = [line for line in out.splitlines() if "_to_ref.wav" in line]
    assert len(lines) == 2 and all("SECS " in line and "(source " in line and "RTF " in line for line in lines)
    errors = err.splitlines()
    assert f"error: {files['missing']}: source not found" in errors
    assert any(e.startswith(f"error: {files['text']}: source is not an audio file") for e in errors)
    assert f"error: {files['silent']}: source is silent (3.00 s with no sample above -80 dBFS)" in errors
    assert (f"error: {files['short']}: source is 0.50 s long; the speaker encoder needs at least 1.6 s of speech"
            in errors)
    assert errors[-1] == "4 of 6 file(s) not converted (see above)"
    assert all("Traceback" not in e for e in errors)


def test_a_bad_reference_stops_before_converting(model, files, tmp_path, capsys) -> None:
    for ref, why in (("missing", "reference not found"), ("silent", "reference is silent")):
        assert vc_infer.run(model, files[ref], [str(files["a"])], tmp_path / ref) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {files[ref]}: {why}") and len(err.splitlines()) == 1
        assert not list((tmp_path / ref).glob("*.wav"))
