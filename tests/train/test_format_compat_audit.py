"""Run folders and prepared folders written by an older eegfast, used by this one: a
pretraining checkpoint from before its tokenizer record (2026-12-06), and a folder whose
index.json is in the layout before 2026-12-07 (``indent=1``), prepared into again."""

from __future__ import annotations

import json
from pathlib import Path

import mne
import numpy as np
import pytest

from eegfast.cli import main as cli
from eegfast.data.prepare import prepare
from eegfast.train import checkpoint as ckpt
from tests.train.test_resume_data_changed import _fit_folders
from tests.train.test_run_folder import pretrain_argv, tokenizer_argv

NAMES = ["FP1", "CZ", "O1"]


def _fif(path: Path, seconds: float = 16.0, sfreq: float = 200.0) -> Path:
    rng = np.random.default_rng(len(path.name))
    data = 2e-5 * rng.standard_normal((len(NAMES), int(seconds * sfreq)))
    info = mne.create_info(NAMES, sfreq, "eeg")
    mne.io.RawArray(data, info, verbose="error").save(path, overwrite=True, verbose="error")
    return path


def _as_older_index(folder: Path) -> str:
    """Rewrites ``folder``'s index.json as eegfast wrote it before 2026-12-07; returns it."""
    index = folder / "index.json"
    older = json.dumps(json.loads(index.read_text()), indent=1) + "\n"
    index.write_text(older)
    return older


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("compat")
    return [str(_fif(root / f"rec{i}_raw.fif")) for i in (1, 2)]


def test_a_resume_after_prepare_reused_an_older_layout_folder_says_nothing_of_the_data(
    sources, tmp_path
):
    """Trained on a folder of an older eegfast, then `eegfast prepare` into it again (every
    recording reused, nothing changed): the index was rewritten in the new layout, another
    SHA-256 than the checkpoint's record, and the resume warned that the folder was prepared
    again (other preprocessing settings, recordings or labels)."""
    folder = tmp_path / "data"
    prepare(sources, folder, progress=False)
    older = _as_older_index(folder)
    run_dir = tmp_path / "run"
    _fit_folders([folder], run_dir, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    assert prepare(sources, folder, progress=False)["reused"] == 2
    assert (folder / "index.json").read_text() == older
    said = _fit_folders([folder], run_dir, resume="auto")
    assert not any("data changed" in s for s in said), said


def test_a_pretraining_checkpoint_without_a_tokenizer_record_resumes(sources, tmp_path, capsys):
    """A pretraining checkpoint from before the tokenizer record (meta.json's ``tokenizer``,
    2026-12-06) resumed with ``--resume auto`` and no ``--tokenizer``: 'pretraining needs a
    tokenizer' (exit 2), where the README says a resume continues against the run's own
    tokenizer. It takes the tokenizer the run's config named, and warns that which of its
    checkpoints the run started with is not recorded."""
    folder = tmp_path / "data"
    prepare(sources, folder, progress=False)
    tokenizer, run = tmp_path / "tok", tmp_path / "pre"
    assert cli(tokenizer_argv(folder, tokenizer)) == 0
    assert cli(pretrain_argv(folder, tokenizer, run)) == 0
    meta_path = ckpt.latest_checkpoint(run / "checkpoints").path / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("tokenizer", "trained_on", "pretrained_on"):  # newer than the checkpoint
        del meta[key]
    meta_path.write_text(json.dumps(meta, indent=1))
    argv = pretrain_argv(folder, tokenizer, run, "train.max_steps=4", "--resume", "auto")
    at = argv.index("--tokenizer")
    capsys.readouterr()
    assert cli(argv[:at] + argv[at + 2 :]) == 0
    printed = capsys.readouterr().out
    assert f"using {tokenizer}, this run's own tokenizer" in printed
    assert "does not record which tokenizer checkpoint it was pretrained with" in printed
    assert "resumed from" in printed
    resumed = ckpt.latest_checkpoint(run / "checkpoints").meta
    assert resumed["step"] == 4 and resumed["tokenizer"]["checkpoint"].endswith("step-00000002")


def test_evaluating_a_fold_model_without_its_training_recordings_says_they_are_scored(
    tmp_path, capsys
):
    """evaluate leaves out the windows of the recordings a fold model was fine-tuned on, which
    its checkpoint records (``train_recordings``, 2026-12-06). A fold model of an older eegfast
    has no record: every window was scored, its training windows too, and the report said
    nothing. It says so now."""
    files = [_fif(tmp_path / f"sub{s}_{kind}_raw.fif") for s in (1, 2) for kind in ("rest", "task")]
    data = tmp_path / "data"
    argv = ["prepare", *map(str, files), "--out", str(data), "--window", "4", "--no-progress"]
    argv += ["--filename-rule", "_rest_=rest", "--filename-rule", "_task_=task"]
    assert cli([*argv, "--subject-regex", r"(sub\d)"]) == 0
    finetuned = tmp_path / "ft"
    argv = ["finetune", "--data", str(data), "--out", str(finetuned), "--folds", "2"]
    for item in ("model.name=labram_tiny", "train.max_steps=1", "train.batch_size=4"):
        argv += ["--set", item]
    assert cli([*argv, "--set", "finetune.band_power_baseline=false", "--no-progress"]) == 0
    (fold,) = (finetuned / "fold0").iterdir()
    meta_path = ckpt.latest_checkpoint(fold / "checkpoints").path / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["train_recordings"], meta["train_subjects"]  # as before 2026-12-06
    meta_path.write_text(json.dumps(meta, indent=1))
    capsys.readouterr()
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(fold), "--data", str(data), "--out", str(out)]
    assert cli([*argv, "--no-progress"]) == 0
    said = "does not record the recordings it was fine-tuned on: every labelled window is scored"
    assert said in capsys.readouterr().out
    assert said in (out / "report.md").read_text()
