"""The driver side of the kinds that run in Ray Train workers (train, evaluate, distill).

`fit(ctx, kind)` builds the phase's `TorchTrainer` (datasets, scaling, checkpoints in the run folder or
`storage`), draws progress from rank 0's events, and turns Ray Train's last and best checkpoints into
the phase's `best/model.pt` and `last/model.pt` and its summary entry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from datasets_prep.storage import join, upload_file
from raytrain.checkpoints import STATE_FILE, WEIGHTS_FILE, atomic_torch_save, hand_off_report, load_data
from raytrain.phases.base import PhaseContext, PhaseKind, PipelineError
from raytrain.progress import EventPump
from raytrain.session import quiet_data_context, worker_resources


def train_names(phase: Any) -> list[str]:
    return [s.name for s in getattr(phase, "train", [])]


def _trainer_class(own_datasets: bool) -> Any:
    """Ray Train's TorchTrainer, leaner where its parts would do nothing.

    On a Ray that raytrain (or a test) started on this machine: no placement-group cleaner, a detached
    actor started at every phase that polls the dashboard's State API every second to remove the phase's
    placement group should the controller die (and a phase's end waits up to 2 s for it to stop). On a
    one-node Ray owned by the driver's process, a dead controller's placement group goes with the driver's
    job: the actor is a process (about 2.5 CPU-seconds) and a wait at every phase for nothing. It stays on a
    cluster (`RAY_ADDRESS`, or `ray job submit`), and in a Tune trial: there the driver (the sweep) outlives
    the trial's controller, and Ray removes a placement group only when both its creator and its job have
    ended, so each trial that ASHA stopped would keep its workers' CPUs reserved until the sweep hung.

    With `own_datasets` (one worker: nothing to split, the datasets travel in the worker's config): no
    datasets callback, whose dataset-manager actor would only hand the one worker each dataset's iterator
    (another ~2 CPU-s process at every phase's start)."""
    import os

    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    in_driver = ray.get_runtime_context().get_actor_id() is None  # not a Tune trial's actor
    drop: tuple[type, ...] = (PlacementGroupCleanerCallback,) if in_driver and not os.environ.get(
        "RAY_ADDRESS") else ()
    if own_datasets:
        drop += (DatasetsCallback,)
    if not drop:
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]  # Ray Train V2
            return [c for c in callbacks if not isinstance(c, drop)]

    return LeanTorchTrainer


def fit(ctx: PhaseContext, kind: PhaseKind) -> None:
    import ray.train

    from raytrain.data.datasets import phase_datasets
    from raytrain.phases import train_loop_per_worker
    from raytrain.phases.backend import LeanTorchConfig

    phase, entry = ctx.phase, ctx.entry
    use_gpu, resources, threads = worker_resources(ctx.pipe, phase)
    sc = ctx.pipe.phase_scaling(phase)
    _, mode = phase.best
    pump = EventPump(phase.name, kind.steps(phase), ctx.tracker, ctx.run_id, progress=ctx.progress)
    data_ctx = quiet_data_context()  # no progress bars: rank 0's progress line says what matters
    exec_opts = data_ctx.execution_options
    exec_opts.preserve_order = True  # same batch order every run: exact mid-phase resume
    datasets, held, audio = phase_datasets(ctx.datasets, train_names(phase), phase.eval, seed=ctx.pipe.seed,
                                           columns=ctx.plan.columns)
    own = sc.num_workers == 1  # nothing to split: the worker iterates the datasets itself (`dataset_shard`)
    given: dict[str, Any] = {}
    if own:
        import copy

        mine = {}
        for name, ds in datasets.items():  # what Ray Train's DataConfig does with a dataset it does not split
            ds = ds.copy(ds)
            ds.set_name(name)
            ds.context.execution_options = copy.deepcopy(exec_opts)
            mine[name] = ds
        given = {"datasets": mine, "data_context": copy.deepcopy(data_ctx)}
    trainer = _trainer_class(own)(
        train_loop_per_worker,
        torch_config=LeanTorchConfig(),  # no torch import in the Train controller (backend.py)
        train_loop_config={"pipeline": ctx.pipe.model_dump(mode="json"), "phase": phase.name, "kind": kind.name,
                           "phase_dir": str(ctx.phase_dir), "init": ctx.init, "events": pump.queue,
                           "threads": None if use_gpu else threads, "hold": held, "audio": audio,
                           "sample_rate": ctx.plan.sample_rate, "report_evals": ctx.report_evals,
                           **given, **kind_extras(ctx)},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=join(ctx.storage_dir, phase.name) if ctx.storage_dir
            else str(ctx.phase_dir.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score",
                                                         checkpoint_score_order=mode),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            callbacks=ctx.train_callbacks),
        datasets=None if own else datasets,
        # One worker reads each dataset whole: no split coordinator actor beside it.
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if sc.num_workers > 1 else [],
                                            execution_options=exec_opts),
    )
    t0 = time.time()
    try:
        with pump:
            result = trainer.fit()
    finally:
        entry.wall_s = round(entry.wall_s + time.time() - t0, 1)
    _weights_from(ctx, result)


