"""``eegfast predict --model RUN --data FOLDER... --out DIR``: apply a fine-tuned model.

Runs a model with task heads (a fold model of ``eegfast finetune``, e.g.
``runs/finetune/fold0/multitask``, one of its checkpoints or its ``.safetensors``) on every
window of the prepared folders, labelled or not, and writes ``DIR/predictions.csv``: one row
per window and head (``--tasks`` picks heads; default all of them) with the recording, subject,
window index in its recording, its start in seconds, the task, the predicted class, the window's
own label where it has one for that task (empty otherwise), and one ``p_<class>`` probability
column per class (empty for the classes of other tasks). Scores nothing: ``eegfast evaluate``
scores a model on labelled held-out windows (the same probabilities, as it runs the model the
same way) or linear-probes a pretrained backbone.

Class names, window length and preprocessing come from the checkpoint (older checkpoints:
from the folders the model was fine-tuned on, which the checkpoint names; where those are gone,
class names from ``--data`` if it has the task with as many classes). Folders the model cannot
take are refused before any work: electrodes it has no embedding row for, another patch
length, window length or amplitude scale than it was trained with.

A classifier file without an eegfast record (a LaBraM fine-tuned by the reference code, or
braindecode ``Labram`` weights, read by its tensor shapes) has one head and neither task nor
class names: ``--tasks NAME`` (one task) names its head, and its outputs take the class names of
``--data``'s task of that name where it has as many classes (in ``--data``'s order, which the
file cannot confirm), else ``class0``, ``class1``, ...
"""

from __future__ import annotations

import argparse

from eegfast.train.commands.common import add_run_arguments

PREDICTIONS = "predictions.csv"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, training=False)
    parser.add_argument(
        "--model",
        required=True,
        help="fine-tuned run folder, checkpoint or .safetensors, or a classifier file of the "
        "reference code",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task heads to apply (default: all); for a classifier file "
        "without an eegfast record: the one task its head is for (required)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="windows per forward pass (default 64)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace an earlier {PREDICTIONS} in --out"
    )
