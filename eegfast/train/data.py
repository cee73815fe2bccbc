"""Prepared folders (``eegfast prepare``) as one training set, with per-item metadata.

Several folders can be used together (e.g. one per dataset, each prepared with its own mains
frequency); items are grouped for batching by (folder, task, electrode set), so batches never
need channel padding and never mix tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset


@dataclass(frozen=True)
class ItemInfo:
    """What training needs of one window, without its signal. Read-only: ``load_data`` gives
    the windows of one recording and label one shared ItemInfo (one object per window was most
    of its time and memory: 3M windows took 11.7 s and 1 GB, now 2.2 s and 0.43 GB)."""

    root: int  # which folder: its position in TrainData.roots (the folders opened)
    task: str
    subject: str
    recording: str  # file (relative to its folder's sources)
    label: int
    electrodes: tuple[int, ...]  # input_chans
    window_seconds: int

    @cached_property
    def group_key(self) -> tuple:
        # made once per ItemInfo: a tuple made per window at each call of
        # TrainData.group_keys was 200 MB for 3M windows, held by the sampler for the run
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

    def subset(self, indices: Sequence[int] | np.ndarray) -> TrainData:
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
        dataset = ShardDataset(root, tasks=keep, _index=index)
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
            window_ids = ids.tolist()
            # windows of one label share one (read-only) ItemInfo
            shared = {
                label: ItemInfo(
                    root=r,
                    task=rec["task"],
                    subject=rec["subject"],
                    recording=rec["file"],
                    label=label,
                    electrodes=electrodes,
                    window_seconds=window_seconds,
                )
                for label in set(window_ids)
            }
            items += map(shared.__getitem__, window_ids)
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


class ShardBatches(Dataset):
    """Whole collated batches of a training set of prepared folders: ``batches[indices]`` (a
    list of item positions) is ``collate_padded([dataset[i] for i in indices])`` plus
    ``index`` (``indices``, (B,) long), rows in the order of ``indices``, field for field, but
    read with ``ShardDataset.get_batch`` (one open per recording, rows straight into recycled
    or pinned batch memory) rather than item by item. For a ``DataLoader`` with
    ``batch_size=None`` and a batch sampler as its ``sampler``; made by ``shard_batches``.

    ``leaves``: the ``ShardDataset`` s under ``dataset``; ``leaf`` / ``local`` (N,): which one
    holds each item, and its index there.
    """

    def __init__(
        self, leaves: list, leaf: np.ndarray, local: np.ndarray, *, pin_memory: bool = False
    ) -> None:
        self.leaves = leaves
        self.leaf = leaf
        self.local = local
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.leaf)

    def __getitem__(self, indices: Sequence[int]) -> dict:
        import torch

        from eegfast.data import collate_padded

        idx = np.asarray(indices, dtype=np.int64)
        leaf, local = self.leaf[idx], self.local[idx]
        first = int(leaf[0]) if len(leaf) else 0
        if len(leaf) and (leaf == first).all():
            batch = self.leaves[first].get_batch(local, pin_memory=self.pin_memory, keep_order=True)
        else:
            # items of several folders (the training commands' batches never are: a folder is
            # part of their group keys), or none: the per-item path, with its padding and errors
            batch = collate_padded(
                [self.leaves[int(k)][int(j)] for k, j in zip(leaf, local, strict=True)]
            )
        batch["index"] = torch.from_numpy(idx)
        return batch


def _locate(dataset: Dataset) -> tuple[list, np.ndarray, np.ndarray] | None:
    """(ShardDatasets under ``dataset``, (N,) which one holds each item, (N,) its index
    there) for a ShardDataset or Subsets / ConcatDatasets of them; None for anything else."""
    from eegfast.data import ShardDataset

    if type(dataset) is ShardDataset:  # a subclass may change its items
        n = len(dataset)
        return [dataset], np.zeros(n, np.int32), np.arange(n, dtype=np.int64)
    if type(dataset) is Subset:
        inner = _locate(dataset.dataset)
        if inner is None:
            return None
        leaves, leaf, local = inner
        idx = np.asarray(dataset.indices, dtype=np.int64).reshape(-1)
        if len(idx) != len(dataset.indices) or ((idx < -len(leaf)) | (idx >= len(leaf))).any():
            return None  # the per-item path raises its IndexError when it gets there
        return leaves, leaf[idx], local[idx]
    if type(dataset) is ConcatDataset:
        leaves, leaf, local = [], [], []
        for part in dataset.datasets:
            inner = _locate(part)
            if inner is None:
                return None
            leaf.append(inner[1] + len(leaves))
            local.append(inner[2])
            leaves += inner[0]
        if not leaf:
            return None
        return leaves, np.concatenate(leaf).astype(np.int32), np.concatenate(local)
    return None


def shard_batches(
    dataset: Dataset, collate: Any, *, pin_memory: bool = False
) -> ShardBatches | None:
    """``ShardBatches`` of ``dataset`` when it is made of prepared folders (a ``ShardDataset``,
    ``Subset`` s and ``ConcatDataset`` s of them, as ``load_data`` / ``TrainData.subset`` give)
    and ``collate`` is ``collate_padded``; else None (items are then read one by one and
    collated with ``collate``). ``pin_memory``: batches built in pinned memory (CUDA, batches
    built in this process only: a worker's batches go through shared memory)."""
    from eegfast.data import collate_padded

    if collate is not collate_padded:
        return None
    located = _locate(dataset)
    if located is None:
        return None
    return ShardBatches(*located, pin_memory=pin_memory)


def passthrough(batch: dict) -> dict:
    """The collate function of a ``ShardBatches`` loader: its batches come collated."""
    return batch


def embedding_coverage(data: TrainData, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a model's spatial and temporal embeddings were trained on, for its checkpoint's
    meta (``trained_on``): the embedding rows of the electrodes (``input_chans`` entries, cls
    row 0 left out) and the longest window in seconds (one patch per second) of ``data``, with
    those of ``earlier`` (a resumed run's record). Rows of other electrodes and time rows past
    that window keep their initial values: `eegfast pretrain` warns for data beyond its
    tokenizer's, and `eegfast generate` keeps its context within the hybrid model's."""
    earlier = earlier or {}
    # each electrode set once, not each window's (3M windows of ~30 electrodes: 6 s)
    sets = {item.electrodes for item in data.items}
    rows = {int(r) for electrodes in sets for r in electrodes if int(r) != 0}
    rows |= {int(r) for r in earlier.get("electrode_rows") or ()}
    seconds = max([item.window_seconds for item in data.items] or [0])
    return {
        "electrode_rows": sorted(rows),
        "window_seconds": max(seconds, int(earlier.get("window_seconds") or 0)),
    }


def table_rows(model: Any) -> int | None:
    """The fewest rows of the spatial embedding tables (``pos_embed``: row 0 the cls token,
    then one per electrode of the LaBraM list) of ``model``'s LaBraM encoders and decoders;
    None when it has none. A tokenizer's encoder and decoder, a pretraining student and a
    classifier's backbone each index theirs with a window's ``input_chans``."""
    rows = [
        int(m.config.pos_rows)
        for m in model.modules()
        if isinstance(getattr(getattr(m, "config", None), "pos_rows", None), int)
    ]
    return min(rows) if rows else None


def check_table_rows(data: TrainData, rows: int | None, what: str) -> None:
    """ValueError naming the first folder of ``data`` with electrodes whose embedding row is
    past a table of ``rows`` rows, and those electrodes (``what``: whose table). Data
    prepared with ``--allow-extended`` (bipolar pairs such as ``FP2-F4``, rows 129..136) into
    a model with the reference's 129-row table otherwise failed at the first batch holding
    them, with the model's "input_chans values must be in [0, 129), got [0, 133]", naming
    neither the folder nor the electrodes (a fold's run folders already made). The electrodes
    are named as the folder's recordings name them (what ``--channels`` takes), in row order."""
    if rows is None:
        return
    from eegfast.data import load_index
    from eegfast.electrodes import LABRAM_CHANNEL_NAMES

    beyond: dict[int, dict[str, set[int]]] = {}  # folder -> recording -> its rows past the table
    # each shared ItemInfo once (a recording's windows of one label share one), by identity:
    # hashing each window's electrode tuple would cost seconds for millions of windows
    for item in {id(item): item for item in data.items}.values():
        past = {int(r) for r in item.electrodes if int(r) >= rows}
        if past:
            beyond.setdefault(item.root, {}).setdefault(item.recording, set()).update(past)
    if not beyond:
        return
    root = min(beyond)

    recorded: dict[int, list[str]] = {}  # row -> the names the recordings give it
    for rec in load_index(data.roots[root])["recordings"]:
        past = beyond[root].get(rec["file"], set())
        for name, row in zip(rec["electrodes"], rec["input_chans"][1:], strict=False):
            if row in past and name not in recorded.setdefault(row, []):
                recorded[row].append(name)
    known = LABRAM_CHANNEL_NAMES  # row r is electrode known[r - 1] (row 0: cls)
    names = [
        name
        for r in sorted(set().union(*beyond[root].values()))
        for name in recorded.get(r) or [known[r - 1] if r <= len(known) else f"row {r}"]
    ]
    raise ValueError(
        f"--data {data.roots[root]}: electrodes {names} have no embedding row in {what} (its "
        f"table has {rows} rows: the cls token and {rows - 1} electrodes); prepare the data "
        "again without --allow-extended, or with --channels leaving them out"
    )
