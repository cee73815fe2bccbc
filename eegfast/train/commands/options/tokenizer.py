"""``eegfast tokenizer --data FOLDER... --out RUN``: train the VQ-NSP tokenizer.

The tokenizer learns a codebook of EEG patches by reconstructing each patch's Fourier
amplitude and phase from its code (LaBraM's VQ-NSP). Its checkpoint is what ``eegfast pretrain
--tokenizer RUN`` uses to make masked-modelling targets.
"""

from __future__ import annotations

import argparse

from eegfast.train.commands.common import add_run_arguments
from eegfast.train.config import RunConfig

# Reference recipe: AdamW betas (0.9, 0.99), weight decay 1e-4, warm-up then cosine.
DEFAULTS = RunConfig().with_overrides(
    {
        "model.name": "vqnsp_base",
        "optim.lr": 1e-4,
        "optim.betas": [0.9, 0.99],
        "optim.weight_decay": 1e-4,
        "train.batch_size": 128,
    }
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser)
    parser.add_argument(
        "--model",
        default=None,
        help=f"tokenizer name (sets model.name; default {DEFAULTS.model.name})",
    )
