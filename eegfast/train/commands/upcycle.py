"""Run code of ``eegfast upcycle``: turn a dense backbone into a MoE model.

Its description (``eegfast upcycle --help``) and options are in
:mod:`eegfast.train.commands.options.upcycle`, read without importing torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from eegfast.fileio import fsync_dir, write_text_atomic
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import backbone_from_checkpoint, build_model
from eegfast.train.commands.common import (
    CommandError,
    _refuse_previous_run,
    check_out,
    run_command,
    run_folder,
)
from eegfast.train.commands.options.upcycle import configure_parser  # noqa: F401
from eegfast.train.config import (
    ModelConfig,
    RunConfig,
    UpcycleConfig,
    config_to_dict,
    resolve_config,
)
from eegfast.train.finetune import pretraining_unrecorded


def main(args: argparse.Namespace) -> int:
    return run_command("upcycle", lambda: _main(args))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _main(args: argparse.Namespace) -> int:
    # the command's flags before --set, as in the training commands (they came after it, so
    # `--experts 4 --set upcycle.num_experts=8` built 4 experts where finetune's --set wins)
    flags = {}
    if args.experts is not None:
        flags["upcycle.num_experts"] = args.experts
    if args.top_k is not None:
        flags["upcycle.top_k"] = args.top_k
    config = resolve_config(RunConfig(), args.config, args.overrides, flags=flags)
    # model.name as the user set it: a checkpoint file given to --model must then be that model
    named = resolve_config(RunConfig(model=ModelConfig(name="")), args.config, args.overrides)
    out = Path(args.out)
    check_out(out)
    if not args.overwrite:  # said before the models are built (refused again under the lock)
        _refuse_previous_run(out, can_resume=False)
    # Built and checked before --out is claimed: --overwrite clears the earlier model only once
    # this one is known to be good (a typo in --model or upcycle.layers had deleted it first).
    model, meta = _upcycle(args, config, named.model.name or None)
    with run_folder(args):
        return _write(args, model, meta)


# upcycle.* keys that only `eegfast finetune` reads (the aux-loss weights of its training step,
# whether its routers get task ids): set for this command, they change nothing it writes
FINETUNE_ONLY_KEYS = ("task_routing", "router_aux_weight", "router_z_weight")


def _upcycle(
    args: argparse.Namespace, config: RunConfig, named: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """The upcycled model and its checkpoint meta; CommandError for a model or settings that
    do not work. Writes nothing."""
    up = config.upcycle
    # Said, not refused: one config file may serve every command. Silently ignored, a user's
    # `--set upcycle.task_routing=false --tasks a,b` still built task routing, and aux weights
    # set here never reached the fine-tuning, which reads its own configuration.
    unused = [
        f"upcycle.{key}={getattr(up, key)}"
        for key in FINETUNE_ONLY_KEYS
        if getattr(up, key) != getattr(UpcycleConfig(), key)
    ]
    if unused:
        print(
            f"eegfast upcycle: warning: {', '.join(unused)}: fine-tuning settings, not used by "
            "upcycle (give them to eegfast finetune)",
            file=sys.stderr,
        )
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    # A task named twice would get two router ids, and fine-tuning would use only the last one.
    repeated = sorted({t for t in task_names if task_names.count(t) > 1})
    if repeated:
        raise CommandError(f"--tasks names {repeated} more than once: {args.tasks!r}")
    backbone_arch, weights, source_meta = backbone_from_checkpoint(args.model, name=named)
    if backbone_arch.get("upcycle"):
        raise CommandError(f"--model {args.model}: this backbone is already a MoE model")
    dense = build_model(backbone_arch)
    missing, unexpected = dense.load_state_dict(weights, strict=False)
    allowed_missing = {k for k in missing if k.startswith(("fc_norm.", "head."))}
    if set(missing) - allowed_missing or unexpected:
        raise CommandError(
            f"--model {args.model}: weights do not fit {backbone_arch['name']}: missing "
            f"{sorted(set(missing) - allowed_missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    upcycle_args = {
        "num_experts": up.num_experts,
        "top_k": up.top_k,
        "layers": list(up.layers) or None,
        "noise_std": up.noise_std,
        "num_tasks": len(task_names),
    }
    count = len(getattr(dense, "blocks", None) or [])
    bad = [i for i in up.layers if count and not -count <= i < count]
    if bad:
        raise CommandError(
            f"upcycle.layers: {bad} out of range: {backbone_arch['name']} has {count} blocks "
            f"(layers 0..{count - 1}, or -{count}..-1 from the end)"
        )
    arch = {**backbone_arch, "upcycle": upcycle_args}
    moe = build_model(arch)
    from eegfast.models import upcycle as upcycle_model

    torch.manual_seed(config.train.seed)
    upcycled = upcycle_model(dense, **upcycle_args)  # in place: dense is now the MoE model
    moe.load_state_dict(upcycled.state_dict(), strict=True)  # the rebuilt arch fits exactly
    dense_again = build_model(backbone_arch)
    dense_again.load_state_dict(weights, strict=False)
    dense_again.fc_norm.load_state_dict(upcycled.fc_norm.state_dict())
    probe = torch.randn(2, 3, 2, 200, generator=torch.Generator().manual_seed(0))
    chans = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        max_diff = float((moe.eval()(probe, chans) - dense_again.eval()(probe, chans)).abs().max())
    # Checked before anything is written (a refused model must not be left as a checkpoint
    # that `eegfast finetune` would use); a NaN difference fails, with or without noise.
    if not math.isfinite(max_diff) or (not up.noise_std and max_diff > 1e-4):
        raise CommandError(
            f"the upcycled model differs from the dense one by {max_diff:.2e} on a probe "
            "input (expected at most 1e-4 without noise); nothing written"
        )
    meta = {
        "arch": arch,
        "command": "upcycle",
        "source": str(args.model),
        "task_names": task_names,
        "dense_parameters": count_parameters(dense_again),
        "moe_parameters": count_parameters(moe),
        "probe_max_abs_diff": max_diff,
        "pretrained_on": source_meta.get("pretrained_on"),  # for finetune's report
        # (a source pretrained before that record: finetune's report says it cannot check)
        "pretraining_unrecorded": pretraining_unrecorded(source_meta),
        "config": config_to_dict(config),
        "metric": None,
    }
    return moe, meta


def _write(args: argparse.Namespace, moe: torch.nn.Module, meta: dict) -> int:
    """The checkpoint, then ``upcycle.json`` (a copy of its meta, for reading)."""
    out = Path(args.out)
    summary = out / "upcycle.json"
    # An earlier model's summary goes first (--overwrite keeps it: it is no run artefact), so
    # that a run stopped between the two writes leaves no summary of other experts beside the
    # new checkpoint, which holds the same record in its meta.json.
    if summary.is_file():
        summary.unlink()
        fsync_dir(out)
    path = ckpt.save_checkpoint(out / "checkpoints", 0, moe.state_dict(), {"step": 0}, meta)
    write_text_atomic(summary, json.dumps(meta, indent=2, default=str) + "\n")
    up, name = meta["arch"]["upcycle"], meta["arch"]["name"]
    print(
        f"upcycled {name} from {args.model}: {up['num_experts']} experts, top-{up['top_k']}"
        f", task routing over {meta['task_names'] or 'no tasks'}; parameters "
        f"{meta['dense_parameters']:,} -> {meta['moe_parameters']:,}; max |MoE - dense| on a "
        f"probe = {meta['probe_max_abs_diff']:.2e}"
        f"{' (noise added)' if up['noise_std'] else ''}; checkpoint {path}"
    )
    return 0
