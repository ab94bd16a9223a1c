"""A `cache` phase against a plain in-process loop: rows per second, same model, same shards, one run.

    python bench/cache.py [--shards data/shards/espeak_asr_tiny/train] [--threads 1] [--reps 2]

Both run a frozen Conformer CTC encoder (the streaming_asr model, smaller) over the same Parquet shards and
write its log-probabilities (25 frames/s) beside the ids with the same `DatasetWriter`, at `--threads` torch
threads in total: the plain loop reads the shards with pyarrow in this process, decodes, collates, runs the
model and writes; the cache phase does the same through raytrain (`raytrain run` of a one-phase pipeline:
Ray Data reads and decodes, one actor runs the model, the driver writes; Ray start-up excluded, the phase's
own wall time counted, Ray Data's start-up included). Each cache run sits between two plain runs and is
compared with their mean (the machine's speed drifts). Target: ratio >= 0.8.
Prepare the data first: raytrain prep configs/prep/streaming_asr_tiny.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

MODEL = {"name": "ctc_asr", "args": {"sample_rate": 16000, "encoder": "conformer", "n_mels": 80, "stack": 4,
                                     "d_model": 96, "num_heads": 4, "ffn_dim": 384, "num_layers": 3,
                                     "conv_kernel": 15}}
COLUMNS = {"logp": {"output": "asr_ctc", "role": "features", "frame_rate": 25}}
BATCH = 32


def weights(folder: Path) -> Path:
    import torch

    from raytrain.models import build_model

    torch.manual_seed(0)
    path = folder / "model.pt"
    torch.save(build_model(MODEL["name"], dict(MODEL["args"])).state_dict(), path)
    return path


def plain(shards: str, model_pt: Path, out: Path, threads: int) -> tuple[int, float]:
    """(rows, seconds): read, decode, collate, forward, write, all in this process."""
    import pyarrow.parquet as pq
    import torch

    from datasets_prep.shards import DatasetWriter, read_manifest, shard_paths
    from raytrain.config.schema import CachePhaseConfig
    from raytrain.data.datasets import audio_spec
    from raytrain.phases.cache import CacheMapper, made_specs, output_rows, output_specs

    torch.set_num_threads(threads)
    manifest = read_manifest(shards)
    phase = CachePhaseConfig.model_validate({"name": "plain", "kind": "cache", "init_from": {"path": str(model_pt)},
                                             "datasets": {"x": "y"}, "columns": COLUMNS, "batch_size": BATCH})
    t0 = time.perf_counter()
    mapper = CacheMapper(MODEL, str(model_pt), phase.model_dump(mode="json"), 16000, 0, threads, False)
    audio = audio_spec(manifest)
    rows = 0
    specs = output_specs(phase, manifest)
    writer: DatasetWriter | None = None
    for path in shard_paths(shards, manifest):
        table = pq.read_table(path)
        for start in range(0, table.num_rows, BATCH):
            batch = {c: table.column(c).slice(start, BATCH).to_numpy(zero_copy_only=False)
                     for c in table.column_names}
            got = mapper.map(batch, audio)
            if writer is None:  # the output columns as the model made them, as the cache phase does
                writer = DatasetWriter(out / f"plain-{time.time_ns()}", {**specs, **made_specs(got)},
                                       kind="cache").__enter__()
            writer.write_batch(output_rows(got))
            rows += len(got["id"])
    if writer is not None:
        writer.__exit__(None, None, None)
    return rows, time.perf_counter() - t0


def cached(shards: str, model_pt: Path, root: Path, threads: int, rep: int) -> tuple[int, float]:
    """(rows, the cache phase's wall seconds) through raytrain."""
    from raytrain.config import load_config
    from raytrain.pipeline import PipelineRunner

    raw: dict[str, Any] = {
        "name": "bench_cache", "runs_dir": str(root / "runs"), "tracking": {"enabled": False},
        "data": {"src": {"shards": shards}}, "model": MODEL,
        "scaling": {"num_workers": 1, "use_gpu": False, "threads_per_worker": threads},
        "phases": [{"name": "encode", "kind": "cache", "init_from": {"path": str(model_pt)},
                    "datasets": {"src": "logp_src"}, "columns": COLUMNS, "batch_size": BATCH,
                    "cache_dir": str(root / f"cache{rep}")}]}
    summary = PipelineRunner(load_config(raw=raw), progress=False, run_dir=root / f"run{rep}").run()
    entry = summary["phases"]["encode"]
    from datasets_prep.shards import read_manifest

    rows = read_manifest(entry["datasets"]["logp_src"])["rows"]
    assert entry["forward_passes"] > 0
    return rows, float(entry["wall_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default=str(ROOT / "data/shards/espeak_asr_tiny/train"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads in total in both (default 1)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--min-ratio", type=float, default=0.8)
    args = ap.parse_args()
    from raytrain.session import ray_init

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_pt = weights(root)
        ratios = []
        before = plain(args.shards, model_pt, root, args.threads)
        ray_init()
        for rep in range(args.reps):
            rows, wall = cached(args.shards, model_pt, root, args.threads, rep)
            after = plain(args.shards, model_pt, root, args.threads)
            base = (before[0] / before[1] + after[0] / after[1]) / 2
            ratio = rows / wall / base
            ratios.append(ratio)
            print(f"rep {rep}: plain {before[0] / before[1]:.1f} / {after[0] / after[1]:.1f} rows/s, "
                  f"cache phase {rows / wall:.1f} rows/s ({rows} rows in {wall:.1f} s): ratio {ratio:.3f}")
            before = after
    ratios.sort()
    median = ratios[len(ratios) // 2]
    print(f"cache/plain rows/s at {args.threads} torch thread(s): median {median:.3f} "
          f"(target >= {args.min_ratio}) over {len(ratios)} reps")
    return 0 if median >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
