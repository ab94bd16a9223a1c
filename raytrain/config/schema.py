"""Pydantic models of the pipeline YAML.

Every model forbids unknown keys, so a typo fails at `raytrain plan` time with the
key's path. Fields a phase leaves unset are filled from the pipeline's `defaults:`
block before validation (see `loader.py`), so the models here see a merged dict.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """A registry name (`convtasnet`) or a dotted path (`pkg.mod:Class`) plus its kwargs."""

    name: str = Field(description="a registered model name (e.g. convtasnet, ctc_asr) or a dotted path "
                                  "pkg.mod:Class")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the model's constructor (checked against it before anything is "
                    "built)")
    adapter: str | None = Field(None, description="a registered adapter (e.g. separation) that wraps a plain "
                                                  "module `name` builds into raytrain's batch-dict interface")


class ScalingConfig(Strict):
    """Ray Train workers of a phase: the pipeline's `scaling`, or a phase's own `scaling` in its place."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool | Literal["auto"] = Field("auto",
                                            description="a GPU per worker; auto: when the cluster has GPUs")
    cpus_per_worker: float | None = Field(None, gt=0, description="default: leaves a CPU free for Ray Data")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default: CPUs / workers")
    max_failures: int = Field(0, ge=0, description="worker restarts from the last checkpoint (FailureConfig)")


class DatasetConfig(Strict):
    """A dataset prepared by `raytrain prep` (or written by a cache phase), named by its key under `data:`."""

    shards: str = Field(description="the prepared dataset's folder (holding _manifest.json): a path, "
                                    "relative to where raytrain runs, or a bucket URI")
    cache: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: read and decode once per phase into Ray's object store; each worker "
                            "keeps its rows after its first epoch and reshuffles them every epoch. stream: "
                            "read the shards again every epoch. auto: memory when the decoded audio needs at "
                            "most a quarter of the object store")


class TrainSource(Strict):
    """A dataset a train phase learns from."""

    name: str = Field(description="a dataset of `data:` (or one a cache phase writes)")
    weight: float = Field(1.0, gt=0, description="share of the batches drawn from it when several are "
                                                 "interleaved (relative to the others' weights)")


class OptimConfig(Strict):
    """The torch optimizer of a phase (or of a module)."""

    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="torch.optim.AdamW, Adam or SGD")
    lr: float = Field(1e-3, gt=0, description="base learning rate (the schedule scales it)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled for adamw)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam and adamw: (beta1, beta2)")
    momentum: float = Field(0.9, ge=0, description="sgd only")


class ScheduleConfig(Strict):
    """The learning-rate schedule over a phase's `max_steps`: linear warm-up, then a decay."""

    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from lr / warmup_steps to lr")
    decay: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warm-up, to min_lr_ratio * lr at max_steps (constant: no decay)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the final lr as a fraction of lr")


class ParamGroupConfig(Strict):
    """Parameters whose names match `params` (glob, first matching group wins)."""

    params: str | list[str] = Field(description="glob(s) on dotted parameter names, e.g. encoder.*")
    lr: float | None = Field(None, gt=0, description="this group's lr (default: optim.lr)")
    weight_decay: float | None = Field(None, ge=0, description="this group's weight decay (default: "
                                                               "optim.weight_decay)")

    @property
    def patterns(self) -> list[str]:
        return [self.params] if isinstance(self.params, str) else list(self.params)


class InitFromConfig(Strict):
    """Where a phase's weights come from: an earlier phase or a checkpoint path."""

    phase: str | None = Field(None, description="an earlier phase whose weights to load")
    path: str | None = Field(None, description="a model.pt or state.pt (or a folder holding one), or an "
                                               "s3:// or gs:// URI of a model.pt")
    checkpoint: Literal["best", "last"] = Field("best", description="which of the phase's checkpoints")
    include: list[str] = Field(default_factory=lambda: ["*"], description="globs of checkpoint keys to load")
    exclude: list[str] = Field(default_factory=list, description="globs of checkpoint keys not to load (wins "
                                                                 "over include)")
    rename: dict[str, str] = Field(default_factory=dict, description="old prefix -> new prefix")
    on_shape_mismatch: Literal["skip", "error"] = Field(
        "error", description="a key whose shape differs: stop the phase, or skip it (left at its fresh init)")

    @model_validator(mode="after")
    def _one_source(self) -> InitFromConfig:
        if (self.phase is None) == (self.path is None):
            raise ValueError("init_from needs exactly one of 'phase' (an earlier phase's name) or 'path'")
        return self


