"""Driver-side dataset choices and the collate step that runs in Ray Data's thread (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets_prep.shards import encode_audio
from raytrain.config import ConfigError, load_config
from raytrain.data.datasets import audio_spec, held_bytes, should_cache
from raytrain.data.stream import Collate

MANIFEST = {"hours": 0.5, "sample_rate": 8000, "audio_columns": ["mix", "s1", "s2"]}


def test_held_bytes_counts_stored_samples_of_every_audio_column() -> None:
    assert held_bytes(MANIFEST) == int(0.5 * 3600 * 8000) * 2 * 3  # PCM16 when the manifest does not say
    f32 = {"hours": 1.0, "sample_rate": 16000, "audio_columns": ["audio"], "audio_format": "f32le"}
    assert held_bytes(f32) == 3600 * 16000 * 4


@pytest.mark.parametrize(("cache", "store_mb", "expected"), [
    ("auto", 4 * 87, True),   # 86.4 MB of PCM16 fits a quarter of a 348 MB store
    ("auto", 4 * 86, False),  # ... but not a quarter of 344 MB
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


@pytest.mark.parametrize("fmt", ["pcm_s16le", "flac", "f32le"])
def test_collate_decodes_stored_audio_of_the_dataset_format(fmt: str) -> None:
    rng = np.random.default_rng(1)
    waves = [np.round(rng.uniform(-0.5, 0.5, n) * 32767) / 32768 for n in (800, 1200, 1000)]
    audio = np.empty(3, dtype=object)
    audio[:] = [encode_audio(w.astype(np.float32), fmt, 8000) for w in waves]
    batch = Collate([], epoch=0, audio=audio_spec({"audio_columns": ["audio"], "audio_format": fmt}))(
        {"audio": audio, "id": np.array(["a", "b", "c"], dtype=object)})
    assert batch["audio"].shape == (3, 1200) and batch["lengths"].tolist() == [800, 1200, 1000]
    for i, w in enumerate(waves):
        np.testing.assert_array_equal(batch["audio"][i, : len(w)].numpy(), w.astype(np.float32))
        assert not batch["audio"][i, len(w):].any()


def test_each_epoch_of_a_pass_reads_every_shard_once_in_its_own_seeded_order() -> None:
    from raytrain.data.datasets import shard_orders

    assert shard_orders(4, None, 2) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    orders = shard_orders(12, 5, 3)
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert shard_orders(12, 5, 3) == orders and shard_orders(12, 5, 1) == orders[:1]  # every pass the same
    assert shard_orders(12, 6, 1) != orders[:1]


@pytest.mark.parametrize(("rows", "expected"), [(2000, 10), (20_000, 1), (50_000, 1), (7, 32), (0, 32)])
def test_a_pass_spans_whole_epochs_up_to_the_pass_size(rows: int, expected: int) -> None:
    from raytrain.data.datasets import epochs_per_pass

    assert epochs_per_pass({"rows": rows}) == expected


def test_read_tasks_take_consecutive_shards_up_to_the_byte_limit() -> None:
    from raytrain.data.shard_source import group_tasks

    sizes = [16.0, 16.0, 40.0, 70.0, 16.0, 16.0]
    assert group_tasks([0, 1, 2, 3, 4, 5], sizes, 64) == [[0, 1], [2], [3], [4, 5]]
    assert group_tasks([5, 4, 1, 0], sizes, 64) == [[5, 4, 1, 0]]
    assert group_tasks([3, 3], sizes, 64) == [[3], [3]]  # one too big for the limit still gets a task
    assert group_tasks([], sizes, 64) == []


def test_a_mixture_draws_its_sources_in_the_configured_proportion() -> None:
    """Each batch of a `train: {a: 3, b: 1}` mixture comes from one source, drawn from (seed, pick) alone."""
    import numpy as np

    from raytrain.data.stream import pick_source

    p = np.array([0.75, 0.25])
    picks = [pick_source(7, k, p) for k in range(4000)]
    assert abs(picks.count(0) / 4000 - 0.75) < 0.02
    assert picks == [pick_source(7, k, p) for k in range(4000)]  # the same on a resumed run
    assert picks != [pick_source(8, k, p) for k in range(4000)]
