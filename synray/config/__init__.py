"""The run configuration: typed sections, YAML loading, built-in configs and `--set` overrides."""

from synray.config.base import ConfigError, Section
from synray.config.loading import (Choices, apply_overrides, builtin_configs, builtin_names, load_config, load_raw,
                                   parse_override, validate, with_overrides)
from synray.config.sections import *  # noqa: F403 (every section class and its constants)
from synray.config.sections import __all__ as _sections
from synray.config.rates import RatesConfig
from synray.config.tracking import TrackingConfig
from synray.config.tune import LOSS_METRIC, SPACE_KINDS, SpaceSpec, TuneConfig

__all__ = ["ConfigError", "Section", "Choices", "apply_overrides", "builtin_configs", "builtin_names", "load_config",
           "load_raw", "parse_override", "validate", "with_overrides", "SPACE_KINDS", "LOSS_METRIC", "SpaceSpec",
           "TuneConfig", "RatesConfig", "TrackingConfig", *_sections]
