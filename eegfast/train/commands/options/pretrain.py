"""``eegfast pretrain --data FOLDER... --tokenizer RUN --out RUN``: masked EEG pretraining.

``--objective masked`` (default) is LaBraM's symmetric masked modelling: half of the patches
are replaced by a mask token and the model predicts their VQ-NSP codes, and the same for the
complementary half. Other objectives plug in through
:func:`eegfast.train.objectives.register_objective` (``hybrid``: masked + block-causal
forecasting, from :mod:`eegfast.train.hybrid`).

``--set model.init=RUN_OR_FILE`` continues pretraining from an eegfast pretraining run or the
reference pretraining checkpoint (see :func:`load_init`).
"""

from __future__ import annotations

import argparse
import sys

from eegfast.train.commands.common import add_run_arguments
from eegfast.train.config import RunConfig

# Reference recipe: AdamW lr 5e-4, wd 0.05, betas (0.9, 0.98), clip 3.0, cosine with warm-up.
DEFAULTS = RunConfig().with_overrides(
    {"model.name": "labram_base_pretrain", "optim.lr": 5e-4, "train.batch_size": 64}
)

# The objectives eegfast registers itself: "masked" (eegfast.train.objectives) and those of its
# LAZY_OBJECTIVES ("hybrid"), named here as eegfast.train.objectives imports torch.
BUILTIN_OBJECTIVES = ("hybrid", "masked")


def objective_names() -> list[str]:
    """:func:`eegfast.train.objectives.objective_names` without importing that module: until
    it is imported no objective can have been registered, so they are eegfast's own."""
    objectives = sys.modules.get("eegfast.train.objectives")
    if objectives is not None:
        return objectives.objective_names()
    return sorted(BUILTIN_OBJECTIVES)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser)
    parser.add_argument(
        "--objective",
        default=None,
        help=f"one of {', '.join(objective_names())} (sets pretrain.objective; default "
        f"{DEFAULTS.pretrain.objective})",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer run, checkpoint folder or file such as the reference vqnsp.pth (sets "
        "model.tokenizer; a resumed run defaults to its own)",
    )
    parser.add_argument(
        "--model", default=None, help=f"model name (sets model.name; default {DEFAULTS.model.name})"
    )
