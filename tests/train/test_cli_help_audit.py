"""The command line's help against what the commands do: defaults, --resume, precedence of
the options over --set, exit statuses, and options checked before any work."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from eegfast import cli
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model
from eegfast.train.commands.common import SIGTERM_STATUS
from eegfast.train.config import RunConfig, UpcycleConfig


def _parser(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(cli.COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"eegfast {command}")
    module.configure_parser(parser)
    return parser


def _action(command: str, option: str) -> argparse.Action:
    return next(a for a in _parser(command)._actions if option in a.option_strings)


def _shown(value: object) -> str:
    """A default as a help text writes it: 50.0 as 50, a path under the checkout by name."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path) and value.is_absolute():
        return value.name
    return str(value)


# Defaults computed from the machine, written in words in their help.
COMPUTED = {("prepare", "--workers")}


def _options_with_defaults() -> list[tuple[str, str, object]]:
    found = []
    for command in cli.COMMANDS:
        for action in _parser(command)._actions:
            default = action.default
            unset = default is None or default is False or default == []  # (0 is a default)
            if not action.option_strings or unset or default == argparse.SUPPRESS:
                continue
            option = action.option_strings[-1]
            if (command, option) not in COMPUTED:
                found.append((command, option, default))
    return found


@pytest.mark.parametrize(("command", "option", "default"), _options_with_defaults())
def test_every_option_with_a_default_says_it_in_its_help(command, option, default):
    """`eegfast predict --help` gave --batch-size no default (64), `prepare --help` none of
    its LaBraM preprocessing defaults (4-s windows, 0.1-75 Hz, 50 Hz notch), bench and
    quickstart none for --out, --folds or --experts."""
    text = _action(command, option).help or ""
    assert "default" in text and _shown(default) in text, (command, option, text)


from eegfast.train.commands import finetune as _finetune  # noqa: E402
from eegfast.train.commands import pretrain as _pretrain  # noqa: E402

# Options left at None so that the config's value applies: their help names that value.
CONFIG_DEFAULTS = [
    *[(c, "--seed", RunConfig().train.seed) for c in ("tokenizer", "pretrain", "finetune")],
    *[(c, "--device", RunConfig().train.device) for c in ("evaluate", "predict")],
    ("pretrain", "--objective", _pretrain.DEFAULTS.pretrain.objective),
    ("finetune", "--folds", _finetune.DEFAULTS.finetune.folds),
    ("evaluate", "--folds", RunConfig().finetune.folds),
    ("upcycle", "--experts", UpcycleConfig().num_experts),
    ("upcycle", "--top-k", UpcycleConfig().top_k),
]


@pytest.mark.parametrize(("command", "option", "default"), CONFIG_DEFAULTS)
def test_options_that_set_a_config_key_name_its_default(command, option, default):
    text = _action(command, option).help or ""
    assert f"default {default}" in text, (command, option, text)


def test_finetune_resume_help_offers_only_what_finetune_takes(tmp_path, capsys):
    """`eegfast finetune --help` offered `--resume auto|CHECKPOINT|RUN` (a checkpoint or run
    folder), which finetune refuses: its folds and variants resume their own folders."""
    action = _action("finetune", "--resume")
    assert action.metavar == "auto" and "CHECKPOINT" not in action.help
    run = tmp_path / "run"
    argv = ["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "ft")]
    assert cli.main([*argv, "--resume", str(run)]) == 2
    assert "use --resume auto" in capsys.readouterr().err
    # the commands that do take a folder still say so; every training command has --overwrite
    assert "CHECKPOINT" in _action("pretrain", "--resume").metavar
    for command in ("tokenizer", "pretrain", "finetune"):
        assert _action(command, "--overwrite").option_strings == ["--overwrite"]


@pytest.fixture
def pretrained(tmp_path):
    arch = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}
    torch.manual_seed(0)
    weights = build_model(arch).state_dict()
    meta = {"arch": arch, "command": "pretrain"}
    ckpt.save_checkpoint(tmp_path / "pre" / "checkpoints", 10, weights, {"step": 10}, meta)
    return tmp_path / "pre"


def test_upcycle_set_wins_over_its_options_as_in_every_command(pretrained, tmp_path):
    """upcycle applied --experts and --top-k after --set (`--experts 2 --set
    upcycle.num_experts=3` built 2 experts), where every other command's --set wins over its
    options, as the epilog says (later wins)."""
    out = tmp_path / "moe"
    argv = ["upcycle", "--model", str(pretrained), "--out", str(out), "--experts", "2"]
    assert cli.main([*argv, "--set", "upcycle.num_experts=3"]) == 0
    assert ckpt.read_meta(out)["arch"]["upcycle"]["num_experts"] == 3


def test_top_level_help_lists_the_exit_statuses(capsys):
    """The statuses were documented nowhere the CLI shows: 3 for a non-finite training loss
    (run_command) was in no help or README."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for status in (0, 1, 2, 3, 130, SIGTERM_STATUS):
        assert f"\n  {status} " in out, status
    assert "non-finite" in out


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_quickstart_checks_its_seed_before_any_step(seed, tmp_path, monkeypatch, capsys):
    """A seed outside train.seed's range was refused by the tokenizer step, after the three
    prepare steps had run."""
    real_main, calls = cli.main, []

    def main(argv=None):
        if argv and argv[0] == "quickstart":
            return real_main(argv)
        calls.append(argv)
        return 0

    monkeypatch.setattr(cli, "main", main)
    out = tmp_path / "qs"
    argv = ["quickstart", "--data", str(tmp_path / "none"), "--out", str(out), "--seed", seed]
    assert cli.main(argv) == 2
    assert "--seed must be in [0, 4294967296)" in capsys.readouterr().err
    assert calls == [] and not out.exists()
