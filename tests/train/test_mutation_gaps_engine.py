"""What the training engine's other tests let slip (found by one-line mutations of
eegfast/train/engine.py, checkpoint.py, optim.py and sampler.py): gradient clipping and the
fp16 unscaling before it, the fp16 skipped-step count and a non-finite gradient, the warm-up
and position on resume, the sampler's length, the best checkpoint's ties, folders set aside,
incomplete checkpoints, the RNG state and the data-change check."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train import engine
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.runlog import read_metrics
from eegfast.train.sampler import EpochBatchSampler
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4


def logsumexp_step(model, batch, ctx):
    return StepOutput(model(batch["x"]).logsumexp(-1).mean())


def cpu() -> StepContext:
    return StepContext(torch.device("cpu"))


@pytest.fixture
def grad_norms_at_steps(monkeypatch) -> list[float]:
    """The gradients' global L2 norm that each optimiser step of the fits built after it
    applies (read in the optimiser's step pre-hook: after clipping and unscaling)."""
    seen: list[float] = []
    original = engine.build_optimizer

    def build(*args, **kwargs):
        optimizer = original(*args, **kwargs)

        def record(opt, _args, _kwargs) -> None:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(engine, "build_optimizer", build)
    return seen


def logged(run_dir, tag: str) -> list[float]:
    return [v for _, v in read_metrics(run_dir / "metrics.csv")[tag]]


def test_clip_grad_bounds_the_gradient_each_step_applies(tmp_path, grad_norms_at_steps):
    """optim.clip_grad: the optimiser steps with gradients of at most that norm, and
    train/grad_norm logs the norm before clipping (here far larger)."""
    overrides = {"train.max_steps": 3, "train.log_every": 1, "optim.clip_grad": 1e-3}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, SyntheticEEG(24), cpu(), tmp_path,
                     overrides)  # fmt: skip
    assert len(grad_norms_at_steps) == 3
    assert max(grad_norms_at_steps) == pytest.approx(1e-3, rel=1e-4)
    assert min(logged(tmp_path, "train/grad_norm")) > 1e-2


def test_fp16_grad_norm_is_of_the_unscaled_gradients(tmp_path, grad_norms_at_steps):
    """Under fp16 the gradients are unscaled before their norm is taken: train/grad_norm is
    the norm that the optimiser step applies (clipping off), not 2**16 times it, and
    optim.clip_grad bounds the unscaled gradients (it clipped the scaled ones: a step of
    gradients 2**16 times smaller than asked)."""
    # (the plain AdamW: the fused one unscales inside its step, after the pre-hook)
    overrides = {"train.max_steps": 3, "train.log_every": 1, "train.precision": "fp16",
                 "optim.clip_grad": 0.0, "optim.fused": "false"}  # fmt: skip
    data = SyntheticEEG(24)
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path / "a", overrides)
    norms = [v for v in logged(tmp_path / "a", "train/grad_norm") if math.isfinite(v)]
    applied = [v for v in grad_norms_at_steps if math.isfinite(v)]
    assert norms and norms == pytest.approx(applied, rel=1e-4)
    grad_norms_at_steps.clear()
    clipped = {**overrides, "optim.clip_grad": 1e-3}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path / "b", clipped)
    applied = [v for v in grad_norms_at_steps if math.isfinite(v)]
    assert applied and max(applied) == pytest.approx(1e-3, rel=1e-3)


def test_sampler_length_counts_the_micro_batches_left_after_a_resume():
    """len(sampler) is what it yields: a resumed epoch (start_batch) has that many fewer; with
    accumulation and ranks it counts micro-batches (one rank's share each)."""
    keys = ["a"] * 10 + ["b"] * 9
    for micro_batches, world_size in [(1, 1), (2, 2)]:
        sampler = EpochBatchSampler(keys, 4, micro_batches=micro_batches, world_size=world_size)
        for start in (0, 1, 3, 100):
            sampler.set_epoch(1, start_batch=start)
            assert len(sampler) == len(list(sampler)), (micro_batches, start)


