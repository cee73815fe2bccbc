"""Vector quantizer of the VQ-NSP tokenizer, on eegfast's exact VQ kernels."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from eegfast.ops import vq_code_stats, vq_ema_update, vq_kmeans, vq_nearest
from eegfast.ops._backend import compiler_disable


class QuantizerOutput(NamedTuple):
    """What :class:`NormEMAVectorQuantizer` returns for inputs ``z`` (..., D).

    quantized (..., D) the codes (straight-through gradients to ``z``); loss () the
    commitment loss; indices (...,) int64 (-1: a row left out as padding, or non-finite where
    the quantizer does not raise on it); perplexity () exp(entropy) and usage () the
    fraction of the codes this batch uses; spread () the mean cosine distance between its
    l2-normalised inputs and dims () their effective number of directions (near 0 and near
    1: the encoder maps everything onto one line, and the codes carry little).
    """

    quantized: torch.Tensor  # (..., D): codes, with straight-through gradients to the input
    loss: torch.Tensor  # (): commitment loss, beta · mean |sg(code) - z|^2
    indices: torch.Tensor  # (...,) int64
    perplexity: torch.Tensor  # (): exp(entropy) of this batch's code usage
    usage: torch.Tensor  # (): fraction of codes used by this batch
    # (): 1 - |mean of the batch's l2-normalised inputs|^2, the mean cosine distance between
    # its rows (pairs with themselves included). ~0 when the encoder maps everything to one
    # direction; then the codes carry no information even where perplexity looks healthy
    # (dead-code restarts spread codes over that one direction). In training under
    # torch.distributed, spread and dims are of every rank's rows together.
    spread: torch.Tensor
    # (): effective number of directions of those inputs (feature_dims): ~1 when they all lie
    # on one line through the origin, which spread misses when they split into two opposite
    # directions
    dims: torch.Tensor


def _counted_rows(
    unit: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (N, D) with those not counted set to 0, how many are counted ()): a row counts
    when it is finite and, given ``keep`` (N,), kept."""
    counted = torch.isfinite(unit).all(dim=1)
    if keep is not None:
        counted = counted & keep
    return torch.where(counted[:, None], unit, 0.0), counted.sum()


