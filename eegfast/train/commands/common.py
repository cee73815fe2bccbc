"""Arguments and set-up shared by the training commands."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eegfast.train.config import ConfigError, RunConfig, resolve_config, valid_keys
from eegfast.train.distributed import DistInfo, choose_device, init_distributed
from eegfast.train.engine import seed_everything

EPILOG = (
    "Configuration: defaults, then --config FILE (.toml/.yaml), then --set key=value (repeatable; "
    "later wins). Run under `torchrun --nproc_per_node N eegfast ...` for several processes/GPUs. "
    "Valid keys: " + ", ".join(valid_keys())
)


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def add_run_arguments(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    parser.epilog = EPILOG
    if data:
        parser.add_argument(
            "--data",
            nargs="+",
            metavar="FOLDER",
            help="prepared folder(s) from `eegfast prepare` (sets data.roots)",
        )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=1e-3",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|CHECKPOINT",
        help="resume: 'auto' = newest checkpoint in --out, or a checkpoint folder",
    )
    parser.add_argument("--seed", type=int, default=None, help="sets train.seed")
    parser.add_argument("--device", default=None, help="auto|cpu|cuda (sets train.device)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def resolve(args: argparse.Namespace, defaults: RunConfig, extra: dict[str, Any] | None = None):
    """The run's config: command defaults, file, command-line flags, then --set."""
    flags: dict[str, Any] = dict(extra or {})
    if getattr(args, "data", None):
        flags["data.roots"] = [str(p) for p in args.data]
    if args.seed is not None:
        flags["train.seed"] = args.seed
    if args.device is not None:
        flags["train.device"] = args.device
    if args.no_progress:
        flags["train.progress"] = False
    try:
        config = resolve_config(defaults, args.config, [])
        config = config.with_overrides(flags)
        return resolve_config(config, None, args.overrides)
    except ConfigError as err:
        raise CommandError(str(err)) from None


@dataclass
class Runtime:
    device: torch.device
    dist: DistInfo


def start(config: RunConfig) -> Runtime:
    """Device, process group (under torchrun) and seeds."""
    device = choose_device(config.train.device)
    info = init_distributed(device)
    seed_everything(config.train.seed, deterministic=config.train.deterministic)
    return Runtime(device, info)


def run_command(name: str, body) -> int:
    """Call ``body()``; user errors become one line on stderr and exit status 2."""
    from eegfast.train.engine import NonFiniteLossError

    try:
        return int(body() or 0)
    except (CommandError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"eegfast {name}: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"eegfast {name}: {err}", file=sys.stderr)
        return 3


def say(runtime: Runtime | None, *parts: object) -> None:
    """Print on rank 0 only (CLI output)."""
    if runtime is None or runtime.dist.is_main:
        print(*parts, flush=True)
