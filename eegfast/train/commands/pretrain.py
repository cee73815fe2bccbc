"""Run code of ``eegfast pretrain``: masked (or hybrid) EEG pretraining.

Its description (``eegfast pretrain --help``) and options are in
:mod:`eegfast.train.commands.options.pretrain`, read without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eegfast.nn.vq import code_perplexity
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model, load_trained
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
from eegfast.train.commands.options.pretrain import DEFAULTS, configure_parser  # noqa: F401
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
from eegfast.train.objectives import (
    StepContext,
    StepFn,
    TargetCache,
    get_objective,
)
from eegfast.train.validation import META_KEY as VALIDATION_META
from eegfast.train.validation import HoldOut, Validator, hold_out, objective_evaluator


def main(args: argparse.Namespace) -> int:
    return run_command("pretrain", lambda: _main(args))


# Targets whose code perplexity is below this are nearly one code: the tokenizer collapsed.
DEGENERATE_TARGET_PERPLEXITY = 2.0


def target_summary(counts: np.ndarray) -> str:
    """What the pretraining targets were: codes in use, their perplexity, and the share of the
    most common code, which is the accuracy of always predicting it (the floor to read the
    logged accuracies against). Warns when the targets are nearly one code."""
    total = int(counts.sum())
    if total == 0:
        return "targets: no codes cached"
    perplexity = float(code_perplexity(torch.from_numpy(counts)))
    text = (
        f"targets: {int((counts > 0).sum())} of {len(counts)} codes in use, perplexity "
        f"{perplexity:.1f}; the most common code is {counts.max() / total:.1%} of the patches (the "
        "accuracy of always predicting it)"
    )
    if perplexity < DEGENERATE_TARGET_PERPLEXITY:
        text += (
            "\nwarning: the targets are nearly one code, so high accuracies mean little: the "
            "tokenizer's encoder probably collapsed (see its train/feature_spread and "
            "train/feature_dims; retrain it with --set vq.beta=0)"
        )
    return text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_checkpoint(given: str | Path) -> tuple[Path, str | None]:
    """The tokenizer checkpoint that ``given`` names, and a note saying which one a run folder
    gave (None for a file or a checkpoint folder, which name themselves).

    A run folder (holding ``checkpoints/step-*``) gives its best checkpoint
    (:func:`eegfast.train.checkpoint.best_checkpoint`: the lowest ``val/loss``, when the run held
    data out), as ``finetune --init`` takes a pretraining run's best; its newest otherwise. A
    path that holds no checkpoint is returned as is (loading it says why)."""
    path = Path(given)
    if path.is_file() or (path / ckpt.WEIGHTS).is_file():
        return path, None
    for folder in (path / "checkpoints", path):
        found = ckpt.list_checkpoints(folder)
        if found:
            break
    else:
        return path, None
    newest = found[-1]
    best = ckpt.best_checkpoint(folder)
    if best is None:
        why = "its newest checkpoint (no held-out val/loss ranks them)"
        return newest.path, f"note: --tokenizer {given}: using {newest.path.name}, {why}"
    why = f"its checkpoint with the lowest val/loss ({best.meta['metric']:.6g})"
    if best.path != newest.path:
        why += f", not the newest {newest.path.name}"
    return best.path, f"note: --tokenizer {given}: using {best.path.name}, {why}"


def tokenizer_record(path: str | Path) -> dict[str, str]:
    """The tokenizer checkpoint ``path`` resolves to (a run folder: see
    :func:`tokenizer_checkpoint`): absolute folder, the weights file's name in it
    (``model.safetensors``, or a reference file's own name, e.g. ``vqnsp.pth``) and its
    sha256, kept in the pretraining checkpoints' meta."""
    weights = ckpt.resolve_weights_path(tokenizer_checkpoint(path)[0]).resolve()
    return {"checkpoint": str(weights.parent), "file": weights.name, "sha256": _sha256(weights)}


def tokenizer_for_run(given: str, recorded: dict[str, str] | None) -> tuple[str, list[str]]:
    """The tokenizer checkpoint to load, and notes to print. A new run (``recorded`` None)
    takes the checkpoint ``given`` resolves to (:func:`tokenizer_checkpoint`: a run folder's
    best, or newest); a resumed one the very checkpoint it started with (same weights, by
    sha256), found where it was recorded or under ``given``, and refuses to go on with other
    targets."""
    if not given:
        raise CommandError("pretraining needs a tokenizer: --tokenizer RUN (or model.tokenizer)")
    chosen_path, note = tokenizer_checkpoint(given)
    if not recorded:
        return str(chosen_path), [note] if note else []
    started = Path(recorded["checkpoint"])
    name = recorded.get("file", ckpt.WEIGHTS)  # (records before the name was kept: a run's)
    try:
        chosen = ckpt.resolve_weights_path(chosen_path).parent.resolve()
    except FileNotFoundError:
        chosen = None
    candidates = [started, Path(given) / "checkpoints" / started.name, Path(given) / started.name]
    if chosen is not None:
        candidates.append(chosen)
    if Path(given).is_file():  # a checkpoint file without a run around it (vqnsp.pth)
        candidates.insert(0, Path(given).parent)
    for candidate in candidates:
        weights = candidate / name
        if weights.is_file() and _sha256(weights) == recorded["sha256"]:
            notes = []
            if chosen is not None and chosen != candidate.resolve():
                notes.append(
                    f"note: --tokenizer {given}: using {candidate}, the tokenizer checkpoint "
                    f"this run started with, not {chosen}"
                )
            return str(candidate if name == ckpt.WEIGHTS else weights), notes
    raise CommandError(
        f"--tokenizer {given}: this run was pretrained with the tokenizer checkpoint {started} "
        f"(sha256 {recorded['sha256'][:12]}), which is gone or changed; pass that tokenizer to "
        "continue, or start a new run (--overwrite or another --out)"
    )


def recorded_tokenizer(resumed: dict[str, Any]) -> str:
    """The tokenizer a resumed pretraining run (its checkpoint's meta, ``resumed``) started
    with: as its config named it (a run folder) where that path is still there, else the
    checkpoint it recorded (the weights file itself for a file such as ``vqnsp.pth``). A
    checkpoint without a record (an eegfast from before 2026-12-06): the tokenizer its config
    named, "" if none."""
    record = resumed.get("tokenizer")
    named = ((resumed.get("config") or {}).get("model") or {}).get("tokenizer") or ""
    if not record:
        return str(named)
    if named and Path(named).exists():
        return str(named)
    checkpoint = Path(record["checkpoint"])
    name = record.get("file", ckpt.WEIGHTS)
    return str(checkpoint if name == ckpt.WEIGHTS else checkpoint / name)


def load_tokenizer(path: str, device: torch.device) -> torch.nn.Module:
    """The frozen tokenizer of a ``eegfast tokenizer`` run (the checkpoint
    :func:`tokenizer_checkpoint` picks), or of a tokenizer checkpoint file without an eegfast
    record (the reference's ``vqnsp.pth``: its model, codebook size included, read from the
    tensor shapes), in eval mode."""
    if not path:
        raise CommandError("pretraining needs a tokenizer: --tokenizer RUN (or model.tokenizer)")
    tokenizer, meta = load_trained(tokenizer_checkpoint(path)[0], prefer="latest")
    if meta["arch"].get("kind") != "tokenizer":
        found = f" ({meta['arch'].get('name')})" if meta.get("command") == "reference" else ""
        raise CommandError(
            f"--tokenizer {path}: this is a {meta['arch'].get('kind')} checkpoint{found}, not "
            "a VQ-NSP tokenizer"
        )
    tokenizer.requires_grad_(False)
    return tokenizer.to(device).eval()


def tokenizer_meta(path: str) -> dict[str, Any]:
    """meta.json of the tokenizer checkpoint ``path`` names ({} for a file without one, such
    as the reference's vqnsp.pth)."""
    return ckpt.read_meta(tokenizer_checkpoint(path)[0], prefer="latest")


def beyond_tokenizer(tokenizer_meta: dict[str, Any], data: TrainData) -> list[str]:
    """Warnings for data that go beyond what the tokenizer was trained on (its meta's
    ``trained_on``, written by `eegfast tokenizer`; nothing to say without it): electrodes
    and window lengths whose spatial or temporal embedding rows it never trained, so that
    its codes for those patches, the pretraining targets, come from initial values."""
    from eegfast.electrodes import LABRAM_CHANNEL_NAMES

    seen = tokenizer_meta.get("trained_on")
    if not seen:
        return []
    warnings = []
    mine = embedding_coverage(data)  # what these data would train, in the tokenizer's terms
    known = {int(r) for r in seen.get("electrode_rows") or ()}
    unseen = sorted(set(mine["electrode_rows"]) - known)
    if unseen:
        names = [
            LABRAM_CHANNEL_NAMES[r - 1] if 0 < r <= len(LABRAM_CHANNEL_NAMES) else f"row {r}"
            for r in unseen
        ]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.append(
            f"the data have {len(unseen)} electrode(s) the tokenizer was not trained on "
            f"({shown}): its codes for their patches (the targets) come from spatial "
            "embeddings still at their initial values; train the tokenizer on these "
            "electrodes too"
        )
    longest = mine["window_seconds"]
    trained = int(seen.get("window_seconds") or 0)
    if trained and longest > trained:
        warnings.append(
            f"the data have {longest}-s windows and the tokenizer was trained on windows of "
            f"at most {trained} s: its codes for patches after second {trained} (the targets) "
            "come from temporal embeddings still at their initial values"
        )
    return warnings


# Modules the reference layout keeps (so its checkpoints load strictly) but the masked
# objective never uses: the wrapper's projection head and the student's own lm_head (the
# wrapper predicts with its lm_head). Frozen, so that DDP needs no unused-parameter search.
UNUSED_IN_PRETRAINING = ("projection_head", "student.lm_head")


def freeze_unused_heads(model: torch.nn.Module) -> list[str]:
    frozen = []
    for name, module in model.named_modules():
        if name in UNUSED_IN_PRETRAINING:
            module.requires_grad_(False)
            frozen.append(name)
    return frozen


# Heads that a model.init checkpoint may lack, or hold while the model does not: the hybrid
# model's forecasting head (a masked run may start a hybrid one, and the reverse).
OPTIONAL_INIT_PREFIXES = ("forecast_head.",)
# The heads over the tokenizer's codebook: left at their initialisation when the init's
# codebook size differs from the tokenizer's (the hybrid forecasting head's token logits and
# its embedding of the given codes are sized by the codebook too; its signal part is not).
VOCAB_HEADS = (
    "lm_head.",
    "student.lm_head.",
    "forecast_head.token.",
    "forecast_head.code_embed.",
)


def load_init(model: torch.nn.Module, path: str) -> tuple[list[str], dict[str, Any]]:
    """Start pretraining from the weights at ``path`` (``model.init``): an eegfast pretraining
    run (masked or hybrid; its best checkpoint, as ``eegfast finetune --set model.init`` takes
    it), a checkpoint folder, or a checkpoint file of the reference pretraining model
    (``student.*``, ``lm_head.*``, ...; wrappers and ``module.`` prefixes removed).

    Every backbone tensor must match the model (a mismatch is an error that lists the keys).
    The forecasting head loads where both sides have it, and ``lm_head`` (and the forecasting
    head's parts over the codes) starts afresh (with a note) when the init predicts another
    number of codes than the tokenizer has.
    Returns (notes to print, the init checkpoint's meta: that of the checkpoint folder a
    ``model.safetensors`` file is in; {} for a file without one).
    """
    from eegfast.models.checkpoint import CheckpointMismatchError, load_checkpoint, unwrap_model

    given = Path(path)
    try:
        if given.is_file():
            from eegfast.models.checkpoint import read_state_dict

            state = read_state_dict(given)
            # a checkpoint's own weights file: its meta.json beside it says what the init saw
            meta = ckpt.checkpoint_meta(given.parent) if given.name == ckpt.WEIGHTS else {}
        else:
            weights = ckpt.resolve_weights_path(given)
            state, meta = ckpt.load_weights(weights), ckpt.checkpoint_meta(weights.parent)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"model.init {path}: {err}") from None
    if not any(key.startswith("student.") for key in state):
        raise CommandError(
            f"model.init {path}: not a pretraining checkpoint (no 'student.' keys); eegfast "
            "pretrain continues from a pretraining run or the reference pretraining checkpoint"
        )
    own = unwrap_model(model).state_dict()
    exclude = [
        prefix
        for prefix in OPTIONAL_INIT_PREFIXES
        if not (any(k.startswith(prefix) for k in state) and any(k.startswith(prefix) for k in own))
    ]
    notes = []
    got, wanted = state.get("lm_head.weight"), own.get("lm_head.weight")
    if got is not None and wanted is not None and got.shape[0] != wanted.shape[0]:
        afresh = "lm_head starts"
        if "forecast_head." not in exclude:  # both sides have one
            afresh = "lm_head and the forecasting head's token parts start"
        exclude += VOCAB_HEADS
        notes.append(
            f"note: model.init {path} predicts {got.shape[0]} codes and the tokenizer has "
            f"{wanted.shape[0]}: {afresh} afresh"
        )
    try:
        report = load_checkpoint(model, state, strict=True, exclude=exclude)
    except CheckpointMismatchError as err:
        raise CommandError(f"model.init {path}: {err}") from None
    notes.insert(0, f"initialised from {path} ({len(report.loaded)} tensors)")
    return notes, meta


