"""Run code of ``eegfast evaluate``: score a fine-tuned model on held-out windows, or
linear-probe a backbone.

Its description (``eegfast evaluate --help``) and options are in
:mod:`eegfast.train.commands.options.evaluate`, read without importing torch.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eegfast.fileio import write_atomic, write_text_atomic
from eegfast.train.arch import backbone_from_checkpoint, build_model, load_trained, routes_by_task
from eegfast.train.commands.common import (
    REPORT_ARTEFACTS,
    CommandError,
    hold_lock,
    previous_run,
    resolve,
    run_command,
    say,
    start,
)
from eegfast.train.commands.options.evaluate import configure_parser  # noqa: F401
from eegfast.train.commands.predict import (
    check_data,
    class_names,
    read_model_meta,
    seconds_text,
    trained_on,
    window_positions,
)
from eegfast.train.config import RunConfig
from eegfast.train.data import TrainData, load_data
from eegfast.train.distributed import shutdown
from eegfast.train.finetune import (
    Backbone,
    CVResult,
    _record,
    cross_validate,
    load_backbone_weights,
    predict,
    pretraining_unrecorded,
    write_outputs,
)


def main(args: argparse.Namespace) -> int:
    return run_command("evaluate", lambda: _main(args))


def feature_model(arch: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The classifier backbone ``arch`` with ``weights`` (as :func:`backbone_from_checkpoint`
    gives them), built as the linear probe builds it, so that exported features are the ones
    it fits on. forward_features(x (B, C, A, 200), input_chans, ...) -> (B, E)."""
    model = build_model(arch)
    load_backbone_weights(model, weights)
    return model


def export_features(
    model: nn.Module,
    data: TrainData,
    path: Path,
    device,
    task_names: list[str],
    routes: bool,
) -> Path:
    """``path`` (.npz, atomically): ``model.forward_features`` (N, E) of every window of
    ``data`` with its task, label id, subject and recording, and per task its class names
    (``label_names/<task>``, in ``data.label_names`` order: a label id indexes them).

    model: a fine-tuned model or a classifier backbone (:func:`feature_model`); a pretraining
    model has no pooled features. task_names: the router's task ids (used where ``routes``)."""
    ids = {t: i for i, t in enumerate(task_names)}
    chunks = {}
    for task in data.tasks:
        indices = np.array([i for i, item in enumerate(data.items) if item.task == task])
        feats, _ = predict(
            model,
            data,
            indices,
            task,
            device,
            features=True,
            task_id=ids.get(task) if routes else None,
        )
        chunks[task] = (indices, feats)
    dim = next(iter(chunks.values()))[1].shape[1]
    features = np.zeros((len(data), dim), dtype=np.float32)
    for indices, feats in chunks.values():
        features[indices] = feats

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                features=features,
                label=np.array([i.label for i in data.items]),
                task=np.array([i.task for i in data.items]),
                subject=np.array([i.subject for i in data.items]),
                recording=np.array([i.recording for i in data.items]),
                # label ids alone cannot be read: each folder numbers its own classes
                **{
                    f"label_names/{task}": np.array(data.label_names.get(task) or [], dtype=str)
                    for task in data.tasks
                },
            )

    return write_atomic(path, save)


def write_predictions(
    path: Path, data: TrainData, scored: list[tuple[str, np.ndarray, np.ndarray]]
) -> Path:
    """One row per scored window: task, recording, subject, the window's index in its
    recording and start in seconds (as ``eegfast predict`` writes them, so that the two files
    line up), label and predicted class names, the class probabilities (space-separated, in
    the task's class order: ``data.label_names``, the model's classes) and that order
    (``classes``, the class names as a JSON list, so the file says which column is which: class
    names taken from annotations often hold spaces, "Sleep stage W").

    scored: (task, window indices (n,), probabilities (n, classes)) per task.
    """
    positions = window_positions(data)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["task", "recording", "subject", "window", "start_s", "label", "predicted", "probabilities"]
        + ["classes"]
    )
    for task, indices, probs in scored:
        names = data.label_names[task]
        order = json.dumps(list(names), ensure_ascii=False)
        for index, row in zip(indices, probs, strict=True):
            item = data.items[int(index)]
            window, start_s = positions[int(index)]
            writer.writerow(
                [
                    task,
                    item.recording,
                    item.subject,
                    window,
                    seconds_text(start_s),
                    names[item.label],
                    names[int(np.argmax(row))],
                    " ".join(f"{p:.6g}" for p in row),
                    order,
                ]
            )
    return write_text_atomic(path, buffer.getvalue())