class GateConfig(Strict):
    """A bound on one of the phase's final metrics; with `relative_to` (an earlier phase), on its difference
    from that phase's value of the same metric: `{metric: eval/secs, min: -0.03, relative_to: teacher}` is a
    student that loses at most 0.03 of its teacher's SECS."""

    metric: str = Field(description="a final metric of the phase, e.g. eval/cer")
    min: float | None = Field(None, description="the metric (or difference, or ratio) must be at least this")
    max: float | None = Field(None, description="the metric (or difference, or ratio) must be at most this")
    relative_to: str | None = Field(None, description="an earlier phase: the bound is on the difference from "
                                                      "its value")
    ratio_to: str | None = Field(None, description="an earlier phase: the bound is on the ratio to its value "
                                 "(max: 0.75 is 25% below it)")

    @model_validator(mode="after")
    def _bound(self) -> GateConfig:
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r} needs 'min' or 'max'")
        if self.relative_to is not None and self.ratio_to is not None:
            raise ValueError(f"gate on {self.metric!r}: give relative_to (a difference) or ratio_to (a ratio), not both")
        return self

    @property
    def reference_phase(self) -> str | None:
        return self.relative_to or self.ratio_to


class TransformConfig(Strict):
    """An on-the-fly transform of the batches (Ray Data), by registered name, with its arguments."""

    name: str = Field(description="a registered transform, e.g. ctc_targets")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the transform")


# Metrics where smaller is better: losses and error rates (CER, WER, DER, EER, ...).
_LOWER_IS_BETTER = ("loss", "cer", "wer", "der", "eer", "per", "error")


def lower_is_better(metric: str) -> bool:
    """True for a loss or an error rate (``eval/loss``, ``eval/cer``, ``train/asr_ctc_loss``)."""
    return metric.rsplit("/", 1)[-1].lower().endswith(_LOWER_IS_BETTER)


class PhaseBase(Strict):
    """Keys every phase kind has. Each kind is its own model with only its keys (a subclass per kind);
    `kind` picks the model, so a key of another kind is an unknown key."""

    # What the kind does, for the engine (never branched on by name): a kind that trains weights is what
    # `tracking.log_model`/`register_as` and sweeps act on; a kind whose model defaults to the model of
    # the phase it loads (init_from) scores or transforms that phase's weights.
    trains: ClassVar[bool] = False
    model_from_source: ClassVar[bool] = False

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the phase's name (its folder in the run, "
                                                                "its MLflow run, what later phases refer to)")
    kind: str = Field("train", description="the phase kind, which decides the phase's keys")
    model: ModelConfig | None = Field(None, description="default: the pipeline's model (for a kind that "
                                                        "loads another phase's weights, that phase's model)")
    init_from: str | InitFromConfig | None = Field(
        None, description="the weights to start from: an earlier phase's name, or InitFromConfig's rules")
    scaling: ScalingConfig | None = Field(None, description="default: the pipeline's scaling")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on a GPU that has it (else fp16), fp32 on CPU")

    @property
    def init(self) -> InitFromConfig | None:
        if isinstance(self.init_from, str):
            return InitFromConfig(phase=self.init_from)
        return self.init_from


