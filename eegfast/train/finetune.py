"""Fine-tuning and evaluation with subject-wise cross-validation, multi-task training and a
negative-transfer report.

For each fold (``plan_folds``: grouped by subject, or by recording where a task has a single
subject; stratified where possible) this trains, on the same splits:

- ``multitask``: one model, one head per task, the task id passed to the (MoE) router;
- ``single``: one model per task (for the negative-transfer comparison);
- ``linear_probe`` (``finetune.mode=linear``): logistic regression on frozen features;
- ``band_power``: the classic baseline (log band power + logistic regression).

Metrics per fold and task (balanced accuracy, AUROC and AUC-PR for binary tasks; Cohen's κ and
weighted F1 for multi-class), mean ± std over folds, CSV + JSON + Markdown report + plots.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from eegfast.fileio import write_atomic, write_json_atomic, write_text_atomic
from eegfast.train.arch import build_model
from eegfast.train.baseline import (
    BANDS_HZ,
    band_power_features,
    fit_predict_band_power,
    fit_predict_logistic,
)
from eegfast.train.config import RunConfig
from eegfast.train.data import (
    ShardBatches,
    TrainData,
    check_table_rows,
    collate_fn,
    shard_batches,
    table_rows,
)
from eegfast.train.engine import fit, recompile_allowance, seed_everything
from eegfast.train.metrics import classification_metrics, confusion, group_folds, mean_std
from eegfast.train.objectives import StepContext, classification_step, to_device

_T = TypeVar("_T")


@dataclass
class FoldPlan:
    """Per task: item indices of the training and test part of one fold."""

    fold: int
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    units: dict[str, str] = field(default_factory=dict)  # task -> "subject" or "recording"


@dataclass
class CVResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # fold, variant, task, metric, value
    grouping: dict[str, str] = field(default_factory=dict)
    # task -> the unit its folds are grouped by ("subject" or "recording"): the unit the paired
    # bootstrap resamples (recording where a task is missing)
    units: dict[str, str] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    expert_load: dict[str, list[np.ndarray]] = field(default_factory=dict)
    loss_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def plan_folds(
    data: TrainData, tasks: Sequence[str], k: int, group_by: str, seed: int
) -> tuple[list[FoldPlan], dict[str, str]]:
    """The same number of folds for every task; no group in both halves of a fold.

    Tasks that share a group (the same subject, or recording, in two tasks) are split
    together, so that the group is tested in the same fold for all of them: the multi-task
    model trains on every task's training part at once, and would otherwise see a subject of
    one task's test part through another task's windows.
    """
    if group_by not in ("subject", "recording"):
        raise ValueError(f"finetune.group_by must be subject or recording, got {group_by!r}")
    per_task, grouping, units = {}, {}, {}
    for task in tasks:
        indices = data.labelled(task)
        if len(indices) == 0:
            raise ValueError(f"task {task!r} has no labelled windows")
        subjects = [data.items[i].subject for i in indices]
        by = group_by
        if by == "subject" and len(set(subjects)) < 2:
            by = "recording"
        groups = [
            data.items[i].subject if by == "subject" else data.items[i].recording for i in indices
        ]
        n_groups = len(set(groups))
        if n_groups < 2:
            # (group_folds' own error would name a group key and suggest group_by=recording,
            # which is what this task already fell back to)
            raise ValueError(
                f"task {task!r}: its {len(indices)} labelled windows all come from one {by} "
                f"({groups[0]}), so no fold could test a {by} it did not train on; "
                "cross-validation needs at least 2: add recordings of the task, or leave it "
                "out (--tasks / data.tasks)"
            )
        note = f"by {by} ({n_groups} {by}s"
        if by != group_by:
            note += f"; only {len(set(subjects))} subject, so recordings are the unit"
        grouping[task] = note + ")"
        # the unit is part of the key: a subject id never matches a recording name
        keys = [f"{by}:{g}" for g in groups]
        per_task[task] = (indices, [data.items[i].label for i in indices], keys)
        units[task] = by
    k_eff = min([k] + [len(set(g)) for _, _, g in per_task.values()])
    plans = [FoldPlan(i, {}, {}, dict(units)) for i in range(k_eff)]
    for component in _tasks_sharing_groups(per_task):
        if len(component) == 1:
            task = component[0]
            indices, labels, groups = per_task[task]
            splits = {task: group_folds(labels, groups, k_eff, seed=seed)}
        else:
            splits = _joint_folds({t: per_task[t] for t in component}, k_eff, seed)
            for task in component:
                others = ", ".join(t for t in component if t != task)
                grouping[task] = grouping[task][:-1] + f"; split together with {others}, "
                grouping[task] += "which shares some of them)"
        for task, task_splits in splits.items():
            indices = per_task[task][0]
            for i, (train, test) in enumerate(task_splits):
                plans[i].train[task] = indices[train]
                plans[i].test[task] = indices[test]
    # A training part of one class trains nothing (e.g. one subject whose classes are its
    # recordings: each fold trains on one class and tests on the other); its numbers mean
    # nothing, which the report must say next to them. A training part without some class
    # (a class of fewer subjects/recordings than folds, which GroupKFold does not stratify)
    # tests every window of that class on models that never saw it: those count as missed,
    # whatever the model, which the report must say too.
    for task in tasks:
        names = data.label_names[task]
        classes = set(per_task[task][1])
        one_class, without = [], []
        for plan in plans:
            present = {data.items[int(i)].label for i in plan.train[task]}
            if len(present) < 2:
                trained = ", ".join(names[c] for c in sorted(present))
                one_class.append(f"fold {plan.fold + 1} trains on {trained} only")
            elif classes - present:
                absent = ", ".join(names[c] for c in sorted(classes - present))
                without.append(f"fold {plan.fold + 1} trains on no window of {absent}")
        if one_class:
            grouping[task] += (
                f"; WARNING: {'; '.join(one_class)}: a classifier cannot be trained or measured "
                "there, so this task's numbers mean nothing (it needs more subjects/recordings "
                "per class)"
            )
        if without:
            grouping[task] += (
                f"; WARNING: {'; '.join(without)}, and tests them all: the models and baselines "
                "of that fold cannot predict a class they never saw, so its scores count those "
                f"windows as missed whatever the model (each class needs windows of as many "
                f"{units[task]}s as there are folds, {len(plans)}; or lower finetune.folds)"
            )
    return plans, grouping


def seen_by_other_tasks(
    data: TrainData, tasks: Sequence[str], plans: Sequence[FoldPlan]
) -> dict[str, str]:
    """Per task whose test part holds a subject/recording (its fold unit) that another task's
    training part of the same fold holds too: a warning for the report, else nothing.

    Tasks split by different units are not split together (a single-subject task is split by
    recording, and a subject key never matches a recording name), so a subject tested for one
    task can lie in another task's training part: the multi-task model, which trains on every
    task's training part at once, has then seen that subject's EEG and its numbers for the task
    are not subject-independent (the single-task and baseline numbers are)."""
    out = {}
    for task in tasks:
        unit = plans[0].units.get(task, "recording") if plans else "recording"
        found = []
        for plan in plans:
            tested = {getattr(data.items[int(i)], unit) for i in plan.test[task]}
            trained = {
                getattr(data.items[int(i)], unit)
                for other in tasks
                if other != task
                for i in plan.train[other]
            }
            shared = sorted(tested & trained)
            if shared:
                more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
                found.append(f"fold {plan.fold + 1} tests {', '.join(shared[:3])}{more}")
        if found:
            out[task] = (
                f"WARNING: {'; '.join(found)}, which other tasks train on in that fold (they "
                f"are split by another unit): the multi-task model has seen these {unit}s, so "
                f"its numbers for this task are not {unit}-independent"
            )
    return out


def pretraining_unrecorded(meta: Mapping[str, Any]) -> bool:
    """Whether ``meta`` is an eegfast pretraining checkpoint's that does not say what its
    pretraining saw: saved before `eegfast pretrain` recorded ``pretrained_on``
    (2026-12-06; the key is absent), or pretrained from such a checkpoint as ``model.init``
    (recorded as null: this run's own subjects alone would leave out what its init saw), or
    upcycled from one of those (``upcycle`` records ``pretraining_unrecorded``)."""
    if meta.get("pretraining_unrecorded"):
        return True
    return meta.get("command") == "pretrain" and meta.get("pretrained_on") is None


def pretraining_overlap(
    data: TrainData, tasks: Sequence[str], plans: Sequence[FoldPlan], backbone: Backbone | None
) -> dict[str, str]:
    """Per task whose tested subjects (or recordings, for tasks split by recording) the
    backbone's self-supervised pretraining saw: a note for the report, else nothing.

    Pretraining on the evaluation recordings without their labels is a legitimate protocol
    (transductive), but the numbers are then not those of a model that never saw the tested
    subjects' EEG, and the report says so. Recordings are matched by file name (the same file
    prepared from another path), subjects by id. A backbone whose pretraining checkpoint does
    not record them (:func:`pretraining_unrecorded`) gets a note per task saying so: silence
    read as a backbone that never saw the tested subjects."""
    if backbone is not None and backbone.pretraining_unrecorded:
        units = plans[0].units if plans else {}
        return {
            task: (
                "note: the backbone's checkpoint does not record which subjects and recordings "
                "its self-supervised pretraining saw (pretrained before eegfast recorded them, "
                "on 2026-12-06, or further from such a checkpoint): whether it saw the tested "
                f"{units.get(task, 'recording')}s cannot be checked"
            )
            for task in tasks
        }
    seen = (backbone.pretrained_on if backbone is not None else None) or {}
    if not seen:
        return {}
    subjects = set(seen.get("subjects") or [])
    names = {Path(r).name for r in seen.get("recordings") or []}
    out = {}
    for task in tasks:
        unit = plans[0].units.get(task, "recording") if plans else "recording"
        tested = {
            getattr(data.items[int(i)], unit) for plan in plans for i in plan.test.get(task, [])
        }
        if unit == "subject":
            overlap = {u for u in tested if u in subjects}
        else:
            overlap = {u for u in tested if Path(u).name in names}
        if overlap:
            out[task] = (
                f"note: the backbone was pretrained (self-supervised, without labels) on "
                f"{len(overlap)} of the {len(tested)} tested {unit}s: transductive, so these "
                f"numbers are not those of a backbone that never saw the tested {unit}s' EEG"
            )
    return out


def _tasks_sharing_groups(per_task: dict[str, tuple]) -> list[list[str]]:
    """The tasks in connected sets: two tasks are connected when they share a group key."""
    owner: dict[str, str] = {}  # group key -> the first task that has it
    parent = {task: task for task in per_task}

    def root(task: str) -> str:
        while parent[task] != task:
            task = parent[task]
        return task

    for task, (_, _, groups) in per_task.items():
        for key in set(groups):
            if key in owner:
                parent[root(task)] = root(owner[key])
            else:
                owner[key] = task
    components: dict[str, list[str]] = {}
    for task in per_task:
        components.setdefault(root(task), []).append(task)
    return list(components.values())


def _joint_folds(
    per_task: dict[str, tuple], k: int, seed: int
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per task, ``k`` (train, test) splits in which every group key lies on the same side for
    every task: one StratifiedGroupKFold over the windows of all the tasks, stratified by
    (task, class); a few shuffles are tried until every task is tested in every fold."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    names = list(per_task)
    task_of = np.concatenate([np.full(len(per_task[t][0]), n) for n, t in enumerate(names)])
    labels = np.concatenate([np.asarray(per_task[t][1], dtype=np.int64) for t in names])
    groups = np.concatenate([np.asarray(per_task[t][2], dtype=object) for t in names])
    strata = task_of * (int(labels.max()) + 1) + labels
    offsets = np.cumsum([0] + [len(per_task[t][0]) for t in names])
    for attempt in range(20):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + attempt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tests = [test for _, test in splitter.split(labels, strata, groups.astype(str))]
        if all(len(np.unique(task_of[test])) == len(names) for test in tests):
            break
    else:
        raise ValueError(
            f"tasks {names} share subjects/recordings, so they are split together, and no "
            f"split into {k} folds tests every task in every fold: lower finetune.folds"
        )
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {t: [] for t in names}
    for test in tests:
        in_test = np.zeros(len(labels), dtype=bool)
        in_test[test] = True
        for n, task in enumerate(names):
            part = in_test[offsets[n] : offsets[n + 1]]
            out[task].append((np.flatnonzero(~part), np.flatnonzero(part)))
    return out


def _shard_batches(data: TrainData) -> ShardBatches | None:
    """``shard_batches(data.dataset, collate_padded)`` (None for other datasets), made once per
    ``data``: ``eegfast predict`` passes the whole data with one batch of windows per call, and
    locating every item of a large dataset again each time (tens of ms for a million windows)
    would cost more than reading the batch. Kept on ``data`` (it goes with it), for the
    dataset it was made of (``data.dataset`` can be replaced)."""
    return _kept_on(
        data, "_shard_batches", data.dataset, lambda: shard_batches(data.dataset, collate_fn())
    )


def _kept_on(data: TrainData, name: str, key: Any, make: Callable[[], _T]) -> _T:
    """``make()``, kept on ``data`` under ``name`` (it goes with the data) and made again
    only when ``key`` (what it was made of: the dataset, the folders' roots) has changed
    (``is`` or ``==``)."""
    cached = data.__dict__.get(name)
    if cached is None or not (cached[0] is key or cached[0] == key):
        cached = data.__dict__[name] = (key, make())
    return cached[1]


def iterate_batches(
    data: TrainData,
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    pin_memory: bool = False,
) -> Iterator[tuple[list[int], dict]]:
    """(positions in ``indices``, collated batch) in groups of one electrode set. Prepared
    folders are read a whole batch at a time (``ShardDataset.get_batch``): the batch that
    ``collate_padded`` makes of the windows' items, a few times faster than item by item.
    ``pin_memory`` (for a CUDA device; pinning needs one): their ``x`` (B, C, A, 200) built in
    pinned memory, as training's batches: the asynchronous copy to the GPU reads it directly,
    not a pinned copy that ``to_device`` would make of it first."""
    collate = collate_fn()
    batches = _shard_batches(data)
    if batches is not None and pin_memory:
        # the cached reader's item tables, shared; only where the batches are built differs
        batches = ShardBatches(batches.leaves, batches.leaf, batches.local, pin_memory=True)
    groups: dict[tuple, list[int]] = {}
    for pos, index in enumerate(indices):
        groups.setdefault(data.items[int(index)].group_key, []).append(pos)
    for positions in groups.values():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            windows = [int(indices[p]) for p in chunk]
            if batches is None:
                yield chunk, collate([data.dataset[i] for i in windows])
            else:
                batch = batches[windows]
                del batch["index"]  # not a field of collate_padded's batch
                yield chunk, batch


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from eegfast.nn import MoEFFN
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def _in_order(
    data: TrainData,
    indices: Sequence[int] | np.ndarray,
    device: torch.device,
    batch_size: int,
    outputs_of: Callable[[dict], dict[str, torch.Tensor]],
) -> dict[str, np.ndarray]:
    """{name: (N, K) array} in ``indices`` order, from ``outputs_of(batch)`` ({name: (B, K)})
    over batches of one electrode set (:func:`iterate_batches`), each moved to ``device``."""
    rows: dict[str, list[np.ndarray | None]] = {}
    pin = device.type == "cuda"
    for positions, batch in iterate_batches(data, indices, batch_size, pin_memory=pin):
        for name, out in outputs_of(to_device(batch, device)).items():
            column = rows.setdefault(name, [None] * len(indices))
            out = out.float().cpu().numpy()
            for row, pos in enumerate(positions):
                column[pos] = out[row]
    return {name: np.stack(column) for name, column in rows.items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    data: TrainData,
    indices: Sequence[int] | np.ndarray,
    task: str,
    device: torch.device,
    *,
    task_id: int | None,
    batch_size: int = 64,
    features: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities (or pooled features) (N, K) in ``indices`` order, and the mean
    expert load (E,) over MoE layers and real tokens (None without MoE): batches of different
    electrode sets weigh by their tokens, not their samples."""
    if not len(indices):
        raise ValueError("predict: no indices to predict")
    model.eval()
    moe = _moe_layers(model)
    load_sum, load_count = None, 0

    def outputs_of(batch: dict) -> dict[str, torch.Tensor]:
        nonlocal load_sum, load_count
        kwargs: dict[str, Any] = {"channel_padding_mask": batch["channel_padding_mask"]}
        if task_id is not None:
            kwargs["task_id"] = torch.full(
                (len(batch["x"]),), task_id, dtype=torch.long, device=device
            )
        if features:
            out = model.forward_features(batch["x"], batch["input_chans"], **kwargs)
        else:
            out = model(batch["x"], batch["input_chans"], task=task, **kwargs).float().softmax(-1)
        for layer in moe:
            aux = layer.last_aux
            if aux is not None:
                tokens = int(aux.tokens)
                load = aux.expert_load.detach().double().cpu().numpy() * tokens
                load_sum = load if load_sum is None else load_sum + load
                load_count += tokens
        return {task: out}

    out = _in_order(data, indices, device, batch_size, outputs_of)[task]
    expert = None if load_sum is None else (load_sum / max(load_count, 1)).astype(np.float32)
    return out, expert


@torch.no_grad()
def predict_heads(
    model: nn.Module,
    data: TrainData,
    indices: Sequence[int] | np.ndarray,
    tasks: Sequence[str],
    device: torch.device,
    *,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """{task: softmax probabilities (N, classes of the task)} in ``indices`` order, from one
    backbone pass per batch shared by the heads of ``tasks``. Only for a multi-task model that
    does not route by task (its features do not depend on the task): bit for bit what
    :func:`predict` gives per task (the same batches, features and head), at one backbone
    pass instead of one per task."""
    if not len(indices):
        raise ValueError("predict_heads: no indices to predict")
    model.eval()

    def outputs_of(batch: dict) -> dict[str, torch.Tensor]:
        features = model.forward_features(
            batch["x"], batch["input_chans"], channel_padding_mask=batch["channel_padding_mask"]
        )
        return {
            task: model.heads[model.head_keys[task]](features).float().softmax(-1) for task in tasks
        }

    return _in_order(data, indices, device, batch_size, outputs_of)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, mean 1 over samples (balanced cross-entropy)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class Backbone:
    arch: dict[str, Any]
    weights: dict[str, torch.Tensor] | None  # None = random initialisation
    task_names: list[str]  # router task ids, in order
    # what its self-supervised pretraining saw ({"subjects": [...], "recordings": [file
    # names]}, as `eegfast pretrain` records it and `upcycle` passes on), or None when not
    # known (fold models do not repeat it in each of their checkpoints)
    pretrained_on: dict[str, list[str]] | None = None
    # an eegfast pretraining checkpoint without that record (:func:`pretraining_unrecorded`):
    # the report says that the overlap with the tested subjects cannot be checked
    pretraining_unrecorded: bool = False

    @property
    def routes(self) -> bool:
        return bool((self.arch.get("upcycle") or {}).get("num_tasks"))

    def router_ids(self, tasks: Sequence[str], task_routing: bool) -> dict[str, int] | None:
        """Each task's router id, or None when the backbone does not route by task (not
        upcycled with tasks, or ``upcycle.task_routing`` off). A task the backbone was not
        upcycled for has no id: ValueError, before any training (full and linear mode alike)."""
        if not (self.routes and task_routing):
            return None
        ids = {task: i for i, task in enumerate(self.task_names)}
        missing = [t for t in tasks if t not in ids]
        if missing:
            raise ValueError(
                f"tasks {missing} have no router id: the backbone was upcycled for "
                f"{self.task_names} (eegfast upcycle --tasks ...; or "
                "--set upcycle.task_routing=false)"
            )
        return {t: ids[t] for t in tasks}


def load_backbone_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load backbone ``weights`` into ``module``; only the classifier's own parts (``fc_norm.``,
    ``head.``) may be missing. Anything else missing or unexpected raises ValueError naming
    the keys: a partial load would leave random layers and give random features silently."""
    missing, unexpected = module.load_state_dict(weights, strict=False)
    bad = [k for k in missing if not k.startswith(("fc_norm.", "head."))]
    if bad or unexpected:
        raise ValueError(
            f"backbone weights do not fit: missing {bad[:5]}, unexpected {list(unexpected)[:5]}"
        )


def check_resumed_fold(run_dir: Path, resume: str, train_recordings: Sequence[str]) -> None:
    """Refuse to resume a fold's run from a checkpoint trained on other recordings.

    The fold plan depends on train.seed, finetune.folds/group_by and the data: with any of them
    changed, the checkpoint in ``fold<i>/<variant>`` may have been trained on recordings that
    this fold now tests, and its scores would be training scores reported as held-out ones.
    ``resume``: ``"auto"`` (the newest checkpoint in ``run_dir/checkpoints``, if any) or a
    checkpoint folder. Checkpoints without ``train_recordings`` in their meta are not checked.
    """
    from eegfast.train import checkpoint as ckpt

    if resume == "auto":
        latest = ckpt.latest_checkpoint(Path(run_dir) / "checkpoints")
        if latest is None:
            return
        path, saved = latest.path, latest.meta.get("train_recordings")
    else:
        path = Path(resume)
        saved = ckpt.checkpoint_meta(path).get("train_recordings")
    if saved is None or sorted(saved) == sorted(train_recordings):
        return
    gone, new = (
        sorted(set(saved) - set(train_recordings)),
        sorted(set(train_recordings) - set(saved)),
    )
    raise ValueError(
        f"--resume: {path} was trained on other recordings than this fold trains on (no "
        f"longer in its training part: {', '.join(gone[:3]) or 'none'}"
        f"{' ...' if len(gone) > 3 else ''}; new in it: {', '.join(new[:3]) or 'none'}"
        f"{' ...' if len(new) > 3 else ''}): the folds changed (train.seed, finetune.folds, "
        "finetune.group_by or the data), so the resumed model could be tested on windows it "
        "was trained on; start afresh with --overwrite (or another --out)"
    )


def prepared_like(data: TrainData, tasks: Sequence[str], train_idx: np.ndarray) -> dict[str, Any]:
    """What a fine-tuned checkpoint records about its data: ``label_names`` (task -> class
    names in its head's output order), ``window_seconds`` (the training windows' lengths) and
    ``preprocess`` ([{"root", "settings"}] of the folders holding its tasks, as their
    ``index.json`` has them)."""
    from eegfast.data import load_index
    from eegfast.data.index import preprocess_settings

    # (root, its tasks, its preprocessing) of each folder, read once per ``data``, not once per
    # trained model (folds x variants; 1.4 s an index.json of 3M windows); kept on ``data``,
    # as _shard_batches keeps its reader
    def read_folders() -> list[tuple[Any, set[str], dict]]:
        folders = []
        for root in data.roots:
            index = load_index(root)
            folders.append((root, set(index.get("tasks") or {}), preprocess_settings(index)))
        return folders

    folders = _kept_on(data, "_folder_settings", list(data.roots), read_folders)
    return {
        "label_names": {task: list(data.label_names[task]) for task in tasks},
        "window_seconds": sorted({int(data.items[int(i)].window_seconds) for i in train_idx}),
        "preprocess": [
            {"root": str(root), "settings": dict(preprocess)}
            for root, folder_tasks, preprocess in folders
            if folder_tasks & set(tasks)
        ],
    }


def train_classifier(
    backbone: Backbone,
    tasks: Sequence[str],
    data: TrainData,
    train_idx: np.ndarray,
    config: RunConfig,
    run_dir: Path,
    runtime,
    *,
    resume: str | None,
) -> tuple[nn.Module, dict[str, int]]:
    """Fine-tune a fresh copy of the backbone with one head per task on ``train_idx``."""
    # Batches hold one task and electrode set and only full batches train (the sampler drops
    # the rest), so a task without a full batch would leave its head untrained, silently in a
    # multi-task model whose other tasks do have batches.
    per_group: dict[tuple, int] = {}
    for i in train_idx:
        key = data.items[int(i)].group_key
        per_group[key] = per_group.get(key, 0) + 1
    batch = config.train.batch_size
    for task in tasks:
        sizes = [n for key, n in per_group.items() if key[1] == task]
        if sum(n // batch for n in sizes) == 0:
            raise ValueError(
                f"task {task!r}: its {sum(sizes)} training windows of this fold form no full "
                f"batch of train.batch_size={batch} (batches hold one electrode set: "
                f"{sorted(sizes, reverse=True)[:5]} windows per set), so it would not train: "
                "lower train.batch_size"
            )
    train_recordings = sorted({data.items[int(i)].recording for i in train_idx})
    if resume:
        check_resumed_fold(run_dir, resume, train_recordings)
    seed_everything(config.train.seed, deterministic=config.train.deterministic)
    heads = {task: len(data.label_names[task]) for task in tasks}
    model = build_model({**backbone.arch, "heads": heads})
    if backbone.weights is not None:
        load_backbone_weights(model.backbone, backbone.weights)
    routed = backbone.router_ids(tasks, config.upcycle.task_routing)
    task_ids = {task: i for i, task in enumerate(backbone.task_names)}
    labels = {
        t: np.array([data.items[i].label for i in train_idx if data.items[i].task == t])
        for t in tasks
    }
    ctx = StepContext(
        runtime.device,
        seed=config.train.seed,
        task_ids={t: task_ids.get(t, 0) for t in tasks},
        route_by_task=routed is not None,
        aux_weights={
            "load_balance_loss": config.upcycle.router_aux_weight,
            "z_loss": config.upcycle.router_z_weight,
        }
        if backbone.routes or backbone.arch.get("upcycle")
        else {},
        class_weights={t: class_weights(labels[t], heads[t]) for t in tasks},
    )
    subset = data.subset(train_idx)
    fit(
        model,
        classification_step,
        subset.dataset,
        config,
        run_dir,
        group_keys=subset.group_keys,
        collate_fn=collate_fn(),
        ctx=ctx,
        dist_info=runtime.dist,
        resume=resume,
        meta={
            "arch": {**backbone.arch, "heads": heads},
            "command": "finetune",
            "task_names": backbone.task_names,
            # what evaluate needs to tell this fold's training windows from held-out ones
            "train_recordings": train_recordings,
            "train_subjects": sorted({data.items[int(i)].subject for i in train_idx}),
            # whether the MoE routers got task ids (upcycle.task_routing), for evaluate/predict
            "route_by_task": ctx.route_by_task,
            # what predict and evaluate need to name the heads' outputs and to check new data,
            # without the training folders (which may have moved since)
            **prepared_like(data, tasks, train_idx),
        },
        find_unused_parameters=len(tasks) > 1 or bool(backbone.arch.get("upcycle")),
    )
    return model, ctx.task_ids if ctx.route_by_task else {}


def band_power_table(
    data: TrainData, tasks: Sequence[str], plans: Sequence[FoldPlan]
) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    """The band-power baseline's features of every window of ``tasks`` in ``plans``: {window
    index: (E * 5,) log band powers}, E the electrodes that every window of its task has, in
    electrode-id order; and per task whose windows differ in their electrodes, a note.

    A task's recordings may have other electrode sets, or the same electrodes in another
    order (two folders, a recording without some channel): the logistic regression needs one
    column per electrode and band in every row, so a column must not be Cz's band power in one
    window and O1's in another (nor rows of other lengths). Where a task's windows share no
    electrode it has no baseline (no entries) and the note says so."""
    per_window = len(BANDS_HZ)
    table: dict[int, np.ndarray] = {}
    notes: dict[str, str] = {}
    for task in tasks:
        indices = sorted(
            {int(i) for p in plans for part in (p.train, p.test) for i in part.get(task, [])}
        )
        # electrodes[0] is the cls row; x's channel c is electrodes[c + 1]
        sets = {data.items[i].electrodes for i in indices}
        common = sorted(set.intersection(*(set(e[1:]) for e in sets))) if sets else []
        if len(sets) > 1:
            largest = max(len(e) - 1 for e in sets)
            notes[task] = (
                f"its windows have {len(sets)} electrode sets (or orders): the band-power "
                f"baseline uses the {len(common)} electrodes all of them have (of up to {largest})"
                if common
                else f"its windows have {len(sets)} electrode sets with no electrode in common: "
                "no band-power baseline"
            )
        if not common:
            continue
        for i in indices:
            rows = [data.items[i].electrodes[1:].index(e) for e in common]
            powers = band_power_features(data.dataset[i]["x"].numpy()).reshape(-1, per_window)
            table[i] = powers[rows].reshape(-1)
    return table, notes


# what no file name may hold on Windows: <>:"/\|?* and control characters, a trailing space
# or dot (Windows drops them, so "a." and "a" would be one folder)
_NOT_PORTABLE = re.compile(r'[<>:"/\\|?*\x00-\x1f]|[ .]$')


def single_folder(task: str, tasks: Sequence[str], *, fold_dir: Path | None = None) -> str:
    """The name of the run folder of ``task``'s single-task variant: ``single-<task>``, where
    the task's name is a file name on every system (none of ``<>:"/\\|?*``, no control
    character, no trailing space or dot, at most 120 bytes) that no other of ``tasks`` spells
    in another case; else ``single-<name>-<digest>``, other characters than letters, digits,
    ``_`` and ``-`` replaced, with a digest of the name. (Tasks "Rest" and "rest" shared
    one folder on macOS and Windows, whose file systems ignore case: the second's
    checkpoints replaced the first's and its metrics.csv held both runs; ":" "?" "*" are no
    file name on Windows, "/" made nested folders, and a name past 255 bytes is none at all.)

    ``fold_dir``: the fold's folder; where it holds ``single-<task>`` as a run begun before
    these names left it (a task named after its folder, ``Study: sleep``), and not the new
    name, that folder, so that ``--resume auto`` continues the run there (it found no
    checkpoint under the new name and trained the variant again from step 0). Not for case
    twins (they shared that folder on macOS and Windows) nor names holding a path separator."""

    def folded(name: str) -> str:  # as macOS compares names: case and Unicode form ignored
        return unicodedata.normalize("NFC", name).casefold()

    unique = [folded(t) for t in tasks].count(folded(task)) < 2
    portable = not _NOT_PORTABLE.search(task) and len(task.encode()) <= 120
    if portable and unique:
        return f"single-{task}"
    readable = re.sub(r"[^\w-]+", "_", task)[:60]
    name = f"single-{readable}-{hashlib.sha1(task.encode()).hexdigest()[:8]}"
    if fold_dir is not None and unique and not re.search(r"[/\\\x00]", task):
        try:
            earlier = (fold_dir / f"single-{task}").is_dir() and not (fold_dir / name).exists()
        except OSError:  # (a name too long for this file system: no such folder)
            earlier = False
        if earlier:
            return f"single-{task}"
    return name


def cross_validate(
    data: TrainData,
    config: RunConfig,
    out_dir: Path,
    runtime,
    backbone: Backbone | None,
    *,
    resume: str | None = None,
    log: Callable[[str], None] = lambda _text: None,
) -> CVResult:
    """Run every variant on every fold; see the module docstring."""
    from eegfast.train.runlog import read_metrics

    ft = config.finetune
    tasks = list(config.data.tasks) or [t for t in data.tasks if len(data.labelled(t))]
    if not tasks:
        raise ValueError("no labelled windows in the data; nothing to fine-tune on")
    plans, grouping = plan_folds(data, tasks, ft.folds, ft.group_by, config.train.seed)
    if len(plans) < ft.folds:
        log(f"note: {ft.folds} folds requested, only {len(plans)} groups: using {len(plans)}")
    if backbone is not None:
        backbone.router_ids(tasks, config.upcycle.task_routing)  # refuses before any fold
        # electrodes past its embedding table: refused before any fold's run folder is made
        # (built on the meta device: no memory, no weights, for any model size)
        with torch.device("meta"):
            shape = build_model(backbone.arch)
        check_table_rows(data, table_rows(shape), f"the model {backbone.arch.get('name')}")
    multitask = backbone is not None and ft.mode == "full" and ft.multitask and len(tasks) > 1
    if multitask:
        for task, note in seen_by_other_tasks(data, tasks, plans).items():
            grouping[task] += f"; {note}"
    for task, note in pretraining_overlap(data, tasks, plans, backbone).items():
        grouping[task] += f"; {note}"
    result = CVResult(grouping=grouping, units=dict(plans[0].units))
    for task, note in grouping.items():
        if "WARNING" in note:
            log(f"warning: task {task!r}: {note.split('WARNING: ', 1)[1]}")
    variants: list[tuple[str, list[str]]] = []
    if backbone is not None and ft.mode == "full":
        if multitask:
            variants.append(("multitask", tasks))
        if ft.single_task_baseline or not ft.multitask or len(tasks) == 1:
            variants += [("single", [t]) for t in tasks]
    elif backbone is not None and ft.mode != "linear":
        raise ValueError(f"finetune.mode must be full or linear, got {ft.mode!r}")
    band_features: dict[int, np.ndarray] = {}
    if ft.band_power_baseline:
        band_features, band_notes = band_power_table(data, tasks, plans)
        for task, note in band_notes.items():
            grouping[task] += f"; {note}"
            log(f"note: task {task!r}: {note}")
    frozen: dict[str, np.ndarray] = {}
    if backbone is not None and ft.mode == "linear":
        model = build_model(backbone.arch)
        if backbone.weights is not None:
            load_backbone_weights(model, backbone.weights)
        model.to(runtime.device)
        ids = backbone.router_ids(tasks, config.upcycle.task_routing) or {}
        for task in tasks:
            indices = data.labelled(task)
            feats, _ = predict(
                model,
                data,
                indices,
                task,
                runtime.device,
                features=True,
                task_id=ids.get(task),
            )
            frozen.update({f"{task}:{int(i)}": f for i, f in zip(indices, feats, strict=True)})

    for plan in plans:
        log(
            f"fold {plan.fold + 1}/{len(plans)}: "
            + ", ".join(f"{t} train {len(plan.train[t])} / test {len(plan.test[t])}" for t in tasks)
        )
        for variant, variant_tasks in variants:
            fold_dir = out_dir / f"fold{plan.fold}"
            name = (
                variant
                if variant == "multitask"
                else single_folder(variant_tasks[0], tasks, fold_dir=fold_dir)
            )
            run_dir = fold_dir / name
            train_idx = np.concatenate([plan.train[t] for t in variant_tasks])
            model, routed = train_classifier(
                backbone, variant_tasks, data, train_idx, config, run_dir, runtime, resume=resume
            )
            curve = (
                read_metrics(run_dir / "metrics.csv").get("train/loss", [])
                if (run_dir / "metrics.csv").exists()
                else []
            )
            result.loss_curves[f"fold{plan.fold} {name}"] = curve
            # a model fit compiled: each task's eval-mode graph counts towards dynamo's limit
            compiled = recompile_allowance(len(set(data.group_keys)))
            with compiled if config.train.compile else contextlib.nullcontext():
                for task in variant_tasks:
                    test = plan.test[task]
                    probs, load = predict(
                        model, data, test, task, runtime.device, task_id=routed.get(task)
                    )
                    _record(result, plan.fold, variant, task, data, test, probs)
                    if load is not None and variant == "multitask":
                        result.expert_load.setdefault(task, []).append(load)
            # Tested: let it go before the next variant's model is built and trained, which
            # had run beside this one's weights (on the GPU: a model's worth of memory more
            # than the first fold needed, so a later fold could run out of it)
            del model
        for task in tasks:
            train, test = plan.train[task], plan.test[task]
            y_train = np.array([data.items[i].label for i in train])
            n_classes = len(data.label_names[task])
            if frozen:
                probs = fit_predict_logistic(
                    np.stack([frozen[f"{task}:{int(i)}"] for i in train]),
                    y_train,
                    np.stack([frozen[f"{task}:{int(i)}"] for i in test]),
                    n_classes,
                    seed=config.train.seed,
                )
                _record(result, plan.fold, "linear_probe", task, data, test, probs)
            if int(train[0]) in band_features:  # (none for a task without common electrodes)
                probs = fit_predict_band_power(
                    np.stack([band_features[int(i)] for i in train]),
                    y_train,
                    np.stack([band_features[int(i)] for i in test]),
                    n_classes,
                    seed=config.train.seed,
                )
                _record(result, plan.fold, "band_power", task, data, test, probs)
    return result


def _record(
    result: CVResult,
    fold: int,
    variant: str,
    task: str,
    data: TrainData,
    test: np.ndarray,
    probs: np.ndarray,
) -> None:
    y = np.array([data.items[i].label for i in test])
    n_classes = len(data.label_names[task])
    for metric, value in classification_metrics(y, probs, n_classes).items():
        result.rows.append(
            {"fold": fold, "variant": variant, "task": task, "metric": metric, "value": value}
        )
    result.predictions.append(
        {
            "fold": fold,
            "variant": variant,
            "task": task,
            "y": y,
            "probs": probs,
            "subjects": [data.items[i].subject for i in test],
            "recordings": [data.items[i].recording for i in test],
            # the bootstrap's resampling unit: windows of one subject/recording are correlated
            "clusters": [getattr(data.items[i], result.units.get(task, "recording")) for i in test],
        }
    )


# --- summaries and reports ------------------------------------------------------------------


def summarise(
    rows: Sequence[dict[str, Any]],
) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(variant, task, metric) -> (mean, std, folds): the folds the mean is over, those where
    the metric is defined (AUROC, AUC-PR and Cohen's κ are NaN in a fold that tests one class
    only)."""
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        grouped.setdefault((row["variant"], row["task"], row["metric"]), []).append(row["value"])
    return {
        key: (*mean_std(values), sum(not math.isnan(v) for v in values))
        for key, values in grouped.items()
    }


