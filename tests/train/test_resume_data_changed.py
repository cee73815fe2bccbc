"""Resuming after what the checkpoint's numbers do not show changed: the prepared folders'
content (prepared again with the same number of windows) and ``train.log_every`` (the
running-average window the checkpoint carries)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from eegfast.data import collate_padded
from eegfast.train import checkpoint as ckpt
from eegfast.train.config import RunConfig
from eegfast.train.data import load_data
from eegfast.train.engine import fit, seed_everything
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.runlog import read_metrics
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_data_scale_audit import LABELS, _folder
from tests.train.test_engine import fit_batches_of_4


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))


def _step(model, batch, ctx):
    return StepOutput((model.w * batch["x"].float().mean() + model.w**2).sum())


def _fit_folders(roots: list[Path], run_dir: Path, resume: str | None = None, **overrides):
    """``fit`` over prepared folders (batches of 2, one epoch, ``overrides``); returns the
    warnings' texts."""
    data = load_data(roots)
    config = RunConfig().with_overrides(
        {"train.batch_size": 2, "train.epochs": 1, "train.progress": False, **overrides}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(_Scale(), _step, data.dataset, config, run_dir, group_keys=data.group_keys,
            collate_fn=collate_padded, ctx=StepContext(torch.device("cpu")),
            resume=resume)  # fmt: skip
    return [str(w.message) for w in caught]


def _prepare_again(root: Path, **settings) -> None:
    """``root``'s index.json as a `prepare --overwrite` with other options leaves it: the same
    recordings and windows, other preprocessing."""
    index = json.loads((root / "index.json").read_text())
    index["settings"] = {"preprocess": settings}
    (root / "index.json").write_text(json.dumps(index))


def test_a_resume_after_a_folder_was_prepared_again_with_the_same_counts_warns(tmp_path):
    """A folder prepared again (other filters) with the same windows, resumed mid-epoch: the
    batches' digest, of item positions only, saw nothing, and the run went on training the
    old model on other signals without a word. The warning names the folder; the other one
    is not named."""
    a, b = _folder(tmp_path / "a", LABELS), _folder(tmp_path / "b", LABELS[:2])
    run_dir = tmp_path / "run"
    _fit_folders([a, b], run_dir, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    _prepare_again(b, notch=60.0)
    said = _fit_folders([a, b], run_dir, resume="auto")
    changed = [s for s in said if "the training data changed" in s]
    assert len(changed) == 1, said
    assert str(b) in changed[0] and str(a) not in changed[0]


def test_a_resume_on_the_same_folders_says_nothing_of_the_data(tmp_path):
    a = _folder(tmp_path / "a", LABELS)
    run_dir = tmp_path / "run"
    _fit_folders([a], run_dir)
    said = _fit_folders([a], run_dir, resume="auto")
    assert not any("data changed" in s for s in said), said


def test_a_checkpoint_without_the_data_record_resumes_as_before(tmp_path):
    a = _folder(tmp_path / "a", LABELS)
    run_dir = tmp_path / "run"
    _fit_folders([a], run_dir)
    path = ckpt.latest_checkpoint(run_dir / "checkpoints").path / ckpt.STATE
    state = torch.load(path, weights_only=True)
    assert state.pop("data_indexes") == {str(a): ckpt.data_identity(load_data([a]).dataset)[str(a)]}
    torch.save(state, path)  # as written before the record
    _prepare_again(a, notch=60.0)
    said = _fit_folders([a], run_dir, resume="auto")
    assert not any("data changed" in s for s in said), said


def test_the_data_identity_is_of_every_prepared_folder_under_the_dataset(tmp_path):
    """Subsets (a fold, the windows not held out) and several folders; other datasets have
    none; a folder's entry follows its index.json's bytes."""
    a, b = _folder(tmp_path / "a", LABELS), _folder(tmp_path / "b", LABELS[:2])
    data = load_data([a, b]).subset(range(3, 9))
    before = ckpt.data_identity(data.dataset)
    assert sorted(before) == [str(a), str(b)]
    _prepare_again(a, notch=60.0)
    after = ckpt.data_identity(data.dataset)
    assert after[str(a)] != before[str(a)] and after[str(b)] == before[str(b)]
    assert ckpt.data_identity(SyntheticEEG(8)) == {}


@pytest.mark.parametrize("saved_steps", [True, False])
def test_a_resume_with_another_log_every_logs_the_new_schedules_window(tmp_path, saved_steps):
    """Saved at step 7 by a run logging every 10 steps (its window: steps 1-7), resumed with
    train.log_every=4: the log point at step 8 averaged steps 1-8, a window of neither length.
    It averages steps 5-8 now, as a run logging every 4 steps from the start; a checkpoint
    written before the window's steps were recorded starts the window afresh (step 8 alone)."""
    data = SyntheticEEG(24, channels=(4,))
    plain = {"train.max_steps": 12, "train.checkpoint_every": 7}

    def run(run_dir, log_every, resume=None):
        seed_everything(0)
        return fit_batches_of_4(TinyClassifier(), _tiny_step, data,
                                StepContext(torch.device("cpu")), run_dir,
                                {**plain, "train.log_every": log_every}, resume=resume)  # fmt: skip

    full = run(tmp_path / "full", 1).losses  # each step's loss
    part = tmp_path / "part"
    run(part, 10)
    shutil.rmtree(part / "checkpoints" / "step-00000012")
    if not saved_steps:  # as written before the window's steps were recorded
        path = part / "checkpoints" / "step-00000007" / ckpt.STATE
        state = torch.load(path, weights_only=True)
        del state["log_window_steps"]
        torch.save(state, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(part, 4, resume="auto")
    # (when it logs changes nothing it computes: no "settings other than" warning for it)
    assert not [w for w in caught if "log_every" in str(w.message)], [
        str(w.message) for w in caught
    ]
    logged = dict(read_metrics(part / "metrics.csv")["train/loss"])
    assert sorted(logged) == [8, 12]
    first = full[4:8] if saved_steps else full[7:8]  # steps 5-8, or 8 alone
    assert logged[8] == pytest.approx(sum(first) / len(first), rel=1e-6)
    assert logged[12] == pytest.approx(sum(full[8:12]) / 4, rel=1e-6)


def _tiny_step(model, batch, ctx):
    return StepOutput(model(batch["x"]).logsumexp(-1).mean())
