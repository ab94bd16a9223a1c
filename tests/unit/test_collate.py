"""pad_collate: Ray Data numpy batches into padded torch batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain.data.collate import pad_collate
from raytrain.data.transforms import DynamicMix


def _objects(*arrays: np.ndarray) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def test_variable_audio_is_padded_with_lengths_and_strings_dropped() -> None:
    rows = [
        np.arange(1, 4, dtype=np.float32),
        np.arange(1, 6, dtype=np.float32),
        np.array([7.0, 8.0], np.float32),
    ]
    batch = {
        "audio": _objects(*rows),
        "speaker": np.array(["a", "b", "c"], dtype=object),
        "id": np.array(["u0", "u1", "u2"]),
        "label": np.array([3, 1, 2]),
        "pitch": np.array([[0.5, 1.0]] * 3, dtype=np.float64),
    }
    out = pad_collate(batch)
    assert set(out) == {"audio", "lengths", "label", "pitch"}
    assert out["audio"].shape == (3, 5) and out["audio"].dtype == torch.float32
    assert out["lengths"].tolist() == [3, 5, 2] and out["lengths"].dtype == torch.int64
    for i, r in enumerate(rows):
        assert torch.equal(out["audio"][i, : len(r)], torch.from_numpy(r))
        assert not out["audio"][i, len(r) :].any()
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == [3, 1, 2]
    assert out["pitch"].dtype == torch.float32 and out["pitch"].shape == (3, 2)


def test_existing_lengths_column_is_kept() -> None:
    batch = {"audio": _objects(np.ones(4, np.float32), np.ones(2, np.float32)), "lengths": np.array([9, 9])}
    out = pad_collate(batch)
    assert out["lengths"].tolist() == [9, 9]
    assert out["audio_lengths"].tolist() == [4, 2]


def test_other_variable_columns_get_their_own_lengths() -> None:
    batch = {
        "mix": _objects(np.ones(3, np.float32), np.ones(6, np.float32)),
        "tokens": _objects(np.array([4, 5, 6]), np.array([7])),
        "feats": _objects(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)),
    }
    out = pad_collate(batch)
    assert out["lengths"].tolist() == [3, 6]
    assert out["tokens"].dtype == torch.int64 and out["tokens"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert out["tokens_lengths"].tolist() == [3, 1]
    assert out["feats"].shape == (2, 5, 4) and out["feats_lengths"].tolist() == [2, 5]


def test_audio_keys_force_lengths_for_fixed_shape_audio() -> None:
    batch = {"audio": np.zeros((2, 7), np.float32)}
    assert "lengths" not in pad_collate(batch)
    assert pad_collate(batch, audio_keys=["audio"])["lengths"].tolist() == [7, 7]
    with pytest.raises(KeyError, match="mix"):
        pad_collate(batch, audio_keys=["mix"])


def test_dynamic_mix_output_collates_unchanged() -> None:
    audio = _objects(
        *(np.random.default_rng(i).standard_normal(900 + 50 * i).astype(np.float32) for i in range(4))
    )
    mixed = DynamicMix(crop_seconds=1.0, sample_rate=1000, seed=0)(
        {"audio": audio, "speaker": np.array(list("abab"))}
    )
    out = pad_collate(mixed)
    assert out["mix"].shape == (4, 1000) and out["sources"].shape == (4, 2, 1000)
    assert torch.equal(out["lengths"], torch.from_numpy(mixed["lengths"]))
    assert torch.equal(out["sources"], torch.from_numpy(mixed["sources"]))


def test_read_only_numeric_columns_are_copied_into_writable_tensors() -> None:
    frozen = np.arange(12, dtype=np.float32).reshape(3, 4)
    frozen.flags.writeable = False  # what a zero-copy Arrow column looks like
    out = pad_collate({"mix": frozen, "gain": frozen[:, 0]}, audio_keys=["mix"])
    out["mix"] += 1  # must not touch the source
    out["gain"] += 1
    assert frozen[0, 0] == 0 and out["mix"][0, 0] == 1 and out["gain"][0] == 1
