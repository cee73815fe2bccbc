"""`eegfast upcycle`: one-line errors for bad arguments, nothing written by a refused run."""

from __future__ import annotations

import pytest
import torch

import eegfast.models
from eegfast import cli
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model

PRETRAINED_ON = {"subjects": ["s1"], "recordings": ["/data/s1.edf"]}


@pytest.fixture
def pretrained(tmp_path):
    """A (random) masked-pretraining checkpoint of labram_tiny."""
    arch = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}
    torch.manual_seed(0)
    weights = build_model(arch).state_dict()
    meta = {"arch": arch, "command": "pretrain", "pretrained_on": PRETRAINED_ON}
    ckpt.save_checkpoint(tmp_path / "pre" / "checkpoints", 10, weights, {"step": 10}, meta)
    return tmp_path / "pre"


def upcycle_cli(pretrained, out, *extra) -> int:
    return cli.main(["upcycle", "--model", str(pretrained), "--out", str(out), *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--experts", "4", "--top-k", "5"], "upcycle.top_k (5) must be <= upcycle.num_experts"),
        (["--experts", "0"], "upcycle.num_experts must be >= 1"),
        (["--top-k", "0"], "upcycle.top_k must be >= 1"),
        (["--set", "upcycle.layers=[2]"], "upcycle.layers: [2] out of range"),
        (["--set", "upcycle.layers=[0,-2]"], "lists a block twice"),
        (["--tasks", "mi,sleep,mi"], "--tasks names ['mi'] more than once"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_write_nothing(
    pretrained, tmp_path, capsys, extra, message
):
    assert upcycle_cli(pretrained, tmp_path / "moe", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "moe" / "checkpoints").exists()


def test_refuses_to_overwrite_naming_only_its_own_options(pretrained, tmp_path, capsys):
    out = tmp_path / "moe"
    assert upcycle_cli(pretrained, out, "--experts", "2") == 0
    capsys.readouterr()
    assert upcycle_cli(pretrained, out, "--experts", "3") == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--overwrite" in err
    assert "--resume" not in err, err  # upcycle has no --resume to offer
    assert upcycle_cli(pretrained, out, "--experts", "3", "--overwrite") == 0
    meta = ckpt.read_meta(out)
    assert meta["arch"]["upcycle"]["num_experts"] == 3
    assert meta["pretrained_on"] == PRETRAINED_ON  # for finetune's transductive note


@pytest.mark.parametrize("fault", ["offset", "nan"])
def test_an_upcycled_model_that_fails_the_probe_is_not_written(
    pretrained, tmp_path, capsys, monkeypatch, fault
):
    """The probe's check ran after the checkpoint was saved (a refused model was left for
    `eegfast finetune`), and a NaN difference passed it (nan > 1e-4 is False)."""
    real_upcycle = eegfast.models.upcycle

    def broken_upcycle(model, **kwargs):
        model = real_upcycle(model, **kwargs)
        # One output feature: the LayerNorms after the block would undo a shift of all.
        with torch.no_grad():
            feature = model.blocks[0].mlp.fc2_bias[:, 0]
            if fault == "offset":
                feature.add_(1.0)
            else:
                feature.fill_(float("nan"))
        return model

    monkeypatch.setattr(eegfast.models, "upcycle", broken_upcycle)
    out = tmp_path / "moe"
    assert upcycle_cli(pretrained, out) == 2
    assert "differs from the dense one" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "upcycle.json").exists()


def test_an_upcycled_old_pretraining_run_is_said_to_be_unrecorded(tmp_path):
    """A source pretrained before eegfast recorded ``pretrained_on``: the upcycled model's
    meta said ``pretrained_on: null`` under ``command: upcycle``, which finetune's report read
    as a backbone that saw no tested subject; it now keeps that the record is missing."""
    from eegfast.train.finetune import pretraining_unrecorded

    arch = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}
    weights = build_model(arch).state_dict()
    for name, meta in {
        "old": {"arch": arch, "command": "pretrain"},
        "recorded": {"arch": arch, "command": "pretrain", "pretrained_on": PRETRAINED_ON},
    }.items():
        ckpt.save_checkpoint(tmp_path / name / "checkpoints", 1, weights, {"step": 1}, meta)
        assert upcycle_cli(tmp_path / name, tmp_path / f"{name}-moe", "--experts", "2") == 0
        upcycled = ckpt.latest_checkpoint(tmp_path / f"{name}-moe" / "checkpoints").meta
        assert pretraining_unrecorded(upcycled) is (name == "old")
