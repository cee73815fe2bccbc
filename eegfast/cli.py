"""``eegfast <command>``: one entry point over the package's jobs.

Each command lives in its own module, which exposes

    configure_parser(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int

and is imported only when its command runs, so ``eegfast --help`` stays fast and a command's heavy
dependencies are not loaded by the others. A command whose module imports torch takes its
``configure_parser`` from a light module (``OPTIONS``), and its own module is imported only once
the arguments parse: ``eegfast <command> --help`` and a usage error print without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

# command -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("eegfast.data.prepare", "read recordings with MNE and write training shards"),
    "tokenizer": ("eegfast.train.commands.tokenizer", "train the VQ-NSP tokenizer"),
    "pretrain": ("eegfast.train.commands.pretrain", "masked (or hybrid) EEG pretraining"),
    "upcycle": ("eegfast.train.commands.upcycle", "turn a dense checkpoint into a MoE model"),
    "finetune": ("eegfast.train.commands.finetune", "single- or multi-task fine-tuning"),
    "evaluate": (
        "eegfast.train.commands.evaluate",
        "score a fine-tuned model on held-out windows, or linear-probe a backbone",
    ),
    "predict": (
        "eegfast.train.commands.predict",
        "apply a fine-tuned model to prepared recordings (labelled or not)",
    ),
    "generate": ("eegfast.train.commands.generate", "generate synthetic EEG from a prompt"),
    "bench": ("eegfast.train.commands.bench", "run the CPU benchmark suites and write a report"),
    "doctor": ("eegfast.train.commands.doctor", "report the environment and usable backends"),
    "quickstart": ("eegfast.train.commands.quickstart", "the whole recipe on the bundled EEG"),
}

# command -> the module whose configure_parser (the same function as the command module's) reads
# its arguments without importing torch, the models or the data stack; commands not named here
# read them from their own module, which is light.
OPTIONS: dict[str, str] = {
    name: f"eegfast.train.commands.options.{name}"
    for name in ("tokenizer", "pretrain", "upcycle", "finetune", "evaluate", "predict", "generate")
}

# Commands whose --out is a folder: an existing file there is refused before any work.
FOLDER_OUT = {
    "prepare",
    "tokenizer",
    "pretrain",
    "upcycle",
    "finetune",
    "evaluate",
    "predict",
    "quickstart",
}
# Commands whose --out is a file: its folder must be writable.
FILE_OUT = {"generate"}


# The exit statuses every command keeps to (``eegfast --help`` lists them).
EXIT_STATUSES = """\
exit status:
  0    done
  1    failed (prepare: nothing usable, or with --strict a bad recording; bench: a
       benchmark failed; doctor: a required native extension is missing; any command:
       a write failed, e.g. a full disk, the file named)
  2    usage error: a bad option, value, file or folder (one line on stderr)
  3    training stopped: the loss became non-finite (NaN or inf)
  130  Ctrl-C (a training command names its last checkpoint: --resume auto continues)
  143  SIGTERM (as Ctrl-C)

`eegfast COMMAND --help` gives a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eegfast",
        description="Fast LaBraM-family EEG foundation models.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _load(name: str, module_name: str | None = None):
    """The module of command ``name`` (``module_name``: another of its modules, e.g. its
    ``OPTIONS``)."""
    module_name = module_name or COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise SystemExit(
                f"eegfast {name}: this command is not available in this build"
            ) from err
        raise


def _is_file(path: Path) -> bool:
    """Whether ``path`` exists and is not a folder; False where it cannot be looked up (a folder
    on the way not to enter, a name too long): ``unwritable_reason`` then says why in one line."""
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def _escape_what_cannot_print() -> None:
    """Let stdout write a character its encoding cannot hold as an escape (``\\xb5``), as
    Python's stderr does: in a locale that is not UTF-8 (a Windows console's output piped or
    redirected, in cp932 or cp1252; LC_ALL=C) the "µV" of `eegfast prepare --help` or of a
    report, a Cyrillic or CJK file name, or one that is no UTF-8 (held with surrogates)
    stopped the command with a UnicodeEncodeError, at the end of a run. (Under the C locale
    Python's own choice is surrogateescape, which writes file names that are no UTF-8 back as
    their bytes but fails for every other character.)"""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # (a TextIOWrapper's)
        if reconfigure is None or getattr(stream, "errors", None) not in (
            "strict",
            "surrogateescape",
        ):
            continue
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # closed
            pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _escape_what_cannot_print()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command's own handling starts (importing torch, reading arguments):
        # one line and the shell's status for SIGINT, as a command interrupted later
        name = argv[0] if argv and argv[0] in COMMANDS else ""
        print(f"eegfast{' ' + name if name else ''}: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        parser = argparse.ArgumentParser(prog=f"eegfast {name}", description=COMMANDS[name][1])
        _load(name, OPTIONS.get(name)).configure_parser(parser)
        args = parser.parse_args(argv[1:])
        out = getattr(args, "out", None)
        if name in FOLDER_OUT and out is not None and _is_file(Path(out)):
            print(f"eegfast {name}: --out {out}: exists and is not a folder", file=sys.stderr)
            return 2
        if name in FOLDER_OUT | FILE_OUT and out is not None:
            # before any work: a folder that cannot be made (its parent is a file, no
            # permission) would otherwise surface as a traceback once the run starts writing,
            # for `generate` only after the whole generation
            from eegfast.fileio import unwritable_reason

            reason = unwritable_reason(Path(out) if name in FOLDER_OUT else Path(out).parent)
            if reason is not None:
                print(f"eegfast {name}: --out {out}: {reason}", file=sys.stderr)
                return 2
        return int(_load(name).main(args) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from eegfast import __version__

        print(__version__)
        return 0
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())
