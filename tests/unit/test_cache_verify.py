"""A cache phase's checks of the rows it wrote (no Ray): length verification against the columns' rates, the
rows it names, codebook usage and perplexity, and what `raytrain plan` says and refuses about them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datasets_prep.codecs import encode_tokens
from datasets_prep.columns import ColumnSpec
from datasets_prep.shards import DatasetWriter, read_manifest
from raytrain.config import ConfigError, load_config
from raytrain.config.schema import CachePhaseConfig
from raytrain.phases.cache import _plain_tokens, output_specs
from raytrain.phases.cache_checks import (
    LengthCheck,
    code_histogram,
    codebook_stats,
    length_mismatches,
    manifest_file,
    mismatch_text,
    name_rows,
    stored_codes,
    stored_lengths,
)
from raytrain.plan import check_pipeline, format_plan


def cache_phase(**kw: Any) -> dict[str, Any]:
    return {"name": "encode", "kind": "cache", "model": {"name": "tests.toys:FrameEncoder"},
            "datasets": {"songs": "latents_songs"},
            "columns": {"latents": {"role": "features", "frame_rate": 100},
                        "codes": {"role": "tokens", "frame_rate": 100, "dtype": "int64", "codebook_size": 16}},
            "carry": ["sketch", "line"], "verify_lengths": "all", "length_columns": ["sketch", "latents"], **kw}


def songs_manifest(sketch: ColumnSpec) -> dict[str, Any]:
    return {"roles": {"id": {"role": "id"}, "mix": {"role": "audio", "sample_rate": 8000},
                      "sketch": sketch.to_json(), "line": {"role": "meta", "dtype": "int64"}}}


# ---- lengths -------------------------------------------------------------------------------------------
def test_the_expected_length_follows_the_columns_rates() -> None:
    phase = CachePhaseConfig.model_validate(cache_phase(length_tolerance=1))
    check = LengthCheck.of(phase, output_specs(phase, songs_manifest(ColumnSpec.tokens(rate=25))))
    assert check == LengthCheck("sketch", "latents", ratio=4.0, tolerance=1, first=None)
    assert check.expected(13) == 52
    # a carried column whose rate the source does not give (a JSONL token file): lengths compared one to one
    unknown = LengthCheck.of(phase, output_specs(phase, songs_manifest(ColumnSpec.tokens())))
    assert unknown is not None and unknown.ratio == 1.0
    assert LengthCheck.of(CachePhaseConfig.model_validate(cache_phase(verify_lengths=None)), {}) is None


def test_mismatches_allow_the_tolerance_and_stop_after_the_first_n_rows() -> None:
    rows = [("a", None, 10, 40), ("b", None, 10, 41), ("c", None, 10, 43), ("d", None, 11, 40), ("e", None, 5, 0)]
    assert length_mismatches(rows, LengthCheck("sketch", "latents", 4.0)) == (5, [
        {"id": i, "line": None, "lengths": {"sketch": la, "latents": lb}, "expected": 4 * la}
        for i, _, la, lb in rows[1:]])
    checked, bad = length_mismatches(rows, LengthCheck("sketch", "latents", 4.0, tolerance=1))
    assert checked == 5 and [r["id"] for r in bad] == ["c", "d", "e"]
    checked, bad = length_mismatches(rows, LengthCheck("sketch", "latents", 4.0, tolerance=1, first=3))
    assert checked == 3 and [r["id"] for r in bad] == ["c"]
    # not a whole number of frames: the nearest one is expected
    assert length_mismatches([("x", None, 3, 2)], LengthCheck("a", "b", 2 / 3)) == (1, [])


def test_a_mismatch_names_its_dataset_row_and_source_manifest_line() -> None:
    check = LengthCheck("sketch", "latent", 1.0)
    _, bad = length_mismatches([("s0", None, 9, 9), ("s1", 3, 7, 10), ("s2", None, 8, 10)], check)
    name_rows(bad, "latents_dev", "songs.jsonl", {"s2": 4})
    assert [mismatch_text(r, check) for r in bad] == [
        "latents_dev: row s1 (songs.jsonl:3): sketch 7, latent 10 (expected 7)",
        "latents_dev: row s2 (songs.jsonl:4): sketch 8, latent 10 (expected 8)"]
    _, bad = length_mismatches([("s1", 3, 7, 10), ("s2", None, 8, 10)], check)
    name_rows(bad, "dev", None)  # no source manifest file (the rows came from another layout)
    assert [mismatch_text(r, check) for r in bad] == ["dev: row s1 (line 3): sketch 7, latent 10 (expected 7)",
                                                      "dev: row s2: sketch 8, latent 10 (expected 8)"]


def test_lines_refer_to_the_first_manifest_file_through_cached_datasets(tmp_path: Path) -> None:
    cols = {"id": ColumnSpec.id(), "line": ColumnSpec.meta("int64")}
    for name, source in (("songs", tmp_path / "raw" / "songs.jsonl"), ("latents", tmp_path / "songs"),
                         ("sketches", tmp_path / "latents")):
        with DatasetWriter(tmp_path / name, cols, prep={"source": str(source)}) as w:
            w.write({"id": "s0", "line": 1})
    assert manifest_file(read_manifest(tmp_path / "sketches")) == "songs.jsonl"  # a cache of a cache of songs
    assert manifest_file({"prep": {"source": str(tmp_path / "raw")}}) is None  # a folder of audio files
    assert manifest_file({}) is None


# ---- codebook statistics -------------------------------------------------------------------------------
def test_uniform_codes_use_the_whole_codebook_and_one_code_has_perplexity_one() -> None:
    counts, outside = code_histogram([np.arange(32) % 8, np.arange(8).reshape(2, 4)], 8)
    assert outside == 0 and counts.tolist() == [5] * 8
    assert codebook_stats(counts) == pytest.approx((1.0, 8.0))
    counts, _ = code_histogram([np.full(50, 3)], 8)
    assert codebook_stats(counts) == pytest.approx((1 / 8, 1.0))
    usage, perplexity = codebook_stats(code_histogram([np.array([0, 0, 0, 1])], 4)[0])
    assert usage == 0.5 and perplexity == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    counts, outside = code_histogram([np.array([-1, 0, 8, 9, 7])], 8)  # codes the codebook does not have
    assert outside == 3 and counts.sum() == 2
    assert codebook_stats(np.zeros(4, dtype=np.int64)) == (0.0, 0.0)


# ---- the written rows ----------------------------------------------------------------------------------
def test_lengths_and_codes_are_read_from_the_written_shards(tmp_path: Path) -> None:
    cols = {"id": ColumnSpec.id(), "sketch": ColumnSpec.tokens(rate=25),
            "latents": ColumnSpec.features(frame_rate=100, dims=3), "codes": ColumnSpec.tokens(rate=100),
            "line": ColumnSpec.meta("int64")}
    frames = [8, 12, 16, 20, 24]
    with DatasetWriter(tmp_path / "out", cols, kind="cache", rows_per_shard=2) as w:
        for i, n in enumerate(frames):
            w.write({"id": f"r{i}", "sketch": np.zeros(n // 4 + (i == 3), dtype=np.int64),
                     "latents": np.zeros((n, 3), np.float32), "codes": np.full(n, i, dtype=np.int64), "line": i + 1})
    manifest = read_manifest(tmp_path / "out")
    check = LengthCheck("sketch", "latents", 4.0, first=3)
    rows = list(stored_lengths(str(tmp_path / "out"), manifest, check))
    assert rows[:3] == [("r0", 1, 2, 8), ("r1", 2, 3, 12), ("r2", 3, 4, 16)] and len(rows) == 4  # 2 shards read
    assert length_mismatches(rows, check) == (3, [])
    _, bad = length_mismatches(stored_lengths(str(tmp_path / "out"), manifest, LengthCheck("sketch", "latents", 4.0)),
                               LengthCheck("sketch", "latents", 4.0))
    assert [(r["id"], r["line"], r["expected"]) for r in bad] == [("r3", 4, 24)]
    counts, _ = code_histogram(stored_codes(str(tmp_path / "out"), manifest, "codes"), 8)
    assert counts.tolist() == [*frames, 0, 0, 0]


def test_a_carried_token_file_column_is_written_as_plain_tokens(tmp_path: Path) -> None:
    token_file = ColumnSpec(role="tokens", dtype=None, rate=25, shape_columns=True)  # JSONL shards' sketch
    phase = CachePhaseConfig.model_validate(cache_phase())
    specs = output_specs(phase, songs_manifest(token_file))
    assert specs["sketch"] == ColumnSpec.tokens(rate=25)
    stored = [encode_tokens(np.arange(5, dtype=np.int32)), encode_tokens(np.arange(7, dtype=np.int16))]
    batch = {"sketch": np.array([s[0] for s in stored], dtype=object),
             "sketch_shape": np.array([s[1] for s in stored], dtype=object),
             "sketch_dtype": np.array([s[2] for s in stored], dtype=object)}
    carried = {"sketch": batch["sketch"]}
    made = _plain_tokens(batch, carried, {"sketch": token_file})
    assert made == {"sketch": ColumnSpec.tokens(rate=25)}
    assert [a.tolist() for a in carried["sketch"]] == [list(range(5)), list(range(7))]
    with DatasetWriter(tmp_path / "out", {"id": ColumnSpec.id(), **made}, rows_per_shard=4) as w:
        w.write_batch({"id": ["a", "b"], **carried})
    manifest = read_manifest(tmp_path / "out")
    assert ColumnSpec.model_validate(manifest["roles"]["sketch"]) == ColumnSpec.tokens(rate=25)
    codes = list(stored_codes(str(tmp_path / "out"), manifest, "sketch"))
    assert [c.tolist() for c in codes] == [list(range(5)) + list(range(7))]


# ---- raytrain plan ---------------------------------------------------------------------------------------
def plan_pipeline(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    cols = {"id": ColumnSpec.id(), "mix": ColumnSpec.audio(8000), "sketch": ColumnSpec.tokens(rate=25),
            "line": ColumnSpec.meta("int64")}
    with DatasetWriter(tmp_path / "songs", cols, kind="songs") as w:
        w.write({"id": "s0", "mix": np.zeros(800, np.float32), "sketch": np.zeros(2, np.int64), "line": 1})
    return {"name": "plan_verify", "data": {"songs": {"shards": str(tmp_path / "songs")}},
            "model": {"name": "tests.toys:FrameEncoder"}, "phases": [cache_phase(**kw)]}


def test_plan_shows_the_verification_and_the_codebook_report(tmp_path: Path) -> None:
    cfg = load_config(raw=plan_pipeline(tmp_path, verify_lengths=100, length_tolerance=1, require_length_match=True))
    text = format_plan(cfg, check_pipeline(cfg, require_data=True))
    assert ("    verify   latents = sketch x 4 +-1 frames, first 100 rows of each dataset; a mismatch fails the "
            "phase (require_length_match)") in text, text
    assert "    reports  codebook usage and perplexity of codes (16 codes) per dataset" in text
    quiet = load_config(raw=plan_pipeline(tmp_path, verify_lengths=None))
    assert "    verify " not in format_plan(quiet, check_pipeline(quiet))


@pytest.mark.parametrize(("columns", "message"), [
    (["sketch", "latent"], "phases[0](encode).length_columns: 'latent' is not a column the phase writes (it writes "
                           "id, latents, codes, sketch, line); name a column of 'columns' or 'carry'"),
    (["line", "latents"], "phases[0](encode).length_columns: 'line' of the output of 'songs' is a meta column, "
                          "which has no length"),
])
def test_plan_refuses_length_columns_the_output_cannot_compare(tmp_path: Path, columns: list[str],
                                                                message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_pipeline(load_config(raw=plan_pipeline(tmp_path, length_columns=columns)))
    assert message in str(err.value)


@pytest.mark.parametrize(("keys", "message"), [
    ({"verify_lengths": None, "require_length_match": True}, "require_length_match needs verify_lengths"),
    ({"verify_lengths": 0}, "verify_lengths"),
    ({"length_columns": ["latents", "latents"]}, "length_columns: two different columns"),
    ({"columns": {"latents": {"role": "features", "codebook_size": 8}}},
     "codebook_size is for a 'tokens' column, this one is 'features'"),
])
def test_config_errors_name_the_key(tmp_path: Path, keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="phases\\[0\\]") as err:
        load_config(raw=plan_pipeline(tmp_path, **keys))
    assert message in str(err.value)
