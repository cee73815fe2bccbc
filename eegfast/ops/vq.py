"""VQ nearest-code lookup and EMA codebook updates (the core of the VQ-NSP tokenizer).

Public functions:

- :func:`vq_nearest` — index (and optionally score) of the nearest code for every row.
- :func:`vq_code_stats` — per-code counts and sums of the rows assigned to each code.
- :func:`vq_ema_update` — EMA codebook update with Laplace smoothing, l2 renormalisation,
  dead-code restart and all-reduce across processes.
- :func:`vq_kmeans` — k-means (cosine or l2) initialisation built on the same two kernels.

Each op has a float64 reference here (``*_reference``), C++ CPU and CUDA kernels in csrc/vq/
(``torch.ops.eegfast.vq_nearest`` / ``vq_code_stats``) and Triton kernels in
:mod:`eegfast.ops.vq_triton` (``torch.ops.eegfast.vq_nearest_triton`` / ``vq_code_stats_triton``).
All kernels agree with the reference *exactly* on indices, see :func:`vq_nearest_reference`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from eegfast.ops._backend import automatic_gpu_candidates, extension, resolve_backend
from eegfast.ops._variants import measured_choice

Metric = Literal["cosine", "l2"]

NORM_EPS = 1e-12  # as torch.nn.functional.normalize
TIE_TOLERANCE = 1e-12  # float64 scores this close to the best count as ties -> lowest index
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# GPU backends. Where both are ready and the backend is automatic, vq_nearest times them per
# case and keeps the faster (see _fastest_nearest_backend); otherwise the first ready one runs.
GPU_PREFERENCE = ("triton", "cuda")


# --------------------------------------------------------------------------------------------
# Reference implementations (float64, differentiable): the definition of correctness.
# --------------------------------------------------------------------------------------------


def vq_nearest_reference(
    z: torch.Tensor, codebook: torch.Tensor, metric: Metric = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force float64 nearest code: materialises the (N, K) score matrix.

    Score of code k for row z: cosine ``z·c_k / (max(|z|, eps) max(|c_k|, eps))`` (maximised) or
    l2 ``|z - c_k|^2`` (minimised). Among codes within ``TIE_TOLERANCE`` (relative to the
    score scale, the largest norm of a finite code for l2) of the best, the lowest index wins.
    Rows with a NaN or inf element get index -1 and score NaN. Codes with a NaN or inf element
    are never chosen (their score is NaN or an infinite distance); a row that no code can score
    (every code non-finite) gets index -1 and score NaN as well.

    Args:
        z: (N, D) float tensor.
        codebook: (K, D) float tensor, same dtype and device as ``z``.
    Returns:
        indices (N,) int64 and scores (N,) float32 (cosine similarity or squared distance).
    """
    _check_inputs(z, codebook, metric)
    z64, c64 = z.double(), codebook.double()
    z_sq = (z64 * z64).sum(1)
    c_norm = c64.norm(dim=1)
    dots = z64 @ c64.T  # (N, K)
    if metric == "cosine":
        scores = dots / (z_sq.sqrt().clamp_min(NORM_EPS)[:, None] * c_norm.clamp_min(NORM_EPS))
        tolerance = torch.full_like(z_sq, TIE_TOLERANCE)
    else:
        scores = -(z_sq[:, None] - 2 * dots + (c_norm * c_norm)[None, :])
        # finite codes only: one NaN code made the tolerance NaN (no candidate: index 0 for
        # every row), one inf code made it inf (every code a candidate: index 0 again)
        finite_norm = torch.where(torch.isfinite(c_norm), c_norm, 0.0)
        tolerance = TIE_TOLERANCE * (z_sq + finite_norm.max() ** 2)
    scores = scores.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    best = scores.max(dim=1).values
    is_candidate = scores >= (best - tolerance)[:, None]
    indices = is_candidate.to(torch.int8).argmax(dim=1)  # first candidate = lowest index
    # a best of -inf: no code has a usable score (all NaN, or all at infinite distance)
    finite = torch.isfinite(z64).all(dim=1) & (best > -torch.inf)
    indices = torch.where(finite, indices, torch.full_like(indices, -1))
    # no NaN gradients from rows without a code: neither from their own non-finite z nor from
    # code 0, which the clamped index -1 names and which may be non-finite itself
    chosen = torch.where(finite[:, None], c64[indices.clamp_min(0)], 0.0)
    z_safe = torch.where(finite[:, None], z64, 0.0)
    if metric == "cosine":
        chosen_scores = (z_safe * chosen).sum(1) / (
            z_safe.norm(dim=1).clamp_min(NORM_EPS) * chosen.norm(dim=1).clamp_min(NORM_EPS)
        )
    else:
        chosen_scores = ((z_safe - chosen) ** 2).sum(1)
    chosen_scores = torch.where(finite, chosen_scores, torch.full_like(chosen_scores, torch.nan))
    return indices, chosen_scores.float()


