"""What the README tells a user to run, checked on the bundled EEG: evaluate's linear probe and
its --out, the fine-tuning folder as --model, upcycle's --help, finetune's config.yaml and
pretraining resumed without --tokenizer."""

from __future__ import annotations

import shutil

import pytest
import yaml

from eegfast.cli import main as cli
from tests.train.test_run_folder import (  # noqa: F401
    finetune_argv,
    prepared,
    pretrain_argv,
    pretrain_run,
    steps,
    tokenizer_run,
)


@pytest.fixture(scope="module")
def finetuned(prepared, pretrain_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("readme-ft") / "ft"
    assert cli(finetune_argv(prepared, pretrain_run, out, "--folds", "2")) == 0
    return out


def _evaluate(model, prepared, out):  # noqa: F811
    argv = ["evaluate", "--model", str(model), "--data", str(prepared), "--out", str(out)]
    return cli([*argv, "--folds", "2", "--no-progress"])


def test_evaluate_linear_probe_notes_what_its_backbone_was_pretrained_on(
    prepared,  # noqa: F811
    pretrain_run,  # noqa: F811
    tmp_path,
):
    # finetune's report says so for the same backbone; the probe's must not keep it quiet
    assert _evaluate(pretrain_run, prepared, tmp_path / "probe") == 0
    report = (tmp_path / "probe" / "report.md").read_text()
    assert "linear probe on frozen features" in report
    assert "pretrained (self-supervised, without labels) on 2 of the 2 tested recordings" in report


def test_a_probe_into_an_earlier_evaluation_leaves_no_stale_predictions_csv(
    prepared,  # noqa: F811
    pretrain_run,  # noqa: F811
    finetuned,
    tmp_path,
):
    out = tmp_path / "eval"
    assert _evaluate(finetuned / "fold0" / "single-arith", prepared, out) == 0
    assert (out / "predictions.csv").is_file()
    # the same --out for a linear probe: the fine-tuned model's rows are not the probe's
    assert _evaluate(pretrain_run, prepared, out) == 0
    assert "linear probe" in (out / "report.md").read_text()
    assert not (out / "predictions.csv").exists()


def test_evaluate_a_fine_tuning_folder_names_its_fold_models(
    prepared,  # noqa: F811
    finetuned,
    tmp_path,
    capsys,
):
    assert _evaluate(finetuned, prepared, tmp_path / "eval") == 2
    err = capsys.readouterr().err
    assert "a fine-tuning folder, with one model per fold and variant" in err
    assert str(finetuned / "fold0" / "single-arith") in err


def test_upcycle_help_lists_the_valid_config_keys(capsys):
    # README: unknown keys list the valid ones, and `eegfast <command> --help` lists them
    with pytest.raises(SystemExit):
        cli(["upcycle", "--help"])
    printed = capsys.readouterr().out
    assert "Valid keys:" in printed
    assert "upcycle.num_experts" in printed and "upcycle.noise_std" in printed


def test_finetune_config_yaml_names_the_model_it_fine_tuned(finetuned):
    # --init a labram_tiny run: config.yaml ("every value it used") must not say labram_base
    for config in (finetuned / "config.yaml", finetuned / "fold0" / "single-arith" / "config.yaml"):
        assert yaml.safe_load(config.read_text())["model"]["name"] == "labram_tiny"


def test_pretrain_resume_auto_without_tokenizer_takes_the_runs_own(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    pretrain_run,  # noqa: F811
    tmp_path,
    capsys,
):
    run = tmp_path / "pre"
    shutil.copytree(pretrain_run, run)
    argv = pretrain_argv(prepared, tokenizer_run, run, "train.max_steps=3", "--resume", "auto")
    at = argv.index("--tokenizer")
    del argv[at : at + 2]  # as tokenizer and --model: the run knows its own
    assert cli(argv) == 0, capsys.readouterr().err
    assert "this run's own tokenizer" in capsys.readouterr().out
    assert steps(run)[-1] == 3
