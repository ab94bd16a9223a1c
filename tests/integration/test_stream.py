"""BatchStream on real Ray Data iterators: rows held after the first epoch, reshuffled, resumable."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from raytrain.data.stream import BatchStream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROWS, BATCH = 37, 4  # 9 full batches per epoch, one row left over


def _dataset(ray: Any) -> Any:
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as the pipeline sets it
    # Variable-length rows whose values are their id, so every batch can be checked row by row.
    return ray.data.from_items([{"id": i, "x": np.full(3 + i % 4, i, np.float32)} for i in range(ROWS)],
                               override_num_blocks=3)


def _ids(batch: dict[str, Any]) -> list[int]:
    ids = batch["id"].tolist()
    x, lengths = batch["x"].numpy(), batch["x_lengths"].numpy()
    for row, (i, n) in enumerate(zip(ids, lengths, strict=True)):
        assert n == 3 + i % 4 and np.all(x[row, :n] == i) and np.all(x[row, n:] == 0)
    return ids


def _stream(ds: Any, hold: bool, position: dict[str, Any] | None = None) -> BatchStream:
    return BatchStream({"a": ds.iterator()}, {"a": 1.0}, batch_size=BATCH, transforms=[], seed=3,
                       hold={"a"} if hold else set(), position=position)


def test_held_rows_serve_later_epochs_reshuffled_and_resume_exactly(ray_local: Any) -> None:
    ds = _dataset(ray_local)
    stream = _stream(ds, hold=True)
    epochs = [[_ids(next(stream)) for _ in range(9)] for _ in range(3)]
    flat = [sum(e, []) for e in epochs]
    assert flat[0] == list(range(36))  # epoch 0: Ray Data's order, the short last batch not trained on
    for e in (1, 2):  # later epochs: 9 batches of distinct held rows, the leftover row included in the draw
        assert len(set(flat[e])) == 36 and set(flat[e]) <= set(range(ROWS))
    assert flat[1] != flat[2] and flat[1] != flat[0]
    assert 36 in set(flat[1]) | set(flat[2])  # the row epoch 0 left over is held too
    assert stream.position() == {"picks": 27, "epoch": {"a": 2}, "consumed": {"a": 9}, "batches": {"a": 27}}

    # Resume mid-epoch 1 (the rows are read again) and mid-epoch 0: the same batches follow.
    for done in (13, 5):
        twin = _stream(ds, hold=True, position={"picks": done, "epoch": {"a": done // 9},
                                                "consumed": {"a": done % 9}})
        rest = [_ids(next(twin)) for _ in range(27 - done)]
        assert rest == sum(epochs, [])[done:]


def test_streamed_source_rereads_every_epoch_in_the_same_order(ray_local: Any) -> None:
    stream = _stream(_dataset(ray_local), hold=False)
    epochs = [sum((_ids(next(stream)) for _ in range(9)), []) for _ in range(2)]
    assert epochs[0] == epochs[1] == list(range(36))


def _shards(root: Any, files: int = 6, rows: int = 4) -> str:
    """A real dataset folder: `files` shards of `rows` one-second tones, ids in file order."""
    import soundfile as sf

    from datasets_prep.execute import prepare_items
    from datasets_prep.readers.manifests import list_items

    t = np.arange(8000) / 8000
    for k in range(files * rows):
        folder = root / "raw" / f"s{k // rows}"
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / f"u{k:03d}.wav"), (0.3 * np.sin(2 * np.pi * (100 + k) * t)).astype(np.float32),
                 8000, subtype="PCM_16")
    prepare_items(list_items("speaker-dirs", root / "raw"), root / "ds", kind="speech", audio_columns=["audio"],
                  rows_per_shard=rows, expect_sample_rate=8000, workers=0, progress=False)
    return str(root / "ds")


def test_train_files_are_read_in_a_seeded_order_and_the_buffer_reshuffles_each_epoch(ray_local: Any,
                                                                                        tmp_path: Any) -> None:
    from datasets_prep.shards import read_manifest
    from raytrain.data.datasets import audio_spec, read_dataset

    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    folder = _shards(tmp_path)
    spec = audio_spec(read_manifest(folder))

    def file_order(seed: int | None) -> list[str]:
        ids = [r["id"] for r in read_dataset(folder, shuffle_seed=seed).select_columns(["id"]).iter_rows()]
        return [i.split("/")[0] for i in ids[::4]]  # the speaker folder = the shard a row came from

    assert file_order(None) == [f"s{k}" for k in range(6)]
    seeded = file_order(11)
    assert sorted(seeded) == [f"s{k}" for k in range(6)] and seeded != file_order(None)
    assert file_order(11) == seeded  # the same order on every read: epochs and resumed runs agree
    assert file_order(12) != seeded

    def stream(position: dict[str, Any] | None = None) -> BatchStream:
        return BatchStream({"a": read_dataset(folder, shuffle_seed=11).iterator()}, {"a": 1.0}, batch_size=4,
                           transforms=[], seed=3, shuffle_buffer=8, position=position, audio={"a": spec})

    def keys(batch: dict[str, Any]) -> list[int]:  # a row's tone: its second sample names it (ids are strings)
        return [round(float(v) * 1e5) for v in batch["audio"][:, 1]]

    s = stream()
    epochs = [[keys(next(s)) for _ in range(6)] for _ in range(2)]
    flat = [sum(e, []) for e in epochs]
    assert len(set(flat[0])) == 24 and sorted(flat[0]) == sorted(flat[1])  # every row once per epoch
    assert flat[0] != flat[1]  # the buffer draws a new order each epoch
    twin = stream({"picks": 8, "epoch": {"a": 1}, "consumed": {"a": 2}})
    assert [keys(next(twin)) for _ in range(4)] == epochs[1][2:]


def test_a_pass_of_epochs_reads_each_shard_once_per_epoch_and_resumes_mid_pass(ray_local: Any,
                                                                                tmp_path: Any) -> None:
    """A streamed train dataset is one Ray Data execution of several epochs: each epoch reads every shard
    in its own seeded order, a batch met again later in the pass gets new random crops, and a run
    resumed mid-pass gets the same batches as the uninterrupted one."""
    from datasets_prep.shards import read_manifest
    from raytrain.data.datasets import audio_spec, read_dataset, shard_orders
    from raytrain.data.stream import build_transforms

    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    folder = _shards(tmp_path)  # 6 shards of 4 rows: shard k holds speaker s<k>
    ids = [r["id"] for r in read_dataset(folder, shuffle_seed=11, epochs=3).select_columns(["id"]).iter_rows()]
    assert len(ids) == 72
    for e, order in enumerate(shard_orders(6, 11, 3)):
        epoch = ids[24 * e:24 * (e + 1)]
        assert sorted(epoch) == sorted(ids[:24]) and len(set(epoch)) == 24
        assert [i.split("/")[0] for i in epoch[::4]] == [f"s{k}" for k in order]

    spec = {**audio_spec(read_manifest(folder)), "epochs_per_pass": 3}

    def stream(position: dict[str, Any] | None = None) -> BatchStream:
        return BatchStream({"a": read_dataset(folder, shuffle_seed=11, epochs=3).iterator()}, {"a": 1.0},
                           batch_size=4, transforms=build_transforms([{"name": "crop", "args": {"seconds": 0.25}}],
                                                                     8000, seed=2),
                           seed=3, position=position, audio={"a": spec})

    s = stream()
    batches = [next(s)["audio"].numpy() for _ in range(18)]  # one pass: 3 epochs of 6 batches (one shard each)
    assert s.position() == {"picks": 18, "epoch": {"a": 0}, "consumed": {"a": 18}, "batches": {"a": 18}}
    assert all(b.shape == (4, 2000) for b in batches)
    # each shard comes back once per epoch as the same four rows (batch j of epoch e is shard orders[e][j]),
    # cropped differently every time
    orders = shard_orders(6, 11, 3)
    for k in range(6):
        seen = [batches[6 * e + order.index(k)] for e, order in enumerate(orders)]
        assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[1], seen[2])
        assert not np.allclose(seen[0], seen[2])
    twin = stream({"picks": 10, "epoch": {"a": 0}, "consumed": {"a": 10}})
    assert all(np.array_equal(next(twin)["audio"].numpy(), b) for b in batches[10:])
    next(s)
    assert s.position() == {"picks": 19, "epoch": {"a": 1}, "consumed": {"a": 1},  # the next pass
                            "batches": {"a": 19}}