def test_fp16_skipped_steps_count_only_in_a_row(tmp_path, monkeypatch):
    """MAX_SKIPPED_STEPS counts skipped steps in a row: a finite step in between starts the
    count again, so two bursts of 3 (6 in all, as a loss scale settling twice) train on with
    a limit of 4 (made small here, for a short run)."""
    from tests.train.test_engine_audit import InfiniteGradient

    n = 4
    monkeypatch.setattr(engine, "MAX_SKIPPED_STEPS", n)
    burst = n - 1
    bad = set(range(1, burst + 1)) | set(range(burst + 2, 2 * burst + 2))  # calls, 1-based
    calls = {"n": 0}

    def step(model, batch, ctx):
        calls["n"] += 1
        logits = model(batch["x"])
        if calls["n"] in bad:
            logits = InfiniteGradient.apply(logits)
        return StepOutput(logits.logsumexp(-1).mean())

    total = 2 * burst + 4
    overrides = {"train.max_steps": total, "train.precision": "fp16", "train.log_every": 5,
                 "train.checkpoint_every": 1000}  # fmt: skip
    result = fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(48), cpu(), tmp_path, overrides)
    assert result.step == total and len(bad) > n


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run_at_its_step(tmp_path):
    """Without fp16's scaler (which skips such steps) a step whose loss is finite but whose
    gradients are not stops the run at that step, naming the gradient norm, and nothing is
    saved: left to the optimiser, it wrote NaN weights, caught one step later as a NaN loss
    (the report naming the wrong step and cause)."""
    from tests.train.test_engine_audit import InfiniteGradient

    calls = {"n": 0}

    def step(model, batch, ctx):
        calls["n"] += 1
        logits = model(batch["x"])
        if calls["n"] == 3:
            logits = InfiniteGradient.apply(logits)
        return StepOutput(logits.logsumexp(-1).mean())

    overrides = {"train.max_steps": 12, "train.log_every": 1000, "train.checkpoint_every": 4}
    with pytest.raises(
        engine.NonFiniteLossError, match=r"gradient norm \(\w+\) at optimiser step 3, epoch 0"
    ):
        fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(48), cpu(), tmp_path, overrides)
    assert calls["n"] == 3
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


def test_a_resume_with_another_warmup_fraction_takes_its_warm_up(tmp_path, optimizers):
    """The saved warm-up length is kept only while optim.warmup_* are as saved: a resume
    with another optim.warmup_fraction warms up over that share of the new length (0.25 of
    40 steps: 10), not over the checkpoint's 2 steps."""
    from eegfast.train.optim import cosine_with_warmup

    data = SyntheticEEG(24, channels=(4,))
    overrides = {"train.max_steps": 4, "optim.warmup_fraction": 0.5, "optim.min_lr": 0.0}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    used = []

    def step(model, batch, ctx):
        used.append(max(g["lr"] for g in optimizers[-1].param_groups))
        return logsumexp_step(model, batch, ctx)

    changed = {**overrides, "train.max_steps": 40, "optim.warmup_fraction": 0.25}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning naming the changed settings
        fit_batches_of_4(TinyClassifier(), step, data, cpu(), tmp_path, changed, resume="auto")
    want = [
        cosine_with_warmup(s, total_steps=40, warmup_steps=10, base_lr=5e-4, min_lr=0.0)
        for s in (4, 5)
    ]
    assert used[:2] == pytest.approx(want, rel=1e-6)


def test_a_mid_epoch_resume_into_more_windows_goes_on_after_the_same_share(tmp_path):
    """Stopped after 3 of an epoch's 6 batches of 4 (24 windows), resumed with the same
    settings over 48 windows (12 batches an epoch): the epoch's batches are cut otherwise,
    which the checkpoint's epoch digest tells (its batch size and seed do not), so the epoch
    goes on after the same share, 6 of 12, with a warning naming the windows."""
    first = SyntheticEEG(24, channels=(4,))
    fit_batches_of_4(TinyClassifier(), logsumexp_step, first, cpu(), tmp_path,
                     {"train.max_steps": 3, "train.checkpoint_every": 3})  # fmt: skip
    seen: list[list[int]] = []

    def step(model, batch, ctx):
        seen.append(batch["index"].tolist())
        return logsumexp_step(model, batch, ctx)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(48, channels=(4,)),
                                  cpu(), tmp_path, {}, resume="auto")  # fmt: skip
    said = [str(w.message) for w in caught]
    assert len(seen) == 12 - 6 and result.step == 3 + 6
    assert any("cut otherwise now" in s and "24 -> 48 training windows" in s for s in said), said


def test_the_read_back_names_the_first_of_several_non_finite_steps(tmp_path, monkeypatch):
    """Under torchrun no early flag stops the run (the ranks agree at the read-back points),
    so several non-finite steps may be read back at once: the report names the first, where
    the run went wrong, and its non-finite loss (its gradient norm is NaN too)."""
    original = engine._NonFiniteWatch
    monkeypatch.setattr(engine, "_NonFiniteWatch", lambda **_: original(enabled=False))
    calls = {"n": 0}

    def step(model, batch, ctx):
        calls["n"] += 1
        loss = model(batch["x"]).logsumexp(-1).mean()
        return StepOutput(loss * math.nan if calls["n"] >= 3 else loss)

    overrides = {"train.max_steps": 12, "train.log_every": 5, "train.checkpoint_every": 1000}
    named = r"non-finite loss \(nan\) at optimiser step 3, epoch 0 \(seen at step 5\)"
    with pytest.raises(engine.NonFiniteLossError, match=named):
        fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(48), cpu(), tmp_path, overrides)


