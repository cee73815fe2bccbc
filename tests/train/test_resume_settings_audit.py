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


@pytest.mark.parametrize(
    ("first", "then", "kept"),
    [
        # 4 steps, warm-up 0.5 x 4 = 2; resumed at step 2 for 40 steps (not 20 of warm-up)
        ({"train.max_steps": 4}, {"train.max_steps": 40}, 2),
        # 1 epoch of 6 batches of 4, warm-up 3; resumed for 10 epochs (not 30)
        ({"train.epochs": 1}, {"train.epochs": 10}, 3),
        # ... and with batches of 8: the saved run's epoch still had 6 batches of 4
        ({"train.epochs": 1}, {"train.epochs": 10, "train.batch_size": 8}, 3),
    ],
)
def test_a_checkpoint_without_its_warm_up_keeps_the_one_its_run_had(
    tmp_path, optimizers, first, then, kept
):
    """A checkpoint written before the warm-up's length (and the run's) was recorded: a
    longer resume takes optim.warmup_fraction of the saved run's length as that run counted it
    (its train.max_steps, or train.epochs x its batches an epoch), not of the new length,
    which restarted the warm-up at step 2 at a lower lr."""
    data = SyntheticEEG(24, channels=(4,))
    common = {"optim.warmup_fraction": 0.5, "optim.min_lr": 0.0, "train.checkpoint_every": 2}
    run(data, tmp_path, {**common, **first})
    for later in ckpt.list_checkpoints(tmp_path / "checkpoints")[1:]:
        shutil.rmtree(later.path)  # as if stopped at step 2
    path = tmp_path / "checkpoints" / "step-00000002" / ckpt.STATE
    state = torch.load(path, weights_only=True)
    for key in ("epoch_digest", "epoch_batches", "epoch_items", "total_steps", "warmup_steps"):
        state.pop(key)  # as written before they were recorded
    torch.save(state, path)
    used = []

    def step(model, batch, ctx):
        used.append(max(g["lr"] for g in optimizers[-1].param_groups))
        return StepOutput(model(batch["x"]).logsumexp(-1).mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings naming the changed settings
        result = fit_batches_of_4(TinyClassifier(), step, data, StepContext(torch.device("cpu")),
                                  tmp_path, {**common, **then, "train.checkpoint_every": 0},
                                  resume="auto")  # fmt: skip
    total = ckpt.load_training_state(tmp_path / "checkpoints" / f"step-{result.step:08d}")
    assert total["warmup_steps"] == kept  # what the resumed run's schedule used
    want = cosine_with_warmup(
        2, total_steps=total["total_steps"], warmup_steps=kept, base_lr=5e-4, min_lr=0.0
    )
    assert used[0] == pytest.approx(want, rel=1e-6)


def test_an_older_fine_tuning_fold_resumes_without_a_model_name_change(tmp_path):
    """A fold fine-tuned from --init before finetune recorded the model --init holds in its
    config: model.name there is the from-scratch default (labram_base), the model trained
    (its meta's arch) labram_tiny. Resumed, the warning listed ``model.name: 'labram_base' ->
    'labram_tiny'``, a change nobody made; another model named now is still listed."""
    import json

    from eegfast.train.config import RunConfig
    from eegfast.train.engine import fit
    from tests.train.test_engine import collate

    data = SyntheticEEG(24, channels=(4,))
    settings = {"train.batch_size": 4, "train.progress": False, "model.init": "pre/run"}

    def fine_tune(name: str, max_steps: int, resume: str | None = None) -> list[str]:
        config = RunConfig().with_overrides(
            {**settings, "model.name": name, "train.max_steps": max_steps}
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(TinyClassifier(), recording(), data, config, tmp_path,
                group_keys=data.group_keys(), collate_fn=collate,
                ctx=StepContext(torch.device("cpu")), resume=resume,
                meta={"arch": {"kind": "classifier", "name": name}})  # fmt: skip
        return [str(w.message) for w in caught]

    fine_tune("labram_tiny", 2)
    meta_path = tmp_path / "checkpoints" / "step-00000002" / ckpt.META
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["name"] = "labram_base"  # as an older fold recorded it
    meta_path.write_text(json.dumps(meta))
    said = fine_tune("labram_tiny", 4, resume="auto")
    assert not any("model.name" in s for s in said), said
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    said = fine_tune("labram_small", 4, resume="auto")  # a real change: still named
    assert any("model.name: 'labram_tiny' -> 'labram_small'" in s for s in said), said
