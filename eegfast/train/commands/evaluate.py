"""``eegfast evaluate --model RUN --data FOLDER... --out DIR``: evaluate a checkpoint.

- A fine-tuned model (with task heads, e.g. ``runs/finetune/fold0/multitask``): its predictions
  on every labelled window of its tasks, with the metrics, confusion matrices and ROC curves.
- A pretrained or upcycled backbone: a linear probe with grouped k-fold cross-validation
  (``--folds k``; logistic regression on frozen features) against the band-power baseline on
  the same folds.

``--export-features FILE.npz`` also writes the frozen pooled features (N, E) of every window
with its task, label, subject and recording (for zero-shot or external linear use).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eegfast.fileio import write_atomic
from eegfast.train.arch import backbone_from_checkpoint, load_trained
from eegfast.train.commands.common import (
    CommandError,
    add_run_arguments,
    resolve,
    run_command,
    say,
    start,
)
from eegfast.train.config import RunConfig
from eegfast.train.data import TrainData, load_data
from eegfast.train.distributed import shutdown
from eegfast.train.finetune import (
    Backbone,
    CVResult,
    _record,
    cross_validate,
    predict,
    write_outputs,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser, training=False)
    parser.add_argument("--model", required=True, help="run folder, checkpoint or .safetensors")
    parser.add_argument("--folds", type=int, default=None, help="k for the linear probe")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (data.tasks)")
    parser.add_argument(
        "--export-features",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help="write frozen features of every window",
    )


def main(args: argparse.Namespace) -> int:
    return run_command("evaluate", lambda: _main(args))


def export_features(
    model, data: TrainData, path: Path, device, task_names: list[str], routes: bool
) -> Path:
    ids = {t: i for i, t in enumerate(task_names)}
    features = np.zeros((len(data), 0), dtype=np.float32)
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
            )

    return write_atomic(path, save)


def training_windows_warning(meta: dict, data, tasks) -> str | None:
    """A fine-tuned fold model records its training recordings: say how many of the evaluated
    windows come from them (scores on those are not held-out scores)."""
    trained_on = set(meta.get("train_recordings") or [])
    if not trained_on:
        return None
    indices = [int(i) for task in tasks for i in data.labelled(task)]
    seen = [i for i in indices if data.items[i].recording in trained_on]
    if not seen:
        return None
    recordings = len({data.items[i].recording for i in seen})
    return (
        f"{len(seen)} of {len(indices)} windows are from the {recordings} recording(s) this "
        "model was fine-tuned on, so these scores overstate held-out performance (evaluate "
        "on data the model has not seen, or read the fine-tuning run's own cross-validated "
        "report)"
    )


def _main(args: argparse.Namespace) -> int:
    if args.export_features is not None and args.export_features.suffix.lower() != ".npz":
        raise CommandError(
            f"--export-features {args.export_features}: the features are written as a .npz "
            "archive; give a FILE.npz"
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
        model, meta = load_trained(args.model)
        model.to(runtime.device)
        arch = meta["arch"]
        task_names = list(meta.get("task_names") or [])
        routes = bool((arch.get("upcycle") or {}).get("num_tasks"))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.export_features:
            path = export_features(
                model, data, args.export_features, runtime.device, task_names, routes
            )
            say(runtime, f"features: {path}")
        if arch.get("heads"):
            heads = arch["heads"]
            tasks = [t for t in (config.data.tasks or data.tasks) if t in heads]
            if not tasks:
                raise CommandError(
                    f"--model has heads for {sorted(heads)}, the data has tasks "
                    f"{data.tasks}: nothing to evaluate"
                )
            result = CVResult(grouping={t: "none (a fixed model on all windows)" for t in tasks})
            ids = {t: i for i, t in enumerate(task_names)}
            for task in tasks:
                indices = data.labelled(task)
                probs, load = predict(
                    model,
                    data,
                    indices,
                    task,
                    runtime.device,
                    task_id=ids.get(task) if routes else None,
                )
                _record(
                    result,
                    0,
                    "single" if len(heads) == 1 else "multitask",
                    task,
                    data,
                    indices,
                    probs,
                )
                if load is not None:
                    result.expert_load.setdefault(task, []).append(load)
            notes = [f"model `{args.model}` evaluated on every labelled window (no training)"]
            warning = training_windows_warning(meta, data, tasks)
            if warning:
                say(runtime, f"warning: {warning}")
                notes.append(f"**warning:** {warning}")
        else:
            arch_b, weights, meta_b = backbone_from_checkpoint(args.model)
            backbone = Backbone(arch_b, weights, task_names or sorted(data.tasks))
            result = cross_validate(
                data, config, out, runtime, backbone, log=lambda text: say(runtime, text)
            )
            notes = [f"linear probe on frozen features of `{args.model}`"]
        if runtime.dist.is_main:
            write_outputs(result, data, out, title="eegfast evaluation report", notes=notes)
            say(runtime, (out / "report.md").read_text())
            say(runtime, f"report: {out / 'report.md'}")
        return 0
    finally:
        shutdown(runtime.dist)
