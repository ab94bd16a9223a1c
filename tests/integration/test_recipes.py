"""Every recipe's configs/pipelines/<recipe>_tiny.yaml runs end to end, every phase, with its data
prepared by its own configs/prep/<recipe>_tiny.yaml (fewer voices and sentences) and its steps cut by
`-o` overrides, as a user would shorten a run (tests/integration/_recipes.py).

Quality is not measured here: `python bench/recipes.py NAME` trains the committed config to its bars.
tests/unit/test_configs_dir.py fails when a tiny pipeline has no entry in `RECIPES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain.checkpoints import load_weights

from ._recipes import RECIPES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe(recipe: str, recipe_run: Any) -> None:
    from mlflow.tracking import MlflowClient

    run = recipe_run(recipe)
    summary, cfg, run_dir, steps = run["summary"], run["cfg"], run["run_dir"], run["steps"]

    assert summary["status"] == "finished", summary.get("error")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert list(summary["phases"]) == [p.name for p in cfg.phases]
    client = MlflowClient(summary["mlflow_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "summary.json"}
    for phase in cfg.phases:
        entry, phase_dir = summary["phases"][phase.name], run_dir / phase.name
        assert entry["status"] == "finished", (phase.name, entry)
        assert entry["kind"] == phase.kind
        assert (phase_dir / "config.yaml").is_file()
        if phase.kind == "cache":  # every output dataset written, with its columns; later phases read them
            assert set(entry["datasets"]) == set(phase.datasets.values()) and entry["forward_passes"] > 0
            for folder in entry["datasets"].values():
                manifest = json.loads((Path(folder) / "_manifest.json").read_text())
                assert manifest["rows"] > 0 and set(phase.columns) <= set(manifest["roles"]), manifest["roles"]
            assert client.get_run(entry["mlflow_run_id"]).info.status == "FINISHED"
            continue
        metrics = entry["final_metrics"]
        assert phase.best[0] in metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
        for gate in entry["gates"]:
            assert gate["passed"], (phase.name, gate)
        mlrun = client.get_run(entry["mlflow_run_id"])
        assert mlrun.data.tags["mlflow.parentRunId"] == parent.info.run_id and mlrun.info.status == "FINISHED"
        assert phase.best[0] in mlrun.data.metrics
        arts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
        assert "config.yaml" in arts
        if phase.kind == "export":
            check_export(phase, entry, summary, arts, client, mlrun.info.run_id, run["root"],
                         separation=cfg.model.name != "vc_flow")
            if cfg.model.name == "vc_flow":
                check_vc_onnx_infer(Path(entry["files"]["onnx_int8"]), run["root"])
            continue
        assert entry["steps"] == (steps if phase.trains else 0), phase.name
        assert Path(entry["best_checkpoint"]).is_file() and Path(entry["last_checkpoint"]).is_file()
        if phase.init_from is not None:  # the hand-off: a load report, on disk and in MLflow
            report = json.loads((phase_dir / "load_report.json").read_text())
            assert report["loaded"], (phase.name, report)
            assert {"load_report.json", "load_report.txt"} <= arts
        if phase.trains:  # every step trained and logged (log_every=1)
            assert len(client.get_metric_history(mlrun.info.run_id, "train/loss")) == steps, phase.name
        else:  # an evaluate phase scores the weights it was given, unchanged
            assert phase.init is not None and phase.init.phase is not None
            source = summary["phases"][phase.init.phase]["best_checkpoint"]
            scored, given = load_weights(entry["last_checkpoint"]), load_weights(source)
            assert all(torch.equal(scored[k], given[k]) for k in given)
    if cfg.model.name == "vc_flow":
        check_vc_infer(run_dir, run["root"])


def vc_files(root: Path) -> tuple[Path, Path]:
    """A reference (a female voice) and a source (a male voice) spoken by espeak-ng."""
    import shutil
    import subprocess

    ref, src = root / "infer_ref.wav", root / "infer_src.wav"
    if not ref.is_file():
        exe = shutil.which("espeak-ng")
        assert exe, "espeak-ng is installed by `make test` (apt)"
        subprocess.run([exe, "-v", "en+f3", "-w", str(ref), "please call stella and ask her"], check=True)
        subprocess.run([exe, "-v", "en+m1", "-w", str(src), "the quick brown fox jumps over the dog"], check=True)
    return ref, src


def check_vc_infer(run_dir: Path, root: Path) -> None:
    """`raytrain infer RUN --ref`: the run's last trained phase (the student) converts a file, with --steps."""
    import soundfile as sf

    from raytrain.cli import main

    ref, src = vc_files(root)
    assert main(["infer", str(run_dir), "--ref", str(ref), str(src), "-o", str(root / "vc_out"), "--steps", "1"]) == 0
    wave, sr = sf.read(str(root / "vc_out" / "infer_src_to_infer_ref.wav"))
    assert sr == 16000 and len(wave) > sr


