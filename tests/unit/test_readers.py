"""Readers list real corpora the tests write (real wav files, real manifests); load rejects bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datasets_prep.readers.manifests import ReaderError, list_items
from datasets_prep.steps.load import Reject, load_item

SR = 8000


def _wav(path: Path, seconds: float = 0.25, sr: int = SR, freq: float = 220.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def test_speaker_dirs_transcripts_beside_and_per_speaker(tmp_path: Path) -> None:
    _wav(tmp_path / "p225" / "p225_001.wav")
    (tmp_path / "p225" / "p225_001.txt").write_text("Please call Stella.\n")
    _wav(tmp_path / "p226" / "a.wav")
    _wav(tmp_path / "p226" / "b.flac")
    (tmp_path / "p226" / "transcripts.txt").write_text("a\thello there\nb.flac general kenobi\n")
    _wav(tmp_path / "p226" / ".partial.wav")  # hidden: an interrupted copy
    items = list_items("speaker-dirs", tmp_path)
    assert [(i["id"], i["speaker"], i["text"]) for i in items] == [
        ("p225/p225_001", "p225", "Please call Stella."),
        ("p226/a", "p226", "hello there"),
        ("p226/b", "p226", "general kenobi"),
    ]
    assert all(Path(i["audio"]).is_absolute() and Path(i["audio"]).exists() for i in items)


def test_jsonl_keeps_extra_fields_and_resolves_relative_paths(tmp_path: Path) -> None:
    _wav(tmp_path / "audio" / "song1.wav")
    _wav(tmp_path / "prompts" / "p1.wav")
    np.save(tmp_path / "sketch1.npy", np.arange(5))
    rows = [{"idx": 7, "audio_path": "audio/song1.wav", "lyrics": "la la", "prompt_wav": "prompts/p1.wav",
             "sketch_path": "sketch1.npy", "genre": "pop", "bpm": 120}]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (item,) = list_items("jsonl", manifest)
    assert item["id"] == "7" and item["text"] == "la la" and item["genre"] == "pop" and item["bpm"] == 120
    assert item["audio"] == str((tmp_path / "audio" / "song1.wav").resolve())
    assert item["prompt_wav"] == str((tmp_path / "prompts" / "p1.wav").resolve())
    assert item["sketch_path"] == str((tmp_path / "sketch1.npy").resolve())


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"idx": 0, "audio_path": "a.wav"}\n{"idx": 1, "lyrics": "x"}\n')
    with pytest.raises(ReaderError, match=r"m.jsonl:2: missing 'audio_path'"):
        list_items("jsonl", bad)
    bad.write_text('{"idx": 0, "audio_path": "a.wav"}\nnot json\n')
    with pytest.raises(ReaderError, match=r"m.jsonl:2: not valid JSON"):
        list_items("jsonl", bad)


def test_tsv_fairseq_manifest(tmp_path: Path) -> None:
    _wav(tmp_path / "clips" / "u1.wav")
    _wav(tmp_path / "clips" / "u2.wav")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\n"
                   "u1\tclips/u1.wav\t2000\tbonjour le monde\tspk1\n"
                   "u2\tclips/u2.wav\t2000\t\"quoted\" text\tspk2\n")
    items = list_items("tsv", tsv)
    assert [(i["id"], i["speaker"], i["text"], i["n_frames"]) for i in items] == [
        ("u1", "spk1", "bonjour le monde", 2000), ("u2", "spk2", '"quoted" text', 2000)]
    tsv.write_text("name\tpath\nu1\tclips/u1.wav\n")
    with pytest.raises(ReaderError, match=r"lacks \['id', 'audio'\]"):
        list_items("tsv", tsv)


def test_wsj0_2mix_folders(tmp_path: Path) -> None:
    name = "011a010d_0.54422_20do010c_-0.54422.wav"
    for k in ("mix", "s1", "s2"):
        _wav(tmp_path / k / name)
    (item,) = list_items("wsj0-2mix", tmp_path)
    assert item["id"] == name[:-4] and item["speakers"] == "011,20d"
    (tmp_path / "s2" / name).unlink()
    with pytest.raises(ReaderError, match=r"s2/011a010d.*missing"):
        list_items("wsj0-2mix", tmp_path)


def test_unknown_format_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ReaderError, match="unknown input format 'kaldi'"):
        list_items("kaldi", tmp_path)
    with pytest.raises(ReaderError, match="does not exist"):
        list_items("speaker-dirs", tmp_path / "nope")


def test_load_rejects_corrupt_empty_nan_and_wrong_rate_files(tmp_path: Path) -> None:
    good = _wav(tmp_path / "good.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), SR)
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.array([0.0, np.nan, 0.1], dtype=np.float32), SR, subtype="FLOAT")
    wrong = _wav(tmp_path / "wrong.wav", sr=16000)
    row = load_item({"id": "g", "audio": str(good)}, ["audio"], expect_sample_rate=SR)
    assert row["sample_rate"] == SR and row["audio"].dtype == np.float32 and len(row["audio"]) == SR // 4
    reasons = {}
    for p in (corrupt, empty, nan, wrong, tmp_path / "absent.wav"):
        with pytest.raises(Reject) as e:
            load_item({"id": p.stem, "audio": str(p)}, ["audio"], expect_sample_rate=SR)
        reasons[p.stem] = str(e.value)
    assert reasons["corrupt"].startswith("unreadable audio")
    assert reasons["empty"].startswith("empty audio")
    assert reasons["nan"].startswith("audio holds NaN")
    assert reasons["wrong"].startswith("wrong sample rate 16000 Hz (expected 8000 Hz")
    assert reasons["absent"].startswith("file not found")


def test_jsonl_fields_that_would_clash_with_the_line_and_prompt_columns_name_the_line(tmp_path: Path) -> None:
    from datasets_prep.readers.manifests import with_audio_columns

    _wav(tmp_path / "a.wav")
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"idx": 0, "audio_path": "a.wav"}\n{"idx": 1, "audio_path": "a.wav", "line": "la la"}\n')
    with pytest.raises(ReaderError, match=r"m.jsonl:2: the field 'line' is raytrain's .*: rename the field"):
        list_items("jsonl", bad)
    bad.write_text('{"idx": 0, "audio_path": "a.wav", "prompt_wav": "a.wav", "prompt": "a slow song"}\n')
    items = list_items("jsonl", bad)
    with pytest.raises(ReaderError, match=r"m.jsonl:1: the field 'prompt' would be replaced by the audio loaded from "
                                          r"prompt_wav: rename the field"):
        with_audio_columns("jsonl", items)
    bad.write_text('{"idx": 0, "audio_path": "a.wav", "prompt": "a slow song"}\n')  # no prompt_wav: a text column
    assert with_audio_columns("jsonl", list_items("jsonl", bad))[1] == ["audio"]