class ScoredPhase(PhaseBase):
    """Keys of a phase that scores a dataset (`eval`) with metrics and losses."""

    eval: str | None = Field(None, description="the dataset scored (a `data:` name or a cached dataset)")
    losses: dict[str, float] = Field(
        default_factory=dict,
        description="loss name -> weight; their weighted sum is the loss (train/loss, eval/loss)")
    metrics: list[str] = Field(default_factory=list, description="metrics scored on `eval`, e.g. [cer, wer]")
    eval_transforms: list[TransformConfig] = Field(default_factory=list,
                                                   description="transforms of the eval batches, in order")
    batch_size: int = Field(8, ge=1, description="rows per batch (per worker)")
    eval_batch_size: int | None = Field(None, ge=1, description="rows per eval batch; default: batch_size")
    cache_eval: bool = Field(True, description="keep the collated eval batches in worker memory")
    gates: list[GateConfig] = Field(default_factory=list, description="bounds on the final metrics: a phase "
                                                                      "that misses one stops the pipeline")
    best_metric: str | None = Field(None, description="e.g. eval/si_sdri; default: eval/loss")
    best_mode: Literal["min", "max"] | None = Field(
        None, description="default: min for a loss or an error rate (cer, wer, ...), else max")

    @property
    def best(self) -> tuple[str, str]:
        """(metric, mode) used to pick the phase's best checkpoint."""
        metric = self.best_metric or ("eval/loss" if self.eval else "train/loss")
        mode = self.best_mode or ("min" if lower_is_better(metric) else "max")
        return metric, mode

    @property
    def scored_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size