def check_vc_onnx_infer(onnx: Path, root: Path) -> None:
    """`raytrain infer model.int8.onnx --ref`: the exported student converts a file; --steps is refused (fixed
    at export)."""
    import soundfile as sf

    from raytrain.cli import main

    ref, src = vc_files(root)
    out = root / "vc_onnx_out"
    assert main(["infer", str(onnx), "--ref", str(ref), str(src), "-o", str(out)]) == 0
    wave, sr = sf.read(str(out / "infer_src_to_infer_ref.wav"))
    assert sr == 16000 and len(wave) > sr and float(abs(wave).max()) > 0.1
    assert main(["infer", str(onnx), "--ref", str(ref), str(src), "-o", str(out), "--steps", "4"]) == 2


def check_export(phase: Any, entry: dict[str, Any], summary: dict[str, Any], arts: set[str], client: Any,
                 run_id: str, root: Path, separation: bool) -> None:
    """An export phase: its files on disk and in MLflow, parity within its tolerances, the metric and RTF of
    each export, and `raytrain infer` on the .onnx writing what torch writes."""
    import numpy as np
    import soundfile as sf

    from raytrain.cli import main

    m = entry["final_metrics"]
    files = entry["files"]
    assert Path(files["onnx"]).is_file() and "best_checkpoint" not in entry  # it writes files, no weights
    assert m["export/onnx_max_abs_diff"] <= phase.tolerance["fp32"]
    names = ["torch", "onnx"]
    if phase.int8:
        assert Path(files["onnx_int8"]).is_file() and m["export/int8_max_abs_diff"] <= phase.tolerance["int8"]
        names.append("int8")
    for name in names:
        assert m[f"export/rtf_{name}"] > 0
        if name != "torch":
            metric = phase.best[0].removeprefix("eval/")
            assert f"export/{metric}_{name}" in m, m
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {f"export/{Path(f).name}" for f in files.values()} <= exported, (exported, arts)
    if not separation:
        return
    # raytrain infer: the .onnx and the torch weights it came from write the same sources
    source = summary["phases"][phase.init.phase]["best_checkpoint"]
    wav = root / "infer_in.wav"
    rng = np.random.default_rng(0)
    sf.write(str(wav), (0.1 * rng.standard_normal(8000 + 37)).astype("float32"), 8000, subtype="PCM_16")
    outs = {}
    for label, model in (("torch", source), ("onnx", files["onnx"])):
        out = root / f"infer_{label}"
        assert main(["infer", model, str(wav), "-o", str(out)]) == 0
        outs[label] = {p.name: sf.read(str(p))[0] for p in sorted(out.glob("*.wav"))}
    assert outs["torch"].keys() == outs["onnx"].keys() and len(outs["torch"]) == 2
    for name, ref in outs["torch"].items():
        assert np.max(np.abs(ref - outs["onnx"][name])) <= 2e-3  # PCM16 steps (3e-5) plus the fp32 tolerance
