"""The evaluation side reads whole batches of prepared folders (``ShardDataset.get_batch``
through ``eegfast.train.data.shard_batches``), not items one by one: validation
(``Validator``), and ``finetune.iterate_batches``, which fine-tuning's test-set predictions,
``eegfast evaluate`` and ``eegfast predict`` (``predict``, ``predict_heads``,
``export_features``) and the tokenizer's codebook summary read through. The same batches,
field for field and in the same order, and the same numbers as the per-item path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eegfast.data import ShardDataset, collate_padded
from eegfast.train import finetune
from eegfast.train.arch import build_model
from eegfast.train.commands.evaluate import export_features
from eegfast.train.data import load_data
from eegfast.train.distributed import DistInfo
from eegfast.train.finetune import iterate_batches, predict, predict_heads
from eegfast.train.validation import Validator
from tests.train._sample import two_prepared_folders

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folder ``a`` (float32): 19- and 64-electrode recordings (two electrode sets, tasks
    ``arith`` and ``mi``); folder ``b`` (float16): another 19-electrode ``arith`` one. 4-s
    windows every 2 s of 20-s cuts: 22 windows."""
    root = tmp_path_factory.mktemp("evalbatch")
    a, b = two_prepared_folders(root, 20.0, 2)
    return a, b


def assert_same_batch(new: dict, old: dict) -> None:
    assert list(new) == list(old)
    for key, value in old.items():
        if isinstance(value, torch.Tensor):
            assert new[key].dtype == value.dtype and new[key].shape == value.shape, key
            assert torch.equal(new[key], value), key  # bit for bit (no NaN in EEG windows)
        else:
            assert new[key] == value, key


def per_item_batches(data, indices, batch_size):
    """What iterate_batches gave before: items one by one, collated with collate_padded."""
    groups: dict[tuple, list[int]] = {}
    for pos, index in enumerate(indices):
        groups.setdefault(data.items[int(index)].group_key, []).append(pos)
    for positions in groups.values():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            yield chunk, collate_padded([data.dataset[int(indices[p])] for p in chunk])


def _refuse_item(self, i):
    raise AssertionError("an evaluation path read an item of a prepared folder by itself")


@pytest.fixture
def no_items(monkeypatch):
    """Reading an item of a prepared folder by itself fails the test."""
    monkeypatch.setattr(ShardDataset, "__getitem__", _refuse_item)


def test_iterate_batches_equal_the_per_item_batches(folders):
    data = load_data(folders)
    assert len(data.roots) == 2 and len({k[2] for k in data.group_keys}) == 2
    rng = np.random.default_rng(0)
    # all windows in order, a shuffled part with a repeat and negative positions, and the
    # training subset the tokenizer's codebook summary reads
    shuffled = rng.permutation(len(data))[:15].tolist() + [3, -1, -len(data)]
    sub = data.subset(rng.permutation(len(data))[:16])
    for part, indices in ((data, np.arange(len(data))), (data, shuffled), (sub, range(12))):
        for size in (1, 4, 64):
            old = list(per_item_batches(part, list(indices), size))
            new = list(iterate_batches(part, list(indices), size))
            assert len(new) == len(old) > 0
            for (new_pos, a), (old_pos, b) in zip(new, old, strict=True):
                assert new_pos == old_pos
                assert_same_batch(a, b)


def test_iterate_batches_reads_whole_batches(folders, no_items):
    data = load_data(folders)
    assert sum(len(p) for p, _ in iterate_batches(data, range(len(data)), 4)) == len(data)


def _recorder(seen: list):
    """An ``evaluate`` whose loss and metrics depend on every field it is given."""

    def evaluate(model, batch):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        x = batch["x"].double()
        loss = x.mean() + (x * batch["channel_padding_mask"][:, :, None, None]).abs().sum()
        metrics = {
            "label": batch["label"].double().mean(),
            "chans": batch["input_chans"].double().mean(),
            "where": (batch["index"] * 3 + batch["mask_key"] % 1000).double().mean(),
            "names": torch.tensor(float(sum(map(len, batch["subject"] + batch["task"])))),
        }
        codes = (batch["x"][:, :, :, 0].abs() * 1e3).long() % 7  # (B, C, A) of 7 codes
        return loss, metrics, codes

    return evaluate