class ModuleConfig(Strict):
    """A module a train or distill phase trains beside its model (a GAN discriminator, the fake-score network
    of distribution-matching distillation), with its own optimizer, schedule and update ratio.

    Each step the phase's model updates first (its losses may call the modules, whose weights stay fixed
    for that update); then each module whose turn it is (`every`) makes `updates_per_step` updates of its
    own `losses` on the step's batches and the model's outputs, detached. Its losses are
    `fn(outputs, batch, modules=..., teacher=...)`: they call `modules[<name>]` themselves."""

    model: ModelConfig = Field(description="the module's model")
    init_from: str | InitFromConfig | None = Field(None, description="its starting weights (as a phase's "
                                                                     "init_from); default: a fresh init")
    losses: dict[str, float] = Field(min_length=1, description="loss name -> weight; what this module minimises")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(), description="its own optimizer")
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(),
                                     description="its own schedule, over its updates in the phase")
    updates_per_step: int = Field(1, ge=1, description="updates of this module per step of the phase's model "
                                                       "(e.g. 5 for a DMD fake-score network)")
    every: int = Field(1, ge=1, description="update on every N-th step of the phase's model only")
    grad_clip: float | None = Field(None, gt=0, description="clip its gradients' global norm to this")

    @property
    def init(self) -> InitFromConfig | None:
        if isinstance(self.init_from, str):
            return InitFromConfig(phase=self.init_from)
        return self.init_from

    def total_updates(self, max_steps: int) -> int:
        """Updates over a phase of `max_steps` steps (its schedule's horizon)."""
        return (max_steps // self.every) * self.updates_per_step


class LoraSpec(Strict):
    """LoRA adapters (through peft) on the model's Linear layers that `target_modules` (globs on dotted module
    names) match: the phase trains the adapters only, or everything with `train_all`; it writes the merged
    weights (model.pt) and the adapter (adapter.pt)."""

    rank: int = Field(8, ge=1, description="rank of each adapter")
    alpha: int = Field(16, ge=1, description="scale numerator: the update is (alpha / rank) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(..., min_length=1, description="globs of Linear layers, e.g. blocks.*.attn.q")
    train_all: bool = Field(False, description="train the base weights too (else frozen)")

    @field_validator("target_modules", mode="before",
                     json_schema_input_type=str | Annotated[list[str], Field(min_length=1)])
    @classmethod
    def _one(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainPhaseConfig(ScoredPhase):
    """`train`: optimise the model on `train` datasets, evaluating on `eval`. Needs `train` and `losses`
    (in the phase or in `defaults:`)."""

    trains: ClassVar[bool] = True

    kind: Literal["train"] = Field(  # type: ignore[assignment]
        "train", description="picks this kind (the default)")
    train: list[TrainSource] = Field(
        default_factory=list, description="the datasets to train on: [a, b], [{name: a, weight: 2}] or "
                                          "{a: 1, b: 2}; several are interleaved by weight")
    trainable: list[str] | Literal["all"] | None = Field(
        None, description="globs of the parameters that train (the rest are frozen), or all; default: all")
    freeze: list[str] | None = Field(None, description="globs of the parameters that stay frozen")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters instead of the model's weights")
    transforms: list[TransformConfig] = Field(default_factory=list,
                                              description="transforms of the train batches, in order")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(), description="the optimizer")
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(),
                                     description="the learning-rate schedule")
    param_groups: list[ParamGroupConfig] = Field(default_factory=list,
                                                 description="parameters with their own lr or weight decay")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps of the phase")
    eval_every: int = Field(500, ge=1, description="steps between evaluations on `eval`")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1, description="steps between logged train metrics")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradients' global norm to this")
    max_bad_steps: int = Field(10, ge=1, description="abort after this many non-finite losses in a row")
    shuffle_buffer: int = Field(0, ge=0, description="rows reshuffled per epoch in a buffer; 0 = the seeded file order only")
    fail_at_step: int | None = Field(None, ge=1, description="testing: rank 0 exits once at this step")
    modules: dict[str, ModuleConfig] = Field(
        default_factory=dict, description="modules trained beside the model, each with its own optimizer, "
                                          "schedule and update ratio (a discriminator, a fake-score network)")

    @field_validator("modules")
    @classmethod
    def _module_names(cls, value: dict[str, ModuleConfig]) -> dict[str, ModuleConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"modules: {name!r} is not a module name (letters, digits, '_')")
        return value

    @field_validator("train", mode="before", json_schema_input_type=(
        str | list[str | TrainSource] | dict[str, Annotated[float, Field(gt=0)]]))
    @classmethod
    def _train_sources(cls, value: Any) -> Any:
        """Accept `[a, b]`, `[{name: a, weight: 2}]` and `{a: 1, b: 2}`."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict):
            return [{"name": k, "weight": w} for k, w in value.items()]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("trainable", "freeze", mode="before", json_schema_input_type=str | list[str] | None)
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all":
            return [value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainPhaseConfig:
        if self.trainable is not None and self.freeze is not None:
            raise ValueError("set either 'trainable' or 'freeze', not both")
        if self.lora is not None and not self.lora.train_all and (self.trainable, self.freeze) != (None, None):
            raise ValueError("lora trains the adapters only: 'trainable'/'freeze' apply with lora.train_all: true")
        if not self.losses:
            raise ValueError(f"a {self.kind} phase needs 'losses' (name: weight), e.g. {{si_sdr_pit: 1.0}}")
        if not self.train:
            raise ValueError(f"a {self.kind} phase needs 'train': the datasets to train on")
        return self


class EvaluatePhaseConfig(ScoredPhase):
    """`evaluate`: metrics (and gates) of init_from's weights on `eval`, no training. Needs `init_from`,
    `eval`, and `metrics` or `losses`."""

    model_from_source: ClassVar[bool] = True

    kind: Literal["evaluate"] = Field("evaluate", description="picks this kind")  # type: ignore[assignment]

    @model_validator(mode="after")
    def _consistent(self) -> EvaluatePhaseConfig:
        if not self.eval:
            raise ValueError("an evaluate phase needs 'eval': the dataset to score")
        if self.init_from is None:
            raise ValueError("an evaluate phase needs 'init_from': the phase (or checkpoint path) to score")
        if not self.metrics and not self.losses:
            raise ValueError("an evaluate phase needs 'metrics' (e.g. [cer, wer]) or 'losses'")
        return self


class TeacherConfig(Strict):
    """The frozen model a `distill` phase learns from: an earlier phase's weights or a checkpoint file."""

    phase: str | None = Field(None, description="an earlier phase whose weights teach")
    path: str | None = Field(None, description="a checkpoint (model.pt) that teaches; needs `model`")
    checkpoint: Literal["best", "last"] = Field("best", description="which of the phase's checkpoints")
    model: ModelConfig | None = Field(None, description="default: the model of `phase`; required with `path`")
    args: dict[str, Any] = Field(default_factory=dict,
                                 description="model arguments that differ when it teaches (e.g. a flow teacher's "
                                             "sample_steps); merged over its model's args")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.phase is None) == (self.path is None):
            raise ValueError("teacher needs exactly one of 'phase' (an earlier phase's name) or 'path' "
                             "(with 'model')")
        if self.path is not None and self.model is None:
            raise ValueError("teacher: a checkpoint 'path' needs 'model' (name and args of the teacher)")
        return self


