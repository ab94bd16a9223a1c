"""Pipeline configuration: pydantic models, YAML loading, overrides and checks."""

from raytrain.config.loader import ConfigError, apply_override, deep_merge, load_config, parse_override
from raytrain.config.schema import (
    GateConfig,
    InitFromConfig,
    ModelConfig,
    OptimConfig,
    ParamGroupConfig,
    PhaseConfig,
    PipelineConfig,
    ScalingConfig,
    ScheduleConfig,
    TrainPhaseConfig,
)

__all__ = [
    "ConfigError", "GateConfig", "InitFromConfig", "ModelConfig", "OptimConfig", "ParamGroupConfig",
    "PhaseConfig", "PipelineConfig", "ScalingConfig", "ScheduleConfig", "TrainPhaseConfig", "apply_override", "deep_merge",
    "load_config", "parse_override",
]
