"""Train each tiny recipe exactly as a user would, and score it against its quality bars.

    python bench/recipes.py separation_tiny streaming_asr_tiny
    python bench/recipes.py --all [--runs-dir runs/bench] [--json out.json]

For every recipe NAME: `raytrain prep configs/prep/NAME.yaml` (skipped where the shards are up to
date), then `raytrain run configs/pipelines/NAME.yaml` in a subprocess with nothing overridden but
the run folder. It prints one row per recipe (phases, steps and wall time per phase, each quality
metric against its bar, pass/fail, commit) and exits 1 when a bar is missed or a run fails.
`make test` runs the same configs with cut steps; the bars are checked only here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bar:
    phase: str
    metric: str
    min: float | None = None
    max: float | None = None
    relative_to: str | None = None  # an earlier phase: the bar is on the difference from its value
    ratio_to: str | None = None  # an earlier phase: the bar is on the ratio to its value

    def met(self, value: float | None) -> bool:
        return value is not None and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def text(self) -> str:
        rel = f"- {self.relative_to}'s " if self.relative_to else f"/ {self.ratio_to}'s " if self.ratio_to else ""
        return rel + (f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}")

    def value(self, phases: dict[str, Any]) -> float | None:
        def of(phase: str) -> float | None:
            return (phases.get(phase, {}).get("final_metrics") or {}).get(self.metric)

        value = of(self.phase)
        other = self.relative_to or self.ratio_to
        if other is None or value is None:
            return value
        ref = of(other)
        if ref is None:
            return None
        return value - ref if self.relative_to else value / ref if ref else None


# The quality bars of each recipe (its issue's), scored on data the recipe never trains on:
# separation on mixtures of held-out voices and sentences; ASR on held-out sentences, spoken by
# training voices (test) and by voices of timbres no training voice uses (test_heldout).
BARS: dict[str, list[Bar]] = {
    "separation_tiny": [Bar("long", "eval/si_sdri", min=5.0)],
    "streaming_asr_tiny": [Bar("test", "eval/cer", max=0.25), Bar("test_heldout", "eval/cer", max=0.30)],
    # voice conversion on dev triples of held-out voices and sentences: the gates of configs/pipelines/vc_flow_tiny.yaml
    "vc_flow_tiny": [
        Bar("phase0", "eval/secs", min=0.6), Bar("phase1b", "eval/secs", min=0.7), Bar("phase1b", "eval/dnsmos", min=1.0),
        Bar("phase2", "eval/secs", min=0.75), Bar("phase2", "eval/secs_gain", min=0.10),
        Bar("phase2", "eval/mcd_ratio", max=0.8), Bar("phase2_rooms", "eval/secs", min=0.0, relative_to="phase1b_rooms"),
        Bar("distill_b", "eval/secs", min=-0.03, relative_to="phase2"),
        Bar("distill_b", "eval/dnsmos", min=-0.1, relative_to="phase2")],
    # song generation: on held-out singers' Spanish songs, the LoRA fine-tune's latent error at most 75% of the
    # base generator's (25% below it) on the same rows (every row's sketch as long as its latents: the sketch
    # phase's require_length_match stops the run otherwise)
    "music_lora_tiny": [Bar("lora_ft", "eval/latent_mse", max=0.75, ratio_to="base_es")],
    # step 1 extracts the target (held-out voices and sentences); step 2 uses the video (the wrong one costs at
    # least 3 dB and clearly more errors); step 3 lowers the second corpus's CER below step 2's
    "av_tse_asr_tiny": [Bar("tse", "eval/si_sdri", min=4.0),
                        Bar("swapped_video", "eval/si_sdri", max=-3.0, relative_to="multitask"),
                        Bar("swapped_video", "eval/cer", min=0.05, relative_to="multitask"),
                        Bar("zero_video", "eval/si_sdri", max=-3.0, relative_to="multitask"),
                        Bar("zero_video", "eval/cer", min=0.05, relative_to="multitask"),
                        Bar("ft_second_corpus", "eval/cer", max=-0.01, relative_to="multitask_second")],
}

# The longest a recipe's `raytrain run` may take on this CPU (its issue's bar), in seconds.
MAX_WALL_S: dict[str, float] = {"vc_flow_tiny": 1800.0, "music_lora_tiny": 1200.0, "av_tse_asr_tiny": 1800.0}

# Figures printed under a recipe's row besides its bars: (phase, metric).
FIGURES: dict[str, list[tuple[str, str]]] = {
    "vc_flow_tiny": [
        ("phase2", "eval/secs_cross"), ("phase2", "eval/secs_within"), ("phase2", "eval/secs_source"),
        ("phase2", "eval/mcd"), ("phase2", "eval/mcd_source"), ("phase1b_rooms", "eval/secs"),
        ("phase2_rooms", "eval/secs"), ("phase2", "eval/dnsmos"), ("distill_b", "eval/secs"),
        ("distill_b", "eval/dnsmos"), ("distill_b", "eval/mcd_ratio"), ("export", "eval/secs"),
        ("export", "export/secs_onnx"), ("export", "export/secs_int8"), ("export", "export/onnx_max_abs_diff"),
        ("export", "export/int8_max_abs_diff"), ("export", "export/int8_rel_error"),
        ("export", "export/rtf_torch"), ("export", "export/rtf_onnx"), ("export", "export/rtf_int8")],
    "music_lora_tiny": [
        ("autoencoder", "eval/mel_l1"), ("latents", "cache/forward_passes"), ("vq", "eval/loss"),
        ("sketch", "cache/length_checked"), ("sketch", "cache/en_dev_gen/sketch_usage"),
        ("sketch", "cache/en_dev_gen/sketch_perplexity"), ("sketch", "cache/es_dev_gen/sketch_usage"),
        ("sketch", "cache/es_dev_gen/sketch_perplexity"), ("generator", "eval/latent_mse"),
        ("base_es", "eval/latent_mse"), ("lora_ft", "eval/latent_mse")],
    "av_tse_asr_tiny": [
        ("pretrain", "eval/cer"), ("tse", "eval/si_sdri"), ("multitask", "eval/si_sdri"), ("multitask", "eval/cer"),
        ("multitask_second", "eval/si_sdri"), ("multitask_second", "eval/cer"), ("swapped_video", "eval/si_sdri"),
        ("swapped_video", "eval/cer"), ("zero_video", "eval/si_sdri"), ("zero_video", "eval/cer"),
        ("ft_second_corpus", "eval/cer"), ("ft_main", "eval/cer"), ("ft_main", "eval/si_sdri")],
}


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def prepare(name: str) -> float:
    """The recipe's shards, prepared where missing or stale; returns the seconds it took."""
    from datasets_prep.prep import run_prep

    t0 = time.perf_counter()
    run_prep(ROOT / "configs" / "prep" / f"{name}.yaml", root=ROOT)
    return time.perf_counter() - t0


