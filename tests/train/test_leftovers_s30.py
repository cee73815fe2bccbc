"""Small leftovers of the training commands: a resume's weight check shares load_checkpoint's
key and shape comparison, and a pretraining checkpoint from before ``pretrained_on`` (or
pretrained further from one) is said to be one in the reports, not taken for a backbone that
never saw the tested subjects."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eegfast.cli import main as cli
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model
from eegfast.train.finetune import Backbone, plan_folds, pretraining_overlap
from tests.train.test_finetune import make_data
from tests.train.test_run_folder import prepared, pretrain_argv, tokenizer_run  # noqa: F401

PRETRAIN = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}


# --- the resume's weight check: load_checkpoint's comparison, on the file's header ----------


def test_the_shape_comparison_takes_a_weights_files_header_shapes():
    """``_compare_shapes`` (load_checkpoint's, the architecture records') compared tensors
    only; a resume compares the shapes in the weights file's header (no tensors read)."""
    from eegfast.models.checkpoint import _compare_shapes

    saved = {"a": (2, 3), "b": (4,), "same": (5,)}
    own = {"a": torch.zeros(2, 4), "c": torch.zeros(1), "same": torch.zeros(5)}
    report = _compare_shapes(saved, own)
    assert report.mismatched == [("a", (2, 4), (2, 3))]  # (key, model's, file's)
    assert report.unexpected == ["b"] and report.missing == ["c"] and report.loaded == ["same"]


class _Two(nn.Module):
    def __init__(self, width: int, extra: bool) -> None:
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, 2) if extra else nn.Identity()


def test_a_resume_names_the_keys_and_shapes_that_do_not_fit(tmp_path):
    """The resume's message, in its order: shape mismatches (file's shape, then the model's),
    keys the checkpoint lacks, keys the model lacks."""
    from eegfast.train.engine import _check_weights_fit

    saved = ckpt.save_checkpoint(tmp_path, 1, _Two(4, extra=True).state_dict(), {}, {"step": 1})
    _check_weights_fit(saved, _Two(4, extra=True), [])  # fits: no error
    with pytest.raises(ValueError) as error:
        _check_weights_fit(saved, _Two(5, extra=False), ["model.name: 'x' -> 'y'"])
    message = str(error.value)
    assert f"--resume {saved}: its weights do not fit" in message
    assert "a.bias: checkpoint [4], model [5]; a.weight: checkpoint [4, 3], model [5, 3]; " in (
        message
    )
    assert "b.bias not in the model; and 1 more" in message
    assert "settings changed since it was saved: model.name: 'x' -> 'y'" in message
    with pytest.raises(ValueError, match="a.bias missing from the checkpoint"):
        just_b = {k: v for k, v in _Two(4, extra=True).state_dict().items() if k.startswith("b")}
        _check_weights_fit(ckpt.save_checkpoint(tmp_path, 2, just_b, {}, {}), _Two(4, True), [])


# --- a pretraining checkpoint from before pretrained_on ------------------------------------


def _pretraining_checkpoint(folder, **meta):
    torch.manual_seed(0)
    weights = build_model(PRETRAIN).state_dict()
    ckpt.save_checkpoint(folder / "checkpoints", 2, weights, {"step": 2}, {"arch": PRETRAIN,
                         "command": "pretrain", **meta})  # fmt: skip
    return folder


def test_an_old_pretraining_backbone_is_said_to_be_unrecorded(tmp_path):
    """finetune --init a pretraining run saved before eegfast recorded what it saw:
    ``pretrained_on`` absent, read as "nothing seen", so the report said nothing, as for a
    backbone that never saw the tested subjects. Each task's note now says that this cannot be
    checked; a recorded run keeps its overlap note."""
    import dataclasses

    from eegfast.train.commands.finetune import backbone_for
    from eegfast.train.config import RunConfig

    seen = {"subjects": ["s1"], "recordings": []}
    old = _pretraining_checkpoint(tmp_path / "old")  # as before 2026-12-06: no key
    recorded = _pretraining_checkpoint(tmp_path / "new", pretrained_on=seen)

    def backbone(run) -> Backbone:
        config = RunConfig()
        return backbone_for(
            dataclasses.replace(config, model=dataclasses.replace(config.model, init=str(run)))
        )

    spec = [("A", s, f"/data/{s}.edf", lab) for s in ("s1", "s2") for lab in (0, 1, 0, 1)]
    data = make_data(spec)
    plans, _ = plan_folds(data, ["A"], k=2, group_by="subject", seed=0)
    notes = pretraining_overlap(data, ["A"], plans, backbone(old))
    assert "whether it saw the tested subjects cannot be checked" in notes["A"]
    notes = pretraining_overlap(data, ["A"], plans, backbone(recorded))
    assert "on 1 of the 2 tested subjects" in notes["A"]


def test_pretraining_further_from_an_old_run_records_that_it_is_not_known(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    """model.init a pretraining run without ``pretrained_on``: the new run recorded its own
    subjects only, which finetune read as all the backbone saw. It records null (not known),
    says so, and a resume of it keeps null."""
    from eegfast.train.finetune import pretraining_unrecorded

    first = tmp_path / "first"
    assert cli(pretrain_argv(prepared, tokenizer_run, first)) == 0
    meta_file = ckpt.latest_checkpoint(first / "checkpoints").path / ckpt.META
    meta = json.loads(meta_file.read_text())
    del meta["pretrained_on"]  # as an eegfast from before 2026-12-06 wrote it
    meta_file.write_text(json.dumps(meta))
    second = tmp_path / "second"
    argv = pretrain_argv(prepared, tokenizer_run, second, f"model.init={first}")
    capsys.readouterr()
    assert cli([*argv, "--set", "train.max_steps=1"]) == 0
    assert f"note: model.init {first} does not record which subjects" in capsys.readouterr().out
    meta = ckpt.latest_checkpoint(second / "checkpoints").meta
    assert meta["pretrained_on"] is None and pretraining_unrecorded(meta)
    # evaluate's linear probe of it: its report says so (as finetune's does)
    probe = tmp_path / "probe"
    argv_eval = ["evaluate", "--model", str(second), "--data", str(prepared), "--out", str(probe)]
    assert cli([*argv_eval, "--folds", "2", "--no-progress"]) == 0
    assert "cannot be checked" in (probe / "report.md").read_text()
    assert cli([*argv, "--set", "train.max_steps=2", "--resume", "auto"]) == 0
    meta = ckpt.latest_checkpoint(second / "checkpoints").meta
    assert meta["step"] == 2 and meta["pretrained_on"] is None
    # the old run itself resumed (no key): it saw this run's data, recorded as before
    argv = pretrain_argv(prepared, tokenizer_run, first, "train.max_steps=4")
    assert cli([*argv, "--resume", "auto"]) == 0
    assert ckpt.latest_checkpoint(first / "checkpoints").meta["pretrained_on"]["subjects"]
