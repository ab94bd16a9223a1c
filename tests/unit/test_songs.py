"""`raytrain prep dummy-songs`: the song dataset of the JSONL workflow, read back by the real JSONL prep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_prep.execute import REJECTS_NAME
from datasets_prep.shards import decode_audio, decode_tokens, read_manifest, shard_paths
from datasets_prep.steps.load import read_tokens
from raytrain.cli import main

ARGS = ["--num-samples", "4", "--duration-sec", "1.2", "--prompt-sec", "0.5", "--sketch-fps", "25",
        "--sketch-format", "mixed"]


def _songs(out: Path, *extra: str) -> list[dict]:
    assert main(["prep", "dummy-songs", "--output-dir", str(out), *ARGS, *extra]) == 0
    return [json.loads(line) for line in (out / "songs.jsonl").read_text().splitlines()]


def test_dummy_songs_write_audio_prompts_sketches_and_the_manifest(tmp_path: Path) -> None:
    rows = _songs(tmp_path / "a")
    assert [r["idx"] for r in rows] == [f"song_{i:04d}" for i in range(4)]
    assert {Path(r["sketch_path"]).suffix for r in rows} == {".pt", ".npy", ".npz"}  # mixed: the four formats
    import torch

    assert isinstance(torch.load(tmp_path / "a" / rows[1]["sketch_path"], weights_only=True), dict)  # pt-dict
    for r in rows:
        assert set(r) == {"idx", "audio_path", "lyrics", "prompt_wav", "sketch_path"}
        assert r["lyrics"].startswith("[intro] ") and "[verse]" in r["lyrics"] and "[chorus]" in r["lyrics"]
        song, sr = sf.read(tmp_path / "a" / r["audio_path"])
        prompt, psr = sf.read(tmp_path / "a" / r["prompt_wav"])
        assert (sr, psr, len(song), len(prompt)) == (16000, 16000, 19200, 8000)
        assert 0.3 < np.abs(song).max() <= 0.61 and np.abs(prompt).max() > 0.05
        sketch = read_tokens(str(tmp_path / "a" / r["sketch_path"]))
        assert sketch.shape == (30,) and sketch.dtype == np.int64  # 1.2 s at 25 fps
        assert sketch.min() >= 0 and (sketch > 0).mean() > 0.5  # notes, with a few rests
    # Songs differ from each other; the prompt is the same song, not the same samples.
    s0, s1 = (sf.read(tmp_path / "a" / r["audio_path"])[0] for r in rows[:2])
    assert not np.allclose(s0, s1)
    # The same arguments write the same bytes; another seed, other songs.
    rows_b = _songs(tmp_path / "b")
    for r in rows_b:
        for key in ("audio_path", "prompt_wav", "sketch_path"):
            assert (tmp_path / "a" / r[key]).read_bytes() == (tmp_path / "b" / r[key]).read_bytes(), key
    _songs(tmp_path / "c", "--seed", "1")
    assert (tmp_path / "c" / rows[0]["audio_path"]).read_bytes() != (tmp_path / "a" / rows[0]["audio_path"]).read_bytes()
    assert not list((tmp_path / "a").rglob(".*.tmp"))


def test_dummy_songs_prepare_with_the_jsonl_reader_and_a_missing_file_names_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _songs(tmp_path / "songs")
    (tmp_path / "songs" / rows[2]["audio_path"]).unlink()  # line 3 of the manifest
    out = tmp_path / "shards"
    assert main(["prep", "--input", str(tmp_path / "songs" / "songs.jsonl"), "--format", "jsonl",
                 "--output-dir", str(out), "--workers", "0", "--rows-per-shard", "2"]) == 0
    manifest = read_manifest(out)
    assert manifest["rows"] == 3 and manifest["rejects"]["count"] == 1
    assert manifest["audio_columns"] == ["audio", "prompt"]  # every row has a prompt_wav: loaded as audio
    got = {r["id"]: r for p in shard_paths(out, manifest) for r in pq.read_table(p).to_pylist()}
    assert set(got) == {"song_0000", "song_0001", "song_0003"} and "_manifest_line" not in got["song_0000"]
    assert [got[k]["line"] for k in sorted(got)] == [1, 2, 4]
    assert len(decode_audio(got["song_0003"]["prompt"], manifest["audio_format"])) == 8000  # 0.5 s at 16 kHz
    for r in rows:
        if r["idx"] in got:
            row = got[r["idx"]]
            tokens = decode_tokens(row["sketch"], row["sketch_shape"], row["sketch_dtype"])
            np.testing.assert_array_equal(tokens, read_tokens(str(tmp_path / "songs" / r["sketch_path"])))
            assert row["text"] == r["lyrics"] and row["prompt_wav"] == str((tmp_path / "songs" / r["prompt_wav"]).resolve())
    reject = pq.read_table(out / REJECTS_NAME).to_pylist()[0]
    assert reject["id"] == "song_0002" and reject["source"].endswith("songs.jsonl:3")
    assert reject["reason"].startswith("file not found: ")
    assert f"rejected song_0002 ({reject['source']}): file not found" in capsys.readouterr().out


@pytest.mark.parametrize("bad, says", [
    (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
    (["--prompt-sec", "0"], "--duration-sec and --prompt-sec must be positive"),
    (["--sketch-fps", "0.1"], "--sketch-fps 0.1 gives no sketch frame in 1.2 s"),
])
def test_dummy_songs_bad_arguments_are_one_line_with_exit_2(tmp_path: Path, bad: list[str], says: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = dict(zip(ARGS[::2], ARGS[1::2], strict=True))
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    flat = [x for kv in args.items() for x in kv]
    assert main(["prep", "dummy-songs", "--output-dir", str(tmp_path / "x"), *flat]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: raytrain prep dummy-songs: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "x" / "songs.jsonl").exists()
