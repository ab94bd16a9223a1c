"""The prep executor in-process (workers=0): shards, rejects, manifest, restart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_prep.execute import REJECTS_NAME, prepare_items
from datasets_prep.readers.manifests import AUDIO_PATH_COLUMNS, list_items
from datasets_prep.shards import decode_audio, decode_tokens, encode_tokens, read_manifest, shard_paths
from datasets_prep.steps.load import Reject, read_tokens

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


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _shard_rows(out: Path, man: dict) -> list[dict]:
    return [r for p in shard_paths(out, man) for r in pq.read_table(p).to_pylist()]


def _prep(fmt: str, manifest: Path, out: Path, **kw: object) -> dict:
    """``prepare_items`` in this process on a corpus listed by the ``fmt`` reader, as ``prep_corpus`` does."""
    kw = {"kind": "speech", "audio_columns": list(AUDIO_PATH_COLUMNS[fmt]), "expect_sample_rate": SR,
          "workers": 0, **kw}
    return prepare_items(list_items(fmt, manifest), out, **kw)  # type: ignore[arg-type]


def test_jsonl_music_manifest_keeps_lyrics_prompt_and_extra_fields(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rows = []
    for k in range(4):
        _tone(raw / "audio" / f"song{k}.wav", 0.5 + 0.25 * k)
        _tone(raw / "prompts" / f"p{k}.wav", 0.25, freq=300)
        rows.append({"idx": f"song{k}", "audio_path": f"audio/song{k}.wav", "lyrics": f"la la {k}",
                     "prompt_wav": f"prompts/p{k}.wav", "genre": "pop" if k % 2 else "rock",
                     "bpm": 100 + k, "speaker": "ann" if k < 3 else "ben"})
    (raw / "audio" / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk")
    rows.append({"idx": "broken", "audio_path": "audio/broken.wav", "lyrics": "never heard"})
    man = _prep("jsonl", _jsonl(raw / "train.jsonl", rows), tmp_path / "out", rows_per_shard=2)
    assert man["rows"] == 4 and man["items"] == 5 and man["rejects"]["count"] == 1
    (reject,) = pq.read_table(tmp_path / "out" / REJECTS_NAME).to_pylist()
    assert reject["id"] == "broken" and reject["reason"].startswith("unreadable audio")
    assert reject["source"] == f"{raw / 'train.jsonl'}:5"  # a manifest's reject names its line
    assert man["hours"] == pytest.approx((0.5 + 0.75 + 1.0 + 1.25) / 3600, abs=1e-6)
    assert man["speaker_hours"] == pytest.approx({"ann": 2.25 / 3600, "ben": 1.25 / 3600}, abs=1e-6)
    assert man["audio_columns"] == ["audio"]  # prompt_wav is kept as a path, not decoded
    assert {"genre": "string", "bpm": "int64", "prompt_wav": "string", "text": "string"}.items() <= \
        man["columns"].items()
    out = _shard_rows(tmp_path / "out", man)
    assert [(r["id"], r["text"], r["genre"], r["bpm"]) for r in out] == [
        (f"song{k}", f"la la {k}", "pop" if k % 2 else "rock", 100 + k) for k in range(4)]
    assert out[2]["prompt_wav"] == str((raw / "prompts" / "p2.wav").resolve())
    ref, _ = sf.read(str(raw / "audio" / "song3.wav"), dtype="float32")
    np.testing.assert_array_equal(decode_audio(out[3]["audio"], man["audio_format"]), ref)


def test_tsv_manifest_keeps_n_frames_and_text_and_rejects_a_missing_clip(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    lines = ["id\taudio\tn_frames\ttgt_text\tspeaker"]
    for k, spk in enumerate(("spk1", "spk1", "spk2")):
        _tone(raw / "clips" / f"u{k}.wav", 0.5 * (k + 1))
        lines.append(f"u{k}\tclips/u{k}.wav\t{8000 * (k + 1)}\tbonjour {k}\t{spk}")
    lines.append("gone\tclips/gone.wav\t100\tlost\tspk2")
    tsv = raw / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    man = _prep("tsv", tsv, tmp_path / "out")
    assert man["rows"] == 3 and man["rejects"]["count"] == 1 and len(man["shards"]) == 1
    (reject,) = pq.read_table(tmp_path / "out" / REJECTS_NAME).to_pylist()
    assert reject["id"] == "gone" and reject["reason"] == f"file not found: {(raw / 'clips' / 'gone.wav').resolve()}"
    assert man["hours"] == pytest.approx(3.0 / 3600, abs=1e-6) and man["num_speakers"] == 2
    assert man["speaker_hours"] == pytest.approx({"spk1": 1.5 / 3600, "spk2": 1.5 / 3600}, abs=1e-6)
    assert man["columns"]["n_frames"] == "int64" and "tgt_text" not in man["columns"]
    out = _shard_rows(tmp_path / "out", man)
    assert [(r["id"], r["speaker"], r["text"], r["n_frames"], r["num_samples"]) for r in out] == [
        (f"u{k}", spk, f"bonjour {k}", 8000 * (k + 1), 8000 * (k + 1)) for k, spk in enumerate(("spk1", "spk1", "spk2"))]


def _patchy_corpus(raw: Path) -> Path:
    """JSONL whose first chunk (of 2 rows) has ``genre`` null and ``tags`` empty, and only the last ``mood``."""
    rows = []
    for k in range(5):
        _tone(raw / f"s{k}.wav", 0.25 + 0.05 * k)
        row = {"idx": k, "audio_path": f"s{k}.wav", "lyrics": f"line {k}", "genre": None if k < 2 else f"g{k}",
               "tags": [] if k < 2 else [f"t{k}"]}
        if k == 4:
            row["mood"] = "happy"
        rows.append(row)
    return _jsonl(raw / "m.jsonl", rows)


def test_shards_get_one_schema_when_a_chunk_has_null_or_missing_fields(tmp_path: Path) -> None:
    out = tmp_path / "out"
    man = _prep("jsonl", _patchy_corpus(tmp_path / "raw"), out, rows_per_shard=2)
    assert len(man["shards"]) == 3
    assert man["columns"]["genre"] == "string" and man["columns"]["mood"] == "string"
    assert man["columns"]["tags"] == "list<element: string>"
    paths = shard_paths(out, man)
    for p in paths:  # every shard: the manifest's columns, in the same order (id first, then sorted)
        assert {f.name: str(f.type) for f in pq.read_schema(p)} == man["columns"]
        assert pq.read_schema(p).names == ["id", *sorted(set(man["columns"]) - {"id"})]
    for rec in sorted(out.glob(".shard-*.json")):
        assert json.loads(rec.read_text())["columns"] == man["columns"]
    table = pads.dataset(paths, format="parquet").to_table()  # schema from the first shard, as Ray Data does
    assert table.column("genre").to_pylist() == [None, None, "g2", "g3", "g4"]
    assert table.column("tags").to_pylist() == [[], [], ["t2"], ["t3"], ["t4"]]
    assert table.column("mood").to_pylist() == [None, None, None, None, "happy"]
    assert table.column("text").to_pylist() == [f"line {k}" for k in range(5)]
    folder = pads.dataset(out, format="parquet")  # whole folder: "_" and "." files skipped
    assert folder.to_table().schema.remove_metadata().equals(table.schema.remove_metadata())


def test_rerun_after_the_schema_rewrite_writes_nothing_and_a_redone_shard_ends_the_same(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    manifest = _patchy_corpus(tmp_path / "raw")
    first = _prep("jsonl", manifest, out, rows_per_shard=2)
    files = [*out.glob("shard-*.parquet"), *out.glob(".shard-*.json")]
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    again = _prep("jsonl", manifest, out, rows_per_shard=2)
    assert "to write" not in capsys.readouterr().out  # every chunk found finished, rewritten ones included
    assert again["shards"] == first["shards"] and again["columns"] == first["columns"]
    assert {p.name: p.stat().st_mtime_ns for p in files} == mtimes
    (out / first["shards"][0]["file"]).unlink()  # the chunk that was rewritten (genre was null there)
    fixed = _prep("jsonl", manifest, out, rows_per_shard=2)
    assert "1 to write" in capsys.readouterr().out
    assert fixed["shards"] == first["shards"]  # redone, then rewritten again: the same bytes


def test_a_column_with_two_concrete_types_is_an_error_naming_the_shards(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for k in range(2):
        _tone(raw / f"s{k}.wav", 0.25)
    manifest = _jsonl(raw / "m.jsonl", [{"idx": 0, "audio_path": "s0.wav", "bpm": 120},
                                        {"idx": 1, "audio_path": "s1.wav", "bpm": "fast"}])
    with pytest.raises(ValueError, match=r"column 'bpm' is int64 in shard-00000.parquet but string in "
                                         r"shard-00001.parquet"):
        _prep("jsonl", manifest, tmp_path / "out", rows_per_shard=1)
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_sketch_token_files_round_trip_exactly_and_a_corrupt_one_is_a_reject(tmp_path: Path) -> None:
    import torch

    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    sketches = {
        "npy": rng.integers(0, 1024, size=(4, 25), dtype=np.int64),
        "npz": rng.integers(0, 500, size=(30,), dtype=np.int32),
        "pt": rng.integers(-300, 300, size=(2, 3, 5), dtype=np.int16),
        "pt_dict": rng.integers(0, 16384, size=(6, 8), dtype=np.int64),
    }
    (raw / "sk").mkdir(parents=True)
    np.save(raw / "sk" / "a.npy", sketches["npy"])
    np.savez(raw / "sk" / "b.npz", codes=sketches["npz"], lengths=np.array([30]))
    torch.save(torch.from_numpy(sketches["pt"]), raw / "sk" / "c.pt")
    torch.save({"tokens": torch.from_numpy(sketches["pt_dict"]), "step": torch.tensor(3)}, raw / "sk" / "d.pt")
    (raw / "sk" / "bad.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(raw / "sk" / "float.npy", rng.standard_normal(25).astype(np.float32))  # features, not tokens
    files = {"npy": "sk/a.npy", "npz": "sk/b.npz", "pt": "sk/c.pt", "pt_dict": "sk/d.pt", "bad": "sk/bad.npy",
             "gone": "sk/gone.npy", "float": "sk/float.npy"}
    rows = []
    for k, (name, rel) in enumerate(files.items()):
        _tone(raw / f"s{k}.wav", 0.25)
        rows.append({"idx": name, "audio_path": f"s{k}.wav", "lyrics": name, "sketch_path": rel})
    _tone(raw / "plain.wav", 0.25)
    rows.append({"idx": "plain", "audio_path": "plain.wav", "lyrics": "no sketch"})  # a chunk without sketches
    man = _prep("jsonl", _jsonl(raw / "m.jsonl", rows), tmp_path / "out", rows_per_shard=3)
    assert man["rows"] == 5 and man["rejects"]["count"] == 3
    assert {"sketch": "binary", "sketch_dtype": "string", "sketch_path": "string"}.items() <= man["columns"].items()
    reasons = {r["id"]: r["reason"] for r in pq.read_table(tmp_path / "out" / REJECTS_NAME).to_pylist()}
    assert reasons["bad"].startswith(f"unreadable token file: {(raw / 'sk' / 'bad.npy').resolve()}: ")
    assert reasons["gone"] == f"token file not found: {(raw / 'sk' / 'gone.npy').resolve()}"
    assert reasons["float"] == ("sketch_path: tokens must be integers (codebook indices), the file holds float32: "
                                f"{(raw / 'sk' / 'float.npy').resolve()}")
    out = {r["id"]: r for r in _shard_rows(tmp_path / "out", man)}
    for name, want in sketches.items():
        r = out[name]
        got = decode_tokens(r["sketch"], r["sketch_shape"], r["sketch_dtype"])
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert r["sketch_path"] == str((raw / files[name]).resolve())
    assert out["plain"]["sketch"] is None and out["plain"]["sketch_shape"] is None


def test_token_files_read_and_rejected(tmp_path: Path) -> None:
    import torch

    np.savez(tmp_path / "one.npz", np.arange(4, dtype=np.uint8))
    assert read_tokens(str(tmp_path / "one.npz")).tolist() == [0, 1, 2, 3]
    torch.save(torch.tensor([1.5, -2.0], dtype=torch.bfloat16), tmp_path / "bf16.pt")
    assert read_tokens(str(tmp_path / "bf16.pt")).tolist() == [1.5, -2.0]
    np.savez(tmp_path / "two.npz", a=np.arange(3), b=np.arange(3))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.int64))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "codes.txt").write_text("1 2 3")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 torn")
    reasons = {}
    for name in ("two.npz", "list.pt", "empty.npy", "text.npy", "codes.txt", "torn.pt"):
        with pytest.raises(Reject) as e:
            read_tokens(str(tmp_path / name))
        reasons[name] = str(e.value)
        assert str(tmp_path / name) in reasons[name]
    assert reasons["two.npz"].startswith("token file holds several arrays ['a', 'b'] and none is named 'tokens'")
    assert reasons["list.pt"].startswith("token file holds a list, expected a tensor")
    assert reasons["empty.npy"].startswith("token file holds an empty or 0-d array (shape [0, 4])")
    assert reasons["text.npy"].startswith("token file holds a non-numeric array")
    assert reasons["codes.txt"].startswith("unknown token file type '.txt'")
    assert reasons["torn.pt"].startswith("unreadable token file")


def test_encode_decode_tokens_keeps_dtype_shape_and_values() -> None:
    for arr in (np.arange(12, dtype=">i4").reshape(3, 4), np.array([True, False]), np.array([0.5, -1], "<f2"),
                np.arange(-3, 3, dtype=np.int8)):
        data, shape, dtype = encode_tokens(arr)
        assert dtype == arr.dtype.name and shape == list(arr.shape) and len(data) == arr.nbytes
        back = decode_tokens(data, shape, dtype)
        np.testing.assert_array_equal(back, arr)
        assert back.flags.writeable and back.dtype == arr.dtype.newbyteorder("=")
    assert encode_tokens(np.array([1, 256], dtype=">i2"))[0] == b"\x01\x00\x00\x01"  # stored little-endian
    with pytest.raises(ValueError, match="numeric"):
        encode_tokens(np.array(["x"]))


def test_shard_mb_cuts_shards_by_input_megabytes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for k in range(6):  # 1 s of PCM16 at 16 kHz: 32 kB of audio each
        _tone(raw / "spk" / f"u{k}.wav", 1.0)
    items = list_items("speaker-dirs", raw)
    man = prepare_items(items, tmp_path / "out", kind="speech", audio_columns=["audio"], rows_per_shard=100,
                        shard_mb=0.07, expect_sample_rate=SR, workers=0)
    assert [s["rows"] for s in man["shards"]] == [2, 2, 2]  # a third file would pass 70 kB
    assert man["prep"]["shard_mb"] == 0.07
    sizes = [(tmp_path / "out" / s["file"]).stat().st_size for s in man["shards"]]
    assert all(s < 0.07e6 for s in sizes), sizes
    capped = prepare_items(items, tmp_path / "capped", kind="speech", audio_columns=["audio"], rows_per_shard=1,
                           shard_mb=10, expect_sample_rate=SR, workers=0)
    assert [s["rows"] for s in capped["shards"]] == [1] * 6  # rows_per_shard still caps a shard
    with pytest.raises(ValueError, match="shard_mb must be > 0"):
        prepare_items(items, tmp_path / "bad", kind="speech", audio_columns=["audio"], shard_mb=0, workers=0)


def test_manifest_declares_each_columns_role_for_the_training_side(tmp_path: Path) -> None:
    from datasets_prep.columns import ColumnSpec, manifest_columns

    items = list_items("speaker-dirs", _corpus(tmp_path / "raw"))
    steps = [("resample", {"sample_rate": 8000}), ("features", {"n_mels": 20, "hop_ms": 20})]
    man = prepare_items(items, tmp_path / "out", kind="speech", audio_columns=["audio"], steps=steps,
                        audio_format="flac", workers=0)
    cols = manifest_columns(read_manifest(tmp_path / "out"))
    assert man["roles"]["audio"] == {"role": "audio", "sample_rate": 8000, "format": "flac"}
    assert cols["mel"] == ColumnSpec.features(frame_rate=50.0, dims=20)
    assert {n: s.role for n, s in cols.items() if n in ("id", "speaker", "text", "num_samples")} == {
        "id": "id", "speaker": "label", "text": "text", "num_samples": "meta"}


def test_jsonl_prompts_are_loaded_as_audio_of_their_own_length_and_rows_keep_their_line(tmp_path: Path) -> None:
    from datasets_prep.columns import ColumnSpec, manifest_columns
    from datasets_prep.readers.manifests import with_audio_columns

    raw = tmp_path / "raw"
    rows = []
    for k in range(4):
        _tone(raw / "audio" / f"s{k}.wav", 1.0 + 0.25 * k, sr=22050)
        if k != 2:  # line 4 (after a blank line) names a prompt that is not there
            _tone(raw / "prompts" / f"p{k}.wav", 0.5 + 0.1 * k, sr=22050, freq=300)
        rows.append({"idx": f"s{k}", "audio_path": f"audio/s{k}.wav", "lyrics": f"[verse] la {k}",
                     "prompt_wav": f"prompts/p{k}.wav", "speaker": "ann"})
    manifest = raw / "songs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" + ("\n" if k == 1 else "") for k, r in enumerate(rows)))
    items, columns = with_audio_columns("jsonl", list_items("jsonl", manifest))
    assert columns == ["audio", "prompt"] and items[0]["prompt"] == items[0]["prompt_wav"]
    man = prepare_items(items, tmp_path / "out", kind="songs", audio_columns=columns, workers=0,
                        steps=[("resample", {"sample_rate": SR}), ("normalize", {})])
    assert man["rows"] == 3 and man["audio_columns"] == ["audio", "prompt"]
    cols = manifest_columns(read_manifest(tmp_path / "out"))
    assert cols["prompt"] == cols["audio"] == ColumnSpec.audio(SR)
    assert cols["line"] == ColumnSpec.meta() and man["columns"]["line"] == "int64"
    assert cols["prompt_wav"].role == "meta"  # the path stays, as a string
    (reject,) = pq.read_table(tmp_path / "out" / REJECTS_NAME).to_pylist()
    assert reject["id"] == "s2" and reject["source"] == f"{manifest}:4"
    assert reject["reason"] == f"file not found: {(raw / 'prompts' / 'p2.wav').resolve()}"
    out = {r["id"]: r for r in _shard_rows(tmp_path / "out", man)}
    assert {k: r["line"] for k, r in out.items()} == {"s0": 1, "s1": 2, "s3": 5}
    for k, r in out.items():
        n = int(k[1])
        audio, prompt = decode_audio(r["audio"], "pcm_s16le"), decode_audio(r["prompt"], "pcm_s16le")
        assert (len(audio), len(prompt)) == (int((1.0 + 0.25 * n) * SR), int((0.5 + 0.1 * n) * SR))
        assert r["num_samples"] == len(audio) and abs(np.abs(audio).max() - 10 ** (-1 / 20)) < 1e-3
        assert np.abs(prompt).max() == pytest.approx(np.abs(audio).max(), abs=1e-3)  # the song's gain: same level


def test_steps_that_cut_refuse_a_prompt_column_and_a_partial_prompt_set_stays_paths(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from datasets_prep.readers.manifests import with_audio_columns

    raw = tmp_path / "raw"
    for k in range(2):
        _tone(raw / f"s{k}.wav", 0.5)
        _tone(raw / f"p{k}.wav", 0.25)
    both = _jsonl(raw / "m.jsonl", [{"idx": k, "audio_path": f"s{k}.wav", "prompt_wav": f"p{k}.wav"} for k in range(2)])
    items, columns = with_audio_columns("jsonl", list_items("jsonl", both))
    for step in ("vad_trim", "segment"):
        with pytest.raises(ValueError, match=rf"steps \['{step}'\] cut every audio column where they cut 'audio', but "
                                             r"'prompt' \(from prompt_wav\) is a signal of its own length: drop"):
            prepare_items(items, tmp_path / "out", kind="songs", audio_columns=columns, steps=[(step, {})], workers=0)
    assert not (tmp_path / "out").exists()  # refused before the folder is touched
    one = _jsonl(raw / "one.jsonl", [{"idx": 0, "audio_path": "s0.wav", "prompt_wav": "p0.wav"},
                                     {"idx": 1, "audio_path": "s1.wav"}])
    items, columns = with_audio_columns("jsonl", list_items("jsonl", one))
    assert columns == ["audio"] and "prompt" not in items[0]
    assert f"1 of 2 rows have a prompt_wav ({one}:2 has none)" in capsys.readouterr().out
