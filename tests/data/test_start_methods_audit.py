"""Prepared folders read by DataLoader workers started by spawn (macOS, Windows) or forkserver
(Python 3.14's Linux default): the dataset is pickled to each worker, not inherited."""

from __future__ import annotations

import functools
import pickle
import resource

import pytest
import torch

from eegfast.data import ShardDataset, collate_padded, make_loader
from eegfast.data import dataset as dataset_module
from eegfast.data.prepare import prepare
from tests.data.test_dataset import many_recordings


@pytest.fixture(scope="module")
def prepared(sample_files, tmp_path_factory):
    """One prepared recording (19 channels), the model of the folders below."""
    out = tmp_path_factory.mktemp("one") / "prepared"
    prepare([str(sample_files["Subject00_2.edf"])], out, progress=False)
    return out


def test_pickled_dataset_gives_the_same_items_and_batches(prepared, tmp_path):
    """What a spawned worker gets: a pickled copy, whose items and batches are the original's
    (``input_chans`` as a long tensor per recording; batch memory not carried along)."""
    folder, _ = many_recordings(prepared, tmp_path, 3)
    ds = ShardDataset(folder)
    ds.get_batch([0, 1])  # batch memory in use: not pickled
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._memory._buffers == []
    for i in range(len(ds)):
        item, expected = copy[i], ds[i]
        assert item["input_chans"].dtype == torch.long
        assert item.keys() == expected.keys()
        for key, value in expected.items():
            same = torch.equal(item[key], value) if torch.is_tensor(value) else item[key] == value
            assert same, key
    got, expected = copy.get_batch([5, 0, 3]), ds.get_batch([5, 0, 3])
    for key, value in expected.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value


@pytest.mark.slow
def test_spawned_workers_read_more_recordings_than_open_file_limit(prepared, tmp_path, monkeypatch):
    """A folder of more recordings than the open-file limit, read by a spawned worker: the
    dataset held one ``input_chans`` tensor per recording, and pickling it to the worker shares
    each tensor's memory through a file descriptor of its own (torch's file_descriptor
    strategy), so the worker failed at once with "unable to open shared memory object ...
    Too many open files" (1024 by default on Linux; forked workers inherit the dataset)."""
    n_recordings = 300
    folder, rows = many_recordings(prepared, tmp_path, n_recordings)
    ds = ShardDataset(folder)
    in_process = make_loader(ds, 64, shuffle=True, seed=5, num_workers=0, pin_memory=False)
    expected = list(in_process)
    monkeypatch.setattr(
        dataset_module,
        "DataLoader",
        functools.partial(dataset_module.DataLoader, multiprocessing_context="spawn"),
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 200), hard))
    try:
        loader = make_loader(ds, 64, shuffle=True, seed=5, num_workers=1, pin_memory=False)
        batches = list(loader)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(batches) == len(expected)
    for batch, want in zip(batches, expected, strict=True):
        assert torch.equal(batch["index"], want["index"])
        assert torch.equal(batch["x"], want["x"])
        assert torch.equal(batch["input_chans"], want["input_chans"])
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(len(ds)))
    assert collate_padded([ds[len(ds) - 1]])["x"][0, 0, 0, 0] == rows[1, 0, 0, 0] + (
        rows.dtype.type(n_recordings - 1)
    )
