"""Configuration: typed schema, strict YAML loading with overrides, cross-section validation."""

from copd_megatron.config.load import (
    check_resume,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    experiment_dict,
    load_config,
)
from copd_megatron.config.presets import PRESETS, VISION_PRESETS
from copd_megatron.config.schema import (
    BranchConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    MemoryConfig,
    MergeConfig,
    ModelConfig,
    OPDConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RolloutConfig,
    ScheduleConfig,
    VisionConfig,
)
from copd_megatron.config.validate import validate

__all__ = [
    "PRESETS", "VISION_PRESETS", "BranchConfig", "CheckpointConfig", "Config", "ConfigError", "EvalConfig",
    "LoggingConfig", "LossConfig", "MemoryConfig", "MergeConfig", "ModelConfig", "OPDConfig", "OptimizerConfig",
    "ParallelConfig", "PrecisionConfig", "RolloutConfig", "VisionConfig",
    "ScheduleConfig", "check_resume", "config_from_dict", "experiment_dict", "config_hash", "config_to_dict", "dump_config", "load_config", "validate",
]  # fmt: skip
