"""Samples/s reaching a training worker: Ray Data vs pyarrow straight from the Parquet shards vs wav files.

    python bench/ingest.py [--utterances 2000] [--batch-size 16] [--reps 3] [--min-ratio 0.7]

A fixed corpus (seed 0) of `--utterances` wav files (1-4 s at 16 kHz, PCM16, harmonic tones in
noise) is written as `<root>/<speaker>/<utt>.wav` with a `.txt` transcript beside each, and
prepared into Parquet shards with `datasets_prep.execute.prepare_items` (speaker-dirs, in this
process). Three paths then deliver `--epochs` epochs as a training step receives them: padded float32
`audio` (B, T) + `lengths` (B,) tensors, batches of `--batch-size`, the short last batch dropped,
all collated by raytrain's own `stream.Collate` (`pad_collate`):

- raydata: what a raytrain phase does. `open_dataset` (the training columns only, one block per
  shard, shards in a seeded order, the PCM16 bytes decoded in the worker's collate) is handed to a
  one-worker `TorchTrainer` (1 CPU, the other CPU left to Ray Data, `preserve_order` as the pipeline
  sets it, no split), whose loop pulls batches from `get_dataset_shard` through raytrain's
  `BatchStream` and reports its rate with `ray.train.report`. The dataset is streamed (`cache:
  stream`), not held in memory: read in passes of several epochs, as a phase reads it.
- limit: no Ray at all. `pyarrow.parquet.read_table` of the same columns, shard by shard, the
  same `decode_audio`, the same collate, in this process: what reading these files can give.
- dataloader: a `torch.utils.data.DataLoader` (`--loader-workers` processes) over the original
  wav files, `soundfile.read` per item, the same collate in the loader workers.

Rates count rows (and audio seconds) over epochs 2 to `--epochs`: the first epoch of every path
(Ray and the worker group starting, cold read tasks and loader processes, cold caches) is taken but
not counted and is reported apart; every later start is counted: the files opened again each epoch
and, for raydata, a new Ray Data execution at each pass (the default 12 epochs of 2,000 rows cross
one pass boundary: a pass is `raytrain.data.datasets.epochs_per_pass` epochs, 10 here). The
DataLoader keeps its worker processes between epochs. Each repetition runs limit, raydata,
dataloader in turn (this machine's speed drifts); the medians are the result. Exit status 1 when
raydata / limit < `--min-ratio` or raydata is not faster than the dataloader.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from datasets_prep.execute import prepare_items  # noqa: E402
from datasets_prep.readers.manifests import list_items  # noqa: E402
from datasets_prep.shards import decode_audio, read_manifest, shard_paths  # noqa: E402
from raytrain.data.datasets import open_dataset, read_columns  # noqa: E402
from raytrain.data.stream import BatchStream, Collate  # noqa: E402

SR = 16000
SPEAKERS = 20
TRAIN_COLUMNS = ["audio", "speaker", "text", "phonemes"]  # what an ASR phase reads (with the id)


def make_corpus(root: Path, n: int, seed: int = 0) -> None:
    """`n` utterances of 1-4 s (harmonic tone with a random pitch glide in noise) over SPEAKERS speakers."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    for i in range(n):
        spk = root / f"spk{i % SPEAKERS:02d}"
        spk.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(rng.uniform(1.0, 4.0) * SR)) / SR
        f0 = rng.uniform(90, 250) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.1 + rng.normal(0, 0.01, len(t))
        sf.write(spk / f"u{i:05d}.wav", wave.astype(np.float32), SR, subtype="PCM_16")
        (spk / f"u{i:05d}.txt").write_text(f"utterance {i}\n")