class DistillPhaseConfig(TrainPhaseConfig):
    """`distill`: a student (`model`, `init_from`) trains on its losses, which also receive the outputs of
    a frozen `teacher` on the same batch. Needs what a train phase needs, and `teacher`."""

    kind: Literal["distill"] = Field("distill", description="picks this kind")  # type: ignore[assignment]
    teacher: TeacherConfig | None = Field(None, description="the frozen teacher (required)")

    @model_validator(mode="after")
    def _has_teacher(self) -> DistillPhaseConfig:
        if self.teacher is None:
            raise ValueError("a distill phase needs 'teacher': {phase: <an earlier phase>} or {path: <model.pt>, "
                             "model: {name: ..., args: {...}}}")
        return self


class ColumnDecl(Strict):
    """A column a `cache` phase writes: which model output it holds and its role in the dataset."""

    output: str | None = Field(None, description="the model output key (default: the column's name)")
    role: Literal["features", "tokens", "audio", "label"] = Field("features", description="what the column "
                                                                                          "holds")
    frame_rate: float | None = Field(None, gt=0, description="frames per second (features, tokens)")
    dims: int | None = Field(None, ge=1, description="values per frame (features); default: the model's output's")
    sample_rate: int | None = Field(None, gt=0, description="audio")
    dtype: str = Field("float32", description="numpy dtype of the stored values")
    codebook_size: int | None = Field(
        None, ge=1, description="tokens: the codebook's size; the phase reports each dataset's codebook usage and "
                                "code perplexity")

    @model_validator(mode="after")
    def _codebook_of_tokens(self) -> ColumnDecl:
        if self.codebook_size is not None and self.role != "tokens":
            raise ValueError(f"codebook_size is for a 'tokens' column, this one is {self.role!r}")
        return self


class CachePhaseConfig(PhaseBase):
    """`cache`: run a frozen model over datasets (Ray Data, an actor pool) and write its outputs as new
    datasets that later phases name like any `data:` entry. Needs `datasets`, `columns`, and `init_from` or
    a `model` that brings its own weights."""

    model_from_source: ClassVar[bool] = True

    kind: Literal["cache"] = Field("cache", description="picks this kind")  # type: ignore[assignment]
    datasets: dict[str, str] = Field(description="source dataset -> name of the dataset this phase writes")
    columns: dict[str, ColumnDecl] = Field(description="column written -> model output and role")
    carry: list[str] = Field(default_factory=list, description="source columns copied beside the outputs")
    eval_transforms: list[TransformConfig] = Field(default_factory=list,
                                                   description="transforms of the source batches, in order")
    batch_size: int = Field(8, ge=1, description="rows per batch the model runs on")
    cache_dir: str = Field("data/cache", description="folder of cached datasets (one subfolder per cache key)")
    rows_per_shard: int = Field(200, ge=1, description="rows per written shard")
    verify_lengths: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        None, description="compare length_columns' lengths in the first N written rows of every dataset (or all)")
    length_columns: tuple[str, str] = Field(
        ("sketch", "latent"), description="(a, b): b's length is checked against a's times b's rate / a's rate "
                                          "(written or carried time columns; an unknown rate counts as equal)")
    length_tolerance: int = Field(0, ge=0, description="frames of b a row may differ from the expected length")
    require_length_match: bool = Field(False, description="a mismatching row fails the phase (later phases "
                                                          "do not run)")

    @model_validator(mode="after")
    def _consistent(self) -> CachePhaseConfig:
        if self.init_from is None and self.model is None:
            raise ValueError("a cache phase needs 'init_from' (the phase or checkpoint path whose model it runs) or "
                             "'model' (a model that brings its own pretrained weights, e.g. speaker_encoder)")
        if not self.datasets:
            raise ValueError("a cache phase needs 'datasets': {source dataset: name of the cached dataset}")
        if not self.columns:
            raise ValueError("a cache phase needs 'columns': {column: {output: <model output key>, role: ...}}")
        if self.require_length_match and self.verify_lengths is None:
            raise ValueError("require_length_match needs verify_lengths: the number of rows to check or 'all'")
        if self.length_columns[0] == self.length_columns[1]:
            raise ValueError(f"length_columns: two different columns, got {list(self.length_columns)}")
        return self


