"""Run code of ``eegfast predict``: apply a fine-tuned model to prepared folders.

Its description (``eegfast predict --help``) and options are in
:mod:`eegfast.train.commands.options.predict`, read without importing torch.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from eegfast.data import load_index
from eegfast.data.index import preprocess_settings
from eegfast.data.preprocess import PATCH_SAMPLES, TARGET_SFREQ
from eegfast.fileio import write_text_atomic
from eegfast.progress import progress_bar
from eegfast.train.arch import (
    REFERENCE,
    MultiTaskClassifier,
    check_arch_record,
    load_trained,
    routes_by_task,
)
from eegfast.train.checkpoint import fine_tuning_folder_hint, read_meta
from eegfast.train.commands.common import (
    CommandError,
    check_out,
    hold_lock,
    resolve,
    run_command,
    say,
    start,
)
from eegfast.train.commands.options.predict import PREDICTIONS, configure_parser  # noqa: F401
from eegfast.train.config import RunConfig
from eegfast.train.data import TrainData, check_table_rows, load_data
from eegfast.train.distributed import shutdown
from eegfast.train.finetune import predict, predict_heads

FIXED_COLUMNS = ["recording", "subject", "window", "start_s", "task", "predicted", "label"]
# Preprocessing that changes what the model sees without making it unusable: a warning only
# (the mains notch differs between countries and is left out on purpose).
SOFT_SETTINGS = ("l_freq", "h_freq", "reference")


def main(args: argparse.Namespace) -> int:
    return run_command("predict", lambda: _main(args))


@dataclass
class TrainedOn:
    """What a model was fine-tuned on: as its checkpoint records it, or, for checkpoints that
    do not, as the folders it was fine-tuned on (``meta["config"]["data"]``) tell, where their
    ``index.json`` files can still be read."""

    label_names: dict[str, list[str]] = field(default_factory=dict)  # task -> class names
    window_seconds: set[int] = field(default_factory=set)
    preprocess: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (root, settings)


def trained_on(meta: dict[str, Any]) -> TrainedOn:
    """The class names in the heads' output order, window lengths and preprocessing the model
    was fine-tuned with: the checkpoint's ``label_names``, ``window_seconds`` and
    ``preprocess`` (:func:`~eegfast.train.finetune.prepared_like`) where it has them; else
    read from the training folders (class names merged in
    :func:`~eegfast.train.data.load_data`'s order, so that class ids match the heads'
    outputs), empty when any of them cannot be read (moved, or another machine): a partial
    merge could give classes in another order."""
    if meta.get("label_names") is not None:
        return TrainedOn(
            label_names={t: list(names) for t, names in meta["label_names"].items()},
            window_seconds={int(s) for s in meta.get("window_seconds") or []},
            preprocess=[
                (str(entry["root"]), dict(entry["settings"]))
                for entry in meta.get("preprocess") or []
            ],
        )
    data = (meta.get("config") or {}).get("data") or {}
    wanted = set(data.get("tasks") or [])
    found = TrainedOn()
    for root in data.get("roots") or []:
        try:
            index = load_index(root)
        except (ValueError, OSError):
            return TrainedOn()
        keep = sorted(t for t in index.get("tasks", {}) if not wanted or t in wanted)
        if not keep:
            continue  # load_data skips such a folder too
        for task in keep:
            merged = found.label_names.setdefault(task, [])
            merged += [n for n in index["tasks"][task]["labels"] if n not in merged]
        found.window_seconds.add(int(index["window_seconds"]))
        found.preprocess.append((str(root), preprocess_settings(index)))
    return found


def class_names(
    heads: dict[str, int], tasks: Sequence[str], known: TrainedOn, data: TrainData
) -> tuple[dict[str, list[str]], list[str]]:
    """Per task, its head's class names in output order, and notes on names not taken from
    the training folders (from ``--data`` where it has the task with as many classes, else
    ``class0``, ``class1``, ...)."""
    names, notes = {}, []
    for task in tasks:
        n = int(heads[task])
        if meta_names := known.label_names.get(task):
            if len(meta_names) == n:
                names[task] = list(meta_names)
                continue
        if len(data.label_names.get(task) or []) == n:
            names[task] = list(data.label_names[task])
            notes.append(
                f"task {task!r}: the folders the model was fine-tuned on cannot be read (or "
                f"no longer have its {n} classes); class names taken from --data "
                f"({', '.join(names[task])})"
            )
            continue
        names[task] = [f"class{i}" for i in range(n)]
        notes.append(
            f"task {task!r}: class names unknown (the folders the model was fine-tuned on "
            f"cannot be read, and --data does not have its {n} classes): written as "
            f"class0..class{n - 1}"
        )
    return names, notes


def _backbone_config(model) -> Any:
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "config", None)


def check_data(model, known: TrainedOn, data: TrainData) -> list[str]:
    """CommandError naming the folder for data the model cannot take: electrodes past its
    embedding table, patches of another length, windows longer than its time embedding or of
    another length (or amplitude scale) than the folders it was fine-tuned on. Returns
    warnings for milder preprocessing differences (band-pass edges, reference)."""
    config = _backbone_config(model)
    if config is not None:
        # the training commands' check: the windows' electrodes named as their recordings do
        try:
            check_table_rows(data, int(getattr(config, "pos_rows", 0)) or None, "the model")
        except ValueError as err:
            raise CommandError(str(err)) from None
    warnings: list[str] = []
    # each folder's window length and settings as load_data read its index.json (read again,
    # a folder of 3M windows took 1.4 s more and a second copy of its index in memory)
    datasets = data.dataset.datasets if isinstance(data.dataset, ConcatDataset) else [data.dataset]
    for root, dataset in zip(data.roots, datasets, strict=True):
        seconds = dataset.window_seconds
        if config is not None:
            patch = int(getattr(config, "patch_size", PATCH_SAMPLES))
            if getattr(config, "patch_embed", "temporal_conv") == "temporal_conv" and (
                patch != PATCH_SAMPLES
            ):
                raise CommandError(
                    f"--data {root}: windows of {PATCH_SAMPLES}-sample patches (1 s at "
                    f"{TARGET_SFREQ:g} Hz), the model takes patches of {patch} samples"
                )
            limit = int(getattr(config, "max_patches", seconds))
            if seconds > limit:
                raise CommandError(
                    f"--data {root}: {seconds}-s windows, the model takes at most {limit} "
                    "patches (seconds) per window"
                )
        if known.window_seconds and seconds not in known.window_seconds:
            trained = ", ".join(f"{s}-s" for s in sorted(known.window_seconds))
            raise CommandError(
                f"--data {root}: {seconds}-s windows, the model was fine-tuned on {trained} "
                f"windows; prepare the data again with --window {min(known.window_seconds)}"
            )
        settings = dataset.preprocess_settings
        scales = {s.get("scale") for _, s in known.preprocess} - {None}
        if scales and settings.get("scale") is not None and settings["scale"] not in scales:
            trained = ", ".join(f"{s:g}" for s in sorted(scales))
            raise CommandError(
                f"--data {root}: amplitudes scaled by {settings['scale']:g} (volts to stored "
                f"units), the model was fine-tuned on data scaled by {trained}; prepare the "
                "data again with the same scale"
            )
        soft = [{k: s.get(k) for k in SOFT_SETTINGS} for _, s in known.preprocess]
        if soft and {k: settings.get(k) for k in SOFT_SETTINGS} not in soft:
            source, trained_settings = known.preprocess[0]
            changed = [
                f"{key} {settings.get(key)!r} (fine-tuned with {trained_settings.get(key)!r})"
                for key in SOFT_SETTINGS
                if settings.get(key) != trained_settings.get(key)
            ]
            warnings.append(
                f"--data {root} was prepared with other settings than {source}, which the "
                f"model was fine-tuned on: {', '.join(changed)}; its predictions may suffer"
            )
    return warnings


def window_positions(data: TrainData) -> list[tuple[int, float]]:
    """(window index in its recording, start in seconds) of every item of ``data``, read from
    its folders' recordings in the order :func:`~eegfast.train.data.load_data` made the items."""
    datasets = data.dataset.datasets if isinstance(data.dataset, ConcatDataset) else [data.dataset]
    positions = [
        (w, start / TARGET_SFREQ)
        for dataset in datasets
        for rec in dataset.recordings
        for w, start in enumerate(rec["starts"])
    ]
    if len(positions) != len(data.items):  # would misplace every row after the first difference
        raise RuntimeError(f"{len(positions)} window positions for {len(data.items)} windows")
    return positions


