"""`generator.layout: songs`: espeak-ng voices (real ones) singing melodies over an accompaniment, the prompt
that continues each song, lyrics of the words sung, shards split by singer with the prompt as audio, and
config errors that name the key. No Ray: shards are written in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import yaml
from torch import Tensor, nn

from datasets_prep.columns import manifest_columns
from datasets_prep.prep import load_prep_config, run_prep
from datasets_prep.readers.espeak import _espeak, syllable_vocabulary, vocabulary
from datasets_prep.shards import decode_audio, read_manifest, shard_paths
from datasets_prep.sung import (
    SungNote,
    choose_singers,
    estimate_f0,
    midi_of,
    plan_song,
    render_sung_song,
    tune,
    write_sung_corpus,
)
from raytrain.data.columns import reads_keys

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prep" / "music_lora_tiny.yaml"
SR = 16000
BPM = (80.0, 140.0)


@pytest.fixture(scope="module")
def exe() -> str:
    return _espeak()


def _notes_sung(notes: list[SungNote], until: float) -> list[SungNote]:
    return [n for n in notes if n.word is not None and n.start < until]


def _note_pitches(notes: list[SungNote], wave: np.ndarray, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(each sung note's MIDI pitch, the median pitch detected over its first 0.35 s) of notes with a pitch found."""
    f0 = estimate_f0(wave, SR)
    want, got = [], []
    for n in _notes_sung(notes, seconds - 0.2):
        seg = f0[int((n.start + 0.03) / 0.01):int((n.start + min(n.dur, 0.35) - 0.03) / 0.01)]
        seg = seg[np.isfinite(seg)]
        if len(seg) >= 3:
            want.append(n.midi)
            got.append(float(midi_of(np.median(seg))))
    return np.array(want, dtype=float), np.array(got)


def test_the_sung_pitch_follows_the_melody_in_the_voice_and_in_the_mix(exe: str) -> None:
    """espeak's -p, tuned per voice, puts each word on its note: detected on the vocals within a quarter tone,
    and in the written mix (bass and the doubled melody around it) the note's pitch class on most notes."""
    pool = choose_singers(12, 3, ["en", "es"], [30, 40], [175])
    for singer in (next(v for v in pool if v.gender == "M"), next(v for v in pool if v.gender == "F")):
        song = render_sung_song(exe, singer, tune(exe, singer), np.random.default_rng([1, 0]), 8.0, SR,
                                vocabulary(), BPM)
        want, got = _note_pitches(song.plan.notes, song.vocals, 8.0)
        assert len(want) >= 8 and len(set(want)) >= 4, singer.id
        assert np.corrcoef(want, got)[0, 1] > 0.95, (singer.id, want, got)
        assert np.median(np.abs(got - want)) < 0.5, (singer.id, want, got)
        want, got = _note_pitches(song.plan.notes, song.mix, 8.0)
        octave_off = np.abs((got - want + 6) % 12 - 6)
        assert np.mean(octave_off < 0.5) > 0.4, (singer.id, want, got)


def test_a_chorus_sings_its_line_again_and_verses_new_ones(exe: str) -> None:
    singer = choose_singers(1, 0, ["es"])[0]
    plan = plan_song(np.random.default_rng([0, 1]), singer, tune(exe, singer), 40.0, syllable_vocabulary(), BPM)
    lines: dict[str, list[tuple]] = {"[verse]": [], "[chorus]": []}
    beat = plan.key.beat
    for n in plan.notes:  # notes grouped by their 2-beat line, onsets relative to the line
        line = int(n.start / (2 * beat) + 1e-6)
        lines[n.section].append((line, round(n.start / beat - 2 * line, 6), n.dur, n.midi, n.word))
    by_line = {s: [tuple(x[1:] for x in notes if x[0] == k) for k in sorted({x[0] for x in notes})]
               for s, notes in lines.items()}
    assert len(by_line["[chorus]"]) >= 6 and len(set(by_line["[chorus]"])) == 1  # every chorus line the same
    assert len(set(by_line["[verse]"])) > len(by_line["[verse]"]) // 2  # verses: new lines
    assert {n.midi for n in plan.notes if n.midi is not None} <= {plan.key.midi(d) for d in range(8)}  # one octave


