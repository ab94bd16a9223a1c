"""The worker loop of a `train` phase (runs inside each Ray Train worker).

Lifecycle: setup (model, init_from, freeze, optimizer, resume) -> steps (grad
accumulation, AMP, clipping, NaN/Inf guard, schedule) -> periodic eval (reduced
across ranks) -> checkpoints through `ray.train.report`. Rank 0 sends progress and
metrics to the driver through an event queue; the driver draws the progress bar and
logs to MLflow, so the hot loop never waits on a tracking server.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from datasets_prep.faults import pause_point
from raytrain.checkpoints import STATE_FILE, apply_freeze, load_data, load_into, load_weights
from raytrain.config.schema import InitFromConfig, PipelineConfig, TrainPhaseConfig
from raytrain.data.stream import BatchStream, build_transforms, eval_batches
from raytrain.losses import LOSSES
from raytrain.metrics import METRICS, MetricTotals
from raytrain.models import build_model
from raytrain.optim import build_optimizer, build_scheduler
from raytrain.phases.base import DatasetUse, Needs, PhaseContext, PhaseKind, Produces, register_kind

if TYPE_CHECKING:
    from raytrain.plan import PhasePlan


@functools.cache
def _keywords(fn: Any) -> frozenset[str]:
    """The keyword parameters a loss takes beyond (outputs, batch)."""
    try:
        return frozenset(list(inspect.signature(fn).parameters)[2:])
    except (TypeError, ValueError):
        return frozenset()


class NonFiniteLossError(RuntimeError):
    pass


class ReplicaDivergenceError(RuntimeError):
    """DDP replicas hold different weights, so each rank trains a different model from here on."""


def param_digest(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[int], torch.Tensor]:
    """(names, numels, digest): digest is `(n, 2)` float64, each parameter's sum and L2 norm. Replicas
    with equal weights have equal digests; a few floats per parameter are cheap to all-reduce."""
    names, numels, rows = [], [], []
    for name, p in named:
        x = p.detach()
        names.append(name)
        numels.append(x.numel())
        rows.append(torch.stack([x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64)]))
    return names, numels, torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.float64)


def digest_mismatches(names: list[str], numels: list[int], hi: torch.Tensor, lo: torch.Tensor,
                      rtol: float = 1e-9) -> list[tuple[str, str]]:
    """(name, how it differs) of each parameter whose digest differs between ranks; `hi`/`lo` are the
    element-wise max/min of every rank's `param_digest`. Equal weights summed in another order (another
    thread count or device) differ by about 1e-16 x sqrt(numel) x norm, far below `rtol`; a digest that is
    finite on some ranks only is a mismatch too."""
    hi, lo = hi.detach().double().cpu(), lo.detach().double().cpu()
    n = torch.tensor(numels, dtype=torch.float64).reshape(-1, 1)
    finite_hi, finite_lo = torch.isfinite(hi), torch.isfinite(lo)
    finite = finite_hi & finite_lo
    scale = torch.where(finite, hi[:, 1:].abs().maximum(lo[:, 1:].abs()), 0.0)  # the norm column
    tol = rtol * scale * torch.cat([n.sqrt(), torch.ones_like(n)], dim=1)  # |sum| <= sqrt(n) x norm
    gap = torch.where(finite, hi - lo, 0.0)
    bad = ((gap > tol) | (finite_hi != finite_lo)).any(dim=1)
    return [(names[i], f"sum {lo[i, 0].item():.9g} .. {hi[i, 0].item():.9g}, "
                       f"norm {lo[i, 1].item():.9g} .. {hi[i, 1].item():.9g}") for i in bad.nonzero().flatten().tolist()]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain types, so a checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 on request, nothing on CPU unless asked."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP wraps the model as .module
    return inner if isinstance(inner, torch.nn.Module) else model


class _Reducer:
    """Sums tensors across ranks (no-op with one worker)."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def extremes(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(element-wise max, element-wise min) of `values` over ranks, in one all_reduce."""
        if self.world == 1:
            return values, values
        both = torch.cat([values, -values]).to(self.device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        return both[:len(values)], -both[len(values):]

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())


