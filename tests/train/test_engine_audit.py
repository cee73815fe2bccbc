"""The training loop on resume with other settings, its logs on resume, the logged lr, and the
best checkpoint's choice."""

from __future__ import annotations

import csv
import math
import shutil
import warnings

import pytest
import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train import engine
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.optim import cosine_with_warmup
from eegfast.train.runlog import read_metrics
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4


def logsumexp_step(model, batch, ctx):
    return StepOutput(model(batch["x"]).logsumexp(-1).mean())


def cpu() -> StepContext:
    return StepContext(torch.device("cpu"))


@pytest.fixture
def optimizers(monkeypatch):
    """The optimisers fit builds, newest last."""
    built = []
    original = engine.build_optimizer

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(engine, "build_optimizer", build)
    return built


def test_resume_with_a_lower_lr_and_no_weight_decay_trains_with_them(tmp_path, optimizers):
    """The non-finite-loss advice: a lower optim.lr, then --resume auto. The resumed steps use
    the new lr's schedule and the new weight decay, not the checkpoint's."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 4, "train.checkpoint_every": 2, "optim.warmup_fraction": 0.0,
                 "optim.min_lr": 0.0}  # fmt: skip
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")  # as if it had died after step 2
    used = {}

    def step(model, batch, ctx):
        groups = optimizers[-1].param_groups
        used[ctx.step] = [(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in groups]
        return logsumexp_step(model, batch, ctx)

    changed = {**overrides, "optim.lr": 1e-5, "optim.weight_decay": 0.0, "optim.betas": (0.8, 0.9)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning naming the changed settings
        fit_batches_of_4(TinyClassifier(), step, data, cpu(), tmp_path, changed, resume="auto")
    for s in (2, 3):
        lr = cosine_with_warmup(s, total_steps=4, warmup_steps=0, base_lr=1e-5, min_lr=0.0)
        assert used[s] == [(pytest.approx(lr), 0.0, (0.8, 0.9))] * len(used[s]), s


def test_resume_with_other_grad_accum_continues_after_the_same_global_batches(tmp_path):
    """The position in the epoch counts micro-batches: a run checkpointed after 2 steps without
    accumulation and resumed with train.grad_accum=2 goes on with the 3rd global batch."""
    data = SyntheticEEG(24)  # 6 global batches of 4 an epoch

    def recording(seen):
        def step(model, batch, ctx):
            seen.append(sorted(batch["index"].tolist()))
            return logsumexp_step(model, batch, ctx)

        return step

    full, resumed = [], []
    overrides = {"train.max_steps": 6, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), recording(full), data, cpu(), tmp_path / "full", overrides)
    run = tmp_path / "resumed"
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), run,
                     {**overrides, "train.max_steps": 2})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_batches_of_4(TinyClassifier(), recording(resumed), data, cpu(), run,
                         {**overrides, "train.grad_accum": 2}, resume="auto")  # fmt: skip
    joined = [sorted(a + b) for a, b in zip(resumed[::2], resumed[1::2], strict=True)]
    assert joined == full[2:]


def test_resume_keeps_each_logged_step_once_in_metrics_csv_and_tensorboard(tmp_path):
    """A run that logged steps 5 and 6 after its last checkpoint (step 4) and is resumed from it
    logs them again: metrics.csv and TensorBoard hold each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 6, "train.checkpoint_every": 4, "train.log_every": 1}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")  # killed before that checkpoint
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides,
                     resume="auto")  # fmt: skip
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = [(int(r["step"]), r["tag"]) for r in csv.DictReader(f)]
    assert sorted(s for s, tag in rows if tag == "train/loss") == [1, 2, 3, 4, 5, 6]
    assert len(rows) == len(set(rows))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_logged_lr_is_the_lr_each_step_used_under_layer_decay(tmp_path, optimizers):
    """train/lr is the schedule's lr of the logged step (the head's, layer scale 1), not the
    patch embedding's layer-decayed one, nor the next step's."""
    used = []

    def step(model, batch, ctx):
        used.append(max(g["lr"] for g in optimizers[-1].param_groups))
        return logsumexp_step(model, batch, ctx)

    overrides = {"train.max_steps": 4, "train.log_every": 1, "optim.layer_decay": 0.5,
                 "optim.warmup_steps": 2}  # fmt: skip
    fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(24), cpu(), tmp_path, overrides)
    logged = [v for _, v in read_metrics(tmp_path / "metrics.csv")["train/lr"]]
    assert logged == pytest.approx(used, rel=1e-6)
    assert max(logged) == pytest.approx(5e-4)  # optim.lr, reached at the warm-up's end


def test_resume_with_other_layer_decay_says_so(tmp_path):
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"step-00000002.*optim.layer_decay"):
            changed = {"train.max_steps": 4, "optim.layer_decay": 0.5}
            fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, changed,
                             resume="auto")  # fmt: skip


def test_resume_of_an_fp32_checkpoint_with_fp16_starts_a_fresh_loss_scale(tmp_path):
    """The checkpoint's scaler state is empty without fp16; an fp16 resume scales afresh."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path,
                                  {**overrides, "train.max_steps": 4, "train.precision": "fp16"},
                                  resume="auto")  # fmt: skip
    assert result.step == 4 and all(map(math.isfinite, result.losses))
    assert ckpt.load_training_state(tmp_path / "checkpoints" / "step-00000004")["scaler"]


def test_a_non_finite_metric_never_makes_the_best_checkpoint(tmp_path):
    """A failed evaluation (NaN) at the newest checkpoint: the best stays the lowest finite
    metric, and pruning keeps it."""
    for step, metric in [(1, 0.5), (2, 0.1), (3, 0.9), (4, math.nan)]:
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"metric": metric})
        ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert ckpt.best_checkpoint(tmp_path).step == 2
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4]