def vq_code_stats_reference(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts (K,) and sums (K, D) in float32 of the rows of ``z`` (N, D) assigned by
    ``indices`` (N,) int64; index -1 (non-finite rows) is skipped (values unchecked:
    :func:`vq_code_stats` checks them for this backend)."""
    _check_stats_inputs(z, indices, num_codes)
    keep = indices >= 0
    codes = indices.clamp_min(0)
    counts = torch.zeros(num_codes, dtype=torch.float32, device=z.device)
    counts = counts.index_add(0, codes, keep.float())
    sums = torch.zeros(num_codes, z.shape[1], dtype=torch.float32, device=z.device)
    # where, not a product with keep: a skipped row's NaN times 0 is still NaN.
    sums = sums.index_add(0, codes, torch.where(keep[:, None], z.float(), 0.0))
    return counts, sums


# --------------------------------------------------------------------------------------------
# Argument checks shared by all backends (the C++ kernels repeat them for direct callers).
# --------------------------------------------------------------------------------------------


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape (N, D), got {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0)")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has D = {z.shape[1]} but codebook has D = {codebook.shape[1]}")
    if z.shape[1] == 0:
        raise ValueError("D must be positive")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"z must be float32, float16 or bfloat16, got {z.dtype}")
    if codebook.dtype != z.dtype:
        raise TypeError(f"z is {z.dtype} but codebook is {codebook.dtype}; pass both in one dtype")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}")


def _check_stats_inputs(z: torch.Tensor, indices: torch.Tensor, num_codes: int) -> None:
    if z.dim() != 2:
        raise ValueError(f"z must have shape (N, D), got {tuple(z.shape)}")
    if indices.shape != (z.shape[0],):
        raise ValueError(
            f"indices must have shape (N,) = ({z.shape[0]},), got {tuple(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if num_codes <= 0:
        raise ValueError(f"num_codes must be positive, got {num_codes}")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"z must be float32, float16 or bfloat16, got {z.dtype}")
    if indices.device != z.device:
        raise ValueError(f"indices is on {indices.device} but z is on {z.device}")


# --------------------------------------------------------------------------------------------
# Custom-op glue: fake (meta) kernels and autograd for the C++/CUDA and Triton ops.
# --------------------------------------------------------------------------------------------


def _nearest_fake(z: torch.Tensor, codebook: torch.Tensor, metric: str):
    return z.new_empty(z.shape[0], dtype=torch.float32), z.new_empty(z.shape[0], dtype=torch.int64)


def _stats_fake(z: torch.Tensor, indices: torch.Tensor, num_codes: int):
    return (
        z.new_empty(num_codes, dtype=torch.float32),
        z.new_empty(num_codes, z.shape[1], dtype=torch.float32),
    )


def _nearest_setup_context(ctx, inputs, output) -> None:
    z, codebook, metric = inputs
    scores, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.metric = metric
    ctx.save_for_backward(z, codebook, indices, scores)


def _nearest_backward(ctx, grad_scores, grad_indices):
    """Gradient of the chosen score: cosine ``s = z·c/(|z||c|)`` or l2 ``s = |z - c|^2``."""
    z, codebook, indices, scores = ctx.saved_tensors
    valid = indices >= 0
    codes = indices.clamp_min(0)
    zf, chosen = z.float(), codebook[codes].float()
    grad = torch.where(valid, grad_scores, torch.zeros_like(grad_scores))[:, None]
    if ctx.metric == "cosine":
        z_norm = zf.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        c_norm = chosen.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        s = torch.where(valid, scores, torch.zeros_like(scores))[:, None]
        d_z = chosen / (z_norm * c_norm) - s * zf / (z_norm * z_norm)
        d_c = zf / (z_norm * c_norm) - s * chosen / (c_norm * c_norm)
    else:
        d_z = 2 * (zf - chosen)
        d_c = -d_z
    # where(), not a multiplication by 0: rows with NaN / inf in z must give 0, not NaN.
    keep = valid[:, None]
    grad_z = torch.where(keep, grad * d_z, 0.0).to(z.dtype)
    grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
    grad_codebook = grad_codebook.index_add(0, codes, torch.where(keep, grad * d_c, 0.0))
    grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_z, grad_codebook, None


def _stats_setup_context(ctx, inputs, output) -> None:
    _, indices, _ = inputs
    ctx.save_for_backward(indices)


def _stats_backward(ctx, grad_counts, grad_sums):
    (indices,) = ctx.saved_tensors
    keep = (indices >= 0)[:, None]
    grad_z = torch.where(keep, grad_sums[indices.clamp_min(0)], torch.zeros_like(grad_sums[:1]))
    return grad_z, None, None


def _register_op_glue(nearest_op: str, stats_op: str) -> None:
    torch.library.register_fake(nearest_op)(_nearest_fake)
    torch.library.register_fake(stats_op)(_stats_fake)
    torch.library.register_autograd(
        nearest_op, _nearest_backward, setup_context=_nearest_setup_context
    )
    torch.library.register_autograd(stats_op, _stats_backward, setup_context=_stats_setup_context)


if extension() is not None:
    _register_op_glue("eegfast::vq_nearest", "eegfast::vq_code_stats")


def _triton_ops():
    """The Triton ops module, imported on first use (triton is optional)."""
    from eegfast.ops import vq_triton

    return vq_triton


# --------------------------------------------------------------------------------------------
# Public ops.
# --------------------------------------------------------------------------------------------


def vq_nearest(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: Metric = "cosine",
    *,
    return_scores: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every row, exactly, without forming the (N, K) distance matrix.

    Args:
        z: (N, D) float32 / float16 / bfloat16; N may be 0. Any strides.
        codebook: (K, D), same dtype and device as ``z``, K >= 1.
        metric: ``"cosine"`` (largest cosine similarity) or ``"l2"`` (smallest squared
            Euclidean distance).
        return_scores: also return the chosen code's score (N,) float32: cosine similarity or
            squared distance. Differentiable with respect to ``z`` and ``codebook``.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (automatic; see
            :mod:`eegfast.ops`).

    Returns:
        indices (N,) int64, and scores (N,) float32 if ``return_scores``.

    Exactness: the index equals :func:`vq_nearest_reference` (float64 brute force, ties to the
    lowest index) for every input dtype: fp32 accumulation with a proven error bound, and rows
    whose best and second-best scores are closer than that bound are re-scored in float64.
    Rows of ``z`` with a NaN or inf element get index -1 and score NaN (never a valid-looking
    index); :class:`eegfast.nn.NormEMAVectorQuantizer` turns them into an error. Codes with a
    NaN or inf element are never chosen; if no code is finite, every row gets -1.
    """
    _check_inputs(z, codebook, metric)
    chosen = resolve_backend(backend, z.device, GPU_PREFERENCE)
    # Timed in eager calls only: while torch.compile traces, sizes may be symbolic and the
    # first ready backend runs.
    candidates = () if torch.compiler.is_compiling() else (
        automatic_gpu_candidates(backend, z.device, GPU_PREFERENCE)
    )  # fmt: skip
    if len(candidates) > 1:
        (N, D), K = z.shape, codebook.shape[0]
        chosen = _fastest_nearest_backend(
            candidates, str(z.device), z.dtype, max(1, N - 1).bit_length(), K, D, metric
        )
    indices, scores = _nearest(chosen, z, codebook, metric)
    return (indices, scores) if return_scores else indices


def _nearest(
    backend: str, z: torch.Tensor, codebook: torch.Tensor, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor]:
    """vq_nearest's indices and scores on a resolved backend."""
    if backend == "reference":
        return vq_nearest_reference(z, codebook, metric)
    if backend == "triton":
        scores, indices = _triton_ops().vq_nearest_triton(z, codebook, metric)
    else:
        scores, indices = torch.ops.eegfast.vq_nearest(z, codebook, metric)
    return indices, scores


def _fastest_nearest_backend(
    candidates: tuple[str, ...],
    device: str,
    dtype: torch.dtype,
    rows_log2: int,
    K: int,
    D: int,
    metric: str,
) -> str:
    """The faster of ``candidates`` for vq_nearest on ``device``: timed the first time a case
    (dtype, rows rounded up to 2 ** rows_log2, K, D, metric) is seen, on random rows and codes
    (the kernels' time does not depend on the values: every code is scored for every row,
    and rows that need a float64 re-score are rare in either kernel)."""

    def make_run():
        gen = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(2**rows_log2, D, device=device, dtype=dtype, generator=gen)
        codebook = torch.randn(K, D, device=device, dtype=dtype, generator=gen)
        return lambda backend: _nearest(backend, z, codebook, metric)  # type: ignore[arg-type]

    case = (device, dtype, rows_log2, K, D, metric)
    return measured_choice("vq_nearest", case, list(candidates), make_run, measure=True)


def vq_code_stats(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and sums without a one-hot matrix.

    Args:
        z: (N, D) float32 / float16 / bfloat16.
        indices: (N,) int64 in [-1, num_codes); -1 rows (non-finite z) are skipped.
        num_codes: K.
    Returns:
        counts (K,) float32 and sums (K, D) float32. Differentiable with respect to ``z``.

    Under ``torch.use_deterministic_algorithms(True)`` GPU tensors take the reference path
    (the GPU kernels' float atomics add in a varying order).
    """
    _check_stats_inputs(z, indices, num_codes)
    chosen = resolve_backend(backend, z.device, GPU_PREFERENCE)
    if (
        chosen != "reference"
        and z.device.type != "cpu"
        and torch.are_deterministic_algorithms_enabled()
    ):
        # the GPU kernels add rows up with float atomics (the order, and so the rounding,
        # varies from run to run); index_add has a deterministic CUDA path in this mode
        chosen = "reference"
    if chosen == "reference":
        # the C++ kernel refuses indices outside [-1, K); the reference skipped every negative
        # one (clamp and mask) and failed on K or more with an IndexError naming no argument.
        # CPU tensors only, as moe_combine: elsewhere the check would cost a host sync (and
        # cannot read meta tensors)
        checked = z.device.type == "cpu" and indices.numel() > 0
        if checked and not torch.compiler.is_compiling():
            low, high = int(indices.min()), int(indices.max())
            if low < -1 or high >= num_codes:
                raise ValueError(
                    f"indices must be in [-1, {num_codes}) (num_codes = {num_codes}), "
                    f"got {low} .. {high}"
                )
        return vq_code_stats_reference(z, indices, num_codes)
    if chosen == "triton":
        return _triton_ops().vq_code_stats_triton(z, indices, num_codes)
    return torch.ops.eegfast.vq_code_stats(z, indices, num_codes)


@torch.no_grad()
def vq_ema_update(
    z: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    normalize: bool = True,
    dead_code_threshold: float | None = None,
    generator: torch.Generator | None = None,
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """One EMA step of the codebook, in place.

    ``cluster_size <- decay·cluster_size + (1 - decay)·counts``,
    ``embed_sum <- decay·embed_sum + (1 - decay)·sums``, then every code becomes
    ``embed_sum / smoothed_count`` (Laplace smoothing with ``eps``), l2-normalised if
    ``normalize``. With ``normalize``, codes that no row of this step (of any rank) is
    assigned to keep their value, as in the reference; without, codes that no row has ever
    been assigned to keep theirs.

    When ``torch.distributed`` is initialised, counts and sums are all-reduced (summed) over
    ``process_group`` first, so every rank applies the same update.

    Dead-code restart: codes whose EMA count is below ``dead_code_threshold`` are re-seeded
    from rows of the current batch chosen at random among those with a code, with their EMA
    state reset to count 1. Under torch.distributed the rows are drawn among those of every
    rank's batch, as one process would from the batches concatenated in rank order (with rank
    0's ``generator`` state): the same seeds on every rank, and the same as one process.

    Args:
        z: (N, D) encoder outputs (any float dtype the ops accept).
        indices: (N,) int64 codes from :func:`vq_nearest` (-1 rows are skipped: non-finite
            ones, or rows a caller leaves out, such as padding).
        codebook: (K, D) float32 codebook, updated in place.
        cluster_size: (K,) float32 EMA counts, updated in place.
        embed_sum: (K, D) float32 EMA sums, updated in place.
    Returns:
        ``{"counts": (K,), "dead": (K,) bool}``: this batch's (all-reduced) counts and which
        codes were restarted.
    """
    K, D = codebook.shape
    if cluster_size.shape != (K,):
        raise ValueError(f"cluster_size must have shape ({K},), got {tuple(cluster_size.shape)}")
    if embed_sum.shape != (K, D):
        raise ValueError(f"embed_sum must have shape ({K}, {D}), got {tuple(embed_sum.shape)}")
    if z.dim() != 2 or z.shape[1] != D:
        raise ValueError(f"z must have shape (N, {D}), got {tuple(z.shape)}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    # a negative eps can make a smoothed count negative, and the code then points the
    # opposite way after the division (silently, as normalisation keeps the sign)
    if not 0.0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    counts, sums = vq_code_stats(z, indices, K, backend=backend)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(counts, group=process_group)
        dist.all_reduce(sums, group=process_group)
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums.to(embed_sum.dtype), alpha=1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + K * eps) * total
    updated = embed_sum / smoothed[:, None]
    if normalize:
        updated = torch.nn.functional.normalize(updated, dim=1, eps=NORM_EPS)
        # Only the codes this step's rows chose (as the reference): another code's EMA sum
        # only decays, keeping its direction, and recomputing it from the shrinking sum shrank
        # the code itself once the sum fell under normalize's eps (after ~4000 steps unused at
        # decay 0.99; then it could never score again) and bent it as the sum went subnormal.
        changed = counts > 0
    else:
        changed = cluster_size > 0  # Laplace smoothing scales every code ever used
    codebook.copy_(torch.where(changed[:, None], updated.to(codebook.dtype), codebook))

    dead = torch.zeros(K, dtype=torch.bool, device=codebook.device)
    if dead_code_threshold is not None and (distributed or z.shape[0] > 0):
        # Draw replacements among the rows that were given a code (finite ones, not left out
        # with index -1), of every process's batch; without any, nothing is restarted.
        drawable = (indices >= 0) & torch.isfinite(z).all(dim=1)
        seeds, drawn = _draw_seeds(z, drawable, K, generator, process_group, distributed)
        dead = (cluster_size < dead_code_threshold) & drawn
        if distributed:
            # The counts are all-reduced, so the ranks agree already; rank 0's decision is
            # sent all the same, as the codebook must never differ between them.
            src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
            dist.broadcast(dead, src=src, group=process_group)
        seeds = seeds.to(codebook.dtype)
        if normalize:
            seeds = torch.nn.functional.normalize(seeds, dim=1, eps=NORM_EPS)
        codebook.copy_(torch.where(dead[:, None], seeds, codebook))
        cluster_size.copy_(torch.where(dead, torch.ones_like(cluster_size), cluster_size))
        embed_sum.copy_(torch.where(dead[:, None], seeds.to(embed_sum.dtype), embed_sum))
    return {"counts": counts, "dead": dead}


def _draw_seeds(
    z: torch.Tensor,
    drawable: torch.Tensor,
    count: int,
    generator: torch.Generator | None,
    process_group: dist.ProcessGroup | None,
    distributed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` rows (count, D) float32 drawn uniformly, with replacement, among the rows of
    ``z`` (N, D) with ``drawable`` (N,) True, and whether there was any: of every process's
    ``z`` concatenated in rank order where ``distributed``, the same on every rank.

    N processes draw exactly the rows that one process would from their batches together
    (same generator state on rank 0), without sending the rows: each draw is a position among
    all drawable rows, from rank 0's generator; the rank holding that row sends it in an
    all-reduce of the seeds (every other rank adds 0). Costs one (count, D) all-reduce and
    small collectives, no host sync."""
    device = z.device
    uniform = torch.rand(count, dtype=torch.float64, device=device, generator=generator)
    mine = drawable.sum().reshape(1)
    offset = torch.zeros_like(mine)
    total = mine
    if distributed:
        # every rank's count, by an all-reduce of one-hot rows (traces under torch.compile,
        # where an all_gather into a list left unwaited collectives behind)
        rank = dist.get_rank(process_group)
        counts = torch.zeros(dist.get_world_size(process_group), dtype=mine.dtype, device=device)
        counts[rank] = mine[0]
        dist.all_reduce(counts, group=process_group)
        offset = counts[:rank].sum().reshape(1)
        total = counts.sum().reshape(1)
        src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        dist.broadcast(uniform, src=src, group=process_group)  # rank 0's draw for all
    # position among all drawable rows (floor; clamped as u * total may round up to total)
    position = (uniform * total).floor().long().clamp(max=(total - 1).clamp_min(0))
    local = position - offset
    held = (local >= 0) & (local < mine)
    seeds = torch.zeros(count, z.shape[1], dtype=torch.float32, device=device)
    if z.shape[0] > 0:
        # the row with `local` drawable rows before it: the first whose running count passes it
        running = drawable.long().cumsum(0)
        rows = torch.searchsorted(running, local.clamp_min(0), right=True)
        rows = rows.clamp_max(z.shape[0] - 1)
        seeds = torch.where(held[:, None], z[rows].float(), seeds)
    if distributed:
        dist.all_reduce(seeds, group=process_group)  # one rank holds each row, others add 0
    return seeds, (total > 0).reshape(())


def _draw_rows(weights: torch.Tensor, count: int, generator: torch.Generator | None):
    """``count`` row indices drawn with replacement, proportional to ``weights`` (no host sync)."""
    safe = weights + (weights.sum() == 0).float()  # all-zero weights: any row (masked later)
    return torch.multinomial(safe, count, replacement=True, generator=generator)


@torch.no_grad()
def vq_kmeans(
    z: torch.Tensor,
    num_codes: int,
    *,
    iters: int = 10,
    metric: Metric = "cosine",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """k-means codebook (K, D) float32 for rows ``z`` (N, D), N >= 1.

    Uses :func:`vq_nearest` for assignment and :func:`vq_code_stats` for the means, so it
    never forms an (N, K) matrix. Seeds with k-means++. ``metric="cosine"`` runs spherical
    k-means (unit codes). Codes left without rows are re-seeded from random rows. Non-finite
    rows are ignored.

    Args:
        z: (N, D) rows, any float dtype (computed in float32); at least one finite row.
        num_codes: K >= 1 (may exceed N).
        iters: Lloyd iterations after the k-means++ seeding (0: the seeds alone).
        metric: ``"cosine"`` or ``"l2"``, as :func:`vq_nearest`.
        generator: for the seeding and re-seeding draws (None: the global RNG).
        backend: of :func:`vq_nearest` and :func:`vq_code_stats` (None: automatic).
    """
    if z.dim() != 2 or z.shape[0] == 0:
        raise ValueError(f"z must have shape (N, D) with N >= 1, got {tuple(z.shape)}")
    if num_codes <= 0:
        raise ValueError(f"num_codes must be positive, got {num_codes}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if metric not in ("cosine", "l2"):  # (with iters=0 no vq_nearest call would say so)
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    data = z.float()
    finite = torch.isfinite(data).all(dim=1)
    if not bool(finite.any()):
        raise ValueError("z has no finite rows to initialise the codebook from")
    data = data[finite]
    if metric == "cosine":
        data = torch.nn.functional.normalize(data, dim=1, eps=NORM_EPS)
    weights = torch.ones(data.shape[0], device=data.device)
    codebook = _kmeans_plus_plus(data, num_codes, generator)
    for _ in range(iters):
        assigned = vq_nearest(data, codebook, metric, backend=backend)
        counts, sums = vq_code_stats(data, assigned, num_codes, backend=backend)
        means = sums / counts.clamp_min(1)[:, None]
        if metric == "cosine":
            means = torch.nn.functional.normalize(means, dim=1, eps=NORM_EPS)
        empty = counts == 0
        reseed = data[_draw_rows(weights, num_codes, generator)]
        codebook = torch.where(empty[:, None], reseed, means)
    return codebook


def _kmeans_plus_plus(data: torch.Tensor, num_codes: int, generator: torch.Generator | None):
    """k-means++ seeding: each new code is a row drawn with probability proportional to its
    squared distance from the codes so far. O(N·K·D) in all, the cost of one Lloyd step."""
    picks = torch.empty(num_codes, dtype=torch.int64, device=data.device)
    picks[0:1] = _draw_rows(torch.ones(data.shape[0], device=data.device), 1, generator)
    nearest_sq = ((data - data[picks[0]]) ** 2).sum(1)
    for j in range(1, num_codes):
        picks[j : j + 1] = _draw_rows(nearest_sq, 1, generator)
        nearest_sq = torch.minimum(nearest_sq, ((data - data[picks[j]]) ** 2).sum(1))
    return data[picks].clone()


# --------------------------------------------------------------------------------------------
# The reference LaBraM recipe, re-created from the spec, for benchmarks to compare against.
# --------------------------------------------------------------------------------------------


def labram_recipe_lookup(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The usual tokenizer recipe: l2-normalise, full (N, K) distance matrix, argmin."""
    z = torch.nn.functional.normalize(z, dim=1)
    distances = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :] - 2 * z @ codebook.T
    return distances.argmin(dim=1)


def labram_recipe_ema(
    z: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> None:
    """The usual EMA step with an (N, K) one-hot matrix, in place."""
    one_hot = torch.nn.functional.one_hot(indices, codebook.shape[0]).to(z.dtype)
    cluster_size.mul_(decay).add_(one_hot.sum(0), alpha=1 - decay)
    embed_sum.mul_(decay).add_(one_hot.T @ z, alpha=1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + codebook.shape[0] * eps) * total
    codebook.copy_(torch.nn.functional.normalize(embed_sum / smoothed[:, None], dim=1))
