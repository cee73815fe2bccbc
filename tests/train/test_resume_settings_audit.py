"""Resuming a run with other settings or data: the epochs left, the place in the epoch and the
learning-rate warm-up."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.optim import cosine_with_warmup
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4


def recording(seen: list[list[int]] | None = None):
    """A step that notes each batch's dataset indices in ``seen``."""

    def step(model, batch, ctx):
        if seen is not None:
            seen.append(batch["index"].tolist())
        return StepOutput(model(batch["x"]).logsumexp(-1).mean())

    return step


def run(data, run_dir, overrides, resume=None, seen=None):
    """``fit`` of a TinyClassifier on CPU; returns its result and the warnings' texts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_batches_of_4(TinyClassifier(), recording(seen), data,
                                  StepContext(torch.device("cpu")), run_dir, overrides,
                                  resume=resume)  # fmt: skip
    return result, [str(w.message) for w in caught]


def test_a_resume_with_a_larger_batch_size_trains_the_epochs_left(tmp_path):
    """Two epochs of 6 batches of 4, then train.epochs=4 with batches of 8 (3 an epoch): the
    run trains two more epochs. The total had been epochs x the new steps an epoch (4 x 3 =
    12, the step it was at), so the resume stopped at once as "already complete"."""
    data = SyntheticEEG(24, channels=(4,))
    run(data, tmp_path, {"train.epochs": 2})
    result, _ = run(data, tmp_path, {"train.epochs": 4, "train.batch_size": 8}, resume="auto")
    assert (result.step, result.epoch) == (12 + 2 * 3, 4)


def test_a_resume_into_more_training_windows_trains_the_epochs_asked_and_says_so(tmp_path):
    """A run of 2 epochs over 24 windows (6 steps each), stopped after its first, resumed with
    the same settings over 48 windows (a folder added): one more epoch, of 12 steps, with a
    warning that the run's length (and so its lr schedule) changed. It had trained 18 steps,
    1.5 epochs of the new data, without a word."""
    run(SyntheticEEG(24), tmp_path, {"train.epochs": 2})
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000012")  # as if stopped after epoch 0
    result, said = run(SyntheticEEG(48), tmp_path, {"train.epochs": 2}, resume="auto")
    assert (result.step, result.epoch) == (6 + 12, 2)
    assert any("18 optimiser steps long now, 12 when it was saved" in s for s in said), said


@pytest.mark.parametrize(
    ("changed", "named"),
    [({"train.batch_size": 8}, "train.batch_size: 4 -> 8"), ({"train.seed": 1}, "train.seed")],
)
def test_a_mid_epoch_resume_into_other_batches_goes_on_after_the_same_share(
    tmp_path, changed, named
):
    """Stopped after 3 of an epoch's 6 batches of 4. Resumed with batches of 8 (3 an epoch)
    the position, counted in old batches, skipped the whole epoch's rest; with another seed
    it went on in another order, without a word. Now the epoch goes on after the same share
    of its new batches, with a warning naming the change."""
    data = SyntheticEEG(24, channels=(4,))
    first: list[list[int]] = []
    run(data, tmp_path, {"train.max_steps": 3, "train.checkpoint_every": 3}, seen=first)
    state = ckpt.load_training_state(tmp_path / "checkpoints" / "step-00000003")
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 3)
    rest: list[list[int]] = []
    result, said = run(data, tmp_path, changed, resume="auto", seen=rest)
    new_batches = 24 // changed.get("train.batch_size", 4)
    assert len(rest) == new_batches - new_batches // 2  # the epoch's second half
    assert result.epoch == 1
    assert any("cut otherwise now" in s and named in s for s in said), said


def test_a_checkpoint_without_an_epoch_digest_resumed_with_a_larger_batch_size(tmp_path):
    """A checkpoint written before the epoch's digest was recorded: its config's batch size
    tells that the epoch's batches differ."""
    data = SyntheticEEG(24, channels=(4,))
    run(data, tmp_path, {"train.max_steps": 3, "train.checkpoint_every": 3})
    path = tmp_path / "checkpoints" / "step-00000003" / ckpt.STATE
    state = torch.load(path, weights_only=True)
    for key in ("epoch_digest", "epoch_batches", "epoch_items", "total_steps", "warmup_steps"):
        state.pop(key, None)  # (present since they are recorded)
    torch.save(state, path)
    rest: list[list[int]] = []
    result, said = run(data, tmp_path, {"train.batch_size": 8}, resume="auto", seen=rest)
    assert len(rest) == 2 and result.step == 5
    assert any("train.batch_size: 4 -> 8" in s and "cut otherwise" in s for s in said), said


def test_a_mid_epoch_resume_with_other_grad_accum_or_workers_is_exact_and_quiet(tmp_path):
    """The epoch's batches do not depend on train.grad_accum: no warning about them."""
    data = SyntheticEEG(24, channels=(4,))
    run(data, tmp_path, {"train.max_steps": 3, "train.checkpoint_every": 3})
    rest: list[list[int]] = []
    result, said = run(data, tmp_path, {"train.grad_accum": 2}, resume="auto", seen=rest)
    assert len(rest) == 2 * 3 and result.step == 6
    assert not any("cut otherwise" in s or "steps long now" in s for s in said), said


def test_a_longer_run_keeps_the_warm_up_it_had(tmp_path, optimizers):
    """Warm-up of optim.warmup_fraction=0.5 of 4 steps (2), resumed at step 4 with
    train.max_steps=40: the warm-up stays 2 steps and the cosine goes on over 40. It had become
    20 steps, restarting the warm-up at step 4 at a quarter of optim.lr."""
    data = SyntheticEEG(24, channels=(4,))
    overrides = {"train.max_steps": 4, "optim.warmup_fraction": 0.5, "optim.min_lr": 0.0}
    run(data, tmp_path, overrides)
    used = []

    def step(model, batch, ctx):
        used.append(max(g["lr"] for g in optimizers[-1].param_groups))
        return StepOutput(model(batch["x"]).logsumexp(-1).mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning naming train.max_steps
        fit_batches_of_4(TinyClassifier(), step, data, StepContext(torch.device("cpu")),
                         tmp_path, {**overrides, "train.max_steps": 40}, resume="auto")  # fmt: skip
    want = [
        cosine_with_warmup(s, total_steps=40, warmup_steps=2, base_lr=5e-4, min_lr=0.0)
        for s in (4, 5)
    ]
    assert used[:2] == pytest.approx(want, rel=1e-6)
