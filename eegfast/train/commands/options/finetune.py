"""``eegfast finetune --data FOLDER... --out RUN [--init RUN] [--folds k]``: fine-tune with
subject-wise cross-validation.

Starts from a pretrained, upcycled (MoE) or fine-tuned run (``--init``, sets model.init), from
a checkpoint file of the reference LaBraM (its ``labram-base.pth``, a classifier state dict or
braindecode ``Labram`` weights: the model is read from the tensor shapes, or named with
``--set model.name``), or from scratch (``model.name``). With several tasks in the data,
trains one multi-task model (a head per task, the task id routed to MoE layers) and, unless
``finetune.single_task_baseline=false``, one model per task on the same folds for the
negative-transfer report. ``finetune.mode=linear`` fits logistic regression on frozen features
instead. The classic baseline (log band power + logistic regression) runs on the same folds.
Writes one run folder per fold and variant (``fold<i>/multitask``, ``fold<i>/single-<task>``;
a task name that is no file name everywhere, or that another task repeats in other case, as
``single-<name with _>-<digest>``), and results.csv, summary.json, predictions.npz, report.md
and PNG plots into --out. The report calls a model better or worse than the baseline (or
another variant) only when the 95% paired bootstrap interval of the balanced-accuracy
difference, resampling whole subjects or recordings (the unit the folds are grouped by),
excludes 0 and at least 6 of them were tested.

Each fold's model trains on the whole training part for train.epochs (no validation part:
data.val_fraction is not used) and its last model is tested. results.csv has one row per
fold (0-based, as the fold folders), variant (multitask, single, linear_probe, band_power),
task and metric; the report's mean ± std is over the folds where a metric is defined
(population std). predictions.npz holds, per variant, task and fold i, the test windows'
``<variant>_<task>_fold<i>_y`` (labels), ``..._probs`` (N, classes, in the task's class
order), ``..._subject`` and ``..._recording``, row for row.
"""

from __future__ import annotations

import argparse

from eegfast.train.commands.common import add_run_arguments
from eegfast.train.config import RunConfig

# Reference recipe: layer-wise lr decay 0.65, lr 5e-4, wd 0.05, drop path 0.1.
DEFAULTS = RunConfig().with_overrides(
    {
        "model.name": "labram_base",
        "model.drop_path": 0.1,
        "optim.lr": 5e-4,
        "optim.layer_decay": 0.65,
        "train.batch_size": 64,
        "train.epochs": 10,
    }
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, resume_folders=False)
    parser.add_argument(
        "--init",
        default=None,
        help="run/checkpoint, or reference LaBraM checkpoint file, to start from (model.init)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help=f"k of k-fold (finetune.folds; default {DEFAULTS.finetune.folds})",
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated tasks (data.tasks; default: all)"
    )
    parser.add_argument("--linear", action="store_true", help="linear probe (finetune.mode)")
