"""Audit of the training data path at pretraining scale (millions of windows, tens of
thousands of recordings): what is done per window or per folder is counted here, not timed.

Measured on a 2-core machine, 3M windows of 20k recordings (synthetic index, sparse shards):
load_data took 11.7 s and 1.05 GB (one ItemInfo per window, index.json parsed and checked
twice), now 2.8 s and 0.43 GB; a resumed run's validation split 12.9 s (a set of the held-out
subjects made for every window), now 0.2 s; embedding_coverage 5.7 s, now 0.5 s; the
sampler's batches and digest at each epoch 4.5 s (every key grouped again), now 0.8 s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eegfast.data import index as index_module
from eegfast.train.data import ItemInfo, TrainData, embedding_coverage, load_data
from eegfast.train.sampler import EpochBatchSampler
from eegfast.train.validation import hold_out

CLASSES = ["left", "right"]


def _folder(root: Path, labels_per_recording: list[list[int]]) -> Path:
    """A prepared folder as ``eegfast prepare`` writes it, built by hand: one recording of 2
    electrodes per entry of ``labels_per_recording`` (its windows' class ids, -1 = none),
    subject ``S<k // 2>``, task ``mi``. The shards hold zeros (nothing here reads them)."""
    (root / "shards").mkdir(parents=True)
    recordings = []
    for k, labels in enumerate(labels_per_recording):
        n = len(labels)
        np.save(root / "shards" / f"r{k}.npy", np.zeros((n, 2, 1, 200), np.float32))
        recordings.append(
            {
                "file": f"S{k // 2}/r{k}.edf",
                "subject": f"S{k // 2}",
                "session": "",
                "task": "mi",
                "electrodes": ["C3", "C4"],
                "input_chans": [0, 1 + k % 2, 3],  # two electrode sets
                "shard": f"shards/r{k}.npy",
                "dtype": "float32",
                "window_seconds": 1,
                "starts": [200 * w for w in range(n)],
                "n_windows": n,
                "sfreq_in": 200.0,
                "labels": labels,
            }
        )
    index = {
        "format_version": 1,
        "window_seconds": 1,
        "tasks": {"mi": {"labels": CLASSES}},
        "recordings": recordings,
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


LABELS = [[0, 1, 0, 1, -1], [1, 1, 1], [-1, -1, 0, 0], [0]]


def test_load_data_reads_and_checks_each_index_once(tmp_path, monkeypatch):
    # load_data parsed and checked index.json, then its ShardDataset did it all again: 1.4 s
    # and a second copy of the index in memory for 3M windows
    checked = []
    original = index_module._check_layout
    monkeypatch.setattr(
        index_module, "_check_layout", lambda *a: (checked.append(a[1]), original(*a))
    )
    roots = [_folder(tmp_path / "a", LABELS), _folder(tmp_path / "b", LABELS[:2])]
    data = load_data(roots)
    assert len(data) == sum(map(len, LABELS)) + sum(map(len, LABELS[:2]))
    assert checked == [root / "index.json" for root in roots]


def test_windows_of_a_recording_and_label_share_one_read_only_item(tmp_path):
    data = load_data([_folder(tmp_path / "a", LABELS)])
    # what every window says is what it said (one ItemInfo each)
    expected = [
        ItemInfo(0, "mi", f"S{k // 2}", f"S{k // 2}/r{k}.edf", label, (0, 1 + k % 2, 3), 1)
        for k, labels in enumerate(LABELS)
        for label in labels
    ]
    assert data.items == expected
    assert data.dataset.labels.tolist() == [item.label for item in expected]
    # one object per (recording, label), not per window: 3M windows took 600 MB and most of
    # load_data's 11.7 s
    pairs = {(k, label) for k, labels in enumerate(LABELS) for label in labels}
    assert len({id(item) for item in data.items}) == len(pairs)
    # shared, so read-only: changing one window's label must not relabel its neighbours
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.items[0].label = 1
    # and one group key per item (the sampler holds a key per window for the whole run)
    keys = data.group_keys
    assert keys == [(0, "mi", item.electrodes) for item in expected]
    assert len({id(key) for key in keys}) <= len(pairs)
    subset = data.subset([5, 0, 6])
    assert [item.label for item in subset.items] == [1, 0, 1]


class _CountingHash(str):
    """A subject name that counts how often it is hashed."""

    calls = 0

    def __hash__(self) -> int:
        type(self).calls += 1
        return str.__hash__(self)


def test_a_resumed_split_does_not_rebuild_the_held_out_subjects_per_window():
    # the set of held-out subjects was made for every window: windows x subjects (3M windows
    # and 400 held-out subjects: minutes)
    items = [
        ItemInfo(0, "t", f"s{k % 10}", f"r{k}.edf", -1, (0, 1), 4)
        for k in range(40)
        for _ in range(25)
    ]
    data = TrainData(None, items, {"t": []}, [])
    first = hold_out(data, 0.3, 0)
    record = first.record()
    record["subjects"] = [_CountingHash(s) for s in record["subjects"]]
    _CountingHash.calls = 0
    again = hold_out(data, 0.3, 5, resumed={"validation": record})
    assert (again.train, again.val, again.subjects) == (first.train, first.val, first.subjects)
    assert _CountingHash.calls <= 4 * len(record["subjects"])


class _CountingTuple(tuple):
    """An electrode set that counts how often it is iterated."""

    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return tuple.__iter__(self)


def test_embedding_coverage_reads_each_electrode_set_once():
    # every window's electrodes were walked: 5.7 s for 3M windows, twice per pretraining run
    sets = [_CountingTuple((0, 5, 7)), _CountingTuple((0, 2))]
    items = [ItemInfo(0, "t", "s", f"r{k}", -1, sets[k % 2], 2 + k % 3) for k in range(300)]
    _CountingTuple.iterations = 0
    coverage = embedding_coverage(TrainData(None, items, {"t": []}, []))
    assert coverage == {"electrode_rows": [2, 5, 7], "window_seconds": 4}
    assert _CountingTuple.iterations <= len(sets)


def _reference_batches(keys, size, *, seed, epoch, shuffle, drop_last, unit):
    """EpochBatchSampler.global_batches as it was (item by item, lists of ints): checkpoints
    keep its epoch digest, which a resume compares, so its batches must not change."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    batches = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        if shuffle:
            order = torch.randperm(len(members), generator=generator).tolist()
            members = [members[i] for i in order]
        for start in range(0, len(members), size):
            batch = members[start : start + size]
            if len(batch) < size:
                if drop_last:
                    continue
                padded = -(-len(batch) // unit) * unit
                batch = [batch[i % len(batch)] for i in range(padded)]
            batches.append(batch)
    if shuffle:
        order = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in order]
    return batches


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(("micro", "world"), [(1, 1), (2, 2), (4, 1)])
def test_the_sampler_cuts_the_batches_and_digest_it_cut_before(shuffle, drop_last, micro, world):
    rng = np.random.default_rng(micro * 10 + world)
    sets = [(0, "mi", (0, 1, 2)), (0, "mi", (0, 3)), (1, "rest", (0, 1, 2)), (0, "a", ())]
    keys = [sets[k] for k in rng.choice(4, 203, p=[0.5, 0.3, 0.15, 0.05])]
    sampler = EpochBatchSampler(
        keys, 8, micro_batches=micro, world_size=world, seed=7, shuffle=shuffle,
        drop_last=drop_last,
    )  # fmt: skip
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        expected = _reference_batches(
            keys, 8, seed=7, epoch=epoch, shuffle=shuffle, drop_last=drop_last, unit=micro * world
        )
        batches = sampler.global_batches()
        assert batches == expected and all(type(i) is int for b in batches for i in b)
        digest = hashlib.sha256(np.array([len(b) for b in expected], dtype=np.int64).tobytes())
        for batch in expected:
            digest.update(np.asarray(batch, dtype=np.int64).tobytes())
        assert sampler.epoch_digest() == digest.hexdigest()
        assert len(sampler) == len(expected) * micro
    assert EpochBatchSampler([], 4).global_batches() == [] and len(EpochBatchSampler([], 4)) == 0


class _CountingKey(tuple):
    """A group key that counts how often it is hashed."""

    hashed = 0

    def __hash__(self) -> int:
        type(self).hashed += 1
        return tuple.__hash__(self)


def test_the_sampler_groups_the_items_once_not_at_every_epoch():
    # every epoch's batches (and its digest, and len) went over every item's key again into
    # lists of Python ints: 2 s and 120 MB at each epoch's start for 3M windows
    keys = [_CountingKey((k % 3, "t")) for k in range(300)]
    sampler = EpochBatchSampler(keys, 4)
    _CountingKey.hashed = 0
    for epoch in range(4):
        sampler.set_epoch(epoch)
        sampler.global_batches(), sampler.epoch_digest(), len(sampler), next(iter(sampler))
    assert _CountingKey.hashed <= len(keys) + 10


def test_fine_tuning_records_read_each_index_once_per_data(tmp_path, monkeypatch):
    """``prepared_like`` runs for every trained model (folds x variants): it parsed and checked
    every folder's index.json each time (1.4 s an index of 3M windows)."""
    import eegfast.data
    from eegfast.train.data import load_data
    from eegfast.train.finetune import prepared_like
    from tests.train._sample import two_prepared_folders

    a, b = two_prepared_folders(tmp_path, 12.0, 4.0)
    data = load_data([a, b])
    reads = []
    real = eegfast.data.load_index
    monkeypatch.setattr(eegfast.data, "load_index", lambda root: reads.append(root) or real(root))
    first = prepared_like(data, ["arith"], np.arange(4))
    again = prepared_like(data, ["arith"], np.arange(4))
    assert first == again and len(reads) == 2  # one per folder
    assert [p["root"] for p in first["preprocess"]] == [str(a), str(b)]
    assert prepared_like(data, ["mi"], np.arange(2))["preprocess"][0]["root"] == str(a)
    assert len(reads) == 2


def test_an_index_without_preprocessing_settings_is_read_by_every_path(tmp_path):
    """load_index takes an index.json without ``settings`` (another tool's, or one written by
    hand, as here), and training reads it; what a fine-tuned checkpoint records of its data
    (``prepared_like``) and predict's checks of a folder (``trained_on``, ``check_data``)
    raised KeyError 'settings' on it. Its settings are unknown: {}."""
    from eegfast.train.commands.predict import check_data, trained_on
    from eegfast.train.finetune import prepared_like
    from tests.train.fakes import TinyClassifier

    root = _folder(tmp_path / "a", LABELS)
    assert index_module.preprocess_settings(index_module.load_index(root)) == {}
    data = load_data([root])
    record = prepared_like(data, ["mi"], np.arange(len(data)))
    assert record["preprocess"] == [{"root": str(root), "settings": {}}]
    known = trained_on({"config": {"data": {"roots": [str(root)]}}})
    assert known.preprocess == [(str(root), {})] and known.label_names == {"mi": CLASSES}
    assert check_data(TinyClassifier(), known, data) == []


def test_predicts_data_check_reads_no_index_again(tmp_path, monkeypatch):
    """predict's check_data read every folder's index.json again after load_data had (1.4 s
    and a second copy of the index in memory for a folder of 3M windows); it takes the window
    length and settings the datasets hold, and still tells two folders apart."""
    import eegfast.data
    from eegfast.train.commands import predict as predict_module
    from eegfast.train.commands.common import CommandError
    from eegfast.train.commands.predict import check_data, trained_on
    from tests.train.fakes import TinyClassifier

    a = _folder(tmp_path / "a", LABELS)
    b = _folder(tmp_path / "b", LABELS)
    index = json.loads((b / "index.json").read_text())
    index["window_seconds"] = 2  # (read by check_data only: the shards are not opened)
    (b / "index.json").write_text(json.dumps(index))
    data = load_data([a, b])
    assert [d.window_seconds for d in data.dataset.datasets] == [1, 2]
    known = trained_on({"config": {"data": {"roots": [str(a)]}}})
    reads = []
    for module in (eegfast.data, index_module, predict_module):
        monkeypatch.setattr(module, "load_index", reads.append)
    monkeypatch.setattr(known, "window_seconds", {1})
    with pytest.raises(CommandError, match=rf"--data {b}: 2-s windows"):
        check_data(TinyClassifier(), known, data)
    assert reads == []
