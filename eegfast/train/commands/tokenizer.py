"""``eegfast tokenizer --data FOLDER... --out RUN``: train the VQ-NSP tokenizer.

The tokenizer learns a codebook of EEG patches by reconstructing each patch's Fourier
amplitude and phase from its code (LaBraM's VQ-NSP). Its checkpoint is what ``eegfast pretrain
--tokenizer RUN`` uses to make masked-modelling targets.
"""

from __future__ import annotations

import argparse

from eegfast.train.arch import build_model
from eegfast.train.commands.common import add_run_arguments, resolve, run_command, say, start
from eegfast.train.config import RunConfig
from eegfast.train.data import collate_fn, load_data
from eegfast.train.distributed import shutdown
from eegfast.train.engine import fit
from eegfast.train.objectives import StepContext, tokenizer_step

# Reference recipe: AdamW betas (0.9, 0.99), weight decay 1e-4, warm-up then cosine.
DEFAULTS = RunConfig().with_overrides(
    {
        "model.name": "vqnsp_base",
        "optim.lr": 1e-4,
        "optim.betas": [0.9, 0.99],
        "optim.weight_decay": 1e-4,
        "train.batch_size": 128,
    }
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_run_arguments(parser)
    parser.add_argument("--model", default=None, help="tokenizer name (sets model.name)")


def main(args: argparse.Namespace) -> int:
    return run_command("tokenizer", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    config = resolve(args, DEFAULTS, {"model.name": args.model} if args.model else None)
    runtime = start(config)
    try:
        data = load_data(config.data.roots, config.data.tasks)
        arch = {"kind": "tokenizer", "name": config.model.name, "kwargs": {}}
        model = build_model(arch)
        say(
            runtime,
            f"tokenizer {config.model.name}: {len(data)} windows from {len(data.roots)} folder(s)",
        )
        result = fit(
            model,
            tokenizer_step,
            data.dataset,
            config,
            args.out,
            group_keys=data.group_keys,
            collate_fn=collate_fn(),
            ctx=StepContext(runtime.device, seed=config.train.seed),
            dist_info=runtime.dist,
            resume=args.resume,
            meta={"arch": arch, "command": "tokenizer"},
        )
        if result.resumed_from is not None:
            say(runtime, f"resumed from {result.resumed_from}")
        say(runtime, f"tokenizer trained for {result.step} steps; checkpoint {result.checkpoint}")
        return 0
    finally:
        shutdown(runtime.dist)
