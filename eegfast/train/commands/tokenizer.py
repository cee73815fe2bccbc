"""Run code of ``eegfast tokenizer``: train the VQ-NSP tokenizer.

Its description (``eegfast tokenizer --help``) and options are in
:mod:`eegfast.train.commands.options.tokenizer`, read without importing torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eegfast.models import VQNSP
from eegfast.nn.vq import code_perplexity
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model
from eegfast.train.commands.common import (
    CommandError,
    Runtime,
    finished_message,
    model_for_resume,
    resolve,
    run_command,
    run_folder,
    say,
    start,
)
from eegfast.train.commands.options.tokenizer import DEFAULTS, configure_parser  # noqa: F401
from eegfast.train.config import RunConfig
from eegfast.train.data import (
    TrainData,
    check_table_rows,
    collate_fn,
    embedding_coverage,
    load_data,
    table_rows,
)
from eegfast.train.distributed import shutdown
from eegfast.train.engine import fit
from eegfast.train.finetune import iterate_batches
from eegfast.train.objectives import StepContext, to_device, tokenizer_step
from eegfast.train.validation import META_KEY as VALIDATION_META
from eegfast.train.validation import (
    HoldOut,
    Validator,
    hold_out,
    tokenizer_evaluator,
)

# Below this train/feature_spread the encoder's features all point nearly one way. On the
# bundled sample healthy vqnsp_tiny runs stay at 0.8-0.9 after their first 100 steps; collapsed
# ones (beta = 1) fell to ~1e-4, and to ~7e-3 with dead codes restarted.
COLLAPSED_SPREAD = 0.05
# Below this train/feature_dims the features lie along one line through the origin, which the
# spread misses when they split into two opposite directions: vqnsp_base with beta = 0 on the
# sample reached feature_spread 0.99 with feature_dims 1.06 and perplexity 2.3; collapsed runs
# measured 1.00-1.01. Healthy vqnsp_tiny tokenizers measured 2.5-3.1 on the sample (16 dims),
# fresh ones ~10; the quickstart's run dipped to 1.36 for one log point (step 50) and recovered.
COLLAPSED_DIMS = 1.25
# A collapse is reported once it shows at this many log points in a row: early in training
# the features can dip and recover (the quickstart's tokenizer: below 1.5 dims at one log point).
COLLAPSE_LOG_POINTS = 3
# Below this train/perplexity (exp of the batch's code entropy) the codes are nearly one.
COLLAPSED_PERPLEXITY = 2.0


def quantizer_kwargs(config: RunConfig) -> dict[str, float | None]:
    """Model config overrides from the ``vq`` section (recorded in the checkpoint's arch; the
    config's LIMITS keep beta >= 0 and the threshold in [0, 1])."""
    kwargs: dict[str, float | None] = {}
    if config.vq.beta is not None:
        kwargs["beta"] = config.vq.beta
    if config.vq.dead_code_threshold is not None:
        kwargs["dead_code_threshold"] = config.vq.dead_code_threshold or None  # 0: never
    return kwargs


def collapse_warnings(step: int, scalars: Mapping[str, float]) -> dict[str, str]:
    """Warnings by kind from one log point's scalars: ``"encoder"`` when
    ``train/feature_spread`` says the features all point one way or ``train/feature_dims`` says
    they lie along one line, ``"codebook"`` when ``train/perplexity`` says nearly every patch
    gets the same code."""
    warnings: dict[str, str] = {}
    spread = scalars.get("train/feature_spread")
    dims = scalars.get("train/feature_dims")
    perplexity = scalars.get("train/perplexity")
    ppl = f", perplexity {perplexity:.1f}" if perplexity is not None else ""
    advice = (
        "Lower the commitment weight (--set vq.beta=0) or the learning rate and train again; "
        f"healthy runs keep feature_spread well above {COLLAPSED_SPREAD} and feature_dims above "
        f"{COLLAPSED_DIMS}."
    )
    if spread is not None and spread < COLLAPSED_SPREAD:
        warnings["encoder"] = (
            f"warning: encoder collapse: at step {step} the tokenizer's features all point "
            f"nearly the same way (train/feature_spread {spread:.2g}{ppl}), so its codes say "
            "little about the signal (dead-code restarts can keep perplexity up inside that one "
            f"direction). {advice}"
        )
    elif dims is not None and dims < COLLAPSED_DIMS:
        warnings["encoder"] = (
            f"warning: encoder collapse: at step {step} the tokenizer's features lie along one "
            f"line (train/feature_dims {dims:.2f}{ppl}), pointing one way or its opposite, so "
            f"its codes split the patches into about two groups. {advice}"
        )
    if perplexity is not None and perplexity < COLLAPSED_PERPLEXITY:
        warnings["codebook"] = (
            f"warning: codebook collapse: at step {step} nearly every patch gets the same code "
            f"(train/perplexity {perplexity:.2f}). Re-seed unused codes sooner (--set "
            "vq.dead_code_threshold=..., in EMA counts of rows a batch) or lower the commitment "
            "weight (--set vq.beta=0)."
        )
    return warnings


def collapse_watch(runtime: Runtime | None) -> Callable[[int, dict[str, float]], None]:
    """A log-point callback for :func:`eegfast.train.engine.fit` (rank 0) that prints each
    kind of :func:`collapse_warnings` once, when it has shown at ``COLLAPSE_LOG_POINTS`` log
    points in a row (collapse came within 20-60 steps on the bundled sample; a transient dip
    lasted one log point), so that a long run is not trained to its end before anyone hears
    of it."""
    printed: set[str] = set()
    in_a_row: dict[str, int] = {}

    def check(step: int, scalars: dict[str, float]) -> None:
        warnings = collapse_warnings(step, scalars)
        for kind in set(in_a_row) | set(warnings):
            in_a_row[kind] = in_a_row.get(kind, 0) + 1 if kind in warnings else 0
        for kind, warning in warnings.items():
            if kind not in printed and in_a_row[kind] >= COLLAPSE_LOG_POINTS:
                say(runtime, warning)
                printed.add(kind)

    return check


# Training windows the end-of-run summary encodes (evenly spaced over the data): enough to
# tell a few dozen codes in use from a few thousand, a second or so per 64 windows on a CPU.
SUMMARY_WINDOWS = 512


def codebook_summary(
    model: VQNSP, data: TrainData, device: torch.device, *, max_windows: int = SUMMARY_WINDOWS
) -> str:
    """How many codes the trained tokenizer gives the patches of up to ``max_windows`` training
    windows, and their perplexity, beside the EMA perplexity.

    Read from the data, not from the EMA counts: the k-means initialisation and every dead-code
    restart set a code's count to 1, so with restarts on every code looked active. Every rank
    runs it (an FSDP model gathers its weights collectively); no EMA update is made."""
    num_codes = model.config.num_codes
    chosen = np.unique(np.linspace(0, len(data) - 1, min(len(data), max_windows)).round())
    counts = torch.zeros(num_codes, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            windows = chosen.astype(int).tolist()
            pin = device.type == "cuda"  # pinned on a GPU, as fit's batches
            for _, batch in iterate_batches(data, windows, 64, pin_memory=pin):
                batch = to_device(batch, device)
                codes = model.get_codebook_indices(
                    batch["x"],
                    batch["input_chans"],
                    channel_padding_mask=batch.get("channel_padding_mask"),
                )
                codes = codes[codes >= 0].cpu()  # -1: padded electrodes
                counts += torch.bincount(codes, minlength=num_codes).double()
    finally:
        model.train(was_training)
    used = int((counts > 0).sum())
    ema = model.codebook_stats()["ema_perplexity"]
    return (
        f"codebook: {used} of {num_codes} codes used by the patches of {len(chosen)} training "
        f"windows (perplexity {float(code_perplexity(counts)):.1f}; EMA perplexity {ema:.1f})"
    )


def main(args: argparse.Namespace) -> int:
    return run_command("tokenizer", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    config = resolve(args, DEFAULTS, {"model.name": args.model} if args.model else None)
    if not config.model.name.startswith("vqnsp_"):
        raise CommandError(f"--model {config.model.name} is not a tokenizer (vqnsp_*)")
    with run_folder(args, expected={"tokenizer"}) as resume:
        resumed = ckpt.resumed_meta(resume, args.out)
        config = model_for_resume(config, DEFAULTS, resumed, named=args.model is not None)
        return _train(args, config, resume, resumed)


def _validator(
    config: RunConfig, runtime: Runtime, data: TrainData, split: HoldOut, num_codes: int
) -> Validator:
    """The checkpoints' evaluation on the held-out windows: the tokenizer's losses in eval
    mode (no EMA update of the codebook) and its codebook usage over their patches."""
    world = runtime.dist.world_size
    return Validator(
        data,
        split.val,
        tokenizer_evaluator(runtime.device),
        device=runtime.device,
        dist_info=runtime.dist,
        batch_size=max(1, config.train.batch_size // (world * config.train.grad_accum)),
        precision=config.train.precision,
        num_codes=num_codes,
    )


def _train(
    args: argparse.Namespace, config: RunConfig, resume: str | None, resumed: dict[str, Any]
) -> int:
    runtime = start(config)
    try:
        data = load_data(config.data.roots, config.data.tasks)
        split = hold_out(data, config.data.val_fraction, config.train.seed, resumed=resumed)
        arch = {"kind": "tokenizer", "name": config.model.name, "kwargs": quantizer_kwargs(config)}
        model = build_model(arch)
        check_table_rows(data, table_rows(model), config.model.name)
        say(
            runtime,
            f"tokenizer {config.model.name}: {len(data)} windows from {len(data.roots)} folder(s)",
        )
        # the held-out windows stay out of fit(): its dataset is the training windows only
        train = data if split is None else data.subset(split.train)
        validator = None
        if split is not None:
            say(runtime, split.describe(len({item.recording for item in data.items})))
            validator = _validator(config, runtime, data, split, model.config.num_codes)

        def report(path: Path) -> None:  # on_checkpoint: one line per evaluation
            say(runtime, f"{path.name}: {validator.summary()}")

        result = fit(
            model,
            tokenizer_step,
            train.dataset,
            config,
            args.out,
            group_keys=train.group_keys,
            collate_fn=collate_fn(),
            ctx=StepContext(runtime.device, seed=config.train.seed),
            dist_info=runtime.dist,
            resume=resume,
            meta={
                "arch": arch,
                "command": "tokenizer",
                "trained_on": embedding_coverage(train, resumed.get("trained_on")),
                **({VALIDATION_META: split.record()} if split is not None else {}),
            },
            eval_fn=validator,
            on_checkpoint=None if validator is None else report,
            on_log=collapse_watch(runtime),
        )
        if result.resumed_from is not None:
            say(runtime, f"resumed from {result.resumed_from}")
        say(runtime, finished_message(result, "tokenizer trained"))
        say(runtime, codebook_summary(model, train, runtime.device))
        return 0
    finally:
        shutdown(runtime.dist)
