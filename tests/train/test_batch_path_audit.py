"""The training loop reads whole batches of prepared folders (``ShardDataset.get_batch``), not
items one by one: the same batches, field for field and in the same order, as the per-item path
(``IndexedDataset`` + ``indexed_collate(collate_padded)``) it replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

from eegfast.data import ShardDataset, collate_padded
from eegfast.testing import requires_cuda
from eegfast.train import engine
from eegfast.train.config import RunConfig
from eegfast.train.data import ShardBatches, load_data, passthrough, shard_batches
from eegfast.train.engine import IndexedDataset, indexed_collate
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.sampler import EpochBatchSampler
from tests.train._sample import two_prepared_folders

FIELDS = ("x", "input_chans", "channel_padding_mask", "label", "subject", "task", "index")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folder ``a`` (float32): 19- and 64-electrode recordings (two electrode sets, two tasks);
    folder ``b`` (float16): another 19-electrode one. 4-s windows every second of 30-s cuts."""
    root = tmp_path_factory.mktemp("batchpath")
    a, b = two_prepared_folders(root, 30.0, 1)
    assert ShardDataset(b).recordings[0]["dtype"] == "float16"
    return a, b


def assert_same_batch(new: dict, old: dict) -> None:
    assert list(new) == list(old) == list(FIELDS)
    for key in FIELDS:
        if isinstance(old[key], torch.Tensor):
            assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape, key
            assert torch.equal(new[key], old[key]), key  # bit for bit (no NaN in EEG windows)
        else:
            assert new[key] == old[key], key


def per_item_loader(dataset, sampler, num_workers=0):
    """The loader fit() built before: items one by one, collated with collate_padded."""
    return DataLoader(
        IndexedDataset(dataset),
        batch_sampler=sampler,
        collate_fn=indexed_collate(collate_padded),
        num_workers=num_workers,
    )


def batch_loader(dataset, sampler, num_workers=0):
    batches = shard_batches(dataset, collate_padded)
    assert isinstance(batches, ShardBatches)
    return DataLoader(
        batches,
        batch_size=None,
        sampler=sampler,
        collate_fn=passthrough,
        num_workers=num_workers,
    )


def test_get_batch_keep_order_is_the_collated_items(folders):
    ds = ShardDataset(folders[0])
    rng = np.random.default_rng(1)
    for indices in (rng.permutation(len(ds))[:11], [5, -1, 0, 5, len(ds) - 2]):
        batch = ds.get_batch(indices, keep_order=True)
        expected = collate_padded([ds[int(i)] for i in indices])
        assert batch["index"].tolist() == [int(i) % len(ds) for i in indices]
        for key in FIELDS[:-1]:
            if key in ("subject", "task"):
                assert batch[key] == expected[key]
            else:
                torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_batches_equal_the_per_item_path(folders, seed):
    # both folders (float32 and float16 shards), three electrode sets, a subset of them as
    # finetune's folds and pretrain's held-out split make
    data = load_data(folders)
    assert isinstance(data.dataset, ConcatDataset)
    assert len({k[2] for k in data.group_keys}) >= 2 and len(data.roots) == 2
    rng = np.random.default_rng(seed)
    for train in (data, data.subset(rng.permutation(len(data))[: len(data) - 5])):
        for accum, world in ((1, 1), (2, 2)):
            for rank in range(world):
                sampler = EpochBatchSampler(
                    train.group_keys, 4, micro_batches=accum, seed=seed, rank=rank, world_size=world
                )
                for epoch, start in ((0, 0), (1, 3)):  # (1, 3): resumed mid-epoch
                    sampler.set_epoch(epoch, start)
                    old = list(per_item_loader(train.dataset, sampler))
                    new = list(batch_loader(train.dataset, sampler))
                    assert len(new) == len(old) > 0
                    for a, b in zip(new, old, strict=True):
                        assert_same_batch(a, b)


