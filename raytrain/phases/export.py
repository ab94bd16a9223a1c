"""`export`: a phase's weights as ONNX (dynamic batch and time), optionally int8 and TorchScript, checked.

No Ray Train: the driver loads the weights (`init_from`), reads the `eval` dataset through the phase's
`eval_transforms`, writes `<phase>/model.onnx` (and `model.int8.onnx`, `model.ts`), and checks each file
against torch on the first `parity_batches` batches: a max abs difference over its `tolerance` fails the
phase. It then scores the phase's `metrics` on the whole eval set with torch, ONNX fp32 and ONNX int8, and
times each on the parity batches at `threads` CPU threads (real-time factor: seconds of compute per second
of audio). A model whose forward does more than its graph (vc_flow: Griffin-Lim after the sampler) is timed
on the graph (`export_forward`) at every precision and scored with the rest added (`export_finish`). Files and
figures go to MLflow; `raytrain infer` runs the `.onnx` like torch weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from raytrain.config.schema import ExportPhaseConfig, PipelineConfig
from raytrain.phases.base import PhaseContext, PhaseKind, PipelineError, register_kind

if TYPE_CHECKING:
    from raytrain.plan import PhasePlan


def eval_batches_local(ctx: PhaseContext, phase: ExportPhaseConfig) -> list[dict[str, torch.Tensor]]:
    """The eval dataset's batches as the workers of an evaluate phase collate them, read on the driver."""
    from datasets_prep.shards import read_manifest
    from raytrain.data.datasets import audio_spec, read_dataset
    from raytrain.data.stream import Collate, build_transforms

    path = ctx.datasets[str(phase.eval)][0]
    manifest = read_manifest(path)
    transforms = build_transforms([t.model_dump() for t in phase.eval_transforms], int(ctx.plan.sample_rate or 0),
                                  ctx.pipe.seed + 1)
    collate = Collate(transforms, epoch=0, audio=audio_spec(manifest))
    ds = read_dataset(path, manifest)
    return [collate(b) for b in ds.iter_batches(batch_size=phase.scored_batch_size, batch_format="numpy")]


