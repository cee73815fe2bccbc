"""`eegfast <command> --help` and a usage error without the heavy stacks: every training command's
module imported torch and the training loop before argparse saw an argument, so `eegfast finetune
--help` (or a mistyped option) took 1.3-2 s against 0.03 s for `eegfast --help`."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eegfast import cli

ROOT = Path(__file__).resolve().parent.parent

# What --help must not load. numpy is checked apart (NUMPY_OPTIONS): it costs a few tens of
# milliseconds.
HEAVY = (
    "torch",
    "mne",
    "sklearn",
    "scipy",
    "triton",
    "matplotlib",
    "pandas",
    "safetensors",
    "eegfast._C",
    "eegfast.train.engine",
)

# Commands whose options module imports numpy: prepare's (eegfast.data.prepare) holds the
# preparation code itself. The others' --help loaded it through eegfast.train.plots and
# eegfast.fileio only, which now import it where they draw or write.
NUMPY_OPTIONS = {"prepare"}

# Commands that run without arguments (bench, doctor, quickstart) get only an unknown option.
NEEDS_ARGUMENTS = {
    "prepare",
    "tokenizer",
    "pretrain",
    "upcycle",
    "finetune",
    "evaluate",
    "predict",
    "generate",
}


def _run_in_fresh_python(command: str) -> dict:
    """``--help``, an unknown option and (where it has some) no arguments given to ``command``
    in one fresh interpreter: exit statuses, output and the heavy modules loaded after each."""
    calls = [[command, "--help"], [command, "--no-such-option"]]
    if command in NEEDS_ARGUMENTS:
        calls.append([command])
    code = f"""
import contextlib, io, json, sys
from eegfast import cli
found = []
for argv in {calls!r}:
    out, err = io.StringIO(), io.StringIO()
    status = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exit:
            status = exit.code
    heavy = [n for n in {HEAVY!r} if n in sys.modules]
    if {command!r} not in {sorted(NUMPY_OPTIONS)!r} and "numpy" in sys.modules:
        heavy.append("numpy")
    found.append(dict(argv=argv, status=status, out=out.getvalue(), err=err.getvalue(),
                      heavy=heavy))
print(json.dumps(found))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_and_usage_errors_import_no_heavy_stack(command):
    help_, unknown, *missing = _run_in_fresh_python(command)
    assert help_["status"] == 0 and f"usage: eegfast {command}" in help_["out"], help_
    assert help_["heavy"] == [], f"eegfast {command} --help imported {help_['heavy']}"
    # (argparse names missing required arguments first, where the command has some)
    assert unknown["status"] == 2 and f"eegfast {command}: error: " in unknown["err"], unknown
    assert unknown["heavy"] == [], f"eegfast {command} --no-such-option: {unknown['heavy']}"
    for call in missing:  # a required argument left out
        assert call["status"] == 2 and "the following arguments are required" in call["err"]
        assert call["heavy"] == [], f"eegfast {command} imported {call['heavy']}"


@pytest.mark.parametrize("command", sorted(cli.OPTIONS))
def test_the_command_module_reads_its_arguments_as_the_cli_does(command):
    """The command module's configure_parser (what callers and tests build parsers from) is the
    light module's; its defaults are the same objects."""
    options = importlib.import_module(cli.OPTIONS[command])
    module = importlib.import_module(cli.COMMANDS[command][0])
    assert module.configure_parser is options.configure_parser
    if hasattr(options, "DEFAULTS"):
        assert module.DEFAULTS is options.DEFAULTS
    parser = argparse.ArgumentParser(prog=f"eegfast {command}")
    module.configure_parser(parser)
    assert parser.description == options.__doc__ and "eegfast " + command in parser.description


def test_pretrain_help_names_the_objectives_eegfast_registers():
    """--objective's help lists the objectives without importing eegfast.train.objectives
    (torch): the names written down must be those the objectives module registers."""
    import eegfast.train.hybrid  # noqa: F401  (registers "hybrid" on import)
    from eegfast.train import objectives
    from eegfast.train.commands.options import pretrain

    own = {
        name
        for name, step in objectives._OBJECTIVES.items()
        if step.__module__.startswith("eegfast.")
    }
    assert own | set(objectives.LAZY_OBJECTIVES) == set(pretrain.BUILTIN_OBJECTIVES)
    # once imported (and another registered), its list is the one shown
    assert pretrain.objective_names() == objectives.objective_names()