@pytest.mark.parametrize("world", [1, 2])
def test_validation_equals_the_per_item_path(folders, world):
    """Every rank's batches and sums as the per-item path's (the held-out windows of both
    folders, batches of 4); across the ranks every window once, with weight 1."""
    data = load_data(folders)
    positions = [p for p in range(len(data)) if p % 3 != 1]  # holes, two folders, three sets
    counted: list[int] = []
    for rank in range(world):
        seen: dict[str, list] = {"new": [], "old": []}
        runs = {}
        for path in ("new", "old"):
            validator = Validator(
                data,
                positions,
                _recorder(seen[path]),
                device=CPU,
                dist_info=DistInfo(rank=rank, world_size=world),
                batch_size=4,
                precision="fp32",
                num_codes=7,
            )
            if path == "old":
                validator.reader = None  # the per-item path, as before
            runs[path] = validator._run(torch.nn.Identity())
        assert len(seen["new"]) == len(seen["old"]) > 0
        for a, b in zip(seen["new"], seen["old"], strict=True):
            assert_same_batch(a, b)
        (sums, windows, counts), (old_sums, old_windows, old_counts) = runs["new"], runs["old"]
        assert windows == old_windows and torch.equal(counts, old_counts)
        assert list(sums) == list(old_sums)
        assert all(torch.equal(sums[k], old_sums[k]) for k in sums)
        counted += [
            int(i)
            for batch, weight in zip(seen["new"], validator.batches, strict=True)
            if weight.weight
            for i in batch["index"]
        ]
    assert sorted(counted) == positions


def test_validation_scalars_equal_the_per_item_path(folders, no_items, monkeypatch):
    data = load_data(folders)
    positions = list(range(2, len(data), 2))
    kwargs = dict(device=CPU, batch_size=3, precision="fp32", num_codes=7)
    new = Validator(data, positions, _recorder([]), **kwargs)(torch.nn.Identity())
    monkeypatch.undo()  # items may be read again: the per-item path
    old_validator = Validator(data, positions, _recorder([]), **kwargs)
    old_validator.reader = None
    assert new == old_validator(torch.nn.Identity())
    assert set(new) >= {"val/loss", "val/label", "val/where", "val/perplexity"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    arch = {"kind": "classifier", "name": "labram_tiny", "kwargs": {}}
    net = build_model({**arch, "heads": {"arith": 2, "mi": 3}})
    return net.eval()


def _per_item(monkeypatch):
    """Put ``finetune`` on the per-item path (what it read before) for the rest of the test."""
    monkeypatch.setattr(finetune, "_shard_batches", lambda data: None)


def test_predictions_equal_the_per_item_path(folders, model, monkeypatch, tmp_path):
    """finetune's predict (probabilities and features), predict_heads and evaluate's
    --features file: the same numbers, bit for bit, read whole batches at a time."""
    data = load_data(folders)
    arith = [i for i, item in enumerate(data.items) if item.task == "arith"][::-1]
    mi = [i for i, item in enumerate(data.items) if item.task == "mi"]

    def outputs(tag: str) -> dict[str, np.ndarray]:
        probs, _ = predict(model, data, arith, "arith", CPU, task_id=None, batch_size=5)
        feats, _ = predict(model, data, mi, "mi", CPU, task_id=None, batch_size=4, features=True)
        out = {"probs": probs, "feats": feats}
        out.update(predict_heads(model, data, arith + mi, ["arith", "mi"], CPU, batch_size=6))
        path = export_features(model, data, tmp_path / f"{tag}.npz", CPU, [], False)
        with np.load(path) as saved:
            out.update({f"npz/{k}": saved[k] for k in saved.files})
        return out

    with monkeypatch.context() as patch:
        patch.setattr(ShardDataset, "__getitem__", _refuse_item)
        new = outputs("new")
    _per_item(monkeypatch)
    old = outputs("old")
    assert list(new) == list(old)
    for key in old:
        assert new[key].dtype == old[key].dtype and np.array_equal(new[key], old[key]), key
    assert new["probs"].shape == (len(arith), 2) and new["mi"].shape == (len(arith + mi), 3)


def test_predict_locates_the_items_once_per_data(folders, model, monkeypatch):
    """``eegfast predict`` calls predict once per --batch-size windows with the whole data:
    the items are located in the folders once (for a million windows that took tens of ms a
    call, more than reading the batch), and again only for another data set."""
    made = []
    real = finetune.shard_batches

    def counted(dataset, collate, **kwargs):
        made.append(dataset)
        return real(dataset, collate, **kwargs)

    monkeypatch.setattr(finetune, "shard_batches", counted)
    data = load_data(folders)
    for begin in range(0, len(data), 7):
        chunk = np.arange(begin, min(begin + 7, len(data)))
        task = data.items[int(chunk[0])].task
        chunk = [int(i) for i in chunk if data.items[int(i)].task == task]
        predict(model, data, chunk, task, CPU, task_id=None, batch_size=7)
    assert made == [data.dataset]
    other = load_data(folders[:1])
    predict(model, other, [0, 1], other.items[0].task, CPU, task_id=None)
    assert made == [data.dataset, other.dataset]