def score(model: Callable[[dict[str, torch.Tensor]], Any], metrics: list[str],
          batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """`eval/<metric>` over the batches, summed as an evaluate phase sums them (rates as num/den)."""
    from raytrain.metrics import METRICS, MetricTotals

    fns = [METRICS.get(m) for m in metrics]
    totals = MetricTotals()
    count = 0
    with torch.no_grad():
        for batch in batches:
            out = {k: torch.as_tensor(v).float() if torch.is_floating_point(torch.as_tensor(v)) else torch.as_tensor(v)
                   for k, v in model(batch).items()}
            for fn in fns:
                totals.add(fn(out, batch))
            count += int(next(iter(batch.values())).shape[0])
    return totals.means(count)


class ExportKind(PhaseKind):
    name = "export"
    config = ExportPhaseConfig

    def check(self, pipe: PipelineConfig, phase: Any, plan: PhasePlan, where: str) -> list[str]:
        from raytrain.models import build_model

        mcfg = pipe.phase_model(phase)
        try:
            with torch.device("meta"):
                model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
        except Exception:  # noqa: BLE001 - the shared checks report a model that cannot be built
            return []
        if getattr(model, "export_spec", None) is None:
            return [f"{where}: model {mcfg.name!r} has no export_spec (which batch keys go in and which outputs "
                    "come out), so it cannot be exported; give its class an `export_spec` "
                    "(raytrain.export.ExportSpec)"]
        return []

    def plan_lines(self, pipe: PipelineConfig, plan: PhasePlan) -> list[str]:
        ph = plan.phase
        files = ["onnx fp32", *(["onnx int8"] if ph.int8 else []), *(["torchscript"] if "torchscript" in ph.formats
                                                                       else [])]
        tol = ", ".join(f"{k} {v:g}" for k, v in ph.tolerance.items()
                        if k == "fp32" or (k == "int8" and ph.int8) or (k == "torchscript" and "torchscript" in ph.formats))
        return [f"    exports  {', '.join(files)}; parity on {ph.parity_batches} eval batches (max abs diff: {tol})",
                f"    metrics  {', '.join(ph.metrics) or '-'} for torch and each export; RTF at {ph.threads} thread(s)"]

    def run(self, ctx: PhaseContext) -> None:
        from raytrain.export import (
            OnnxModel,
            export_onnx,
            export_spec,
            export_torchscript,
            finish_exported,
            graph_forward,
            output_errors,
            quantize_int8,
            real_time_factor,
        )
        from raytrain.infer import from_weights

        phase: ExportPhaseConfig = ctx.phase
        entry = ctx.entry
        t0 = time.time()
        assert ctx.init is not None
        model = from_weights(ctx.pipe.phase_model(phase), ctx.init["path"])
        batches = eval_batches_local(ctx, phase)
        if not batches:
            raise PipelineError(f"export {phase.name!r}: eval dataset {phase.eval!r} has no rows")
        parity = batches[: phase.parity_batches]
        meta = {"raytrain.pipeline": ctx.pipe.name, "raytrain.phase": phase.name,
                "raytrain.weights": str(ctx.init["path"])}
        files: dict[str, str] = {}
        figures: dict[str, float] = {}
        # What each precision computes: the graph (timed, and compared with torch's), and the graph completed as
        # the model's forward completes it (a vocoder outside the graph), which the metrics score.
        runners: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {"torch": graph_forward(model)}
        onnx = export_onnx(model, parity[0], ctx.phase_dir / "model.onnx", metadata=meta)
        files["onnx"] = str(onnx)
        runners["onnx"] = OnnxModel(onnx, intra_op_num_threads=phase.threads)
        checks = [("fp32", "onnx")]
        if phase.int8:
            int8 = quantize_int8(onnx, ctx.phase_dir / "model.int8.onnx", op_types=phase.int8_ops)
            files["onnx_int8"] = str(int8)
            runners["int8"] = OnnxModel(int8, intra_op_num_threads=phase.threads)
            checks.append(("int8", "int8"))
        if "torchscript" in phase.formats:
            ts = export_torchscript(model, parity[0], ctx.phase_dir / "model.ts", metadata=meta)
            files["torchscript"] = str(ts)
            scripted = torch.jit.load(str(ts))
            spec = export_spec(model)
            runners["torchscript"] = lambda b: dict(zip(spec.outputs, scripted(*[b[k] for k in spec.inputs]),
                                                        strict=True))
            checks.append(("torchscript", "torchscript"))
        def completed(fn: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[dict[str, torch.Tensor]], Any]:
            return lambda b: finish_exported(model, fn(b), b)

        scored = {name: model if name == "torch" else completed(fn) for name, fn in runners.items()}
        entry.files = files
        failed = []
        for precision, name in checks:
            diff, rel = output_errors(model, runners[name], parity)
            figures[f"export/{name}_max_abs_diff"] = diff
            if name != "onnx":
                figures[f"export/{name}_rel_error"] = rel
            if diff > phase.tolerance.get(precision, float("inf")):
                failed.append(f"{name}: max abs diff {diff:.3g} > tolerance {phase.tolerance[precision]:g}")
        threads = torch.get_num_threads()
        torch.set_num_threads(phase.threads)
        try:
            sr = float(ctx.plan.sample_rate or getattr(model, "sample_rate", 0) or 1)
            for name, fn in runners.items():
                if phase.metrics:
                    got = score(scored[name], phase.metrics, batches)
                    figures.update(got if name == "torch" else {f"export/{k.removeprefix('eval/')}_{name}": v
                                                                for k, v in got.items()})
                with torch.no_grad():
                    figures[f"export/rtf_{name}"] = real_time_factor(fn, parity, sr)
        finally:
            torch.set_num_threads(threads)
        entry.final_metrics = figures
        entry.wall_s = round(entry.wall_s + time.time() - t0, 1)
        ctx.tracker.metrics(ctx.run_id, figures, 0)
        for path in files.values():
            ctx.tracker.artifact(ctx.run_id, path, "export")
        rows = [f"  {name:<12} rtf {figures[f'export/rtf_{name}']:.4f}"
                + (f"  max abs diff {figures[f'export/{name}_max_abs_diff']:.3g}" if name != "torch" else "")
                for name in runners]
        print(f"export {phase.name}: " + ", ".join(files.values()) + "\n" + "\n".join(rows))
        if failed:
            raise PipelineError(f"export {phase.name!r}: parity against torch failed: {'; '.join(failed)}. "
                                "Raise `tolerance` for that precision if the difference is expected (int8), "
                                "or check the model's export_spec")


register_kind(ExportKind)