def kind_extras(ctx: PhaseContext) -> dict[str, Any]:
    """What a kind adds to the worker's config: where its trained modules' `init_from` weights are and, in a
    distill phase, its teacher's."""
    extras: dict[str, Any] = {}
    inits = {}
    for name, module in getattr(ctx.phase, "modules", {}).items():
        init = module.init
        if init is not None:
            path = ctx.weights_of(init.phase, init.checkpoint) if init.phase is not None else init.path
            inits[name] = {"path": path, "rules": init.model_dump(mode="json")}
            folder = ctx.phase_dir / "modules" / name
            folder.mkdir(parents=True, exist_ok=True)
            for report in hand_off_report(module.model, inits[name], folder):
                ctx.tracker.artifact(ctx.run_id, report)
    if inits:
        extras["module_inits"] = inits
    teacher = getattr(ctx.phase, "teacher", None)
    if teacher is not None:
        path = ctx.weights_of(teacher.phase, teacher.checkpoint) if teacher.phase else teacher.path
        extras["teacher"] = {"path": path, "model": ctx.pipe.teacher_model(teacher).model_dump(mode="json")}
    return extras


def module_weights(weights: str | Path, name: str) -> Path:
    """The weights file of trained module `name` beside a phase's `model.pt`."""
    return Path(weights).parent / "modules" / f"{name}.pt"


def _lora_weights(ctx: PhaseContext, state: dict[str, Any], target: Path) -> None:
    """A LoRA phase's weights: merged into the base weights (`target`, the base model's names) and the
    adapter alone (`adapter.pt` beside it, with the settings and the base weights' path)."""
    from raytrain.lora import ADAPTER_FILE, adapter_file, merged_state
    from raytrain.models import build_model

    mcfg = ctx.pipe.phase_model(ctx.phase)
    base = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    atomic_torch_save(merged_state(base, ctx.phase.lora, state), target)
    init = ctx.init or {}
    atomic_torch_save(adapter_file(state, ctx.phase.lora, init.get("path", "")), target.parent / ADAPTER_FILE)
    if ctx.storage_dir:
        upload_file(target.parent / ADAPTER_FILE, join(ctx.storage_dir, ctx.phase.name, target.parent.name,
                                                      ADAPTER_FILE))


def _weights_from(ctx: PhaseContext, result: Any) -> None:
    phase, entry = ctx.phase, ctx.entry
    last = result.checkpoint
    if last is None:
        raise PipelineError(f"phase {phase.name!r} finished without a checkpoint")
    metric, mode = phase.best
    best = last
    if result.best_checkpoints:
        pick = max if mode == "max" else min
        best = pick(result.best_checkpoints, key=lambda cm: cm[1].get("score", 0.0))[0]
    final: dict[str, Any] = {}
    for label, ckpt in (("last", last), ("best", best)):
        with ckpt.as_directory() as d:
            state = load_data(Path(d) / STATE_FILE)
        target = ctx.phase_dir / label / WEIGHTS_FILE
        if getattr(phase, "lora", None) is not None:  # model.pt merged; adapter.pt beside it
            _lora_weights(ctx, state["model"], target)
        else:
            atomic_torch_save(state["model"], target)
        for name, module in state.get("modules", {}).items():  # beside it: modules/<name>.pt
            atomic_torch_save(module["model"], module_weights(target, name))
            if ctx.storage_dir:
                upload_file(module_weights(target, name), join(ctx.storage_dir, phase.name, label, "modules",
                                                               f"{name}.pt"))
        setattr(entry, f"{label}_checkpoint", str(target))
        if ctx.storage_dir:
            uri = join(ctx.storage_dir, phase.name, label, WEIGHTS_FILE)
            upload_file(target, uri)
            setattr(entry, f"{label}_checkpoint_uri", uri)
        if label == "last":
            final = state["metrics"]
            entry.steps = state["step"]
            entry.skipped_steps = state["skipped"]
    entry.final_metrics = {k: float(v) for k, v in final.items() if "/" in k}
    entry.best_metric = {metric: state["metrics"].get(metric)} if metric else {}
