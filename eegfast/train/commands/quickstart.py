"""``eegfast quickstart [--data DIR] [--out runs/quickstart]``: the whole recipe on the bundled EEG.

prepare -> VQ-NSP tokenizer -> masked pretraining -> upcycle to MoE (task-aware router) ->
multi-task fine-tuning with grouped cross-validation (motor imagery + mental arithmetic), with
single-task runs on the same folds (negative-transfer report) and the classic baseline (log
band power + logistic regression) -> report.md with tables and plots. Tiny models, sized to run
on a laptop CPU in minutes; the numbers show the pipeline working, not LaBraM's accuracy.

Data: the six PhysioNet recordings of ``eegfast.datasets.sample()`` (``--data`` to point at a
folder holding them): eegmmidb S001 runs 4 and 8 (imagined left/right fist; 60 Hz mains) and
eegmat Subject00/01 (rest vs mental arithmetic; 50 Hz mains). ODC-By 1.0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from eegfast.train.commands.common import run_command

MI_FILES = ("S001R04.edf", "S001R08.edf")
ARITH_FILES = ("Subject00_1.edf", "Subject00_2.edf", "Subject01_1.edf", "Subject01_2.edf")

# Per-step settings (``--set`` overrides of each command), sized for 2 CPU cores: about 50 s
# each for the tokenizer and the pretraining (500 steps), 25 s for the fine-tuning on a quiet
# machine; 2.7-4.2 min in all were measured with other work running (December 2026).
TOKENIZER = {
    "train.keep_last": 1,
    "train.batch_size": 16,
    "train.epochs": 50,
    "optim.lr": 5e-4,
    "optim.warmup_fraction": 0.1,
}
# With a 3-epoch schedule (the quickstart until 2026-12-05) the tokenizer was left half
# collapsed (feature_spread 0.17, perplexity ~5) and pretraining predicted the one common code;
# 50 epochs of the tiny tokenizer (no commitment loss, see the vqnsp_tiny config) keep codes in
# use (~50 then; 254 of 256 in a run on 2026-12-07), and the masked model learns to predict them
# (18-19% of masked patches right after its 500 steps in runs on 2026-12-07, seeds 0 and 1,
# against ~1/256 for a uniform guess).
PRETRAIN = {"train.keep_last": 1, "train.batch_size": 16, "train.epochs": 50, "optim.lr": 1e-3}
FINETUNE = {
    "train.batch_size": 8,
    "train.keep_last": 1,
    "train.epochs": 10,
    "optim.lr": 1e-3,
    "optim.layer_decay": 0.8,
    "model.drop_path": 0.0,
    "upcycle.router_aux_weight": 0.01,
}
FAST = {"train.max_steps": 2}
VARIANT_LABEL = {
    "multitask": "multi-task model",
    "single": "single-task model",
}  # --fast: a smoke run of every step


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with the sample EDFs (default: EEGFAST_DATA, the cache, ../shared/data, "
        "else a download from PhysioNet)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/quickstart"),
        help="output folder (default: runs/quickstart)",
    )
    parser.add_argument(
        "--folds", type=int, default=2, help="k of the grouped k-fold (default 2, the most here)"
    )
    parser.add_argument(
        "--experts", type=int, default=4, help="experts per MoE layer (default 4, >= 2)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every training step (train.seed; default 0)"
    )
    parser.add_argument("--fast", action="store_true", help="2 steps per training (smoke test)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def main(args: argparse.Namespace) -> int:
    return run_command("quickstart", lambda: _main(args))


def _sets(values: dict, fast: bool, seed: int) -> list[str]:
    merged = {**values, **(FAST if fast else {}), "train.seed": seed}
    out = []
    for key, value in merged.items():
        out += ["--set", f"{key}={value}"]
    return out


def _run(step: str, argv: list[str], timings: dict[str, float]) -> None:
    from eegfast.cli import main as cli_main
    from eegfast.train.commands.common import SIGTERM_STATUS, CommandError, Terminated

    print(f"\n== {step}: eegfast {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    status = cli_main(argv)
    timings[step] = time.perf_counter() - started
    if status in (130, SIGTERM_STATUS):
        # The step caught a Ctrl-C (or SIGTERM) and said how to resume *it*; the quickstart
        # itself takes no --resume (each run starts its training steps afresh), so say what to
        # do instead and stop with the signal's status, not as a failure.
        print(
            f"eegfast quickstart: stopped during step {step!r}; run the same command again to "
            "start over (the prepared data are reused, the training steps start afresh)",
            file=sys.stderr,
            flush=True,
        )
        raise Terminated if status == SIGTERM_STATUS else KeyboardInterrupt
    if status != 0:
        raise CommandError(f"step {step!r} failed with exit status {status} (see above)")


def _main(args: argparse.Namespace) -> int:
    from eegfast.datasets import ATTRIBUTION, SampleDataError, sample
    from eegfast.train.commands.common import CommandError
    from eegfast.train.config import LIMITS

    # Checked here, not by the upcycle and finetune steps minutes later, after the training.
    if args.folds < 2:
        raise CommandError(
            f"--folds must be >= 2 (a test fold and a training fold), got {args.folds}"
        )
    if args.experts < 2:
        raise CommandError(
            f"--experts must be >= 2 (the router picks the top 2 per token), got {args.experts}"
        )
    # the steps' train.seed range: out of it, the tokenizer step refused it after the three
    # prepare steps had run
    seed_ok, seed_range = LIMITS["train.seed"]
    if not seed_ok(args.seed):
        raise CommandError(f"--seed must be {seed_range}, got {args.seed}")
    started = time.perf_counter()
    try:
        files = {p.name: p for p in sample(args.data, progress=not args.no_progress)}
    except SampleDataError as err:  # not found, no network, a bad checksum: one line, status 2
        message = str(err).removeprefix("path: ")  # sample()'s argument is our --data
        raise CommandError(f"--data: {message}" if args.data is not None else message) from err
    # Where the EEG came from (the search order has four places) and its licence's terms.
    print(
        f"EEG: the {len(files)} PhysioNet sample recordings in {files[MI_FILES[0]].parent} "
        "(ODC-By 1.0: keep the attribution, written at the end of report.md, with any public "
        "use)",
        flush=True,
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, runs = out / "data", out / "runs"
    timings: dict[str, float] = {}
    progress = ["--no-progress"] if args.no_progress else []
    mi = [f"motor_imagery={files[n]}" for n in MI_FILES]
    arith = [f"arithmetic={files[n]}" for n in ARITH_FILES]
    # Motor imagery: 2-s windows (1-s stride) inside each T1/T2 (left/right fist) event.
    _run(
        "prepare motor imagery",
        [
            "prepare",
            *mi,
            "--out",
            str(data / "motor_imagery"),
            "--window",
            "2",
            "--stride",
            "1",
            "--notch",
            "60",
            "--event-map",
            "T1=left",
            "--event-map",
            "T2=right",
            "--classes",
            "left,right",
            "--workers",
            "2",
            *progress,
        ],
        timings,
    )
    # Mental arithmetic: 4-s windows; _1 = rest before the task, _2 = during the task.
    _run(
        "prepare arithmetic",
        [
            "prepare",
            *arith,
            "--out",
            str(data / "arithmetic"),
            "--window",
            "4",
            "--notch",
            "50",
            "--filename-rule",
            "_1$=rest",
            "--filename-rule",
            "_2$=arithmetic",
            "--classes",
            "rest,arithmetic",
            "--workers",
            "2",
            *progress,
        ],
        timings,
    )
    # Self-supervised steps also see the motor-imagery runs as continuous, unlabelled 4-s windows.
    _run(
        "prepare unlabelled",
        [
            "prepare",
            *[f"eegmmidb={files[n]}" for n in MI_FILES],
            "--out",
            str(data / "eegmmidb_continuous"),
            "--window",
            "4",
            "--notch",
            "60",
            "--no-annotations",
            "--workers",
            "2",
            *progress,
        ],
        timings,
    )
    unlabelled = [str(data / "eegmmidb_continuous"), str(data / "arithmetic")]
    labelled = [str(data / "motor_imagery"), str(data / "arithmetic")]
    # A quickstart runs the recipe afresh: a second one into the same --out replaces the runs.
    common = ["--seed", str(args.seed), "--overwrite", *progress]
    # The earlier quickstart's report goes before its runs do: one stopped from here on (or
    # failing) would leave it describing runs that are replaced or gone. Written anew at the end.
    for name in ("report.md", "pretraining_loss.png"):
        (out / name).unlink(missing_ok=True)
    _run(
        "tokenizer",
        [
            "tokenizer",
            "--data",
            *unlabelled,
            "--out",
            str(runs / "tokenizer"),
            "--model",
            "vqnsp_tiny",
            *common,
            *_sets(TOKENIZER, args.fast, args.seed),
        ],
        timings,
    )
    _run(
        "pretrain",
        [
            "pretrain",
            "--data",
            *unlabelled,
            "--out",
            str(runs / "pretrain"),
            "--model",
            "labram_tiny_pretrain",
            "--tokenizer",
            str(runs / "tokenizer"),
            "--objective",
            "masked",
            *common,
            *_sets(PRETRAIN, args.fast, args.seed),
        ],
        timings,
    )
    _run(
        "upcycle",
        [
            "upcycle",
            "--model",
            str(runs / "pretrain"),
            "--out",
            str(runs / "moe"),
            "--experts",
            str(args.experts),
            "--top-k",
            "2",
            "--tasks",
            "arithmetic,motor_imagery",
            "--overwrite",
        ],
        timings,
    )
    _run(
        "finetune",
        [
            "finetune",
            "--data",
            *labelled,
            "--init",
            str(runs / "moe"),
            "--out",
            str(runs / "finetune"),
            "--folds",
            str(args.folds),
            *common,
            *_sets(FINETUNE, args.fast, args.seed),
        ],
        timings,
    )
    total = time.perf_counter() - started
    report = write_report(out, runs, timings, total, ATTRIBUTION, fast=args.fast)
    print(f"\nquickstart finished in {total / 60:.1f} min.")
    print(f"  report:  {report}")
    print(f"  plots:   {runs / 'finetune'}/*.png, {out / 'pretraining_loss.png'}")
    print(f"  runs:    {runs} (config.yaml, metrics.csv, checkpoints/, tensorboard/ per run)")
    print(f"  TensorBoard: tensorboard --logdir {runs}")
    return 0


def write_report(
    out: Path, runs: Path, timings: dict[str, float], total: float, attribution: str, *, fast: bool
) -> Path:
    from eegfast.fileio import write_text_atomic
    from eegfast.models.registry import MODEL_CONFIGS
    from eegfast.train import plots
    from eegfast.train.finetune import (
        BEATS,
        DOES_NOT_BEAT,
        MIN_VERDICT_UNITS,
        NO_CLEAR_DIFFERENCE,
    )
    from eegfast.train.runlog import read_metrics

    tok = read_metrics(runs / "tokenizer" / "metrics.csv")
    pre = read_metrics(runs / "pretrain" / "metrics.csv")
    plots.loss_curves(
        {"tokenizer": tok.get("train/loss", []), "masked pretraining": pre.get("train/loss", [])},
        out / "pretraining_loss.png",
        "self-supervised training loss",
        separate=True,  # a reconstruction loss and a cross-entropy: not one scale
    )
    up = json.loads((runs / "moe" / "upcycle.json").read_text(encoding="utf-8"))
    summary = json.loads((runs / "finetune" / "summary.json").read_text(encoding="utf-8"))
    finetune_md = (runs / "finetune" / "report.md").read_text(encoding="utf-8").split("\n", 1)[1]
    finetune_md = finetune_md.replace("](", "](runs/finetune/")

    def last(series, tag):
        values = series.get(tag)
        return f"{values[-1][1]:.3f}" if values else "n/a"

    # The symmetric objective's loss is two cross-entropies summed: read alone, a final 7.8
    # looked worse than a uniform guess over the codes (ln 256 = 5.5).
    codes = MODEL_CONFIGS["labram_tiny_pretrain"].vocab_size
    loss_parts = ""
    if pre.get("train/loss_masked") and pre.get("train/loss_complement"):
        loss_parts = (
            f" (the cross-entropies on the masked patches, {last(pre, 'train/loss_masked')}, and "
            f"on the complementary ones, {last(pre, 'train/loss_complement')}, summed; "
            f"ln {codes} = {math.log(codes):.3f} each for a uniform guess over the {codes} codes)"
        )
    # the training steps' time as measured (the tokenizer, pretraining and fine-tuning)
    training = sum(timings.get(step, 0.0) for step in ("tokenizer", "pretrain", "finetune"))
    verdicts = {
        task: c["baseline_verdict"]
        for task, c in summary["comparisons"].items()
        if "baseline_verdict" in c
    }
    beats = [t for t, v in verdicts.items() if v == BEATS]
    loses = [t for t, v in verdicts.items() if v == DOES_NOT_BEAT]
    unclear = [t for t, v in verdicts.items() if v == NO_CLEAR_DIFFERENCE]
    parts = []
    if beats:
        parts.append(f"better than the band-power baseline on {', '.join(beats)}")
    if loses:
        parts.append(f"**worse** on {', '.join(loses)}")
    if unclear:
        parts.append(f"no clear difference on {', '.join(unclear)}")
    if not verdicts:
        verdict = "No task had a baseline to compare with."
    elif beats and not loses and not unclear:
        verdict = f"Better than the band-power baseline on every task ({', '.join(beats)})."
    elif not beats:
        verdict = "**We did not beat the classic baseline** on any task: " + "; ".join(parts) + "."
    else:
        verdict = "**Mixed**: " + "; ".join(parts) + "."
    numbers = "; ".join(
        f"{task}: {VARIANT_LABEL.get(c['model_variant'], c['model_variant'])} "
        f"{c['model']:.3f} vs baseline {c['baseline']:.3f}"
        for task, c in summary["comparisons"].items()
        if "baseline" in c
    )
    verdict += (
        f" Balanced accuracy, mean over folds: {numbers}. A task counts only where the 95% "
        "paired bootstrap interval of the difference excludes 0 (see the comparison below), "
        f"resampling whole recordings or subjects, of which a verdict needs {MIN_VERDICT_UNITS}: "
        "this sample has two per task, so it can show no clear win or loss."
    )
    lines = [
        "# eegfast quickstart report",
        "",
        (
            "**Smoke run (`--fast`): 2 optimiser steps per training; the numbers mean nothing.**\n"
            if fast
            else ""
        ),
        "Tiny models (`vqnsp_tiny`, `labram_tiny`: 2 transformer blocks, width 100) trained for "
        f"{training / 60:.1f} min on 6 recordings; they show the pipeline end to end, not "
        "LaBraM's accuracy.",
        "",
        "## Verdict",
        "",
        verdict + " With 2 folds and a few dozen test windows per fold, these estimates are "
        "coarse.",
        "",
        "## Data and evaluation design",
        "",
        "- motor imagery (eegmmidb S001 runs 4 and 8, imagined left vs right fist): 2-s windows "
        "with 1-s stride inside each T1/T2 event; **one subject only**, so folds are grouped by "
        "**recording** (train on one run, test on the other) — this measures across-run, not "
        "across-subject generalisation.",
        "- mental arithmetic (eegmat Subject00 and Subject01, rest before vs during serial "
        "subtraction): 4-s windows; folds grouped by **subject** (train on one subject, test on "
        "the other). Rest and task come from different files, so a classifier can partly use "
        "recording differences; classes are imbalanced (about 3:1), hence balanced accuracy and "
        "class-weighted losses.",
        "- the tokenizer and the masked pretraining see every recording **without labels** "
        "(including the test folds' recordings): self-supervised, but transductive.",
        "- every method (multi-task, single-task, baseline) uses the **same folds**.",
        "",
        "## Steps",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()],
        f"| **total** | **{total:.1f}** |",
        "",
        f"- tokenizer: final loss {last(tok, 'train/loss')}, batch codebook usage "
        f"{last(tok, 'train/codebook_usage')}, perplexity {last(tok, 'train/perplexity')}, "
        f"feature spread {last(tok, 'train/feature_spread')} (mean cosine distance of the "
        f"encoder's features; near 0 means encoder collapse), effective feature dimensions "
        f"{last(tok, 'train/feature_dims')} (near 1: collapse onto one line)",
        f"- masked pretraining: final loss {last(pre, 'train/loss')}{loss_parts}, accuracy on "
        f"masked patches {last(pre, 'train/accuracy_masked')} (1/{codes} = {1 / codes:.3f} for "
        "a uniform guess) ![pretraining loss](pretraining_loss.png)",
        f"- upcycle: {up['arch']['upcycle']['num_experts']} experts, top-"
        f"{up['arch']['upcycle']['top_k']}, router ids {up['task_names']}; parameters "
        f"{up['dense_parameters']:,} -> {up['moe_parameters']:,}; max |MoE - dense| on a probe "
        f"input {up['probe_max_abs_diff']:.1e}",
        "",
        # its own heading: without one, the fine-tuning report's design notes (initialisation,
        # fold grouping, transductive pretraining) read as more items of the steps' list above
        "## Fine-tuning: grouped cross-validation",
        finetune_md,
        "## Data licence",
        "",
        attribution,
        "",
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
