"""`raytrain prep` of `layout: av` (real espeak-ng, real shards, tiny sizes, in-process): every folder, rows and
columns, the video on the audio's clock, held-out voices and sentences, pairs of other talkers saying other
sentences, a video that tells the target from the interferer, and a re-run that rewrites nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets_prep.av import mouth_opening, video_frames
from datasets_prep.prep import run_prep
from datasets_prep.shards import decode_audio, read_manifest, shard_paths

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prep" / "av_tse_asr_tiny.yaml"
CORPORA = {
    "main": {"train_voices": 4, "dev_voices": 3, "train_sentences": 12, "dev_sentences": 6, "utterances_per_voice": 3,
             "dev_utterances_per_voice": 3, "mixtures_per_utterance": 2, "dev_mixtures": 20},
    "second": {"train_voices": 3, "dev_voices": 2, "train_sentences": 8, "dev_sentences": 4, "utterances_per_voice": 3,
               "dev_utterances_per_voice": 3, "mixtures_per_utterance": 2, "dev_mixtures": 10},
}
SNR_DB = {"main": (-2.5, 2.5), "second": (-5.0, 0.0)}  # as the tiny YAML draws them
FOLDERS = [f"{c}/{s}" for c in CORPORA for s in ("speech_train", "speech_dev", "train", "dev")]


def _rows(folder: Path) -> list[dict]:
    return [r for p in shard_paths(folder, read_manifest(folder)) for r in pq.read_table(p).to_pylist()]


def _timbre(speaker: str) -> str:  # "en-us+f5_p60_s150" -> "f5"
    return speaker.split("+")[1].split("_")[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    root = tmp_path_factory.mktemp("av")
    overrides = {"generator.corpora": CORPORA, "generator.workers": 2, "workers": 0, "rows_per_shard": 8,
                 "raw_dir": str(root / "raw"), "output_dir": str(root / "out")}
    first = run_prep(CONFIG, overrides=overrides, root=root)
    again = run_prep(CONFIG, overrides=overrides, root=root)
    return first, again, root / "out"


def test_every_folder_is_written_once_and_a_rerun_finds_it_up_to_date(prepared):
    first, again, _ = prepared
    assert list(first["splits"]) == list(again["splits"]) == FOLDERS
    assert {s["status"] for s in first["splits"].values()} == {"written"}
    assert {s["status"] for s in again["splits"].values()} == {"up to date"}
    assert all(s["rejects"] == 0 for s in first["splits"].values())


def test_rows_columns_and_the_video_on_the_audio_clock(prepared):
    _, _, out = prepared
    for name, c in CORPORA.items():
        speech = {p: {r["id"]: r for r in _rows(out / name / f"speech_{p}")} for p in ("train", "dev")}
        assert len(speech["train"]) == c["train_voices"] * c["utterances_per_voice"]
        for part, want in (("train", len(speech["train"]) * c["mixtures_per_utterance"]), ("dev", c["dev_mixtures"])):
            man = read_manifest(out / name / part)
            assert man["kind"] == "av_mixtures" and man["rows"] == want
            assert man["roles"]["video"] == {"role": "video", "fps": 25.0, "height": 24, "width": 24, "channels": 1,
                                             "dtype": "uint8"}
            assert [man["roles"][k]["role"] for k in ("id", "speaker", "interferer", "text", "mix", "s1",
                                                      "snr_db", "overlap", "lag")] == [
                "id", "label", "label", "text", "audio", "audio", "meta", "meta", "meta"]
            assert man["prep"]["from_sha256"] and man["prep"]["mixtures"]["seed"] == 0
            for i, r in enumerate(_rows(out / name / part)):
                tag, target_id, interferer_id = r["id"].split("|")
                assert tag == f"av{i:05d}"
                t, j = speech[part][target_id], speech[part][interferer_id]  # only this part's utterances
                assert r["speaker"] == t["speaker"] != r["interferer"] == j["speaker"]
                assert r["text"] == t["text"] != j["text"]
                mix, target = decode_audio(r["mix"]), decode_audio(r["s1"])
                assert len(mix) == len(target) == len(decode_audio(t["audio"]))
                video = np.frombuffer(r["video"], dtype=np.uint8).reshape(-1, 24, 24, 1)
                assert len(video) == video_frames(len(mix), 8000, 25)
                assert np.abs(mix).max() <= 0.9 + 1e-3
                assert 0.0 <= r["overlap"] <= 1.0 and -1 <= r["lag"] <= 2
                assert SNR_DB[name][0] <= r["snr_db"] <= SNR_DB[name][1]


def test_no_dev_voice_timbre_or_sentence_occurs_in_train(prepared):
    _, _, out = prepared
    train = [r for c in CORPORA for r in _rows(out / c / "speech_train")]
    dev = [r for c in CORPORA for r in _rows(out / c / "speech_dev")]
    assert not {_timbre(r["speaker"]) for r in dev} & {_timbre(r["speaker"]) for r in train}
    train_words = {w for r in train for w in r["text"].split()}
    assert not {w for r in dev for w in r["text"].split()} & train_words
    speakers = {c: {r["speaker"] for p in ("speech_train", "speech_dev") for r in _rows(out / c / p)} for c in CORPORA}
    assert not speakers["main"] & speakers["second"]
    for c in CORPORA:
        assert {r["speaker"] for r in _rows(out / c / "dev")} <= {r["speaker"] for r in dev}
        assert not {r["text"] for r in _rows(out / c / "dev")} & {r["text"] for r in train}


def test_the_video_picks_the_target_of_most_dev_mixtures(prepared):
    """The mouth's darkness correlates with the target's log-energy better than with the rest's (mix - target)."""
    _, _, out = prepared
    hits = total = 0
    for c in CORPORA:
        for r in _rows(out / c / "dev"):
            mix, target = decode_audio(r["mix"]), decode_audio(r["s1"])
            video = np.frombuffer(r["video"], dtype=np.uint8).reshape(-1, 24 * 24).astype(np.float64)
            darkness = 255.0 - video.mean(axis=1)
            corr = [np.corrcoef(darkness, mouth_opening(x, 8000))[0, 1] for x in (target, mix - target)]
            hits += corr[0] > corr[1]
            total += 1
    assert hits >= 0.8 * total, (hits, total)
