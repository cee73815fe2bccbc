"""The training loop shared by every command.

``fit`` runs any step function (see :mod:`eegfast.train.objectives`) with: AdamW and a cosine
schedule with warm-up, gradient accumulation and clipping, mixed precision (bf16 autocast, or
fp16 with a GradScaler), activation checkpointing and ``torch.compile`` flags, DDP/FSDP2 under
torchrun, atomic checkpoints with retention and exact resume (every ``train.checkpoint_every``
optimiser steps, or at each epoch's end when it is 0, and at the last step; each validated by
``eval_fn``), CSV/TensorBoard logging and a tqdm bar on rank 0 (redrawn once a minute
when stderr is not a terminal: a log file under Slurm or CI). ``train/samples_per_s`` is the
training throughput since the start of ``fit``, validation and checkpoint writing left out.
A non-finite loss stops the run with :class:`NonFiniteLossError` before anything is saved, so
the last checkpoint on disk is the last good one.

The host never waits for the device between log points: each step's loss, gradient norm and
metrics stay where they were computed, and are read back together, in one transfer, every
``train.log_every`` steps and before each checkpoint, where a non-finite loss is reported
(naming the step it appeared at), so no checkpoint is written after it. A non-finite flag of
each step also goes to the host by an asynchronous copy, looked at once it has arrived: a
non-finite loss stops a single-process run within a step or two, not at the next log point
(under torchrun, at the read-back points, where the ranks agree). Batches come from pinned
memory by asynchronous copies on a GPU. A dataset of prepared folders (a ``ShardDataset``,
``Subset`` s and ``ConcatDataset`` s of them) with ``collate_padded`` is read a whole batch at a
time (``eegfast.train.data.ShardBatches``): the same batches, a few times faster than item by
item.

With fp16 the GradScaler skips a step whose gradients are not finite and halves the loss scale;
``MAX_SKIPPED_STEPS`` skipped in a row (seen at the read-back points, from the gradient norms
read there anyway) stop the run with :class:`NonFiniteLossError` too, since its weights no
longer change.

A run resumed from a checkpoint older than the newest in its folder continues from there: the
newer checkpoints (of the run it abandons) are moved to ``checkpoints/abandoned-after-step-S``
with a warning, as its logs after that step are dropped (see :mod:`eegfast.train.runlog`).

A resume with other settings (each named in a warning) trains to ``train.max_steps``, or else
the epochs left of ``train.epochs`` (counted in the new batches an epoch, after another
``train.batch_size`` or into more or fewer training windows); the warm-up keeps its length in
steps unless ``optim.warmup_*`` changes, and the cosine spans the new length. A checkpoint in
the middle of an epoch continues it exactly after another ``train.grad_accum``, number of
processes or ``data.num_workers``; after another ``train.batch_size`` or ``train.seed``, or
other training windows, the epoch's batches are cut otherwise and it goes on after the same
share of them, with a warning (some windows twice in that epoch, others not at all).
Each checkpoint records its prepared folders' ``index.json`` digests: a resume after one was
prepared again (other settings or recordings, as many windows or not) warns, naming it. The
first log point after a resume with another ``train.log_every`` averages the steps since the
new schedule's last log point (those after the checkpoint's last one, where that was later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from eegfast.fileio import write_text_atomic
from eegfast.progress import progress_bar
from eegfast.train import checkpoint as ckpt
from eegfast.train.config import OptimConfig, RunConfig, config_to_dict, config_to_yaml
from eegfast.train.data import passthrough, shard_batches
from eegfast.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    min_across_ranks,
    no_gradient_sync,
    wrap_model,
)
from eegfast.train.objectives import HostCopies, StepContext, StepFn, to_device_async
from eegfast.train.optim import build_optimizer, build_scheduler, warmup_length
from eegfast.train.runlog import RunLogger
from eegfast.train.sampler import EpochBatchSampler

# fp16: optimiser steps the GradScaler may skip in a row (non-finite gradients, each halving the
# loss scale: 2**16 -> 2**-4 after 20) before the run stops; a healthy start needs a few at most.
MAX_SKIPPED_STEPS = 20


@dataclass
class _StepScalars:
    """An optimiser step's scalars, still where they were computed."""

    step: int  # 1-based number of the optimiser step
    epoch: int
    loss: torch.Tensor  # mean over the step's micro-batches
    grad_norm: torch.Tensor
    metrics: dict[str, list[float | torch.Tensor]]  # one value per micro-batch


def _with_step_normalisers(
    batches: Iterable[dict[str, Any]],
    accum: int,
    normaliser_of: Callable[[dict[str, Any], StepContext], torch.Tensor] | None,
    ctx: StepContext,
    info: DistInfo,
) -> Iterator[tuple[dict[str, Any], torch.Tensor | None]]:
    """Each host batch of ``batches`` with its optimiser step's normaliser (None for every
    batch when the step function has no ``normaliser`` hook, which keeps its run as it was).

    The ``accum`` micro-batches of a step are fetched before the first one runs, and the hook's
    host totals of each summed, then over the ranks (one all-reduce a step, on the device: no
    wait for it) and divided by ``accum`` x world size: one micro-batch of one rank's share,
    which the engine's 1/accum loss scaling and the ranks' gradient average (and the logged
    means) bring back to the whole step's. Without it a class-weighted loss was normalised by
    each micro-batch's own weight sum, and grad_accum > 1 trained other weights than 1."""
    iterator = iter(batches)
    if normaliser_of is None:
        for batch in iterator:
            yield batch, None
        return
    while True:
        group = [batch for _, batch in zip(range(accum), iterator, strict=False)]
        if not group:
            return
        total = torch.stack([normaliser_of(batch, ctx) for batch in group]).sum(0)
        total = all_reduce_mean(to_device_async(total, ctx.device), info)
        share = (total / accum).float()
        for batch in group:
            yield batch, share


def _read_back(values: list[float | torch.Tensor]) -> list[float]:
    """Floats of ``values``: the tensors' in one transfer per device."""
    out = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        elif isinstance(v, (int, float)):
            out[i] = float(v)
        else:
            raise TypeError(f"a step metric must be a float or a 0-d tensor, got {type(v)}")
    for positions in by_device.values():
        stacked = torch.stack([values[i].detach().float().reshape(()) for i in positions])
        for i, value in zip(positions, stacked.tolist(), strict=True):
            out[i] = value
    return out


