"""The training data path and the held-out validation: defects found by an audit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eegfast.data import ShardDataset, make_loader
from eegfast.train.data import TrainData, load_data
from eegfast.train.objectives import StepContext, StepOutput, step_masks
from eegfast.train.validation import (
    ValidationSplitError,
    Validator,
    hold_out,
    objective_evaluator,
)
from tests.train._sample import prepare_windows, sample_recording_cut
from tests.train.test_validation_split import _data


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folder ``a``: two subjects' 12-s cuts; folder ``b``: a third subject's (4-s windows)."""
    root = tmp_path_factory.mktemp("datapath")
    cuts = {n: sample_recording_cut(n, 12.0, root) for n in ("Subject00_2.edf", "Subject01_2.edf")}
    a = prepare_windows(root / "a", [f"arith={c}" for c in cuts.values()])
    b_cut = sample_recording_cut("S001R04.edf", 12.0, root)
    b = prepare_windows(root / "b", [f"mi={b_cut}"], "--no-annotations")
    return a, b


# --- the split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_a_large_subject_is_not_held_out_for_a_small_fraction(seed):
    # data.val_fraction=0.1 of 7 recordings: the 1-recording subject is the split; a seed that
    # drew the 6-recording subject first held out 6 of the 7 and trained on one
    data = _data({"big": 6, "small": 1})
    split = hold_out(data, 0.1, seed)
    assert split.subjects == ["small"] and len(split.recordings) == 1
    assert sorted(split.train + split.val) == list(range(len(data.items)))


def test_subjects_all_larger_than_wanted_hold_out_the_smallest():
    data = _data({"a": 6, "b": 4, "c": 5})  # 0.1 of 15: one recording wanted
    assert {tuple(hold_out(data, 0.1, seed).subjects) for seed in range(8)} == {("b",)}


def test_one_recording_is_refused_without_asking_to_lower_the_fraction():
    # every fraction > 0 holds the one recording out: "lower it" sent users round in circles
    with pytest.raises(ValidationSplitError, match="data.val_fraction=0.01") as err:
        hold_out(_data({"a": 1}), 0.01, 0)
    assert "lower it" not in str(err.value) and "data.val_fraction=0 " in str(err.value)


# --- the validation masks ----------------------------------------------------------------------


def _validation_masks(data: TrainData, positions: list[int]) -> dict[tuple[str, int], list]:
    """{(recording, window in it): the mask the validation drew for it} (seed 0)."""
    first = {}
    for p, item in enumerate(data.items):
        first.setdefault((item.root, item.recording), p)
    masks = {}

    def step(model, batch, ctx):
        mask = step_masks(ctx, batch, None)
        for p, row in zip(batch["index"].tolist(), mask.tolist(), strict=True):
            item = data.items[p]
            masks[(item.recording, p - first[(item.root, item.recording)])] = row
        return StepOutput(torch.zeros(()), {})

    ctx = StepContext(torch.device("cpu"), seed=0, mask_ratio=0.5)
    validator = Validator(
        data, positions, objective_evaluator(step, ctx), device=torch.device("cpu"), batch_size=2
    )
    validator(nn.Linear(1, 1))
    return masks


def test_validation_masks_do_not_move_when_a_resume_adds_data(folders):
    a, b = folders
    started = load_data([a])
    split = hold_out(started, 0.5, 0)
    # the resumed run lists another folder first: the held-out windows' positions move
    grown = load_data([b, a])
    again = hold_out(grown, 0.5, 0, resumed={"validation": split.record()})
    assert again.recordings == split.recordings and len(again.val) == len(split.val)
    assert again.val != split.val
    before = _validation_masks(started, split.val)
    after = _validation_masks(grown, again.val)
    assert sorted(before) == sorted(after) and len(before) == len(split.val)
    assert before == after
    assert len({tuple(m) for m in before.values()}) > 1  # (windows do get masks of their own)


# --- the loader --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*pin_memory:UserWarning")  # the DataLoader's, without CUDA
def test_make_loader_with_pin_memory_on_a_machine_without_cuda(folders, monkeypatch):
    # the DataLoader ignores pin_memory without CUDA (a warning); the in-process batches
    # allocated pinned memory all the same, a RuntimeError at the first batch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ds = ShardDataset(folders[0])
    loader = make_loader(ds, 2, shuffle=False, num_workers=0, pin_memory=True)
    batches = list(loader)
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(len(ds)))
    for batch in batches:
        expected = torch.stack([ds[i]["x"] for i in batch["index"].tolist()])
        torch.testing.assert_close(batch["x"], expected, rtol=0, atol=0)
