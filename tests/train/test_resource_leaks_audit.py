"""What long training runs hold on to or repeat: warnings shown once, not once a step."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.train.test_long_run_audit import fit_tiny, logits_step

EVERY_STEP = "the same warning at every step"


def _warning_step(model, batch, ctx):
    warnings.warn(EVERY_STEP, UserWarning, stacklevel=1)  # (always from this line)
    return logits_step(model, batch, ctx)


def test_a_warning_raised_at_every_step_is_shown_once_not_at_every_step(tmp_path):
    """Python shows a warning once per place (its "default" action), remembering the ones
    shown in a registry that any change of the warning filters clears. fit entered
    ``warnings.catch_warnings`` at every step (for torch's scheduler-order warning, which
    torch raises at a scheduler's first step only), so a warning of the model, the data or a
    step function raised at every step was printed at every step: a line of log per step
    over a whole run (20 of them in 20 steps here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        fit_tiny(tmp_path, _warning_step, **{"train.max_steps": 20, "train.progress": False})
    shown = [w for w in caught if str(w.message) == EVERY_STEP]
    # (the first step's scheduler step still sets a filter: the warning may show again once)
    assert 1 <= len(shown) <= 2


class _InfiniteGradient(torch.autograd.Function):
    """The identity, with infinite gradients: an fp16 step the GradScaler skips."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_the_scheduler_order_warning_of_a_skipped_first_step_stays_hidden(tmp_path):
    """fp16: the GradScaler skips a first step with non-finite gradients, so the scheduler
    steps before the optimiser ever did, and torch warns about that order: the schedule
    follows steps taken on purpose, the warning stays hidden (once per step no more)."""
    calls = []

    def skipped_first(model, batch, ctx):
        out = logits_step(model, batch, ctx)
        calls.append(1)
        if len(calls) == 1:
            out = type(out)(_InfiniteGradient.apply(out.loss), out.metrics)
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_tiny(
            tmp_path,
            skipped_first,
            # (not fused: torch's fused AdamW takes the skip itself, "stepping" the optimiser)
            **{"train.max_steps": 3, "train.progress": False, "train.precision": "fp16"},
            **{"optim.fused": "false"},
        )
    assert result.step == 3
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_a_plot_whose_file_cannot_be_written_is_closed(tmp_path, monkeypatch):
    """pyplot keeps every figure until it is closed: a plot whose PNG could not be written (a
    full disk) stayed open for the rest of the process, one figure per failed report."""
    from eegfast.train import plots

    plt = plots._pyplot()
    before = set(plt.get_fignums())

    def disk_full(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("eegfast.fileio.write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        plots.loss_curves({"train": [(1, 1.0), (2, 0.5)]}, tmp_path / "loss.png", "losses")
    assert set(plt.get_fignums()) == before