class _NonFiniteWatch:
    """Spots a non-finite loss within a step or two of it, without the host waiting for the
    device: each value's flag comes to the host by an asynchronous copy and is looked at once
    it has arrived (on CPU at once). What it spots, the full read-back then reports."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._flags = HostCopies()

    def push(self, value: torch.Tensor) -> None:
        if self.enabled:
            self._flags.add((~torch.isfinite(value.detach())).reshape(1).to(torch.uint8))

    def seen(self) -> bool:
        """Whether a flag that has arrived is set (the others are kept for later)."""
        flags = [bool(flag.numpy()[0]) for _, flag in self._flags.arrived()]  # host memory
        return any(flags)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run was stopped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`: where it stopped (``step``, optimiser steps done) and the run
    folder, so a command can say where the last checkpoint is. A KeyboardInterrupt, so code
    that catches that still does."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.run_dir = step, run_dir


@dataclass
class FitResult:
    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimiser step
    checkpoint: Path | None = None  # the last checkpoint written
    run_dir: Path | None = None
    resumed_from: Path | None = None  # the checkpoint this run continued from


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _seed_rank_streams(seed: int, rank: int) -> None:
    """Seed this rank's global generators (Python, NumPy, torch) apart from the other ranks'.

    Every rank seeded them alike with ``train.seed`` before building the model, so that
    the ranks build the same weights (FSDP does not broadcast them). Left alike, every rank
    then drew the same stochastic-depth and dropout decisions for its own windows, window j
    of each rank's share dropped together: regularisation world-size times weaker than the
    run asked for. Called on a fresh run once the model is built (a resume restores each
    rank's saved streams, and calls it for a rank the checkpoint holds none for: one saved by
    fewer processes); rank 0 keeps its stream, so one process is unchanged."""
    seed_everything((seed * 1_000_003 + rank * 7_919) % 2**63)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that compute in it (compute capability 8.0 on, or ROCm), fp16
    (with the GradScaler's loss scaling) on older ones, fp32 on CPU."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        # A V100 or T4 (sm_70, sm_75) has no bf16 arithmetic: bf16 runs emulated there,
        # slowly, where it runs at all (Triton supports sm_80 on); fp16 uses its tensor cores.
        native = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float16
    if precision not in table:
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    # fp16 on CPU runs (autocast + GradScaler work there) but is slow: it is for checking the
    # loss-scaling path without a GPU; bf16 or fp32 are the CPU choices for real work.
    return table[precision]


def check_compile_support(device: torch.device) -> None:
    """ValueError naming ``train.compile`` when ``torch.compile`` cannot build code for
    ``device``: no TorchDynamo for this Python, no C++ compiler (inductor's CPU code), or no
    Triton or C compiler (its CUDA kernels and their launchers). Without this the run would
    start, then fail inside its first step with an InductorError."""
    import shutil

    def refuse(why: str) -> ValueError:
        return ValueError(f"train.compile=true: {why}; install it, or set train.compile=false")

    dynamo = getattr(torch, "_dynamo", None)
    supported = getattr(dynamo, "is_dynamo_supported", None)
    if supported is not None and not supported():
        raise ValueError(
            "train.compile=true: torch.compile is not supported by this Python/PyTorch "
            f"(Python {sys.version.split()[0]}, torch {torch.__version__}); set "
            "train.compile=false"
        )
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            from torch._inductor.exc import InvalidCxxCompiler
        except ImportError:  # another PyTorch layout: leave it to torch.compile
            return
        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            raise refuse(
                "torch.compile's CPU code needs a C++ compiler and none was found (g++, or the "
                "one named by CXX)"
            ) from None
    elif device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # another PyTorch layout: leave it to torch.compile
            return
        if not has_triton():
            raise refuse("torch.compile's CUDA kernels need Triton (pip install triton)")
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise refuse(
                "Triton builds its kernel launchers with a C compiler and none was found "
                "(gcc or clang, or the one named by CC)"
            )


def _allow_a_graph_per_group(groups: int) -> Callable[[], None]:
    """Raise dynamo's recompile limit (8 graphs per function) to cover ``groups`` batch groups
    while a compiled model trains; returns what restores it.

    Electrode sets and window lengths share a graph (dims made dynamic at their first change),
    but each task of a multi-task model is a graph of its own (its head is picked by name), so
    9 tasks hit the limit and the 9th trained in eager mode, with no word but torch's log line;
    and once more in eval mode (the training flag is guarded), for validation at checkpoints
    and the predictions after training.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    # first graph, dims made dynamic, size-1 dims, then one a group at most in each mode
    setattr(config, name, max(before, 8 + 2 * groups))
    return lambda: setattr(config, name, before)


def _compiled_training_settings(groups: int, checkpointing: bool) -> Callable[[], None]:
    """Dynamo's settings while :func:`fit` trains a compiled model; returns what restores them.

    The recompile limit covers ``groups`` batch groups (:func:`_allow_a_graph_per_group`).
    With activation checkpointing (``checkpointing``), side effects in a checkpointed forward
    are traced (``skip_fwd_side_effects_in_bwd_under_checkpoint``): a LaBraM block returns its
    MoE layer's aux values from the checkpointed region (``checkpoint_block``), but a block
    with hooks, as FSDP2's ``fully_shard`` gives each block, keeps its plain output and its MoE
    layer stores them inside the region (``MoEFFN.last_aux``), which dynamo's checkpoint
    operator refused: a graph break in every block at every step under train.strategy=fsdp.
    (Eager checkpointing writes them again when the backward recomputes the block, the same
    values; compiled, once, in the forward.)
    """
    settings = contextlib.ExitStack()
    settings.callback(_allow_a_graph_per_group(groups))
    config = torch._dynamo.config
    name = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    if checkpointing and hasattr(config, name):  # (a PyTorch without the setting: not set)
        settings.enter_context(config.patch({name: True}))
    return settings.close


@contextlib.contextmanager
def recompile_allowance(groups: int) -> Iterator[None]:
    """Inside, dynamo's recompile limit covers ``groups`` batch groups as during :func:`fit`:
    for running a model that fit compiled after it returns (the limit is back to torch's 8
    then, and each task's eval-mode graph past it would run eager)."""
    restore = _allow_a_graph_per_group(groups)
    try:
        yield
    finally:
        restore()


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block in the backward pass; returns how many were wrapped.

    Models with ``set_grad_checkpointing`` (eegfast's LaBraM family) do it themselves;
    otherwise each ``blocks[i].forward`` is replaced on the instance, so state-dict keys do not
    change, by ``functools.partial(_checkpointed_forward, block)``: a copy of the model
    (``copy.deepcopy`` for an EMA or ``AveragedModel``) binds it to its own block, and so does
    ``torch.save(model)`` then ``torch.load`` (a partial pickles its function and block; a
    bound method pickled as the name ``forward``, reloaded as the class's plain forward: the
    reloaded model trained without checkpointing).
    """
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return len(getattr(model, "blocks", [])) or 1

    count = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(module, nn.ModuleList):
            for block in module:
                block.forward = functools.partial(_checkpointed_forward, block)
                count += 1
    return count


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's own class ``forward``, recomputed in the backward pass. (A closure over the
    block's bound forward, as before, made a copy of the model run the original's blocks,
    with the original's weights, and could not be pickled.)

    An eegfast :class:`~eegfast.nn.Block` with an MoE FFN returns the layer's aux values
    from the checkpointed region and ``last_aux`` is set here, outside it, as
    :func:`eegfast.models.labram.checkpoint_block` does: the layer's own write inside the
    region was a graph break per block at every step under torch.compile, unless dynamo's
    ``skip_fwd_side_effects_in_bwd_under_checkpoint`` was set (as only :func:`fit` does).
    The block's hooks run outside the region (this is its ``forward``), so it may.
    """
    from torch.utils.checkpoint import checkpoint

    from eegfast.nn import Block, MoEAux, MoEFFN

    forward = type(self).forward
    mlp = getattr(self, "mlp", None)
    # (a subclass's own forward may not return aux; a caller's return_aux=True gets its pair)
    if forward is Block.forward and isinstance(mlp, MoEFFN) and not kwargs.get("return_aux"):
        # (a caller's return_aux=False too: the region passes return_aux=True itself, and
        # the keyword twice was a TypeError)
        kwargs.pop("return_aux", None)
        x, *aux = checkpoint(_block_and_moe_aux, self, *args, use_reentrant=False, **kwargs)
        if aux:  # (none from a hooked MoE layer, which stored its own)
            mlp.last_aux = MoEAux(*aux)
        return x
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def _block_and_moe_aux(block: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """The checkpointed region of an eegfast Block with an MoE FFN: (x, *MoEAux fields), x
    (B, N, dim), writing nothing on the modules (tensors only, as dynamo's checkpoint operator
    returns them). The class's forward, not ``block(...)``: that is the wrapper again."""
    from eegfast.nn import Block

    x, aux = Block.forward(block, *args, return_aux=True, **kwargs)
    if aux is None:
        return (x,)
    return (x, *(getattr(aux, f.name) for f in dataclasses.fields(aux)))


class IndexedDataset(Dataset):
    """Adds the item's dataset index (used for per-sample deterministic masks)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "index": index}


class _IndexedCollate:
    """``collate_fn`` of the items without their ``"index"``, plus ``index`` (B,) long.

    A class, not a closure: with ``data.num_workers`` > 0 the DataLoader sends its collate
    function to the workers, pickled under spawn (macOS, Windows) and forkserver (Python 3.14's
    Linux default), and a local function cannot be pickled ("Can't pickle local object")."""

    def __init__(self, collate_fn: Callable[[list[dict]], dict]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[dict]) -> dict:
        indices = torch.tensor([item["index"] for item in items], dtype=torch.long)
        batch = self.collate_fn([{k: v for k, v in item.items() if k != "index"} for item in items])
        batch["index"] = indices
        return batch


def indexed_collate(collate_fn: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """The collate function of ``IndexedDataset`` items: ``collate_fn``'s batch plus ``index``
    (B,) long, the items' dataset indices; picklable when ``collate_fn`` is."""
    return _IndexedCollate(collate_fn)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    return weights, optim


def _load_state_dicts(
    model: nn.Module, optimizer, weights, optim_state, *, from_rank0: bool = False
) -> None:
    """Load full (unsharded) state into ``model``/``optimizer``, DDP- or FSDP-wrapped or plain.

    ``from_rank0``: only rank 0 passes the state; the others pass empty dicts and receive it
    tensor by tensor (each FSDP rank keeping its shard), so the checkpoint is in host memory
    once per machine, not once per rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def fit(
    model: nn.Module,
    step_fn: StepFn,
    dataset: Dataset,
    config: RunConfig,
    run_dir: str | Path,
    *,
    group_keys: Sequence[Hashable],
    collate_fn: Callable[[list[dict]], dict],
    ctx: StepContext,
    dist_info: DistInfo | None = None,
    resume: str | None = None,
    meta: dict[str, Any] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    find_unused_parameters: bool = False,
    on_checkpoint: Callable[[Path], None] | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` with ``step_fn`` over ``dataset``; see the module docstring.

    Args:
        group_keys: one key per dataset item; batches never mix keys (electrode set, task).
        resume: ``"auto"`` (newest checkpoint in ``run_dir/checkpoints`` if any), a checkpoint
            folder, or None. Checkpoints in ``run_dir/checkpoints`` after the one resumed from
            belong to the run this one abandons: they are moved to
            ``checkpoints/abandoned-after-step-<step>/`` (with a warning naming them). Under
            torchrun every rank must find the same step (one run folder that all processes
            see), else every rank raises a RuntimeError naming each rank's checkpoint.
        eval_fn: called at every checkpoint on every rank, with the model as trained (the
            DDP/FSDP wrapper under torchrun) in eval mode: the wrappers' forward passes may
            talk to the other ranks (FSDP gathers the parameters; DDP broadcasts buffers when
            gradients are enabled), so every rank runs it. Rank 0's results are logged and its
            ``val/loss`` (or ``val_loss``) decides the best checkpoint kept; without
            ``eval_fn`` no checkpoint is ranked, and a run folder stands for its newest.
        on_checkpoint: called on rank 0 with each checkpoint folder written.
        on_log: called on rank 0 at every log point with the step and the scalars logged
            (``train/loss``, ``train/<metric>``: means over the steps since the last one).
    """
    train_cfg, optim_cfg = config.train, config.optim
    info = dist_info or DistInfo()
    device = ctx.device
    if train_cfg.compile:  # before anything is written or loaded
        check_compile_support(device)
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    amp_dtype = resolve_precision(train_cfg.precision, device)
    if train_cfg.deterministic and not torch.are_deterministic_algorithms_enabled():
        # The commands set this up in start(); a direct caller of fit() gets it here too.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    if len(group_keys) != len(dataset):  # type: ignore[arg-type]
        raise ValueError(f"group_keys has {len(group_keys)} entries for {len(dataset)} items")
    accum = train_cfg.grad_accum
    sampler = EpochBatchSampler(
        group_keys,
        train_cfg.batch_size,
        micro_batches=accum,
        shuffle=True,
        seed=train_cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        drop_last=True,
    )
    steps_per_epoch = len(sampler.global_batches())
    if steps_per_epoch == 0:
        raise ValueError(
            f"no full batch of {train_cfg.batch_size} items in {len(dataset)} items grouped by "
            "electrode set/task: lower train.batch_size"
        )
    # A batch never mixes groups and partial batches are dropped: a group smaller than one
    # batch is never trained on (a recording set of its own electrode montage, say).
    sizes: dict[Hashable, int] = {}
    for key in group_keys:
        sizes[key] = sizes.get(key, 0) + 1
    starved = [n for n in sizes.values() if n < train_cfg.batch_size]
    if starved and info.is_main:
        warnings.warn(
            f"{sum(starved)} of {len(group_keys)} items, in {len(starved)} group(s) of one "
            f"electrode set and task with fewer than train.batch_size = {train_cfg.batch_size} "
            "items, are never trained on (a batch holds one group, and partial batches are "
            "dropped); lower train.batch_size to include them",
            stacklevel=2,
        )
    total_steps = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch

    resume_from = None
    if resume == "auto":
        latest = ckpt.latest_checkpoint(checkpoint_dir)
        resume_from = latest.path if latest else None
    elif resume:
        resume_from = Path(resume)
    # Under torchrun rank 0 reads the weights and optimiser state and broadcasts them (see
    # _load_state_dicts); the other ranks map the state file for its small entries only.
    from_rank0 = info.enabled
    with _naming_an_earlier_checkpoint(resume, resume_from, checkpoint_dir):
        state = (
            ckpt.load_training_state(resume_from, mmap=from_rank0 and not info.is_main)
            if resume_from is not None
            else None
        )
    if resume:  # (the same on every rank, so every rank joins the check's all-gather)
        _same_checkpoint_on_every_rank(resume_from, state, run_dir, info)
    kept_warmup = None  # a resumed run's saved warm-up length, where it still applies
    resume_notes: list[str] = []  # warnings for rank 0 to give once the resume is known to fit
    start_batch = 0  # the micro-batch of its epoch the run starts at
    # The prepared folders' index.json digests, recorded in each checkpoint (rank 0 writes them)
    data_indexes = ckpt.data_identity(dataset) if info.is_main else {}
    if state is not None:
        saved_config = _config_as_trained(ckpt.checkpoint_meta(resume_from))
        changes = config_changes(saved_config, config_to_dict(config))
        changed = ckpt.changed_data(state.get("data_indexes"), data_indexes)
        if changed:
            # The epoch's digest sees item positions only: a folder prepared again with other
            # options (or recordings) into as many windows resumed without a word.
            resume_notes.append(
                f"resuming {resume_from}: the training data changed since it was saved: "
                f"{', '.join(changed)} {'was' if len(changed) == 1 else 'were'} prepared again "
                "(another index.json: other preprocessing settings, recordings or labels); "
                "the run continues on the data as it is now"
            )
        start_batch, note = _resumed_start_batch(state, saved_config, sampler, steps_per_epoch)
        resume_notes += [f"resuming {resume_from} {note}"] if note else []
        if not train_cfg.max_steps:
            # train.epochs counts epochs, not the steps of this run's epochs: a resume after
            # another batch size or into more (fewer) training windows, whose epochs have
            # other numbers of steps, trains the epochs left (it had stopped at once, or
            # trained more epochs than asked).
            left = (train_cfg.epochs - state["epoch"]) * steps_per_epoch - start_batch // accum
            total_steps = max(state["step"], state["step"] + left)
        # A longer run (train.max_steps, more epochs or data) keeps the warm-up it had:
        # optim.warmup_fraction of the new length restarted it at a lower lr.
        kept_warmup = _resumed_warmup(state, saved_config, optim_cfg, sampler, steps_per_epoch)
        if not changes and state.get("total_steps") not in (None, total_steps):
            resume_notes.append(
                f"resuming {resume_from}: the run is {total_steps} optimiser steps long now, "
                f"{state['total_steps']} when it was saved (the training data changed: "
                f"{state.get('epoch_batches')} -> {steps_per_epoch} batches an epoch); its "
                "learning-rate schedule is rebuilt for the new length"
            )

    # The warm-up's length in optimiser steps (as build_scheduler takes it from optim.*), of the
    # run's length as a resume has counted it (the epochs left after changed data): taken
    # before, another optim.warmup_fraction was a share of epochs x the new batches.
    warmup_steps = kept_warmup if kept_warmup is not None else warmup_length(optim_cfg, total_steps)

    model.to(device)
    if train_cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    raw_model = model
    model = wrap_model(
        model,
        info,
        device,
        strategy=train_cfg.strategy,
        find_unused_parameters=find_unused_parameters,
    )
    if train_cfg.compile:
        model.compile()
    optimizer = build_optimizer(raw_model, optim_cfg, device)
    scheduler = build_scheduler(
        optimizer,
        dataclasses.replace(optim_cfg, warmup_steps=warmup_steps, warmup_fraction=0.0),
        total_steps,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, epoch = 0, 0
    # per-step scalars since the last log point: per name, the (step, value) of each
    window: dict[str, list[tuple[int, float]]] = {}
    if resume_from is not None:
        # Before any load (every rank, before any collective): a model of other settings got
        # torch's size-mismatch RuntimeError, a traceback that named neither cause.
        with _naming_an_earlier_checkpoint(resume, resume_from, checkpoint_dir):
            _check_weights_fit(resume_from, raw_model, changes)
            weights = ckpt.load_weights(resume_from) if info.is_main or not from_rank0 else {}
        saved_groups = len(state["optimizer"]["param_groups"]) if state["optimizer"] else 0
        if saved_groups and saved_groups != len(optimizer.param_groups):
            raise ValueError(
                f"--resume {resume_from}: its optimiser has {saved_groups} parameter groups, this "
                f"run's has {len(optimizer.param_groups)}; optim.layer_decay (or which parameters "
                "train) differs from the checkpoint's, so its optimiser state cannot continue"
            )
        # This run's settings per group: loading the optimiser's state brings back the saved
        # lr, weight decay, betas and eps, which a resume with other optim.* settings replaces.
        settings = [
            {k: g[k] for k in ("weight_decay", "betas", "eps", "lr_scale")}
            for g in optimizer.param_groups
        ]
        optim_state = state["optimizer"] if info.is_main or not from_rank0 else {}
        _load_state_dicts(model, optimizer, weights, optim_state, from_rank0=from_rank0)
        scheduler.load_state_dict(state["scheduler"])
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own, initial_lr=optim_cfg.lr)
        # The schedule as this run builds it (the same floats as the saved one's when nothing
        # changed): LambdaLR's state brought back the saved base lrs.
        scheduler.base_lrs = [optim_cfg.lr] * len(optimizer.param_groups)
        for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = optim_cfg.lr * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if state["scaler"]:  # empty when saved without fp16: a switch to fp16 starts afresh
            scaler.load_state_dict(state["scaler"])
        saved_rng = state["rng"]
        if info.rank < len(saved_rng) and not (
            info.rank > 0 and torch.equal(saved_rng[info.rank]["torch"], saved_rng[0]["torch"])
        ):
            ckpt.set_rng_state(saved_rng[info.rank])
        else:
            # saved by fewer processes, or by processes that all drew alike (runs from before
            # _seed_rank_streams): another rank's saved stream would make this rank's
            # stochastic depth and dropout a copy of that rank's; it draws its own instead
            _seed_rank_streams(train_cfg.seed, info.rank)
        step, epoch = state["step"], state["epoch"]  # (start_batch: _resumed_start_batch)
        # The scalars of the steps since the last log point before the checkpoint, so that the
        # next log point averages the same steps as in the run that was not interrupted (each
        # rank its own; a run on another number of processes starts the window afresh).
        window = _resumed_log_window(state, saved_config, step, train_cfg.log_every, info)
        # The loaded copies are in the model and optimiser now; kept here they would sit in
        # host memory for the whole run (GPU runs), and a mapped state file stay open.
        del weights, optim_state
        state = None
        if changes and info.is_main:
            warnings.warn(
                f"resuming {resume_from} with settings other than it was trained with: "
                f"{'; '.join(changes)} (the run continues with the new ones; the learning-rate "
                "schedule is rebuilt for them)",
                stacklevel=2,
            )
        for note in resume_notes if info.is_main else []:
            warnings.warn(note, stacklevel=2)
        if info.is_main:  # the one process that writes the checkpoint folder
            # Left where they are, --resume auto, the best checkpoint and keep_last would mix
            # the abandoned run's later steps with this run's.
            moved_to, moved = ckpt.set_aside_after(checkpoint_dir, step)
            if moved:
                warnings.warn(
                    f"resuming from step {step} ({resume_from}): the later checkpoints in "
                    f"{checkpoint_dir} ({', '.join(p.name for p in moved)}) are of the run it "
                    f"abandons; moved them to {moved_to} (delete it if they are not needed)",
                    stacklevel=2,
                )
    elif info.rank > 0:
        _seed_rank_streams(train_cfg.seed, info.rank)

    if info.is_main:
        # Only now, once a resume is known to fit: a refused one left the run folder's
        # config.yaml describing settings that never trained there.
        write_text_atomic(run_dir / "config.yaml", config_to_yaml(config))
    # A resume (also --resume auto finding no checkpoint yet: the run starts over at step 0)
    # drops what was logged after its step, which this run logs again.
    logger = RunLogger(run_dir, enabled=info.is_main, resume_step=step if resume else None)
    bar = progress_bar(
        total=total_steps,
        initial=step,
        desc=run_dir.name,
        unit="step",
        disable=not (info.is_main and train_cfg.progress),
        dynamic_ncols=True,
    )
    # Pinned batches, so that the steps' copies to the GPU are asynchronous.
    loader_kwargs = {"num_workers": config.data.num_workers, "pin_memory": device.type == "cuda"}
    if config.data.num_workers > 0:
        loader_kwargs["persistent_workers"] = False
    collate = indexed_collate(collate_fn)
    indexed = IndexedDataset(dataset)
    # Prepared folders: whole batches read at once, in pinned memory when built here (the
    # same batches as ``indexed`` with ``collate``); None for other datasets or collates.
    pin_here = device.type == "cuda" and config.data.num_workers == 0
    batches = shard_batches(dataset, collate_fn, pin_memory=pin_here)
    result = FitResult(step=step, epoch=epoch, run_dir=run_dir, resumed_from=resume_from)
    since_checkpoint: list[float] = []
    pending: list[_StepScalars] = []  # steps whose scalars are not read back yet
    # Reads them back early when a step went non-finite; one process only: across ranks the
    # flags arrive at different steps, and the read-back's all-reduce must run at the same step
    # on every rank (under torchrun the read-back points decide).
    watch = _NonFiniteWatch(enabled=not info.enabled)
    last_saved: Path | None = None
    skipped = {"in_a_row": 0, "since": 0}  # fp16 steps with non-finite gradients, read back
    started = time.perf_counter()
    samples_seen = 0
    # Seconds spent in save() (validation, checkpoint writing): not training time, left out of
    # train/samples_per_s (each checkpoint's validation had pulled the rate down for good).
    not_training = 0.0

    digests: dict[int, str] = {}

    def epoch_digest(of_epoch: int) -> str:
        """The sampler's digest of epoch ``of_epoch`` (the one it is in), once an epoch."""
        if of_epoch not in digests:
            digests.clear()
            digests[of_epoch] = sampler.epoch_digest()
        return digests[of_epoch]

    def read_pending() -> None:
        """Read the pending steps' scalars back, stop at the first non-finite loss (or gradient
        norm, but for fp16, whose scaler skips such steps) on any rank, and file them into
        the results and the log window."""
        nonlocal pending
        if not pending:  # the same on every rank: read points are the same steps
            return
        flat: list[float | torch.Tensor] = []
        for record in pending:
            flat += [record.loss, record.grad_norm]
            for values in record.metrics.values():
                flat += values
        floats = iter(_read_back(flat))
        read = []
        for record in pending:
            loss, grad_norm = next(floats), next(floats)
            metrics = {k: [next(floats) for _ in v] for k, v in record.metrics.items()}
            read.append((record, loss, grad_norm, metrics))
        first_bad, found = 2**62, ""
        for record, loss, grad_norm, _ in read:
            if not math.isfinite(loss):
                first_bad, found = record.step, f"loss ({loss})"
                break
            if math.isfinite(grad_norm):
                skipped["in_a_row"] = 0
                continue
            if amp_dtype != torch.float16:
                first_bad, found = record.step, f"gradient norm ({grad_norm})"
                break
            # fp16: the scaler skipped this step (its gradients were not finite)
            if skipped["in_a_row"] == 0:
                skipped["since"] = record.step
            skipped["in_a_row"] += 1
            if skipped["in_a_row"] >= MAX_SKIPPED_STEPS:
                first_bad, found = record.step, "skipped"
                break
        first_bad_anywhere = min_across_ranks(first_bad, device, info)
        if first_bad_anywhere < 2**62:
            bad = next(r for r, *_ in read if r.step == first_bad_anywhere)
            if found == "skipped" and first_bad == first_bad_anywhere:
                raise NonFiniteLossError(
                    _skipped_steps_message(
                        skipped["since"],
                        bad.step,
                        bad.epoch,
                        read[-1][0].step,
                        scaler.get_scale(),
                        last_saved,
                        run_dir,
                    )
                )
            raise NonFiniteLossError(
                _non_finite_message(
                    found if first_bad == first_bad_anywhere else "value on another rank",
                    bad.step,
                    bad.epoch,
                    read[-1][0].step,
                    last_saved,
                    run_dir,
                )
            )
        for record, loss, grad_norm, metrics in read:
            result.losses.append(loss)
            since_checkpoint.append(loss)
            for key, values in (("loss", [loss]), ("grad_norm", [grad_norm]), *metrics.items()):
                window.setdefault(key, []).extend((record.step, v) for v in values)
        pending = []

    def save(batch_in_epoch: int, save_epoch: int) -> Path | None:
        nonlocal not_training
        # raises before anything is saved if a step went non-finite; its wait for the device
        # to finish the steps is training time, what follows is not
        read_pending()
        save_started = time.perf_counter()
        try:
            return write_checkpoint(batch_in_epoch, save_epoch)
        finally:
            not_training += time.perf_counter() - save_started

    def write_checkpoint(batch_in_epoch: int, save_epoch: int) -> Path | None:
        nonlocal since_checkpoint
        metric_values = {}
        if eval_fn is not None:
            model.eval()
            metric_values = eval_fn(model)
            model.train()
        # the checkpoint's metric (lower is better; picks the best checkpoint): the validation
        # loss where eval_fn gives one (logged as val/loss, or under its older name). Without
        # one there is no metric: the training loss since the checkpoint before measures the
        # batches seen, not the model, and ranking by it (as before) made `evaluate` or
        # `finetune --init` take an older checkpoint than the run's last without a word.
        metric_name = next((k for k in ("val/loss", "val_loss") if k in metric_values), None)
        metric = metric_values[metric_name] if metric_name else None
        train_loss = float(np.mean(since_checkpoint)) if since_checkpoint else None
        since_checkpoint = []
        weights, optim_state = _state_dicts(model, optimizer)
        rng_states = _gather_rng(info)
        windows = _gather(window, info)
        path = None
        if info.is_main:
            if metric_values:
                logger.log(step, metric_values)
            logger.flush()  # (see RunLogger.flush) before the checkpoint is written
            state = {
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states,
                "step": step,
                "epoch": save_epoch,
                "batch_in_epoch": batch_in_epoch,  # micro-batches of grad_accum
                "grad_accum": accum,
                # each rank's scalars since the last log point, and the step of each
                "log_window": [{k: [v for _, v in p] for k, p in w.items()} for w in windows],
                "log_window_steps": [{k: [s for s, _ in p] for k, p in w.items()} for w in windows],
                # what a resume with other batches, data or length needs (_resumed_start_batch)
                "epoch_batches": steps_per_epoch,  # global batches an epoch
                "epoch_items": len(group_keys),
                "epoch_digest": epoch_digest(save_epoch) if batch_in_epoch else None,
                "total_steps": total_steps,
                "warmup_steps": warmup_steps,
                "data_indexes": data_indexes,  # folder -> its index.json's SHA-256
            }
            path = ckpt.save_checkpoint(
                checkpoint_dir,
                step,
                weights,
                state,
                {
                    "epoch": save_epoch,
                    "metric": metric,
                    "metric_name": metric_name,
                    "train_loss": train_loss,
                    "config": config_to_dict(config),
                    **(meta or {}),
                },
            )
            ckpt.prune_checkpoints(checkpoint_dir, train_cfg.keep_last)
            if on_checkpoint is not None:
                on_checkpoint(path)
        barrier(info)
        if path is None:
            # the folder rank 0 has written (past the barrier): every rank names it as the
            # last good checkpoint when the run stops later (a non-finite loss), and each
            # rank prints that; the other ranks said none was written yet
            path = checkpoint_dir / f"step-{step:08d}"
        return path

    # Only here, where the try below restores them: a resume refused above (other weights or
    # optimiser groups) had left them changed for the rest of the process.
    restore_compile_settings = None
    if train_cfg.compile:
        restore_compile_settings = _compiled_training_settings(
            len(set(group_keys)), train_cfg.activation_checkpointing
        )
    # What the optimiser steps (the sharded parameters under FSDP), listed once: walking the
    # module tree for them at every step was ~0.5 ms of host time a step for LaBraM-Base
    # (228 parameters under 197 modules), 2% of a 25-ms step at 2,500 samples/s.
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    scheduled = False  # whether this fit has stepped the scheduler yet
    model.train()
    try:
        while step < total_steps:
            sampler.set_epoch(epoch, start_batch)
            ctx.epoch = epoch
            # The loader's own generator: creating its iterator draws a base seed (for the
            # workers' seeds) from it, not from the global RNG, whose state a mid-epoch resume
            # restores before this point and which dropout/drop-path go on drawing from.
            loader_rng = torch.Generator().manual_seed(
                ((train_cfg.seed * 100_003 + epoch) * 1_009 + info.rank) % 2**63
            )
            if batches is not None:  # each "index" the sampler gives is a batch's items
                source = {"dataset": batches, "batch_size": None, "sampler": sampler}
                source["collate_fn"] = passthrough
            else:
                source = {"dataset": indexed, "batch_sampler": sampler, "collate_fn": collate}
            loader = DataLoader(**source, generator=loader_rng, **loader_kwargs)
            micro = 0
            batch_in_epoch = start_batch
            limit = steps_per_epoch * accum
            micro_losses: list[torch.Tensor] = []
            micro_metrics: dict[str, list[float | torch.Tensor]] = {}
            for batch, normaliser in _with_step_normalisers(
                loader, accum, getattr(step_fn, "normaliser", None), ctx, info
            ):
                if batch_in_epoch >= limit or step >= total_steps:
                    break
                ctx.step = step
                last_micro = (micro + 1) % accum == 0
                sync = contextlib.nullcontext()
                if not last_micro and info.enabled:
                    sync = no_gradient_sync(model)  # accumulate locally, reduce on the last
                with sync:
                    with torch.autocast(
                        device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32
                    ):
                        ctx.normaliser = normaliser
                        try:
                            out = step_fn(model, batch, ctx)
                        finally:  # not left for an evaluation with the same context
                            ctx.normaliser = None
                    micro_losses.append(out.loss.detach().float())
                    watch.push(micro_losses[-1])
                    scaler.scale(out.loss / accum).backward()
                for key, value in out.metrics.items():
                    # detached: a metric of a step function's own still in the graph (one of
                    # a branch the loss does not use) kept that branch's saved activations
                    # alive until the next log point, a graph per step
                    if isinstance(value, torch.Tensor):
                        value = value.detach()
                    micro_metrics.setdefault(key, []).append(value)
                micro += 1
                batch_in_epoch += 1
                samples_seen += int(batch["x"].shape[0])
                if not last_micro:
                    continue
                scaler.unscale_(optimizer)
                max_norm = optim_cfg.clip_grad if optim_cfg.clip_grad > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in trained if p.grad is not None], max_norm
                )
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                # The lr this step used, logged as train/lr: the largest group's, which is the
                # schedule's own (group 0 may be the patch embedding's, scaled by layer decay).
                step_lr = max(group["lr"] for group in optimizer.param_groups)
                if scheduled:
                    scheduler.step()
                else:
                    # The schedule follows steps taken, also when the fp16 scaler skipped the
                    # optimizer's step on overflow; torch warns about that order (at a
                    # scheduler's first step only), not an error. Only here: leaving a
                    # catch_warnings clears Python's record of the warnings shown, and with
                    # one at every step a warning raised at every step was printed each time.
                    with warnings.catch_warnings():
                        warnings.filterwarnings(
                            "ignore", "Detected call of `lr_scheduler.step", UserWarning
                        )
                        scheduler.step()
                    scheduled = True
                step += 1
                pending.append(
                    _StepScalars(
                        step,
                        epoch,
                        torch.stack(micro_losses).mean(),
                        grad_norm.detach(),
                        micro_metrics,
                    )
                )
                micro_losses, micro_metrics = [], {}
                if amp_dtype != torch.float16:  # (fp16: the scaler skips such steps)
                    watch.push(grad_norm)
                bar.update(1)
                if watch.seen():
                    read_pending()  # raises, naming the first non-finite step
                if step % train_cfg.log_every == 0 or step == total_steps:
                    read_pending()
                    names = sorted(window)  # the same order on every rank
                    means = torch.tensor([float(np.mean([v for _, v in window[k]])) for k in names])
                    if info.enabled:  # one all-reduce for every scalar
                        means = all_reduce_mean(means.to(device), info).cpu()
                    scalars = {f"train/{k}": v for k, v in zip(names, means.tolist(), strict=True)}
                    scalars["train/lr"] = step_lr
                    elapsed = time.perf_counter() - started - not_training
                    scalars["train/samples_per_s"] = (
                        samples_seen * info.world_size / max(elapsed, 1e-9)
                    )
                    logger.log(step, scalars)
                    if on_log is not None and info.is_main:
                        on_log(step, scalars)
                    # shown at the bar's next refresh (refreshing here as well, at every
                    # log point, bypassed its interval)
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
                    window = {}
                end_of_epoch = batch_in_epoch >= limit
                # Every train.checkpoint_every steps and at the last; 0: at each epoch's end
                # (step % steps_per_epoch misses the ends after a resume into other data).
                # A nonzero one had saved and validated at every epoch's end as well.
                due = (
                    end_of_epoch
                    if not train_cfg.checkpoint_every
                    else step % train_cfg.checkpoint_every == 0
                )
                if due or step == total_steps:
                    if end_of_epoch:
                        last_saved = save(0, epoch + 1)
                    else:
                        last_saved = save(batch_in_epoch, epoch)
                    result.checkpoint = last_saved
            optimizer.zero_grad(set_to_none=True)
            epoch += 1
            start_batch = 0
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, TrainingInterrupted):  # a nested fit's: already placed
            raise
        raise TrainingInterrupted(step, run_dir) from interrupt
    finally:
        bar.close()
        logger.close()
        if restore_compile_settings is not None:
            restore_compile_settings()
    result.step, result.epoch = step, epoch
    return result


