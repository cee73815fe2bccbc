"""The training loop's schedule of checkpoints and its throughput metric: train.checkpoint_every
honoured across epochs, and train/samples_per_s measured over training time only."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train import engine
from eegfast.train.config import RunConfig
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.runlog import read_metrics
from tests.train.fakes import SyntheticEEG, TinyClassifier, collate


def logsumexp_step(model, batch, ctx):
    return StepOutput(model(batch["x"]).logsumexp(-1).mean())


def fit_with_eval(run_dir, overrides, step_fn=logsumexp_step, eval_fn=None):
    """``fit`` of a TinyClassifier over 24 synthetic windows in batches of 4 (two electrode
    sets of 12: 6 steps an epoch), no progress bar."""
    data = SyntheticEEG(24)
    config = RunConfig().with_overrides(
        {"train.batch_size": 4, "train.progress": False, **overrides}
    )
    return engine.fit(
        TinyClassifier(),
        step_fn,
        data,
        config,
        run_dir,
        group_keys=data.group_keys(),
        collate_fn=collate,
        ctx=StepContext(torch.device("cpu")),
        eval_fn=eval_fn,
    )


def test_checkpoint_every_is_not_overridden_by_the_ends_of_epochs(tmp_path):
    """train.checkpoint_every = N saves (and validates) every N optimiser steps and at the last;
    0 is the setting for once per epoch. Every epoch's end was saved and validated as well:
    with epochs of 6 steps, checkpoint_every=4 wrote (and evaluated) steps 6 and 18 too, and
    short epochs under a large checkpoint_every validated and wrote a checkpoint each epoch."""
    evaluated = []

    def eval_fn(model):
        evaluated.append(len(evaluated))
        return {"val/loss": 1.0}

    overrides = {"train.epochs": 3, "train.checkpoint_every": 4, "train.keep_last": 100}
    result = fit_with_eval(tmp_path / "every4", overrides, eval_fn=eval_fn)
    steps = [c.step for c in ckpt.list_checkpoints(tmp_path / "every4" / "checkpoints")]
    assert result.step == 18
    assert steps == [4, 8, 12, 16, 18]
    assert len(evaluated) == len(steps)
    # a checkpoint at an epoch's end (step 12) continues with the next epoch
    state = ckpt.load_training_state(tmp_path / "every4" / "checkpoints" / "step-00000012")
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 0)

    # 0: once per epoch
    fit_with_eval(tmp_path / "epochs", {**overrides, "train.checkpoint_every": 0})
    steps = [c.step for c in ckpt.list_checkpoints(tmp_path / "epochs" / "checkpoints")]
    assert steps == [6, 12, 18]


def test_samples_per_s_leaves_out_validation_and_checkpoint_writing(tmp_path, monkeypatch):
    """train/samples_per_s is the training throughput: the time of validation (eval_fn) and of
    writing checkpoints was counted as training time, so each checkpoint's validation pulled
    the logged rate down for the rest of the run. A fake clock: each step takes 1 s (4 windows),
    each checkpoint's validation 1000 s."""
    clock = {"now": 0.0}
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def step_fn(model, batch, ctx):
        clock["now"] += 1.0
        return logsumexp_step(model, batch, ctx)

    def eval_fn(model):
        clock["now"] += 1000.0
        return {"val/loss": 1.0}

    overrides = {"train.max_steps": 5, "train.checkpoint_every": 2, "train.log_every": 1}
    fit_with_eval(tmp_path, overrides, step_fn=step_fn, eval_fn=eval_fn)
    rates = read_metrics(tmp_path / "metrics.csv")["train/samples_per_s"]
    assert [s for s, _ in rates] == [1, 2, 3, 4, 5]
    for step, rate in rates:
        assert rate == 4.0, (step, rate)