def train(name: str, run_dir: Path) -> tuple[int, float, dict[str, Any]]:
    """`raytrain run` of the committed config, its output streamed to the terminal and `<run_dir>.log`;
    returns its exit code, wall seconds and summary.json."""
    return run_config(f"configs/pipelines/{name}.yaml", run_dir)


def run_config(config: str | Path, run_dir: Path) -> tuple[int, float, dict[str, Any]]:
    """`raytrain run CONFIG --run-dir RUN_DIR`, its output streamed to the terminal and `<run_dir>.log`;
    returns its exit code, wall seconds and summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # --ignore-gates: every phase runs and every bar is scored, met or not (a user's run stops at the first)
    cmd = [sys.executable, "-m", "raytrain.cli", "run", str(config), "--run-dir", str(run_dir), "--ignore-gates"]
    print("$ " + " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its progress lines as they come
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    path = run_dir / "summary.json"
    return rc, wall, json.loads(path.read_text()) if path.exists() else {}


def score(name: str, rc: int, wall: float, prep_s: float, summary: dict[str, Any], at: str = "") -> dict[str, Any]:
    """The recipe's row; `at`: the commit its run started from."""
    phases = summary.get("phases", {})
    bars = []
    for bar in BARS[name]:
        value = bar.value(phases)
        bars.append({"phase": bar.phase, "metric": bar.metric, "bar": bar.text(), "value": value,
                     "passed": bar.met(value)})
    return {"recipe": name, "commit": at or commit(), "status": summary.get("status", "no summary"), "rc": rc,
            "prep_s": round(prep_s, 1), "wall_s": round(wall, 1),
            "phases": [{"name": k, "status": v.get("status"), "steps": v.get("steps"), "wall_s": v.get("wall_s")}
                       for k, v in phases.items()],
            "bars": bars, "max_wall_s": MAX_WALL_S.get(name),
            "passed": rc == 0 and bars != [] and all(b["passed"] for b in bars)
            and wall <= MAX_WALL_S.get(name, float("inf")),
            "figures": {f"{ph} {m}": (phases.get(ph, {}).get("final_metrics") or {}).get(m)
                        for ph, m in FIGURES.get(name, [])}}


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'recipe':<20} {'result':<6} {'wall':>7}  {'phases (steps, wall s)':<64} bars")
    for r in rows:
        phases = ", ".join(f"{p['name']} {p['steps'] or 0} {p['wall_s'] or 0:.0f}s" for p in r["phases"])
        bars = "; ".join(f"{b['phase']} {b['metric']} "
                         f"{'missing' if b['value'] is None else format(b['value'], '.4g')} {b['bar']} "
                         f"{'ok' if b['passed'] else 'MISSED'}" for b in r["bars"])
        wall = f"{r['wall_s'] / 60:.1f}m" + (f"/{r['max_wall_s'] / 60:.0f}m" if r.get("max_wall_s") else "")
        print(f"{r['recipe']:<20} {'pass' if r['passed'] else 'FAIL':<6} {wall:>7}  {phases:<64} {bars}")
        for key, value in r.get("figures", {}).items():
            print(f"    {key:<40} {'missing' if value is None else format(value, '.4g')}")
    print(f"commit {rows[0]['commit'] if rows else commit()}; wall = `raytrain run` from start to exit "
          "(Ray start-up included, prep not)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", metavar="NAME", help=f"one or more of {', '.join(BARS)}")
    ap.add_argument("--all", action="store_true", help="every recipe")
    ap.add_argument("--runs-dir", default="runs/bench", help="where the run folders go (default runs/bench)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    names = list(BARS) if args.all else args.recipes
    unknown = [n for n in names if n not in BARS]
    if not names or unknown:
        ap.error(f"unknown recipe {unknown[0]!r}" if unknown else "name a recipe or pass --all")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.path.insert(0, str(ROOT))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for name in names:
        at = commit()  # the code the run starts from (a change made while it trains is not in it)
        prep_s = prepare(name)
        rc, wall, summary = train(name, (ROOT / args.runs_dir / f"{name}-{stamp}").resolve())
        rows.append(score(name, rc, wall, prep_s, summary, at))
        print_rows(rows[-1:])
    if len(rows) > 1:
        print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
