"""raytrain's worker loop vs a plain PyTorch loop: same model, same data, same steps, one run.

    python bench/overhead.py [--threads 1 2] [--steps 150] [--reps 5] [--min-ratio 0.9] [--in-worker]

Both train the tiny ConvTasNet of separation_tiny.yaml on the same fixed 1 s mixtures
(batch 8, Adam, PIT SI-SDR loss, N torch threads in both loops, denormals flushed); each
`--threads` value is a separate measurement. On a 2-core machine, 2 threads make Ray's own
processes pre-empt the training threads; 1 thread leaves a core to Ray and measures the
worker loop's own overhead. raytrain runs a
one-phase pipeline on local Ray (one worker fed by Ray Data from the Parquet shards,
which `cache: auto` reads and decodes once and holds in the object store; checkpoint at
the end, MLflow on); the plain loop holds the same decoded tensors in memory and runs
with Ray shut down. Each of the `--reps` raytrain runs sits between two plain runs and is
compared with their mean (the machine's speed drifts); the median ratio is the result.
Steps/s are steady-state (the first steps are excluded); the fixed start-up cost of
raytrain (Ray, datasets, worker group, checkpoints) is reported separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from datasets_prep.shards import ShardWriter, decode_pcm16, read_manifest, shard_paths  # noqa: E402
from raytrain.losses import LOSSES  # noqa: E402
from raytrain.models import build_model  # noqa: E402

SR = 8000
MODEL = yaml.safe_load((ROOT / "configs/pipelines/separation_tiny.yaml").read_text())["model"]


def make_shards(folder: Path, n: int, seed: int = 0) -> None:
    """Fixed mixtures of two synthetic 'speakers' (harmonic tones with random pitch + noise bursts)."""
    rng = np.random.default_rng(seed)
    t = np.arange(SR) / SR
    with ShardWriter(folder, kind="mixtures", sample_rate=SR, audio_columns=["mix", "s1", "s2"],
                     rows_per_shard=32, prep={"bench": "overhead", "n": n, "seed": seed}) as w:
        for i in range(n):
            srcs = []
            for _ in range(2):
                f0 = rng.uniform(90, 300)
                s = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
                s *= (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > 0) * 0.8 + 0.2
                srcs.append((0.2 * s / np.abs(s).max()).astype(np.float32))
            w.write({"id": f"m{i:04d}", "speakers": "a,b", "mix": srcs[0] + srcs[1], "s1": srcs[0], "s2": srcs[1]})


def plain_loop(folder: Path, steps: int, batch: int, warm: int, threads: int) -> float:
    """The baseline: tensors in memory, the simplest correct loop."""
    import pyarrow.parquet as pq

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    rows = []
    for f in shard_paths(str(folder), read_manifest(str(folder))):
        rows += pq.read_table(f, columns=["mix", "s1", "s2"]).to_pylist()
    mix = torch.stack([torch.from_numpy(decode_pcm16(r["mix"])) for r in rows])
    src = torch.stack([torch.stack([torch.from_numpy(decode_pcm16(r[k])) for k in ("s1", "s2")]) for r in rows])
    lengths = torch.full((len(rows),), mix.shape[-1])
    model = build_model(MODEL["name"], dict(MODEL["args"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = LOSSES.get("si_sdr_pit")
    n = len(rows) // batch
    t_warm = 0.0
    for step in range(1, steps + 1):
        i = (step - 1) % n
        b = {"mix": mix[i * batch:(i + 1) * batch], "sources": src[i * batch:(i + 1) * batch],
             "lengths": lengths[i * batch:(i + 1) * batch]}
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(b), b)
        loss.backward()
        opt.step()
        float(loss.detach())  # a real loop logs the loss: one sync per step, as raytrain does
        if step == warm:
            t_warm = time.perf_counter()
    return (steps - warm) / (time.perf_counter() - t_warm)


def plain_loop_in_ray_worker(folder: Path, steps: int, batch: int, warm: int, threads: int, out: Path) -> float:
    """The same plain loop inside a Ray Train worker (its thread, niceness, Ray's daemons around it):
    what any Ray Train user pays before raytrain adds anything."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def fn(cfg: dict) -> None:
        out.write_text(str(plain_loop(Path(cfg["folder"]), steps, batch, warm, threads)))

    TorchTrainer(fn, train_loop_config={"folder": str(folder)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1})).fit()
    return float(out.read_text())


