"""``eegfast generate``: continue an EEG recording with a hybrid-pretrained model.

    eegfast generate --model RUN_OR_CKPT --prompt FILE --seconds S --out OUT.edf|OUT.npy

The prompt is either

* a recording in any format MNE reads (EDF/BDF, FIF, BrainVision, EEGLAB, ...): its EEG
  electrodes are mapped to the LaBraM table and preprocessed as for training (band-pass
  0.1-75 Hz, mains notch, 200 Hz, units of 100 µV, via :mod:`eegfast.data`), then the window
  ``[--start, --start + --prompt-seconds)`` (default: the last ``--prompt-seconds`` seconds) is
  the prompt; or
* a prompt window already at 200 Hz: ``.npy`` (C, T) in µV whose rows the ``channels`` of its
  ``.json`` sidecar name (as this command writes one) or, without a sidecar, ``--channels``;
  or ``.npz`` with arrays ``x`` (C, T) in µV and ``channels`` (``x`` of at most 24 h: its
  members are decompressed whole, so a longer one is refused from its header). Where the file
  names its rows (sidecar, .npz), ``--channels`` picks a subset of them, in its order, as for
  a recording.

The model continues it patch by patch (1 s = 200 samples per patch) with a key/value cache
(``--no-cache`` re-encodes the context each step) within the window length it was pretrained
on (its checkpoint records it; later time-embedding rows were never trained: the prompt is at
most that long, and the context slides one patch at a time once full), drawing each patch's
VQ-NSP codes with ``--temperature`` / ``--top-k`` (``--mode tokens``) or using the regression
head (``--mode regression``). Output, in the prompt's electrode set and order, at 200 Hz:

* ``.edf``: written by MNE (``mne.export.export_raw``, edfio) with standard electrode names.
  With ``--label NAME`` an annotation NAME spans the generated part, so ``eegfast prepare``
  labels its windows NAME (and cuts none from a prompt written before it); without it, an
  onset marker ``generated`` (zero duration) says where the generated part starts, and labels
  no window (``prepare`` then labels the file by its table or file-name rules, or not at all;
  given ``--event-duration``, ``prepare`` labels windows after it ``generated`` unless an
  ``--event-map`` leaves it out).
  EDF data records are 1 s, so ``--seconds`` is rounded up to whole seconds (generated
  samples, not padding). With ``--include-prompt``, a recording prompt's annotations within
  its window (events, BAD spans, channel-specific ones on the electrodes written) are kept,
  onsets from the prompt's start, spans clipped at its ends;
* ``.npy``: float32 (C, T) in µV, plus ``OUT.json`` with channel names, rate and settings
  (and ``label``; with ``--include-prompt``, the prompt's ``annotations`` as above).

Files are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import argparse
import math


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seconds must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"--seconds must be > 0, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model",
        required=True,
        help="hybrid checkpoint: a .safetensors file, a checkpoint folder, or a run folder",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help="recording to continue (EDF, BDF, FIF, ...) or a prompt window (.npy/.npz, µV)",
    )
    parser.add_argument(
        "--seconds", required=True, type=_positive_seconds, help="seconds of EEG to generate"
    )
    parser.add_argument("--out", required=True, help="output file, .edf or .npy")
    parser.add_argument(
        "--channels",
        default=None,
        help="comma-separated electrodes: a subset (and order) of the recording's (or of a "
        ".npz's or a .npy sidecar's), or the row names of a .npy prompt without a sidecar",
    )
    parser.add_argument(
        "--start",
        type=float,
        default=None,
        help="start of the prompt window in the recording, seconds (default: its last part)",
    )
    parser.add_argument(
        "--prompt-seconds",
        type=int,
        default=None,
        help="length of the prompt window in whole seconds (default 8, or the model's "
        "pretraining window if shorter; at most that window, 16 s for LaBraM)",
    )
    parser.add_argument(
        "--notch",
        type=float,
        default=50.0,
        help="mains frequency of the prompt recording in Hz (50/60; 0 = no notch; default 50)",
    )
    parser.add_argument(
        "--mode",
        choices=("tokens", "regression"),
        default="tokens",
        help="tokens: sample VQ-NSP codes (default); regression: use the regression head",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy codes (default 1; --mode tokens only)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sample among the k best codes (default: all; --mode tokens only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="re-encode the context per step")
    parser.add_argument(
        "--include-prompt", action="store_true", help="write the prompt before the generated part"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument(
        "--label",
        default=None,
        help="class of the generated EEG: an EDF annotation over the generated part, which "
        "eegfast prepare reads as the label of its windows (and 'label' in a .npy's sidecar)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------