def seconds_text(seconds: float) -> str:
    """``seconds`` in full, without exponent (``4``, ``12345.675``): ``:g`` kept six digits,
    so that windows past 10000 s lost their fraction (12345.675 -> 12345.7) and two windows
    could share one start."""
    return np.format_float_positional(seconds, trim="-")


def write_predictions(
    path: Path,
    data: TrainData,
    names: dict[str, list[str]],
    scored: Sequence[tuple[str, np.ndarray]],
) -> Path:
    """``predictions.csv`` (atomically): one row per window and task of ``scored``.

    scored: (task, probabilities (len(data), classes of the task)) per task, rows in item order.
    Columns: :data:`FIXED_COLUMNS`, then ``p_<class>`` for every class of the scored tasks
    (in first-seen order; tasks sharing a class name share its column)."""
    classes: list[str] = []
    for task, _ in scored:
        classes += [c for c in names[task] if c not in classes]
    column = {c: i for i, c in enumerate(classes)}
    positions = window_positions(data)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FIXED_COLUMNS + [f"p_{c}" for c in classes])
    for task, probs in scored:
        task_names = names[task]
        for item, (window, start_s), row in zip(data.items, positions, probs, strict=True):
            label = ""
            if item.task == task and item.label >= 0:
                label = data.label_names[item.task][item.label]
            cells = [""] * len(classes)
            for c, p in zip(task_names, row, strict=True):
                cells[column[c]] = f"{p:.6g}"
            writer.writerow(
                [
                    item.recording,
                    item.subject,
                    window,
                    seconds_text(start_s),
                    task,
                    task_names[int(np.argmax(row))],
                    label,
                    *cells,
                ]
            )
    return write_text_atomic(path, buffer.getvalue())


