"""Held-out validation for ``eegfast tokenizer`` and ``eegfast pretrain`` (``data.val_fraction``).

:func:`hold_out` splits the windows of a :class:`~eegfast.train.data.TrainData` by recording:
a recording's windows are never on both sides (neighbouring windows of one recording are nearly
the same EEG, so a window-level split would validate on what the model trained on). When the
data hold several subjects, whole subjects are held out (the stricter choice: a validation
subject's EEG never trains the model); with one subject, whole recordings. The choice depends
only on ``train.seed`` and the data's subject and recording names, so every rank makes the same
one; a resumed run takes the recordings its checkpoint recorded (:meth:`HoldOut.record`).

:class:`Validator` is the engine's ``eval_fn``: at every checkpoint it runs the run's objective
over the held-out windows without gradients, under the training autocast, and returns
``val/<name>`` scalars (``val/loss`` is the metric :func:`eegfast.train.engine.fit` ranks the
checkpoints by). Pretraining masks are drawn per window from (seed, window), the same at every
evaluation, so the curve compares like with like; the tokenizer runs in eval mode, where its
codebook takes no EMA update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eegfast.nn.vq import code_perplexity
from eegfast.train.data import TrainData, collate_fn, shard_batches
from eegfast.train.distributed import DistInfo, all_reduce_mean
from eegfast.train.engine import resolve_precision
from eegfast.train.objectives import StepContext, StepFn, TargetCache, to_device

# The meta.json key of a run's held-out recordings (every checkpoint of the run has it).
META_KEY = "validation"


class ValidationSplitError(ValueError):
    """``data.val_fraction`` cannot be met by the data (or differs from the resumed run's)."""


@dataclass(frozen=True)
class HoldOut:
    """Which windows train and which validate: positions in the data's items."""

    train: list[int]
    val: list[int]
    unit: str  # "subject" (whole subjects held out) or "recording"
    recordings: list[str]  # the held-out recordings (files, as their folders list them)
    subjects: list[str]  # the held-out subjects ([] when whole recordings were held out)
    fraction: float  # data.val_fraction
    # the seed of the validation masks (pretraining): the run's first train.seed, kept on
    # resume whatever the seed then, so that every checkpoint's val/loss has the same masks
    seed: int = 0
    # held out by the run this one resumes but not in its --data: still recorded, so that a
    # later resume with them back holds them out again (dropped, they trained there)
    absent: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """What a checkpoint's meta keeps, so that a resume holds out the same recordings
        and evaluates them the same way."""
        return {
            "fraction": self.fraction,
            "unit": self.unit,
            "recordings": sorted({*self.recordings, *self.absent}),
            "subjects": self.subjects,
            "windows": len(self.val),
            "seed": self.seed,
        }

    def describe(self, total_recordings: int) -> str:
        """One line for the run's output."""
        share = len(self.recordings) / max(total_recordings, 1)
        whose = f" of {len(self.subjects)} subject(s)" if self.unit == "subject" else ""
        return (
            f"validation: {len(self.val)} windows of {len(self.recordings)} of "
            f"{total_recordings} recordings ({share:.0%}){whose} held out "
            f"(data.val_fraction={self.fraction})"
        )


def hold_out(
    data: TrainData, fraction: float, seed: int, *, resumed: dict[str, Any] | None = None
) -> HoldOut | None:
    """The run's split (None when ``fraction`` is 0 and nothing is held out).

    ``fraction`` of the recordings (rounded, at least one) is held out: as whole subjects,
    taken in an order drawn from ``seed`` until that many recordings are out, passing over a
    subject that would take the count further from it than leaving that subject out (and
    never every subject), when the data have several subjects; otherwise as recordings drawn
    from ``seed``.
    ``resumed``: the meta of the checkpoint a resumed run continues from; its recorded split is
    kept (whatever ``seed``), and so is the seed of its validation masks (:attr:`HoldOut.seed`),
    and a ``fraction`` other than the one it started with is refused, since its checkpoints'
    metrics (validation or training losses) would not compare.
    Raises :class:`ValidationSplitError`, naming ``data.val_fraction``, when one side would be
    empty.
    """
    if resumed:  # {} for a new run
        recorded = resumed.get(META_KEY) or {}
        started = float(recorded.get("fraction", 0.0))
        if started != fraction:
            raise ValidationSplitError(
                f"data.val_fraction={fraction}: the run being resumed was started with "
                f"data.val_fraction={started}; a resumed run keeps its validation split (its "
                "checkpoints are ranked by that split's loss), so resume with "
                f"--set data.val_fraction={started}, or start a new run"
            )
        if recorded:
            # (records without the seed: the seed the resumed checkpoint was trained with)
            started_seed = ((resumed.get("config") or {}).get("train") or {}).get("seed", seed)
            return _recorded_split(data, recorded, int(recorded.get("seed", started_seed)))
    if fraction <= 0:
        return None
    recordings = sorted({item.recording for item in data.items})
    total = len(recordings)
    wanted = max(1, round(fraction * total))
    if wanted >= total:
        # with one recording every fraction > 0 holds it out: "lower it" would not help
        advice = (
            "set data.val_fraction=0 (a split needs two recordings)"
            if total == 1
            else "lower it (at least one recording must stay on each side)"
        )
        raise ValidationSplitError(
            f"data.val_fraction={fraction} would hold out {wanted} of the data's {total} "
            f"recording(s), leaving none to train on; {advice}, or add recordings with more "
            "--data"
        )
    rng = np.random.default_rng(seed % 2**63)
    subjects = sorted({item.subject for item in data.items})
    held: set[str] = set()
    held_subjects: list[str] = []
    if len(subjects) > 1:
        unit = "subject"
        by_subject: dict[str, set[str]] = {}
        for item in data.items:
            by_subject.setdefault(item.subject, set()).add(item.recording)
        order = [subjects[k] for k in rng.permutation(len(subjects))]
        for subject in order:
            if len(held) >= wanted:
                break
            # (its recordings not yet held: a copy of the held set per subject tried grew
            # with subjects x recordings)
            new = by_subject[subject] - held
            grown = len(held) + len(new)
            if grown >= total:  # never every recording (the last subject)
                continue
            # A large subject drawn early held out most of the data whatever the fraction
            # (6 of 7 recordings for 0.1 when one subject had 6): it is passed over when it
            # overshoots the wanted count by more than leaving it out falls short.
            if abs(grown - wanted) > abs(len(held) - wanted):
                continue
            held |= new
            held_subjects.append(subject)
        if not held:  # every subject alone is over twice the wanted count: the smallest
            fits = [s for s in order if len(by_subject[s]) < total]
            if not fits:
                raise ValidationSplitError(
                    f"data.val_fraction={fraction}: every subject's recordings make up all of "
                    "the data's (the same files under several subject names?), none would "
                    "stay to train on; set data.val_fraction=0"
                )
            smallest = min(fits, key=lambda s: len(by_subject[s]))  # ties: the seed's order
            held, held_subjects = set(by_subject[smallest]), [smallest]
        held_subjects.sort()
    else:
        unit = "recording"
        held = {recordings[k] for k in rng.permutation(total)[:wanted]}
    return _split(data, held, unit, held_subjects, fraction, seed)


def _recorded_split(data: TrainData, recorded: dict[str, Any], seed: int) -> HoldOut:
    held = set(recorded.get("recordings") or [])
    present = held & {item.recording for item in data.items}
    fraction = float(recorded["fraction"])
    if not present:
        raise ValidationSplitError(
            f"data.val_fraction={fraction}: none of the {len(held)} recording(s) the resumed "
            "run held out for validation is in --data; resume with the data it started with"
        )
    unit = str(recorded.get("unit", "recording"))
    subjects = sorted(recorded.get("subjects") or [])
    if unit == "subject":  # a held-out subject's recordings added since stay held out too
        # (the set made once: made for every window, it grew with windows x subjects: 3M
        # windows and 400 held-out subjects took 13 s)
        held_subjects = set(subjects)
        held |= {item.recording for item in data.items if item.subject in held_subjects}
    split = _split(data, held, unit, subjects, fraction, seed)
    if not split.train:
        raise ValidationSplitError(
            f"data.val_fraction={fraction}: --data holds only the recordings the resumed run "
            "held out for validation, none to train on; resume with the data it started with"
        )
    return split


def _split(
    data: TrainData, held: set[str], unit: str, subjects: list[str], fraction: float, seed: int
) -> HoldOut:
    train, val = [], []
    for i, item in enumerate(data.items):
        (val if item.recording in held else train).append(i)
    present = {data.items[i].recording for i in val}
    recordings = sorted(held & present)
    absent = tuple(sorted(held - present))
    return HoldOut(train, val, unit, recordings, subjects, fraction, seed, absent)


def window_keys(data: TrainData, positions: Sequence[int]) -> dict[int, int]:
    """{position: key (< 2**63)} for the windows of ``data`` at ``positions``, from the
    recording's file name, task and the window's place in that recording: the seed of its
    validation masks. Dataset positions moved when a resumed run's data gained recordings or
    folders ahead of the held-out ones, and with them the masks, so that the later
    checkpoints' val/loss no longer compared with the earlier ones'. Only the held-out windows
    are hashed (the places in their recordings take one pass over the items)."""
    wanted = set(int(p) for p in positions)
    keys: dict[int, int] = {}
    previous, row, file_name = None, 0, ""
    for position, item in enumerate(data.items):  # a recording's windows are consecutive
        block = (item.root, item.task, item.recording)
        if block == previous:
            row += 1
        else:
            # the file's name, not its path: the same data prepared elsewhere (another
            # machine, a moved folder) get the same masks
            previous, row, file_name = block, 0, Path(item.recording).name
        if position in wanted:
            name = f"{file_name}\n{item.task}\n{row}".encode()
            digest = hashlib.blake2b(name, digest_size=8).digest()
            keys[position] = int.from_bytes(digest, "big") >> 1
    return keys


@dataclass
class _Batch:
    positions: list[int]  # dataset positions of the windows
    weight: float  # 1, or 0 for a batch a rank repeats only to keep the ranks in step


class Validator:
    """``eval_fn`` for :func:`eegfast.train.engine.fit`: the validation scalars at a checkpoint.

    Every rank evaluates its own batches of the held-out windows (batch ``b`` goes to rank
    ``b mod world_size``); a rank with fewer batches repeats its first with weight 0, so that
    every rank runs as many forward passes (FSDP gathers the weights in each, collectively).
    Windows weigh alike: a batch's mean loss counts by its windows, and the sums are averaged
    across ranks. Called with the engine's model (the DDP/FSDP wrapper) in eval mode; a model in
    training mode is put in eval mode for the evaluation and back after.

    Args:
        data: the whole data (``positions`` index its dataset and items).
        positions: the held-out windows.
        evaluate: ``(model, batch) -> (loss, {name: scalar}, codes or None)`` for one batch on
            the host (it moves it; ``index``: positions in ``data``, ``mask_key``: the windows'
            :func:`window_keys`); ``codes`` (any shape, -1 = none) are the tokenizer's, for
            the codebook usage over all held-out patches.
        batch_size: windows per batch on each rank.
        precision: ``train.precision`` (the training autocast).
        num_codes: the codebook size, when ``evaluate`` gives codes.
    """

    def __init__(
        self,
        data: TrainData,
        positions: Sequence[int],
        evaluate: Callable[
            [nn.Module, dict[str, Any]],
            tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None],
        ],
        *,
        device: torch.device,
        dist_info: DistInfo | None = None,
        batch_size: int = 32,
        precision: str = "auto",
        num_codes: int | None = None,
    ) -> None:
        if not positions:
            raise ValueError("a Validator needs at least one held-out window")
        self.data = data
        self.evaluate = evaluate
        self.device = device
        self.info = dist_info or DistInfo()
        self.amp_dtype = resolve_precision(precision, device)
        self.num_codes = num_codes
        self.collate = collate_fn()
        # prepared folders: each batch read whole (ShardDataset.get_batch), the batch collate
        # makes of its items (``index`` included), a few times faster; None: item by item.
        # On a GPU in pinned memory, as fit's batches: to_device then copies the windows
        # asynchronously straight from it, not through a pinned copy made first
        self.reader = shard_batches(data.dataset, self.collate, pin_memory=device.type == "cuda")
        batches: list[list[int]] = []
        groups: dict[tuple, list[int]] = {}  # batches never mix electrode sets, as training's
        for p in positions:
            groups.setdefault(data.items[int(p)].group_key, []).append(int(p))
        size = max(1, int(batch_size))
        for members in groups.values():
            batches += [members[s : s + size] for s in range(0, len(members), size)]
        rank, world = self.info.rank, self.info.world_size
        rounds = math.ceil(len(batches) / world)
        self.batches = [
            _Batch(batches[b], 1.0) if b < len(batches) else _Batch(batches[0], 0.0)
            for b in (rank + r * world for r in range(rounds))
        ]
        self.mask_keys = window_keys(data, positions)
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                sums, windows, counts = self._run(model)
        finally:
            model.train(was_training)
        names = sorted(sums)  # the same on every rank: one objective, the same batch keys
        values = torch.stack([sums[n].cpu() for n in names] + [torch.tensor(windows)]).double()
        if counts is not None:
            values = torch.cat([values, counts.cpu()])
        if self.info.enabled:  # one all-reduce for every sum
            values = all_reduce_mean(values.to(self.device), self.info).cpu()
        total = float(values[len(names)])
        scalars = {f"val/{n}": float(values[i]) / total for i, n in enumerate(names)}
        if counts is not None:
            code_counts = values[len(names) + 1 :]
            # over every held-out patch, not a batch's (a batch's usage is capped by its size)
            scalars["val/perplexity"] = float(code_perplexity(code_counts))
            scalars["val/codebook_usage"] = float((code_counts > 0).double().mean())
        self.last = scalars
        return scalars

    def _run(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], float, torch.Tensor | None]:
        # sums stay where they were computed until the end: no wait for the device per batch
        sums: dict[str, torch.Tensor] = {}
        windows = 0.0
        counts = (  # on the device too: indexing by a mask, or bincount, waits for it
            None
            if self.num_codes is None
            else torch.zeros(self.num_codes, dtype=torch.float64, device=self.device)
        )
        for batch_info in self.batches:
            if self.reader is not None:
                batch = self.reader[batch_info.positions]  # "index": the positions
            else:
                batch = self.collate([self.data.dataset[p] for p in batch_info.positions])
                batch["index"] = torch.tensor(batch_info.positions, dtype=torch.long)
            batch["mask_key"] = torch.tensor(
                [self.mask_keys[p] for p in batch_info.positions], dtype=torch.long
            )
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32
            ):
                loss, metrics, codes = self.evaluate(model, batch)
            weight = batch_info.weight * len(batch_info.positions)
            for name, value in {"loss": loss, **metrics}.items():
                value = value.detach().double().reshape(())
                # a repeated batch adds zeros (not 0 * value: a NaN there would spread)
                value = value * weight if weight else torch.zeros_like(value)
                sums[name] = sums[name] + value if name in sums else value
            windows += weight
            if counts is not None and codes is not None and weight:
                codes = codes.reshape(-1).to(self.device)
                # -1 (no code) adds 0 to code 0's count
                counts.index_add_(0, codes.clamp_min(0), (codes >= 0).double())
        return sums, windows, counts

    def summary(self) -> str:
        """The last evaluation as one line (``val/loss 1.23, val/accuracy 0.45``)."""
        return ", ".join(f"{k} {v:.4g}" for k, v in self.last.items())


