"""Run code of ``eegfast finetune``: fine-tuning with subject-wise cross-validation.

Its description (``eegfast finetune --help``) and options are in
:mod:`eegfast.train.commands.options.finetune`, read without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eegfast.fileio import write_text_atomic
from eegfast.train.arch import backbone_from_checkpoint
from eegfast.train.commands.common import (
    CommandError,
    check_out,
    resolve,
    run_command,
    run_folder,
    say,
    start,
)
from eegfast.train.commands.options.finetune import DEFAULTS, configure_parser  # noqa: F401
from eegfast.train.config import RunConfig, config_to_yaml
from eegfast.train.data import load_data
from eegfast.train.distributed import shutdown
from eegfast.train.finetune import (
    Backbone,
    cross_validate,
    pretraining_unrecorded,
    write_outputs,
)


def main(args: argparse.Namespace) -> int:
    return run_command("finetune", lambda: _main(args))


def backbone_for(config: RunConfig, named: str | None = None) -> Backbone:
    """The backbone to fine-tune: ``model.init`` (a run, or a checkpoint file without an
    eegfast record, which must then be the model ``named`` when the user named one), else a
    fresh ``model.name``."""
    if config.model.init:
        arch, weights, meta = backbone_from_checkpoint(
            config.model.init, drop_path=config.model.drop_path, name=named
        )
        return Backbone(
            arch,
            weights,
            list(meta.get("task_names") or []),
            meta.get("pretrained_on"),
            pretraining_unrecorded=pretraining_unrecorded(meta),
        )
    kwargs = {"num_classes": 0, "drop_path_rate": config.model.drop_path}
    return Backbone({"kind": "classifier", "name": config.model.name, "kwargs": kwargs}, None, [])


def _main(args: argparse.Namespace) -> int:
    extra: dict = {}
    if args.init:
        extra["model.init"] = args.init
    if args.folds is not None:
        extra["finetune.folds"] = args.folds
    if args.tasks:
        extra["data.tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.linear:
        extra["finetune.mode"] = "linear"
    config = resolve(args, DEFAULTS, extra)
    warn_unused(config)
    check_out(Path(args.out))
    if args.resume not in (None, "auto"):
        raise CommandError(
            f"--resume {args.resume}: finetune resumes each fold and variant from its own "
            "folder under --out; use --resume auto"
        )
    check_tasks(config)
    with run_folder(args) as resume:
        return _train(args, config, resume)


def warn_unused(config: RunConfig) -> None:
    """Say (not refuse: one config file may serve every command) that ``data.val_fraction``
    does nothing here. It holds data out for `tokenizer` and `pretrain`; set for finetune, it
    suggests a validation part choosing each fold's best epoch, but the fold's last model is
    what gets tested."""
    if config.data.val_fraction and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(
            f"eegfast finetune: warning: data.val_fraction={config.data.val_fraction} is not "
            "used by finetune: each fold trains on all of its training part for train.epochs "
            "(or train.max_steps), and its last model is tested (no validation part, no "
            "early stopping or best-epoch choice)",
            file=sys.stderr,
        )


def named_model(args: argparse.Namespace) -> str | None:
    """``model.name`` when the user set it (--config or --set), None when it is only the
    default: a checkpoint file given to --init must then be that model."""
    return resolve(args, DEFAULTS.with_overrides({"model.name": ""})).model.name or None


def check_tasks(config: RunConfig) -> None:
    """``data.tasks`` must name tasks of the prepared folders (read from their indexes only)."""
    if not config.data.tasks:
        return
    from eegfast.data import load_index

    present: set[str] = set()
    for root in config.data.roots:
        if not Path(root).is_dir():
            return  # load_data names the missing folder
        present |= set(load_index(root)["tasks"])
    missing = sorted(set(config.data.tasks) - present)
    if missing:
        raise CommandError(
            f"--tasks: {', '.join(missing)} not in the data; its tasks are "
            f"{', '.join(sorted(present)) or '(none)'}"
        )


def folds_note(config: RunConfig, result) -> str | None:
    """A note when fewer folds ran than ``finetune.folds`` asked for (too few groups)."""
    used = len({p["fold"] for p in result.predictions})
    if used and used < config.finetune.folds:
        return f"{config.finetune.folds} folds requested, only {used} groups: using {used}"
    return None


def _train(args: argparse.Namespace, config: RunConfig, resume: str | None) -> int:
    runtime = start(config)
    try:
        data = load_data(config.data.roots, config.data.tasks)
        backbone = backbone_for(config, named_model(args) if config.model.init else None)
        if config.model.init and backbone.arch.get("name"):
            # the model --init holds, not the from-scratch default (labram_base): config.yaml
            # (here and in each fold's run) says which model was fine-tuned
            config = config.with_overrides({"model.name": backbone.arch["name"]})
        out = Path(args.out)
        if runtime.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "config.yaml", config_to_yaml(config))
        if not backbone.task_names:
            backbone.task_names = sorted(config.data.tasks or data.tasks)
        result = cross_validate(
            data,
            config,
            out,
            runtime,
            backbone,
            resume=resume,
            log=lambda text: say(runtime, text),
        )
        if runtime.dist.is_main:
            notes = [
                f"initialised from `{config.model.init}`"
                if config.model.init
                else f"trained from scratch (`{config.model.name}`)"
            ]
            note = folds_note(config, result)
            if note:
                notes.append(note)
            write_outputs(result, data, out, title="eegfast fine-tuning report", notes=notes)
            say(runtime, (out / "report.md").read_text(encoding="utf-8"))
            say(runtime, f"report: {out / 'report.md'}")
        return 0
    finally:
        shutdown(runtime.dist)
