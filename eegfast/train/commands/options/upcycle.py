"""``eegfast upcycle --model PRETRAIN_RUN --out RUN``: turn a dense backbone into a MoE model.

The pretrained (or fine-tuned) backbone's feed-forward layers are replaced by mixture-of-experts
layers whose experts start as copies of the dense layer (``eegfast.models.upcycle``), with a
task-aware router when ``--tasks`` names the tasks to be fine-tuned. With ``noise_std=0`` the
upcycled model computes exactly what the dense one did; this is checked on a probe input and
reported. The result is a checkpoint that ``eegfast finetune --init RUN`` starts from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eegfast.train.config import UpcycleConfig, valid_keys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # as the training commands' --help: the keys --config and --set take
    parser.epilog = (
        "Configuration: defaults, then --config FILE (.toml/.yaml), then --experts and "
        "--top-k, then --set key=value (repeatable; later wins); upcycle reads "
        "upcycle.num_experts, top_k, layers and noise_std, train.seed and model.name "
        "(upcycle.task_routing, router_aux_weight and router_z_weight are fine-tuning "
        "settings: give them to eegfast finetune). "
        "Valid keys: " + ", ".join(valid_keys())
    )
    parser.add_argument(
        "--model",
        required=True,
        help="pretraining (or classifier) run/checkpoint, or a reference LaBraM checkpoint file",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--config", type=Path, default=None, help="TOML/YAML (upcycle.* keys)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. --set upcycle.num_experts=4",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier upcycled model in --out"
    )
    up = UpcycleConfig()
    parser.add_argument(
        "--experts",
        type=int,
        default=None,
        help=f"sets upcycle.num_experts (default {up.num_experts})",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help=f"sets upcycle.top_k (default {up.top_k})"
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names for task-aware routing (router ids in this order)",
    )