def test_songs_last_their_seconds_their_prompts_continue_them_and_lyrics_are_the_words_sung(
        tmp_path: Path, exe: str) -> None:
    singers = choose_singers(2, 0, ["en"], [30, 40], [175])
    vocab = vocabulary()
    kw = dict(name="t", singers=singers, songs=3, seed=5, vocab=vocab, duration_sec=4.0, prompt_sec=2.0,
              sample_rate=SR, workers=2, progress=False)
    manifest = write_sung_corpus(tmp_path / "a", **kw)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["idx"] for r in rows] == ["t_0000", "t_0001", "t_0002"]
    for i, r in enumerate(rows):
        assert set(r) == {"idx", "audio_path", "lyrics", "prompt_wav", "speaker", "language", "word_times"}
        singer = singers[i % 2]
        assert r["speaker"] == singer.id and r["language"] == "en"
        audio, sr = sf.read(tmp_path / "a" / r["audio_path"], dtype="float32")
        prompt, _ = sf.read(tmp_path / "a" / r["prompt_wav"], dtype="float32")
        assert (sr, len(audio), len(prompt)) == (SR, 4 * SR, 2 * SR)
        song = render_sung_song(exe, singer, tune(exe, singer), np.random.default_rng([5, i]), 6.0, SR, vocab, BPM)
        np.testing.assert_allclose(np.concatenate([audio, prompt]), song.mix, atol=1 / 32768)  # one song, cut
        sung = _notes_sung(song.plan.notes, 4.0)
        words = r["lyrics"].split()
        assert words[0] == "[verse]" and set(w for w in words if w.startswith("[")) <= {"[verse]", "[chorus]"}
        assert [w for w in words if not w.startswith("[")] == [n.word for n in sung]
        times = [tuple(map(float, p.split("-"))) for p in r["word_times"].split()]  # when each of them is sung
        assert times == [(round(n.start, 3), round(min(n.start + n.dur, 4.0), 3)) for n in sung]
        level = float(np.sqrt(np.mean(song.vocals ** 2)))
        for n in (n for n in song.plan.notes if n.start + 0.1 < 6.0):  # a word at every sung note, silence in rests
            seg = song.vocals[int((n.start + 0.01) * SR):int((n.start + min(n.dur, 0.1)) * SR)]
            if n.word is not None:
                assert np.sqrt(np.mean(seg ** 2)) > 0.2 * level, (i, n)
            else:
                assert np.abs(seg).max() < 0.02 * np.abs(song.vocals).max(), (i, n)
    # The same parameters write the same bytes; a re-run renders nothing; another seed, other songs.
    again = write_sung_corpus(tmp_path / "b", **kw)  # type: ignore[arg-type]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    mtimes = {f: (tmp_path / "b" / f).stat().st_mtime_ns for f in files}
    write_sung_corpus(tmp_path / "b", **kw)  # type: ignore[arg-type]
    assert {f: (tmp_path / "b" / f).stat().st_mtime_ns for f in files} == mtimes and again == tmp_path / "b" / "songs.jsonl"
    write_sung_corpus(tmp_path / "b", **{**kw, "seed": 6})  # type: ignore[arg-type]
    assert (tmp_path / "b" / rows[0]["audio_path"]).read_bytes() != (tmp_path / "a" / rows[0]["audio_path"]).read_bytes()
    assert not list(tmp_path.rglob(".*.tmp"))


def _small(tmp: Path, **generator: object) -> Path:
    """music_lora_tiny with two small corpora of 3 s songs, shards written in-process."""
    data = yaml.safe_load(CONFIG.read_text())
    g = data["generator"]
    g["corpora"]["en"].update({"singers": 4, "songs": 8, "language": ["en", "en-us"]})
    g["corpora"]["es"].update({"singers": 3, "songs": 6})
    g.update({"duration_sec": 3.0, "prompt_sec": 1.5, **generator})
    data.update({"workers": 0, "rows_per_shard": 4, "raw_dir": str(tmp / "raw"), "output_dir": str(tmp / "shards"),
                 "splits": {"ratios": {"dev": 0.3}, "by": "speaker", "seed": 0}})
    path = tmp / "songs_small.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("songs")
    return root, run_prep(_small(root), root=root)


def _rows(folder: Path) -> list[dict]:
    return [r for p in shard_paths(folder, read_manifest(folder)) for r in pq.read_table(p).to_pylist()]


def test_each_corpus_is_split_by_singer_with_the_prompt_as_audio_and_the_line_kept(prepared) -> None:
    root, out = prepared
    assert list(out["splits"]) == ["en/train", "en/dev", "es/train", "es/dev"]
    for corpus, singers, songs in (("en", 4, 8), ("es", 3, 6)):
        lines = {json.loads(x)["idx"]: (k, json.loads(x))
                 for k, x in enumerate((root / "raw" / corpus / "songs.jsonl").read_text().splitlines(), 1)}
        train, dev = (_rows(root / "shards" / corpus / s) for s in ("train", "dev"))
        spk_train, spk_dev = {r["speaker"] for r in train}, {r["speaker"] for r in dev}
        assert not spk_train & spk_dev and len(spk_train | spk_dev) == singers and spk_dev  # no singer in both
        assert len(train) + len(dev) == songs
        man = read_manifest(root / "shards" / corpus / "train")
        assert man["kind"] == "songs" and man["audio_columns"] == ["audio", "prompt"] and man["rejects"]["count"] == 0
        assert man["roles"]["prompt"] == man["roles"]["audio"] == {"role": "audio", "sample_rate": SR,
                                                                   "format": "pcm_s16le"}
        assert man["columns"]["line"] == "int64" and man["roles"]["line"] == {"role": "meta"}
        assert {man["roles"][c]["role"] for c in ("text", "speaker", "language")} == {"text", "label", "meta"}
        for r in train + dev:
            line, row = lines[r["id"]]
            assert r["line"] == line and r["text"] == row["lyrics"] and r["language"] == corpus
            assert len(decode_audio(r["audio"], "pcm_s16le")) == r["num_samples"] == 3 * SR
            assert len(decode_audio(r["prompt"], "pcm_s16le")) == int(1.5 * SR)


