"""Training: configuration, the shared training loop, checkpoints, objectives and evaluation.

Commands (``eegfast tokenizer|pretrain|upcycle|finetune|evaluate|bench|doctor|quickstart``)
live in :mod:`eegfast.train.commands`; everything runs under ``torchrun`` unchanged.

The names below are imported on first use: every command module sits under this package, and
importing the training loop (torch, safetensors, the models) here made ``eegfast doctor --help``
and the other commands' ``--help`` pay for it before printing a line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# exported name -> the module that defines it
_LAZY = {
    "ConfigError": "config",
    "RunConfig": "config",
    "resolve_config": "config",
    "FitResult": "engine",
    "NonFiniteLossError": "engine",
    "fit": "engine",
    "seed_everything": "engine",
    "StepContext": "objectives",
    "StepOutput": "objectives",
    "get_objective": "objectives",
    "register_objective": "objectives",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"eegfast.train.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'eegfast.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
