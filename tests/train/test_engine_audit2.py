"""The run folder across interruptions: metrics.csv's header and rows, TensorBoard events on
disk at each checkpoint, the log window across a resume, refused resumes, and pruning killed
half way."""

from __future__ import annotations

import csv
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.runlog import read_metrics
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4


def logsumexp_step(model, batch, ctx):
    out = model(batch["x"])
    return StepOutput(out.logsumexp(-1).mean(), {"mean_logit": out.mean().detach()})


def cpu() -> StepContext:
    return StepContext(torch.device("cpu"))


class Killed(Exception):
    """Stands for the kill of the process at that point (what it wrote so far stays)."""


def test_metrics_csv_has_its_header_before_the_first_log_point(tmp_path):
    """A run killed (SIGTERM, SIGKILL: no close) before its first log point left an empty
    metrics.csv; the rows of the run that continued it came without the header, and reading
    them (fine-tuning's loss curves) failed. The header is on disk at once, and an empty file
    found on a resume gets it."""
    on_disk = []

    def step(model, batch, ctx):
        on_disk.append((tmp_path / "metrics.csv").read_text())  # what a kill here leaves
        return logsumexp_step(model, batch, ctx)

    overrides = {"train.max_steps": 2, "train.log_every": 10}
    fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(24), cpu(), tmp_path, overrides)
    assert on_disk[0].splitlines() == ["step,tag,value"]

    (tmp_path / "metrics.csv").write_text("")  # as the kill left it (an older version's run)
    shutil.rmtree(tmp_path / "checkpoints")
    fit_batches_of_4(TinyClassifier(), logsumexp_step, SyntheticEEG(24), cpu(), tmp_path,
                     overrides, resume="auto")  # fmt: skip
    assert [s for s, _ in read_metrics(tmp_path / "metrics.csv")["train/loss"]] == [2]


def test_resume_auto_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    """--resume auto of a run stopped before its first checkpoint starts over at step 0: the
    steps the stopped run logged are logged again, once in metrics.csv and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 5, "train.checkpoint_every": 5, "train.log_every": 1}
    calls = []

    def dies_in_step_4(model, batch, ctx):
        calls.append(ctx.step)
        if ctx.step == 3:
            raise Killed
        return logsumexp_step(model, batch, ctx)

    with pytest.raises(Killed):
        fit_batches_of_4(TinyClassifier(), dies_in_step_4, data, cpu(), tmp_path, overrides)
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in read_metrics(tmp_path / "metrics.csv")["train/loss"]] == [1, 2, 3]
    time.sleep(1.1)  # TensorBoard orders event files by their names' whole seconds
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides,
                     resume="auto")  # fmt: skip
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = [(int(r["step"]), r["tag"]) for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows))
    assert sorted(s for s, tag in rows if tag == "train/loss") == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_tensorboard_events_up_to_a_checkpoint_are_on_disk_when_it_is_written(
    tmp_path, monkeypatch
):
    """TensorBoard's writer thread puts events on disk some time after they are logged: a run
    killed right after a checkpoint lost the last steps' events for good (the resume purges
    only the steps after the checkpoint's). They are flushed before each checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import record_writer

    write = record_writer.RecordWriter.write

    def slow_write(self, data):  # a busy disk: the thread is behind
        time.sleep(0.2)
        return write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", slow_write)
    save, on_disk = ckpt.save_checkpoint, {}

    def saving(checkpoint_dir, step, *args, **kwargs):
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        tags = events.Tags()["scalars"]
        on_disk[step] = [e.step for e in events.Scalars("train/loss")] if tags else []
        return save(checkpoint_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", saving)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2, "train.log_every": 1}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, SyntheticEEG(24), cpu(), tmp_path,
                     overrides)  # fmt: skip
    assert on_disk == {2: [1, 2]}


