"""Triton kernels of the VQ ops (imported on first use: triton is optional).

Registered with ``torch.library.triton_op`` so ``torch.compile`` sees inside them:
``eegfast::vq_nearest_triton`` and ``eegfast::vq_code_stats_triton``. They follow the same
exactness scheme as the C++ kernels (csrc/vq/vq_cpu.cpp): fp32-accumulated scores with a
best / runner-up gap per row, then a float64 re-scoring kernel for the rows whose gap is within
the error bound. Under ``TRITON_INTERPRET=1`` they run on CPU tensors (the tests do this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from eegfast.ops._backend import launch_device, triton_interpreting, vector_align, wrap_triton
from eegfast.ops.vq import (
    NORM_EPS,
    TIE_TOLERANCE,
    _check_inputs,
    _check_stats_inputs,
    _register_op_glue,
)

_UNIT_ROUNDOFF = {"ieee": 2.0**-24, "tf32x3": 2.0**-20}
_FP32_SUBNORMAL_MIN = 2.0**-149  # the absolute error of an fp32 product or sum that underflows
# The nearest-code kernel's D tiles, by input element size. D up to _MAX_BLOCK_D is one tile
# (z's rows loaded once); past it the kernel adds the scores up over chunks of _CHUNK_D, BLOCK_N
# 64. Compiled for sm_90 (Triton 3.9, 3 stages, 4 warps), one tile of all D took 197 KB of
# shared memory at fp32 D = 256 and spilled 6.6 KB of registers, 394 KB at 512 (an H100 block
# has 227 KB: the launch fails), 165 KB at bf16 D = 512 without spills and 329 KB at 1024; the
# chunks: fp32 64 (98 KB, 232 registers), bf16 128 (98 KB, 158 registers), no spills, where
# fp32 chunks of 128 spilled 5 KB.
_MAX_BLOCK_D = {4: 128, 2: 512}
_CHUNK_D = {4: 64, 2: 128}
# Globals read inside kernels must be tl.constexpr (the interpreter accepts plain floats; the
# compiler does not).
_NORM_EPS = tl.constexpr(NORM_EPS)
_TIE_TOLERANCE = tl.constexpr(TIE_TOLERANCE)


@triton.jit
def _nearest_kernel(
    z_ptr,  # (N, D) input dtype, row stride stride_z
    code_ptr,  # (K, D) input dtype, row stride stride_c
    scale_ptr,  # (K,) fp32: 1/|c| (cosine) or 1 (l2)
    bias_ptr,  # (K,) fp32: 0 (cosine), -|c|^2/2 (l2), -inf for unusable codes
    best_ptr,  # (N,) fp32 out: best score
    best_code_ptr,  # (N,) int32 out: its code (lowest index on equal fp32 scores)
    second_ptr,  # (N,) fp32 out: best score among all other codes
    N,
    K,
    D,
    stride_z,
    stride_c,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= D (z's tile loaded once), or D's chunk (D_CHUNKED)
    D_CHUNKED: tl.constexpr,  # D > BLOCK_D: z and the codes loaded chunk by chunk per code tile
    PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,  # D and the strides arrive divided by it (see vector_align)
):
    D, stride_z, stride_c = D * ALIGN, stride_z * ALIGN, stride_c * ALIGN
    # int64 row offsets: rows x stride_z passes 2^31 at N x D = 2^31 (or sooner, strided).
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    z_rows = z_ptr + rows[:, None] * stride_z
    if not D_CHUNKED:
        z = tl.load(z_rows + dims[None, :], mask=(rows[:, None] < N) & (dims[None, :] < D),
                    other=0.0)  # fmt: skip
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    second = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_code = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_rows = code_ptr + codes[:, None].to(tl.int64) * stride_c
        if D_CHUNKED:
            # The whole D in one tile would not fit shared memory (fp32 past 256, ~200 KB):
            # the score tile adds up chunk by chunk.
            dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                chunk = d0 + dims
                in_d = chunk[None, :] < D
                z = tl.load(z_rows + chunk[None, :], mask=(rows[:, None] < N) & in_d, other=0.0)
                c = tl.load(code_rows + chunk[None, :], mask=(codes[:, None] < K) & in_d, other=0.0)
                dots += tl.dot(z, tl.trans(c), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            c = tl.load(code_rows + dims[None, :], mask=(codes[:, None] < K) & (dims[None, :] < D),
                        other=0.0)  # fmt: skip
            dots = tl.dot(z, tl.trans(c), input_precision=PRECISION, out_dtype=tl.float32)
        scale = tl.load(scale_ptr + codes, mask=codes < K, other=0.0)
        bias = tl.load(bias_ptr + codes, mask=codes < K, other=float("-inf"))
        scores = dots * scale[None, :] + bias[None, :]  # (BLOCK_N, BLOCK_K)
        # NaN (rows of z with NaN / inf; flagged afterwards) must not reach max / argmax.
        scores = tl.where(scores == scores, scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        tile_code = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32) + k0
        is_winner = codes[None, :] == tile_code[:, None]
        tile_second = tl.max(tl.where(is_winner, float("-inf"), scores), axis=1)
        better = tile_best > best  # strict: equal scores keep the earlier (lower) code
        second = tl.where(better, tl.maximum(best, tile_second), tl.maximum(second, tile_best))
        best_code = tl.where(better, tile_code, best_code)
        best = tl.where(better, tile_best, best)
    in_range = rows < N
    tl.store(best_ptr + rows, best, mask=in_range)
    tl.store(second_ptr + rows, second, mask=in_range)
    tl.store(best_code_ptr + rows, best_code, mask=in_range)


@triton.jit
def _rescore_kernel(
    z_ptr,  # (N, D) float64, contiguous
    code_ptr,  # (K, D) float64, contiguous
    code_norm_ptr,  # (K,) float64: |c|
    flag_ptr,  # (N,) int8: 1 = re-score this row
    best_code_ptr,  # (N,) int32 in/out
    K,
    D,
    max_norm_sq_ptr,  # (1,) float64: largest |c|^2 (l2 tie scale)
    IS_COSINE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per row; rows with a clear winner leave at once. Two passes over the codes
    # in float64: the best score, then the lowest index within the tie tolerance of it.
    row = tl.program_id(0)
    if tl.load(flag_ptr + row) == 0:
        return
    dims = tl.arange(0, BLOCK_D)
    z = tl.load(z_ptr + row.to(tl.int64) * D + dims, mask=dims < D, other=0.0)
    z_sq = tl.sum(z * z, axis=0)
    z_norm = tl.maximum(tl.sqrt(z_sq), _NORM_EPS)
    best = tl.full([BLOCK_K], float("-inf"), tl.float64)
    for k0 in range(0, K, BLOCK_K):
        scores = _exact_scores(
            z, z_sq, z_norm, code_ptr, code_norm_ptr, k0, K, D, dims, IS_COSINE, BLOCK_K
        )
        best = tl.maximum(best, scores)
    best_all = tl.max(best, axis=0)
    if IS_COSINE:
        tolerance = _TIE_TOLERANCE
    else:
        tolerance = _TIE_TOLERANCE * (z_sq + tl.load(max_norm_sq_ptr))
    first = tl.full([BLOCK_K], 2147483647, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        scores = _exact_scores(
            z, z_sq, z_norm, code_ptr, code_norm_ptr, k0, K, D, dims, IS_COSINE, BLOCK_K
        )
        codes = k0 + tl.arange(0, BLOCK_K)
        hit = (scores >= best_all - tolerance) & (codes < K)
        first = tl.minimum(first, tl.where(hit, codes, 2147483647))
    # best -inf: every code NaN (or at infinite distance), none is chosen
    chosen = tl.where(best_all == float("-inf"), -1, tl.min(first, axis=0))
    tl.store(best_code_ptr + row, chosen)


@triton.jit
def _exact_scores(
    z,
    z_sq,
    z_norm,
    code_ptr,
    code_norm_ptr,
    k0,
    K,
    D,
    dims,
    IS_COSINE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    codes = k0 + tl.arange(0, BLOCK_K)
    c = tl.load(
        code_ptr + codes[:, None].to(tl.int64) * D + dims[None, :],
        mask=(codes[:, None] < K) & (dims[None, :] < D),
        other=0.0,
    )
    norm = tl.load(code_norm_ptr + codes, mask=codes < K, other=1.0)
    dots = tl.sum(c * z[None, :], axis=1)
    if IS_COSINE:
        scores = dots / (z_norm * tl.maximum(norm, _NORM_EPS))
    else:
        scores = -(z_sq - 2.0 * dots + norm * norm)
    scores = tl.where(scores == scores, scores, float("-inf"))  # NaN never wins
    return tl.where(codes < K, scores, float("-inf"))


@triton.jit
def _code_stats_kernel(
    z_ptr,  # (N, D) input dtype, row stride stride_z
    index_ptr,  # (N,) int64
    count_ptr,  # (K,) fp32, zero-initialised
    sum_ptr,  # (K, D) fp32, zero-initialised
    N,
    K,
    D,
    stride_z,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # D and stride_z arrive divided by it (see vector_align)
):
    D, stride_z = D * ALIGN, stride_z * ALIGN
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    codes = tl.load(index_ptr + rows, mask=rows < N, other=-1)
    keep = (codes >= 0) & (codes < K)
    z = tl.load(
        z_ptr + rows[:, None] * stride_z + dims[None, :],
        mask=keep[:, None] & (dims[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    tl.atomic_add(count_ptr + codes, tl.full([BLOCK_N], 1.0, tl.float32), mask=keep)
    tl.atomic_add(
        sum_ptr + codes[:, None] * D + dims[None, :], z, mask=keep[:, None] & (dims[None, :] < D)
    )


def _precision(dtype: torch.dtype) -> str:
    # fp16/bf16 products are exact in fp32; fp32 inputs use 3-pass TF32 on GPU (tensor cores,
    # near-fp32 error, covered by a larger bound) and exact fp32 FMAs in the interpreter.
    if dtype != torch.float32 or triton_interpreting():
        return "ieee"
    return "tf32x3"


@triton_op("eegfast::vq_nearest_triton", mutates_args=())
def vq_nearest_triton(
    z: torch.Tensor, codebook: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``vq_nearest``: z (N, D), codebook (K, D) -> scores (N,) fp32, indices (N,) int64."""
    _check_inputs(z, codebook, metric)
    N, D = z.shape
    K = codebook.shape[0]
    if z.stride(1) != 1:
        z = z.contiguous()
    if codebook.stride(1) != 1:
        codebook = codebook.contiguous()
    code64 = codebook.double()
    code_norm = code64.norm(dim=1)
    usable = torch.isfinite(code64).all(dim=1)
    if metric == "cosine":
        scale = (1.0 / code_norm.clamp_min(NORM_EPS)).float()
        bias = torch.zeros(K, dtype=torch.float32, device=z.device)
    else:
        scale = torch.ones(K, dtype=torch.float32, device=z.device)
        bias = (-0.5 * code_norm * code_norm).float()
    bias = torch.where(usable, bias, torch.full_like(bias, -torch.inf))
    codes_for_dot = torch.where(usable[:, None], codebook, torch.zeros_like(codebook))
    max_norm = torch.where(usable, code_norm, torch.zeros_like(code_norm)).max()

    best = torch.empty(N, dtype=torch.float32, device=z.device)
    second = torch.empty_like(best)
    best_code = torch.empty(N, dtype=torch.int32, device=z.device)
    full_block_d = max(16, triton.next_power_of_2(D))
    chunked = full_block_d > _MAX_BLOCK_D[z.element_size()]
    block_d = _CHUNK_D[z.element_size()] if chunked else full_block_d
    block_n, block_k = (64, 64) if chunked or block_d <= 64 else (32, 64)
    precision = _precision(z.dtype)
    align = vector_align(D, z.stride(0), codes_for_dot.stride(0))
    if N > 0:
        with launch_device(z):
            wrap_triton(_nearest_kernel)[(triton.cdiv(N, block_n),)](
                z,
                codes_for_dot,
                scale,
                bias,
                best,
                best_code,
                second,
                N,
                K,
                D // align,
                z.stride(0) // align,
                codes_for_dot.stride(0) // align,
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                BLOCK_D=block_d,
                D_CHUNKED=chunked,
                PRECISION=precision,
                ALIGN=align,
            )
    z64 = z.double()
    z_sq = (z64 * z64).sum(1)
    finite = torch.isfinite(z64).all(dim=1)
    bound_scale = z_sq.sqrt() if metric == "cosine" else z_sq.sqrt() * max_norm + max_norm**2
    # + fp32 underflow (subnormal products and sums), + the reference's tie tolerance in the
    # kernel's units (cosine · max(|z|, eps); l2: (|z|^2 - distance) / 2): codes the reference
    # counts as tied (|z| < 1e-12 under cosine, |z| >> the code norms under l2) are re-scored
    tie_scale = 2.0 * z_sq.sqrt().clamp_min(NORM_EPS) if metric == "cosine" else z_sq + max_norm**2
    tolerance = (
        4.0 * (D + 4) * (_UNIT_ROUNDOFF[precision] * bound_scale + _FP32_SUBNORMAL_MIN)
        + TIE_TOLERANCE * tie_scale
    )
    gap = best.double() - second.double()
    # The bound holds while no fp32 value overflows: each product, partial sum and score of a
    # finite code is at most about bound_scale in magnitude, and near FLT_MAX the exact winner
    # may score inf or NaN and lose to a finite code by an infinite gap (an l2 code equal to
    # the row, |c| = 3e19). Such rows are re-scored, as in vq_cpu.cpp's finish_row. Cosine
    # dots here are of the raw codes, scaled by 1/|c| only after the sum (the CPU and CUDA
    # kernels pack unit codes): up to |z| |c|, which overflowed for codes of norm 1e30 while
    # |z| was 3e10, and the exact winner scored -inf.
    largest = bound_scale if metric == "l2" else z_sq.sqrt() * max_norm.clamp_min(1.0)
    may_overflow = ~(largest * (1.0 + 4.0 * (D + 4) * _UNIT_ROUNDOFF[precision]) < 2.0**127)
    flags = finite & (~((gap > tolerance) & torch.isfinite(best)) | may_overflow)
    if N > 0:
        with launch_device(z):
            wrap_triton(_rescore_kernel)[(N,)](
                z64.contiguous(),
                code64.contiguous(),
                code_norm,
                flags.to(torch.int8),
                best_code,
                K,
                D,
                (max_norm * max_norm).reshape(1),
                IS_COSINE=metric == "cosine",
                BLOCK_K=64,
                BLOCK_D=full_block_d,
            )
    # (best_code -1: the re-scoring found no code with a usable score, see _rescore_kernel)
    finite = finite & (best_code >= 0)
    indices = torch.where(finite, best_code.long(), torch.full_like(best_code, -1).long())
    chosen = code64[indices.clamp_min(0)]
    if metric == "cosine":
        scores = (z64 * chosen).sum(1) / (
            z_sq.sqrt().clamp_min(NORM_EPS) * chosen.norm(dim=1).clamp_min(NORM_EPS)
        )
    else:
        scores = ((z64 - chosen) ** 2).sum(1)
    scores = torch.where(finite, scores, torch.full_like(scores, torch.nan)).float()
    return scores, indices


@triton_op("eegfast::vq_code_stats_triton", mutates_args=())
def vq_code_stats_triton(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``vq_code_stats``: counts (K,) and sums (K, D) in fp32 via atomics."""
    _check_stats_inputs(z, indices, num_codes)
    N, D = z.shape
    if z.stride(1) != 1:
        z = z.contiguous()
    counts = torch.zeros(num_codes, dtype=torch.float32, device=z.device)
    sums = torch.zeros(num_codes, D, dtype=torch.float32, device=z.device)
    if N > 0:
        # D = 0 still counts the rows (as the C++ and CUDA kernels): one masked-off column, where
        # next_power_of_2(0) = 0 divided by zero here and made an empty tl.arange
        block_d = max(1, triton.next_power_of_2(D))
        block_n = max(1, min(128, 4096 // block_d))
        align = vector_align(D, z.stride(0))
        with launch_device(z):
            wrap_triton(_code_stats_kernel)[(triton.cdiv(N, block_n),)](
                z,
                indices.contiguous(),
                counts,
                sums,
                N,
                num_codes,
                D // align,
                z.stride(0) // align,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                ALIGN=align,
            )
    return counts, sums


_register_op_glue("eegfast::vq_nearest_triton", "eegfast::vq_code_stats_triton")
