"""The sweep YAML of `raytrain tune`: which phase, which config paths vary and how, the search.

```yaml
# raytrain tune configs/pipelines/separation_tiny.yaml --sweep configs/sweeps/separation_tiny.yaml
phase: long                        # the phase to sweep; the phases before it run once
metric: eval/si_sdri
mode: max
num_samples: 6
max_concurrent_trials: 1
params:                            # override paths (as `-o`) -> one distribution each
  phases.long.optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
  phases.long.transforms.0.args.crop_seconds: {choice: [1.0, 1.5, 2.0]}
searcher: {name: random, seed: 0}  # random | grid | optuna
scheduler: {name: asha, grace_period: 40, reduction_factor: 2}
trial_scaling: {cpus_per_worker: 0.5}   # optional: the swept phase's scaling in each trial
```

Every sampled config is validated by the pipeline's own models (`loader.with_values`), and
`check_sweep` validates one representative config per parameter before anything starts.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raytrain.config.loader import ConfigError, read_yaml
from raytrain.config.schema import ScalingConfig

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of the keys: `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}`
    (hi excluded), `{choice: [a, b, ...]}` (sampled), `{grid: [a, b, ...]}` (every value, times
    num_samples)."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        set_ = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {set_ or 'none'})")
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{self.kind}: the low bound must be below the high one (got {list(lo_hi)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: both bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)

    def examples(self) -> list[Any]:
        """Values that span the distribution (what `check_sweep` validates)."""
        spec = self.spec
        if self.kind in ("choice", "grid"):
            return list(spec)
        if self.kind == "randint":
            return [spec[0], spec[1] - 1]
        return [spec[0], spec[1]]

    def tune_domain(self) -> Any:
        from ray import tune

        spec = self.spec
        return {"uniform": lambda: tune.uniform(*spec), "loguniform": lambda: tune.loguniform(*spec),
                "randint": lambda: tune.randint(*spec), "choice": lambda: tune.choice(spec),
                "grid": lambda: tune.grid_search(spec)}[self.kind]()

    @property
    def log_scale(self) -> bool:
        return self.loguniform is not None


class SearcherConfig(_Strict):
    name: Literal["random", "grid", "optuna"] = "random"
    seed: int = 0


class SchedulerConfig(_Strict):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="steps every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(_Strict):
    phase: str
    metric: str
    mode: Literal["min", "max"]
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    params: dict[str, Distribution] = Field(min_length=1)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    trial_scaling: ScalingConfig | None = None

    @model_validator(mode="after")
    def _grid_needs_grid(self) -> SweepConfig:
        kinds = {d.kind for d in self.params.values()}
        if self.searcher.name == "grid" and kinds - {"grid"}:
            raise ValueError("searcher grid: every param must be {grid: [...]} (or use searcher random, "
                             "which also expands grid params)")
        if self.searcher.name == "optuna" and "grid" in kinds:
            raise ValueError("searcher optuna samples; it cannot expand {grid: [...]}: use {choice: [...]}")
        return self

    def trials_expected(self) -> int:
        grid = math.prod(len(d.spec) for d in self.params.values() if d.kind == "grid")
        return self.num_samples * grid


def load_sweep(path: str | Path) -> SweepConfig:
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with phase, metric, mode, params")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, str(path))) from None


_SECTIONS: dict[str, type[BaseModel]] = {"searcher": SearcherConfig, "scheduler": SchedulerConfig,
                                         "trial_scaling": ScalingConfig}


def _format(err: ValidationError, source: str) -> str:
    """One line per problem with the key's path; an unknown key gets the nearest valid name."""
    lines = [f"{source}: invalid sweep ({len(err.errors())} problem{'s' * (len(err.errors()) > 1)})"]
    for e in err.errors():
        loc = [str(x) for x in e["loc"] if not str(x).startswith("function-")]
        where = ".".join(loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            if loc[0] == "params":
                valid = list(DISTRIBUTIONS)
            else:
                valid = sorted((_SECTIONS[loc[0]] if len(loc) > 1 else SweepConfig).model_fields)
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"  {where}: unknown key.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)
