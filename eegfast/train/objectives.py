"""Training objectives as step functions: ``step(model, batch, ctx) -> StepOutput``.

The engine knows nothing about what is trained; a command picks a step function. Pretraining
objectives are looked up by name with :func:`get_objective` — this is the hook for new
objectives: a module calls :func:`register_objective` at import time, and names listed in
``LAZY_OBJECTIVES`` are imported on first use (``hybrid`` lives in ``eegfast.train.hybrid``,
written separately).

A step function whose loss is normalised by a batch statistic may carry a ``normaliser``
attribute, ``normaliser(host_batch, ctx) -> (N,) host tensor``: the engine sums it over an
optimiser step's micro-batches (and the ranks) before the first forward and passes the share
of one micro-batch of one rank as ``ctx.normaliser``, so ``train.grad_accum`` > 1 gives the
loss of one batch (:func:`classification_step` has :func:`classification_normaliser`).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class HostCopies:
    """Tensors brought to host memory without the host waiting for the device: from a GPU by
    asynchronous copies into pinned memory, each handed back (with its tag) once its copy has
    completed; host tensors at once."""

    def __init__(self) -> None:
        self._in_flight: list[tuple[Any, torch.Tensor, Any]] = []  # (tag, host, event or None)

    def add(self, tensor: torch.Tensor, tag: Any = None) -> None:
        if tensor.device.type == "cuda":
            host = tensor.to("cpu", non_blocking=True)  # pinned destination
            done = torch.cuda.Event()
            # on the stream the copy went to, that of the tensor's GPU: the current device's
            # (another GPU when the model is on cuda:1 and nothing set it) completes at once,
            # and the host would read the pinned memory before the copy has filled it
            done.record(torch.cuda.current_stream(tensor.device))
            self._in_flight.append((tag, host, done))
        else:
            self._in_flight.append((tag, tensor.cpu(), None))

    def arrived(self, *, wait: bool = False) -> list[tuple[Any, torch.Tensor]]:
        """(tag, host tensor) of the copies that have completed, in order, no longer kept (all
        of them, waiting for those in flight, if ``wait``)."""
        done, waiting = [], []
        for tag, host, event in self._in_flight:
            if event is None or wait or event.query():
                if event is not None and wait:
                    event.synchronize()
                done.append((tag, host))
            else:
                waiting.append((tag, host, event))
        self._in_flight = waiting
        return done


class TargetCache:
    """The frozen tokenizer's codes of each training window, by dataset index.

    A window's codes depend on its samples alone: the tokenizer is frozen and in eval mode,
    prepared windows never change, and batches never pad channels (they are grouped by
    electrode set), so after the first epoch pretraining skips the tokenizer's forward. Codes
    are kept on the host as int16 (int32 past 32768 codes): 512 bytes for a window of 256
    patches. Only for one dataset: indices are positions in it.

    Codes computed on a GPU come back by an asynchronous copy into pinned memory: ``put`` does
    not make the host wait for the device, and a window's row is filed once its copy is done
    (at the latest on the next ``get`` after it), so the first epoch runs unsynchronised too.

    The cache holds at most ``max_bytes`` of host memory (rows with their bookkeeping, about
    700 bytes a window of 256 patches): once full it keeps the windows it has and files no
    more, so the windows past the limit run the tokenizer every epoch (a warning says so
    once; :func:`tokenizer_codes` encodes only a batch's windows that are not cached).
    Keeping the first windows rather than evicting suits the epochs' shuffled order, under
    which any eviction would throw away rows as likely to be needed as the new ones.

    Args:
        num_codes: the tokenizer's codebook size; it fixes the row dtype. Without it every
            ``put`` reads the codes' maximum (a wait for the device on a GPU).
        max_bytes: the limit on the host memory the rows take; None for no limit.
    """

    # A row's memory besides its codes: the ndarray header, its dict slot and index key.
    ROW_OVERHEAD_BYTES = 200

    def __init__(self, num_codes: int | None = None, max_bytes: int | None = None) -> None:
        if num_codes is not None and num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.num_codes = num_codes
        self.max_bytes = max_bytes
        self._codes: dict[int, np.ndarray] = {}
        self._copies = HostCopies()  # codes on their way to the host, tagged with their indices
        self._held_bytes = 0  # the rows' memory, bookkeeping included
        self.hits = 0  # batches served from the cache
        self.misses = 0  # batches the tokenizer ran for (on their windows not cached)
        self._left_out: set[int] = set()  # windows not filed because the cache was full

    @property
    def left_out(self) -> int:
        """How many windows were not filed because the cache was full."""
        self._file_arrived(wait=True)
        return len(self._left_out)

    @property
    def held_bytes(self) -> int:
        """The host memory the rows take, bookkeeping included (what ``max_bytes`` limits)."""
        self._file_arrived(wait=True)
        return self._held_bytes

    def __len__(self) -> int:
        self._file_arrived(wait=True)
        return len(self._codes)

    @property
    def nbytes(self) -> int:
        self._file_arrived(wait=True)
        return sum(codes.nbytes for codes in self._codes.values())

    def rows(self, indices: list[int], num_tokens: int) -> list[np.ndarray | None]:
        """The cached (num_tokens,) codes of each window of ``indices``; None for a window
        not cached (or cached with another token count)."""
        self._file_arrived(wait=False)
        rows = [self._codes.get(i) for i in indices]
        return [row if row is not None and row.shape[0] == num_tokens else None for row in rows]

    def get(self, indices: list[int], num_tokens: int) -> torch.Tensor | None:
        """(B, num_tokens) int64 codes of the windows ``indices``, or None unless every one is
        cached with that many tokens."""
        rows = self.rows(indices, num_tokens)
        if not rows or any(row is None for row in rows):
            return None
        return torch.from_numpy(np.stack(rows)).long()

    def put(self, indices: list[int], codes: torch.Tensor) -> None:
        """Keep the (B, T) codes of the windows ``indices``."""
        if codes.dim() != 2 or codes.shape[0] != len(indices):
            raise ValueError(
                f"codes must have shape (len(indices), T) = ({len(indices)}, T), got "
                f"{tuple(codes.shape)}"
            )
        if self.num_codes is not None:
            small = self.num_codes <= np.iinfo(np.int16).max + 1
        else:
            small = codes.numel() == 0 or int(codes.max()) <= np.iinfo(np.int16).max
        self._copies.add(codes.to(torch.int16 if small else torch.int32), list(indices))

    def code_counts(self) -> np.ndarray:
        """(num_codes,) int64: how often each code occurs in the cached windows (padding, -1,
        left out). Without num_codes, as long as the largest code seen + 1."""
        self._file_arrived(wait=True)
        rows = [row[row >= 0] for row in self._codes.values()]
        codes = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        return np.bincount(codes, minlength=self.num_codes or 0)

    def _file_arrived(self, *, wait: bool) -> None:
        """File the rows whose copies are done (all of them, waiting, if ``wait``)."""
        for indices, host in self._copies.arrived(wait=wait):
            for index, row in zip(indices, host.numpy(), strict=True):
                old = self._codes.get(index)
                size = row.nbytes + self.ROW_OVERHEAD_BYTES
                freed = 0 if old is None else old.nbytes + self.ROW_OVERHEAD_BYTES
                if self.max_bytes is not None and self._held_bytes - freed + size > self.max_bytes:
                    if not self._left_out:
                        warnings.warn(
                            f"the tokenizer-target cache is full ({self.max_bytes / 2**20:.0f} "
                            f"MiB, {len(self._codes)} windows): windows past it run the tokenizer "
                            "every epoch (pretrain.cache_targets_max_mb raises the limit)",
                            stacklevel=2,
                        )
                    self._left_out.add(index)
                    continue
                self._codes[index] = row.copy()
                self._held_bytes += size - freed


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without the host waiting for a GPU: host tensors are staged
    through pinned memory (a copy from pageable memory may wait for the device's queue)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def window_indices(batch: dict[str, Any]) -> torch.Tensor:
    """The batch's ``index``: (B,) dataset positions of its windows, which key the target
    cache and seed the masks (named when missing, rather than a bare KeyError)."""
    if "index" not in batch:
        raise ValueError(
            "a pretraining batch needs 'index', the (B,) dataset positions of its windows that "
            "seed their masks (eegfast.train.fit adds it; in a loop of your own, add it)"
        )
    return batch["index"]


def tokenizer_codes(
    ctx: StepContext,
    batch: dict[str, Any],
    x: torch.Tensor,
    input_chans: torch.Tensor,
    channel_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C·A) codes of the batch's windows from the frozen tokenizer, through
    ``ctx.target_cache`` when there is one."""
    cache = ctx.target_cache

    def encode(
        x: torch.Tensor, input_chans: torch.Tensor, channel_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.no_grad():
            return ctx.tokenizer.get_codebook_indices(
                x, input_chans, channel_padding_mask=channel_padding_mask
            )

    if cache is None:
        return encode(x, input_chans, channel_padding_mask)
    indices = window_indices(batch).tolist()
    rows = cache.rows(indices, x.shape[1] * x.shape[2])
    missing = [j for j, row in enumerate(rows) if row is None]
    if not missing:
        cache.hits += 1
        return to_device_async(torch.from_numpy(np.stack(rows)).long(), x.device)
    cache.misses += 1
    if len(missing) == len(rows):
        codes = encode(x, input_chans, channel_padding_mask)
        cache.put(indices, codes)
        return codes
    # Only the windows not cached are encoded (a window's codes depend on its samples alone):
    # once the cache is full, most batches hold a few such windows among cached ones. The
    # per-sample rows (electrodes (B, C + 1), padding (B, C)) are taken with them.
    # (row numbers made on the host and copied asynchronously: torch.tensor(.., device=) waits
    # for the GPU, at nearly every step once the cache is full)
    new_rows = to_device_async(torch.tensor(missing), x.device)
    mask = None if channel_padding_mask is None else channel_padding_mask[new_rows]
    chans = input_chans[new_rows] if input_chans.dim() == 2 else input_chans
    new = encode(x[new_rows], chans, mask)
    cache.put([indices[j] for j in missing], new)
    known = [j for j, row in enumerate(rows) if row is not None]
    codes = torch.empty(len(rows), new.shape[1], dtype=new.dtype, device=x.device)
    codes[new_rows] = new
    known_codes = torch.from_numpy(np.stack([rows[j] for j in known])).to(new.dtype)
    codes[to_device_async(torch.tensor(known), x.device)] = to_device_async(known_codes, x.device)
    return codes


@dataclass
class StepContext:
    """What a step may need besides the model and the batch."""

    device: torch.device
    seed: int = 0
    epoch: int = 0
    step: int = 0
    mask_ratio: float = 0.5
    tokenizer: nn.Module | None = None  # frozen, for masked-modelling targets
    target_cache: TargetCache | None = None  # the tokenizer's codes by window (pretraining)
    task_ids: dict[str, int] = field(default_factory=dict)  # task name -> head / router id
    route_by_task: bool = False
    aux_weights: dict[str, float] = field(default_factory=dict)  # MoE aux loss name -> weight
    class_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (K,) CE weights
    # Set by the engine for a step function with a ``normaliser`` hook, during each micro-batch
    # of an optimiser step (None otherwise): the (2,) float32 totals of the whole step that the
    # hook gives (summed over micro-batches and ranks), on the device, divided by
    # grad_accum x world size, i.e. one micro-batch of one rank's share of them. A step divides
    # its sums over the micro-batch's windows by it, so the engine's 1/grad_accum loss scaling
    # and the ranks' gradient average give the whole step's normalised loss.
    normaliser: torch.Tensor | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, in the graph
    # Detached scalars for logging: floats, or 0-d tensors left on the device (the engine reads
    # them back in one transfer at its log points, so steps never wait for the device).
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. logits for evaluation


StepFn = Callable[[nn.Module, dict[str, Any], StepContext], StepOutput]

_OBJECTIVES: dict[str, StepFn] = {}
LAZY_OBJECTIVES = {"hybrid": "eegfast.train.hybrid"}


def register_objective(name: str, step: StepFn) -> StepFn:
    """Make ``step`` available as ``eegfast pretrain --objective <name>``."""
    _OBJECTIVES[name] = step
    return step


def objective_names() -> list[str]:
    return sorted(set(_OBJECTIVES) | set(LAZY_OBJECTIVES))


def get_objective(name: str) -> StepFn:
    if name not in _OBJECTIVES and name in LAZY_OBJECTIVES:
        try:
            importlib.import_module(LAZY_OBJECTIVES[name])
        except ModuleNotFoundError as err:
            raise ValueError(
                f"pretrain objective {name!r} is not available in this build "
                f"({LAZY_OBJECTIVES[name]} is missing)"
            ) from err
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown pretrain objective {name!r}; choose one of {objective_names()}")
    return _OBJECTIVES[name]


# Batch entries the host reads (cache keys, mask seeds): they stay on the host.
HOST_KEYS = ("index", "mask_key")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``, but for ``index`` and ``mask_key``: the windows'
    dataset positions (and mask seeds) stay on the host, which reads them (the target cache's
    keys, the masks' seeds); read back from a GPU they would make the host wait for the device
    every step."""
    return {
        k: to_device_async(v, device) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
        for k, v in batch.items()
    }


def host_token_padding(batch: dict) -> torch.Tensor | None:
    """(B, C·A) bool token padding of a host batch (electrode-major tokens), or None without a
    padded electrode; read before the batch goes to the device (no host wait for it)."""
    padding = batch.get("channel_padding_mask")
    if padding is None or padding.device.type != "cpu" or not bool(padding.numpy().any()):
        return None
    patches = batch["x"].shape[2]
    return padding.repeat_interleave(patches, dim=1)


def sample_masks(
    indices: torch.Tensor,
    num_tokens: int,
    ratio: float,
    *,
    seed: int,
    epoch: int,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) dataset indices -> (B, num_tokens) bool, True = masked: ``ceil(ratio · n)`` of each
    row's n real tokens (as :func:`eegfast.models.random_patch_mask` and the reference).

    padding: (B, num_tokens) bool on the host, True = a padded electrode's token (never masked,
    and not counted: a batch padded to more electrodes masks the same share of real patches).
    Each row depends only on (seed, epoch, dataset index) and its padding, never on the rank or
    the batch it lands in, so single- and multi-process runs mask the same patches.
    """
    padded = None if padding is None else padding.numpy().astype(bool, copy=False)
    masks = np.zeros((len(indices), num_tokens), dtype=bool)
    for i, index in enumerate(indices.tolist()):
        valid = np.arange(num_tokens) if padded is None else np.flatnonzero(~padded[i])
        # float64 and a tolerance: ratio · n that is an integer (0.7 · 10) must not round up
        count = math.ceil(ratio * len(valid) - 1e-9)
        # modulo 2**63: manual_seed refuses larger seeds (train.seed 2**31 - 1 went past it)
        row_seed = ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
        generator = torch.Generator().manual_seed(row_seed)
        chosen = torch.randperm(len(valid), generator=generator)[:count].numpy()
        masks[i, valid[chosen]] = True
    return torch.from_numpy(masks)


def step_masks(ctx: StepContext, batch: dict, token_padding: torch.Tensor | None) -> torch.Tensor:
    """The step's (B, C·A) pretraining masks (:func:`sample_masks` of the batch's windows at
    ``ctx``'s ratio, seed and epoch), on ``ctx.device``; ``batch`` on the device already,
    ``token_padding`` from :func:`host_token_padding` of the host batch. The windows' masks are
    seeded by ``batch["mask_key"]`` (B,) where the batch has it (the validation's: keys of the
    windows' recordings, which do not move when data are added), else by their ``index``."""
    x = batch["x"]
    keys = batch.get("mask_key")
    mask = sample_masks(
        window_indices(batch) if keys is None else keys,
        x.shape[1] * x.shape[2],
        ctx.mask_ratio,
        seed=ctx.seed,
        epoch=ctx.epoch,
        padding=token_padding,
    )
    return to_device_async(mask, ctx.device)


def moe_aux_loss(model: nn.Module, weights: dict[str, float]) -> tuple[torch.Tensor | None, dict]:
    """Weighted sum of the MoE layers' auxiliary losses (None when the model has no MoE)."""
    if not weights:
        return None, {}
    try:
        from eegfast.nn import moe_aux_losses
    except ImportError:
        return None, {}
    losses = moe_aux_losses(model)
    unknown = sorted(set(weights) - set(losses)) if isinstance(losses, dict) else []
    if unknown:
        raise ValueError(
            f"unknown MoE aux loss name(s) {unknown} in the aux weights; the MoE layers report "
            f"{sorted(losses)}"
        )
    total = None
    logged = {}
    for name, weight in weights.items():
        value = losses.get(name) if isinstance(losses, dict) else None
        if isinstance(value, torch.Tensor) and weight:
            total = weight * value if total is None else total + weight * value
            logged[name] = value.detach()
    return total, logged


def tokenizer_step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
    """VQ-NSP: the model's own loss (commitment + Fourier amplitude/phase reconstruction)."""
    batch = to_device(batch, ctx.device)
    out = model(
        batch["x"], batch["input_chans"], channel_padding_mask=batch.get("channel_padding_mask")
    )
    metrics = {name: value.detach() for name, value in _scalars(out).items() if name != "loss"}
    return StepOutput(out.loss, metrics)


def masked_step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
    """Symmetric masked EEG modelling against the frozen tokenizer's codes."""
    if ctx.tokenizer is None:
        raise ValueError("masked pretraining needs a trained tokenizer (model.tokenizer=PATH)")
    token_padding = host_token_padding(batch)
    batch = to_device(batch, ctx.device)
    x, chans = batch["x"], batch["input_chans"]
    padding = batch.get("channel_padding_mask")
    targets = tokenizer_codes(ctx, batch, x, chans, padding)
    mask = step_masks(ctx, batch, token_padding)
    out = model(x, chans, targets, mask=mask, channel_padding_mask=padding)
    metrics = {k: v.detach() for k, v in _scalars(out).items() if k != "loss"}
    return StepOutput(out.loss, metrics)


register_objective("masked", masked_step)


def classification_step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
    """Cross-entropy on the batch's task head; MoE aux losses added with their weights.

    Windows with a negative label (-1: unlabelled, as the datasets store it) are left out of
    the loss and the accuracy; a batch without any labelled window gives a loss of 0.
    The (class-weighted) mean is over ``ctx.normaliser`` when the engine sets it (the whole
    optimiser step's totals from :func:`classification_normaliser`, its ``normaliser`` hook),
    else over the batch (under torch.distributed in training, every rank's share of it).
    """
    batch = to_device(batch, ctx.device)
    tasks = batch["task"]
    task = tasks[0]
    if any(t != task for t in tasks):
        raise ValueError("a classification batch must hold one task (the sampler groups by task)")
    kwargs: dict[str, Any] = {"channel_padding_mask": batch.get("channel_padding_mask")}
    if ctx.task_ids:
        kwargs["task"] = task
    if ctx.route_by_task:
        if task not in ctx.task_ids:
            raise ValueError(
                f"task {task!r} has no router id (route_by_task; known: {sorted(ctx.task_ids)})"
            )
        kwargs["task_id"] = torch.full(
            (batch["x"].shape[0],), ctx.task_ids[task], dtype=torch.long, device=ctx.device
        )
    logits = model(batch["x"], batch["input_chans"], **kwargs)
    labels = batch["label"]
    weight = ctx.class_weights.get(task)
    # The mean over labelled windows, written out (no host read of how many there are): the
    # same as F.cross_entropy's (weighted) mean, 0 instead of NaN when there are none.
    labelled = labels >= 0
    targets = torch.where(labelled, labels, -100)  # F.cross_entropy's ignore_index
    if weight is not None:
        # ctx's weights stay on the host (the normaliser hook reads them there): a plain
        # .to(device) from pageable memory made the host wait for the GPU at every step
        weight = to_device_async(weight, logits.device).float()
    per_window = F.cross_entropy(logits.float(), targets, weight=weight, reduction="none")
    from eegfast.nn._ranks import sum_over_ranks, world_size

    if ctx.normaliser is not None:
        # the engine's share of the whole optimiser step's totals, all micro-batches and
        # ranks (classification_normaliser's): grad_accum > 1 normalises as one batch
        totals = ctx.normaliser.to(per_window.device, torch.float32)
    else:
        # (weight sum, labelled windows) of the batch; in training under torch.distributed,
        # of every rank's share of it (no gradient), as this rank's terms times the world size
        # W: DDP / FSDP average the gradients over the ranks, and the engine the logged
        # values, so each rank's sum over its windows / (the batch's weight sum / W) averages
        # to the batch's weighted mean. Each rank's own weight sum had weighed the ranks alike
        # whatever their classes (or unlabelled windows), not the windows as one process does.
        totals = labelled_totals(labels, weight, torch.float32).detach()
        if model.training and world_size() > 1:
            totals = sum_over_ranks(totals) / world_size()
    loss = per_window.sum() / totals[0].clamp_min(torch.finfo(torch.float32).tiny)
    hits = ((logits.argmax(-1) == labels) & labelled).float().sum()
    metrics = {"accuracy": (hits / totals[1].clamp_min(torch.finfo(torch.float32).tiny)).detach()}
    aux, aux_logged = moe_aux_loss(model, ctx.aux_weights)
    if aux is not None:
        loss = loss + aux
        metrics.update(aux_logged)
    return StepOutput(loss, metrics, {"logits": logits.detach(), "labels": labels, "task": task})


def classification_normaliser(batch: dict[str, Any], ctx: StepContext) -> torch.Tensor:
    """(2,) float64 on the host: (class-weight sum, count) of the labelled windows (label >= 0)
    of a host batch, ``batch["label"]`` (B,) of ``batch["task"]`` weighted by
    ``ctx.class_weights`` (1 each without weights for the task).

    :func:`classification_step`'s ``normaliser`` hook: the engine sums it over an optimiser
    step's micro-batches (and ranks) before their forwards, so that ``train.grad_accum`` > 1
    divides by the whole step's weight sum, as one batch does. Host labels only: no wait for
    the device."""
    labels = torch.as_tensor(batch["label"]).cpu()
    task = batch["task"][0]
    weight = ctx.class_weights.get(task)
    if weight is not None:
        weight = weight.detach().cpu()
    try:
        return labelled_totals(labels, weight, torch.float64)
    except IndexError:
        past = int(labels.max())
        raise ValueError(
            f"label {past} of task {task!r} has no class weight: ctx.class_weights[{task!r}] "
            f"holds {weight.numel()} class weights (labels 0 to {weight.numel() - 1})"
        ) from None


def labelled_totals(
    labels: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(2,) of ``dtype``: (class-weight sum, count) of the labelled windows (label >= 0) of
    ``labels`` (B,), each weighted by ``weight[label]`` ((num_classes,); 1 each when None).
    :func:`classification_step`'s per-batch fallback and :func:`classification_normaliser`
    (host labels, float64) share it, so the two normalisations cannot drift apart."""
    labelled = labels >= 0
    if weight is None:
        norm = labelled.to(dtype)
    else:
        norm = weight.to(dtype)[labels.clamp_min(0)] * labelled
    return torch.stack([norm.sum(), labelled.to(dtype).sum()])


classification_step.normaliser = classification_normaliser  # type: ignore[attr-defined]


def _scalars(out: Any) -> dict[str, torch.Tensor]:
    """0-d tensors of a model output (dataclass, namedtuple or dict): its losses and metrics.
    Not every tensor of one element: a per-token field (the tokenizer's (B, C·A) ``indices``,
    the pretraining ``mask``) has one for a batch of one window of one patch, and was logged
    as a metric of those batches only (``train/indices``)."""
    if isinstance(out, dict):
        items = out.items()
    elif hasattr(out, "__dataclass_fields__"):
        items = ((k, getattr(out, k)) for k in out.__dataclass_fields__)
    elif hasattr(out, "_asdict"):
        items = out._asdict().items()
    else:
        items = vars(out).items()
    return {k: v for k, v in items if isinstance(v, torch.Tensor) and v.dim() == 0}
