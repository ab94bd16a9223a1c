"""Fixed dev mixtures and the end-to-end `raytrain prep` of prep YAMLs: the espeak generator and an input corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_prep.mixtures import write_fixed_mixtures
from datasets_prep.prep import load_prep_config, run_prep
from datasets_prep.readers.manifests import list_speaker_dirs
from datasets_prep.shards import decode_pcm16, read_manifest, shard_paths
from datasets_prep.steps.load import load_item

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prep" / "separation_tiny.yaml"
TINY = {"generator.train_voices": 3, "generator.dev_voices": 2, "generator.utterances_per_voice": 3,
        "generator.train_sentences": 20, "generator.dev_sentences": 10, "dev_mixtures.num": 6,
        "rows_per_shard": 4, "workers": 0}


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


def test_fixed_mixtures(tmp_path):
    _speaker_dirs(tmp_path / "raw")
    recs = [load_item(it, ["audio"]) for it in list_speaker_dirs(tmp_path / "raw")]
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


def _input_config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "corpus.yaml"
    cfg.write_text("name: corpus\noutput_dir: shards\nsample_rate: 8000\nrows_per_shard: 2\nworkers: 0\n"
                   "input: {format: speaker-dirs, path: raw}\n" + extra)
    return cfg


def test_input_corpus_with_steps_and_speaker_splits(tmp_path, capsys):
    _speaker_dirs(tmp_path / "raw", sr=16000)
    (tmp_path / "raw" / "cat" / "u1.wav").write_bytes(b"RIFF broken")
    cfg = _input_config(tmp_path, "steps: [resample, {normalize: {peak_db: -3.0}}]\n"
                                  "splits: {by: speaker, ratios: {train: 0.6, dev: 0.4}, seed: 1}\n")
    out = run_prep(cfg, root=tmp_path)
    assert set(out["splits"]) == {"train", "dev"}
    train, dev = (read_manifest(tmp_path / "shards" / s) for s in ("train", "dev"))
    assert not set(train["speaker_hours"]) & set(dev["speaker_hours"])  # no voice in both splits
    assert train["num_speakers"] + dev["num_speakers"] == 3 and train["sample_rate"] == dev["sample_rate"] == 8000
    assert [s["step"] for s in train["steps"]] == ["resample", "normalize"]
    assert train["steps"][0]["sample_rate"] == 8000 and train["steps"][1]["peak_db"] == -3.0
    assert train["prep"]["split_by"] == {"ratios": {"train": 0.6, "dev": 0.4}, "by": "speaker", "seed": 1}
    rejected = [s for s in out["splits"].values() if s["rejects"]]
    assert len(rejected) == 1 and rejected[0]["rejects"] == 1 and rejected[0]["rows"] + 1 == 3 * (
        rejected[0]["speakers"])
    row = pq.read_table(shard_paths(tmp_path / "shards" / "train", train)[0]).to_pylist()[0]
    peak = np.abs(decode_pcm16(row["audio"])).max()
    assert abs(20 * np.log10(peak) + 3.0) < 0.01
    assert "rejects" in capsys.readouterr().out


def test_input_corpus_without_splits_is_one_dataset_and_rates_are_checked(tmp_path):
    _speaker_dirs(tmp_path / "raw", sr=8000)
    sf.write(str(tmp_path / "raw" / "amy" / "u9.wav"), _tone(16000, 1.0, 300), 16000, subtype="PCM_16")
    run_prep(_input_config(tmp_path), root=tmp_path)
    man = read_manifest(tmp_path / "shards")
    assert man["rows"] == 9 and man["rejects"]["count"] == 1  # the 16 kHz file, no resample step
    reason = pq.read_table(tmp_path / "shards" / "_rejects.parquet").to_pylist()[0]["reason"]
    assert "wrong sample rate 16000 Hz" in reason and "resample" in reason


@pytest.mark.parametrize(("extra", "message"), [
    ("steps: [vad_trimm]\n", "unknown step 'vad_trimm' (did you mean 'vad_trim'?)"),
    ("steps: [{vad_trim: {pad_m: 3}}]\n", "pad_m"),
    ("generator: {kind: espeak}\n", "exactly one of input"),
    ("splits: {ratios: {train: 0.5, dev: 0.7}}\n", "splits.ratios: Value error, split ratios add up to 1.200 > 1"),
    ("input2: 3\n", "input2: unknown key (did you mean 'input'?)"),
])
def test_input_config_errors_name_the_key_and_the_fix(tmp_path, extra, message):
    (tmp_path / "raw" / "amy").mkdir(parents=True)
    sf.write(str(tmp_path / "raw" / "amy" / "u0.wav"), _tone(8000, 1.0, 300), 8000, subtype="PCM_16")
    with pytest.raises(ValueError) as err:
        run_prep(_input_config(tmp_path, extra), root=tmp_path)
    assert message in str(err.value)


def test_asr_layout_checks_sentence_pools(tmp_path):
    import pytest as _pytest

    from datasets_prep.prep import PrepConfig

    base = {"name": "a", "raw_dir": str(tmp_path / "raw"), "output_dir": str(tmp_path / "out"),
            "generator": {"kind": "espeak", "layout": "asr", "train_sentences": 10, "utterances_per_voice": 10,
                          "dev_sentences": 3, "test_sentences": 5, "eval_utterances_per_voice": 3}}
    assert PrepConfig.model_validate(base).generator.layout == "asr"
    base["generator"]["eval_utterances_per_voice"] = 4
    with _pytest.raises(ValueError, match="eval_utterances_per_voice=4 exceeds dev_sentences/test_sentences"):
        PrepConfig.model_validate(base)


def test_asr_layout_writes_train_dev_and_a_tsv_test_set_of_unseen_words(tmp_path):
    asr = CONFIG.parent / "streaming_asr_tiny.yaml"
    small = {"generator.train_voices": 3, "generator.train_sentences": 6, "generator.utterances_per_voice": 3,
             "generator.dev_sentences": 2, "generator.test_sentences": 2, "generator.eval_utterances_per_voice": 2,
             "generator.eval_voices": 2, "generator.heldout_voices": 2, "workers": 0, "sample_rate": 8000}
    out = run_prep(asr, overrides=small, root=tmp_path)
    base = Path(out["output_dir"])
    train, dev, test, heldout = (read_manifest(base / s) for s in ("train", "dev", "test", "test_heldout"))
    assert (train["rows"], dev["rows"], test["rows"], heldout["rows"]) == (9, 4, 4, 4)
    assert set(dev["speaker_hours"]) == set(test["speaker_hours"]) < set(train["speaker_hours"])  # 2 of the 3

    def timbre(speaker: str) -> str:  # "en-us+f5_p60_s150" -> "f5"
        return speaker.split("+")[1].split("_")[0]

    # test_heldout: voices whose timbres no train voice has, reading test's sentences
    assert not {timbre(s) for s in heldout["speaker_hours"]} & {timbre(s) for s in train["speaker_hours"]}
    assert test["prep"]["format"] == "tsv"
    tsv = (tmp_path / "data/raw/espeak_asr_tiny/test.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["id", "audio", "n_frames", "tgt_text", "speaker", "phonemes"] and len(tsv) == 5

    def words(folder):
        man = read_manifest(base / folder)
        rows = [r for p in shard_paths(base / folder, man) for r in pq.read_table(p, columns=["text"]).to_pylist()]
        return {w for r in rows for w in r["text"].split()}

    assert words("train") and not words("train") & (words("dev") | words("test"))  # held-out words only
    assert not words("dev") & words("test")
    assert words("test_heldout") == words("test")  # the same two test sentences, read by other voices
    row = pq.read_table(shard_paths(base / "test", test)[0]).to_pylist()[0]
    assert row["phonemes"] and row["text"]