def raytrain_loop(folder: Path, runs: Path, steps: int, batch: int, threads: int) -> tuple[float, float]:
    """(steady steps/s, total wall seconds) of a one-phase pipeline."""
    from raytrain.config import load_config
    from raytrain.pipeline import PipelineRunner

    raw = {"name": "bench_overhead", "seed": 0, "runs_dir": str(runs),
           "tracking": {"uri": f"sqlite:///{runs / 'mlflow.db'}"},
           "data": {"mem": {"shards": str(folder)}}, "model": MODEL,
           "scaling": {"num_workers": 1, "threads_per_worker": threads},
           "phases": [{"name": "train", "train": ["mem"], "losses": {"si_sdr_pit": 1.0},
                       "optim": {"name": "adam", "lr": 1e-3}, "batch_size": batch, "max_steps": steps,
                       "log_every": 25, "eval_every": steps, "checkpoint_every": steps}]}
    t0 = time.perf_counter()
    summary = PipelineRunner(load_config(raw=raw), progress=False).run()
    wall = time.perf_counter() - t0
    m = summary["phases"]["train"]["final_metrics"]
    print(f"raytrain: data wait {100 * m['perf/data_wait_frac']:.1f}% of steady-state time")
    return m["perf/steps_per_s"], wall


def measure(args: argparse.Namespace, threads: int) -> tuple[float, bool]:
    """Median ratio (raytrain / plain) at `threads` torch threads in both loops; prints its block."""
    import ray

    warm = max(1, min(10, args.steps // 5))
    rows: list[tuple[float, float, float]] = []
    in_worker = None
    with tempfile.TemporaryDirectory() as tmp:
        folder, runs = Path(tmp) / "shards", Path(tmp) / "runs"
        make_shards(folder, args.rows)
        # The baseline runs with no Ray on the machine; raytrain pays for everything it starts.
        # Each raytrain run is bracketed by two plain runs and compared with their mean: this machine's
        # speed drifts by 20% within minutes, and the bracket cancels a steady drift.
        plain_before = plain_loop(folder, args.steps, args.batch, warm, threads)
        print(f"[{threads} thread(s)] plain {plain_before:.2f} steps/s", flush=True)
        for rep in range(1, args.reps + 1):
            # The first pipeline run after Ray starts overlaps Ray's own start-up churn (idle workers,
            # agents, Ray Data task workers being spawned): count it as start-up, measure the second run.
            _, first_wall = raytrain_loop(folder, runs, max(12, warm + 2), args.batch, threads)
            rt, wall = raytrain_loop(folder, runs, args.steps, args.batch, threads)
            if args.in_worker and rep == args.reps:
                in_worker = plain_loop_in_ray_worker(folder, args.steps, args.batch, warm, threads,
                                                     Path(tmp) / "rate.txt")
            ray.shutdown()
            plain_after = plain_loop(folder, args.steps, args.batch, warm, threads)
            plain = (plain_before + plain_after) / 2
            rows.append((plain, rt, wall))
            print(f"[{threads} thread(s)] rep {rep}: raytrain {rt:.2f} steps/s between plain {plain_before:.2f} "
                  f"and {plain_after:.2f}: ratio {rt / plain:.3f}", flush=True)
            plain_before = plain_after
    ratios = sorted(rt / plain for plain, rt, _ in rows)
    ratio = ratios[len(ratios) // 2]
    plain_med = sorted(r[0] for r in rows)[len(rows) // 2]
    rt_med = sorted(r[1] for r in rows)[len(rows) // 2]
    wall = rows[-1][2]
    train_s = args.steps / rows[-1][1]
    print(f"\n{threads} torch thread(s) in both loops; steps {args.steps}, batch {args.batch} x 1 s at {SR} Hz, "
          f"steady state after step {warm}, {args.reps} raytrain runs each between two plain runs")
    print(f"  plain PyTorch loop   {plain_med:7.2f} steps/s (median of bracket means)")
    print(f"  raytrain worker loop {rt_med:7.2f} steps/s (median)")
    if in_worker is not None:
        print(f"  plain loop inside a bare Ray Train worker {in_worker:7.2f} steps/s (last repetition)")
    print(f"  ratio (raytrain / plain): median {ratio:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    print(f"  raytrain fixed cost per phase (worker group, datasets, MLflow runs, checkpoint): "
          f"{wall - train_s:.1f} s of {wall:.1f} s wall")
    print(f"  first pipeline run after starting Ray (Ray start-up included): {first_wall:.1f} s wall")
    ok = args.min_ratio is None or ratio >= args.min_ratio
    if not ok:
        print(f"FAIL: ratio {ratio:.3f} < {args.min_ratio} at {threads} thread(s)")
    return ratio, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="torch threads of both loops, one measurement per value (default: 1 and all CPUs)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5, help="raytrain runs, each between two plain runs")
    ap.add_argument("--in-worker", action="store_true",
                    help="also time the plain loop inside a bare Ray Train worker (Ray's own cost)")
    ap.add_argument("--min-ratio", type=float, default=None, help="exit 1 when a median ratio is below this")
    args = ap.parse_args()
    results = [(n, *measure(args, n)) for n in dict.fromkeys(args.threads)]
    print("\n" + "; ".join(f"{n} thread(s): ratio {ratio:.3f}" for n, ratio, _ in results))
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
