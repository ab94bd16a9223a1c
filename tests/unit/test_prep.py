"""Speaker-dir reader, fixed dev mixtures and the end-to-end `raytrain prep` of a tiny corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_prep.mixtures import write_fixed_mixtures
from datasets_prep.prep import load_prep_config, run_prep
from datasets_prep.readers.speaker_dirs import read_speaker_dirs
from datasets_prep.shards import decode_pcm16, read_manifest, shard_paths

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prep" / "separation_tiny.yaml"
TINY = {"generator.train_voices": 3, "generator.dev_voices": 2, "generator.utterances_per_voice": 3,
        "generator.train_sentences": 20, "generator.dev_sentences": 10, "dev_mixtures.num": 6,
        "rows_per_shard": 4}


def _tone(sr: int, seconds: float, freq: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _speaker_dirs(root: Path, sr: int = 8000) -> None:
    for s, spk in enumerate(["bob", "amy", "cat"]):
        (root / spk).mkdir(parents=True)
        for u in range(3):
            sf.write(str(root / spk / f"u{u}.wav"), _tone(sr, 1.0 + 0.7 * u, 200 + 50 * s + 10 * u), sr,
                     subtype="PCM_16")
            (root / spk / f"u{u}.txt").write_text(f"{spk} says {u}\n")


def test_read_speaker_dirs_sorted_with_text(tmp_path):
    _speaker_dirs(tmp_path)
    (tmp_path / "amy" / ".u9.wav.tmp").write_bytes(b"junk")  # a killed run's temp file: ignored
    sf.write(str(tmp_path / "amy" / "v0.wav"), _tone(8000, 0.5, 300, channels=2), 8000)
    with pytest.warns(UserWarning, match="2 channels"):
        recs = list(read_speaker_dirs(tmp_path))
    assert [r["id"] for r in recs][:4] == ["amy/u0", "amy/u1", "amy/u2", "amy/v0"]
    assert recs[0]["text"] == "amy says 0" and recs[3]["text"] == ""
    assert recs[3]["audio"].ndim == 1 and recs[0]["audio"].dtype == np.float32
    assert recs[0]["sample_rate"] == 8000 and len(recs) == 10


def test_read_speaker_dirs_names_a_corrupt_file(tmp_path):
    _speaker_dirs(tmp_path)
    (tmp_path / "bob" / "u1.wav").write_bytes(b"RIFF not really a wav")
    with pytest.raises(ValueError, match=r"bob/u1\.wav"):
        list(read_speaker_dirs(tmp_path))


def test_fixed_mixtures(tmp_path):
    _speaker_dirs(tmp_path / "raw")
    recs = list(read_speaker_dirs(tmp_path / "raw"))
    man = write_fixed_mixtures(recs, tmp_path / "dev", num_mixtures=12, seed=3, sample_rate=8000,
                               max_seconds=1.5, rows_per_shard=5)
    assert man["kind"] == "mixtures" and man["rows"] == 12 and len(man["shards"]) == 3
    assert read_manifest(tmp_path / "dev")["audio_columns"] == ["mix", "s1", "s2"]
    rows = [r for p in shard_paths(tmp_path / "dev", man) for r in pq.read_table(p).to_pylist()]
    for r in rows:
        mix, s1, s2 = (decode_pcm16(r[c]) for c in ("mix", "s1", "s2"))
        assert len(mix) == len(s1) == len(s2) == r["num_samples"] <= 1.5 * 8000
        assert np.abs(mix - (s1 + s2)).max() <= 1.5 / 32768
        assert np.abs(mix).max() <= 0.9 + 1e-4
        a, b = r["speakers"].split(",")
        assert a != b and r["id"].split("|")[1].startswith(a + "/")
    again = write_fixed_mixtures(recs, tmp_path / "dev2", num_mixtures=12, seed=3, sample_rate=8000,
                                 max_seconds=1.5, rows_per_shard=5)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in man["shards"]]
    with pytest.raises(ValueError, match="at least 2 speakers"):
        write_fixed_mixtures([r for r in recs if r["speaker"] == "bob"], tmp_path / "x", num_mixtures=2,
                             seed=0, sample_rate=8000, max_seconds=1.0)


def test_prep_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"generator\.train_voice: unknown key \(did you mean 'train_voices'"):
        load_prep_config(CONFIG, {"generator.train_voice": 3})
    with pytest.raises(ValueError, match="utterances_per_voice"):
        load_prep_config(CONFIG, {"generator.utterances_per_voice": 1000})


def test_prep_end_to_end_and_rerun_skips(tmp_path, capsys):
    out = run_prep(CONFIG, overrides=TINY, root=tmp_path)
    base = tmp_path / "data" / "shards" / "espeak_sep_tiny"
    assert out["output_dir"] == str(base)
    train, dev_speech, dev = (read_manifest(base / s) for s in ("train", "dev_speech", "dev"))
    assert train["kind"] == dev_speech["kind"] == "speech" and dev["kind"] == "mixtures"
    assert train["rows"] == 9 and train["num_speakers"] == 3 and dev_speech["num_speakers"] == 2
    assert dev["rows"] == 6 and set(dev["speaker_hours"]) == set(dev_speech["speaker_hours"])
    assert not set(train["speaker_hours"]) & set(dev_speech["speaker_hours"])
    assert train["sample_rate"] == dev["sample_rate"] == 8000
    row = pq.read_table(shard_paths(base / "train", train)[0]).to_pylist()[0]
    assert row["text"] and row["id"].startswith(row["speaker"] + "/")
    assert {s: v["status"] for s, v in out["splits"].items()} == dict.fromkeys(out["splits"], "written")
    assert "dev_speech" in capsys.readouterr().out

    again = run_prep(CONFIG, overrides=TINY, root=tmp_path)
    assert {v["status"] for v in again["splits"].values()} == {"up to date"}
    assert read_manifest(base / "train") == train

    changed = run_prep(CONFIG, overrides={**TINY, "dev_mixtures.num": 4}, root=tmp_path)
    assert changed["splits"]["train"]["status"] == "up to date"
    assert changed["splits"]["dev"]["status"] == "written" and changed["splits"]["dev"]["rows"] == 4