class TrainedModule:
    """A module a phase trains beside its model (`modules:` in the phase config): its weights, optimizer,
    schedule and scaler, and the DDP wrapper its own updates go through. The model's losses call the bare
    module with its parameters frozen, so the model's update never touches it."""

    def __init__(self, name: str, cfg: Any, module: torch.nn.Module, max_steps: int, amp: torch.dtype | None,
                 device: torch.device) -> None:
        from raytrain.optim import lr_factor, make_optimizer

        self.name, self.cfg, self.module = name, cfg, module
        self.opt = make_optimizer([{"params": [p for p in module.parameters() if p.requires_grad]}], cfg.optim)
        horizon = cfg.total_updates(max_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg.schedule, horizon))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.loss_fns = {n: (LOSSES.get(n), w) for n, w in cfg.losses.items()}
        self.wrapped: torch.nn.Module = module
        self.updates, self.skipped = 0, 0
        self._trainable = [p for p in module.parameters() if p.requires_grad]

    def due(self, step: int) -> bool:
        """Whether this module updates after the model's step number `step` (1-based)."""
        return step % self.cfg.every == 0

    def trainable(self, on: bool) -> None:
        for p in self._trainable:
            p.requires_grad_(on)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "updates": self.updates, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])


def build_modules(phase: Any, inits: dict[str, dict[str, Any]], fresh: bool, device: torch.device,
                  amp: torch.dtype | None = None) -> dict[str, TrainedModule]:
    """A phase's `modules:`, built in config order after its model (seeded, so every rank builds the same
    weights) and, on a fresh start, loaded from `inits[name]` (`{"path", "rules"}`: their `init_from`)."""
    out = {}
    for name, mcfg in getattr(phase, "modules", {}).items():
        module = build_model(mcfg.model.name, dict(mcfg.model.args), mcfg.model.adapter)
        init = inits.get(name)
        if fresh and init:
            load_into(module, load_weights(init["path"]), InitFromConfig(**init["rules"]), init["path"])
        module.to(device)
        out[name] = TrainedModule(name, mcfg, module, phase.max_steps, amp, device)
    return out


