"""What the README and the commands' help tell a user must run as written: every `eegfast`
command line in the README's code blocks parses with that command's own parser, every config
key it names exists, and the torchrun invocation the help and `eegfast doctor` suggest names
something torchrun can start."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from eegfast import cli
from eegfast.train.commands import common, doctor
from eegfast.train.config import valid_keys

README = Path(__file__).resolve().parents[2] / "README.md"
TRAINING_COMMANDS = ["tokenizer", "pretrain", "finetune", "evaluate", "predict"]


def _readme_command_lines() -> list[str]:
    """The `eegfast ...` lines of the README's fenced and indented code blocks, continuation
    lines joined and comments dropped; lines that elide arguments (`...`) are left out."""
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    blocks += re.findall(r"\n\n((?: {4,}\S.*\n)+)", text)
    lines: list[str] = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("eegfast ") and "..." not in line:
                lines.append(line)
    return lines


def test_readme_has_command_lines():
    commands = {shlex.split(line)[1] for line in _readme_command_lines()}
    assert {
        "prepare",
        "tokenizer",
        "pretrain",
        "finetune",
        "evaluate",
        "predict",
        "generate",
    } <= commands


@pytest.mark.parametrize("line", _readme_command_lines())
def test_readme_command_line_parses(line):
    argv = shlex.split(line)[1:]
    assert argv[0] in cli.COMMANDS, f"README names an unknown command: {line}"
    parser = argparse.ArgumentParser(prog=f"eegfast {argv[0]}", exit_on_error=False)
    cli._load(argv[0]).configure_parser(parser)
    try:
        parser.parse_args(argv[1:])
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"README command does not parse: {line}: {err}")


def test_readme_config_keys_exist():
    sections = "data|model|optim|train|pretrain|upcycle|finetune|vq"
    files = {"json", "safetensors", "yaml", "csv", "md", "npz", "npy", "png", "pt"}
    found = re.findall(rf"`(?:--set\s+)?((?:{sections})\.\w+)(?:=[^`]*)?`", README.read_text())
    named = {key for key in found if key.split(".")[1] not in files}  # not `upcycle.json`
    assert named, "the README names no config key: the pattern no longer matches it"
    assert named <= set(valid_keys()), sorted(named - set(valid_keys()))


def _torchrun_targets(text: str) -> list[list[str]]:
    """What follows ``torchrun --nproc_per_node N`` up to the elided command arguments."""
    found = re.findall(r"torchrun --nproc_per_node \w+ (.*?) (?:\.\.\.|<command>)", text)
    assert found, f"no torchrun invocation in {text!r}"
    return [shlex.split(target) for target in found]


def test_torchrun_hint_names_something_torchrun_can_start(capsys):
    """torchrun runs ``python TARGET`` unless told ``-m``: a bare ``eegfast`` is a missing file
    (or, in a checkout's root, the package folder), so the hint must say ``-m eegfast``."""
    texts = [common.EPILOG]
    for name in TRAINING_COMMANDS:
        parser = argparse.ArgumentParser()
        cli._load(name).configure_parser(parser)
        texts.append(parser.format_help())
    doctor.main(argparse.Namespace(json=False))
    texts.append(capsys.readouterr().out)
    texts.append(README.read_text())
    for text in texts:
        for target in _torchrun_targets(" ".join(text.split())):
            assert target[:2] == ["-m", "eegfast"] or Path(target[0]).is_file(), target