def model_class_names(
    model_path: str, heads: dict[str, int], tasks: Sequence[str], meta: dict, data: TrainData
) -> tuple[dict[str, list[str]], list[str]]:
    """Per task, the class names of the model's head in output order, and warnings.

    Recorded in the checkpoint (older ones: read from the folders it was fine-tuned on). Where
    neither can be read, ``--data``'s classes are taken if it has as many, with a warning (the
    scores are wrong if the model numbered them otherwise); else CommandError: no output could
    be matched to a class."""
    known = trained_on(meta)
    names, _ = class_names(heads, tasks, known, data)
    notes = []
    for task in tasks:
        recorded = known.label_names.get(task)
        if recorded and len(recorded) == int(heads[task]):
            continue
        if names[task] == data.label_names.get(task):
            notes.append(
                f"task {task!r}: --model {model_path} does not record its class names and the "
                "folders it was fine-tuned on cannot be read: its outputs are taken to be "
                f"--data's classes in --data's order ({', '.join(names[task])}); the scores "
                "are wrong if it was fine-tuned on them in another order"
            )
            continue
        raise CommandError(
            f"--model {model_path}: the class names of its {task!r} head ({heads[task]} "
            "outputs) are not recorded in its checkpoint and the folders it was fine-tuned on "
            f"cannot be read; --data has {len(data.label_names.get(task) or [])} classes for "
            f"{task!r} ({', '.join(data.label_names.get(task) or [])}), so no output can be "
            "matched to a class"
        )
    return names, notes


def in_model_classes(data: TrainData, names: dict[str, list[str]], model_path: str) -> TrainData:
    """``data`` with the labels of the tasks in ``names`` renumbered, by class name, to the
    model's classes (``names[task]``, its head's output order), which become its
    ``label_names``: each folder numbers its own classes (a folder with a subset of them, or
    another order, numbers them otherwise), and the scores must compare a window's label with
    the output for the same class.

    A labelled window of a class the model does not have is refused (CommandError naming the
    task, the classes and the folder): its score would mean nothing, and leaving it out would
    hide what is usually a naming slip (other label rules or spelling) behind scores of a part
    of the data."""
    label_names = dict(data.label_names)
    remap: dict[str, list[int]] = {}
    for task, model_names in names.items():
        own = data.label_names.get(task) or []
        remap[task] = [model_names.index(n) if n in model_names else -1 for n in own]
        label_names[task] = list(model_names)
        unknown: dict[str, set[int]] = {}  # class name -> folders (positions in data.roots)
        for item in data.items:
            if item.task == task and item.label >= 0 and remap[task][item.label] < 0:
                unknown.setdefault(own[item.label], set()).add(item.root)
        if unknown:
            folders = sorted({int(r) for found in unknown.values() for r in found})
            where = ", ".join(str(data.roots[r]) for r in folders)
            raise CommandError(
                f"--data {where}: task {task!r} has windows labelled "
                f"{', '.join(sorted(unknown))}, which --model {model_path} has no class for "
                f"(its {task!r} classes: {', '.join(model_names)}); their scores would mean "
                "nothing: prepare the data again with the model's classes only (e.g. "
                "--classes), or leave the task out with --tasks"
            )
    items = [
        dataclasses.replace(item, label=remap[item.task][item.label])
        if item.task in remap and item.label >= 0
        else item
        for item in data.items
    ]
    return TrainData(data.dataset, items, label_names, data.roots)


def training_windows(meta: dict, data: TrainData, indices: np.ndarray) -> np.ndarray:
    """The positions in ``indices`` of windows from recordings the model was fine-tuned on (a
    fold model's checkpoint records them as ``train_recordings``, and their subjects as
    ``train_subjects``; other models: none).

    A recording is stored under the path ``prepare`` was given, so the same file prepared
    again from another working directory or folder has another path: a recording also counts
    as trained on when its file name is a trained one's and its subject one the model was
    trained on (any subject for checkpoints that do not record them)."""
    trained_on = set(meta.get("train_recordings") or [])
    names = {Path(r).name for r in trained_on}
    subjects = meta.get("train_subjects")
    subjects = None if subjects is None else set(subjects)

    def seen(item) -> bool:
        if item.recording in trained_on:
            return True
        return Path(item.recording).name in names and (subjects is None or item.subject in subjects)

    return np.array([p for p, i in enumerate(indices) if seen(data.items[int(i)])], dtype=np.int64)


def training_windows_note(seen: int, total: int, recordings: int, *, scored: bool) -> str:
    if scored:
        return (
            f"{seen} of {total} windows are from the {recordings} recording(s) this model was "
            "fine-tuned on and are scored (--include-training-windows), so these scores "
            "overstate held-out performance"
        )
    return (
        f"{seen} of {total} windows are from the {recordings} recording(s) this model was "
        "fine-tuned on: left out (--include-training-windows scores them too)"
    )