def _chosen_tasks(text: str | None, heads: dict[str, int], model: str) -> list[str]:
    if not text:
        return list(heads)
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in heads]
    if not tasks or unknown:
        raise CommandError(
            f"--tasks: {', '.join(unknown) or repr(text)}: --model {model} has no head for it; "
            f"its heads are {', '.join(heads)}"
        )
    return tasks


class NamedHead(nn.Module):
    """A classifier with its own single head (``model(x, ...) -> logits``), under the task
    name ``task``, called as a fine-tuned multi-task model is: forward(x (B, C, A, 200),
    input_chans, *, channel_padding_mask=None, task=name, task_id=None) -> logits
    (B, classes). ``backbone`` is the classifier (its ``config`` is checked against the data)."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone = model
        self.task = task

    def forward(
        self,
        x: torch.Tensor,
        input_chans: torch.Tensor | None = None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task: str | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if task is not None and task != self.task:
            raise ValueError(f"no head for task {task!r}; its head: {self.task!r}")
        return self.backbone(
            x, input_chans, channel_padding_mask=channel_padding_mask, task_id=task_id
        )


def _reference_head(
    model: str, loaded: nn.Module, arch: dict[str, Any], text: str | None
) -> dict[str, int]:
    """{task: classes} of a classifier file without an eegfast record (``loaded``: the model
    read by its tensor shapes, with ``arch``): its one head, named by ``--tasks`` (``text``),
    which must name one task; {} for a file without a head (a pretraining or backbone file),
    refused by the caller."""
    # the model's own count: arch's kwargs leave out a num_classes equal to the default
    n = int(getattr(getattr(loaded, "config", None), "num_classes", 0) or 0)
    if arch.get("kind") != "classifier" or n < 1:
        return {}
    tasks = list(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))
    if len(tasks) != 1:
        given = f"--tasks {text!r} names {len(tasks)} tasks" if text else "no --tasks"
        raise CommandError(
            f"--model {model}: a classifier file without an eegfast record (read by its tensor "
            f"shapes: {arch['name']}, one head of {n} classes) names neither its task nor its "
            f"classes, and {given}: name its task with --tasks NAME (one task; the class "
            "names are taken from --data's task of that name)"
        )
    return {tasks[0]: n}


def reference_class_names(model: str, task: str, n: int, data: TrainData) -> tuple[list[str], str]:
    """The class names of the one head (``n`` outputs) of a classifier file without an eegfast
    record, named ``task`` by --tasks, and a note saying where they come from: ``--data``'s
    classes of ``task`` when it has ``n`` of them (in its order: the file cannot confirm it),
    else ``class0``, ``class1``, ..."""
    own = list(data.label_names.get(task) or [])
    if len(own) == n:
        return own, (
            f"--model {model} records no class names: its {n} outputs are taken to be --data's "
            f"{task!r} classes in --data's order ({', '.join(own)}); the predicted classes are "
            "misnamed if it was fine-tuned on them in another order"
        )
    has = f"{len(own)} {task!r} classes ({', '.join(own)})" if own else f"no {task!r} classes"
    return [f"class{i}" for i in range(n)], (
        f"--model {model} records no class names and --data has {has}, not {n}: its outputs "
        f"are written as class0..class{n - 1}"
    )


def read_model_meta(model: str) -> dict[str, Any]:
    """``meta.json`` of ``--model``; for the top folder of a fine-tuning (no weights of its
    own) an error naming its fold models."""
    try:
        return read_meta(model)
    except FileNotFoundError:
        hint = fine_tuning_folder_hint(model)
        if hint is None:
            raise
        raise CommandError(f"--model {model}: {hint}") from None


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out(out)
    batch_size = args.batch_size
    if batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {batch_size}")
    if (out / PREDICTIONS).exists() and not args.overwrite:
        raise CommandError(
            f"--out {out}: holds an earlier {PREDICTIONS}; replace it with --overwrite, or "
            "choose another --out"
        )
    config = resolve(args, RunConfig())
    meta = read_model_meta(args.model)
    model = None
    if meta.get("arch") is None and Path(args.model).is_file():
        # a file without an eegfast record: read by its tensor shapes (ValueError if unknown)
        model, meta = load_trained(args.model)
    arch = meta.get("arch")
    if arch is None:
        raise CommandError(
            f"--model {args.model}: no architecture record (meta.json 'arch'); not an eegfast run"
        )
    check_arch_record(arch, f"--model {args.model}")  # (its heads are read before loading)
    reference = meta.get("command") == REFERENCE
    if reference:
        heads = _reference_head(args.model, model, arch, args.tasks)
    else:
        heads = dict(arch.get("heads") or {})
    if not heads:
        kind = arch.get("kind") or meta.get("command")
        raise CommandError(
            f"--model {args.model}: a {kind!r} checkpoint without task heads: fine-tune it first "
            f"(eegfast finetune --init {args.model}), or linear-probe its features with "
            "eegfast evaluate"
        )
    tasks = _chosen_tasks(args.tasks, heads, args.model)
    runtime = start(config)
    try:
        data = load_data(config.data.roots, config.data.tasks)  # --set data.tasks: a subset
        if model is None:
            model, meta = load_trained(args.model)
        known = trained_on(meta)
        for warning in check_data(model, known, data):
            say(runtime, f"warning: {warning}")
        if reference:  # its one head, under the task name --tasks gave it
            (task,) = tasks
            model = NamedHead(model, task)
            head_names, note = reference_class_names(args.model, task, heads[task], data)
            names, notes = {task: head_names}, [note]
        else:
            names, notes = class_names(heads, tasks, known, data)
        for note in notes:
            say(runtime, f"note: {note}")
        model.to(runtime.device)
        ids = {t: i for i, t in enumerate(meta.get("task_names") or [])}
        routes = routes_by_task(meta)
        scored = _predict_all(model, data, tasks, ids, routes, runtime, config, batch_size)
        if runtime.dist.is_main:
            with hold_lock(out):
                if (out / PREDICTIONS).exists() and not args.overwrite:  # made meanwhile
                    raise CommandError(
                        f"--out {out}: holds an earlier {PREDICTIONS}; replace it with "
                        "--overwrite, or choose another --out"
                    )
                path = write_predictions(out / PREDICTIONS, data, names, scored)
            labelled = sum(
                1 for task in tasks for item in data.items if item.task == task and item.label >= 0
            )
            recordings = len({(i.root, i.recording) for i in data.items})
            say(
                runtime,
                f"predicted {len(data)} windows of {recordings} "
                f"recording(s) with {len(tasks)} head(s) ({', '.join(tasks)}): "
                f"{len(data) * len(tasks)} rows, {labelled} with a label; {path}",
            )
        return 0
    finally:
        shutdown(runtime.dist)


def _predict_all(
    model, data: TrainData, tasks, ids, routes: bool, runtime, config: RunConfig, batch_size: int
) -> list[tuple[str, np.ndarray]]:
    """(task, probabilities (len(data), classes)) per task, through finetune's ``predict`` (the
    path evaluate takes: eval mode, no grad, fp32), a batch of indices at a time for the bar.
    A multi-task model that does not route by task computes its features once per batch for
    every head (finetune's ``predict_heads``); a task-routed one runs once per task (its features
    depend on the task id)."""
    everything = np.arange(len(data))
    shared = not routes and len(tasks) > 1 and isinstance(model, MultiTaskClassifier)
    parts: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    with progress_bar(
        total=len(data) * len(tasks),
        desc="predict",
        unit="window",
        disable=not (runtime.dist.is_main and config.train.progress),
        dynamic_ncols=True,
    ) as bar:
        if shared:
            for begin in range(0, len(data), batch_size):
                chunk = everything[begin : begin + batch_size]
                heads = predict_heads(
                    model, data, chunk, tasks, runtime.device, batch_size=batch_size
                )
                for task, probs in heads.items():
                    parts[task].append(probs)
                bar.update(len(chunk) * len(tasks))
        else:
            for task in tasks:
                for begin in range(0, len(data), batch_size):
                    chunk = everything[begin : begin + batch_size]
                    probs, _ = predict(
                        model,
                        data,
                        chunk,
                        task,
                        runtime.device,
                        task_id=ids.get(task) if routes else None,
                        batch_size=batch_size,
                    )
                    parts[task].append(probs)
                    bar.update(len(chunk))
    return [(task, np.concatenate(parts[task])) for task in tasks]