def objective_evaluator(
    step: StepFn, ctx: StepContext, *, cache: TargetCache | None = None
) -> Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor], None]]:
    """A pretraining objective's loss and metrics on a held-out batch: ``step`` with ``ctx``
    fixed at epoch 0, so each window's masks depend on (seed, its ``mask_key``: its recording
    and place in it, see :func:`window_keys`) only and are the same at every evaluation.
    ``cache``: the validation windows' own tokenizer codes (never the training cache: its keys
    are positions in the training windows)."""
    fixed = dataclasses.replace(ctx, epoch=0, step=0, target_cache=cache)

    def evaluate(model: nn.Module, batch: dict[str, Any]):
        out = step(model, batch, fixed)
        metrics = {k: v for k, v in out.metrics.items() if isinstance(v, torch.Tensor)}
        return out.loss, metrics, None

    return evaluate


def tokenizer_evaluator(
    device: torch.device,
) -> Callable[
    [nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]
]:
    """The VQ-NSP tokenizer's losses on a held-out batch (reconstruction and commitment) and
    its codes. In eval mode the quantizer takes no EMA step and no dead-code restart."""

    def evaluate(model: nn.Module, batch: dict[str, Any]):
        batch = to_device(batch, device)
        out = model(
            batch["x"], batch["input_chans"], channel_padding_mask=batch.get("channel_padding_mask")
        )
        metrics = {
            "commitment_loss": out.commitment_loss,
            "amplitude_loss": out.amplitude_loss,
            "phase_loss": out.phase_loss,
        }
        return out.loss, metrics, out.indices

    return evaluate