def feature_spread(unit: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """1 - |mean row|^2 of l2-normalised rows (N, D) (only rows with ``keep`` (N,) True).

    For unit rows u_i, |mean u|^2 is the mean cosine similarity over all pairs (i, j), so this
    is the mean cosine distance: 0 when every row points the same way, ~1 for rows spread
    evenly over the sphere. O(N D), no pairwise matrix. Rows that are not finite count as 0.
    """
    rows, count = _counted_rows(unit, keep)
    mean = rows.sum(dim=0) / count.clamp_min(1)
    return _spread(mean)


def _spread(mean: torch.Tensor) -> torch.Tensor:
    """feature_spread from the mean (D,) of the counted rows."""
    return 1.0 - mean.square().sum()


def _dims(second: torch.Tensor) -> torch.Tensor:
    """feature_dims from the second moment (D, D) of the counted rows."""
    return second.diagonal().sum().square() / second.square().sum().clamp_min(1e-30)


def feature_dims(unit: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Effective number of directions of l2-normalised rows (N, D) (only rows with ``keep``
    (N,) True): the participation ratio (tr M)^2 / tr(M^2) of their second moment M = mean u u^T,
    i.e. (sum of M's eigenvalues)^2 / (sum of their squares).

    1 when every row lies on one line through the origin: one direction (the collapse that
    :func:`feature_spread` sees too) or two opposite ones (which it reads as healthy), up to D
    for rows spread evenly over the sphere. O(N D^2); rows that are not finite count as 0; 0
    when no row counts.
    """
    rows, count = _counted_rows(unit, keep)
    rows = rows.float()
    with torch.autocast(rows.device.type, enabled=False):  # in fp32 under a bf16 training step
        second = rows.T @ rows / count.clamp_min(1)
    return _dims(second)


def _spread_and_dims_over_ranks(
    unit: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`feature_spread` and :func:`feature_dims` of the rows (N_r, D) of every process
    together (the same on every rank): their sums, second-moment sums and counts all-reduced
    in one collective of D² + D + 1 floats. Each rank's own value, averaged over the ranks as
    the engine logs scalars, was lower than the global batch's (fewer rows, and spread is
    convex in the mean), so N processes logged other values than one process."""
    rows, count = _counted_rows(unit, keep)
    rows = rows.float()
    with torch.autocast(rows.device.type, enabled=False):  # in fp32 under a bf16 training step
        second = rows.T @ rows
    D = rows.shape[1]
    packed = torch.cat([rows.sum(dim=0), second.reshape(-1), count.reshape(1).float()])
    dist.all_reduce(packed)
    count = packed[-1].clamp_min(1)
    return _spread(packed[:D] / count), _dims(packed[D:-1].view(D, D) / count)


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage distribution that ``counts`` (K,) give (uses, or EMA
    counts): 1 when one code takes everything, K when all K are used equally. A 0-d tensor on
    ``counts``' device (no host sync); all-zero counts give 1."""
    counts = counts if counts.is_floating_point() else counts.double()
    probs = counts / counts.sum().clamp_min(1e-12)
    return torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())


class CodebookEMA(nn.Module):
    """Holds the codebook and its EMA state; named as the reference tokenizer's
    ``quantize.embedding`` so state dicts load both ways (``weight``, ``cluster_size``,
    ``embed_avg``, ``initted``).

    ``weight`` (K, D) is a buffer, not a parameter as in the reference (same key): the EMA
    writes it in place during the forward, and FSDP shards parameters and gathers them into a
    temporary full copy for the forward, so writes to a parameter codebook were dropped there
    (the k-means init and every EMA step lost). Buffers stay whole on every rank."""

    def __init__(self, num_codes: int, code_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype or torch.float32}
        weight = F.normalize(torch.randn(num_codes, code_dim, **factory), dim=1)
        self.register_buffer("weight", weight)  # updated by EMA, not by SGD
        self.register_buffer("cluster_size", torch.zeros(num_codes, **factory))
        self.register_buffer("embed_avg", weight.clone())
        self.register_buffer("initted", torch.zeros(1, **factory))

    def extra_repr(self) -> str:
        return f"num_codes={self.weight.shape[0]}, code_dim={self.weight.shape[1]}"


_NON_FINITE_INPUT = (
    "NormEMAVectorQuantizer: input vectors contain NaN or inf; the encoder output is not finite"
)


class NormEMAVectorQuantizer(nn.Module):
    """Cosine vector quantizer with an EMA-updated, l2-normalised codebook.

    Inputs are l2-normalised, matched to their nearest code by cosine similarity (exact, see
    :func:`eegfast.ops.vq_nearest`), and replaced by it with a straight-through estimator. In
    training mode the codebook follows an EMA of the assigned inputs (all-reduced across
    processes), is initialised by spherical k-means on the first batch (of all processes
    together: the rows of every rank are gathered), and optionally re-seeds dead codes (drawn
    among the rows of every rank): N processes train the codebook one process would on their
    batches concatenated.

    State-dict keys match the reference tokenizer's ``quantize.*``.

    Args:
        num_codes: K (8192 in LaBraM).
        code_dim: D (32 or 64 in LaBraM).
        beta: commitment loss weight.
        decay: EMA decay of counts and sums.
        eps: Laplace smoothing of the counts.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: k-means iterations.
        dead_code_threshold: re-seed codes whose EMA count falls below this, in [0, 1] (the
            count a restart starts from; None: never, as in the reference).
        check_finite: raise FloatingPointError on non-finite inputs instead of giving them
            index -1. The check reads the indices back: on a GPU a wait for the device at every
            call. None (the default): on CPU tensors only; on a GPU such rows still get index
            -1, stay out of the EMA update and make the loss non-finite, which the training
            loop reports at its next read-back. Under torch.compile on CPU the check runs in
            the graph (no graph break) and raises RuntimeError instead.
        device: where the codebook and its EMA state live.
        dtype: None or torch.float32: they are float32 in a model of any dtype.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        *,
        beta: float = 1.0,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float | None = None,
        check_finite: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_codes <= 0 or code_dim <= 0:
            raise ValueError(
                f"num_codes and code_dim must be positive, got {num_codes}, {code_dim}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not (eps >= 0.0 and math.isfinite(eps)):
            # a negative eps turned the codes of rarely used clusters to face away from their
            # rows; NaN made every code NaN, reported as a non-finite encoder output
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if dtype not in (None, torch.float32):
            # a bf16 EMA stalls and a float64 codebook is refused by the VQ kernels; as after
            # model.to(dtype) (see _apply), the state is float32 in a model of any dtype
            raise ValueError(
                f"dtype must be None or torch.float32 (the codebook and its EMA state), got {dtype}"
            )
        if dead_code_threshold is not None and not 0.0 <= dead_code_threshold <= 1.0:
            # A restart (and the k-means initialisation) sets a code's EMA count to 1: above a
            # threshold of 1 the code stays below it unless one batch gives it about
            # (threshold - decay) / (1 - decay) rows (~100 at 2), so nearly every code was
            # re-seeded from random rows at every step and the codebook learned nothing.
            raise ValueError(
                f"dead_code_threshold must be in [0, 1] or None, got {dead_code_threshold}: a "
                "restarted code starts from an EMA count of 1 and above 1 would be re-seeded "
                "again at every step"
            )
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.decay, self.eps = beta, decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.check_finite = check_finite
        # embedding.initted as last seen on the host, not read at every training call (a wait
        # for the device on a GPU). Known here and set again by load_state_dict (a post hook),
        # outside any compiled region: read lazily at the first training call instead, it
        # broke a compiled step's graph (Tensor.item) after every construction and load.
        # None: unknown (a meta-device load), read at the next training call.
        self._initialised: bool | None = not kmeans_init
        self.embedding = CodebookEMA(num_codes, code_dim, device=device, dtype=dtype)
        self.register_buffer(
            "cluster_size", torch.zeros(num_codes, device=device, dtype=dtype or torch.float32)
        )
        if not kmeans_init:
            self.embedding.initted.fill_(1)
        self.register_load_state_dict_post_hook(NormEMAVectorQuantizer._align_ema_sums)
        self.register_load_state_dict_post_hook(NormEMAVectorQuantizer._read_initted)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) l2-normalised codes."""
        return self.embedding.weight

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, "
            f"decay={self.decay}, dead_code_threshold={self.dead_code_threshold}"
        )

    def forward(self, z: torch.Tensor, valid: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``z`` (..., D); returns quantized (..., D), loss, indices (...,), metrics.

        ``valid`` (...) bool, or None (all): rows left out (padding) get index -1, no part in
        the codebook's update, the loss or the statistics, and code 0's vector as output (mask
        it). Leaving them out this way keeps every shape static (no boolean indexing, which on a
        GPU waits for the device)."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"z must have last dim code_dim = {self.code_dim}, got {z.shape[-1]}")
        if valid is not None and valid.shape != z.shape[:-1]:
            raise ValueError(
                f"valid must have z's leading shape {tuple(z.shape[:-1])}, got {tuple(valid.shape)}"
            )
        codebook = self.embedding.weight
        flat = F.normalize(z.reshape(-1, self.code_dim).to(codebook.dtype), dim=1)
        keep = None if valid is None else valid.reshape(-1).to(torch.bool)
        if self.training and not self._is_initialised():
            # k-means ignores non-finite rows: the left-out ones are made so
            rows = flat.detach()
            self._initialise(rows if keep is None else rows.masked_fill(~keep[:, None], math.nan))
        indices = vq_nearest(flat.detach(), codebook, "cosine")
        check = flat.device.type == "cpu" if self.check_finite is None else self.check_finite
        missing = (indices < 0) if keep is None else (indices < 0) & keep
        if check and torch.compiler.is_compiling() and flat.device.type == "cpu":
            # Traced, the host read below breaks the graph at every step: the check runs in
            # the graph instead (a RuntimeError with this message, without the count).
            torch._assert_async(~missing.any(), _NON_FINITE_INPUT)
        elif check and bool(missing.any()):
            bad = int(missing.sum())
            raise FloatingPointError(
                f"NormEMAVectorQuantizer: {bad} of {indices.numel()} input vectors contain NaN "
                "or inf; the encoder output is not finite"
            )
        if keep is not None:
            indices = torch.where(keep, indices, -1)
        quantized = F.embedding(indices.clamp_min(0), codebook)
        if self.training:
            stats = vq_ema_update(
                flat.detach(),
                indices,
                codebook.data,
                self.cluster_size,
                self.embedding.embed_avg,
                decay=self.decay,
                eps=self.eps,
                dead_code_threshold=self.dead_code_threshold,
            )
            self.embedding.cluster_size.copy_(self.cluster_size)
            counts = stats["counts"]
        else:
            counts = vq_code_stats(flat.detach(), indices, self.num_codes)[0]
        if keep is None:
            loss = self.beta * F.mse_loss(quantized.detach(), flat)
        else:
            squared = torch.where(keep, (quantized.detach() - flat).square().mean(dim=1), 0.0)
            loss = self.beta * squared.sum() / keep.sum().clamp_min(1)
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        perplexity = code_perplexity(counts)
        usage = (counts > 0).float().mean()
        if self.training and dist.is_available() and dist.is_initialized():
            # every rank is here together (the EMA update's all-reduce): the global batch's
            # values, as perplexity and usage are of its all-reduced counts
            spread, dims = _spread_and_dims_over_ranks(flat.detach(), keep)
        else:
            spread, dims = feature_spread(flat.detach(), keep), feature_dims(flat.detach(), keep)
        return QuantizerOutput(
            quantized.reshape(*z.shape[:-1], self.code_dim).to(z.dtype),
            loss,
            indices.reshape(z.shape[:-1]),
            perplexity,
            usage,
            spread,
            dims,
        )

    def _is_initialised(self) -> bool:
        # (while False, read again: initted may have been set by another path, e.g. a buffer
        # copy; a read only until the k-means initialisation, which breaks the graph anyway)
        if not self._initialised:
            self._initialised = bool(self.embedding.initted.item())
        return self._initialised

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._initialised = None  # the loaded initted decides (see _read_initted)
        super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def _read_initted(module: NormEMAVectorQuantizer, incompatible_keys) -> None:
        """After a load (of this module or a model holding it, under any key prefix; with
        ``strict=False`` and no ``initted`` key, the buffer as it is): the loaded ``initted``
        decides whether the first training call initialises the codebook, read here, once,
        so that a compiled step reads nothing back."""
        initted = module.embedding.initted
        module._initialised = None if initted.is_meta else bool(initted.item())

    def _apply(self, fn, recurse: bool = True):
        """As ``nn.Module._apply``, then the codebook and EMA buffers back to float32:
        ``model.to(torch.bfloat16)`` (or ``.half()``, ``.double()``) casts every floating
        buffer, and a bf16 EMA stalls (0.99 x 7 + 0.08 rounds back to 7), a bf16 codebook
        rounds the nearest-code scores, and a float64 one was refused by the VQ kernels (which
        take float32 at most) at the next forward. Device moves are kept as asked."""
        super()._apply(fn, recurse)
        for module in (self, self.embedding):
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[name] = buffer.float()
        return self

    @staticmethod
    @torch.no_grad()
    def _align_ema_sums(module: NormEMAVectorQuantizer, incompatible_keys) -> None:
        """After a load: rebuild the EMA sums (``embedding.embed_avg``, (K, D)) of codes they do
        not point along, as code × EMA count (``cluster_size`` unit rows on the code).

        The EMA update keeps every code the direction of its EMA sum. The reference tokenizer
        EMA-updates ``embedding.weight`` itself and never touches ``embed_avg``, so its
        checkpoints hold the random initial codebook there: training on from one would turn
        every code towards that random direction at the first step. eegfast's own checkpoints
        already agree (a no-op for them)."""
        codes, sums = module.embedding.weight, module.embedding.embed_avg
        if codes.shape != sums.shape or module.cluster_size.shape != codes.shape[:1]:
            return  # a mismatched load; it reports the shapes itself
        aligned = (F.normalize(sums.float(), dim=1) * codes.float()).sum(dim=1) > 1 - 1e-4
        rebuilt = codes.float() * module.cluster_size.float()[:, None]
        sums.copy_(torch.where(aligned[:, None], sums.float(), rebuilt).to(sums.dtype))

    # Runs once, full of data-dependent shapes and collectives: eager even in a compiled model
    # (traced, the gathers of variable row counts left unwaited collectives behind).
    @compiler_disable
    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """k-means codebook from the finite rows of ``flat`` (N, D): of every process's batch
        where torch.distributed is initialised, concatenated in rank order, so that N processes
        start from the codebook that one process would on their batches together."""
        rows = flat[torch.isfinite(flat).all(dim=1)]  # k-means ignores the others: not sent
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            rows = _gather_rows(rows)
        if rows.shape[0] == 0:
            # Every row (of every rank) is padding or not finite: nothing to start from, so the
            # next batch initialises (this one's EMA step moves no code). k-means refused the
            # empty rows with an error about its own z, and an all-NaN batch was not reported
            # as the non-finite encoder output it is.
            return
        codes = vq_kmeans(rows, self.num_codes, iters=self.kmeans_iters, metric="cosine")
        if distributed:
            # Every rank ran the same k-means on the same rows; rank 0's result is sent all the
            # same, as the ranks' random number generators may not agree.
            dist.broadcast(codes, src=0)
        self.embedding.weight.data.copy_(codes)
        self.embedding.embed_avg.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.embedding.cluster_size.fill_(1.0)
        self.embedding.initted.fill_(1)
        self._initialised = True


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows (N_r, D) of every process concatenated in rank order (sum N_r, D); the ranks
    may hold different numbers of rows (padding left out), so the counts are gathered first."""
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = rows.new_zeros(max(sizes), rows.shape[1])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