ExportFormat = Literal["onnx", "torchscript"]
EXPORT_TOLERANCE = {"fp32": 1e-4, "int8": 0.5, "torchscript": 1e-5}  # max abs diff against torch, per precision


class ExportPhaseConfig(ScoredPhase):
    """`export`: a phase's weights to ONNX (and TorchScript), optionally int8, checked against torch on `eval`
    batches; no Ray Train. Needs `init_from` and `eval`."""

    model_from_source: ClassVar[bool] = True

    kind: Literal["export"] = Field("export", description="picks this kind")  # type: ignore[assignment]
    formats: list[ExportFormat] = Field(
        default_factory=lambda: list[ExportFormat](["onnx"]),
        description="onnx (model.onnx, always written); torchscript adds model.ts")
    int8: bool = Field(False, description="also write a dynamically quantised int8 ONNX model (onnxruntime)")
    int8_ops: list[str] | None = Field(
        None, description="ONNX op types int8 quantises (default: all onnxruntime can); e.g. [Conv, Gemm] keeps a "
                          "mel filterbank's MatMul in fp32")
    tolerance: dict[str, float] = Field(
        default_factory=lambda: dict(EXPORT_TOLERANCE),
        description="max abs difference against torch on the eval batches; over it, the phase fails")
    parity_batches: int = Field(4, ge=1, description="eval batches compared against torch and timed (RTF)")
    threads: int = Field(1, ge=1, description="CPU threads for torch and onnxruntime when timing")

    @field_validator("tolerance")
    @classmethod
    def _precisions(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(EXPORT_TOLERANCE))
        if unknown:
            raise ValueError(f"tolerance: unknown precision(s) {unknown}; use {', '.join(EXPORT_TOLERANCE)}")
        return {**EXPORT_TOLERANCE, **value}

    @model_validator(mode="after")
    def _consistent(self) -> ExportPhaseConfig:
        if self.init_from is None:
            raise ValueError("an export phase needs 'init_from': the phase (or checkpoint path) to export")
        if not self.eval:
            raise ValueError("an export phase needs 'eval': the dataset whose batches check parity")
        return self


PHASE_CONFIGS: dict[str, type[PhaseBase]] = {
    "train": TrainPhaseConfig, "evaluate": EvaluatePhaseConfig, "distill": DistillPhaseConfig,
    "cache": CachePhaseConfig, "export": ExportPhaseConfig,
}

AnyPhase = TrainPhaseConfig | EvaluatePhaseConfig | DistillPhaseConfig | CachePhaseConfig | ExportPhaseConfig


def phase_kind_of(value: Any) -> str:
    """The `kind` of a phase (a dict from YAML or a model); `train` when unset."""
    if isinstance(value, dict):
        return str(value.get("kind", "train"))
    return str(getattr(value, "kind", "train"))


PhaseConfig = Annotated[
    Annotated[TrainPhaseConfig, Tag("train")] | Annotated[EvaluatePhaseConfig, Tag("evaluate")]
    | Annotated[DistillPhaseConfig, Tag("distill")] | Annotated[CachePhaseConfig, Tag("cache")]
    | Annotated[ExportPhaseConfig, Tag("export")],
    Discriminator(phase_kind_of),
]