class PhaseRunner:
    """One phase on one worker. `run()` is the whole lifecycle."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.pipe = PipelineConfig.model_validate(config["pipeline"])
        self.phase: Any = self.pipe.phase(config["phase"])
        self.device = ray.train.torch.get_device()
        self.events = config.get("events") if self.rank == 0 else None
        self.reduce = _Reducer(self.world, self.device)
        self.eval_step = -1  # the step of the last evaluation
        self.modules: dict[str, TrainedModule] = {}  # `modules:` of a train or distill phase (setup_kind)

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:

        phase = self.phase
        for name in ("ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.device.type == "cpu":
            if self.cfg.get("threads"):
                torch.set_num_threads(int(self.cfg["threads"]))
            torch.set_flush_denormal(True)  # denormal floats can make CPU kernels much slower
        seed_everything(self.pipe.seed * 1000 + self.rank)
        mcfg = self.pipe.phase_model(phase)
        model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
        self.setup_kind(model)

    def setup_kind(self, model: torch.nn.Module) -> None:
        """A train (or distill) phase: init_from, freeze, optimizer, resume, data stream."""
        import ray.train
        import ray.train.torch

        phase = self.phase
        ckpt = ray.train.get_checkpoint()
        init = self.cfg.get("init")
        if ckpt is None and init:
            load_into(model, load_weights(init["path"]), InitFromConfig(**init["rules"]), init["path"])
        if getattr(phase, "lora", None) is not None:  # after init_from: the base weights keep their names
            from raytrain.lora import add_lora

            add_lora(model, phase.lora, f"phases.{phase.name}.lora")
        apply_freeze(model, phase, f"phases.{phase.name}")
        model.to(self.device)
        self.opt = build_optimizer(model, phase, f"phases.{phase.name}")
        self.sched = build_scheduler(self.opt, phase)
        self.amp = autocast_dtype(phase.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.modules = self._build_modules(ckpt is None)
        self.step, self.skipped, self.best, position = 0, 0, None, None
        self.rows, self.rows_steps = 0, 0  # rows drawn in, and count of, this worker's applied steps
        self.last_eval: dict[str, float] = {}
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = load_data(Path(d) / STATE_FILE)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.skipped, self.best = state["step"], state["skipped"], state["best"]
            self.last_eval = state.get("last_eval", {})
            for name, m in self.modules.items():
                m.load_state_dict(state["modules"][name])
            position = state["data_position"][self.rank] if self.rank < len(state["data_position"]) else None
            set_rng_state(state["rng"][min(self.rank, len(state["rng"]) - 1)])
            self._emit("log", message=f"resumed phase {phase.name!r} at step {self.step}")
        self.model = ray.train.torch.prepare_model(model)
        for m in self.modules.values():
            m.wrapped = ray.train.torch.prepare_model(m.module, move_to_device=False)
            m.trainable(False)  # trainable only inside its own updates
        self.loss_fns = {name: (LOSSES.get(name), w) for name, w in phase.losses.items()}
        self.metric_fns = [METRICS.get(m) for m in phase.metrics]
        sr = int(self.cfg["sample_rate"] or 0)
        shards = {n.name: self.dataset_shard(f"train:{n.name}") for n in phase.train}
        audio = self.cfg.get("audio", {})  # dataset key -> audio_spec (stored format, decoded in the collate)
        self.eval_audio = audio.get("eval")
        self.stream = BatchStream(
            shards, {n.name: n.weight for n in phase.train}, batch_size=phase.batch_size,
            transforms=build_transforms([t.model_dump() for t in phase.transforms], sr, self.pipe.seed),
            seed=self.pipe.seed, shuffle_buffer=phase.shuffle_buffer, position=position,
            hold=set(self.cfg.get("hold", [])),
            audio={n.name: audio[f"train:{n.name}"] for n in phase.train if f"train:{n.name}" in audio})
        self.eval_shard = self.dataset_shard("eval") if phase.eval else None
        self._eval_cache: list[dict[str, torch.Tensor]] | None = None
        self.eval_transforms = build_transforms([t.model_dump() for t in phase.eval_transforms], sr,
                                                self.pipe.seed + 1)

    def dataset_shard(self, name: str) -> Any:
        """This worker's iterator of dataset `name`: Ray Train's shard, or (one worker, no split: the driver
        passed the datasets in the config, `raytrain.phases.ray_train`) the dataset's own iterator."""
        import ray.train

        given = self.cfg.get("datasets")
        if given is None:
            return ray.train.get_dataset_shard(name)
        if "data_context" in self.cfg and not getattr(self, "_data_context_set", False):
            from ray.data import DataContext

            DataContext._set_current(self.cfg["data_context"])  # as Ray Train sets the driver's on its workers
            self._data_context_set = True
        return given[name].iterator()

    def _build_modules(self, fresh: bool) -> dict[str, TrainedModule]:
        return build_modules(self.phase, self.cfg.get("module_inits") or {}, fresh, self.device, self.amp)

    # ---- helpers -----------------------------------------------------------------------------------
    def _group_lrs(self) -> dict[str, float]:
        """{label: lr} of each param group when there are several (label: its pattern, MLflow-safe)."""
        groups = self.opt.param_groups
        if len(groups) < 2:
            return {}
        out = {}
        for i, g in enumerate(groups):
            label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(g.get("pattern", i))).strip("._") or "rest"
            out[label if label != "default" else "rest"] = float(g["lr"])
        return out

    def _emit(self, kind: str, **payload: Any) -> None:
        if self.events is not None:
            with contextlib.suppress(Exception):
                self.events.put_nowait({"kind": kind, "phase": self.phase.name, **payload})

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def loss_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra keyword arguments for the losses that take them: `modules` (the phase's trained modules,
        bare) and, in a distill phase, `teacher`."""
        return {"modules": {n: m.module for n, m in self.modules.items()}} if self.modules else {}

    @staticmethod
    def _apply(loss_fns: dict[str, tuple[Any, float]], out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
               extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {name: fn(out, batch, **{k: v for k, v in extra.items() if k in _keywords(fn)})
                for name, (fn, _) in loss_fns.items()}

    def _call_losses(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._apply(self.loss_fns, out, batch, self.loss_inputs(batch))

    def _losses(self, batch: dict[str, torch.Tensor], keep: list[Any] | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss and its parts; with `keep`, appends (batch, detached outputs, loss inputs) for
        the modules' updates."""
        with self._autocast():
            out = self.model(batch)
        out = {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()}
        extra = self.loss_inputs(batch)
        parts = self._apply(self.loss_fns, out, batch, extra)
        total = sum(w * parts[name] for name, (_, w) in self.loss_fns.items())
        if keep is not None:
            keep.append((batch, {k: v.detach() for k, v in out.items()}, extra))
        return total, parts  # type: ignore[return-value]

    def module_step(self, m: TrainedModule, micro: list[Any]) -> dict[str, float]:
        """`m.cfg.updates_per_step` updates of module `m` on the step's micro-batches (accumulated like the
        model's); a non-finite update is skipped on every rank."""
        losses_sum = {n: 0.0 for n in m.loss_fns}
        total_sum, applied = 0.0, 0
        m.trainable(True)
        m.module.train()
        try:
            for _ in range(m.cfg.updates_per_step):
                m.opt.zero_grad(set_to_none=True)
                total = 0.0
                for i, (batch, out, extra) in enumerate(micro):
                    views = {**extra.get("modules", {}), m.name: m.wrapped}
                    sync = (contextlib.nullcontext() if i == len(micro) - 1 or self.world == 1
                            else m.wrapped.no_sync())  # type: ignore[operator]
                    with sync:
                        with self._autocast():
                            parts = self._apply(m.loss_fns, out, batch, {**extra, "modules": views})
                        loss = sum(w * parts[n].float() for n, (_, w) in m.loss_fns.items())
                        m.scaler.scale(loss / len(micro)).backward()  # type: ignore[union-attr]
                    total += float(loss.detach()) / len(micro)
                    for n, v in parts.items():
                        losses_sum[n] += float(v.detach()) / len(micro)
                finite = math.isfinite(total)
                if m.cfg.grad_clip is not None:
                    m.scaler.unscale_(m.opt)
                    norm = torch.nn.utils.clip_grad_norm_(m._trainable, m.cfg.grad_clip)
                    finite = finite and bool(torch.isfinite(norm))
                if not self.reduce.all_true(finite):
                    m.opt.zero_grad(set_to_none=True)
                    if m.scaler.is_enabled():
                        m.scaler.update()
                    m.skipped += 1
                    self._emit("log", message=f"step {self.step}: module {m.name!r}: non-finite loss or gradient, "
                                              "update skipped")
                    continue
                m.scaler.step(m.opt)
                m.scaler.update()
                m.sched.step()
                m.updates += 1
                applied += 1
                total_sum += total
        finally:
            m.opt.zero_grad(set_to_none=True)
            m.trainable(False)
        if not applied:
            return {}
        out_metrics = {f"train/{m.name}/loss": total_sum / applied, f"train/{m.name}/lr": float(m.sched.get_last_lr()[0])}
        if len(m.loss_fns) > 1:
            n_all = m.cfg.updates_per_step
            out_metrics.update({f"train/{m.name}/{n}": v / n_all for n, v in losses_sum.items()})
        return out_metrics

    # ---- steps -------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float] | None:
        """One optimizer step over `grad_accum` micro-batches; None if the step was skipped."""
        phase = self.phase
        self.model.train()
        for m in self.modules.values():
            m.module.train()
        self.opt.zero_grad(set_to_none=True)
        total, parts_sum = torch.zeros((), device=self.device), {n: 0.0 for n in self.loss_fns}
        part_vals: dict[str, torch.Tensor] = {}
        rows = 0
        due = [m for m in self.modules.values() if m.due(self.step + 1)]
        keep: list[Any] | None = [] if due else None
        for micro in range(phase.grad_accum):
            t_wait = time.perf_counter()
            batch = next(self.stream)
            rows += int((batch["lengths"] if "lengths" in batch else next(iter(batch.values()))).shape[0])
            batch = self._to_device(batch)
            self.data_wait_s += time.perf_counter() - t_wait
            last = micro == phase.grad_accum - 1
            # DDP: no gradient all-reduce on accumulation steps, only on the last micro-batch.
            sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()  # type: ignore[operator]
            with sync:
                loss, part_vals = self._losses(batch, keep)
                self.scaler.scale(loss / phase.grad_accum).backward()
            total = total + loss.detach() / phase.grad_accum
            if len(part_vals) > 1:  # per-loss values only matter in multi-task phases
                for n, v in part_vals.items():
                    parts_sum[n] += float(v.detach()) / phase.grad_accum
        loss_value = float(total)
        finite = math.isfinite(loss_value)
        if phase.grad_clip is not None:
            self.scaler.unscale_(self.opt)
            params = [p for g in self.opt.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
            finite = finite and bool(torch.isfinite(norm))
        if not self.reduce.all_true(finite):
            self.opt.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            return None
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        self.rows, self.rows_steps = self.rows + rows, self.rows_steps + 1
        out = {"train/loss": loss_value}
        if len(part_vals) > 1:
            out.update({f"train/{n}": v for n, v in parts_sum.items()})
        for m in due:
            out.update(self.module_step(m, keep or []))
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the eval set; sums and counts are reduced across ranks."""
        if self.eval_shard is None:
            return {}
        self.model.eval()
        for m in self.modules.values():
            m.module.eval()
        bs = self.phase.eval_batch_size or self.phase.batch_size
        totals = MetricTotals()
        if self.loss_fns:
            totals.sums["loss"] = 0.0
        count = 0
        if self._eval_cache is None:
            batches = eval_batches(self.eval_shard, bs, self.eval_transforms, self.eval_audio)
            if self.phase.cache_eval:  # eval sets are small: read and collate them once per phase
                self._eval_cache = list(batches)
                batches = iter(self._eval_cache)
        else:
            batches = iter(self._eval_cache)
        for batch in batches:
            batch = self._to_device(batch)
            n = int(next(iter(batch.values())).shape[0])
            with self._autocast():
                out = self.model(batch)
            out = {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()}
            if self.loss_fns:
                parts = self._call_losses(out, batch)
                loss = sum(w * parts[name] for name, (_, w) in self.loss_fns.items())
                totals.sums["loss"] += float(loss) * n
            for fn in self.metric_fns:
                totals.add(fn(out, batch))
            count += n
        keys, den_keys, values = totals.flat()
        reduced = self.reduce.sum([*values, float(count)])
        return MetricTotals.from_flat(keys, den_keys, reduced[:-1]).means(reduced[-1])

    def check_replicas(self) -> None:
        """Fail if DDP replicas hold different weights (every rank raises together: the verdict is
        computed from all-reduced digests)."""
        named = [*unwrap(self.model).named_parameters(),
                 *((f"modules.{n}.{k}", p) for n, m in self.modules.items() for k, p in m.module.named_parameters())]
        names, numels, digest = param_digest(named)
        bad = digest_mismatches(names, numels, *self.reduce.extremes(digest))
        if bad:
            (name, how), others = bad[0], [n for n, _ in bad[1:]]
            more = (f"; {len(others)} more differ: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
                    if others else "")
            raise ReplicaDivergenceError(
                f"DDP replicas diverged at step {self.step}: parameter {name} differs between ranks ({how}{more}); "
                "this is a bug or a non-deterministic frozen/unused-parameter setup (weights changed outside "
                "the optimizer, or a rank-dependent model)")

    def save(self, metrics: dict[str, float]) -> None:
        """All ranks report; rank 0 attaches the checkpoint (positions and RNG of every rank). With several
        workers the replicas are checked first: a diverged model is not checkpointed."""
        import ray.train

        if self.world > 1:
            self.check_replicas()
        if self.rows_steps:  # rows of all ranks and micro-batches per optimizer step, as trained
            metrics = {**metrics, "perf/samples_per_step": self.reduce.sum([float(self.rows)])[0] / self.rows_steps}
        positions = [self.stream.position()]
        if len(self.stream.names) > 1:  # a mixture of datasets: the batches each gave so far, all ranks
            counts = self.reduce.sum([float(self.stream.batches[n]) for n in self.stream.names])
            metrics = {**metrics, **{f"data/batches/{n}": c for n, c in zip(self.stream.names, counts, strict=True)}}
        rngs = [rng_state()]
        if self.world > 1:
            gathered_pos: list[Any] = [None] * self.world
            gathered_rng: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered_pos, positions[0])
            torch.distributed.all_gather_object(gathered_rng, rngs[0])
            positions, rngs = gathered_pos, gathered_rng
        metric, mode = self.phase.best
        value = self.last_eval.get(metric, metrics.get(metric))
        score = value if value is not None else (-1e30 if mode == "max" else 1e30)
        report = {**metrics, **self.last_eval, "step": self.step, "score": score, "skipped_steps": self.skipped}
        if self.eval_step == self.step:  # fresh eval metrics (a sweep's scheduler reads only those)
            report["eval_step"] = self.step
        if self.rank != 0:
            ray.train.report(report)
            return
        state = {
            "model": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
            "skipped": self.skipped, "best": self.best, "last_eval": self.last_eval,
            "rng": rngs, "data_position": positions, "metrics": report,
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self._emit("checkpoint", step=self.step)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        phase = self.phase
        start_step = self.step
        last_log = (start_step, time.perf_counter())
        bad_in_row, metrics = 0, {}
        warm_step, t_warm = start_step + max(1, min(10, (phase.max_steps - start_step) // 5)), None
        wait_at_warm, self.data_wait_s = 0.0, 0.0
        phase_dir = Path(self.cfg["phase_dir"])
        fail_marker = phase_dir / ".fail_at_step.done"
        while self.step < phase.max_steps:
            out = self.train_step()
            if out is None:
                bad_in_row += 1
                self.skipped += 1
                self._emit("log", message=f"step {self.step}: non-finite loss or gradient, step skipped "
                                          f"({bad_in_row} in a row)")
                if bad_in_row >= phase.max_bad_steps:
                    raise NonFiniteLossError(
                        f"phase {phase.name!r}: {bad_in_row} non-finite steps in a row at step {self.step}. "
                        "Lower optim.lr, set grad_clip, use precision: fp32, or check the data for NaN.")
                continue
            bad_in_row, metrics = 0, out
            step = self.step
            if step == warm_step:
                t_warm, wait_at_warm = time.perf_counter(), self.data_wait_s
            if step == phase.max_steps and t_warm is not None:  # steady state, start-up excluded
                span = max(time.perf_counter() - t_warm, 1e-9)
                out["perf/steps_per_s"] = (step - warm_step) / span
                out["perf/data_wait_frac"] = (self.data_wait_s - wait_at_warm) / span
            if step % phase.log_every == 0 or step == phase.max_steps:
                now = time.perf_counter()  # rate over the last window: start-up does not skew the ETA
                rate = (step - last_log[0]) / max(now - last_log[1], 1e-9)
                last_log = (step, now)
                self._emit("progress", step=step, max_steps=phase.max_steps, lr=self.sched.get_last_lr()[0],
                           rate=rate, metrics=out, group_lrs=self._group_lrs())
            if phase.eval and (step % phase.eval_every == 0 or step == phase.max_steps):
                self.last_eval = self.evaluate()
                metric, mode = phase.best
                val = self.last_eval.get(metric)
                if val is not None and (self.best is None or (val > self.best if mode == "max" else val < self.best)):
                    self.best = val
                self._emit("eval", step=step, metrics=self.last_eval)
                self.eval_step = step
            if step % phase.checkpoint_every == 0 or step == phase.max_steps:
                self.save(metrics)
            elif self.eval_step == step and self.cfg.get("report_evals"):
                # A sweep's scheduler (ASHA) decides on eval metrics: every evaluation reaches Tune.
                import ray.train

                ray.train.report({**metrics, **self.last_eval, "step": step, "eval_step": step})
            if phase.fail_at_step == step and self.rank == 0 and not fail_marker.exists():
                fail_marker.parent.mkdir(parents=True, exist_ok=True)
                fail_marker.touch()
                self._emit("log", message=f"fail_at_step={step}: rank 0 exits now (fault-injection test)")
                os._exit(1)
            if self.rank == 0:
                pause_point("step", step, phase_dir)



# ---- the kind ------------------------------------------------------------------------------------------
def schedule_text(phase: TrainPhaseConfig) -> str:
    from raytrain.optim import lr_factor

    s = phase.schedule
    end = phase.optim.lr * lr_factor(phase.max_steps - 1, s, phase.max_steps)
    text = f"{phase.optim.name} lr {phase.optim.lr:g}"
    if s.warmup_steps:
        text += f", warmup {s.warmup_steps}"
    text += f", {s.decay}" + (f" -> {end:.2g}" if s.decay != "constant" else "")
    for g in phase.param_groups:
        text += f"; {g.params}: lr {g.lr or phase.optim.lr:g}"
    return text


def lora_text(lora: Any, plan: PhasePlan) -> str:
    """A LoRA phase's row in `raytrain plan`: the adapted Linear layers and what trains."""
    layers = sorted({n.split(".lora_A.")[0] for n in plan.shapes if ".lora_A." in n})
    shown = ", ".join(layers[:4]) + (f", ... ({len(layers)} in all)" if len(layers) > 4 else "")
    return (f"    lora     rank {lora.rank}, alpha {lora.alpha}, dropout {lora.dropout:g} on {len(layers)} Linear "
            f"layer{'s' if len(layers) != 1 else ''}: {shown}; base weights "
            f"{'trained too (train_all)' if lora.train_all else 'frozen'}")


def module_text(name: str, m: Any, max_steps: int, n_params: int) -> str:
    """A trained module's row in `raytrain plan`."""
    from raytrain.plan import fmt_count

    ratio = f"{m.updates_per_step} update{'s' if m.updates_per_step > 1 else ''} per step"
    if m.every > 1:
        ratio += f" every {m.every} steps"
    init = m.init
    source = f", from {f'phase {init.phase}' if init.phase else init.path}" if init is not None else ""
    return (f"    module   {name}: {m.model.name}, {fmt_count(n_params)} params{source}; "
            f"{', '.join(f'{k} x{v:g}' for k, v in m.losses.items())}; {m.optim.name} lr {m.optim.lr:g}, "
            f"{m.schedule.decay}; {ratio} ({m.total_updates(max_steps):,} updates)")


class TrainKind(PhaseKind):
    """`train`: optimise a model on `train` datasets in Ray Train workers, evaluating on `eval`."""

    name = "train"
    config = TrainPhaseConfig

    def needs(self, pipe: PipelineConfig, phase: Any) -> Needs:
        needs = super().needs(pipe, phase)
        needs.datasets[:0] = [DatasetUse("train", s.name) for s in phase.train]
        for name, module in phase.modules.items():
            init = module.init
            if init is not None and init.phase is not None:
                needs.weights.append((f"modules.{name}.init_from", init.phase))
        return needs

    def produces(self, pipe: PipelineConfig, phase: Any) -> Produces:
        return Produces(weights=True)

    def steps(self, phase: Any) -> int:
        return int(phase.max_steps)

    def check(self, pipe: PipelineConfig, phase: Any, plan: PhasePlan, where: str) -> list[str]:
        from raytrain.checkpoints import PatternError, check_patterns, frozen_names

        problems = []
        if plan.shapes:
            try:
                frozen = frozen_names(list(plan.shapes), phase, where)
            except PatternError as exc:
                return [str(exc)]
            plan.n_frozen = sum(s.numel() for n, s in plan.shapes.items() if n in frozen)
            plan.n_trainable = sum(s.numel() for n, s in plan.shapes.items() if n not in frozen)
        for j, group in enumerate(phase.param_groups):
            try:
                check_patterns(list(plan.shapes), group.patterns, f"{where}.param_groups[{j}].params")
            except PatternError as exc:
                problems.append(str(exc))
        if plan.shapes and plan.n_trainable == 0:
            problems.append(f"{where}: every parameter is frozen; nothing to train")
        problems.extend(self._check_modules(phase, plan, where))
        return problems

    @staticmethod
    def _check_modules(phase: Any, plan: PhasePlan, where: str) -> list[str]:
        """Each trained module's losses, model (built on `meta`) and init_from path."""
        from raytrain.plan import _check_name
        from raytrain.registry import RegistryError

        problems: list[str] = []
        for name, module in phase.modules.items():
            key = f"{where}.modules.{name}"
            for loss in module.losses:
                _check_name(LOSSES, loss, f"{key}.losses", problems)
            try:
                with torch.device("meta"):
                    built = build_model(module.model.name, dict(module.model.args), module.model.adapter)
                plan.extra[f"module:{name}"] = sum(p.numel() for p in built.parameters())
            except (RegistryError, TypeError, ValueError) as exc:
                problems.append(f"{key}.model: {exc}")
            init = module.init
            if init is not None and init.path is not None and "://" not in init.path and not Path(init.path).exists():
                problems.append(f"{key}.init_from.path: checkpoint {init.path} does not exist")
        return problems

    def plan_lines(self, pipe: PipelineConfig, plan: PhasePlan) -> list[str]:
        from raytrain.plan import fmt_count, phase_figures

        ph, f = plan.phase, phase_figures(pipe, plan)
        return [f"    params   {fmt_count(plan.n_trainable)} trainable, {fmt_count(plan.n_frozen)} frozen",
                f"    losses   {', '.join(f'{k} x{v:g}' for k, v in ph.losses.items())}"
                + (f"; metrics {', '.join(ph.metrics)}" if ph.metrics else ""),
                f"    optim    {schedule_text(ph)}",
                f"    batch    {f.batch_size} x accum {f.grad_accum} x {f.num_workers} workers = "
                f"{f.effective_batch}; {f.max_steps:,} steps; eval every {f.eval_every}, "
                f"checkpoint every {f.checkpoint_every}",
                *([lora_text(ph.lora, plan)] if getattr(ph, "lora", None) is not None else []),
                *[module_text(name, m, ph.max_steps, int(plan.extra.get(f"module:{name}", 0)))
                  for name, m in ph.modules.items()]]

    def worker(self, config: dict[str, Any]) -> PhaseRunner:
        return PhaseRunner(config)

    def run(self, ctx: PhaseContext) -> None:
        from raytrain.phases.ray_train import fit

        fit(ctx, self)


register_kind(TrainKind)