def test_a_resume_between_log_points_logs_the_uninterrupted_runs_values(tmp_path):
    """Logged scalars are means over the steps since the last log point (every 3 steps here);
    a run resumed from step 4 logged at step 6 the mean of steps 5-6 only, step 4's values
    were in no logged row. The checkpoint keeps them: the logs match the uninterrupted run."""
    from eegfast.train.engine import seed_everything

    overrides = {"train.epochs": 2, "train.log_every": 3, "train.checkpoint_every": 4,
                 "train.keep_last": 100}  # fmt: skip
    data = SyntheticEEG(24)

    def run(run_dir, resume=None):
        seed_everything(0)
        return fit_batches_of_4(
            TinyClassifier(), logsumexp_step, data, cpu(), run_dir, overrides, resume=resume
        )

    run(tmp_path / "full")
    run(tmp_path / "partial")
    for info in ckpt.list_checkpoints(tmp_path / "partial" / "checkpoints"):
        if info.step > 4:  # as if the run had been killed after step 4
            shutil.rmtree(info.path)
    run(tmp_path / "partial", resume="auto")
    full = read_metrics(tmp_path / "full" / "metrics.csv")
    resumed = read_metrics(tmp_path / "partial" / "metrics.csv")
    for tag in ("train/loss", "train/grad_norm", "train/mean_logit", "train/lr"):
        assert [s for s, _ in full[tag]] == [3, 6, 9, 12]
        assert resumed[tag] == full[tag], tag


def test_resume_into_a_model_of_other_settings_is_a_clear_error(tmp_path):
    """A resume whose model does not fit the checkpoint's weights (here: another width, as
    another model.name builds) got torch's size-mismatch RuntimeError; now a ValueError naming
    the checkpoint, the first mismatches and the settings that changed."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2, "model.name": "labram_tiny"}
    fit_batches_of_4(TinyClassifier(dim=16), logsumexp_step, data, cpu(), tmp_path, overrides)
    changed = {**overrides, "train.max_steps": 4, "model.name": "labram_base"}
    with pytest.raises(ValueError) as error:
        fit_batches_of_4(TinyClassifier(dim=32), logsumexp_step, data, cpu(), tmp_path, changed,
                         resume="auto")  # fmt: skip
    message = str(error.value)
    assert "step-00000002" in message and "do not fit" in message
    assert "blocks.0.mlp.0.weight: checkpoint [32, 16], model [64, 32]" in message
    assert "model.name: 'labram_tiny' -> 'labram_base'" in message


def test_a_refused_resume_leaves_the_run_folders_config_yaml_alone(tmp_path):
    """config.yaml describes the run in the folder (and repeats it with --config): a resume
    refused for its settings used to overwrite it with them first."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    before = (tmp_path / "config.yaml").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="optim.layer_decay"):
            changed = {"train.max_steps": 4, "optim.layer_decay": 0.5}
            fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, changed,
                             resume="auto")  # fmt: skip
    assert (tmp_path / "config.yaml").read_text() == before


def test_pruning_killed_half_way_leaves_nothing_behind_after_the_next_save(tmp_path, monkeypatch):
    """Retention deleted a checkpoint folder in place: killed half way (its meta.json gone,
    its weights not yet), the folder was no checkpoint any more, so nothing listed or deleted
    it again, and it held its weights' disk space for good."""
    folder = tmp_path / "checkpoints"
    weights = {"w": torch.ones(4)}
    for step in (1, 2):
        ckpt.save_checkpoint(folder, step, weights, {"step": step}, {})
    rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        (Path(path) / ckpt.META).unlink()
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(Killed):
        ckpt.prune_checkpoints(folder, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    ckpt.save_checkpoint(folder, 3, weights, {"step": 3}, {})  # the run goes on
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002", "step-00000003"]


def test_groups_smaller_than_a_batch_are_said_to_be_never_trained_on(tmp_path):
    """A batch holds one (electrode set, task) group and partial batches are dropped, so a
    group of fewer items than train.batch_size never reached a step, without a word."""
    data = SyntheticEEG(24, channels=(4, 4, 4, 4, 4, 3))  # 20 items of 4 channels, 4 of 3
    overrides = {"train.max_steps": 1, "train.batch_size": 6}
    with pytest.warns(UserWarning, match=r"4 of 24 items, in 1 group\(s\) .* never trained on"):
        fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every group fills a batch of 4: nothing to say
        fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path / "b",
                         {"train.max_steps": 1})  # fmt: skip
