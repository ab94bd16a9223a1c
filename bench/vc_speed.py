"""The vc_flow student against its teacher: seconds per utterance, same dev rows, same threads, one run.

    python bench/vc_speed.py RUN_DIR [--teacher phase2] [--student distill_b] [--student-run DIR] [--threads 1]
    python bench/vc_speed.py RUN_DIR --sizes configs/pipelines/vc_flow.yaml

RUN_DIR is a finished `raytrain run configs/pipelines/vc_flow_tiny.yaml` (its config.yaml gives both models'
sizes and steps, its embed phase the dev rows with their reference embeddings). Each dev source is converted
one utterance at a time, as `raytrain infer` does: content encoder, the flow's Euler steps (10 for the
teacher, 2 for the student), then Griffin-Lim to audio. Teacher and student alternate, row by row, so a drift
of the machine's speed hits both. Printed: the median seconds per utterance of the acoustic model (log-mel
out) and of the whole conversion (audio out), the student's speed-up on each, and the real-time factors.
Target (issue 17): the whole conversion at least 5x faster.

``--sizes CONFIG`` times the two phases' models at the sizes and steps CONFIG gives them (the full-size
recipe), with fresh weights: the time of a convolution stack does not depend on its weights, and no run of
the full-size recipe fits this machine. The dev rows still come from RUN_DIR.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dev_rows(run_dir: Path, n: int) -> list[dict[str, Any]]:
    """Up to `n` dev rows (audio, lengths, ref_emb and, if the embed phase wrote it, ref_stats, as tensors of
    one row) from the run's embed output."""
    import json

    import pyarrow.parquet as pq

    from datasets_prep.manifest import read_manifest, shard_paths
    from raytrain.data.datasets import audio_spec
    from raytrain.data.stream import Collate

    summary = json.loads((run_dir / "summary.json").read_text())
    folder = summary["phases"]["embed"]["datasets"]["dev"]
    manifest = read_manifest(folder)
    collate = Collate([], epoch=0, audio=audio_spec(manifest))
    rows: list[dict[str, Any]] = []
    for path in shard_paths(folder, manifest):
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=["id", "audio", "ref_emb", *(["ref_stats"] if "ref_stats" in names else [])])
        for i in range(table.num_rows):
            batch = {c: table.column(c).slice(i, 1).to_numpy(zero_copy_only=False) for c in table.column_names}
            rows.append(collate(batch))
            if len(rows) == n:
                return rows
    return rows


def model_of(run_dir: Path, phase: str, sizes: Path | None = None) -> tuple[Any, float]:
    """The phase's model with its best weights, in eval mode; and its sample rate. With `sizes`, the phase's
    model as that config sizes it, with fresh (seeded) weights."""
    import torch

    from raytrain.checkpoints import load_weights
    from raytrain.config import load_config
    from raytrain.models import build_model

    cfg = load_config(sizes or run_dir / "config.yaml")
    mcfg = cfg.phase_model(cfg.phase(phase))
    torch.manual_seed(0)
    model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    if sizes is None:
        model.load_state_dict(load_weights(run_dir / phase / "best" / "model.pt"))
    return model.eval().requires_grad_(False), float(model.sample_rate)


def convert(model: Any, row: dict[str, Any]) -> tuple[float, float]:
    """(acoustic seconds, total seconds) of one utterance."""
    import torch

    from raytrain.vc_infer import source_noise

    with torch.no_grad():
        t0 = time.perf_counter()
        ref = {k: row[k] for k in ("ref_emb", "ref_stats") if k in row}
        mel = model.convert(row["audio"], ref, source_noise(model, int(row["lengths"][0])))
        t1 = time.perf_counter()
        model.griffin_lim(mel)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--teacher", default="phase2")
    ap.add_argument("--student", default="distill_b")
    ap.add_argument("--student-run", type=Path, help="the student's run folder, if not RUN_DIR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--sizes", type=Path, help="time the models at this config's sizes, fresh weights")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = dev_rows(args.run_dir, args.rows)
    models = {"teacher": model_of(args.run_dir, args.teacher, args.sizes),
              "student": model_of(args.student_run or args.run_dir, args.student, args.sizes)}
    if args.sizes:
        print(f"models at the sizes of {args.sizes}, fresh weights: "
              + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters"
                          for k, (m, _) in models.items()))
    for model, _ in models.values():  # warm-up: first calls allocate and build the Griffin-Lim window
        convert(model, rows[0])
    times: dict[str, list[tuple[float, float]]] = {"teacher": [], "student": []}
    for row in rows:
        for name, (model, _) in models.items():
            times[name].append(convert(model, row))
    audio_s = statistics.median(int(r["lengths"][0]) for r in rows) / models["teacher"][1]
    print(f"{len(rows)} dev utterances (median {audio_s:.2f} s of audio), {args.threads} torch thread(s), "
          f"one utterance per call")
    med: dict[str, tuple[float, float]] = {}
    for name, (model, _) in models.items():
        acoustic = statistics.median(a for a, _ in times[name])
        total = statistics.median(t for _, t in times[name])
        med[name] = (acoustic, total)
        steps = model.sample_steps
        print(f"  {name:<8} {getattr(args, name):<10} {steps:>2} steps  acoustic {acoustic * 1000:7.1f} ms  "
              f"with Griffin-Lim {total * 1000:7.1f} ms  RTF {total / audio_s:.3f}")
    speed_acoustic = med["teacher"][0] / med["student"][0]
    speed_total = med["teacher"][1] / med["student"][1]
    print(f"student speed-up: acoustic model {speed_acoustic:.2f}x, whole conversion {speed_total:.2f}x "
          f"(target >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