def _main(args: argparse.Namespace) -> int:
    if args.export_features is not None and args.export_features.suffix.lower() != ".npz":
        raise CommandError(
            f"--export-features {args.export_features}: the features are written as a .npz "
            "archive; give a FILE.npz"
        )
    out = Path(args.out)
    # An evaluation replaces the report files and TensorBoard events in --out without asking:
    # in a training run's folder (the fine-tuning's, or a fold model's own) they are that
    # run's report and logs, lost to a slip of --out.
    found = previous_run(out)
    if found:
        raise CommandError(
            f"--out {out}: holds a training run ({found[0]}), whose report files and "
            "TensorBoard logs an evaluation would replace; choose another --out"
        )
    extra: dict = {"finetune.mode": "linear"}
    if args.folds is not None:
        extra["finetune.folds"] = args.folds
    if args.tasks:
        extra["data.tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    config = resolve(args, RunConfig(), extra)
    runtime = start(config)
    try:
        data = load_data(config.data.roots, config.data.tasks)
        try:
            model, meta = load_trained(args.model)
        except FileNotFoundError:
            read_model_meta(args.model)  # a fine-tuning's top folder: names its fold models
            raise
        arch = meta["arch"]
        task_names = list(meta.get("task_names") or [])
        routes = routes_by_task(meta)
        # data a fine-tuned model cannot take is refused before anything is written
        data_warnings = check_data(model, trained_on(meta), data) if arch.get("heads") else []
        if arch.get("heads"):
            # a task asked for by name and left out would leave its scores out silently
            # (refused before anything is written, --export-features included)
            headless = [t for t in config.data.tasks if t not in arch["heads"]]
            if headless:
                them = "it" if len(headless) == 1 else "them"
                raise CommandError(
                    f"--tasks {', '.join(headless)}: --model {args.model} has no head for "
                    f"{them} (its heads: {', '.join(sorted(arch['heads']))}); leave {them} out "
                    "of --tasks (data.tasks)"
                )
            model.to(runtime.device)
        else:  # a pretraining model has no pooled features: the probe's classifier backbone
            arch_b, weights, backbone_meta = backbone_from_checkpoint(args.model)
            model = None
            # its features are exported as the probe takes them: routed by the same task ids,
            # and only where upcycle.task_routing is on (Backbone.router_ids)
            task_names = task_names or sorted(data.tasks)
            routes = routes and config.upcycle.task_routing
        out.mkdir(parents=True, exist_ok=True)
        if args.export_features:
            if model is not None:  # its backbone's pooled features
                features_of = model
            else:
                features_of = feature_model(arch_b, weights).to(runtime.device)
            path = export_features(
                features_of, data, args.export_features, runtime.device, task_names, routes
            )
            del features_of  # the probe builds its own copy of a backbone
            say(runtime, f"features: {path}")
        if arch.get("heads"):
            heads = arch["heads"]
            tasks = [t for t in (config.data.tasks or data.tasks) if t in heads]
            if not tasks:
                raise CommandError(
                    f"--model has heads for {sorted(heads)}, the data has tasks "
                    f"{data.tasks}: nothing to evaluate"
                )
            notes = [f"model `{args.model}` evaluated on the labelled windows (no training)"]
            for warning in data_warnings:
                say(runtime, f"warning: {warning}")
                notes.append(f"**warning:** {warning}")
            names, guessed = model_class_names(args.model, heads, tasks, meta, data)
            if meta.get("command") == "finetune" and "train_recordings" not in meta:
                # a fold model of an eegfast from before 2026-12-06: training_windows finds
                # none of its training windows, so they were scored without a word
                guessed.append(
                    "the model's checkpoint (an eegfast from before 2026-12-06) does not record "
                    "the recordings it was fine-tuned on: every labelled window is scored, "
                    "those of its training recordings too if --data holds them, which "
                    "overstates held-out performance"
                )
            for warning in guessed:
                say(runtime, f"warning: {warning}")
                notes.append(f"**warning:** {warning}")
            # scored in the model's classes from here on (labels, metrics, plots, CSV)
            data = in_model_classes(data, names, args.model)
            selected, seen, total, seen_recordings = {}, 0, 0, set()
            # a task with a head and windows in --data that is not scored would be missing
            # from the report without a word (only the other tasks' rows)
            unscored = [
                f"task {t!r} of --data: --model has no head for it (its heads: "
                f"{', '.join(sorted(heads))}): not scored"
                for t in data.tasks
                if t not in heads
            ]
            for task in tasks:
                indices = np.asarray(data.labelled(task))
                trained = training_windows(meta, data, indices)
                seen += len(trained)
                total += len(indices)
                seen_recordings |= {data.items[int(indices[p])].recording for p in trained}
                if not args.include_training_windows:
                    indices = np.delete(indices, trained)
                if len(indices):
                    selected[task] = indices
                elif len(trained):
                    unscored.append(
                        f"task {task!r}: all its {len(trained)} labelled windows are from "
                        "recordings the model was fine-tuned on: not scored "
                        "(--include-training-windows scores them)"
                    )
                else:
                    unscored.append(f"task {task!r}: no labelled window in --data: not scored")
            if not total:  # (not "all 0 labelled windows are from its training recordings")
                raise CommandError(
                    f"--data {' '.join(str(r) for r in data.roots)}: no labelled window of "
                    f"{', '.join(tasks)} to score (evaluate compares the model's predictions "
                    "with the windows' labels); eegfast predict applies it to unlabelled "
                    "recordings"
                )
            if not selected:
                raise CommandError(
                    f"all {total} labelled windows of {tasks} are from the recordings "
                    f"--model {args.model} was fine-tuned on: no held-out window to score "
                    "(give --data with other recordings, or --include-training-windows)"
                )
            for note in unscored:
                say(runtime, f"note: {note}")
                notes.append(note)
            grouping = "none (a fixed model on all windows)"
            if seen and not args.include_training_windows:
                grouping = "none (a fixed model on the windows it was not fine-tuned on)"
            result = CVResult(grouping={t: grouping for t in selected})
            ids = {t: i for i, t in enumerate(task_names)}
            scored: list[tuple[str, np.ndarray, np.ndarray]] = []
            for task, indices in selected.items():
                probs, load = predict(
                    model,
                    data,
                    indices,
                    task,
                    runtime.device,
                    task_id=ids.get(task) if routes else None,
                )
                absent = sorted(
                    set(range(len(names[task]))) - {data.items[int(i)].label for i in indices}
                )
                if absent:  # said here, in words, instead of sklearn's warning
                    note = (
                        f"task {task!r}: no scored window of class "
                        f"{', '.join(names[task][c] for c in absent)}: balanced accuracy is "
                        "the mean recall over the other classes only"
                    )
                    say(runtime, f"note: {note}")
                    notes.append(note)
                _record(
                    result,
                    0,
                    "single" if len(heads) == 1 else "multitask",
                    task,
                    data,
                    indices,
                    probs,
                )
                scored.append((task, indices, probs))
                if load is not None:
                    result.expert_load.setdefault(task, []).append(load)
            if seen:
                included = args.include_training_windows
                note = training_windows_note(seen, total, len(seen_recordings), scored=included)
                say(runtime, f"warning: {note}" if included else note)
                notes.append(f"**warning:** {note}" if included else note)
        else:
            scored = []
            # what its pretraining saw: the report notes the tested subjects or recordings it
            # was pretrained on, as finetune's does (a probe of a transductive backbone)
            backbone = Backbone(
                arch_b,
                weights,
                task_names,
                backbone_meta.get("pretrained_on"),
                pretraining_unrecorded=pretraining_unrecorded(backbone_meta),
            )
            result = cross_validate(
                data, config, out, runtime, backbone, log=lambda text: say(runtime, text)
            )
            notes = [f"linear probe on frozen features of `{args.model}`"]
        if runtime.dist.is_main:
            # one evaluation at a time writes here: two at once (a sweep given one --out)
            # left one's results.csv beside the other's predictions.csv, as predict refuses
            with hold_lock(out):
                # An earlier evaluation's report files go first: the new ones are written one by
                # one, and one stopped half way (Ctrl-C, a kill) had left a mix of the two
                # evaluations (this one's results.csv beside another model's predictions.csv).
                for name in REPORT_ARTEFACTS:
                    (out / name).unlink(missing_ok=True)
                # its scalars too: TensorBoard reads every events file of the folder, and showed
                # an earlier evaluation's (another model's, or a probe's variants) beside these
                for events in (out / "tensorboard").glob("events.out.tfevents.*"):
                    events.unlink(missing_ok=True)
                write_outputs(
                    result,
                    data,
                    out,
                    title="eegfast evaluation report",
                    notes=notes,
                    fixed_model=bool(scored),
                )
                if scored:  # (a linear probe has none: an earlier one's went above)
                    write_predictions(out / "predictions.csv", data, scored)
                say(runtime, (out / "report.md").read_text(encoding="utf-8"))
            say(runtime, f"report: {out / 'report.md'}")
        return 0
    finally:
        shutdown(runtime.dist)
