"""Pipeline configuration: dataclasses filled from YAML, with `--set a.b=c` overrides.

`sections` holds one dataclass per pipeline section with its `validate()`; `loading` turns
YAML and overrides into a validated `Config`.
"""

from toolchain.config.loading import apply_override, assign, config_field, dump_yaml, from_dict, load_config, to_dict
from toolchain.config.sections import (
    DEFAULT_PROMPTS,
    DISTILL_LOSSES,
    BenchConfig,
    Config,
    DataConfig,
    DistillConfig,
    ExportConfig,
    FinetuneConfig,
    LoraConfig,
    PackConfig,
    PruneConfig,
    QuantizeConfig,
    StudentConfig,
    TaskConfig,
    TeacherConfig,
    VerifyConfig,
    check_device_spec,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "DISTILL_LOSSES",
    "BenchConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LoraConfig",
    "PackConfig",
    "PruneConfig",
    "QuantizeConfig",
    "StudentConfig",
    "TaskConfig",
    "TeacherConfig",
    "VerifyConfig",
    "apply_override",
    "assign",
    "check_device_spec",
    "config_field",
    "dump_yaml",
    "from_dict",
    "load_config",
    "to_dict",
]
