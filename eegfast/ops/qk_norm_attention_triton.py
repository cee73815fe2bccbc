"""Triton kernels of the fused QK-LayerNorm attention (imported on first use: triton is optional).

Registered with ``torch.library.triton_op`` so ``torch.compile`` sees inside them:

- ``eegfast::qk_norm_attention_fwd_triton``: flash-attention forward over (query block, batch x
  head). The LayerNorm of q (per query tile) and of k (per key tile, as it is loaded) over the
  head dim runs inside the kernel in fp32; scores go through a softmax in the log2 domain,
  without row maxima where a bound on the LayerNorm'ed scores allows it (see
  ``unshifted_score_limit``), else online; the output is written (B, N, H, D) so the packed
  layout is a free reshape.
- ``eegfast::qk_norm_attention_bwd_triton``: the recompute scheme. ``delta = rowsum(dO * O)``,
  then one kernel per key block (dK, dV, k-LayerNorm backward and per-block partial sums of the
  k-norm parameter gradients) and one per query block (dQ, q-LayerNorm backward, partial sums of
  the q-norm parameter gradients). No atomics: the partial sums are added up afterwards, so
  results are deterministic. Nothing of size N x N is ever stored.

Signatures and shapes are those of ``eegfast::qk_norm_attention_fwd`` / ``_bwd`` (see
CONTRACTS / :mod:`eegfast.ops.qk_norm_attention`). Head dims 1..128 are padded to a power of two
(at least 16, the smallest ``tl.dot`` size) inside the kernels with masked loads. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests do this) with one small block
configuration, since the interpreter is slow and cannot benchmark. Three launch choices no
config can hold (``PRE_NORMALISE``: loops that read zero-padded, already normalised rows written
by ``_pad_rows_kernel`` first; ``SPLIT_TAIL``: a second launch for a short last block of rows;
``ATOMIC_DQ``, backward only: dQ added up by atomic adds in the dK / dV kernel) are timed per
case the first time it is seen, unless pinned (see ``LoopVariant``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from eegfast.ops._backend import (
    env_switch,
    launch_device,
    triton_interpreting,
    vector_align,
    wrap_triton,
)
from eegfast.ops._variants import has_static_shape, is_traced, measured_choice, stand_in
from eegfast.ops.qk_norm_attention import _register_op_glue

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Row granularity of the parameter-gradient partial sums. Each backward program owns
# BLOCK // PART_ROWS consecutive slots and writes all of them (its sum in the first, zeros in
# the others), so the buffer is fully rewritten whatever block size the autotuner picks.
PART_ROWS = 16
# Globals read inside kernels must be tl.constexpr.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)
# Keys per tile of the loops' last, partial tiles (the smallest tl.dot size).
_TAIL_N = tl.constexpr(16)


def _configs(block_pairs: list[tuple[int, int, int, int]], first: str, second: str):
    """Autotune configs from (first block, second block, num_warps, num_stages) tuples."""
    return [
        triton.Config({first: a, second: b}, num_warps=warps, num_stages=stages)
        for a, b, warps, stages in block_pairs
    ]


# Fixed per process: TRITON_INTERPRET must be set before triton is imported.
_INTERPRETING = triton_interpreting()

if _INTERPRETING:
    # One config (the interpreter cannot time kernels); 32 = 2 x PART_ROWS also exercises the
    # multi-slot partial-sum path, and multi-tile loops at the test's N >= 33.
    _FWD_CONFIGS = _configs([(32, 32, 1, 1)], "BLOCK_M", "BLOCK_N")
    _DKDV_CONFIGS = _configs([(32, 32, 1, 1)], "BLOCK_N", "BLOCK_M")
    _DQ_CONFIGS = _configs([(32, 32, 1, 1)], "BLOCK_M", "BLOCK_N")
    _FWD_WIDE_CONFIGS = _DKDV_WIDE_CONFIGS = _DQ_WIDE_CONFIGS = []
    _FWD_FP32_CONFIGS = _DKDV_FP32_CONFIGS = _DQ_FP32_CONFIGS = []
    _FWD_FP32_WIDE_CONFIGS = _DKDV_FP32_WIDE_CONFIGS = _DQ_FP32_WIDE_CONFIGS = []
else:
    _FWD_CONFIGS = _configs(
        [
            (64, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 32, 8, 3),
            (64, 32, 4, 4),
            (32, 64, 4, 3),
            (128, 128, 8, 2),
        ],
        "BLOCK_M",
        "BLOCK_N",
    )
    # bf16 / fp16, compiled for sm_90 with the ptxas of Triton 3.6 (the lent GPU machines')
    # and of 3.9 (ptxas's report): no config here spills registers at D = 20 or 25 without
    # masks, in either loop variant, under either, but dK / dV's (64, 64, 4 warps) at D = 25
    # under 3.6 (24 bytes; its 8-warp twin does not). With all masks on, (128, 128) spills 24-44
    # bytes under 3.6, and dK / dV's (32, 32) 4-8 bytes in the PRENORM loops. Replaced for
    # spilling: (128, 32, 4 warps) (up to 120 bytes with masks), dK / dV's (32, 64, 4 warps)
    # (16-120 bytes without masks), and three earlier ones (4-36 bytes) that now have 8 warps.
    _DKDV_CONFIGS = _configs(
        [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 3), (128, 32, 8, 3)],
        "BLOCK_N",
        "BLOCK_M",
    )
    _DQ_CONFIGS = _configs(
        [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 8, 2), (128, 32, 8, 3)],
        "BLOCK_M",
        "BLOCK_N",
    )
    # bf16 / fp16 head dims past 32 (BLOCK_D 64, 128). The configs above spilled at D = 50 in
    # 11 of 16 cases with the fused loops (the dK / dV kernel in 4 of 5) and at D = 128 in all
    # but two; these, with 8 warps where 4 spilled, spill at D = 50 in neither loop variant
    # under Triton 3.6's ptxas or 3.9's, but for dK / dV's (32, 32) with all masks on in the
    # PRENORM loops under 3.9 (8 bytes); at most 8 bytes at D = 128. The forward's (32, 32)
    # tiles are left out: with 4 warps they spilled 20 bytes without masks under 3.6 (2 or 3
    # stages), with 8 still 8.
    _FWD_WIDE_CONFIGS = _configs(
        [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2), (32, 64, 4, 3)],
        "BLOCK_M",
        "BLOCK_N",
    )
    _DKDV_WIDE_CONFIGS = _configs(
        [(32, 64, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2)], "BLOCK_N", "BLOCK_M"
    )
    _DQ_WIDE_CONFIGS = _configs(
        [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)], "BLOCK_M", "BLOCK_N"
    )
    # float32 inputs (3-pass TF32 products: about three times the operand registers). At D = 20
    # most of the lists above spilled (the dK / dV kernel's first config 184-648 bytes); these
    # spill in none of the forward's and dQ's cases and at most 52 bytes in dK / dV's, with and
    # without masks. At D = 50: 0-28 bytes without masks, up to 340 with all three; fp32 at
    # D = 128 spilled in every config tried (0.5-4 KB).
    _FWD_FP32_CONFIGS = _configs(
        [(64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 3)], "BLOCK_M", "BLOCK_N"
    )
    _DKDV_FP32_CONFIGS = _configs([(64, 32, 8, 2), (16, 64, 4, 2)], "BLOCK_N", "BLOCK_M")
    _DQ_FP32_CONFIGS = _configs([(64, 32, 8, 2), (128, 32, 8, 2)], "BLOCK_M", "BLOCK_N")
    _FWD_FP32_WIDE_CONFIGS = _configs(
        [(128, 32, 8, 3), (64, 64, 8, 3), (32, 32, 4, 3)], "BLOCK_M", "BLOCK_N"
    )
    _DKDV_FP32_WIDE_CONFIGS = _configs([(32, 32, 8, 2), (32, 64, 8, 2)], "BLOCK_N", "BLOCK_M")
    _DQ_FP32_WIDE_CONFIGS = _configs([(128, 32, 8, 2), (32, 64, 8, 2)], "BLOCK_M", "BLOCK_N")


# The tail launch's one config per kernel (see _launch_spans): _TAIL_ROWS rows (dK / dV: keys)
# per program, then keys (dK / dV: queries) per loop step, warps, stages. At least 4 warps: with
# 2 the fused loops' per-tile LayerNorm has half the threads (141-238 registers at D = 20,
# sm_90; with 4: 80, 120, 100). dK / dV steps over 32 queries, as with 64 it spilled at D = 50.
# The forward's tail has 8 warps: with 4, Triton 3.6's ptxas spilled 12-36 bytes at D = 20 and 25
# with all masks on, and 3.9's 8-24 at D = 50. With 8, neither spills without masks (D = 20,
# 25, 50, both loop variants); with all masks on, 3.9's 12-16 bytes at D = 20 and 25 (a 32-key
# step spilled 8 bytes without masks under 3.6).
_TAIL_ROWS = 16


def _tail_configs(step: int, warps: int, stages: int, owned: str, stepped: str):
    """The one-config list of a tail kernel (under the interpreter: 32-wide steps, 1 warp)."""
    config = (_TAIL_ROWS, 32, 1, 1) if _INTERPRETING else (_TAIL_ROWS, step, warps, stages)
    return _configs([config], owned, stepped)


_FWD_TAIL_CONFIGS = _tail_configs(64, 8, 2, "BLOCK_M", "BLOCK_N")
_DQ_TAIL_CONFIGS = _tail_configs(64, 4, 2, "BLOCK_M", "BLOCK_N")
_DKDV_TAIL_CONFIGS = _tail_configs(32, 4, 2, "BLOCK_N", "BLOCK_M")
# Every autotuned (and interpreted) block size divides it.
_BLOCK_MULTIPLE = 128
# Rows past the last multiple of _BLOCK_MULTIPLE that go to the tail launch, at most.
_TAIL_MAX_ROWS = 32
# Launch choices that change which kernels run, so no autotuning config can hold them:
# - SPLIT_TAIL: whether the rows (dK / dV: keys) past the last multiple of _BLOCK_MULTIPLE get
#   their own launch of _TAIL_ROWS-row programs when they are few (see _launch_spans);
# - PRE_NORMALISE: how the attention loops get their q / k tiles. False: they load q and k rows
#   as given (D of BLOCK_D columns, masked) and normalise each tile inside the loop, again for
#   every tile of the other side. True: one pass of _pad_rows_kernel per tensor first writes k
#   (and q in the backward) normalised, as zero-padded (B * H, N, BLOCK_D) rows, which the loops
#   load with neither a column mask nor a LayerNorm: fewer registers (sm_90, D = 20: forward 106
#   against 151, dQ 137 against 236) and no warp shuffles in the loops, for one more pass over k
#   (and q). v and grad_out are read as given unless their rows' vectors are under 8 bytes
#   (_needs_padded_rows: D = 25 in bf16), where they are copied padded as well.
# None (the default: EEGFAST_TRITON_SPLIT_TAIL / EEGFAST_TRITON_PRENORM unset) times the
# candidates the first time a case is seen, forward and backward apart, and keeps the fastest
# (eegfast.ops._variants; see _loop_variant). True / False pins the choice: from the environment
# or assigned at run time (benchmarks.gpu_qk_norm_attention times each variant pinned). Both
# variants of PRE_NORMALISE give the same bits; the split changes the order of some sums, so a
# pinned SPLIT_TAIL is what makes separate processes' results bit-identical.
SPLIT_TAIL: bool | None = env_switch("EEGFAST_TRITON_SPLIT_TAIL", None)
PRE_NORMALISE: bool | None = env_switch("EEGFAST_TRITON_PRENORM", None)
# A third, for the backward only: ATOMIC_DQ. False: dQ has a kernel of its own, which computes
# the scores, probabilities and dP of each (query, key) tile again (seven tile products per
# pair in all). True: the dK / dV kernel also adds each tile's dQ share, dSᵀ K, into an fp32
# (B * H, N, BLOCK_D) buffer by atomic adds (five products per pair, the scheme of
# FlashAttention-2's backward), and a short pass applies the LayerNorm backward to it. Float
# additions in another order each run: never a candidate under
# torch.use_deterministic_algorithms(True).
ATOMIC_DQ: bool | None = env_switch("EEGFAST_TRITON_ATOMIC_DQ", None)
# Whether the forward may take its loops without row maxima where the scores are bounded (see
# unshifted_score_limit). Not a timed choice: where they apply they do strictly less work, and
# the program decides on the device. Off (EEGFAST_TRITON_UNSHIFTED=0) every forward keeps the
# online maximum, to compare or to rule the fast loops out.
UNSHIFTED: bool = env_switch("EEGFAST_TRITON_UNSHIFTED", True)
# Whether unpinned choices are timed: nothing can be under the interpreter (tests set it), where
# the first candidate (fused loops, tail launch) is taken.
MEASURE_VARIANTS = not _INTERPRETING


class LoopVariant(NamedTuple):
    """How one call's attention kernels are launched (see PRE_NORMALISE, SPLIT_TAIL and, for
    the backward, ATOMIC_DQ)."""

    pre_normalise: bool
    split_tail: bool
    atomic_dq: bool = False

    def __str__(self) -> str:
        loops = "pre-normalised loops" if self.pre_normalise else "fused loops"
        dq = ", dQ by atomic adds" if self.atomic_dq else ""
        return f"{loops}, {'tail launch' if self.split_tail else 'one launch'}{dq}"


# _pad_rows_kernel's modes.
_COPY = tl.constexpr(0)
_NORMALISE = tl.constexpr(1)  # LayerNorm, statistics computed and stored
_NORMALISE_FROM_STATS = tl.constexpr(2)  # LayerNorm with the stored statistics
# N_BUCKET (next power of two of N, otherwise unused by the kernels): sequences of similar
# length share one tuning run, so variable channel counts do not re-tune at every new N. Then
# every compile-time switch that changes a kernel's body (its registers, loads, masks), as
# triton's autotuner keys on the named arguments and tensor dtypes only: without them a launch
# of the PRE_NORMALISE loops, or with a padding mask, reused the config tuned for another body
# (and the launch choices compared one variant on the other's config). BLOCK_D and PRECISION
# follow D and the dtype; PART is fixed.
_AUTOTUNE_KEY = [
    "N_BUCKET", "D", "CAUSAL", "BLOCK_CAUSAL", "HAS_PAD", "HAS_Q_W", "HAS_Q_B", "HAS_K_W",
    "HAS_K_B", "ALIGN", "PRE_NORMALISED", "PADDED_PLAIN", "ATOMIC_DQ",
]  # fmt: skip


def _autotuned(narrow: list, wide: list, fp32: list, fp32_wide: list):
    """triton.autotune over ``narrow`` for 2-byte inputs with head dims up to 32 (BLOCK_D 16,
    32), ``wide`` past that, and ``fp32`` / ``fp32_wide`` likewise for float32 inputs: each
    launch times only the configs of its own kind (q_ptr's dtype and BLOCK_D)."""

    def configs_for_launch(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d = args.get("BLOCK_D")
        if block_d is None:  # a caller that passes neither: everything
            return configs
        four_bytes = getattr(args.get("q_ptr"), "dtype", None) == torch.float32
        if four_bytes:
            return fp32 if block_d <= 32 else fp32_wide
        return narrow if block_d <= 32 else wide

    if not wide:  # interpreted: one config, never timed
        return lambda fn: _keyed_autotune(narrow, fn)
    prune = {"early_config_prune": configs_for_launch}
    every = narrow + wide + fp32 + fp32_wide
    return lambda fn: _keyed_autotune(every, fn, prune)


# Outputs a kernel adds into (atomic adds) rather than stores: the autotuner times every config
# on the call's own arguments before the chosen one runs, so without a restore each timed run
# would add its share too (dQ came out ~5x at 2 configs under an emulated timer). Restored, not
# zeroed: the tail launch (see _launch_spans) adds into the buffer the body launch filled.
_ACCUMULATED_ARGS = ("dq_acc_ptr",)


def _keyed_autotune(configs: list, fn, prune: dict | None = None, do_bench=None):
    """triton.autotune of ``fn`` over ``configs``, keyed on the names of _AUTOTUNE_KEY that are
    ``fn``'s arguments (triton rejects others), restoring _ACCUMULATED_ARGS after each timed
    run. ``do_bench``: the autotuner's timer (tests; None: Triton's)."""
    key = [name for name in _AUTOTUNE_KEY if name in fn.arg_names]
    restore = [name for name in _ACCUMULATED_ARGS if name in fn.arg_names]
    return triton.autotune(
        configs=configs, key=key, prune_configs_by=prune, restore_value=restore or None,
        do_bench=do_bench or _driver_benchmarker,
    )(fn)  # fmt: skip


def _driver_benchmarker(kernel_call, quantiles):
    """Triton's own timer (its GPU driver's), looked up when a config is timed. Triton < 3.4
    looks it up when the kernel is decorated, at this module's import, and under the CPU
    interpreter, with no GPU driver, that import failed ("0 active drivers")."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


# --------------------------------------------------------------------------------------------
# Shared device helpers.
# --------------------------------------------------------------------------------------------


@triton.jit
def _program_ids(N, BLOCK: tl.constexpr):
    """(block along N, batch x head) of this program. A 1D grid with the blocks of one head
    adjacent: no 65535 limit on B x H (grid axis 1), and k/v tiles stay hot in L2."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    return pid % num_blocks, (pid // num_blocks).to(tl.int64)


@triton.jit
def _layer_norm_stats(x, col_ok, D, eps):
    """x: (R, BLOCK_D) fp32, zero in padded columns -> x_hat (same zeros), mean, rstd."""
    # Products with 1 / D and rsqrt, not divisions: each fp32 division is a multi-instruction
    # sequence (div.full.f32), and these run on every key tile of the fused loops.
    inv_d = 1.0 / D
    mean = tl.sum(x, axis=1) * inv_d
    centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) * inv_d
    rstd = tl.math.rsqrt(var + eps)
    return centred * rstd[:, None], mean, rstd


@triton.jit
def _normalise_and_store_stats(x, col_ok, D, eps, stats_ptr, rows, N):
    """x_hat of x (R, BLOCK_D) fp32; its (mean, rstd) stored at stats_ptr[rows] (rows < N)."""
    x_hat, mean, rstd = _layer_norm_stats(x, col_ok, D, eps)
    tl.store(stats_ptr + rows * 2, mean, mask=rows < N)
    tl.store(stats_ptr + rows * 2 + 1, rstd, mask=rows < N)
    return x_hat


@triton.jit
def _normalised_from_stats(x, stats_ptr, rows, N, col_ok):
    """(x_hat, rstd) of x (R, BLOCK_D) fp32 from the (mean, rstd) stored at stats_ptr[rows]
    (rows < N): bit-identical to what the forward used."""
    mean = tl.load(stats_ptr + rows * 2, mask=rows < N, other=0.0)
    rstd = tl.load(stats_ptr + rows * 2 + 1, mask=rows < N, other=0.0)
    return tl.where(col_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def _affine(x_hat, w_ptr, b_ptr, dims, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """x_hat * w + b over the head dim (padded columns stay zero: w, b load as 0 there)."""
    y = x_hat
    if HAS_W:
        w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(b_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        y = y + b[None, :]
    return y


@triton.jit
def _norm_bound(w_ptr, b_ptr, dims, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """An upper bound of |x_hat w + b| over every row of a LayerNorm's output: x_hat has mean 0
    and mean square var / (var + eps) <= 1, so |x_hat| <= sqrt(D) and |x_hat w + b| <=
    sqrt(D) max |w| + |b|."""
    bound = tl.sqrt(tl.sum((dims < D).to(tl.float32), axis=0))
    if HAS_W:
        w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        bound = bound * tl.max(tl.abs(w), axis=0)
    if HAS_B:
        b = tl.load(b_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        bound = bound + tl.sqrt(tl.sum(b * b, axis=0))
    return bound


@triton.jit
def _load_rows(ptr, rows, dims, row_stride, N, D):
    """(R, BLOCK_D) tile of a (N, D) matrix with unit column stride; zeros outside."""
    return tl.load(
        ptr + rows[:, None] * row_stride + dims[None, :],
        mask=(rows[:, None] < N) & (dims[None, :] < D),
        other=0.0,
    )


@triton.jit
def _load_padded_rows(ptr, pid_bh, rows, N, BLOCK_D: tl.constexpr):
    """(R, BLOCK_D) rows of (b, h) = pid_bh of a (B * H, N, BLOCK_D) buffer from
    _pad_rows_kernel (columns past D are stored zeros: no column mask)."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(
        ptr + (pid_bh * N + rows[:, None]) * BLOCK_D + dims[None, :],
        mask=(rows < N)[:, None],
        other=0.0,
    )


@triton.jit
def _layer_norm_backward(grad_y, x_hat, rstd, w_ptr, dims, D, HAS_W: tl.constexpr):
    """dL/dx of y = LayerNorm(x) (affine w) from dL/dy, all (R, BLOCK_D) fp32."""
    grad_x_hat = grad_y
    if HAS_W:
        w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        grad_x_hat = grad_y * w[None, :]
    inv_d = 1.0 / D
    mean_grad = tl.sum(grad_x_hat, axis=1) * inv_d
    mean_grad_x_hat = tl.sum(grad_x_hat * x_hat, axis=1) * inv_d
    grad_x = grad_x_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]
    return tl.where((dims < D)[None, :], grad_x * rstd[:, None], 0.0)


@triton.jit
def _store_partial(
    part_ptr,  # (B*H, num_slots, D) fp32
    values,  # (BLOCK_D,) fp32: this program's sum
    pid_bh,
    start,  # the program's first row (or key): a multiple of PART
    num_slots,
    dims,
    D,
    BLOCK: tl.constexpr,
    PART: tl.constexpr,
):
    slot_ids = tl.arange(0, BLOCK // PART)
    slots = start // PART + slot_ids
    tile = tl.where((slot_ids == 0)[:, None], values[None, :], 0.0)
    tl.store(
        part_ptr + (pid_bh * num_slots + slots[:, None]) * D + dims[None, :],
        tile,
        mask=(slots < num_slots)[:, None] & (dims < D)[None, :],
    )


@triton.jit
def _visible(
    q_rows,  # query indices, broadcastable to the score tile
    k_cols,  # key indices, broadcastable to the score tile
    k_pad,  # 1 = padded key (broadcastable; all 0 without a padding mask)
    q_ids,  # block ids of the queries / keys (only read when BLOCK_CAUSAL)
    k_ids,
    N,
    CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
):
    visible = (k_cols < N) & (q_rows < N) & (k_pad == 0)
    if CAUSAL:
        visible = visible & (k_cols <= q_rows)
    if BLOCK_CAUSAL:
        visible = visible & (k_ids <= q_ids)
    return visible


@triton.jit
def _zero_padding_keys(x, pad_ptr, b, cols, N):
    """x (len(cols), BLOCK_D) with the rows of padding keys of batch b set to 0, same dtype."""
    k_pad = tl.load(pad_ptr + b * N + cols, mask=cols < N, other=1)
    return tl.where((k_pad != 0)[:, None], 0.0, x).to(x.dtype)


@triton.jit
def _visible_tile(rows, cols, q_ids, k_ids, b, pad_ptr, N, HAS_PAD: tl.constexpr,
                  CAUSAL: tl.constexpr, BLOCK_CAUSAL: tl.constexpr):  # fmt: skip
    """(len(rows), len(cols)) bool: query rows[i] sees key cols[j], the padding mask of batch
    b read here."""
    k_pad = tl.zeros_like(cols)
    if HAS_PAD:
        k_pad = tl.load(pad_ptr + b * N + cols, mask=cols < N, other=1).to(cols.dtype)
    return _visible(rows[:, None], cols[None, :], k_pad[None, :], q_ids[:, None], k_ids[None, :],
                    N, CAUSAL, BLOCK_CAUSAL)  # fmt: skip


@triton.jit
def _tile(start, N, ids_ptr, bound, TILE: tl.constexpr, KEYS: tl.constexpr,
          BLOCK_CAUSAL: tl.constexpr):  # fmt: skip
    """(indices, index < N, block ids, run) of the TILE keys (KEYS) or query rows from start.
    run is False for a tile the program's other side cannot see, block-causally: keys whose
    least id exceeds ``bound`` (the rows' largest), rows whose largest is below ``bound``."""
    index = start + tl.arange(0, TILE)
    in_range = index < N
    ids = index  # placeholder when not block-causal (unused)
    run = True
    if BLOCK_CAUSAL:
        if KEYS:
            ids = tl.load(ids_ptr + index, mask=in_range, other=_INT32_MAX)
            run = tl.min(ids, axis=0) <= bound
        else:
            ids = tl.load(ids_ptr + index, mask=in_range, other=_INT32_MIN)
            run = tl.max(ids, axis=0) >= bound
    return index, in_range, ids, run


@triton.jit
def _normalised_rows(base, padded_ptr, stats_base, w_ptr, b_ptr, pid_bh, index, stride, N, dtype,
                     D: tl.constexpr, PRE_NORMALISED: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """(len(index), BLOCK_D) LayerNorm (statistics from the forward, affine) of rows ``index``
    of one (b, h) in ``dtype``; with PRE_NORMALISED, those rows of _pad_rows_kernel's buffer."""
    if PRE_NORMALISED:
        rows = _load_padded_rows(padded_ptr, pid_bh, index, N, BLOCK_D)
    else:
        dims = tl.arange(0, BLOCK_D)
        x = _load_rows(base, index, dims, stride, N, D).to(tl.float32)
        x_hat, _ = _normalised_from_stats(x, stats_base, index, N, dims < D)
        rows = _affine(x_hat, w_ptr, b_ptr, dims, D, HAS_W, HAS_B).to(dtype)
    return rows


@triton.jit
def _plain_rows(base, padded_ptr, pid_bh, index, stride, N, dtype, D: tl.constexpr,
                PADDED: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Rows ``index`` of one (b, h) as they are (v, grad_out), from the padded copy with
    PADDED."""
    if PADDED:
        rows = _load_padded_rows(padded_ptr, pid_bh, index, N, BLOCK_D)
    else:
        rows = _load_rows(base, index, tl.arange(0, BLOCK_D), stride, N, D)
    return rows.to(dtype)


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------


@triton.jit
def _pad_rows_kernel(
    x_ptr,  # (B, H, N, D) strides (sxb, sxh, sxn, 1), any layout
    w_ptr,  # (D,) LayerNorm weight, or dummy
    b_ptr,
    stats_ptr,  # (B, H, N, 2) fp32: written (_NORMALISE), read (_NORMALISE_FROM_STATS)
    out_ptr,  # (B * H, N, BLOCK_D) contiguous out, dtype of x; columns past D written as 0
    sxb,
    sxh,
    sxn,
    H,
    N,
    D: tl.constexpr,
    eps,
    MODE: tl.constexpr,  # _COPY, _NORMALISE or _NORMALISE_FROM_STATS
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # the strides arrive divided by it (see _row_align)
):
    """x, or its LayerNorm, as zero-padded rows for the PRE_NORMALISE loops to load."""
    sxb, sxh, sxn = sxb * ALIGN, sxh * ALIGN, sxn * ALIGN  # see _row_align
    pid_m, pid_bh = _program_ids(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    x = _load_rows(x_ptr + b * sxb + h * sxh, rows, dims, sxn, N, D)
    if MODE != _COPY:
        x = x.to(tl.float32)
        stats = stats_ptr + pid_bh * N * 2
        if MODE == _NORMALISE:
            x_hat = _normalise_and_store_stats(x, dims < D, D, eps, stats, rows, N)
        else:
            x_hat, _ = _normalised_from_stats(x, stats, rows, N, dims < D)
        x = _affine(x_hat, w_ptr, b_ptr, dims, D, HAS_W, HAS_B)
    offsets = (pid_bh * N + rows[:, None]) * BLOCK_D + dims[None, :]
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _fwd_tile(
    m_i, l_i, acc,  # (BLOCK_M,) row maxima (log2 domain), sums of exp2(score - max); output
    start_n, masked,  # first key; whether the scores need the masks (see _fwd_kernel)
    q_n, rows, q_ids, q_ids_max, pid_bh, b, k_base, v_base, skn, svn, k_n_ptr, v_p_ptr,
    k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N, eps, qk_scale_log2, D: tl.constexpr,
    PRE_NORMALISED: tl.constexpr, PADDED_PLAIN: tl.constexpr, HAS_K_W: tl.constexpr,
    HAS_K_B: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, TILE_N: tl.constexpr,
    UNSHIFTED: tl.constexpr,
):  # fmt: skip
    """The forward's softmax over keys start_n ... start_n + TILE_N - 1: (m_i, l_i, acc)
    updated. ``masked`` False: every key < N and visible to every query causal-wise (a uniform
    branch: the padding and block masks apply whatever it says). ``UNSHIFTED``: the scores are
    known to be bounded (see _fwd_kernel), so exp2 needs no shift and m_i stays 0."""
    dtype = q_n.dtype
    dims = tl.arange(0, BLOCK_D)
    cols, _, k_ids, run_tile = _tile(start_n, N, ids_ptr, q_ids_max, TILE_N, True, BLOCK_CAUSAL)
    if run_tile:
        if PRE_NORMALISED:
            k_n = _load_padded_rows(k_n_ptr, pid_bh, cols, N, BLOCK_D)
        else:  # the statistics computed here (the forward stores them once, per row block)
            k = _load_rows(k_base, cols, dims, skn, N, D).to(tl.float32)
            k_hat, k_mean, k_rstd = _layer_norm_stats(k, dims < D, D, eps)
            k_n = _affine(k_hat, k_w_ptr, k_b_ptr, dims, D, HAS_K_W, HAS_K_B).to(dtype)
        v = _plain_rows(v_base, v_p_ptr, pid_bh, cols, svn, N, dtype, D, PADDED_PLAIN, BLOCK_D)
        if HAS_PAD:  # padding keys' p is 0, but 0 times a NaN or inf value is NaN
            v = _zero_padding_keys(v, pad_ptr, b, cols, N)
        scores = tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION, out_dtype=tl.float32)
        scores = scores * qk_scale_log2
        if HAS_PAD or BLOCK_CAUSAL:  # masks on every tile
            apply_masks = True
        else:
            apply_masks = masked
        if apply_masks:
            visible = _visible_tile(rows, cols, q_ids, k_ids, b, pad_ptr, N, HAS_PAD, CAUSAL,
                                    BLOCK_CAUSAL)  # fmt: skip
            scores = tl.where(visible, scores, float("-inf"))
        if UNSHIFTED:  # no row maximum, no rescaling of l_i and acc; masked scores give 0
            p = tl.math.exp2(scores)
            l_i = l_i + tl.sum(p, axis=1)
            acc = acc + tl.dot(p.to(dtype), v, input_precision=PRECISION, out_dtype=tl.float32)
        else:
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # Rows with nothing visible yet keep max -inf; shift by 0 there so that
            # exp2(-inf - shift) is 0 rather than NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - shift)
            p = tl.math.exp2(scores - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(dtype), v, input_precision=PRECISION, out_dtype=tl.float32
            )
            m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_keys(
    start_m0, q_n, rows, q_ids, q_ids_max, pid_bh, b, k_base, v_base, skn, svn, k_n_ptr,
    v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N, eps, qk_scale_log2, D: tl.constexpr,
    PRE_NORMALISED: tl.constexpr, PADDED_PLAIN: tl.constexpr, HAS_K_W: tl.constexpr,
    HAS_K_B: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNSHIFTED: tl.constexpr,
):  # fmt: skip
    """(m_i, l_i, acc) of the program's rows over every key tile they see (see _fwd_tile).

    Whole key tiles, then the keys past the last whole tile in _TAIL_N-key tiles: LaBraM's
    N = 257 ends in one 16-key tile instead of a whole BLOCK_N one for its single last key.
    Only tiles on the causal diagonal and the last ones compare scores with the masks (the
    padding and block masks apply to all). A tuple of these arguments cannot hold the string
    constexpr PRECISION: they are written out."""
    if UNSHIFTED:
        m_i = tl.zeros([BLOCK_M], tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = N
    n_full = N // BLOCK_N * BLOCK_N  # keys in whole tiles
    n_interior = n_full  # keys in whole tiles that every query here sees (causal-wise)
    if CAUSAL:
        hi = tl.minimum(N, start_m0 + BLOCK_M)  # key tiles past the diagonal: all masked
        n_interior = tl.minimum(n_full, start_m0 // BLOCK_N * BLOCK_N)
    for start_n in range(0, tl.minimum(hi, n_full), BLOCK_N):
        # whole tiles need the masks only on the causal diagonal: without CAUSAL a constant,
        # so that no mask code is compiled into these loops
        on_diagonal = start_n >= n_interior if CAUSAL else False
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, start_n, on_diagonal, q_n, rows, q_ids, q_ids_max, pid_bh, b,
            k_base, v_base, skn, svn, k_n_ptr, v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N, eps,
            qk_scale_log2, D, PRE_NORMALISED, PADDED_PLAIN, HAS_K_W, HAS_K_B, HAS_PAD, CAUSAL,
            BLOCK_CAUSAL, BLOCK_D, PRECISION, BLOCK_N, UNSHIFTED
        )  # fmt: skip
    for start_n in range(n_full, hi, _TAIL_N):
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, start_n, True, q_n, rows, q_ids, q_ids_max, pid_bh, b, k_base, v_base,
            skn, svn, k_n_ptr, v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N, eps, qk_scale_log2,
            D, PRE_NORMALISED, PADDED_PLAIN, HAS_K_W, HAS_K_B, HAS_PAD, CAUSAL, BLOCK_CAUSAL,
            BLOCK_D, PRECISION, _TAIL_N, UNSHIFTED
        )  # fmt: skip
    return m_i, l_i, acc


@_autotuned(_FWD_CONFIGS, _FWD_WIDE_CONFIGS, _FWD_FP32_CONFIGS, _FWD_FP32_WIDE_CONFIGS)
@triton.jit
def _fwd_kernel(
    q_ptr,  # (B, H, N, D) strides (sqb, sqh, sqn, 1)
    k_ptr,  # (B, H, N, D) strides (skb, skh, skn, 1)
    v_ptr,  # (B, H, N, D) strides (svb, svh, svn, 1)
    q_w_ptr,  # (D,) or dummy
    q_b_ptr,
    k_w_ptr,
    k_b_ptr,
    pad_ptr,  # (B, N) uint8, 1 = padded key; or dummy
    ids_ptr,  # (N,) int32 block ids; or dummy
    out_ptr,  # (B, N, H, D) contiguous, dtype of q
    lse_ptr,  # (B, H, N) fp32
    q_stats_ptr,  # (B, H, N, 2) fp32: mean, rstd
    k_stats_ptr,  # (B, H, N, 2) fp32
    k_n_ptr,  # (B * H, N, BLOCK_D) padded LayerNorm(k) from _pad_rows_kernel, or dummy
    v_p_ptr,  # (B * H, N, BLOCK_D) padded v, or dummy
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    H,
    N,
    D: tl.constexpr,
    N_BUCKET,
    first,  # this launch's programs own rows first ... first + extent - 1 (see _launch_spans)
    extent,
    eps,
    qk_scale_log2,  # scale * log2(e)
    unshifted_limit,  # largest score bound (log2 domain) for loops without row maxima
    PRE_NORMALISED: tl.constexpr,  # the loop reads k_n_ptr (k_stats written)
    PADDED_PLAIN: tl.constexpr,  # the loop reads v_p_ptr
    HAS_Q_W: tl.constexpr,
    HAS_Q_B: tl.constexpr,
    HAS_K_W: tl.constexpr,
    HAS_K_B: tl.constexpr,
    HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # the strides arrive divided by it (see _row_align)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN  # see _row_align
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    svb, svh, svn = svb * ALIGN, svh * ALIGN, svn * ALIGN
    pid_m, pid_bh = _program_ids(extent, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    dtype = q_ptr.dtype.element_ty

    start_m0 = first + pid_m * BLOCK_M  # the program's first row
    rows = start_m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    col_ok = dims < D

    q = _load_rows(q_base, rows, dims, sqn, N, D).to(tl.float32)
    q_hat = _normalise_and_store_stats(q, col_ok, D, eps, q_stats_ptr + pid_bh * N * 2, rows, N)
    q_affine = _affine(q_hat, q_w_ptr, q_b_ptr, dims, D, HAS_Q_W, HAS_Q_B)
    q_n = q_affine.to(dtype)
    # |score| <= |q_n| |k_n| |scale| (Cauchy-Schwarz), |k_n| bounded by the k-norm parameters
    # alone: when every row's bound is within unshifted_limit (log2 domain), exp2 of the raw
    # scores neither overflows nor underflows, and the loops skip the row maxima and the
    # rescaling of l_i and acc (a reduction across each row of every tile, two exp2 a row and a
    # multiply per accumulator). NaN or inf bounds take the online maximum.
    q_norm_max = tl.max(tl.sqrt(tl.sum(q_affine * q_affine, axis=1)), axis=0)
    key_norm_bound = _norm_bound(k_w_ptr, k_b_ptr, dims, D, HAS_K_W, HAS_K_B)
    unshifted = q_norm_max * key_norm_bound * tl.abs(qk_scale_log2) <= unshifted_limit
    if not PRE_NORMALISED:
        # The k statistics of the rows this program owns (every key tile is normalised again
        # by each query program, but stored once, here).
        k_own = _load_rows(k_base, rows, dims, skn, N, D).to(tl.float32)
        _normalise_and_store_stats(k_own, col_ok, D, eps, k_stats_ptr + pid_bh * N * 2, rows, N)

    q_ids = rows  # placeholder when not block-causal (unused)
    if BLOCK_CAUSAL:
        q_ids = tl.load(ids_ptr + rows, mask=row_ok, other=_INT32_MIN)
        q_ids_max = tl.max(q_ids, axis=0)

    if not BLOCK_CAUSAL:
        q_ids_max = 0  # placeholder (unused)
    # the same loops either way, but UNSHIFTED must be a compile-time constant: one call each
    if unshifted:
        m_i, l_i, acc = _fwd_keys(
            start_m0, q_n, rows, q_ids, q_ids_max, pid_bh, b, k_base, v_base, skn, svn, k_n_ptr,
            v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N, eps, qk_scale_log2, D,
            PRE_NORMALISED, PADDED_PLAIN, HAS_K_W, HAS_K_B, HAS_PAD, CAUSAL, BLOCK_CAUSAL,
            BLOCK_D, PRECISION, BLOCK_M, BLOCK_N, True
        )  # fmt: skip
    else:
        m_i, l_i, acc = _fwd_keys(
            start_m0, q_n, rows, q_ids, q_ids_max, pid_bh, b, k_base, v_base, skn, svn, k_n_ptr,
            v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N, eps, qk_scale_log2, D,
            PRE_NORMALISED, PADDED_PLAIN, HAS_K_W, HAS_K_B, HAS_PAD, CAUSAL, BLOCK_CAUSAL,
            BLOCK_D, PRECISION, BLOCK_M, BLOCK_N, False
        )  # fmt: skip

    seen = l_i > 0.0
    # one division per row (rows that saw nothing: acc = 0 -> 0)
    out = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(lse_ptr + pid_bh * N + rows, lse, mask=row_ok)
    out_rows = out_ptr + (b * N + rows[:, None]) * (H * D) + h * D + dims[None, :]
    tl.store(out_rows, out.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------


@triton.jit
def _n_padded(N):
    """Rows of the backward's per-row buffers: N rounded up to a multiple of _TAIL_N."""
    return tl.cdiv(N, _TAIL_N) * _TAIL_N


@triton.jit
def _row_shift(lse):
    """exp2(score * qk_scale_log2 - shift) is a row's probability: shift = lse log2 e, and +inf
    for rows that saw nothing (lse = -inf) or past N, whose probabilities are then 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _bwd_delta_kernel(
    out_ptr,  # (B, N, H, D) contiguous
    grad_out_ptr,  # (B, N, H, D) strides (sgb, sgn, sgh, 1)
    lse_ptr,  # (B, H, N) fp32, the forward's
    delta_ptr,  # (B, H, n_padded(N)) fp32 out: rowsum(dO * O), 0 past N
    lse2_ptr,  # (B, H, n_padded(N)) fp32 out: the rows' shift in the log2 domain (_row_shift)
    sgb,
    sgn,
    sgh,
    H,
    N,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # the strides arrive divided by it (see _row_align)
):
    """The per-row terms of the backward's probabilities and score gradients, in rows padded
    to a multiple of _TAIL_N: the dK / dV loops then read every query tile's without a mask
    (padding rows: shift +inf, so p = 0, and delta 0)."""
    sgb, sgn, sgh = sgb * ALIGN, sgn * ALIGN, sgh * ALIGN  # see _row_align
    n_pad = _n_padded(N)
    pid_m, pid_bh = _program_ids(n_pad, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _load_rows(out_ptr + b * N * H * D + h * D, rows, dims, H * D, N, D).to(tl.float32)
    g = _load_rows(grad_out_ptr + b * sgb + h * sgh, rows, dims, sgn, N, D).to(tl.float32)
    lse = tl.load(lse_ptr + pid_bh * N + rows, mask=rows < N, other=float("-inf"))
    kept = rows < n_pad
    tl.store(delta_ptr + pid_bh * n_pad + rows, tl.sum(o * g, axis=1), mask=kept)
    tl.store(lse2_ptr + pid_bh * n_pad + rows, _row_shift(lse), mask=kept)


@triton.jit
def _dkdv_tile(
    dk_n, dv,  # (BLOCK_N, BLOCK_D) fp32 sums: d(normalised keys) / scale, dv
    start_m,  # first query row of the tile
    k_n, v, cols, col_in, k_pad, k_ids, k_ids_min, keys_past_n,  # the program's keys
    pid_bh, q_base, g_base, sqn, sgn, q_stats_ptr, q_n_ptr, g_p_ptr, q_w_ptr, q_b_ptr, ids_ptr,
    lse2_head, delta_head, dq_acc_head, N, qk_scale_log2, D: tl.constexpr,
    PRE_NORMALISED: tl.constexpr, PADDED_PLAIN: tl.constexpr, HAS_Q_W: tl.constexpr,
    HAS_Q_B: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, TILE_M: tl.constexpr,
):  # fmt: skip
    """The dK / dV sums of _bwd_dkdv_kernel's keys over query rows start_m ... + TILE_M - 1;
    with ATOMIC_DQ, the tile's share of those rows' dQ (normalised, unscaled) added into
    dq_acc_head (the head's rows of dq_acc_ptr)."""
    dtype = k_n.dtype
    rows, row_in, q_ids, run_tile = _tile(start_m, N, ids_ptr, k_ids_min, TILE_M, False,
                                          BLOCK_CAUSAL)  # fmt: skip
    if run_tile:
        q_n = _normalised_rows(q_base, q_n_ptr, q_stats_ptr + pid_bh * N * 2, q_w_ptr, q_b_ptr,
                               pid_bh, rows, sqn, N, dtype, D, PRE_NORMALISED, HAS_Q_W, HAS_Q_B,
                               BLOCK_D)  # fmt: skip
        g = _plain_rows(g_base, g_p_ptr, pid_bh, rows, sgn, N, dtype, D, PADDED_PLAIN, BLOCK_D)
        # every tile's rows lie within the padded buffers: no mask, no select
        lse2 = tl.load(lse2_head + rows)
        delta = tl.load(delta_head + rows)
        scores_t = tl.dot(k_n, tl.trans(q_n), input_precision=PRECISION, out_dtype=tl.float32)
        p_t = tl.math.exp2(scores_t * qk_scale_log2 - lse2[None, :])
        # Without masks: query rows past N have p = 0 already (shift +inf). Keys past N (in
        # the last key block) have p of their own (which may even overflow): each only reaches
        # its own rows of dK and dV, which are not stored and, in dK, zeroed after the loops
        # (_bwd_dkdv_kernel); but their dS would reach every row's dQ share.
        # (parenthesised: triton < 3.4 refuses a chain of three or more `or`s)
        if (HAS_PAD or CAUSAL) or BLOCK_CAUSAL:
            visible = _visible(rows[None, :], cols[:, None], k_pad[:, None], q_ids[None, :],
                               k_ids[:, None], N, CAUSAL, BLOCK_CAUSAL)  # fmt: skip
            p_t = tl.where(visible, p_t, 0.0)
        elif ATOMIC_DQ and keys_past_n:
            p_t = tl.where(col_in[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(dtype), g, input_precision=PRECISION, out_dtype=tl.float32)
        dp_t = tl.dot(v, tl.trans(g), input_precision=PRECISION, out_dtype=tl.float32)
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        dk_n += tl.dot(ds_t, q_n, input_precision=PRECISION, out_dtype=tl.float32)
        if ATOMIC_DQ:
            dq_part = tl.dot(tl.trans(ds_t), k_n, input_precision=PRECISION, out_dtype=tl.float32)
            dims = tl.arange(0, BLOCK_D)
            # rows past N are in the buffer (padded as lse2), and get zeros (p = 0 there)
            tl.atomic_add(dq_acc_head + rows[:, None] * BLOCK_D + dims[None, :], dq_part,
                          mask=(dims < D)[None, :], sem="relaxed")  # fmt: skip

    return dk_n, dv


@_autotuned(_DKDV_CONFIGS, _DKDV_WIDE_CONFIGS, _DKDV_FP32_CONFIGS, _DKDV_FP32_WIDE_CONFIGS)
@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_w_ptr,
    q_b_ptr,
    k_w_ptr,
    k_b_ptr,
    pad_ptr,
    ids_ptr,
    grad_out_ptr,  # (B, N, H, D) strides (sgb, sgn, sgh, 1)
    lse2_ptr,  # (B, H, n_padded(N)) fp32 from _bwd_delta_kernel
    delta_ptr,  # (B, H, n_padded(N)) fp32
    q_stats_ptr,  # (B, H, N, 2) fp32
    k_stats_ptr,
    q_n_ptr,  # (B * H, N, BLOCK_D) padded LayerNorm(q) from _pad_rows_kernel, or dummy
    g_p_ptr,  # (B * H, N, BLOCK_D) padded grad_out, or dummy
    dk_ptr,  # (B, H, N, D) contiguous out
    dv_ptr,  # (B, H, N, D) contiguous out
    dk_w_part_ptr,  # (B*H, num_slots, D) fp32 out, or dummy
    dq_acc_ptr,  # (B * H, n_padded(N), BLOCK_D) fp32, zeroed: dQ sums added in (ATOMIC_DQ)
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sgb,
    sgn,
    sgh,
    H,
    N,
    D: tl.constexpr,
    N_BUCKET,
    first,  # this launch's programs own keys first ... first + extent - 1 (see _launch_spans)
    extent,
    num_slots,
    scale,
    qk_scale_log2,
    HAS_Q_W: tl.constexpr,
    HAS_Q_B: tl.constexpr,
    HAS_K_W: tl.constexpr,
    HAS_K_B: tl.constexpr,
    HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # the strides arrive divided by it (see _row_align)
    PRECISION: tl.constexpr,
    PART: tl.constexpr,
    PRE_NORMALISED: tl.constexpr,  # the loop reads q_n_ptr
    PADDED_PLAIN: tl.constexpr,  # the loop reads g_p_ptr
    ATOMIC_DQ: tl.constexpr,  # also add dQ's shares into dq_acc_ptr (see ATOMIC_DQ)
    BLOCK_N: tl.constexpr,  # keys owned by this program
    BLOCK_M: tl.constexpr,  # queries per loop step
):
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN  # see _row_align
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    svb, svh, svn = svb * ALIGN, svh * ALIGN, svn * ALIGN
    sgb, sgn, sgh = sgb * ALIGN, sgn * ALIGN, sgh * ALIGN
    pid_n, pid_bh = _program_ids(extent, BLOCK_N)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * sqb + h * sqh
    g_base = grad_out_ptr + b * sgb + h * sgh
    dtype = q_ptr.dtype.element_ty

    start_n0 = first + pid_n * BLOCK_N  # the program's first key
    cols = start_n0 + tl.arange(0, BLOCK_N)
    col_in = cols < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D

    k = _load_rows(k_ptr + b * skb + h * skh, cols, dims, skn, N, D).to(tl.float32)
    k_hat, k_rstd = _normalised_from_stats(k, k_stats_ptr + pid_bh * N * 2, cols, N, dim_ok)
    k_n = _affine(k_hat, k_w_ptr, k_b_ptr, dims, D, HAS_K_W, HAS_K_B).to(dtype)
    v = _load_rows(v_ptr + b * svb + h * svh, cols, dims, svn, N, D)
    k_pad = tl.zeros([BLOCK_N], tl.int32)
    if HAS_PAD:
        k_pad = tl.load(pad_ptr + b * N + cols, mask=col_in, other=1).to(tl.int32)
        # padding keys get zero gradients whatever they hold: zeros for their rows (0 times a
        # NaN or inf key or value was NaN in dS, dQ and the LayerNorm parameters' sums)
        padded = k_pad != 0
        k_hat = tl.where(padded[:, None], 0.0, k_hat)
        k_rstd = tl.where(padded, 0.0, k_rstd)
        k_n = tl.where(padded[:, None], 0.0, k_n).to(dtype)
        v = tl.where(padded[:, None], 0.0, v).to(dtype)
    k_ids = cols
    if BLOCK_CAUSAL:
        k_ids = tl.load(ids_ptr + cols, mask=col_in, other=_INT32_MAX)
        k_ids_min = tl.min(k_ids, axis=0)

    dk_n = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    keys_past_n = start_n0 + BLOCK_N > N  # this block holds keys past N
    lo = 0
    if CAUSAL:
        lo = start_n0 // BLOCK_M * BLOCK_M  # earlier queries see none of these keys
    if not BLOCK_CAUSAL:
        k_ids_min = 0  # placeholder (unused)
    n_pad = _n_padded(N)  # the head's rows in the padded per-row buffers
    lse2_head = lse2_ptr + pid_bh * n_pad
    delta_head = delta_ptr + pid_bh * n_pad
    dq_acc_head = dq_acc_ptr + pid_bh * n_pad * BLOCK_D
    # whole query tiles, then the rest in _TAIL_N-row tiles (see _fwd_kernel)
    m_full = N // BLOCK_M * BLOCK_M
    for start_m in range(lo, m_full, BLOCK_M):
        dk_n, dv = _dkdv_tile(
            dk_n, dv, start_m, k_n, v, cols, col_in, k_pad, k_ids, k_ids_min, keys_past_n, pid_bh,
            q_base, g_base, sqn, sgn, q_stats_ptr, q_n_ptr, g_p_ptr, q_w_ptr, q_b_ptr, ids_ptr,
            lse2_head, delta_head, dq_acc_head, N, qk_scale_log2, D, PRE_NORMALISED, PADDED_PLAIN,
            HAS_Q_W, HAS_Q_B, HAS_PAD, CAUSAL, BLOCK_CAUSAL, BLOCK_D, PRECISION, ATOMIC_DQ, BLOCK_M
        )  # fmt: skip
    for start_m in range(tl.maximum(lo, m_full), N, _TAIL_N):
        dk_n, dv = _dkdv_tile(
            dk_n, dv, start_m, k_n, v, cols, col_in, k_pad, k_ids, k_ids_min, keys_past_n, pid_bh,
            q_base, g_base, sqn, sgn, q_stats_ptr, q_n_ptr, g_p_ptr, q_w_ptr, q_b_ptr, ids_ptr,
            lse2_head, delta_head, dq_acc_head, N, qk_scale_log2, D, PRE_NORMALISED, PADDED_PLAIN,
            HAS_Q_W, HAS_Q_B, HAS_PAD, CAUSAL, BLOCK_CAUSAL, BLOCK_D, PRECISION, ATOMIC_DQ, _TAIL_N
        )  # fmt: skip

    # rows of keys past N: whatever the loops left there (see _dkdv_tile) stays out of the
    # LayerNorm parameters' sums
    dk_n = tl.where(col_in[:, None], dk_n * scale, 0.0)
    dk = _layer_norm_backward(dk_n, k_hat, k_rstd, k_w_ptr, dims, D, HAS_K_W)
    out_offset = (pid_bh * N + cols[:, None]) * D + dims[None, :]
    out_mask = col_in[:, None] & dim_ok[None, :]
    tl.store(dk_ptr + out_offset, dk.to(dtype), mask=out_mask)
    tl.store(dv_ptr + out_offset, dv.to(dtype), mask=out_mask)
    if HAS_K_W:
        dw = tl.sum(dk_n * k_hat, axis=0)
        _store_partial(dk_w_part_ptr, dw, pid_bh, start_n0, num_slots, dims, D, BLOCK_N, PART)


@triton.jit
def _store_dq(
    dq_n, q_hat, q_rstd,  # (BLOCK_M, BLOCK_D) fp32 d(normalised queries); the rows' LayerNorm
    q_w_ptr, dq_ptr, dq_w_part_ptr, dq_b_part_ptr, pid_bh, rows, start_m0, num_slots, N,
    D: tl.constexpr, HAS_Q_W: tl.constexpr, HAS_Q_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, PART: tl.constexpr,
):  # fmt: skip
    """dQ of the rows (the LayerNorm backward of dq_n) stored, and the partial sums of the q
    LayerNorm parameters' gradients."""
    dims = tl.arange(0, BLOCK_D)
    dq = _layer_norm_backward(dq_n, q_hat, q_rstd, q_w_ptr, dims, D, HAS_Q_W)
    tl.store(
        dq_ptr + (pid_bh * N + rows[:, None]) * D + dims[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=(rows < N)[:, None] & (dims < D)[None, :],
    )
    if HAS_Q_W:
        dw = tl.sum(dq_n * q_hat, axis=0)
        _store_partial(dq_w_part_ptr, dw, pid_bh, start_m0, num_slots, dims, D, BLOCK_M, PART)
    if HAS_Q_B:
        db = tl.sum(dq_n, axis=0)
        _store_partial(dq_b_part_ptr, db, pid_bh, start_m0, num_slots, dims, D, BLOCK_M, PART)


@triton.jit
def _dq_tile(
    dq_n,  # (BLOCK_M, BLOCK_D) fp32 sum: d(normalised queries) / scale
    start_n,  # first key of the tile
    q_n, g, rows, lse2, delta, q_ids, q_ids_max,  # the program's query rows
    pid_bh, b, k_base, v_base, skn, svn, k_stats_base, k_n_ptr, v_p_ptr, k_w_ptr, k_b_ptr,
    pad_ptr, ids_ptr, N, qk_scale_log2, D: tl.constexpr, PRE_NORMALISED: tl.constexpr,
    PADDED_PLAIN: tl.constexpr, HAS_K_W: tl.constexpr, HAS_K_B: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    TILE_N: tl.constexpr, WHOLE: tl.constexpr,
):  # fmt: skip
    """_bwd_dq_kernel's dQ sum over keys start_n ... start_n + TILE_N - 1 (WHOLE: all < N)."""
    dtype = q_n.dtype
    cols, col_in, k_ids, run_tile = _tile(start_n, N, ids_ptr, q_ids_max, TILE_N, True,
                                          BLOCK_CAUSAL)  # fmt: skip
    if run_tile:
        k_n = _normalised_rows(k_base, k_n_ptr, k_stats_base, k_w_ptr, k_b_ptr, pid_bh, cols, skn,
                               N, dtype, D, PRE_NORMALISED, HAS_K_W, HAS_K_B, BLOCK_D)  # fmt: skip
        v = _plain_rows(v_base, v_p_ptr, pid_bh, cols, svn, N, dtype, D, PADDED_PLAIN, BLOCK_D)
        if HAS_PAD:  # (dS = 0 · NaN and 0 · a NaN key are NaN, see _fwd_tile)
            k_n = _zero_padding_keys(k_n, pad_ptr, b, cols, N)
            v = _zero_padding_keys(v, pad_ptr, b, cols, N)
        scores = tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION, out_dtype=tl.float32)
        p = tl.math.exp2(scores * qk_scale_log2 - lse2[:, None])
        # without masks only the tail tiles compare keys with N: a key past N has p of its own
        # (which may even overflow), and a zero row of k_n would not stop inf times 0
        if (HAS_PAD or CAUSAL) or BLOCK_CAUSAL:  # (parenthesised: see _dkdv_tile)
            visible = _visible_tile(rows, cols, q_ids, k_ids, b, pad_ptr, N, HAS_PAD, CAUSAL,
                                    BLOCK_CAUSAL)  # fmt: skip
            p = tl.where(visible, p, 0.0)
        elif not WHOLE:
            p = tl.where(col_in[None, :], p, 0.0)
        dp = tl.dot(g, tl.trans(v), input_precision=PRECISION, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        dq_n += tl.dot(ds.to(dtype), k_n, input_precision=PRECISION, out_dtype=tl.float32)

    return dq_n


@_autotuned(_DQ_CONFIGS, _DQ_WIDE_CONFIGS, _DQ_FP32_CONFIGS, _DQ_FP32_WIDE_CONFIGS)
@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_w_ptr,
    q_b_ptr,
    k_w_ptr,
    k_b_ptr,
    pad_ptr,
    ids_ptr,
    grad_out_ptr,  # (B, N, H, D) strides (sgb, sgn, sgh, 1)
    lse2_ptr,  # (B, H, n_padded(N)) fp32 from _bwd_delta_kernel
    delta_ptr,  # (B, H, n_padded(N)) fp32
    q_stats_ptr,  # (B, H, N, 2) fp32
    k_stats_ptr,
    k_n_ptr,  # (B * H, N, BLOCK_D) padded LayerNorm(k) from _pad_rows_kernel, or dummy
    v_p_ptr,  # (B * H, N, BLOCK_D) padded v, or dummy
    dq_ptr,  # (B, H, N, D) contiguous out
    dq_w_part_ptr,  # (B*H, num_slots, D) fp32 out, or dummy
    dq_b_part_ptr,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sgb,
    sgn,
    sgh,
    H,
    N,
    D: tl.constexpr,
    N_BUCKET,
    first,  # this launch's programs own rows first ... first + extent - 1 (see _launch_spans)
    extent,
    num_slots,
    scale,
    qk_scale_log2,
    HAS_Q_W: tl.constexpr,
    HAS_Q_B: tl.constexpr,
    HAS_K_W: tl.constexpr,
    HAS_K_B: tl.constexpr,
    HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # the strides arrive divided by it (see _row_align)
    PRECISION: tl.constexpr,
    PART: tl.constexpr,
    PRE_NORMALISED: tl.constexpr,  # the loop reads k_n_ptr
    PADDED_PLAIN: tl.constexpr,  # the loop reads v_p_ptr
    BLOCK_M: tl.constexpr,  # queries owned by this program
    BLOCK_N: tl.constexpr,  # keys per loop step
):
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN  # see _row_align
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    svb, svh, svn = svb * ALIGN, svh * ALIGN, svn * ALIGN
    sgb, sgn, sgh = sgb * ALIGN, sgn * ALIGN, sgh * ALIGN
    pid_m, pid_bh = _program_ids(extent, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    k_stats_base = k_stats_ptr + pid_bh * N * 2
    dtype = q_ptr.dtype.element_ty

    start_m0 = first + pid_m * BLOCK_M  # the program's first row
    rows = start_m0 + tl.arange(0, BLOCK_M)
    row_in = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D

    q = _load_rows(q_ptr + b * sqb + h * sqh, rows, dims, sqn, N, D).to(tl.float32)
    q_hat, q_rstd = _normalised_from_stats(q, q_stats_ptr + pid_bh * N * 2, rows, N, dim_ok)
    q_n = _affine(q_hat, q_w_ptr, q_b_ptr, dims, D, HAS_Q_W, HAS_Q_B).to(dtype)
    g = _load_rows(grad_out_ptr + b * sgb + h * sgh, rows, dims, sgn, N, D).to(dtype)
    row_terms = pid_bh * _n_padded(N) + rows
    lse2 = tl.load(lse2_ptr + row_terms, mask=row_in, other=float("inf"))
    delta = tl.load(delta_ptr + row_terms, mask=row_in, other=0.0)
    q_ids = rows
    if BLOCK_CAUSAL:
        q_ids = tl.load(ids_ptr + rows, mask=row_in, other=_INT32_MIN)
        q_ids_max = tl.max(q_ids, axis=0)

    dq_n = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if not BLOCK_CAUSAL:
        q_ids_max = 0  # placeholder (unused)
    hi = N
    if CAUSAL:
        hi = tl.minimum(N, start_m0 + BLOCK_M)
    # whole key tiles, then the rest in _TAIL_N-key tiles (see _fwd_kernel)
    n_full = N // BLOCK_N * BLOCK_N
    for start_n in range(0, tl.minimum(hi, n_full), BLOCK_N):
        dq_n = _dq_tile(
            dq_n, start_n, q_n, g, rows, lse2, delta, q_ids, q_ids_max, pid_bh, b, k_base, v_base,
            skn, svn, k_stats_base, k_n_ptr, v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N,
            qk_scale_log2, D, PRE_NORMALISED, PADDED_PLAIN, HAS_K_W, HAS_K_B, HAS_PAD, CAUSAL,
            BLOCK_CAUSAL, BLOCK_D, PRECISION, BLOCK_N, True
        )  # fmt: skip
    for start_n in range(n_full, hi, _TAIL_N):
        dq_n = _dq_tile(
            dq_n, start_n, q_n, g, rows, lse2, delta, q_ids, q_ids_max, pid_bh, b, k_base, v_base,
            skn, svn, k_stats_base, k_n_ptr, v_p_ptr, k_w_ptr, k_b_ptr, pad_ptr, ids_ptr, N,
            qk_scale_log2, D, PRE_NORMALISED, PADDED_PLAIN, HAS_K_W, HAS_K_B, HAS_PAD, CAUSAL,
            BLOCK_CAUSAL, BLOCK_D, PRECISION, _TAIL_N, False
        )  # fmt: skip

    _store_dq(dq_n * scale, q_hat, q_rstd, q_w_ptr, dq_ptr, dq_w_part_ptr, dq_b_part_ptr,
              pid_bh, rows, start_m0, num_slots, N, D, HAS_Q_W, HAS_Q_B, BLOCK_D, BLOCK_M,
              PART)  # fmt: skip


@triton.jit
def _bwd_dq_finish_kernel(
    q_ptr,
    q_w_ptr,
    q_stats_ptr,  # (B, H, N, 2) fp32
    dq_acc_ptr,  # (B * H, n_padded(N), BLOCK_D) fp32: d(normalised queries) / scale, from ATOMIC_DQ
    dq_ptr,  # (B, H, N, D) contiguous out
    dq_w_part_ptr,  # (B*H, num_slots, D) fp32 out, or dummy
    dq_b_part_ptr,
    sqb,
    sqh,
    sqn,
    H,
    N,
    D: tl.constexpr,
    num_slots,
    scale,
    HAS_Q_W: tl.constexpr,
    HAS_Q_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # the strides arrive divided by it (see _row_align)
    PART: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dQ from the sums the ATOMIC_DQ dK / dV kernel added up: the LayerNorm backward of each
    row, and the partial sums of the q LayerNorm parameters' gradients (as _bwd_dq_kernel)."""
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN  # see _row_align
    pid_m, pid_bh = _program_ids(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    start_m0 = pid_m * BLOCK_M
    rows = start_m0 + tl.arange(0, BLOCK_M)
    row_in = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = _load_rows(q_ptr + b * sqb + h * sqh, rows, dims, sqn, N, D).to(tl.float32)
    q_hat, q_rstd = _normalised_from_stats(q, q_stats_ptr + pid_bh * N * 2, rows, N, dim_ok)
    sums = tl.load(
        dq_acc_ptr + (pid_bh * _n_padded(N) + rows[:, None]) * BLOCK_D + dims[None, :],
        mask=row_in[:, None] & dim_ok[None, :],
        other=0.0,
    )
    _store_dq(sums * scale, q_hat, q_rstd, q_w_ptr, dq_ptr, dq_w_part_ptr, dq_b_part_ptr,
              pid_bh, rows, start_m0, num_slots, N, D, HAS_Q_W, HAS_Q_B, BLOCK_D, BLOCK_M,
              PART)  # fmt: skip


# The tail launches' kernels (see _launch_spans): the same functions with one fixed config each
# (an autotuner with one config launches it without timing).
_fwd_tail_kernel = _keyed_autotune(_FWD_TAIL_CONFIGS, _fwd_kernel.fn)
_bwd_dkdv_tail_kernel = _keyed_autotune(_DKDV_TAIL_CONFIGS, _bwd_dkdv_kernel.fn)
_bwd_dq_tail_kernel = _keyed_autotune(_DQ_TAIL_CONFIGS, _bwd_dq_kernel.fn)


# --------------------------------------------------------------------------------------------
# Launchers (registered custom ops).
# --------------------------------------------------------------------------------------------


def unshifted_score_limit(dtype: torch.dtype) -> float:
    """The largest score bound (log2 domain, |q_n| |k_n| |scale| log2 e) for which the forward
    takes exp2 of raw scores, with no row maxima (-inf with UNSHIFTED off). The probabilities
    then lie in [2^-limit, 2^limit] before the P.V product casts them to the inputs' dtype:
    43.3 (30 in natural log, the C++ kernel's limit) keeps them normal in bf16 and fp32 and a
    row's sum far from overflow; fp16 has normal numbers from 2^-14 to 65504 only."""
    if not UNSHIFTED:
        return -math.inf
    return 14.0 if dtype == torch.float16 else 30.0 * _LOG2E.value


def _precision(dtype: torch.dtype) -> str:
    # fp16/bf16 products are exact in fp32 accumulation. fp32 inputs use 3-pass TF32 on GPU
    # (tensor cores, near-fp32 error) and exact fp32 FMAs in the interpreter.
    if dtype != torch.float32 or _INTERPRETING:
        return "ieee"
    return "tf32x3"


# Host-side integer helpers in plain Python: triton.cdiv / next_power_of_2 are constexpr
# functions whose wrapper costs microseconds per call, and each launch needs several.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(D: int) -> int:
    return max(16, _next_power_of_2(D))


def _row_align(D: int, *tensors: torch.Tensor) -> int:
    """vector_align of D and the three outer strides of every tensor: the kernels take those
    strides divided by it, with D a constexpr, so that they load and store D = 20 bf16 rows as
    8-byte vectors (LaBraM's layouts all divide by 4), where a stride the compiler cannot bound
    made every element a separate 2-byte access."""
    return vector_align(D, *(s for t in tensors for s in t.stride()[:3]))


def _has_short_tail(N: int) -> bool:
    """Whether N is a multiple of _BLOCK_MULTIPLE plus 1 ... _TAIL_MAX_ROWS (257, 2049): the
    lengths where SPLIT_TAIL changes anything."""
    return 0 < N % _BLOCK_MULTIPLE <= _TAIL_MAX_ROWS


def _launch_spans(N: int, split_tail: bool) -> list[tuple[int, int, bool]]:
    """[(first, extent, tail)]: the launches that cover rows (dK / dV: keys) 0 ... N - 1 of the
    three attention kernels, each owning rows first ... first + extent - 1.

    At N = 257 (LaBraM: 256 patch tokens and a class token) whole blocks of 64 rows leave one
    program per head of five holding one row, which still loops over every key: a fifth of the
    grid doing 1/64 of its work. With ``split_tail``, when N is a multiple of _BLOCK_MULTIPLE
    plus at most _TAIL_MAX_ROWS, the main (autotuned) launch covers the multiple in whole blocks
    and a second one the rest in _TAIL_ROWS-row programs (``tail``); otherwise one launch covers
    all N.
    """
    if not (split_tail and _has_short_tail(N)):
        return [(0, N, False)]
    rest = N % _BLOCK_MULTIPLE
    spans = [(N - rest, rest, True)]
    if N > rest:
        spans.insert(0, (0, N - rest, False))
    return spans


def _needs_padded_rows(align: int, dtype: torch.dtype) -> bool:
    """Whether the PRE_NORMALISE loops read v (dQ) and grad_out (dK / dV) from padded copies:
    only when their rows' vectors (``align`` elements, see _row_align) are under 8 bytes (D = 25
    in bf16: 2-byte loads, not pipelined). From 8 bytes on the loops load the rows as given
    as vectors, pipelined, and the copy would cost a pass over the tensor for nothing."""
    return align * torch.finfo(dtype).bits // 8 < 8


def _grid(extent: int, block: str, heads: int):
    """The 1D grid of a launch owning ``extent`` rows of each of ``heads`` (batch x head)
    problems in blocks of meta[block] (see _program_ids)."""
    return lambda meta: (_cdiv(extent, meta[block]) * heads,)


def _direct(kernel):
    """The eager launcher: the kernel itself. (``wrap_triton`` outside a ``triton_op`` body
    sends every launch through the tracing higher-order op, which costs more than the launch.)"""
    return kernel


def _unit_inner_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _candidate_variants(N: int, step: str = "forward") -> list[LoopVariant]:
    """The loop variants a ``step`` ("forward" / "backward") of length N may take: both values
    of each unpinned switch (the split only where it changes anything, ATOMIC_DQ only in the
    backward and never under deterministic algorithms), the current defaults first."""
    pre = [False, True] if PRE_NORMALISE is None else [PRE_NORMALISE]
    if SPLIT_TAIL is None and _has_short_tail(N):
        split = [True, False]
    else:
        split = [SPLIT_TAIL is not False]
    if step != "backward" or torch.are_deterministic_algorithms_enabled():
        atomic = [False]
    else:
        atomic = [False, True] if ATOMIC_DQ is None else [ATOMIC_DQ]
    return [LoopVariant(p, t, a) for p in pre for t in split for a in atomic]


def _loop_variant(step: str, args: tuple, run_step, make_stand_ins) -> LoopVariant:
    """The loop variant of one call of ``step`` ("forward" / "backward", ``args`` being that
    step's op arguments): pinned, remembered, or the fastest of the candidates timed now by
    ``run_step(args, variant)``, on the call's own tensors or, while torch.compile traces the
    op with fake ones, on ``make_stand_ins(args)``. Cases: device, dtype, D, N's power-of-two
    bucket (as the autotuner's key), whether N has a short tail, row alignment, which LayerNorm
    parameters and masks are given."""
    q, k, v = args[:3] if step == "forward" else args[1:4]
    params = args[3:7] if step == "forward" else args[4:8]
    masks = args[9:12] if step == "forward" else args[13:16]
    B, H, N, D = q.shape
    candidates = _candidate_variants(N, step)
    if len(candidates) == 1 or B * H * N == 0:  # (nothing to launch: nothing to time)
        return candidates[0]
    traced = is_traced(args)
    case = (
        str(q.device), q.dtype, D, _next_power_of_2(N), _has_short_tail(N),
        _row_align(D, q, k, v) if not traced or has_static_shape((q, k, v)) else None,
        tuple(p is not None for p in params), masks[0] is not None, bool(masks[1]),
        masks[2] is not None, tuple(candidates),
    )  # fmt: skip

    def make_run():
        real = make_stand_ins(args) if traced else args
        return lambda variant: run_step(real, variant)

    measure = MEASURE_VARIANTS and (not traced or has_static_shape(args))
    return measured_choice(f"qk_norm_attention {step}", case, candidates, make_run, measure=measure)


def _forward_stand_ins(args: tuple) -> tuple:
    """Real stand-ins for the forward op's arguments: random tensors of the same layouts,
    no key padding, one block (everything visible) for block_ids."""
    return tuple(stand_in(a) if isinstance(a, torch.Tensor) else a for a in args)


def _backward_stand_ins(args: tuple) -> tuple:
    """Real stand-ins for the backward op's arguments: those of the forward, the saved tensors
    computed from them by the forward (fused loops), a random grad_out of the same layout."""
    grad_out, q, k, v, q_w, q_b, k_w, k_b, _, _, _, _, scale, kpm, causal, ids = args
    fwd = _forward_stand_ins((q, k, v, q_w, q_b, k_w, k_b, 1e-6, scale, kpm, causal, ids))
    saved = _forward(*fwd, eager=True, variant=LoopVariant(False, False))
    return (stand_in(grad_out), *fwd[:7], *saved, scale, *fwd[9:])


def _check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: dict[str, torch.Tensor | None],
    key_padding_mask: torch.Tensor | None,
    block_ids: torch.Tensor | None,
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape (B, H, N, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    B, _, N, D = q.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {D} is not supported by the Triton kernels (1..128)")
    for name, p in params.items():
        if p is None:
            continue
        if p.shape != (D,):
            raise ValueError(f"{name} must have shape (D,) = ({D},), got {tuple(p.shape)}")
        if p.device != q.device:
            raise ValueError(f"{name} is on {p.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, N):
            raise ValueError(
                f"key_padding_mask must have shape (B, N) = ({B}, {N}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if block_ids is not None:
        if block_ids.shape != (N,):
            raise ValueError(f"block_ids must have shape (N,) = ({N},), got {block_ids.shape}")
        if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex:
            raise TypeError(f"block_ids must be an integer tensor, got {block_ids.dtype}")
        if block_ids.device != q.device:
            raise ValueError(f"block_ids is on {block_ids.device} but q is on {q.device}")


def _mask_args(
    q: torch.Tensor, key_padding_mask: torch.Tensor | None, block_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) uint8 padding flags and (N,) int32 block ids, or ``q`` as an unused placeholder."""
    # A copy, not a dtype view: inductor (torch 2.11) cannot lower a bool -> uint8 view when
    # torch.compile traces this op, and the copy is only B x N bytes.
    pad = q if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    ids = q if block_ids is None else _int32_block_ids(block_ids)
    return pad, ids


def _int32_block_ids(block_ids: torch.Tensor) -> torch.Tensor:
    """(N,) block ids as contiguous int32 with the same ``<=`` order between every pair.

    The kernels compare int32 ids. A plain cast would wrap int64 ids outside the int32 range
    (2**31 -> -2**31) and change which keys a query sees, and checking the range would cost a
    device sync; instead wide ids are replaced by their rank, the number of ids strictly
    smaller (in [0, N), equal ids keep equal ranks). One sort of N <= 16k elements.
    """
    if block_ids.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        return block_ids.to(torch.int32).contiguous()
    ordered = torch.sort(block_ids).values
    return torch.searchsorted(ordered, block_ids, out_int32=True).contiguous()


def _pad_rows(
    x: torch.Tensor,
    mode: tl.constexpr,
    w: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    eps: float = 0.0,
    *,
    launch=wrap_triton,
) -> torch.Tensor:
    """(B * H, N, BLOCK_D) zero-padded rows of x ((B, H, N, D), any strides with a unit
    innermost one): x itself (mode _COPY), or its LayerNorm with w, b, computing ``stats``
    (_NORMALISE) or reading them (_NORMALISE_FROM_STATS); see _pad_rows_kernel."""
    B, H, N, D = x.shape
    block_d = _block_d(D)
    out = torch.empty(B * H, N, block_d, dtype=x.dtype, device=x.device)
    block_m = 32 if _INTERPRETING else 64
    align = _row_align(D, x)
    launch(_pad_rows_kernel)[(_cdiv(N, block_m) * B * H,)](
        x, x if w is None else w.contiguous(), x if b is None else b.contiguous(),
        x if stats is None else stats, out, x.stride(0) // align, x.stride(1) // align,
        x.stride(2) // align, H, N, D, eps, MODE=mode.value, HAS_W=w is not None,
        HAS_B=b is not None, BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align,
    )  # fmt: skip
    return out


@triton_op("eegfast::qk_norm_attention_fwd_triton", mutates_args=())
def qk_norm_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_w: torch.Tensor | None,
    q_b: torch.Tensor | None,
    k_w: torch.Tensor | None,
    k_b: torch.Tensor | None,
    eps: float,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    block_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused LayerNorm(q), LayerNorm(k) and softmax attention, forward.

    Args:
        q, k, v: (B, H, N, D) float32 / float16 / bfloat16, any strides (the innermost is made
            unit if it is not); D in 1..128.
        q_w, q_b, k_w, k_b: (D,) LayerNorm affine parameters shared by the heads, or None.
        eps: LayerNorm epsilon. scale: score scale (usually D ** -0.5).
        key_padding_mask: (B, N) bool, True = that key is ignored; or None.
        causal: query i sees key j only if j <= i.
        block_ids: (N,) integer; query i sees key j only if
            block_ids[j] <= block_ids[i].

    Returns:
        out (B, N, H, D) contiguous in q's dtype (rows that see no key are 0), lse (B, H, N)
        fp32 (-inf for those rows), q_stats and k_stats (B, H, N, 2) fp32 = (mean, rstd).
    """
    params = {"q_w": q_w, "q_b": q_b, "k_w": k_w, "k_b": k_b}
    _check_attention_inputs(q, k, v, params, key_padding_mask, block_ids)
    with launch_device(q):
        return _forward(q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal,
                        block_ids, eager=False)  # fmt: skip


def _forward(q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal, block_ids, *,
             eager: bool, variant: LoopVariant | None = None,
             score_limit: float | None = None):  # fmt: skip
    """The forward op's work on checked arguments, inside the op or (``eager``) called
    directly by the public functions; ``variant`` None: see _loop_variant; ``score_limit``
    None: unshifted_score_limit (the tests pass others, to force either softmax loop)."""
    if variant is None:
        args = (q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal, block_ids)
        variant = _loop_variant("forward", args, _run_forward, _forward_stand_ins)
    pre_normalise = variant.pre_normalise
    launch = _direct if eager else wrap_triton
    q, k, v = _unit_inner_stride(q), _unit_inner_stride(k), _unit_inner_stride(v)
    B, H, N, D = q.shape
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    q_stats = torch.empty(B, H, N, 2, dtype=torch.float32, device=q.device)
    k_stats = torch.empty(B, H, N, 2, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return out, lse, q_stats, k_stats
    pad, ids = _mask_args(q, key_padding_mask, block_ids)
    q_w_, q_b_, k_w_, k_b_ = (q if p is None else p.contiguous() for p in (q_w, q_b, k_w, k_b))
    block_d = _block_d(D)
    align = _row_align(D, q, k, v)
    padded_plain = pre_normalise and _needs_padded_rows(align, q.dtype)
    k_n = v_p = q  # placeholders
    if pre_normalise:
        k_n = _pad_rows(k, _NORMALISE, k_w, k_b, k_stats, eps, launch=launch)
    if padded_plain:
        v_p = _pad_rows(v, _COPY, launch=launch)
    tensors = (q, k, v, q_w_, q_b_, k_w_, k_b_, pad, ids, out, lse, q_stats, k_stats, k_n, v_p)
    strides = tuple(stride // align for x in (q, k, v) for stride in x.stride()[:3])
    flags = dict(
        ALIGN=align,
        PRE_NORMALISED=pre_normalise,
        PADDED_PLAIN=padded_plain,
        HAS_Q_W=q_w is not None,
        HAS_Q_B=q_b is not None,
        HAS_K_W=k_w is not None,
        HAS_K_B=k_b is not None,
        HAS_PAD=key_padding_mask is not None,
        CAUSAL=causal,
        BLOCK_CAUSAL=block_ids is not None,
        BLOCK_D=block_d,
        PRECISION=_precision(q.dtype),
    )
    limit = unshifted_score_limit(q.dtype) if score_limit is None else score_limit
    for first, extent, tail in _launch_spans(N, variant.split_tail):
        launch(_fwd_tail_kernel if tail else _fwd_kernel)[_grid(extent, "BLOCK_M", B * H)](
            *tensors, *strides, H, N, D, _next_power_of_2(N), first, extent, eps,
            scale * _LOG2E.value, limit, **flags,
        )  # fmt: skip
    return out, lse, q_stats, k_stats


def _run_forward(args: tuple, variant: LoopVariant):
    return _forward(*args, eager=True, variant=variant)


@triton_op("eegfast::qk_norm_attention_bwd_triton", mutates_args=())
def qk_norm_attention_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_w: torch.Tensor | None,
    q_b: torch.Tensor | None,
    k_w: torch.Tensor | None,
    k_b: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_stats: torch.Tensor,
    k_stats: torch.Tensor,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    block_ids: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Backward of :func:`qk_norm_attention_fwd_triton` from its saved outputs.

    Args:
        grad_out: (B, N, H, D), gradient of ``out`` (innermost stride made unit if needed).
        q, k, v, q_w, q_b, k_w, k_b, scale, key_padding_mask, causal, block_ids: as forward.
        out, lse, q_stats, k_stats: the forward's outputs.

    Returns:
        dq, dk, dv (B, H, N, D) contiguous in q's dtype; dq_w, dq_b, dk_w, dk_b (D,) in each
        parameter's dtype, or shape (0,) where that parameter is None. The parameter gradients
        are summed from per-block partial sums (deterministic, no atomics). dk_b is exactly
        zero: the key bias adds q_n . k_b to every score of a query row, which the softmax
        ignores. Summing it would only add the rounding of the other gradients (in bf16 that
        reaches 0.1 at N = 257, where the exact value is 0).
    """
    params = {"q_w": q_w, "q_b": q_b, "k_w": k_w, "k_b": k_b}
    _check_attention_inputs(q, k, v, params, key_padding_mask, block_ids)
    B, H, N, D = q.shape
    for name, x, shape in (
        ("grad_out", grad_out, (B, N, H, D)),
        ("out", out, (B, N, H, D)),
        ("lse", lse, (B, H, N)),
        ("q_stats", q_stats, (B, H, N, 2)),
        ("k_stats", k_stats, (B, H, N, 2)),
    ):
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    with launch_device(q):
        return _backward(grad_out, q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats,
                         scale, key_padding_mask, causal, block_ids, eager=False)  # fmt: skip


def _backward(grad_out, q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats, scale,
              key_padding_mask, causal, block_ids, *, eager: bool,
              variant: LoopVariant | None = None):  # fmt: skip
    """The backward op's work on checked arguments; ``eager`` and ``variant`` as in _forward."""
    if variant is None:
        args = (grad_out, q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats, scale,
                key_padding_mask, causal, block_ids)  # fmt: skip
        variant = _loop_variant("backward", args, _run_backward, _backward_stand_ins)
    pre_normalise = variant.pre_normalise
    launch = _direct if eager else wrap_triton
    params = {"q_w": q_w, "q_b": q_b, "k_w": k_w, "k_b": k_b}
    B, H, N, D = q.shape
    q, k, v = _unit_inner_stride(q), _unit_inner_stride(k), _unit_inner_stride(v)
    grad_out = _unit_inner_stride(grad_out)
    out, lse = out.contiguous(), lse.float().contiguous()
    q_stats, k_stats = q_stats.float().contiguous(), k_stats.float().contiguous()

    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    num_slots = _cdiv(N, PART_ROWS)
    present = [name for name, p in params.items() if p is not None and name != "k_b"]
    # One buffer for the partial sums of all given parameters: one reduction kernel for all.
    parts = torch.empty(len(present), B * H, num_slots, D, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        dq.zero_(), dk.zero_(), dv.zero_(), parts.zero_()

    def param_grads() -> list[torch.Tensor]:
        sums = dict(zip(present, parts.sum(dim=(1, 2)).unbind(0), strict=True))

        def grad(name: str, p: torch.Tensor | None) -> torch.Tensor:
            if p is None:
                return q.new_empty(0)
            if name == "k_b":  # exactly zero (see above)
                return torch.zeros_like(p)
            # A custom op's outputs must not be views of one another; the eager path's may
            # (gradients of separate parameters), which saves a copy kernel per parameter.
            return sums[name].to(p.dtype, copy=not eager)

        return [grad(name, p) for name, p in params.items()]

    if B * H * N == 0:
        return (dq, dk, dv, *param_grads())

    pad, ids = _mask_args(q, key_padding_mask, block_ids)
    q_w_, q_b_, k_w_, k_b_ = (q if p is None else p.contiguous() for p in params.values())
    part_q_w, part_q_b, part_k_w = (
        parts[present.index(name)] if name in present else q for name in ("q_w", "q_b", "k_w")
    )
    block_d = _block_d(D)
    # the rows' terms, padded (see _bwd_delta_kernel)
    n_padded = _cdiv(N, _TAIL_N.value) * _TAIL_N.value
    delta = torch.empty(B, H, n_padded, dtype=torch.float32, device=q.device)
    lse2 = torch.empty(B, H, n_padded, dtype=torch.float32, device=q.device)
    align = _row_align(D, q, k, v, grad_out)
    delta_block = 32 if _INTERPRETING else 64
    launch(_bwd_delta_kernel)[(_cdiv(n_padded, delta_block) * B * H,)](
        out,
        grad_out,
        lse,
        delta,
        lse2,
        grad_out.stride(0) // align,
        grad_out.stride(1) // align,
        grad_out.stride(2) // align,
        H,
        N,
        D,
        BLOCK_M=delta_block,
        BLOCK_D=block_d,
        ALIGN=align,
    )
    flags = dict(
        HAS_Q_W=q_w is not None,
        HAS_Q_B=q_b is not None,
        HAS_K_W=k_w is not None,
        HAS_K_B=k_b is not None,
        HAS_PAD=key_padding_mask is not None,
        CAUSAL=causal,
        BLOCK_CAUSAL=block_ids is not None,
        BLOCK_D=block_d,
        PRECISION=_precision(q.dtype),
        PART=PART_ROWS,
        PRE_NORMALISED=pre_normalise,
        PADDED_PLAIN=pre_normalise and _needs_padded_rows(align, q.dtype),
        ALIGN=align,
    )
    strides = tuple(stride // align for x in (q, k, v, grad_out) for stride in x.stride()[:3])

    # The dK / dV loops read q and grad_out (q_n, g_p), the dQ kernel's k and v (k_n, v_p): with
    # ATOMIC_DQ there is no dQ kernel, and k and v need no padded copies.
    atomic_dq = variant.atomic_dq
    q_n = g_p = k_n = v_p = q  # placeholders
    if pre_normalise:
        q_n = _pad_rows(q, _NORMALISE_FROM_STATS, q_w, q_b, q_stats, launch=launch)
        if not atomic_dq:
            k_n = _pad_rows(k, _NORMALISE_FROM_STATS, k_w, k_b, k_stats, launch=launch)
    if flags["PADDED_PLAIN"]:
        # (B, N, H, D) seen as (B, H, N, D)
        g_p = _pad_rows(grad_out.transpose(1, 2), _COPY, launch=launch)
        if not atomic_dq:
            v_p = _pad_rows(v, _COPY, launch=launch)

    common = (lse2, delta, q_stats, k_stats)
    dkdv_tensors = (q, k, v, q_w_, q_b_, k_w_, k_b_, pad, ids, grad_out, *common, q_n, g_p, dk, dv,
                    part_k_w)  # fmt: skip
    dq_tensors = (q, k, v, q_w_, q_b_, k_w_, k_b_, pad, ids, grad_out, *common, k_n, v_p, dq,
                  part_q_w, part_q_b)  # fmt: skip
    scalars = (H, N, D, _next_power_of_2(N))
    spans = _launch_spans(N, variant.split_tail)
    # Without ATOMIC_DQ the kernels never touch dq_acc, but the autotuner restores it after each
    # timed run: a one-element stand-in, so nothing of size is copied.
    dq_acc = torch.zeros(
        (B * H, n_padded, block_d) if atomic_dq else (1,), dtype=torch.float32, device=q.device
    )
    for first, extent, tail in spans:
        launch(_bwd_dkdv_tail_kernel if tail else _bwd_dkdv_kernel)[
            _grid(extent, "BLOCK_N", B * H)
        ](*dkdv_tensors, dq_acc, *strides, *scalars, first, extent, num_slots, scale,
          scale * _LOG2E.value, ATOMIC_DQ=atomic_dq, **flags)  # fmt: skip
    if atomic_dq:
        finish_block = 32 if _INTERPRETING else 64
        launch(_bwd_dq_finish_kernel)[(_cdiv(N, finish_block) * B * H,)](
            q, q_w_, q_stats, dq_acc, dq, part_q_w, part_q_b, *strides[:3], H, N, D, num_slots,
            scale, HAS_Q_W=q_w is not None, HAS_Q_B=q_b is not None, BLOCK_D=block_d,
            ALIGN=align, PART=PART_ROWS, BLOCK_M=finish_block,
        )  # fmt: skip
        return (dq, dk, dv, *param_grads())
    for first, extent, tail in spans:
        launch(_bwd_dq_tail_kernel if tail else _bwd_dq_kernel)[_grid(extent, "BLOCK_M", B * H)](
            *dq_tensors, *strides, *scalars, first, extent, num_slots, scale,
            scale * _LOG2E.value, **flags,
        )  # fmt: skip
    return (dq, dk, dv, *param_grads())


def _run_backward(args: tuple, variant: LoopVariant):
    return _backward(*args, eager=True, variant=variant)


def _eager_forward(q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal, block_ids):
    """The forward op's work without the dispatcher, for the public functions in eager mode.
    Their checks have run; float64, which they pass for the C++ kernels, is the one left."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    with launch_device(q):
        return _forward(q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal,
                        block_ids, eager=True)  # fmt: skip


def _eager_backward(*args):
    """The backward op's work without the dispatcher (arguments of the op, from _forward)."""
    with launch_device(args[1]):  # q
        return _backward(*args, eager=True)


# Fake kernels (the same shapes as the C++ ops) and autograd: forward saves what the backward
# op needs, the backward calls qk_norm_attention_bwd_triton (or, in eager mode, _eager_backward).
_register_op_glue(
    "eegfast::qk_norm_attention_fwd_triton",
    "eegfast::qk_norm_attention_bwd_triton",
    strided_grad=True,
    eager=(_eager_forward, _eager_backward),
)