VARIANT_NAMES = {
    "multitask": "multi-task fine-tune",
    "single": "single-task fine-tune",
    "linear_probe": "linear probe (frozen features)",
    "band_power": "baseline: log band power + logistic regression",
}


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _fmt_folds(mean: float, std: float, defined: int, folds: int) -> str:
    """A metric's cell: mean ± std, and over how many of the ``folds`` where it is undefined
    in some (a mean over 1 of 2 folds printed as "± 0.000" read as two folds agreeing)."""
    if math.isnan(mean) or defined == folds:
        return _fmt(mean, std)
    if defined == 1:
        return f"{mean:.3f} (1 of {folds} folds)"
    return f"{_fmt(mean, std)} ({defined} of {folds} folds)"


def paired_bacc_difference(
    y: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Balanced accuracy of predictions ``pred_a`` minus that of ``pred_b`` on the same test
    windows (labels ``y``, (N,) each), with a paired percentile bootstrap interval.

    ``groups`` (N,): the subject or recording of each window. Windows of one recording are
    correlated, so resampling windows gives an interval that is too narrow; with ``groups``
    whole groups are resampled (a cluster bootstrap, the same groups for both predictions;
    resamples that lose a class are drawn again). Every class must then be tested on at least
    2 groups, else one group's recall is all a resample can see of that class and the interval
    is NaN. Without ``groups`` the windows are resampled within each class (every resample
    keeps the class counts).
    Returns (difference, low, high).
    """
    y, pred_a, pred_b = (np.asarray(v) for v in (y, pred_a, pred_b))
    if not y.shape == pred_a.shape == pred_b.shape or y.ndim != 1:
        raise ValueError(
            f"y, pred_a and pred_b must be (N,) each, got {y.shape}, {pred_a.shape}, {pred_b.shape}"
        )
    if groups is not None and np.shape(groups) != y.shape:
        raise ValueError(f"groups must be (N,) like y {y.shape}, got {np.shape(groups)}")
    rng = np.random.default_rng(seed)
    gain = (pred_a == y).astype(np.float64) - (pred_b == y)  # per window: +1, 0 or -1
    classes = np.unique(y)
    point = float(np.mean([gain[y == c].mean() for c in classes]))
    tail = (1.0 - level) / 2 * 100
    if groups is not None:
        draws = _cluster_draws(y, gain, np.asarray(groups), classes, resamples, rng)
        if draws is None:
            return point, math.nan, math.nan
        low, high = np.percentile(draws, [tail, 100 - tail])
        return point, float(low), float(high)
    draws = np.zeros(resamples)
    for c in classes:
        # A window's gain is -1, 0 or +1, so resampling a class's m windows with replacement
        # is a multinomial draw of how many of each: O(resamples) memory for any test set.
        members = gain[y == c]
        shares = [np.mean(members == g) for g in (-1.0, 0.0, 1.0)]
        counts = rng.multinomial(len(members), shares, size=resamples)
        draws += (counts[:, 2] - counts[:, 0]) / len(members)
    draws /= len(classes)
    low, high = np.percentile(draws, [tail, 100 - tail])
    return point, float(low), float(high)


def _cluster_draws(
    y: np.ndarray,
    gain: np.ndarray,
    groups: np.ndarray,
    classes: np.ndarray,
    resamples: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """(resamples,) balanced-accuracy differences of cluster-bootstrap resamples of ``groups``;
    None when a class is tested on fewer than 2 groups (or resamples keep losing a class)."""
    _, cluster = np.unique(groups.astype(str), return_inverse=True)
    n = int(cluster.max()) + 1
    column = np.searchsorted(classes, y)
    windows = np.zeros((n, len(classes)))  # per group and class: test windows
    gains = np.zeros((n, len(classes)))  # ... and their summed gain
    np.add.at(windows, (cluster, column), 1.0)
    np.add.at(gains, (cluster, column), gain)
    if ((windows > 0).sum(0) < 2).any():
        return None
    chunk = max(1, min(resamples, 4_000_000 // n))  # bounds the (chunk, n) count matrix
    kept: list[np.ndarray] = []
    have = 0
    for _ in range(100):
        times = rng.multinomial(n, np.full(n, 1.0 / n), size=chunk).astype(np.float64)
        totals, sums = times @ windows, times @ gains
        full = (totals > 0).all(1)  # resamples holding every class
        kept.append((sums[full] / totals[full]).mean(1))
        have += int(full.sum())
        if have >= resamples:
            return np.concatenate(kept)[:resamples]
    return None


def _pooled(predictions: Sequence[dict[str, Any]], variant: str, task: str):
    """(folds, labels, predicted classes, resampling groups) of ``variant`` on ``task`` over
    every fold, in fold order."""
    preds = sorted(
        (p for p in predictions if p["variant"] == variant and p["task"] == task),
        key=lambda p: p["fold"],
    )
    if not preds:
        return None
    groups = None
    if all("clusters" in p for p in preds):
        groups = np.concatenate([np.asarray(p["clusters"], dtype=object) for p in preds])
    return (
        [p["fold"] for p in preds],
        np.concatenate([p["y"] for p in preds]),
        np.concatenate([p["probs"].argmax(axis=1) for p in preds]),
        groups,
    )


def _paired(
    predictions: Sequence[dict[str, Any]], variant_a: str, variant_b: str, task: str
) -> tuple[float, float, float, int] | None:
    """:func:`paired_bacc_difference` of ``variant_a`` minus ``variant_b`` on ``task``, the
    test windows of every fold pooled and resampled by their subject/recording, and how many
    of those there are; None unless both were tested on the same windows."""
    a, b = _pooled(predictions, variant_a, task), _pooled(predictions, variant_b, task)
    if a is None or b is None or a[0] != b[0] or not np.array_equal(a[1], b[1]):
        return None
    units = len(a[1]) if a[3] is None else len(np.unique(a[3].astype(str)))
    return (*paired_bacc_difference(a[1], a[2], b[2], groups=a[3]), units)


# A verdict needs this many subjects/recordings: with n of them, even all n differing the
# same way has a two-sided sign-test p of 2 ** (1 - n), above 0.05 for n < 6; and a bootstrap
# over so few units is far too sure of itself (with 2, its 95% interval spans the two units).
MIN_VERDICT_UNITS = 6


# The baseline verdicts of comparisons(), read as they stand in the report's sentences
# ("the model <verdict> the band-power baseline").
BEATS = "beats"
DOES_NOT_BEAT = "does NOT beat"
NO_CLEAR_DIFFERENCE = "shows no clear difference from"
# The multi-task against single-task verdicts.
NEGATIVE_TRANSFER = "negative transfer"
POSITIVE_TRANSFER = "positive transfer"


def _side_of_zero(low: float, high: float, above: str, below: str, neither: str) -> str:
    """``above`` when the range [low, high] lies above 0, ``below`` when below, else ``neither``."""
    return above if low > 0 else below if high < 0 else neither


def comparisons(
    summary, tasks: Sequence[str], predictions: Sequence[dict[str, Any]] = ()
) -> dict[str, dict[str, Any]]:
    """Per task: the model's balanced accuracy against the baseline and, for multi-task runs,
    against single-task training (the negative-transfer check).

    With the test predictions (``predictions``, as :func:`_record` keeps them), a verdict
    (the model beats the baseline or not; negative or positive transfer) needs the 95% paired
    bootstrap interval of the difference (:func:`paired_bacc_difference`, the test windows of
    every fold pooled, resampled by subject/recording) to exclude 0 and at least
    ``MIN_VERDICT_UNITS`` subjects/recordings tested; otherwise, or where a class is tested on
    a single subject/recording (no interval), there is no clear difference. Without them, the
    means decide against the baseline, and the larger fold std bounds what counts as
    transfer."""
    out = {}
    for task in tasks:
        entry: dict[str, Any] = {}
        model_variant = next(
            (
                v
                for v in ("multitask", "single", "linear_probe")
                if (v, task, "balanced_accuracy") in summary
            ),
            None,
        )
        base = summary.get(("band_power", task, "balanced_accuracy"))
        if model_variant is not None:
            mean, std, folds = summary[(model_variant, task, "balanced_accuracy")]
            entry.update(model_variant=model_variant, model=mean, model_std=std, folds=folds)
            if base is not None:
                entry.update(baseline=base[0], baseline_std=base[1])
                verdict = BEATS if mean > base[0] else DOES_NOT_BEAT
                paired = _paired(predictions, model_variant, "band_power", task)
                if paired is not None:
                    diff, low, high, units = paired
                    # NaN: a class tested on a single subject/recording; no interval, no win
                    interval = None if math.isnan(low) else [low, high]
                    entry.update(baseline_difference=diff, baseline_interval=interval, units=units)
                    verdict = (
                        NO_CLEAR_DIFFERENCE
                        if interval is None or units < MIN_VERDICT_UNITS
                        else _side_of_zero(low, high, BEATS, DOES_NOT_BEAT, NO_CLEAR_DIFFERENCE)
                    )
                entry.update(baseline_verdict=verdict, beats_baseline=verdict == BEATS)
        mt = summary.get(("multitask", task, "balanced_accuracy"))
        st = summary.get(("single", task, "balanced_accuracy"))
        if mt is not None and st is not None:
            diff, noise = mt[0] - st[0], max(mt[1], st[1])
            paired = _paired(predictions, "multitask", "single", task)
            if paired is not None and math.isnan(paired[1]):
                entry.update(transfer_interval=None, units=paired[3])
                verdict = "no clear difference (too few subjects/recordings for an interval)"
            elif paired is not None and paired[3] < MIN_VERDICT_UNITS:
                entry.update(transfer_interval=list(paired[1:3]), units=paired[3])
                verdict = f"no clear difference (only {paired[3]} subjects/recordings)"
            elif paired is not None:  # transfer only where the paired interval excludes 0
                _, low, high, units = paired
                entry.update(transfer_interval=[low, high], units=units)
                verdict = _side_of_zero(
                    low,
                    high,
                    POSITIVE_TRANSFER,
                    NEGATIVE_TRANSFER,
                    "no clear difference (interval holds 0)",
                )
            else:  # a difference within the larger fold std is not called transfer
                verdict = _side_of_zero(
                    diff - noise,
                    diff + noise,
                    POSITIVE_TRANSFER,
                    NEGATIVE_TRANSFER,
                    "no clear difference (within fold std)",
                )
            entry.update(
                multitask=mt[0],
                single=st[0],
                transfer=diff,
                transfer_noise=noise,
                negative_transfer=verdict == NEGATIVE_TRANSFER,
                transfer_verdict=verdict,
            )
        out[task] = entry
    return out


def _json_numbers(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None, which strict JSON readers take."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(v) for v in value]
    return value


def _table_cell(text: str) -> str:
    """``text`` in a Markdown table cell: a ``|`` in it (a task named after a folder) would
    end the cell and shift the row's columns."""
    return text.replace("|", "\\|")


def write_outputs(
    result: CVResult,
    data: TrainData,
    out_dir: Path,
    *,
    title: str,
    notes: Sequence[str] = (),
    fixed_model: bool = False,
) -> dict[str, Any]:
    """results.csv, summary.json, report.md and PNG plots in ``out_dir``.

    ``fixed_model``: the results are one trained model's scores (``eegfast evaluate``), not
    folds: the report has no cross-validation lines, no fold columns and no ± std.
    """
    from eegfast.train import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    # csv quotes a task named after a folder like "Patients, 2023" (joined by hand, its comma
    # split the row into six fields)
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(["fold", "variant", "task", "metric", "value"])
    table.writerows(
        [r["fold"], r["variant"], r["task"], r["metric"], f"{r['value']:.6g}"] for r in result.rows
    )
    write_text_atomic(out_dir / "results.csv", buffer.getvalue())
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(out_dir / "tensorboard")) as writer:  # step = fold
        for r in result.rows:
            if not math.isnan(r["value"]):
                writer.add_scalar(
                    f"cv/{r['task']}/{r['metric']}/{r['variant']}", r["value"], r["fold"]
                )
    summary = summarise(result.rows)
    tasks = sorted({r["task"] for r in result.rows})
    compared = comparisons(summary, tasks, result.predictions)

    figures: dict[str, str] = {}
    if any(result.loss_curves.values()):
        figures["loss curves"] = plots.loss_curves(
            result.loss_curves, out_dir / "loss_curves.png", "fine-tuning loss per fold"
        ).name
    main_variant = next(
        (
            v
            for v in ("multitask", "single", "linear_probe", "band_power")
            if any(p["variant"] == v for p in result.predictions)
        ),
        None,
    )
    if main_variant is not None:
        matrices = {}
        for task in tasks:
            preds = [
                p for p in result.predictions if p["variant"] == main_variant and p["task"] == task
            ]
            if preds:
                n = len(data.label_names[task])
                matrices[task] = sum(confusion(p["y"], p["probs"], n) for p in preds)
        figures[f"confusion matrices ({main_variant})"] = plots.confusion_matrices(
            matrices, data.label_names, out_dir / "confusion_matrices.png"
        ).name
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for task in tasks:
        if len(data.label_names[task]) != 2:
            continue
        for variant in ("multitask", "single", "linear_probe", "band_power"):
            preds = [p for p in result.predictions if p["variant"] == variant and p["task"] == task]
            y = np.concatenate([p["y"] for p in preds]) if preds else np.zeros(0)
            if len(np.unique(y)) == 2:  # no curve without both classes (a data subset)
                roc.setdefault(task, {})[variant] = (
                    y,
                    np.concatenate([p["probs"][:, 1] for p in preds]),
                )
    if roc:
        positive = {task: data.label_names[task][1] for task in roc}
        figures["ROC curves"] = plots.roc_curves(
            roc, out_dir / "roc_curves.png", positive, pooled=not fixed_model
        ).name
    if result.expert_load:
        loads = {t: np.mean(v, axis=0) for t, v in result.expert_load.items()}
        figures["expert load per task"] = plots.expert_load(loads, out_dir / "expert_load.png").name
    # A plot an earlier report in this folder drew and this one does not (no ROC curve without
    # both classes, no expert load without MoE) would sit beside a report that does not show it.
    for name in plots.REPORT_PLOTS:
        if name not in figures.values():
            (out_dir / name).unlink(missing_ok=True)

    md = [f"# {title}", ""]
    md += [f"- {note}" for note in notes]
    if not fixed_model:
        md += [f"- cross-validation for `{t}`: grouped {g}" for t, g in result.grouping.items()]
    md += ["", "## Metrics" if fixed_model else "## Metrics (mean ± std over folds)", ""]
    metrics = sorted(
        {r["metric"] for r in result.rows},
        key=["balanced_accuracy", "auroc", "auc_pr", "cohen_kappa", "f1_weighted"].index,
    )
    fold_column = "" if fixed_model else " folds |"
    md.append("| task | method |" + fold_column + " " + " | ".join(metrics) + " |")
    md.append("|---|---|" + ("" if fixed_model else "---|") + "---|" * len(metrics))
    for task in tasks:
        for variant in ("multitask", "single", "linear_probe", "band_power"):
            if (variant, task, "balanced_accuracy") not in summary:
                continue
            cells = []
            n_folds = summary[(variant, task, "balanced_accuracy")][2]
            for m in metrics:
                value = summary.get((variant, task, m))
                if value is None:
                    cells.append("")
                elif fixed_model:
                    cells.append("n/a" if math.isnan(value[0]) else f"{value[0]:.3f}")
                else:
                    cells.append(_fmt_folds(*value, n_folds))
            folds = "" if fixed_model else f" {n_folds} |"
            row = f"| {_table_cell(task)} | {VARIANT_NAMES[variant]} |{folds} "
            md.append(row + " | ".join(cells) + " |")
    # AUROC and AUC-PR score class 1 (classification_metrics): without its name and share a
    # reader cannot tell an AUC-PR at chance (the share, 0.25 for a 3:1 task) from a poor one.
    chance = []
    for task in tasks:
        preds = [p for p in result.predictions if p["task"] == task]
        if "auc_pr" not in metrics or len(data.label_names[task]) != 2 or not preds:
            continue
        # One variant's folds (every variant is tested on the same windows). The table's AUC-PR
        # is the mean over the folds that test both classes (elsewhere it is NaN), so its chance
        # is the mean of those folds' shares: the pooled share also counted the windows of a
        # fold testing one class, and weighed folds by their size.
        shares = [
            float(np.mean(p["y"] == 1))
            for p in preds
            if p["variant"] == preds[0]["variant"] and 0 < np.mean(p["y"] == 1) < 1
        ]
        if shares:  # (none: one class tested in every fold, AUROC and AUC-PR are n/a)
            over = "" if len(shares) == 1 else ", the mean over the folds that test both classes"
            chance.append(
                f"- `{task}`: AUROC, AUC-PR and the ROC curves take "
                f"`{data.label_names[task][1]}` as the positive class; AUC-PR at chance is its "
                f"share of the test windows, {np.mean(shares):.3f}{over} (0.5 for AUROC and "
                "balanced accuracy)."
            )
    if chance:
        md += ["", *chance]
    if any("baseline_verdict" in entry for entry in compared.values()):
        md += ["", "## Against the classic baseline (balanced accuracy)", ""]
    for task, entry in compared.items():
        if "baseline_verdict" in entry:
            interval = ""
            unit = result.units.get(task, "recording")
            if entry.get("baseline_interval"):
                low, high = entry["baseline_interval"]
                interval = (
                    f"; over the pooled test windows the difference is "
                    f"{entry['baseline_difference']:+.3f}, 95% paired bootstrap interval "
                    f"[{low:+.3f}, {high:+.3f}]"
                )
                if entry["units"] < MIN_VERDICT_UNITS:
                    interval += (
                        f", over only {entry['units']} {unit}s: too few for a verdict "
                        f"(it needs {MIN_VERDICT_UNITS})"
                    )
            elif "baseline_interval" in entry:
                interval = (
                    f"; over the pooled test windows the difference is "
                    f"{entry['baseline_difference']:+.3f}, with no interval: a class is tested "
                    f"on a single {unit}"
                )
            md.append(
                f"- `{task}`: {VARIANT_NAMES[entry['model_variant']]} {entry['model']:.3f} "
                f"{entry['baseline_verdict']} the band-power baseline {entry['baseline']:.3f} "
                f"(over {entry['folds']} folds; fold std {entry['model_std']:.3f} vs "
                f"{entry['baseline_std']:.3f}{interval})."
            )
    if any("baseline_interval" in e for e in compared.values()):
        units = sorted({result.units.get(t, "recording") for t in compared})
        md += [
            "",
            "A verdict needs the interval to exclude 0 and at least "
            f"{MIN_VERDICT_UNITS} {' or '.join(f'{u}s' for u in units)} tested: windows of "
            "one recording are correlated, so the bootstrap resamples whole "
            + " or ".join(f"{u}s" for u in units)
            + " (the unit the folds are grouped by), not windows, and with fewer units not "
            "even all of them agreeing would be significant at the 5% level (sign test).",
        ]
    if any("transfer" in e for e in compared.values()):
        md += [
            "",
            "## Negative-transfer report (multi-task vs single-task, same folds)",
            "",
            "| task | multi-task BAcc | single-task BAcc | difference | larger fold std "
            "| 95% paired interval (pooled windows, resampled by subject/recording) "
            "| verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, entry in compared.items():
            if "transfer" in entry:
                low_high = entry.get("transfer_interval")
                interval = f"[{low_high[0]:+.3f}, {low_high[1]:+.3f}]" if low_high else "n/a"
                md.append(
                    f"| {_table_cell(task)} | {entry['multitask']:.3f} | {entry['single']:.3f} | "
                    f"{entry['transfer']:+.3f} | {entry['transfer_noise']:.3f} | {interval} | "
                    f"{entry['transfer_verdict']} |"
                )
    if figures:
        md += ["", "## Plots", ""] + [
            f"- {name}: ![{name}]({file})" for name, file in figures.items()
        ]
    md.append("")
    write_text_atomic(out_dir / "report.md", "\n".join(md))
    payload = {
        "summary": [
            {"variant": v, "task": t, "metric": m, "mean": mean, "std": std, "folds": n}
            for (v, t, m), (mean, std, n) in sorted(summary.items())
        ],
        "comparisons": compared,
        "grouping": result.grouping,
        "figures": figures,
    }
    # strict JSON (jq, JavaScript): a metric undefined in every fold (NaN) is null there
    write_json_atomic(out_dir / "summary.json", _json_numbers(payload))
    # Per variant, task and fold: labels, probabilities and whose windows they are (row for
    # row), so that scores per subject or recording can be computed from the file; strings as
    # plain unicode arrays (np.load needs no pickle).
    arrays = {
        f"{p['variant']}_{p['task']}_fold{p['fold']}_{name}": (
            np.asarray(p[key], dtype=str) if key in ("subjects", "recordings") else p[key]
        )
        for p in result.predictions
        for key, name in (
            ("y", "y"),
            ("probs", "probs"),
            ("subjects", "subject"),
            ("recordings", "recording"),
        )
        if key in p
    }

    def save_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(out_dir / "predictions.npz", save_npz)
    return payload
