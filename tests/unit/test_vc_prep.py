"""`generator.layout: vc`: parallel pairs aligned on the source's frames, held-out dev triples, dev_reverb,
resumable prep and config errors that name the key. No Ray: the speech shards are written in-process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from datasets_prep.prep import load_prep_config, run_prep
from datasets_prep.readers.espeak import VARIANTS, make_syllable_sentences, vocab_split
from datasets_prep.shards import decode_audio, read_manifest, shard_paths

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prep" / "vc_flow_tiny.yaml"
HOP = 160  # 10 ms at 16 kHz: the features step's hop


def _small(tmp: Path) -> Path:
    """vc_flow_tiny with two tiny corpora, 4 dev voices reading 2 sentences, in-process."""
    data = yaml.safe_load(CONFIG.read_text())
    g = data["generator"]
    g["corpora"] = {
        "vctk": {"language": ["en-us"], "voices": 3, "sentences": 3, "utterances_per_voice": 2, "train_words": [3, 4]},
        "second": {"language": ["es"], "text": "syllables", "voices": 2, "sentences": 2, "utterances_per_voice": 2,
                   "train_words": [3, 4]},
    }
    g.update({"dev_voices": 4, "dev_sentences": 2, "dev_words": [3, 4], "dev_triples": 6, "pairs_per_sentence": 5,
              "self_pairs": 0.2, "reference_utterances": 1, "dev_self_triples": 4})
    data.update({"workers": 0, "rows_per_shard": 4})
    path = tmp / "vc_small.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("vc")
    cfg = _small(root)
    return cfg, root, run_prep(cfg, root=root)


def _rows(folder: Path) -> list[dict]:
    man = read_manifest(folder)
    return [r for p in shard_paths(folder, man) for r in pq.read_table(p).to_pylist()]


def _mel(data: bytes, n_mels: int = 80) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(-1, n_mels)


def _linear(mel: np.ndarray, frames: int) -> np.ndarray:
    """``mel`` stretched linearly to ``frames`` frames (a naive alignment)."""
    pos = np.linspace(0, len(mel) - 1, frames)
    return np.stack([np.interp(pos, np.arange(len(mel)), mel[:, k]) for k in range(mel.shape[1])], axis=1)


def _timbre(speaker: str) -> str:  # "en-us+f5_p60_s150" -> "f5"
    return speaker.split("+")[1].split("_")[0]


def test_layout_writes_every_folder_and_declares_target_mel_on_the_audio_clock(prepared):
    _, _, out = prepared
    assert list(out["splits"]) == ["vctk/speech", "vctk/pairs", "second/speech", "second/pairs", "dev_speech", "dev",
                                   "dev_reverb", "dev_self"]
    base = Path(out["output_dir"])
    man = read_manifest(base / "vctk" / "pairs")
    assert man["roles"]["target_mel"] == read_manifest(base / "vctk" / "speech")["roles"]["mel"] == {
        "role": "features", "frame_rate": 100.0, "dims": 80, "dtype": "float32"}
    assert man["roles"]["audio"]["role"] == man["roles"]["reference"]["role"] == "audio"
    assert read_manifest(base / "dev")["roles"]["parallel"]["role"] == "audio"


def test_aligned_crops_cut_audio_and_target_mel_at_the_same_time(prepared):
    from raytrain.data.aligned import AlignedCrop

    folder = Path(prepared[2]["output_dir"]) / "vctk" / "pairs"
    rows = _rows(folder)
    batch = {"id": np.array([r["id"] for r in rows], dtype=object),
             "audio": np.array([decode_audio(r["audio"]) for r in rows] + [None], dtype=object)[:-1],
             "target_mel": np.array([_mel(r["target_mel"]) for r in rows] + [None], dtype=object)[:-1]}
    crop = AlignedCrop(0.5, ["audio", "target_mel"], sample_rate=16000, seed=3)
    out = crop(batch, specs=read_manifest(folder)["roles"])
    for audio, mel, a_crop, m_crop in zip(batch["audio"], batch["target_mel"], out["audio"], out["target_mel"],
                                          strict=True):
        assert len(a_crop) == 8000 and len(m_crop) == 50
        frame = next(f for f in range(len(mel) - 49) if np.array_equal(mel[f:f + 50], m_crop))
        np.testing.assert_array_equal(a_crop, audio[frame * HOP:frame * HOP + 8000])


def test_pairs_target_mel_is_b_warped_onto_a_frames(prepared):
    _, _, out = prepared
    base = Path(out["output_dir"])
    checked = {"self": 0, "other": 0}
    for corpus in ("vctk", "second"):
        speech = {r["id"]: r for r in _rows(base / corpus / "speech")}
        pairs = _rows(base / corpus / "pairs")
        assert pairs and {r["text"] for r in pairs} <= {r["text"] for r in speech.values()}
        for r in pairs:
            a_id, b_spk = r["id"].split("|")
            a = speech[a_id]
            b = next(u for u in speech.values() if u["speaker"] == b_spk and u["text"] == a["text"])
            target, a_mel, b_mel = _mel(r["target_mel"]), _mel(a["mel"]), _mel(b["mel"])
            assert r["audio"] == a["audio"] and r["speaker"] == a["speaker"] and r["target_speaker"] == b_spk
            assert len(target) == len(a_mel) == len(decode_audio(r["audio"])) // HOP + 1
            ref = next(u for u in speech.values() if u["audio"] == r["reference"])
            assert ref["speaker"] == b_spk and ref["text"] != a["text"]  # another utterance of the target
            if b_spk == a["speaker"]:
                np.testing.assert_array_equal(target, a_mel)
                checked["self"] += 1
                continue
            # the warp lines up content: B's same sentence fits it better than B's other sentence does
            same = np.abs(target - _linear(b_mel, len(target))).mean()
            other = np.abs(target - _linear(_mel(ref["mel"]), len(target))).mean()
            assert same < other, (r["id"], same, other)
            checked["other"] += 1
    assert checked["self"] and checked["other"]


def test_dev_triples_are_held_out_and_parallel(prepared):
    _, _, out = prepared
    base = Path(out["output_dir"])
    train = [r for c in ("vctk", "second") for r in _rows(base / c / "speech")]
    dev_speech = {r["audio"]: r for r in _rows(base / "dev_speech")}
    rows = _rows(base / "dev")
    assert len(rows) == 6 and {r["pair"] for r in rows} == {"cross", "within"}
    assert sum(r["pair"] == "cross" for r in rows) == 3
    dev_speakers = {r["speaker"] for r in rows} | {r["target_speaker"] for r in rows}
    assert not {_timbre(s) for s in dev_speakers} & {_timbre(r["speaker"]) for r in train}
    train_words = {w for r in train for w in r["text"].split()}
    for r in rows:
        src, par, ref = dev_speech[r["audio"]], dev_speech[r["parallel"]], dev_speech[r["reference"]]
        assert src["speaker"] == r["speaker"] != r["target_speaker"] == par["speaker"] == ref["speaker"]
        assert src["text"] == par["text"] == r["text"] != ref["text"]
        assert not set(r["text"].split()) & train_words  # held-out words
        genders = {VARIANTS[_timbre(r["speaker"])], VARIANTS[_timbre(r["target_speaker"])]}
        assert r["pair"] == ("cross" if len(genders) == 2 else "within")
        assert len(_mel(r["target_mel"])) == len(decode_audio(r["audio"])) // HOP + 1


def test_dev_reverb_reverberates_only_the_source_and_a_rerun_rewrites_nothing(prepared, capsys):
    cfg, root, out = prepared
    base = Path(out["output_dir"])
    dev, rev = _rows(base / "dev"), _rows(base / "dev_reverb")
    assert [r["id"] for r in rev] == [r["id"] for r in dev]
    for d, r in zip(dev, rev, strict=True):
        assert {k: r[k] for k in ("reference", "parallel", "target_mel", "text", "pair")} == \
            {k: d[k] for k in ("reference", "parallel", "target_mel", "text", "pair")}
        clean, wet = decode_audio(d["audio"]), decode_audio(r["audio"])
        assert len(wet) == len(clean) and not np.array_equal(wet, clean)
        assert abs(np.abs(wet).max() - np.abs(clean).max()) < 2 / 32768  # renormalised to the source's peak
    assert read_manifest(base / "dev_reverb")["prep"]["triples"]["rooms"]["rt60"] == [0.5, 0.8]

    files = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}
    capsys.readouterr()
    again = run_prep(cfg, root=root)
    assert {s["status"] for s in again["splits"].values()} == {"up to date"}
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()} == files
    assert "up to date" in capsys.readouterr().out


def test_syllable_sentences_hold_out_a_slice_and_never_use_english_words():
    train_slice, dev_slice = vocab_split(0.2)
    english = frozenset({"lima", "polo", "salad"})
    train = make_syllable_sentences(50, 0, train_slice, 3, 6, exclude=english)
    dev = make_syllable_sentences(10, 0, dev_slice, 3, 6, exclude=english)
    words = {w for s in train for w in s.split()}
    assert len(set(train)) == 50 and not words & {w for s in dev for w in s.split()} and not words & english
    assert make_syllable_sentences(50, 0, train_slice, 3, 6, exclude=english) == train


@pytest.mark.parametrize(("override", "key"), [
    ({"generator.corpora": None}, "corpora"),
    ({"generator.dev_triples": 5000}, "dev_triples=5000"),
    ({"generator.self_pairs": 1.0}, "generator.self_pairs"),
    ({"generator.corpora": {"vctk": {"utterances_per_voice": 99}}}, "utterances_per_voice=99"),
    ({"steps": ["resample", "normalize"]}, "features step"),
])
def test_config_errors_are_one_line_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        load_prep_config(CONFIG, override)
    header, *lines = str(err.value).splitlines()
    assert header.startswith("invalid prep config") and len(lines) == 1 and key in lines[0], str(err.value)


def test_the_tiny_recipe_keeps_every_sentence_whole():
    cfg = load_prep_config(CONFIG)
    seg = dict(cfg.step_list())["segment"]
    assert seg["max_seconds"] >= 20 and "features" in dict(cfg.step_list())
    assert os.fspath(cfg.output_dir).startswith("data/")


def test_dev_self_converts_each_voice_to_itself_and_cross_marks_gender(prepared):
    _, _, out = prepared
    base = Path(out["output_dir"])
    rows = _rows(base / "dev_self")
    assert len(rows) == 4 and len({r["speaker"] for r in rows}) == 4  # voices taken in turn
    for r in rows:
        assert r["speaker"] == r["target_speaker"] and r["audio"] == r["parallel"] and r["pair"] == "self"
        assert r["cross"] == 0.0
        np.testing.assert_array_equal(_mel(r["target_mel"]), _mel(next(
            u["mel"] for u in _rows(base / "dev_speech") if u["audio"] == r["audio"])))
    for r in _rows(base / "dev"):
        assert r["cross"] == float(r["pair"] == "cross")
    for r in _rows(base / "vctk" / "pairs"):
        genders = {VARIANTS[_timbre(r["speaker"])], VARIANTS[_timbre(r["target_speaker"])]}
        assert r["cross"] == float(len(genders) == 2)
        assert len(decode_audio(r["parallel"])) > 0


def test_a_reference_joins_several_utterances_of_the_target_voice(prepared):
    import random

    from datasets_prep.vc import REFERENCE_GAP_S, _reference, read_speech, reference_audio

    speech = read_speech(Path(prepared[2]["output_dir"]) / "dev_speech")  # every dev voice reads 2 sentences
    b = speech.by_speaker[sorted(speech.by_speaker)[0]][0]
    refs = _reference(speech, b, random.Random(0), n=3)
    assert refs and all(u["speaker"] == b["speaker"] and u["text"] != b["text"] for u in refs)
    assert len(refs) == 1  # only one other sentence: n is at most what the voice has
    two = [speech.by_speaker[b["speaker"]][0], speech.by_speaker[b["speaker"]][1]]
    joined = reference_audio(speech, two)
    parts = [speech.decoded(u) for u in two]
    assert len(joined) == sum(map(len, parts)) + int(REFERENCE_GAP_S * speech.sample_rate)
    np.testing.assert_array_equal(joined[: len(parts[0])], parts[0])
    assert reference_audio(speech, two[:1]) == two[0]["audio"]  # one utterance: stored as it is
