"""Training data loaders under process start methods other than fork: spawn (macOS, Windows)
and forkserver (Python 3.14's Linux default) pickle what they send to the DataLoader workers."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch

from eegfast.data import collate_padded
from eegfast.train import engine
from eegfast.train.engine import IndexedDataset, indexed_collate
from tests.train import worker
from tests.train.fakes import SyntheticEEG


def test_indexed_collate_pickles_and_collates_alike():
    """``indexed_collate`` returned a local function: fit() over a dataset that is not made of
    prepared folders, with ``data.num_workers`` > 0, failed under spawn and forkserver with
    "Can't pickle local object 'indexed_collate.<locals>.collate'" before the first batch."""
    data = SyntheticEEG(6)
    items = [IndexedDataset(data)[i] for i in (4, 0, 2)]  # one electrode set: 4 channels
    collate = indexed_collate(collate_padded)
    expected = collate(items)
    got = pickle.loads(pickle.dumps(collate))(items)
    assert got.keys() == expected.keys()
    assert got["index"].tolist() == [4, 0, 2] and got["index"].dtype == torch.long
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.slow
def test_fit_with_spawned_loader_workers_trains_as_in_process(tmp_path, monkeypatch):
    """fit() with a DataLoader worker started by spawn: the same losses, step for step, as
    with the batches read in the training process (one spawned worker: ~3 s, its imports)."""
    overrides = {"train.epochs": 1}
    in_process = worker.run("finetune", str(tmp_path / "in_process"), overrides)
    monkeypatch.setattr(
        engine, "DataLoader", functools.partial(engine.DataLoader, multiprocessing_context="spawn")
    )
    spawned = worker.run(
        "finetune", str(tmp_path / "spawned"), {**overrides, "data.num_workers": 1}
    )
    assert spawned.step == in_process.step == 8
    assert spawned.losses == in_process.losses
