"""The prep executor in-process (workers=0): shards, rejects, manifest, restart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_prep.execute import REJECTS_NAME, prepare_items
from datasets_prep.readers.manifests import list_items
from datasets_prep.shards import decode_audio, read_manifest, shard_paths

SR = 16000


def _tone(path: Path, seconds: float, sr: int = SR, freq: float = 200.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")


def _corpus(root: Path) -> Path:
    for spk, n in (("alice", 3), ("bob", 4)):
        for k in range(n):
            _tone(root / spk / f"{spk}_{k}.wav", 0.5 + 0.25 * k, freq=150 + 40 * k)
            (root / spk / f"{spk}_{k}.txt").write_text(f"utterance {k} of {spk}")
    (root / "bob" / "bob_corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(str(root / "bob" / "bob_empty.wav"), np.zeros(0, dtype=np.float32), SR)
    _tone(root / "alice" / "alice_48k.wav", 0.5, sr=48000)
    return root


def test_good_files_are_prepared_and_the_three_bad_ones_rejected_with_reasons(tmp_path: Path) -> None:
    items = list_items("speaker-dirs", _corpus(tmp_path / "raw"))
    man = prepare_items(items, tmp_path / "out", kind="speech", audio_columns=["audio"], rows_per_shard=4,
                        expect_sample_rate=SR, workers=0)
    assert man["rows"] == 7 and man["items"] == 10 and man["rejects"]["count"] == 3
    rejects = {r["id"]: r["reason"] for r in pq.read_table(tmp_path / "out" / REJECTS_NAME).to_pylist()}
    assert rejects["bob/bob_corrupt"].startswith("unreadable audio")
    assert rejects["bob/bob_empty"].startswith("empty audio")
    assert rejects["alice/alice_48k"].startswith("wrong sample rate 48000 Hz (expected 16000 Hz")
    assert read_manifest(tmp_path / "out")["speaker_hours"].keys() == {"alice", "bob"}
    rows = [r for p in shard_paths(tmp_path / "out", man) for r in pq.read_table(p).to_pylist()]
    assert [r["id"] for r in rows][:3] == ["alice/alice_0", "alice/alice_1", "alice/alice_2"]
    first = decode_audio(rows[0]["audio"], man["audio_format"])
    ref, _ = sf.read(str(tmp_path / "raw" / "alice" / "alice_0.wav"), dtype="float32")
    np.testing.assert_array_equal(first, ref)  # PCM16 in, PCM16 out: bit-exact
    assert rows[0]["text"] == "utterance 0 of alice" and rows[0]["speaker"] == "alice"
    assert sum(b["count"] for b in man["duration_histogram"]) == 7
    assert all(len(s["sha256"]) == 64 for s in man["shards"])


def test_rerun_skips_finished_shards_and_rewrites_a_damaged_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items = list_items("speaker-dirs", _corpus(tmp_path / "raw"))
    kw = {"kind": "speech", "audio_columns": ["audio"], "rows_per_shard": 3, "expect_sample_rate": SR, "workers": 0}
    first = prepare_items(items, tmp_path / "out", **kw)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")}
    capsys.readouterr()
    again = prepare_items(items, tmp_path / "out", **kw)
    assert "to write" not in capsys.readouterr().out  # nothing re-done
    assert again["shards"] == first["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")} == mtimes
    victim = tmp_path / "out" / first["shards"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:100])  # a torn copy
    (tmp_path / "out" / "_manifest.json").unlink()
    fixed = prepare_items(items, tmp_path / "out", **kw)
    assert "1 to write" in capsys.readouterr().out
    assert fixed["shards"] == first["shards"]


def test_steps_and_formats_are_recorded_and_change_the_output(tmp_path: Path) -> None:
    items = list_items("speaker-dirs", _corpus(tmp_path / "raw"))
    steps = [("resample", {"sample_rate": 8000}), ("normalize", {"peak_db": -3}), ("features", {"n_mels": 20})]
    man = prepare_items(items, tmp_path / "flac", kind="speech", audio_columns=["audio"], steps=steps,
                        audio_format="flac", workers=0)
    assert man["sample_rate"] == 8000 and man["audio_format"] == "flac"
    assert [s["step"] for s in man["steps"]] == ["resample", "normalize", "features"]
    assert man["steps"][2]["n_mels"] == 20 and man["rejects"]["count"] == 2  # 48 kHz is resampled now
    row = pq.read_table(shard_paths(tmp_path / "flac", man)[0]).to_pylist()[0]
    wave = decode_audio(row["audio"], "flac")
    assert len(wave) == row["num_samples"] and 20 * np.log10(np.abs(wave).max()) == pytest.approx(-3, abs=0.01)
    mel = np.frombuffer(row["mel"], dtype="<f4").reshape(row["mel_frames"], row["n_mels"])
    assert mel.shape[1] == 20 and np.isfinite(mel).all()


def test_mixed_rates_without_resample_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    items = list_items("speaker-dirs", _corpus(tmp_path / "raw"))
    with pytest.raises(ValueError, match="several sample rates.*add the resample step"):
        prepare_items(items, tmp_path / "out", kind="speech", audio_columns=["audio"], rows_per_shard=2, workers=0)
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_wsj0_2mix_keeps_mix_equal_to_the_sum_of_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(3):
        s1, s2 = (0.3 * rng.standard_normal(SR).astype(np.float32) for _ in range(2))
        name = f"a{k}x0101_1.0_b{k}y0202_-1.0.wav"  # WSJ speaker codes a0x, b0y, ...
        for sub, x in (("s1", s1), ("s2", s2), ("mix", s1 + s2)):
            (tmp_path / "raw" / sub).mkdir(parents=True, exist_ok=True)
            sf.write(str(tmp_path / "raw" / sub / name), x, SR, subtype="FLOAT")
    items = list_items("wsj0-2mix", tmp_path / "raw")
    man = prepare_items(items, tmp_path / "out", kind="mixtures", audio_columns=["mix", "s1", "s2"],
                        steps=[("normalize", {"peak_db": -6})], audio_format="f32le", workers=0)
    assert man["rows"] == 3 and man["num_speakers"] == 6
    for r in pq.read_table(shard_paths(tmp_path / "out", man)[0]).to_pylist():
        mix, s1, s2 = (decode_audio(r[c], "f32le") for c in ("mix", "s1", "s2"))
        np.testing.assert_allclose(mix, s1 + s2, atol=1e-5)
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["kind"] == "mixtures"
