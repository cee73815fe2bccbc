"""Triton kernels of the MoE expert FFN and combine (imported on first use: triton is optional).

Registered with ``torch.library.triton_op`` so ``torch.compile`` sees inside them:
``eegfast::moe_expert_ffn_triton`` (+ ``_bwd_triton``) and ``eegfast::moe_combine_triton``
(+ ``_bwd_triton``), same schemas as the C++ ops in csrc/moe/moe_cpu.cpp.

Two GEMM kernels do all the expert math, ScatterMoE-style:

- ``_grouped_rows_kernel``: ``out[j] = A[row(j)] @ B[e] (+ bias[e])`` for the rows ``j`` of
  expert ``e``'s group, where ``row(j) = sorted_slots[j] // k`` reads ``x`` through the index
  (no permuted copy) or ``row(j) = j``. A program owns up to BLOCK_M rows of one expert; the
  grid has ``cdiv(T k, BLOCK_M) + E + 1`` row programs (each group's last block may be short,
  so at most E + 1 extra), and each program finds its expert from the offsets on the device
  (no host sync). Epilogues: bias + exact GELU storing both the pre-activation and the
  activation (forward fc1), or a multiply by GELU'(pre-activation) (backward). The group past
  ``offsets[E]`` (dropped slots) is written as zeros.
- ``_grouped_weight_grad_kernel``: ``dW[e] = P[group e]^T @ Q[row(group e)]`` with the bias
  gradient (column sums of P) fused into the programs of the first column block.

Forward: fc1 (x gathered, bias, GELU) -> h; fc2 (h, bias) -> y_sorted. Backward: da1 = (dy @
w2[e]) * GELU'(a1); dx_sorted = da1 @ w1[e]; dx = per-token sum of its k rows (the combine
kernel with unit gates, deterministic: no atomics); dW2/db2 from (dy, h); dW1/db1 from (da1, x).
All accumulation is fp32; fp32 inputs use exact fp32 dot products ("ieee").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from eegfast.ops._backend import launch_device, triton_interpreting, vector_align, wrap_triton
from eegfast.ops.moe import _check_combine_inputs, _check_ffn_inputs, _register_op_glue

_ACT_NONE, _ACT_GELU, _ACT_GELU_GRAD = 0, 1, 2


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _group_of_program(offsets_ptr, pid, S, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert e in [0, E], first row, end row) of row program ``pid``; e > E: no work.

    Groups 0..E-1 are the experts, group E the rows past offsets[E] (dropped slots)."""
    groups = tl.arange(0, BLOCK_E)
    lo = tl.load(offsets_ptr + groups, mask=groups <= E, other=0)
    hi = tl.load(offsets_ptr + groups + 1, mask=groups < E, other=0)
    hi = tl.where(groups == E, S, hi)
    rows = tl.where(groups <= E, hi - lo, 0)
    blocks = (rows + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    e = tl.sum((ends <= pid).to(tl.int32), 0)
    first_block = tl.sum(tl.where(groups == e, ends - blocks, 0), 0)
    group_lo = tl.sum(tl.where(groups == e, lo, 0), 0)
    group_hi = tl.sum(tl.where(groups == e, hi, 0), 0)
    return e, group_lo + (pid - first_block) * BLOCK_M, group_hi


@triton.jit
def _grouped_rows_kernel(
    a_ptr,  # (rows of A, K) input dtype, row stride stride_a, unit inner stride
    index_ptr,  # (S,) int64 sorted_slots (GATHER) — row(j) = index[j] // ROW_DIV
    b_ptr,  # (E, K, N) by strides: B[e, kk, n] at e*stride_be + kk*stride_bk + n*stride_bn
    bias_ptr,  # (E, N) contiguous (HAS_BIAS)
    aux_ptr,  # (S, N) contiguous: pre-activation out (ACT_GELU) or in (ACT_GELU_GRAD)
    out_ptr,  # (S, N) contiguous
    offsets_ptr,  # (E + 1,) int64
    S,
    E,
    N,
    K,
    stride_a,
    stride_be,
    stride_bk,
    stride_bn,
    ROW_DIV,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ALIGN: tl.constexpr,  # N, K and the strides arrive divided by it (see vector_align)
    B_UNIT: tl.constexpr,  # which stride of B is 1 (and unused): 0 stride_bk, 1 stride_bn, 2 none
):
    N, K = N * ALIGN, K * ALIGN
    stride_a, stride_be = stride_a * ALIGN, stride_be * ALIGN
    e, row_start, row_end = _group_of_program(offsets_ptr, tl.program_id(0), S, E, BLOCK_M, BLOCK_E)
    if e > E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    out_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if e == E:  # dropped slots: zeros
        zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        tl.store(out_ptr + out_offsets, zeros.to(out_ptr.dtype.element_ty), mask=out_mask)
        if ACT == 1:
            tl.store(aux_ptr + out_offsets, zeros.to(aux_ptr.dtype.element_ty), mask=out_mask)
        return
    if GATHER:
        src = tl.load(index_ptr + rows, mask=row_ok, other=0) // ROW_DIV
    else:
        src = rows.to(tl.int64)
    a_rows = a_ptr + src[:, None] * stride_a
    # B's unit stride stays out of the address arithmetic, so that the compiler sees which way
    # its tiles run: along n (B[e] contiguous) or along k (a transposed weight)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    if B_UNIT == 1:
        b_cols = b_base + cols[None, :]
    else:
        b_cols = b_base + cols[None, :] * (stride_bn * ALIGN)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if B_UNIT == 0:
            b_tile = b_cols + ks[:, None]
        else:
            b_tile = b_cols + ks[:, None] * (stride_bk * ALIGN)
        b = tl.load(b_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ACT == 1:
        tl.store(aux_ptr + out_offsets, acc.to(aux_ptr.dtype.element_ty), mask=out_mask)
        acc = _gelu(acc)
    if ACT == 2:
        pre = tl.load(aux_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(pre)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_weight_grad_kernel(
    p_ptr,  # (S, M) contiguous, sorted order
    q_ptr,  # (rows of Q, N) row stride stride_q, unit inner stride
    index_ptr,  # (S,) int64 sorted_slots (GATHER): Q row = index[j] // ROW_DIV
    offsets_ptr,  # (E + 1,) int64
    dw_ptr,  # (E, M, N) contiguous out
    db_ptr,  # (E, M) contiguous out (HAS_BIAS_GRAD)
    M,
    N,
    stride_q,
    ROW_DIV,
    GATHER: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ALIGN: tl.constexpr,  # M, N and stride_q arrive divided by it (see vector_align)
):
    M, N, stride_q = M * ALIGN, N * ALIGN, stride_q * ALIGN
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    bias_acc = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < hi
        p = tl.load(
            p_ptr + js[None, :] * M + ms[:, None], mask=m_ok[:, None] & j_ok[None, :], other=0.0
        )
        if GATHER:
            src = tl.load(index_ptr + js, mask=j_ok, other=0) // ROW_DIV
        else:
            src = js
        q = tl.load(
            q_ptr + src[:, None] * stride_q + ns[None, :],
            mask=j_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(p.to(tl.float32), axis=1)
    e64 = e.to(tl.int64)
    tl.store(
        dw_ptr + e64 * M * N + ms[:, None] * N + ns[None, :],
        acc.to(dw_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )
    if HAS_BIAS_GRAD:
        if pid_n == 0:
            tl.store(db_ptr + e64 * M + ms, bias_acc.to(db_ptr.dtype.element_ty), mask=m_ok)


@triton.jit
def _gather_sum_kernel(
    src_ptr,  # (S, D) contiguous
    gate_ptr,  # (T, k) contiguous (HAS_GATES)
    pos_ptr,  # (T k,) int64 slot_pos
    out_ptr,  # (T, D) contiguous
    T,
    D,
    TOP_K,
    HAS_GATES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # D arrives divided by it (see vector_align)
):
    D = D * ALIGN
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = tokens < T
    mask = t_ok[:, None] & (dims[None, :] < D)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for i in range(0, TOP_K):
        slot = tokens.to(tl.int64) * TOP_K + i
        row = tl.load(pos_ptr + slot, mask=t_ok, other=-1)  # -1: no row (expert out of range)
        y = tl.load(src_ptr + row[:, None] * D + dims[None, :], mask=mask & (row >= 0)[:, None],
                    other=0.0)  # fmt: skip
        if HAS_GATES:
            g = tl.load(gate_ptr + slot, mask=t_ok, other=0.0).to(tl.float32)
            acc += g[:, None] * y.to(tl.float32)
        else:
            acc += y.to(tl.float32)
    tl.store(
        out_ptr + tokens[:, None].to(tl.int64) * D + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _combine_bwd_kernel(
    grad_out_ptr,  # (T, D) contiguous
    y_ptr,  # (S, D) contiguous
    gate_ptr,  # (T, k) contiguous
    pos_ptr,  # (T k,) int64
    grad_y_ptr,  # (S, D) contiguous out
    grad_gate_ptr,  # (T, k) contiguous out
    T,
    D,
    TOP_K,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # D arrives divided by it (see vector_align)
):
    D = D * ALIGN
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < T
    for i in range(0, TOP_K):
        slot = tokens.to(tl.int64) * TOP_K + i
        row = tl.load(pos_ptr + slot, mask=t_ok, other=-1)  # -1: no row, nothing to write
        g = tl.load(gate_ptr + slot, mask=t_ok, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = (t_ok & (row >= 0))[:, None] & (dims[None, :] < D)
            go = tl.load(
                grad_out_ptr + tokens[:, None].to(tl.int64) * D + dims[None, :],
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * D + dims[None, :], mask=mask, other=0.0)
            dot += tl.sum(go * y.to(tl.float32), axis=1)
            tl.store(
                grad_y_ptr + row[:, None] * D + dims[None, :],
                (g[:, None] * go).to(grad_y_ptr.dtype.element_ty),
                mask=mask,
            )
        tl.store(grad_gate_ptr + slot, dot.to(grad_gate_ptr.dtype.element_ty), mask=t_ok)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products, as torch's default fp32 matmul; fp16/bf16 products are
    # exact in fp32 anyway.
    return "ieee"


def _gemm_blocks(n: int, k: int) -> dict[str, int]:
    if triton_interpreting():  # fewer, larger programs: the interpreter pays per program
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    return {
        "BLOCK_M": 128,
        "BLOCK_N": 128 if n >= 128 else 64,
        "BLOCK_K": 64 if k >= 64 else 32,
        "num_warps": 8,
        "num_stages": 3,
    }


def _rows_gemm(a, index, row_div, b_view, bias, out, aux, offsets, act, *, gather: bool) -> None:
    """out = (gather(A) @ B[e] + bias[e]) with the epilogue ``act``, over all row groups.

    ``b_view`` is a (E, K, N) view (any strides) of the stacked weights."""
    S, N = out.shape
    E, K, _ = b_view.shape
    blocks = _gemm_blocks(N, K)
    stride_be, stride_bk, stride_bn = b_view.stride()
    # which of B's strides is 1 (that one is not scaled), and the factor all others share
    b_unit = 0 if stride_bk == 1 else 1 if stride_bn == 1 else 2
    scaled_b = {0: (stride_bn,), 1: (stride_bk,), 2: (stride_bk, stride_bn)}[b_unit]
    align = vector_align(N, K, a.stride(0), stride_be, *scaled_b)
    grid = (triton.cdiv(S, blocks["BLOCK_M"]) + E + 1, triton.cdiv(N, blocks["BLOCK_N"]))
    with launch_device(out):
        wrap_triton(_grouped_rows_kernel)[grid](
            a,
            index,
            b_view,
            bias if bias is not None else out,
            aux if aux is not None else out,
            out,
            offsets,
            S,
            E,
            N // align,
            K // align,
            a.stride(0) // align,
            stride_be // align,
            stride_bk // align if b_unit != 0 else 1,
            stride_bn // align if b_unit != 1 else 1,
            row_div,
            GATHER=gather,
            HAS_BIAS=bias is not None,
            ACT=act,
            PRECISION=_precision(a.dtype),
            BLOCK_E=triton.next_power_of_2(E + 1),
            ALIGN=align,
            B_UNIT=b_unit,
            **blocks,
        )


def _weight_grad(p, q, index, row_div, offsets, dw, db, *, gather: bool) -> None:
    E, M, N = dw.shape
    if triton_interpreting():
        blocks = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_J": 32}
    else:
        blocks = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_J": 64, "num_warps": 8, "num_stages": 3}
    # At least one column block: its programs also write db, which is due even when N = 0
    # (x with no features: db1; no hidden units: db2), and was left uninitialised
    grid = (E, triton.cdiv(M, blocks["BLOCK_M"]), max(1, triton.cdiv(N, blocks["BLOCK_N"])))
    align = vector_align(M, N, q.stride(0))
    with launch_device(dw):
        wrap_triton(_grouped_weight_grad_kernel)[grid](
            p,
            q,
            index,
            offsets,
            dw,
            db,
            M // align,
            N // align,
            q.stride(0) // align,
            row_div,
            GATHER=gather,
            HAS_BIAS_GRAD=True,
            PRECISION=_precision(p.dtype),
            ALIGN=align,
            **blocks,
        )


def _gather_sum(src, gates, slot_pos, T, top_k, out) -> None:
    D = src.shape[1]
    if T == 0 or D == 0:
        return
    block_d = min(128, triton.next_power_of_2(D))
    block_t = 32
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    align = vector_align(D)
    with launch_device(out):
        wrap_triton(_gather_sum_kernel)[grid](
            src,
            gates if gates is not None else src,
            slot_pos,
            out,
            T,
            D // align,
            top_k,
            HAS_GATES=gates is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            ALIGN=align,
        )


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def _check_not_float64(x: torch.Tensor) -> None:
    # tl.dot of float64 tiles does not compile for a GPU (its fp32 accumulator is re-assigned
    # an fp64 result), and the combine accumulates in fp32.
    if x.dtype == torch.float64:
        raise TypeError(
            "the Triton MoE kernels take float32, float16 or bfloat16 inputs, got float64; "
            "use backend='reference' (or 'cpu' on CPU tensors)"
        )


@triton_op("eegfast::moe_expert_ffn_triton", mutates_args=())
def moe_expert_ffn_triton(
    x: torch.Tensor,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``moe_expert_ffn``: -> y_sorted (S, D_out), a1 (S, H), h (S, H)."""
    _check_ffn_inputs(x, sorted_slots, offsets, w1, b1, w2, b2, top_k)
    _check_not_float64(x)
    x = _inner_contiguous(x)
    sorted_slots, offsets = sorted_slots.contiguous(), offsets.contiguous()
    b1, b2 = b1.contiguous(), b2.contiguous()
    S, H, D_out = sorted_slots.shape[0], w1.shape[1], w2.shape[1]
    a1 = x.new_empty(S, H)
    h = x.new_empty(S, H)
    y = x.new_empty(S, D_out)
    if S > 0:
        # fc1: B[e, d, n] = w1[e, n, d]; fc2: B[e, n, o] = w2[e, o, n]
        _rows_gemm(
            x, sorted_slots, top_k, w1.transpose(1, 2), b1, h, a1, offsets, _ACT_GELU, gather=True
        )
        _rows_gemm(
            h, sorted_slots, 1, w2.transpose(1, 2), b2, y, None, offsets, _ACT_NONE, gather=False
        )
    return y, a1, h


@triton_op("eegfast::moe_expert_ffn_bwd_triton", mutates_args=())
def moe_expert_ffn_bwd_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    slot_pos: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    a1: torch.Tensor,
    h: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``moe_expert_ffn_bwd``: -> dx (T, D), dw1, db1, dw2, db2."""
    x = _inner_contiguous(x)
    dy = grad_y.to(x.dtype).contiguous()
    a1, h = a1.contiguous(), h.contiguous()
    sorted_slots, offsets, slot_pos = (
        sorted_slots.contiguous(),
        offsets.contiguous(),
        slot_pos.contiguous(),
    )
    T, D = x.shape
    S, H, D_out, E = sorted_slots.shape[0], w1.shape[1], w2.shape[1], w1.shape[0]
    dx = x.new_empty(T, D)
    dw1 = w1.new_empty(E, H, D)
    db1 = w1.new_empty(E, H)
    dw2 = w2.new_empty(E, D_out, H)
    db2 = w2.new_empty(E, D_out)
    if S == 0:
        dx.zero_(), dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
        return dx, dw1, db1, dw2, db2
    da1 = x.new_empty(S, H)
    dx_sorted = x.new_empty(S, D)
    # da1 = (dy @ w2[e]) * gelu'(a1): B[e, o, n] = w2[e, o, n]
    _rows_gemm(dy, sorted_slots, 1, w2, None, da1, a1, offsets, _ACT_GELU_GRAD, gather=False)
    # dx_sorted = da1 @ w1[e]: B[e, n, d] = w1[e, n, d]
    _rows_gemm(da1, sorted_slots, 1, w1, None, dx_sorted, None, offsets, _ACT_NONE, gather=False)
    _gather_sum(dx_sorted, None, slot_pos, T, top_k, dx)
    _weight_grad(dy, h, sorted_slots, 1, offsets, dw2, db2, gather=False)
    _weight_grad(da1, x, sorted_slots, top_k, offsets, dw1, db1, gather=True)
    return dx, dw1, db1, dw2, db2


@triton_op("eegfast::moe_combine_triton", mutates_args=())
def moe_combine_triton(
    y_sorted: torch.Tensor, gates: torch.Tensor, slot_pos: torch.Tensor
) -> torch.Tensor:
    """Triton ``moe_combine``: (T, D) = per-token gate-weighted sum of its k rows."""
    _check_combine_inputs(y_sorted, gates, slot_pos)
    _check_not_float64(y_sorted)
    T, k = gates.shape
    out = y_sorted.new_empty(T, y_sorted.shape[1])
    _gather_sum(y_sorted.contiguous(), gates.contiguous(), slot_pos.contiguous(), T, k, out)
    return out


@triton_op("eegfast::moe_combine_bwd_triton", mutates_args=())
def moe_combine_bwd_triton(
    grad_out: torch.Tensor, y_sorted: torch.Tensor, gates: torch.Tensor, slot_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``moe_combine_bwd``: grad_y (S, D), grad_gates (T, k)."""
    T, k = gates.shape
    D = y_sorted.shape[1]
    y_sorted = y_sorted.contiguous()
    # zeros: rows no slot points to (a slot_pos of -1 leaves one) get no store from the kernel
    grad_y = torch.zeros_like(y_sorted)
    grad_gates = torch.empty_like(gates, memory_format=torch.contiguous_format)
    if T > 0 and D > 0:
        block_t = 32
        align = vector_align(D)
        with launch_device(grad_y):
            wrap_triton(_combine_bwd_kernel)[(triton.cdiv(T, block_t),)](
                grad_out.to(y_sorted.dtype).contiguous(),
                y_sorted,
                gates.contiguous(),
                slot_pos.contiguous(),
                grad_y,
                grad_gates,
                T,
                D // align,
                k,
                BLOCK_T=block_t,
                BLOCK_D=min(128, triton.next_power_of_2(D)),
                ALIGN=align,
            )
    elif T > 0:
        grad_gates.zero_()
    return grad_y, grad_gates


torch.library.register_fake("eegfast::moe_expert_ffn_bwd_triton")(
    lambda grad_y, x, sorted_slots, offsets, slot_pos, w1, w2, a1, h, top_k: (
        torch.empty_like(x, memory_format=torch.contiguous_format),  # dx is row-major
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        w1.new_empty(w1.shape[0], w1.shape[1]),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
        w2.new_empty(w2.shape[0], w2.shape[1]),
    )
)
torch.library.register_fake("eegfast::moe_combine_bwd_triton")(
    lambda grad_out, y_sorted, gates, slot_pos: (
        torch.empty_like(y_sorted, memory_format=torch.contiguous_format),
        torch.empty_like(gates, memory_format=torch.contiguous_format),
    )
)
_register_op_glue(
    "eegfast::moe_expert_ffn_triton",
    moe_expert_ffn_bwd_triton,
    "eegfast::moe_combine_triton",
    moe_combine_bwd_triton,
)
