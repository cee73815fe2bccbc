"""Training: configuration, the shared training loop, checkpoints, objectives and evaluation.

Commands (``eegfast tokenizer|pretrain|upcycle|finetune|evaluate|bench|doctor|quickstart``)
live in :mod:`eegfast.train.commands`; everything runs under ``torchrun`` unchanged.
"""

from eegfast.train.config import ConfigError, RunConfig, resolve_config
from eegfast.train.engine import FitResult, NonFiniteLossError, fit, seed_everything
from eegfast.train.objectives import (
    StepContext,
    StepOutput,
    get_objective,
    register_objective,
)

__all__ = [
    "ConfigError",
    "FitResult",
    "NonFiniteLossError",
    "RunConfig",
    "StepContext",
    "StepOutput",
    "fit",
    "get_objective",
    "register_objective",
    "resolve_config",
    "seed_everything",
]
