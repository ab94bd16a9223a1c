"""Column roles: ColumnSpec, and roles derived for manifests written before roles existed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from datasets_prep.columns import ColumnSpec, manifest_columns
from datasets_prep.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_manifest

# manifests as `raytrain prep` wrote them before roles (schema 1), abridged
OLD_SPEECH = {
    "schema_version": 1, "kind": "speech",
    "columns": {"id": "string", "audio": "binary", "num_samples": "int64", "phonemes": "string",
                "sample_rate": "int64", "speaker": "string", "text": "string"},
    "audio_columns": ["audio"], "audio_format": "pcm_s16le", "sample_rate": 16000, "rows": 6400, "hours": 5.83,
    "shards": [],
}
OLD_MIXTURES = {
    "schema_version": 1, "kind": "mixtures",
    "columns": {"id": "string", "speakers": "string", "mix": "binary", "s1": "binary", "s2": "binary",
                "num_samples": "int64", "sample_rate": "int32"},
    "audio_columns": ["mix", "s1", "s2"], "audio_format": "pcm_s16le", "sample_rate": 8000, "shards": [],
}
OLD_JSONL = {  # a JSONL music corpus with token files and the features step
    "schema_version": 1, "kind": "speech",
    "columns": {"id": "string", "audio": "binary", "lyrics": "string", "mel": "binary", "mel_frames": "int64",
                "n_mels": "int64", "num_samples": "int64", "prompt_wav": "string", "sample_rate": "int64",
                "sketch": "binary", "sketch_dtype": "string", "sketch_path": "string", "sketch_shape":
                "list<element: int64>", "text": "string"},
    "audio_columns": ["audio"], "audio_format": "flac", "sample_rate": 24000, "shards": [],
    "steps": [{"step": "resample", "sample_rate": 24000}, {"step": "features", "n_mels": 20, "hop_ms": 12.5}],
}


def test_each_role_has_its_fields_and_time_rate() -> None:
    assert ColumnSpec.audio(16000).time_rate() == 16000 and ColumnSpec.audio(16000).format == "pcm_s16le"
    video = ColumnSpec.video(fps=25, height=24, width=32, channels=1)
    assert video.time_rate() == 25 and video.frame_shape() == (24, 32, 1) and video.dtype == "uint8"
    assert ColumnSpec.tokens(rate=75).time_rate() == 75 and ColumnSpec.tokens(rate=75).dtype == "int64"
    feats = ColumnSpec.features(frame_rate=50, dims=8)
    assert feats.time_rate() == 50 and feats.frame_shape() == (8,) and feats.dtype == "float32"
    assert ColumnSpec.tokens().time_rate() is None  # text tokens: a sequence, not tied to time
    for plain in (ColumnSpec.text(), ColumnSpec.id(), ColumnSpec.label(), ColumnSpec.meta()):
        assert plain.time_rate() is None and not plain.is_time
    assert ColumnSpec.like(np.zeros((7, 16)), frame_rate=12.5) == ColumnSpec.features(12.5, dims=16)
    for spec in (ColumnSpec.audio(8000, "flac"), video, feats, ColumnSpec.tokens(75, vocab=1024), ColumnSpec.text()):
        assert ColumnSpec.model_validate(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize(("spec", "error"), [
    ({"role": "audio"}, "needs sample_rate"),
    ({"role": "audio", "sample_rate": 8000, "fps": 25}, "'audio' column has no fps"),
    ({"role": "video", "fps": 25, "height": 8, "width": 8, "channels": 3, "dtype": "float32"}, "uint8"),
    ({"role": "tokens", "rate": 75, "dtype": "float32"}, "cannot hold dtype 'float32'"),
    ({"role": "text", "rate": 5}, "'text' column has no rate"),
    ({"role": "features", "frame_rate": -1}, "frame_rate must be > 0"),
    ({"role": "audio", "sample_rate": 8000, "format": "mp3"}, "format 'mp3' is unknown"),
    ({"role": "pixels"}, "role"),
])
def test_a_spec_that_does_not_fit_its_role_says_why(spec: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        ColumnSpec.model_validate(spec)


def test_old_speech_manifest_gets_roles_from_its_kind() -> None:
    cols = manifest_columns(OLD_SPEECH)
    assert list(cols) == list(OLD_SPEECH["columns"])
    assert {n: s.role for n, s in cols.items()} == {
        "id": "id", "audio": "audio", "num_samples": "meta", "phonemes": "text", "sample_rate": "meta",
        "speaker": "label", "text": "text"}
    assert cols["audio"] == ColumnSpec.audio(16000, "pcm_s16le")


def test_old_mixtures_manifest_has_three_audio_columns_and_a_speakers_label() -> None:
    cols = manifest_columns(OLD_MIXTURES)
    assert [n for n, s in cols.items() if s.role == "audio"] == ["mix", "s1", "s2"]
    assert all(cols[n].sample_rate == 8000 for n in ("mix", "s1", "s2"))
    assert cols["speakers"].role == "label" and cols["id"].role == "id"


def test_old_jsonl_manifest_gets_features_at_the_hop_and_token_files_with_their_shape_columns() -> None:
    cols = manifest_columns(OLD_JSONL)
    assert cols["mel"] == ColumnSpec.features(frame_rate=80.0, dims=20)  # hop 12.5 ms
    assert cols["sketch"].role == "tokens" and cols["sketch"].shape_columns
    assert "sketch_shape" not in cols and "sketch_dtype" not in cols  # stored beside sketch, part of it
    assert cols["lyrics"].role == "text" and cols["prompt_wav"].role == "meta"
    assert cols["audio"] == ColumnSpec.audio(24000, "flac")


def test_roles_block_wins_and_both_schema_versions_read(tmp_path) -> None:
    for version, man in ((1, OLD_SPEECH), (SCHEMA_VERSION, {**OLD_SPEECH, "schema_version": SCHEMA_VERSION,
                                                           "roles": {"audio": {"role": "audio", "sample_rate": 8000},
                                                                     "id": {"role": "id"}}})):
        folder = tmp_path / str(version)
        folder.mkdir()
        (folder / MANIFEST_NAME).write_text(json.dumps(man))
        assert read_manifest(folder)["schema_version"] == version
    cols = manifest_columns(read_manifest(tmp_path / str(SCHEMA_VERSION)))
    assert cols == {"audio": ColumnSpec.audio(8000), "id": ColumnSpec.id()}