def _main(args: argparse.Namespace) -> int:
    extra = {}
    if args.objective:
        extra["pretrain.objective"] = args.objective
    if args.tokenizer:
        extra["model.tokenizer"] = args.tokenizer
    if args.model:
        extra["model.name"] = args.model
    config = resolve(args, DEFAULTS, extra)
    step = get_objective(config.pretrain.objective)
    if not config.model.name.endswith("_pretrain"):
        from eegfast.models.registry import list_models

        names = ", ".join(n for n in list_models() if n.endswith("_pretrain"))
        raise CommandError(
            f"--model {config.model.name} is not a pretraining model; use one of {names}"
        )
    kind = "hybrid" if config.pretrain.objective == "hybrid" else "pretrain"
    with run_folder(args, expected={kind}) as resume:
        resumed = ckpt.resumed_meta(resume, args.out)
        config = model_for_resume(config, DEFAULTS, resumed, named=args.model is not None)
        own = ""
        if not config.model.tokenizer and resumed:
            # --resume auto without --tokenizer continues against the run's own tokenizer (as
            # without --model, its own model); tokenizer_for_run checks its sha256
            own = recorded_tokenizer(resumed)
            config = config.with_overrides({"model.tokenizer": own})
        tokenizer_path, notes = tokenizer_for_run(config.model.tokenizer, resumed.get("tokenizer"))
        if own:
            notes.insert(0, f"note: no --tokenizer given: using {own}, this run's own tokenizer")
        if resumed and not resumed.get("tokenizer"):
            # Its checkpoints name no tokenizer checkpoint (no sha256 to find it by): a run
            # folder given stands for its best or newest one now, which may be another.
            notes.append(
                "warning: the checkpoint being resumed (an eegfast from before 2026-12-06) "
                "does not record which tokenizer checkpoint it was pretrained with: using "
                f"{tokenizer_path}; if the tokenizer trained on after this run started, its "
                "targets are not the ones it learnt so far (pass the checkpoint it started "
                "with as --tokenizer)"
            )
        return _train(args, config, step, kind, resume, tokenizer_path, notes, resumed)