class TrackingConfig(Strict):
    """MLflow: where each phase's params, metrics and files are logged."""

    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline's name")
    enabled: bool = Field(True, description="false: log nothing to MLflow")
    log_model: bool = Field(
        True, description="log each finished train phase's best weights as an MLflow pytorch model (its URI goes "
                          "to summary.json as mlflow_model_uri); loading it needs raytrain importable")
    register_as: str | None = Field(
        None, description="register the final train phase's model under this name in the MLflow model registry "
                          "(a new version each run; needs log_model)")

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in "/:")):
            raise ValueError(f"{value!r} is not a registered model name: MLflow names cannot be blank or contain "
                             "'/' or ':'")
        return value

    @model_validator(mode="after")
    def _register_needs_model(self) -> TrackingConfig:
        if self.register_as is not None and not self.log_model:
            raise ValueError("register_as needs log_model: true (only a logged model can be registered); "
                             "remove register_as or set log_model: true")
        return self


class PipelineConfig(Strict):
    """A pipeline YAML: its datasets, its model and its phases, run in order."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the pipeline's name: its folder under "
                                                                "runs_dir, its default MLflow experiment")
    seed: int = Field(0, description="seeds weights, data order and transforms")
    runs_dir: str = Field("runs", description="folder of run folders (<runs_dir>/<name>/<timestamp>)")
    storage: str | None = Field(
        None, description="s3://bucket/runs or gs://... (or a shared folder): Ray Train's checkpoints, each "
                          "phase's best/last weights and summary.json go there, so any node can load them and "
                          "--resume works from a fresh machine; runs_dir keeps a local copy of the run folder")
    data: dict[str, DatasetConfig] = Field(
        description="dataset name -> its prepared shards; phases name them")
    model: ModelConfig = Field(description="the model of every phase that names none")
    scaling: ScalingConfig = Field(default_factory=lambda: ScalingConfig(),
                                   description="Ray Train workers of every phase that sets none")
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(), description="MLflow")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="phase keys given to every phase whose kind has them; a phase's "
                                          "own value wins, mappings merge key by key")
    phases: list[PhaseConfig] = Field(min_length=1, description="the phases, run in order; `kind` picks each "
                                                                "one's keys")
    _raw: dict[str, Any] | None = PrivateAttr(None)  # the YAML before defaults were merged (sweeps)

    def phase(self, name: str) -> AnyPhase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase named {name!r}; phases: {[p.name for p in self.phases]}")

    def final_train_phase(self) -> str | None:
        """The name of the last phase that trains weights (whose model `tracking.register_as` registers)."""
        return next((p.name for p in reversed(self.phases) if p.trains), None)

    def phase_model(self, phase: PhaseBase) -> ModelConfig:
        """The phase's own model, else (a kind that scores, exports or runs another phase's weights) the model
        of the phase it loads, else the pipeline's."""
        if phase.model is not None:
            return phase.model
        init = phase.init
        if phase.model_from_source and init is not None and init.phase is not None and init.phase != phase.name:
            source = next((p for p in self.phases if p.name == init.phase), None)
            if source is not None:
                return self.phase_model(source)
        return self.model

    def teacher_model(self, teacher: TeacherConfig) -> ModelConfig:
        """The model of a distill phase's teacher: its own `model`, else that of the phase it names."""
        if teacher.model is not None:
            model = teacher.model
        else:
            source = next((p for p in self.phases if p.name == teacher.phase), None)
            model = self.phase_model(source) if source is not None else self.model
        if teacher.args:
            model = model.model_copy(update={"args": {**model.args, **teacher.args}})
        return model

    def trained_phase(self, name: str) -> TrainPhaseConfig:
        """The phase `name`, which must be one that trains (train, distill): what sweeps act on."""
        phase = self.phase(name)
        if not isinstance(phase, TrainPhaseConfig):
            raise KeyError(f"phase {name!r} is a {phase.kind} phase, which trains nothing")
        return phase

    def phase_scaling(self, phase: PhaseBase) -> ScalingConfig:
        return phase.scaling or self.scaling