def test_the_best_of_checkpoints_with_equal_metrics_is_the_later(tmp_path):
    """Ties in the validation loss: the later checkpoint (more training for the same loss)
    is the best, which pruning keeps and a run folder's weights resolve to."""
    for step, metric in [(1, 0.5), (2, 0.2), (3, 0.2), (4, 0.9)]:
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"metric": metric})
        ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert ckpt.best_checkpoint(tmp_path).step == 3
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def _checkpoint_folder(folder, step: int, files=(ckpt.WEIGHTS, ckpt.STATE, ckpt.META)) -> None:
    """A step's checkpoint files (as save_checkpoint writes them) in ``folder``."""
    folder.mkdir(parents=True)
    written = folder.parent / "written"
    ckpt.save_checkpoint(written, step, {"w": torch.zeros(2)}, {"step": step}, {})
    for name in files:
        os.replace(written / f"step-{step:08d}" / name, folder / name)
    shutil.rmtree(written)


def test_a_step_set_aside_by_a_live_save_is_left_to_it(tmp_path):
    """``.old-step-<step>-<pid>``: a save of process pid replacing that step. While it runs,
    another process's save neither puts the folder back nor deletes it (only once its writer
    is gone)."""
    live = os.getppid()  # (a process that runs, not this one)
    aside = tmp_path / f".old-step-00000005-{live}"
    _checkpoint_folder(aside, 5)
    ckpt.save_checkpoint(tmp_path, 6, {"w": torch.zeros(2)}, {"step": 6}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name, "step-00000006"]


def test_an_incomplete_step_set_aside_is_not_listed(tmp_path):
    """An aside folder stands for its step only when complete: one without its state.pt (a
    hand-made copy, a damaged disk) is not what --resume auto may continue from."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {"step": 4}, {})
    # (after the save: the next save deletes it, as its writer is gone)
    _checkpoint_folder(tmp_path / f".old-step-00000005-{dead.pid}", 5, (ckpt.WEIGHTS, ckpt.META))
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [4]
    assert ckpt.latest_checkpoint(tmp_path).step == 4


def test_the_saved_rng_state_brings_back_python_numpy_and_torch_draws(tmp_path):
    """A resume restores every global generator a step function or augmentation may draw
    from (Python's random, NumPy's legacy one, torch's), through the checkpoint's state.pt
    (loaded with weights_only), so the resumed draws are the uninterrupted run's."""
    import random

    import numpy as np

    np.random.standard_normal()  # (a cached Gaussian in NumPy's state)
    saved = ckpt.rng_state()
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"rng": [saved]}, {})
    random.seed(1)  # (other draws in between)
    np.random.seed(1)
    torch.manual_seed(1)
    ckpt.set_rng_state(ckpt.load_training_state(tmp_path / "step-00000001")["rng"][0])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert got == want


def test_a_step_folder_without_its_weights_is_not_listed(tmp_path):
    """``step-*`` without model.safetensors (deleted by hand to save space, say) is not a
    checkpoint: --resume auto and the run folder's weights take the one before it."""
    ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {"step": 4}, {})
    _checkpoint_folder(tmp_path / "step-00000007", 7, (ckpt.STATE, ckpt.META))
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [4]
    assert ckpt.resolve_weights_path(tmp_path, prefer="latest").parent.name == "step-00000004"


def test_changed_data_names_only_folders_both_sides_hold_with_another_index():
    """A folder added or removed (data.roots changed: a warning of its own) or one whose
    index.json could not be read (digest "") is no "prepared again"."""
    saved = {"a": "1", "b": "2", "gone": "3", "unread": ""}
    now = {"a": "1", "b": "9", "new": "4", "unread": "5", "lost": ""}
    assert ckpt.changed_data({**saved, "lost": "6"}, now) == ["b"]
    assert ckpt.changed_data(None, now) == [] and ckpt.changed_data({}, now) == []


def test_an_epoch_resume_into_more_data_takes_another_warmup_fraction_of_its_length(
    tmp_path, optimizers
):
    """One epoch of 24 windows (6 steps), resumed for 2 epochs over 48 windows (12 steps an
    epoch) with optim.warmup_fraction 0.5 instead of 0.25: the run is 6 + 12 = 18 steps long,
    so the warm-up is 9 steps. It was taken before the resume counted the epochs left: 0.5 of
    2 epochs x 12 = 12 steps."""
    from eegfast.train.optim import cosine_with_warmup

    base = {"train.epochs": 1, "optim.warmup_fraction": 0.25, "optim.min_lr": 0.0}
    first = SyntheticEEG(24, channels=(4,))
    fit_batches_of_4(TinyClassifier(), logsumexp_step, first, cpu(), tmp_path, base)
    used = []

    def step(model, batch, ctx):
        used.append(max(g["lr"] for g in optimizers[-1].param_groups))
        return logsumexp_step(model, batch, ctx)

    more = SyntheticEEG(48, channels=(4,))
    changed = {**base, "train.epochs": 2, "optim.warmup_fraction": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings naming the changed settings and data
        result = fit_batches_of_4(
            TinyClassifier(), step, more, cpu(), tmp_path, changed, resume="auto"
        )
    assert result.step == 18
    want = [
        cosine_with_warmup(s, total_steps=18, warmup_steps=9, base_lr=5e-4, min_lr=0.0)
        for s in (6, 7)
    ]
    assert used[:2] == pytest.approx(want, rel=1e-6)