def test_a_collated_batch_has_the_prompt_and_its_lengths_and_plan_reads_the_shards(prepared) -> None:
    from raytrain.config import load_config
    from raytrain.data.collate import pad_collate
    from raytrain.data.datasets import audio_spec, decode_columns
    from raytrain.plan import check_pipeline, format_plan

    root, _ = prepared
    folder = root / "shards" / "en" / "train"
    man = read_manifest(folder)
    table = pq.read_table(shard_paths(folder, man)[0])
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = pad_collate(decode_columns(batch, audio_spec(man)), columns=manifest_columns(man))
    assert out["lengths"].tolist() == [3 * SR] * table.num_rows
    assert out["prompt_lengths"].tolist() == [int(1.5 * SR)] * table.num_rows
    assert out["line"].dtype == torch.int64
    raw = {"name": "songs_plan", "data": {"en_train": {"shards": str(folder)},
                                          "en_dev": {"shards": str(root / "shards" / "en" / "dev")}},
           "model": {"name": "tests.unit.test_sung:PromptToy"},
           "defaults": {"train": ["en_train"], "eval": "en_dev", "losses": {"tests.unit.test_sung:prompt_l1": 1.0},
                        "metrics": [], "optim": {"name": "adam", "lr": 1e-3}, "batch_size": 2},
           "phases": [{"name": "toy", "max_steps": 2}]}
    cfg = load_config(raw=raw)
    text = format_plan(cfg, check_pipeline(cfg, require_data=True))
    assert f"en_train x1: {man['rows']} rows" in text and "16000 Hz, songs" in text


class PromptToy(nn.Module):
    """Reads what a song generator reads of the shards: the song, its prompt, lyrics and the row's line."""

    reads: ClassVar[tuple[str, ...]] = ("audio", "prompt", "text", "line")

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"out": self.w(batch["prompt"].mean(-1, keepdim=True))}


@reads_keys()
def prompt_l1(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    return outputs["out"].abs().mean()


def test_a_rerun_with_the_same_parameters_renders_nothing(prepared, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = prepared
    raw = root / "raw"
    raw.rename(root / "raw_moved")  # shards whose manifests record these parameters need no raw songs
    try:
        capsys.readouterr()
        again = run_prep(root / "songs_small.yaml", root=root)
        assert {s["status"] for s in again["splits"].values()} == {"up to date"} and not raw.exists()
        assert "songs" not in capsys.readouterr().err
    finally:
        (root / "raw_moved").rename(raw)


@pytest.mark.parametrize("change, says", [
    ({"generator.corpora": None}, "corpora: layout songs needs its song corpora, e.g. corpora: {en:"),
    ({"splits": None}, "splits: layout songs cuts each corpus by singer, e.g. splits: {ratios: {dev: 0.2}"),
    ({"splits.by": "item"}, "splits.by='item': layout songs splits by singer (by: speaker)"),
    ({"steps": ["resample", "vad_trim"]}, "steps: ['vad_trim'] cut every audio column where they cut the song"),
    ({"generator.corpora.en": {"language": ["en"], "voices": 4}},
     "corpora.en: a corpus of layout songs needs singers and songs, e.g. en: {language: [en, en-us], singers: 12"),
    ({"generator.corpora.en.songs": 3}, "songs=3 is fewer than singers=12"),
    ({"generator.corpora.en.singerz": 3}, "generator.corpora.en.singerz: unknown key"),
    ({"generator.corpora.en.singers": "many"}, "generator.corpora.en.singers: Input should be a valid integer"),
    ({"generator.corpora.en.pitches": [60]}, "pitches=[60]: give 10-40"),
    ({"generator.tempo": [140, 80]}, "tempo=[140.0, 80.0]: give [min, max] beats per minute"),
    ({"generator.corpora.en.language": ["en"], "generator.corpora.en.singers": 200, "generator.corpora.en.songs": 300,
      "generator.corpora.en.speeds": [175], "generator.corpora.en.pitches": [30]},
     "corpora.en.singers=200: asked for 200 singers, the espeak pool has 34; add languages, pitches or speeds"),
    ({"generator.layout": "vc"}, "corpora.en: a song corpus (singers, songs) in layout vc: use layout: songs"),
])
def test_songs_config_errors_name_the_key_and_the_fix(tmp_path: Path, change: dict, says: str) -> None:
    data = yaml.safe_load(CONFIG.read_text())
    for key, value in change.items():  # replaced, not merged as -o overrides are
        *parents, last = key.split(".")
        node = data
        for k in parents:
            node = node[k]
        node[last] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as info:
        load_prep_config(path)
    assert says in str(info.value)