def test_batches_built_in_workers_equal_the_per_item_path(folders):
    data = load_data(folders).subset(range(3, 40))
    sampler = EpochBatchSampler(data.group_keys, 4, seed=3)
    old = list(per_item_loader(data.dataset, sampler))
    new = list(batch_loader(data.dataset, sampler, num_workers=2))
    assert len(new) == len(old) > 0
    for a, b in zip(new, old, strict=True):
        assert_same_batch(a, b)


def test_mixed_batches_are_padded_as_collate_padded_does(folders):
    # not what the training sampler asks for, but a ShardBatches gives the per-item batch for
    # any list: electrode sets mixed in one folder, and items of two folders
    data = load_data(folders)
    batches = shard_batches(data.dataset, collate_padded)
    groups = {}
    for i, key in enumerate(data.group_keys):
        groups.setdefault(key, []).append(i)
    firsts = [members[0] for members in groups.values()]
    one_folder = [i for i in firsts if data.items[i].root == 0]
    assert len(one_folder) >= 2
    for indices in (one_folder[::-1], firsts, [firsts[-1], firsts[0], firsts[-1]]):
        expected = indexed_collate(collate_padded)(
            [{**data.dataset[i], "index": i} for i in indices]
        )
        assert_same_batch(batches[indices], expected)


def test_other_datasets_and_collates_keep_the_per_item_path(folders):
    ds = ShardDataset(folders[0])
    assert shard_batches(ds, lambda items: collate_padded(items)) is None
    assert shard_batches(IndexedDataset(ds), collate_padded) is None
    assert shard_batches(ConcatDataset([ds, IndexedDataset(ds)]), collate_padded) is None
    assert shard_batches(Subset(ds, [0, len(ds)]), collate_padded) is None  # out of range
    assert isinstance(shard_batches(Subset(Subset(ds, [2, 1]), [1]), collate_padded), ShardBatches)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen: list[dict] = []


def _record_step(model, batch, ctx):
    model.seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    return StepOutput(model.w * batch["x"].mean())


def _fit(data, run_dir, collate):
    config = RunConfig().with_overrides(
        {"train.batch_size": 4, "train.grad_accum": 2, "train.epochs": 2, "train.progress": False}
    )
    model = _Recorder()
    engine.fit(
        model,
        _record_step,
        data.dataset,
        config,
        run_dir,
        group_keys=data.group_keys,
        collate_fn=collate,
        ctx=StepContext(torch.device("cpu")),
    )
    return model.seen


def test_fit_reads_whole_batches_of_prepared_folders(folders, tmp_path, monkeypatch):
    data = load_data(folders).subset(range(1, 50))
    # a collate of its own keeps fit() on the per-item path: the batches as they were
    old = _fit(data, tmp_path / "old", lambda items: collate_padded(items))

    def no_items(self, i):
        raise AssertionError("fit() read an item of a prepared folder by itself")

    monkeypatch.setattr(ShardDataset, "__getitem__", no_items)
    new = _fit(data, tmp_path / "new", collate_padded)
    assert len(new) == len(old) > 0
    for a, b in zip(new, old, strict=True):
        assert_same_batch(a, b)


@pytest.mark.gpu
@requires_cuda
def test_pinned_batches_equal_the_per_item_path(folders):
    # fit() on a GPU with data.num_workers=0: batches built in pinned memory, which the
    # DataLoader's pinning step passes on as they are
    data = load_data(folders)
    sampler = EpochBatchSampler(data.group_keys, 4, seed=5)
    batches = shard_batches(data.dataset, collate_padded, pin_memory=True)
    new = DataLoader(
        batches, batch_size=None, sampler=sampler, collate_fn=passthrough, pin_memory=True
    )
    old = DataLoader(
        IndexedDataset(data.dataset),
        batch_sampler=sampler,
        collate_fn=indexed_collate(collate_padded),
        pin_memory=True,
    )
    for a, b in zip(new, old, strict=True):
        assert a["x"].is_pinned()
        assert_same_batch(a, b)