def consume(batches: Iterable[dict[str, torch.Tensor]], warm: int) -> dict[str, float]:
    """Take every batch as a training step would (the tensors, as they are). The first ``warm`` batches
    (the first epoch: cold processes, cold caches) are taken but not counted; rows and audio samples
    are counted from then to the last batch, so every later epoch's start (reopening the files, a new
    Ray Data execution at a pass boundary) is inside the measured span."""
    t0 = time.perf_counter()
    t_warm = t_last = t0
    n, rows, samples = 0, 0, 0
    for batch in batches:
        assert batch["audio"].dtype == torch.float32 and batch["audio"].ndim == 2
        if n >= warm:
            rows += len(batch["lengths"])
            samples += int(batch["lengths"].sum())
        n += 1
        t_last = time.perf_counter()
        if n == warm:
            t_warm = t_last
    span = max(t_last - t_warm, 1e-9)
    return {"rows_per_s": rows / span, "audio_s_per_s": samples / SR / span, "first_epoch_s": t_warm - t0,
            "batches": n, "span_s": span}


# -- limit: pyarrow straight from the shards ---------------------------------------------------------------
def pyarrow_batches(folder: str, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shard by shard: the training columns, decoded, cut into batches (rows carried across shards)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(folder)
    columns = read_columns(manifest, [c for c in TRAIN_COLUMNS if c in manifest["columns"]])
    fmt = manifest.get("audio_format", "pcm_s16le")
    collate = Collate([], 0)
    carry: dict[str, list[Any]] = {c: [] for c in columns}
    for path in shard_paths(folder, manifest):
        table = pq.read_table(path, columns=columns)
        for c in columns:
            values = table.column(c).to_pylist()
            carry[c] += [decode_audio(v, fmt) for v in values] if c == "audio" else values
        while len(carry["audio"]) >= batch_size:
            batch = {}
            for c in columns:
                col = np.empty(batch_size, dtype=object)
                col[:] = carry[c][:batch_size]
                batch[c] = col
                carry[c] = carry[c][batch_size:]
            yield collate(batch)


def run_limit(folder: str, batch_size: int, rows: int, epochs: int) -> dict[str, float]:
    return consume(itertools.chain.from_iterable(pyarrow_batches(folder, batch_size) for _ in range(epochs)),
                   warm=rows // batch_size)


# -- raydata: raytrain's ingest in a one-worker Ray Train worker -------------------------------------------
def _ray_loop(cfg: dict[str, Any]) -> None:
    import ray.train

    t_start = time.time()
    shard = ray.train.get_dataset_shard("train")
    stream = BatchStream({"train": shard}, {"train": 1.0}, batch_size=cfg["batch_size"], transforms=[], seed=0,
                         audio={"train": cfg["audio"]})
    per_epoch = cfg["rows"] // cfg["batch_size"]
    stats = consume((next(stream) for _ in range(per_epoch * cfg["epochs"])), warm=per_epoch)
    stats["loop_start"] = t_start
    # Ray Train v2 hands back the metrics of the last report that carries a checkpoint
    with tempfile.TemporaryDirectory() as d:
        ray.train.report(stats, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_raydata(folder: str, batch_size: int, rows: int, epochs: int, storage: Path) -> dict[str, float]:
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # as raytrain's pipeline sets it
    # a phase's train dataset, streamed: read in passes of several epochs, shards in a seeded order
    wanted = [c for c in TRAIN_COLUMNS if c in read_manifest(folder)["columns"]]
    ds, _, spec = open_dataset("train", folder, cache="stream", shuffle_seed=0, passes=True, columns=wanted)
    t_fit = time.time()
    trainer = TorchTrainer(
        _ray_loop, train_loop_config={"batch_size": batch_size, "rows": rows, "epochs": epochs, "audio": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ctx.execution_options),
        run_config=ray.train.RunConfig(name="ingest", storage_path=str(storage)))
    stats = dict(trainer.fit().metrics)
    ray.shutdown()
    stats["ray_start_s"] = t_fit - t0
    stats["worker_start_s"] = stats["loop_start"] - t_fit
    return stats


# -- dataloader: the original wav files ----------------------------------------------------------------------
class WavDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import soundfile as sf

        it = self.items[i]
        return {"id": it["id"], "speaker": it["speaker"], "audio": sf.read(it["audio"], dtype="float32")[0]}


class ListCollate:
    """DataLoader rows -> the numpy batch Ray Data hands over -> raytrain's collate."""

    def __init__(self) -> None:
        self.collate = Collate([], 0)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for k in rows[0]:
            col = np.empty(len(rows), dtype=object)
            col[:] = [r[k] for r in rows]
            batch[k] = col
        return self.collate(batch)


def run_dataloader(root: Path, batch_size: int, workers: int, epochs: int) -> dict[str, float]:
    items = list_items("speaker-dirs", root)
    loader = torch.utils.data.DataLoader(WavDataset(items), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=ListCollate(), drop_last=True,
                                         persistent_workers=workers > 0)
    return consume(itertools.chain.from_iterable(loader for _ in range(epochs)), warm=len(items) // batch_size)


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of limit, raydata, dataloader")
    ap.add_argument("--rows-per-shard", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=12, help="epochs per path; the first is not counted")
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--min-ratio", type=float, default=0.7, help="exit 1 when raydata / limit is below this")
    args = ap.parse_args()

    results: dict[str, list[dict[str, float]]] = {"limit": [], "raydata": [], "dataloader": []}
    with tempfile.TemporaryDirectory() as tmp:
        wavs, shards = Path(tmp) / "wav", Path(tmp) / "shards"
        t0 = time.perf_counter()
        make_corpus(wavs, args.utterances)
        manifest = prepare_items(list_items("speaker-dirs", wavs), shards, kind="speech", audio_columns=["audio"],
                                 rows_per_shard=args.rows_per_shard, expect_sample_rate=SR, workers=0,
                                 progress=False)
        print(f"corpus: {manifest['rows']} utterances, {manifest['hours'] * 3600:.0f} s of audio, "
              f"{len(manifest['shards'])} shards ({time.perf_counter() - t0:.1f} s to write)", flush=True)
        rows = int(manifest["rows"])
        for rep in range(1, args.reps + 1):
            lim = run_limit(str(shards), args.batch_size, rows, args.epochs)
            rd = run_raydata(str(shards), args.batch_size, rows, args.epochs, Path(tmp) / f"ray{rep}")
            dl = run_dataloader(wavs, args.batch_size, args.loader_workers, args.epochs)
            for k, v in (("limit", lim), ("raydata", rd), ("dataloader", dl)):
                results[k].append(v)
            print(f"rep {rep}: limit {lim['rows_per_s']:7.1f}  raydata {rd['rows_per_s']:7.1f}  "
                  f"dataloader {dl['rows_per_s']:7.1f} rows/s   raydata/limit {rd['rows_per_s'] / lim['rows_per_s']:.3f}"
                  f"  (ray start {rd['ray_start_s']:.1f} s, worker {rd['worker_start_s']:.1f} s, "
                  f"first epoch {rd['first_epoch_s']:.1f} s)", flush=True)
    med = {k: median([r["rows_per_s"] for r in v]) for k, v in results.items()}
    aud = {k: median([r["audio_s_per_s"] for r in v]) for k, v in results.items()}
    ratios = [r["rows_per_s"] / lim["rows_per_s"] for r, lim in zip(results["raydata"], results["limit"], strict=True)]
    print(f"\n{rows} utterances, batch {args.batch_size}, epochs 2-{args.epochs} of each path counted, "
          f"{args.reps} repetitions (medians)")
    for k in results:
        print(f"  {k:<10} {med[k]:8.1f} samples/s  {aud[k]:8.1f} audio s/s")
    ratio, vs_loader = median(ratios), med["raydata"] / med["dataloader"]
    print(f"  raydata / limit      {ratio:.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"  raydata / dataloader {vs_loader:.3f}")
    failed = []
    if ratio < args.min_ratio:
        failed.append(f"raydata / limit {ratio:.3f} < {args.min_ratio}")
    if vs_loader <= 1.0:
        failed.append(f"raydata is not faster than the wav DataLoader ({vs_loader:.3f})")
    for f in failed:
        print(f"FAIL: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