# Settings that change how a run is shown, fed or executed, not what it computes (the
# strategy, compilation and activation checkpointing give the same updates up to rounding;
# resuming a DDP run under FSDP, or compiled, is a supported change, not one to warn about).
_RESUME_NEUTRAL = {
    "train.progress",
    "data.num_workers",
    "train.strategy",
    "train.compile",
    "train.activation_checkpointing",
    # when it logs and keeps checkpoints (a resume logs the new schedule's window), and where
    # the tokenizer's targets come from (the same codes, cached or not): the same training
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "pretrain.cache_targets",
    "pretrain.cache_targets_max_mb",
}


def config_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each dotted setting that differs between a checkpoint's config
    (``saved``, None for checkpoints without one) and ``now``, but for _RESUME_NEUTRAL ones and
    keys only one of them has."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    if not saved:
        return []
    old, new = flat(saved), flat(now)
    # keys on one side only are the schema's changes between versions (a key added since, one
    # retired), not settings the user changed
    return [
        f"{key}: {old[key]!r} -> {new[key]!r}"
        for key in sorted(old.keys() & new.keys())
        if key not in _RESUME_NEUTRAL and old[key] != new[key]
    ]


def _resumed_start_batch(
    state: dict[str, Any],
    saved_config: dict[str, Any] | None,
    sampler: EpochBatchSampler,
    steps_per_epoch: int,
) -> tuple[int, str | None]:
    """The micro-batch of its epoch (``state["epoch"]``) that a resume from the training state
    ``state`` starts at, and a warning for a position that cannot be continued exactly.

    The saved position counts micro-batches of the saved run's accumulation: another
    train.grad_accum continues after the same global batches. Where the epoch's batches are
    not the saved run's (another train.batch_size or train.seed, training windows added or
    removed: the sampler's epoch digest differs), that count of old batches had skipped or
    repeated part of the epoch (with a larger batch size, all of its rest): the epoch goes on
    after the same share of its new batches instead, with a warning."""
    accum = sampler.micro_batches
    epoch = state["epoch"]
    done = state["batch_in_epoch"] // state.get("grad_accum", accum)  # global batches
    if done == 0:
        return 0, None
    sampler.set_epoch(epoch)
    old = (saved_config or {}).get("train") or {}
    saved_digest, saved_batches = state.get("epoch_digest"), state.get("epoch_batches")
    if saved_digest is None:  # a checkpoint from before digests: its settings tell
        before = EpochBatchSampler(
            sampler.group_keys,
            old.get("batch_size", sampler.global_batch),
            seed=old.get("seed", sampler.seed),
        )
        before.set_epoch(epoch)
        if (before.global_batch, before.seed) == (sampler.global_batch, sampler.seed):
            return done * accum, None
        saved_digest, saved_batches = before.epoch_digest(), len(before.global_batches())
    if saved_digest == sampler.epoch_digest():
        return done * accum, None
    why = [
        f"train.{key}: {old[key]!r} -> {now!r}"
        for key, now in (("batch_size", sampler.global_batch), ("seed", sampler.seed))
        if key in old and old[key] != now
    ]
    items = state.get("epoch_items")
    if items is not None and items != len(sampler.group_keys):
        why.append(f"{items} -> {len(sampler.group_keys)} training windows")
    share = done * steps_per_epoch // max(saved_batches or 1, 1)
    return share * accum, (
        f"after batch {done} of {saved_batches} of epoch {epoch}, whose batches are "
        f"cut otherwise now ({'; '.join(why) or 'the training windows changed'}): the epoch "
        f"goes on after {share} of its {steps_per_epoch} batches, the same share, so some of "
        "its windows are trained on twice and others not at all in this epoch (a checkpoint "
        "at an epoch's end resumes exactly)"
    )