def _validator(
    config: RunConfig,
    runtime: Runtime,
    data: TrainData,
    split: HoldOut,
    step: StepFn,
    ctx: StepContext,
    vocab: int | None,
) -> Validator:
    """The checkpoints' evaluation of the objective on the held-out windows (their own target
    cache, when the run caches targets: the training cache's keys are training positions), with
    the masks of the split's seed (a resumed run's first seed, whatever train.seed is now)."""
    cache = None
    if ctx.target_cache is not None:
        cache = TargetCache(vocab, max_bytes=ctx.target_cache.max_bytes)
    world = runtime.dist.world_size
    return Validator(
        data,
        split.val,
        objective_evaluator(step, dataclasses.replace(ctx, seed=split.seed), cache=cache),
        device=runtime.device,
        dist_info=runtime.dist,
        # a rank's training micro-batch: fits in memory, without the gradients' share even
        batch_size=max(1, config.train.batch_size // (world * config.train.grad_accum)),
        precision=config.train.precision,
    )


def _report_validation(runtime: Runtime, validator: Validator):
    """on_checkpoint: one line per evaluation (rank 0, after the checkpoint is written)."""

    def report(path: Path) -> None:
        say(runtime, f"{path.name}: {validator.summary()}")

    return report


def _train(args, config, step, kind, resume, tokenizer_path, notes, resumed=None) -> int:
    resumed = resumed or {}
    # model.init starts a new run; a resumed one continues from its own checkpoint
    init = "" if resumed else config.model.init
    runtime = start(config)
    try:
        for note in notes:
            say(runtime, note)
        data = load_data(config.data.roots, config.data.tasks)
        split = hold_out(data, config.data.val_fraction, config.train.seed, resumed=resumed)
        tokenizer = load_tokenizer(tokenizer_path, runtime.device)
        for warning in beyond_tokenizer(tokenizer_meta(tokenizer_path), data):
            say(runtime, f"warning: {warning}")
        # The model config records what the run trains with (the step draws the masks at
        # pretrain.mask_ratio); model.drop_path is stochastic depth in the student's blocks.
        kwargs: dict[str, Any] = {
            "mask_ratio": config.pretrain.mask_ratio,
            "drop_path_rate": config.model.drop_path,
        }
        vocab = getattr(getattr(tokenizer, "config", None), "num_codes", None)
        if vocab is not None:
            kwargs["vocab_size"] = int(vocab)
        if kind == "hybrid":
            weight = config.pretrain.hybrid_mask_weight
            if not 0.0 <= weight <= 1.0:
                raise CommandError(f"pretrain.hybrid_mask_weight must be in [0, 1], got {weight}")
            kwargs["hybrid"] = {"mask_weight": weight}
            # Its forecast predicts each patch from the ones before it: 1-s windows (one
            # patch) failed at the first batch holding them, which with other folders of
            # longer windows could be steps (and checkpoints) into the run.
            short = sorted({str(data.roots[i.root]) for i in data.items if i.window_seconds < 2})
            if short:
                raise CommandError(
                    f"--data {short[0]}: 1-s windows (one patch), and --objective hybrid "
                    "forecasts each patch from the ones before it: prepare the data again "
                    "with --window 2 or more, or pretrain with --objective masked"
                )
        arch = {"kind": kind, "name": config.model.name, "kwargs": kwargs}
        model = build_model(arch)
        check_table_rows(data, table_rows(model), config.model.name)
        # the tokenizer codes the same electrodes' patches (the targets)
        check_table_rows(data, table_rows(tokenizer), f"the tokenizer {tokenizer_path}")
        init_meta: dict[str, Any] = {}
        if init:
            init_notes, init_meta = load_init(model, init)
            for note in init_notes:
                say(runtime, note)
        freeze_unused_heads(model)
        say(
            runtime,
            f"pretrain ({config.pretrain.objective}) {config.model.name}: {len(data)} windows",
        )
        # the held-out windows stay out of fit(): its dataset is the training windows only
        train = data if split is None else data.subset(split.train)
        if split is not None:
            say(runtime, split.describe(len({item.recording for item in data.items})))
        # the EEG that the init run, or this run before a resume, saw
        earlier = [resumed.get("pretrained_on") or {}, init_meta.get("pretrained_on") or {}]
        # An init pretrained before eegfast recorded it (or a run continued from one, which
        # records null, resumed): this run's own EEG alone would read as all the backbone saw,
        # and finetune's report as a backbone that never saw the others. Recorded as not known.
        # (A resumed checkpoint of that age without the key saw this run's data: it is kept.)
        from eegfast.train.finetune import pretraining_unrecorded

        unrecorded = pretraining_unrecorded(init_meta) or (
            "pretrained_on" in resumed and resumed["pretrained_on"] is None
        )
        if unrecorded and init:
            say(
                runtime,
                f"note: model.init {init} does not record which subjects and recordings it was "
                "pretrained on (by an eegfast from before 2026-12-06, or from such a "
                "checkpoint): neither does this run (pretrained_on: null), and finetune's "
                "report says that its overlap with the tested subjects cannot be checked",
            )
        seen = {
            key: {name for e in earlier for name in e.get(key, ())}
            for key in ("subjects", "recordings")
        }
        cache = None
        if config.pretrain.cache_targets:
            limit_mb = config.pretrain.cache_targets_max_mb
            if not limit_mb >= 0:
                raise CommandError(f"pretrain.cache_targets_max_mb must be >= 0, got {limit_mb}")
            limit = None if math.isinf(limit_mb) else int(limit_mb * 2**20)  # inf: no limit
            cache = TargetCache(vocab, max_bytes=limit)
        ctx = StepContext(
            runtime.device,
            seed=config.train.seed,
            tokenizer=tokenizer,
            target_cache=cache,
            mask_ratio=config.pretrain.mask_ratio,
        )
        validator = None
        if split is not None:
            validator = _validator(config, runtime, data, split, step, ctx, vocab)
            init_seen = set((init_meta.get("pretrained_on") or {}).get("recordings") or ())
            if init_seen & {Path(r).name for r in split.recordings}:
                say(
                    runtime,
                    f"note: model.init {init} was pretrained on some of the held-out recordings; "
                    "their validation loss is not that of unseen EEG",
                )
        result = fit(
            model,
            step,
            train.dataset,
            config,
            args.out,
            group_keys=train.group_keys,
            collate_fn=collate_fn(),
            ctx=ctx,
            dist_info=runtime.dist,
            resume=resume,
            eval_fn=validator,
            on_checkpoint=None if validator is None else _report_validation(runtime, validator),
            meta={
                "arch": arch,
                "command": "pretrain",
                "objective": config.pretrain.objective,
                "tokenizer": tokenizer_record(tokenizer_path),
                # which subjects' and recordings' EEG the backbone saw: finetune's report says
                # when it tests on them (transductive pretraining). File names only (finetune
                # matches recordings by name): ~15 bytes a recording in every checkpoint's meta.
                # The held-out recordings were not trained on, so they are not listed.
                "pretrained_on": None
                if unrecorded
                else {
                    "subjects": sorted({item.subject for item in train.items} | seen["subjects"]),
                    "recordings": sorted(
                        {Path(item.recording).name for item in train.items} | seen["recordings"]
                    ),
                },
                # its electrode rows and window length: generate keeps its context within
                # the trained time rows
                "trained_on": embedding_coverage(train, resumed.get("trained_on")),
                **({VALIDATION_META: split.record()} if split is not None else {}),
                **({"init": init or resumed["init"]} if init or "init" in resumed else {}),
            },
            find_unused_parameters=kind != "pretrain",
        )
        if result.resumed_from is not None:
            say(runtime, f"resumed from {result.resumed_from}")
        say(runtime, finished_message(result, "pretrained"))
        if cache is not None and cache.hits + cache.misses:
            say(
                runtime,
                f"tokenizer codes: {cache.hits} of {cache.hits + cache.misses} batches from the "
                f"cache ({len(cache)} windows, {cache.held_bytes / 2**20:.1f} MiB"
                + (f"; full, {cache.left_out} rows left out" if cache.left_out else "")
                + ")",
            )
            summary = target_summary(cache.code_counts())
            if runtime.dist.enabled:  # each process caches the windows it trained on
                summary = summary.replace("targets:", "targets (rank 0's windows):", 1)
            say(runtime, summary)
        return 0
    finally:
        shutdown(runtime.dist)
