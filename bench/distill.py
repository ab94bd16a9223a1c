"""Distillation with a trained teacher: a smaller student learns separation from the teacher's outputs alone.

    python bench/distill.py [--teacher RUN_DIR] [--steps 800] [--runs-dir runs/bench]

The teacher is separation_tiny's `long` phase (best weights) from a finished `bench/recipes.py
separation_tiny` run (default: the newest under `--runs-dir`). One `raytrain run` of a three-phase
pipeline on the recipe's own data and dev set (mixtures of voices and sentences no phase trains on):

- `teacher`   (evaluate): the teacher re-scored on dev, in this run;
- `alone`     (train): the student trained on the reference sources (`si_sdr_pit`);
- `distilled` (distill): the same student, same seed, steps and schedule, trained on the teacher's
  outputs only (`distill_si_sdr_pit`): it never sees a reference source.

Prints dev SI-SDRi of all three and the share of the teacher's the distilled student reaches (target:
>= 0.8, "closes most of the gap"), with parameter counts and wall times; exits 1 below the target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.recipes import run_config  # noqa: E402

TARGET = 0.8
STUDENT = {"sample_rate": 8000, "num_sources": 2, "enc_kernel_size": 16, "enc_num_feats": 64, "msk_kernel_size": 3,
           "msk_num_feats": 64, "msk_num_hidden_feats": 64, "msk_num_layers": 4, "msk_num_stacks": 2}


def newest_teacher(runs_dir: Path) -> Path | None:
    for d in sorted(runs_dir.glob("separation_tiny-*"), reverse=True):
        s = d / "summary.json"
        if s.is_file() and json.loads(s.read_text())["phases"].get("long", {}).get("status") == "finished":
            return d
    return None


def pipeline(recipe: dict[str, Any], teacher: str, steps: int, runs: Path) -> dict[str, Any]:
    """The bench's pipeline: the recipe's data, dev set and `short` phase settings, with the student's model."""
    short = next(p for p in recipe["phases"] if p["name"] == "short")
    student = {"name": "convtasnet", "args": STUDENT}
    train = {"model": student, "transforms": short["transforms"], "optim": {"name": "adam", "lr": 2.0e-3},
             "schedule": {"warmup_steps": 50, "decay": "cosine", "min_lr_ratio": 0.1}, "max_steps": steps,
             "eval_every": steps // 2, "checkpoint_every": steps // 2}
    return {
        "name": "distill_bench", "seed": recipe["seed"], "runs_dir": str(runs),
        "data": {k: {"shards": str(ROOT / v["shards"])} for k, v in recipe["data"].items()},
        "model": recipe["model"], "scaling": recipe["scaling"],
        "defaults": {k: v for k, v in recipe["defaults"].items() if k != "losses"},
        "phases": [
            {"name": "teacher", "kind": "evaluate", "init_from": {"path": teacher}, "losses": {"si_sdr_pit": 1.0}},
            {"name": "alone", **train, "losses": {"si_sdr_pit": 1.0}},
            {"name": "distilled", "kind": "distill", **train, "losses": {"distill_si_sdr_pit": 1.0},
             "teacher": {"path": teacher, "model": recipe["model"]}},
        ],
    }


def params(args: dict[str, Any]) -> int:
    from raytrain.models import build_model

    return sum(p.numel() for p in build_model("convtasnet", dict(args)).parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, help="a finished bench/recipes.py separation_tiny run folder")
    ap.add_argument("--steps", type=int, default=800, help="steps of each student phase")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    args = ap.parse_args(argv)
    teacher_run = args.teacher or newest_teacher(args.runs_dir)
    if teacher_run is None:
        print(f"no finished separation_tiny run under {args.runs_dir}: train the teacher first with "
              "`python bench/recipes.py separation_tiny` (about 11 minutes here)", file=sys.stderr)
        return 2
    teacher_summary = json.loads((teacher_run / "summary.json").read_text())
    weights = teacher_summary["phases"]["long"]["best_checkpoint"]
    recipe = yaml.safe_load((ROOT / "configs" / "pipelines" / "separation_tiny.yaml").read_text())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.runs_dir / f"distill-{stamp}"
    run_dir.mkdir(parents=True)
    cfg = run_dir.parent / f"distill-{stamp}.yaml"
    cfg.write_text(yaml.safe_dump(pipeline(recipe, weights, args.steps, args.runs_dir), sort_keys=False))
    rc, wall, summary = run_config(cfg, run_dir)
    if rc != 0:
        print(f"raytrain run exited {rc}; see {run_dir.parent / f'{run_dir.name}.log'}", file=sys.stderr)
        return 1
    phases = summary["phases"]
    value = {n: phases[n]["final_metrics"]["eval/si_sdri"] for n in ("teacher", "alone", "distilled")}
    n_teacher, n_student = params(recipe["model"]["args"]), params(STUDENT)
    share = value["distilled"] / value["teacher"]
    print(f"\nteacher: {teacher_run.name} long/best ({n_teacher:,} params); student: {n_student:,} params "
          f"({n_student / n_teacher:.0%}); {args.steps} steps per student phase; dev = mixtures of held-out voices")
    print(f"{'model':<28}{'dev SI-SDRi (dB)':>18}{'wall (s)':>10}")
    for name, label in (("teacher", "teacher (evaluate)"), ("alone", "student, references"),
                        ("distilled", "student, teacher only")):
        print(f"{label:<28}{value[name]:>18.3f}{phases[name]['wall_s']:>10.0f}")
    passed = share >= TARGET
    print(f"distilled / teacher = {share:.3f} (target >= {TARGET}); distilled - alone = "
          f"{value['distilled'] - value['alone']:+.3f} dB; total {wall:.0f} s; {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