def _config_as_trained(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The config in a checkpoint's ``meta`` (None without one), its ``model.name`` the model
    the run trained where the meta's ``arch`` names it (as ``model_for_resume`` takes it).

    A fold that `finetune` trained from ``model.init`` before it recorded the model the init
    holds has the from-scratch default (labram_base) there: a resume listed model.name as a
    changed setting although the model was the same."""
    config = meta.get("config")
    trained = (meta.get("arch") or {}).get("name")
    model = (config or {}).get("model")
    if not trained or not isinstance(model, dict) or model.get("name") in (None, trained):
        return config
    return {**config, "model": {**model, "name": trained}}


def _resumed_warmup(
    state: dict[str, Any],
    saved_config: dict[str, Any] | None,
    optim_cfg: OptimConfig,
    sampler: EpochBatchSampler,
    steps_per_epoch: int,
) -> int | None:
    """The warm-up's length in optimiser steps of the run that saved the training state
    ``state``, which a resume with the same ``optim.warmup_*`` keeps; None where they changed
    (or the checkpoint has no config to tell): the new ones' length applies.

    A checkpoint from before that length (and the run's) was recorded gets it as its run had
    computed it: optim.warmup_fraction of that run's train.max_steps, or of its train.epochs x
    its batches an epoch (of its train.batch_size: ``sampler``'s windows cut so; this run has
    ``steps_per_epoch``), not of the resumed run's length, which restarted the warm-up."""
    old_optim = (saved_config or {}).get("optim") or {}
    if not all(
        old_optim.get(key) == getattr(optim_cfg, key) for key in ("warmup_steps", "warmup_fraction")
    ):
        return None
    if state.get("warmup_steps") is not None:
        return int(state["warmup_steps"])
    old = (saved_config or {}).get("train") or {}
    total = state.get("total_steps") or old.get("max_steps")
    if not total:
        if "epochs" not in old:
            return None
        batch = old.get("batch_size", sampler.global_batch)
        if batch != sampler.global_batch:  # (nor accumulation nor processes change the count)
            steps_per_epoch = len(EpochBatchSampler(sampler.group_keys, batch).global_batches())
        total = old["epochs"] * steps_per_epoch
    return warmup_length(optim_cfg, total)


def _resumed_log_window(
    state: dict[str, Any],
    saved_config: dict[str, Any] | None,
    step: int,
    log_every: int,
    info: DistInfo,
) -> dict[str, list[tuple[int, float]]]:
    """This rank's scalars saved in the training state ``state`` (at optimiser step ``step``)
    that the first log point of a resumed run logging every ``log_every`` steps averages: per
    name, the (step, value) of each.

    Those of the steps after the last log point of this run's schedule at or before ``step``:
    the saved window (the steps since the saved run's last log point) had all gone into it,
    so after another train.log_every that log point averaged a window of neither length (saved
    every 10 steps at step 7, resumed every 4: steps 1-8 at step 8, not 5-8). A checkpoint
    without the values' steps (written before they were recorded) gives its window only where
    train.log_every is unchanged; a run on another number of processes starts afresh."""
    saved, saved_steps = state.get("log_window"), state.get("log_window_steps")
    if saved is None or len(saved) != info.world_size:
        return {}
    if saved_steps is None or len(saved_steps) != len(saved):
        old = ((saved_config or {}).get("train") or {}).get("log_every", log_every)
        if old != log_every:
            return {}
        # (its steps are after the last log point, which is this run's too: filed under
        # ``step``, the window goes on as it was, and into this run's checkpoints)
        return {k: [(step, v) for v in values] for k, values in saved[info.rank].items()}
    after = step - step % log_every  # this schedule's last log point at or before ``step``
    window: dict[str, list[tuple[int, float]]] = {}
    for key, values in saved[info.rank].items():
        steps = list(saved_steps[info.rank].get(key, ()))
        if len(steps) != len(values):  # (not as fit saves it) filed under ``step``
            steps = [step] * len(values)
        pairs = [(s, value) for s, value in zip(steps, values, strict=True) if s > after]
        if pairs:
            window[key] = pairs
    return window


@contextlib.contextmanager
def _naming_an_earlier_checkpoint(
    resume: str | None, resume_from: Path | None, checkpoint_dir: Path
) -> Iterator[None]:
    """Reading the checkpoint ``--resume auto`` chose: a damaged one (its ValueError names the
    file) also names the newest checkpoint before it, which ``--resume`` can continue from
    (the damaged one and any later are then set aside, as for any earlier checkpoint)."""
    try:
        yield
    except ValueError as err:
        if resume != "auto" or resume_from is None or "corrupt or truncated" not in str(err):
            raise  # (not a damaged file: a model of other settings, say)
        try:
            earlier = [c for c in ckpt.list_checkpoints(checkpoint_dir) if c.path != resume_from]
        except (OSError, ValueError):
            earlier = []
        if not earlier:
            raise
        raise ValueError(
            f"{err}. The checkpoint before it may be intact: --resume {earlier[-1].path}"
        ) from err


def _same_checkpoint_on_every_rank(
    resume_from: Path | None, state: dict[str, Any] | None, run_dir: Path, info: DistInfo
) -> None:
    """Stop every rank when the ranks would not resume from the same step: a rank that found
    another checkpoint, or none (a machine whose run folder is a local copy, not the folder
    rank 0 writes to), would train other weights than the rest, and DDP/FSDP would average
    their gradients into the next checkpoints without a word."""
    if not info.enabled:
        return
    import torch.distributed as dist

    mine = (str(resume_from) if resume_from is not None else None, state["step"] if state else None)
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    if len({step for _, step in gathered}) > 1:
        found = "; ".join(
            f"rank {rank}: " + (f"step {step} ({path})" if path else "no checkpoint")
            for rank, (path, step) in enumerate(gathered)
        )
        raise RuntimeError(
            f"the processes would resume from different checkpoints ({found}): every process "
            f"must see the run folder {run_dir} that rank 0 writes (on several machines, a "
            "shared file system)"
        )


def _gather(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order."""
    if not info.enabled:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), so each rank resumes its own stream."""
    return _gather(ckpt.rng_state(), info)


def _check_weights_fit(checkpoint: Path, model: nn.Module, changes: list[str]) -> None:
    """ValueError naming ``checkpoint`` when its weights do not fit ``model`` (other names or
    shapes: a model built with other settings), with the settings that changed since it was
    saved (``changes``); read from the file's header only."""
    # load_checkpoint's comparison (imported here, as ckpt.weight_shapes imports it:
    # eegfast.models loads the ops)
    from eegfast.models.checkpoint import _compare_shapes

    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    report = _compare_shapes(ckpt.weight_shapes(checkpoint), own)
    if report.ok:
        return
    problems = [
        f"{k}: checkpoint {list(saved)}, model {list(wanted)}"
        for k, wanted, saved in sorted(report.mismatched)
    ]
    problems += [f"{k} missing from the checkpoint" for k in sorted(report.missing)]
    problems += [f"{k} not in the model" for k in sorted(report.unexpected)]
    shown = "; ".join(problems[:3]) + (
        f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    )
    cause = (
        f"settings changed since it was saved: {'; '.join(changes)}"
        if changes
        else "the model is not the one it was trained with"
    )
    raise ValueError(
        f"--resume {checkpoint}: its weights do not fit this run's model ({shown}); {cause}. "
        "Resume with the checkpoint's settings (its meta.json), or start a new run"
    )


def _kept(last: Path | None, run_dir: Path) -> str:
    return (
        f"the last good checkpoint is {last}"
        if last
        else (f"no checkpoint of this run was written yet (run folder {run_dir})")
    )


def _skipped_steps_message(
    first: int,
    step: int,
    epoch: int,
    found_at: int,
    scale: float,
    last: Path | None,
    run_dir: Path,
) -> str:
    return (
        f"fp16 loss scaling skipped {step - first + 1} optimiser steps in a row (steps {first} "
        f"to {step}, epoch {epoch}; seen at step {found_at}): the loss was finite but the "
        f"gradients were not, down to a loss scale of {scale:g}, so the weights did not "
        f"change. Training stopped and nothing was saved from that step on; "
        f"{_kept(last, run_dir)}. Try train.precision=bf16 (or fp32) or a lower optim.lr, "
        "then resume with --resume auto."
    )


def _non_finite_message(
    what: str, step: int, epoch: int, found_at: int, last: Path | None, run_dir: Path
) -> str:
    kept = _kept(last, run_dir)
    return (
        f"non-finite {what} at optimiser step {step}, epoch {epoch} (seen at step {found_at}): "
        f"training stopped and nothing was saved from that step on; {kept}. Try a lower "
        "optim.lr, optim.clip_grad > 0 or train.precision=fp32, then resume with --resume auto."
    )
