"""Prepared folders (``eegfast prepare``) as one training set, with per-item metadata.

Several folders can be used together (e.g. one per dataset, each prepared with its own mains
frequency); items are grouped for batching by (folder, task, electrode set), so batches never
need channel padding and never mix tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset


@dataclass
class ItemInfo:
    root: int  # which folder: its position in TrainData.roots (the folders opened)
    task: str
    subject: str
    recording: str  # file (relative to its folder's sources)
    label: int
    electrodes: tuple[int, ...]  # input_chans
    window_seconds: int

    @property
    def group_key(self) -> tuple:
        return (self.root, self.task, self.electrodes)


@dataclass
class TrainData:
    dataset: Dataset
    items: list[ItemInfo]
    label_names: dict[str, list[str]]  # task -> class names (class id order)
    roots: list[Path]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def group_keys(self) -> list[tuple]:
        return [item.group_key for item in self.items]

    @property
    def tasks(self) -> list[str]:
        return sorted({item.task for item in self.items})

    def subset(self, indices: Sequence[int]) -> TrainData:
        indices = [int(i) for i in indices]
        return TrainData(
            Subset(self.dataset, indices),
            [self.items[i] for i in indices],
            self.label_names,
            self.roots,
        )

    def labelled(self, task: str | None = None) -> np.ndarray:
        """Indices of items with a label (of ``task`` if given)."""
        return np.array(
            [
                i
                for i, item in enumerate(self.items)
                if item.label >= 0 and (task is None or item.task == task)
            ],
            dtype=np.int64,
        )


def load_data(roots: Sequence[str | Path], tasks: Sequence[str] = ()) -> TrainData:
    """Open every prepared folder in ``roots`` (keeping only ``tasks`` if given).

    Each folder numbers the classes of a task on its own (the label names it found, sorted, or
    its ``--classes``), so the same id can name different classes in two folders. A task's class
    list is the first folder's, then names only later folders have; every other folder's ids
    (items and the windows its dataset yields) are renumbered to it.
    """
    from eegfast.data import ShardDataset, load_index

    if not roots:
        raise ValueError(
            "no data: pass --data FOLDER (a folder written by `eegfast prepare`) or set data.roots"
        )
    wanted = set(tasks)
    opened = []  # (folder, its index, the tasks kept from it)
    label_names: dict[str, list[str]] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data folder not found: {root}")
        index = load_index(root)
        present = set(index["tasks"])
        keep = sorted(present & wanted) if wanted else sorted(present)
        if not keep:
            continue
        opened.append((root, index, keep))
        for task in keep:
            merged = label_names.setdefault(task, [])
            merged += [n for n in index["tasks"][task]["labels"] if n not in merged]
    datasets, items, paths = [], [], []
    # a folder without the wanted tasks is not opened: items number the opened ones
    for r, (root, index, keep) in enumerate(opened):
        dataset = ShardDataset(root, tasks=keep)
        # this folder's class id -> the merged id, per task; slot -1 keeps "no label" at -1
        remap = {
            task: np.array(
                [label_names[task].index(n) for n in index["tasks"][task]["labels"]] + [-1],
                dtype=np.int64,
            )
            for task in keep
        }
        window_seconds = int(index["window_seconds"])
        labels = []
        # Items are built per recording (the dataset's recordings, in its item order): one
        # electrode tuple shared by a recording's windows, labels renumbered in one step.
        for rec in dataset.recordings:
            ids = remap[rec["task"]][np.asarray(rec["labels"], dtype=np.int64)]
            labels.append(ids)
            electrodes = tuple(rec["input_chans"])
            items += [
                ItemInfo(
                    root=r,
                    task=rec["task"],
                    subject=rec["subject"],
                    recording=rec["file"],
                    label=label,
                    electrodes=electrodes,
                    window_seconds=window_seconds,
                )
                for label in ids.tolist()
            ]
        labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        dataset.labels = labels  # what its items and batches carry
        datasets.append(dataset)
        paths.append(root)
    missing = wanted - set(label_names)
    if missing:
        raise ValueError(f"data.tasks: {sorted(missing)} not found in {[str(p) for p in roots]}")
    if not items:
        raise ValueError(f"no windows in {[str(p) for p in roots]}")
    dataset = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    return TrainData(dataset, items, label_names, paths)


def collate_fn():
    from eegfast.data import collate_padded

    return collate_padded


def embedding_coverage(data: TrainData, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a model's spatial and temporal embeddings were trained on, for its checkpoint's
    meta (``trained_on``): the embedding rows of the electrodes (``input_chans`` entries, cls
    row 0 left out) and the longest window in seconds (one patch per second) of ``data``, with
    those of ``earlier`` (a resumed run's record). Rows of other electrodes and time rows past
    that window keep their initial values: `eegfast pretrain` warns for data beyond its
    tokenizer's, and `eegfast generate` keeps its context within the hybrid model's."""
    earlier = earlier or {}
    rows = {int(r) for item in data.items for r in item.electrodes if int(r) != 0}
    rows |= {int(r) for r in earlier.get("electrode_rows") or ()}
    seconds = max([item.window_seconds for item in data.items] or [0])
    return {
        "electrode_rows": sorted(rows),
        "window_seconds": max(seconds, int(earlier.get("window_seconds") or 0)),
    }
