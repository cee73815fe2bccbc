"""``eegfast evaluate --model RUN --data FOLDER... --out DIR``: evaluate a checkpoint.

- A fine-tuned model (with task heads, e.g. ``runs/finetune/fold0/multitask``): its predictions
  on the labelled windows of its tasks, with the metrics, confusion matrices and ROC curves.
  Windows from the recordings a fold model was fine-tuned on are left out (its checkpoint
  records them), so the scores are held-out scores; ``--include-training-windows`` scores them
  too, with a warning. ``predictions.csv`` has every scored window's prediction (its window
  index in its recording and start in seconds, as ``eegfast predict`` writes them).
  Labels are matched to the model's classes by name (its checkpoint records them, in its
  heads' order), so the data may have fewer classes, or number them otherwise; windows of a
  class the model does not have are refused (their scores would mean nothing). Data the model
  cannot take (another window length or amplitude scale) is refused as ``predict`` refuses it.
- A pretrained or upcycled backbone: a linear probe with grouped k-fold cross-validation
  (``--folds k``; logistic regression on frozen features) against the band-power baseline on
  the same folds.

``--export-features FILE.npz`` also writes the frozen pooled features (N, E) of every window
with its task, label, subject and recording (for zero-shot or external linear use): the
backbone's ``forward_features`` (a fine-tuned model's backbone; a pretraining checkpoint as the
classifier backbone the linear probe takes). Entries: ``features`` (N, E) float32, ``task``,
``subject``, ``recording`` (N,) str, ``label`` (N,) int (-1: unlabelled; an index into that
task's classes) and ``label_names/<task>`` (the task's class names in label order, as
``--data`` numbers them).

``--out`` gets ``report.md``, ``results.csv``, ``summary.json``, ``predictions.npz``, the plots
and ``tensorboard/``; an earlier evaluation's are replaced, and a folder holding a training run
(checkpoints, metrics) is refused. The report names the tasks of ``--data`` it does not score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eegfast.train.commands.common import add_run_arguments
from eegfast.train.config import RunConfig


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, training=False)
    parser.add_argument("--model", required=True, help="run folder, checkpoint or .safetensors")
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="k of the linear probe's k-fold (finetune.folds; default "
        f"{RunConfig().finetune.folds}; unused for a fine-tuned model)",
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated tasks (data.tasks; default: all)"
    )
    parser.add_argument(
        "--include-training-windows",
        action="store_true",
        help="also score windows from the recordings the model was fine-tuned on",
    )
    parser.add_argument(
        "--export-features",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help="write frozen features of every window",
    )
