"""Driver-side dataset choices and the collate step that runs in Ray Data's thread (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain.config import ConfigError, load_config
from raytrain.data.datasets import decoded_bytes, should_cache
from raytrain.data.stream import Collate

MANIFEST = {"hours": 0.5, "sample_rate": 8000, "audio_columns": ["mix", "s1", "s2"]}


def test_decoded_bytes_counts_float32_samples_of_every_audio_column() -> None:
    assert decoded_bytes(MANIFEST) == int(0.5 * 3600 * 8000) * 4 * 3
    assert decoded_bytes({"hours": 1.0, "sample_rate": 16000, "audio_columns": ["audio"]}) == 3600 * 16000 * 4


@pytest.mark.parametrize(("cache", "store_mb", "expected"), [
    ("auto", 4 * 173, True),   # 172.8 MB decoded fits a quarter of a 692 MB store
    ("auto", 4 * 172, False),  # ... but not a quarter of 688 MB
    ("memory", 1, True),
    ("stream", 10**6, False),
])
def test_cache_choice(cache: str, store_mb: float, expected: bool) -> None:
    assert should_cache(cache, MANIFEST, store_mb * 1e6) is expected


def test_cache_setting_is_validated_with_its_key_path() -> None:
    raw = {"name": "p", "data": {"train": {"shards": "x", "cache": "ram"}}, "model": {"name": "separation"},
           "phases": [{"name": "a", "train": ["train"], "losses": {"separation": 1.0}, "max_steps": 1}]}
    with pytest.raises(ConfigError, match=r"data\.train\.cache"):
        load_config(raw=raw)
    raw["data"]["train"]["cache"] = "stream"
    assert load_config(raw=raw).data["train"].cache == "stream"


def test_collate_stacks_sources_without_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Collate runs in Ray Data's prefetch thread: a parallel torch kernel there starts a second
    OpenMP team that makes the training thread's team sleep and wake thousands of times a second."""
    rng = np.random.default_rng(0)
    rows = {k: np.stack([rng.standard_normal(80).astype(np.float32) for _ in range(4)]) for k in ("mix", "s1", "s2")}

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("collate must not run torch compute kernels")

    monkeypatch.setattr(torch, "stack", forbidden)
    monkeypatch.setattr(torch, "cat", forbidden)
    batch = Collate([], epoch=0)({k: v.copy() for k, v in rows.items()})
    assert batch["sources"].shape == (4, 2, 80) and batch["sources"].dtype == torch.float32
    assert np.array_equal(batch["sources"][:, 0].numpy(), rows["s1"])
    assert np.array_equal(batch["sources"][:, 1].numpy(), rows["s2"])
    assert np.array_equal(batch["mix"].numpy(), rows["mix"])
