"""Top-k Mixture-of-Experts: dispatch, grouped expert FFN and combine.

A *token slot* ``s = t * k + i`` is the ``i``-th expert choice of token ``t`` (``expert_idx``
(T, k) flattened). The three ops follow the data flow:

- :func:`moe_dispatch` — from ``expert_idx`` (T, k): per-expert ``counts`` (E,), ``offsets``
  (E + 1,) (exclusive prefix sum, ``offsets[E] = T k``), ``sorted_slots`` (T k,) (the slots in
  expert order, stable: equal experts keep slot order) and its inverse ``slot_pos`` (T k,).
- :func:`moe_expert_ffn` — every expert's ``fc2(gelu(fc1(x)))`` on its group of rows of the
  sorted order, reading ``x[sorted_slots // k]`` through the index (the Triton kernel never
  materialises the permuted copy). Returns ``y_sorted`` (T k, D_out) in sorted order.
- :func:`moe_combine` — ``out[t] = sum_i gates[t, i] * y_sorted[slot_pos[t k + i]]`` (T, D).

:func:`moe_ffn` chains the three. Expert weights are stacked like ``nn.Linear`` weights:
``w1`` (E, H, D), ``b1`` (E, H), ``w2`` (E, D_out, H), ``b2`` (E, D_out).

Backends: plain-PyTorch references here (``*_reference``, differentiable), C++ CPU kernels
(csrc/moe/moe_cpu.cpp), a fused CUDA dispatch kernel (csrc/moe/moe_cuda.cu) and Triton
kernels for the expert FFN and combine (:mod:`eegfast.ops.moe_triton`). The custom ops are
``torch.ops.eegfast.moe_dispatch``, ``moe_expert_ffn`` (+ ``_bwd``), ``moe_combine`` (+ ``_bwd``)
and the ``*_triton`` versions, with fake and autograd registrations for ``torch.compile``.

Dropped slots (capacity factor, see :class:`eegfast.nn.MoEFFN`) are expressed by an extra
bucket: rows of the sorted order at and past ``offsets[E]`` belong to no expert, and the expert
FFN writes zeros there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from eegfast.ops._backend import (
    _cuda_extension_ready,
    assume_constant_result,
    extension,
    needs_reference_autodiff,
    raising_when_differentiated,
    resolve_backend,
)

MAX_EXPERTS = 64
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DISPATCH_GPU_PREFERENCE = ("cuda",)  # one fused CUDA kernel; the reference otherwise
FFN_GPU_PREFERENCE = ("triton",)


class MoEDispatch(NamedTuple):
    """Result of :func:`moe_dispatch`, all int64: ``counts`` (E,) slots per expert;
    ``offsets`` (E + 1,) where each expert's group starts in sorted order (``offsets[E]``:
    T·k); ``sorted_slots`` (T·k,) slot ids (``token · k + i``) in expert order, stable;
    ``slot_pos`` (T·k,) each slot's position in that order (the inverse permutation)."""

    counts: torch.Tensor  # (E,) slots per expert
    offsets: torch.Tensor  # (E + 1,) start of each expert's group in sorted order; [E] = total
    sorted_slots: torch.Tensor  # (T k,) slot ids in expert order (stable)
    slot_pos: torch.Tensor  # (T k,) position of each slot in sorted order (inverse permutation)


# --------------------------------------------------------------------------------------------
# References (plain PyTorch, differentiable): the definition of correctness.
# --------------------------------------------------------------------------------------------


def moe_dispatch_reference(expert_idx: torch.Tensor, num_experts: int) -> MoEDispatch:
    """Stable argsort + bincount + cumsum version of :func:`moe_dispatch` (values unchecked:
    :func:`moe_dispatch` checks them for this backend)."""
    flat = expert_idx.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    sorted_slots = torch.argsort(flat, stable=True)
    slot_pos = torch.empty_like(sorted_slots)
    slot_pos[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    return MoEDispatch(counts, offsets, sorted_slots, slot_pos)


def moe_expert_ffn_reference(
    x: torch.Tensor,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Loop over experts with ``F.linear``: ``y_sorted`` (T k, D_out); zero past ``offsets[E]``."""
    _check_ffn_inputs(x, sorted_slots, offsets, w1, b1, w2, b2, top_k)
    # one host copy, then an int per element: Tensor.tolist() inside a torch.func transform
    # (the reference is what torch.func.grad runs) raised "Cannot access data pointer of Tensor
    # that doesn't have storage" on torch 2.6 and 2.8, where .item() works (2.13's tolist does)
    bounds = [int(b) for b in offsets.cpu()]
    pieces = []
    for e in range(w1.shape[0]):
        rows = x[sorted_slots[bounds[e] : bounds[e + 1]] // top_k]
        pieces.append(F.linear(F.gelu(F.linear(rows, w1[e], b1[e])), w2[e], b2[e]))
    dropped = sorted_slots.shape[0] - bounds[-1]
    pieces.append(x.new_zeros(dropped, w2.shape[1]))
    return torch.cat(pieces)


def moe_combine_reference(
    y_sorted: torch.Tensor, gates: torch.Tensor, slot_pos: torch.Tensor
) -> torch.Tensor:
    """``out[t] = sum_i gates[t, i] y_sorted[slot_pos[t k + i]]`` (T, D), in y's dtype; a slot
    with ``slot_pos`` -1 adds nothing."""
    _check_combine_inputs(y_sorted, gates, slot_pos)
    T, k = gates.shape
    acc = torch.promote_types(y_sorted.dtype, torch.float32)
    picked = torch.where((slot_pos >= 0)[:, None], y_sorted[slot_pos.clamp_min(0)], 0)
    picked = picked.reshape(T, k, y_sorted.shape[1]).to(acc)
    return (picked * gates.to(acc)[:, :, None]).sum(1).to(y_sorted.dtype)


def moe_ffn_per_token_reference(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """The reference nobody can get wrong: for every token, for each of its k experts, the
    gate times that expert's MLP of the token. Slow (T k tiny matmuls): tests only."""
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(w2.shape[1])
        for i in range(expert_idx.shape[1]):
            e = int(expert_idx[t, i])
            hidden = F.gelu(w1[e] @ x[t] + b1[e])
            acc = acc + gates[t, i].to(x.dtype) * (w2[e] @ hidden + b2[e])
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, w2.shape[1])


def moe_ffn_expert_loop(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """The usual plain-PyTorch MoE: loop over experts, boolean-mask the tokens, index_add back.
    A baseline for the benchmarks (host syncs on every expert)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=acc, device=x.device)
    for e in range(w1.shape[0]):
        token, choice = torch.where(expert_idx == e)
        if token.numel() == 0:
            continue
        y = F.linear(F.gelu(F.linear(x[token], w1[e], b1[e])), w2[e], b2[e])
        out = out.index_add(0, token, y.to(acc) * gates[token, choice].to(acc)[:, None])
    return out.to(x.dtype)


def moe_ffn_torch_sorted(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """The best plain-PyTorch MoE we can write: stable argsort + one gather, then
    ``torch._grouped_mm`` over the expert groups where it exists (CUDA, bf16), else a loop of
    ``F.linear`` over group slices; gate-weighted ``index_add`` back. A benchmark baseline."""
    T, k = expert_idx.shape
    E = w1.shape[0]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    xs = x[token]
    counts = torch.bincount(flat, minlength=E)
    ends = counts.cumsum(0)
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is not None and x.is_cuda and x.dtype == torch.bfloat16:
        group_ends = ends.to(torch.int32)
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts)
        hidden = grouped_mm(xs, w1.transpose(1, 2), offs=group_ends) + b1[expert_of_row]
        ys = grouped_mm(F.gelu(hidden), w2.transpose(1, 2), offs=group_ends) + b2[expert_of_row]
    else:
        bounds = [0, *ends.tolist()]
        ys = torch.cat(
            [
                F.linear(
                    F.gelu(F.linear(xs[bounds[e] : bounds[e + 1]], w1[e], b1[e])), w2[e], b2[e]
                )
                for e in range(E)
            ]
        )
    acc = torch.promote_types(x.dtype, torch.float32)
    weighted = ys.to(acc) * gates.reshape(-1)[order].to(acc)[:, None]
    out = torch.zeros(T, w2.shape[1], dtype=acc, device=x.device)
    return out.index_add(0, token, weighted).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks shared by all backends (the C++ kernels repeat them for direct callers).
# --------------------------------------------------------------------------------------------


def _check_dispatch_inputs(expert_idx: torch.Tensor, num_experts: int, check_values: bool):
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must have shape (T, k), got {tuple(expert_idx.shape)}")
    if expert_idx.dtype != torch.int64:
        raise TypeError(f"expert_idx must be int64, got {expert_idx.dtype}")
    if not 1 <= num_experts <= MAX_EXPERTS + 1:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS + 1}], got {num_experts}")
    if expert_idx.shape[1] < 1:
        raise ValueError("expert_idx must have at least one column (top_k >= 1)")
    if check_values and expert_idx.numel() > 0:
        low, high = int(expert_idx.min()), int(expert_idx.max())
        if low < 0 or high >= num_experts:
            raise ValueError(
                f"expert_idx holds values in [{low}, {high}], outside [0, {num_experts})"
            )


def _check_ffn_inputs(x, sorted_slots, offsets, w1, b1, w2, b2, top_k) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, D), got {tuple(x.shape)}")
    if w1.dim() != 3 or w1.shape[2] != x.shape[1]:
        raise ValueError(f"w1 must have shape (E, H, D={x.shape[1]}), got {tuple(w1.shape)}")
    E, H, _ = w1.shape
    if w2.dim() != 3 or w2.shape[0] != E or w2.shape[2] != H:
        raise ValueError(f"w2 must have shape (E={E}, D_out, H={H}), got {tuple(w2.shape)}")
    if b1.shape != (E, H):
        raise ValueError(f"b1 must have shape ({E}, {H}), got {tuple(b1.shape)}")
    if b2.shape != (E, w2.shape[1]):
        raise ValueError(f"b2 must have shape ({E}, {w2.shape[1]}), got {tuple(b2.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if sorted_slots.shape != (x.shape[0] * top_k,):
        raise ValueError(
            f"sorted_slots must have shape (T * top_k,) = ({x.shape[0] * top_k},), "
            f"got {tuple(sorted_slots.shape)}"
        )
    if offsets.shape != (E + 1,):
        raise ValueError(f"offsets must have shape (E + 1,) = ({E + 1},), got {offsets.shape}")
    if sorted_slots.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise TypeError("sorted_slots and offsets must be int64")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float64/32/16 or bfloat16, got {x.dtype}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but {name} is {t.dtype}; pass all in one dtype")
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    # the kernels read the index tensors through raw pointers of x's device: from another
    # device they read foreign memory (garbage rows, or a crash), unchecked by the C++ op
    for name, t in (("sorted_slots", sorted_slots), ("offsets", offsets)):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")


def _check_combine_inputs(y_sorted, gates, slot_pos) -> None:
    if gates.dim() != 2:
        raise ValueError(f"gates must have shape (T, k), got {tuple(gates.shape)}")
    if y_sorted.dim() != 2 or y_sorted.shape[0] != gates.numel():
        raise ValueError(
            f"y_sorted must have shape (T * k, D) = ({gates.numel()}, D), "
            f"got {tuple(y_sorted.shape)}"
        )
    if slot_pos.shape != (gates.numel(),) or slot_pos.dtype != torch.int64:
        raise ValueError(f"slot_pos must be int64 of shape ({gates.numel()},)")
    if not (y_sorted.is_floating_point() and gates.is_floating_point()):
        raise TypeError("y_sorted and gates must be floating point")
    # as in _check_ffn_inputs: the C++ kernel read gates or slot_pos of another device as
    # host memory and returned garbage
    for name, t in (("gates", gates), ("slot_pos", slot_pos)):
        if t.device != y_sorted.device:
            raise ValueError(f"y_sorted is on {y_sorted.device} but {name} is on {t.device}")


# --------------------------------------------------------------------------------------------
# Custom-op glue: fake kernels and autograd (shared by the C++ and Triton ops).
# --------------------------------------------------------------------------------------------


def _dispatch_fake(expert_idx: torch.Tensor, num_experts: int):
    S = expert_idx.numel()
    return (
        expert_idx.new_empty(num_experts),
        expert_idx.new_empty(num_experts + 1),
        expert_idx.new_empty(S),
        expert_idx.new_empty(S),
    )


def _ffn_fake(x, sorted_slots, offsets, w1, b1, w2, b2, top_k):
    S, H = sorted_slots.shape[0], w1.shape[1]
    return x.new_empty(S, w2.shape[1]), x.new_empty(S, H), x.new_empty(S, H)


def _ffn_bwd_fake(grad_y, x, sorted_slots, offsets, slot_pos, w1, w2, a1, h, top_k):
    E, H = w1.shape[:2]
    # the kernels return dx row-major whatever x's layout (empty_like would keep a
    # column-major x's strides, and a compiled graph's stride check then fails)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        w1.new_empty(E, H),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
        w2.new_empty(E, w2.shape[1]),
    )


def _combine_fake(y_sorted, gates, slot_pos):
    return y_sorted.new_empty(gates.shape[0], y_sorted.shape[1])


def _combine_bwd_fake(grad_out, y_sorted, gates, slot_pos):
    return torch.empty_like(y_sorted, memory_format=torch.contiguous_format), torch.empty_like(
        gates, memory_format=torch.contiguous_format
    )


def _ffn_setup_context(ctx, inputs, output) -> None:
    x, sorted_slots, offsets, w1, b1, w2, b2, top_k = inputs
    _, a1, h = output
    ctx.mark_non_differentiable(a1, h)
    ctx.top_k = top_k
    ctx.save_for_backward(x, sorted_slots, offsets, w1, w2, a1, h)


def _combine_setup_context(ctx, inputs, output) -> None:
    y_sorted, gates, slot_pos = inputs
    ctx.save_for_backward(y_sorted, gates, slot_pos)


def _double_backward_message(op: str) -> str:
    return (
        f"{op} does not support double backward on its kernel backends (its backward is not "
        "differentiable, so a second-order term, create_graph=True, would be lost); pass "
        "backend='reference', which supports it"
    )


def _register_op_glue(ffn_op: str, ffn_bwd, combine_op: str, combine_bwd) -> None:
    """Fake kernels and autograd for one backend's ffn / combine ops; ``ffn_bwd`` and
    ``combine_bwd`` are the callables of that backend's backward ops.

    The backward kernels are not differentiable: with create_graph=True (a gradient penalty,
    a Hessian) their gradients raise when differentiated, naming the way out, instead of an
    error from inside the kernel's matmuls or a silently missing second-order term."""
    ffn_message = _double_backward_message(ffn_op)
    combine_message = _double_backward_message(combine_op)

    def ffn_backward(ctx, grad_y, grad_a1, grad_h):
        x, sorted_slots, offsets, w1, w2, a1, h = ctx.saved_tensors
        if grad_y is None:
            return (None,) * 8
        with torch.no_grad():
            # -1 (no row, skipped by the kernels' gather) for a slot that sorted_slots does not
            # list: from empty_like it held whatever the memory did, read as a row index
            slot_pos = torch.full_like(sorted_slots, -1)
            slot_pos[sorted_slots] = torch.arange(sorted_slots.shape[0], device=sorted_slots.device)
            grads = ffn_bwd(
                grad_y.contiguous(), x, sorted_slots, offsets, slot_pos, w1, w2, a1, h, ctx.top_k
            )
        if torch.is_grad_enabled():  # create_graph=True
            anchors = (grad_y, x, w1, w2, *ctx.saved_tensors)
            grads = raising_when_differentiated(tuple(grads), ffn_message, anchors)
        dx, dw1, db1, dw2, db2 = grads
        return dx, None, None, dw1, db1, dw2, db2, None

    def combine_backward(ctx, grad_out):
        y_sorted, gates, slot_pos = ctx.saved_tensors
        with torch.no_grad():
            grads = combine_bwd(grad_out.contiguous(), y_sorted, gates, slot_pos)
        if torch.is_grad_enabled():
            anchors = (grad_out, y_sorted, gates)
            grads = raising_when_differentiated(tuple(grads), combine_message, anchors)
        grad_y, grad_gates = grads
        return grad_y, grad_gates, None

    torch.library.register_fake(ffn_op)(_ffn_fake)
    torch.library.register_fake(combine_op)(_combine_fake)
    torch.library.register_autograd(ffn_op, ffn_backward, setup_context=_ffn_setup_context)
    torch.library.register_autograd(
        combine_op, combine_backward, setup_context=_combine_setup_context
    )


if extension() is not None:
    torch.library.register_fake("eegfast::moe_dispatch")(_dispatch_fake)
    torch.library.register_fake("eegfast::moe_expert_ffn_bwd")(_ffn_bwd_fake)
    torch.library.register_fake("eegfast::moe_combine_bwd")(_combine_bwd_fake)
    _register_op_glue(
        "eegfast::moe_expert_ffn",
        torch.ops.eegfast.moe_expert_ffn_bwd,
        "eegfast::moe_combine",
        torch.ops.eegfast.moe_combine_bwd,
    )


def _repeats_a_row(positions: torch.Tensor, rows: int) -> bool:
    """Whether two entries >= 0 of ``positions`` (int64, a CPU tensor: this syncs) name the
    same row. The C++ backward kernels assume they do not (``slot_pos`` and ``sorted_slots``
    from :func:`moe_dispatch` are permutations): they store one gradient row per slot rather
    than adding, so a repeated row would keep only one slot's gradient."""
    kept = positions[positions >= 0]
    return kept.numel() > 0 and int(torch.bincount(kept, minlength=rows).max()) > 1


def _triton_ops():
    """The Triton ops module, imported on first use (triton is optional)."""
    from eegfast.ops import moe_triton

    return moe_triton


# --------------------------------------------------------------------------------------------
# Public ops.
# --------------------------------------------------------------------------------------------


# Evaluated once while torch.compile traces a call, as resolve_backend: the readiness check
# (the extension's import, its build info, the kernel-image probe) cannot be traced, and an
# MoE layer with backend="triton" failed to compile with fullgraph=True (a graph break else).
@assume_constant_result
def _dispatch_request(backend: str | None, device: torch.device) -> str | None:
    """The backend asked of the dispatch op: Triton has none, so ``"triton"`` on a GPU asks for
    the CUDA kernel where it can run there and the reference where it cannot (not built with
    CUDA, or for another architecture: asking for "cuda" raised instead)."""
    if backend != "triton" or device.type != "cuda":
        return backend
    return "cuda" if _cuda_extension_ready(device) else "reference"


def moe_dispatch(
    expert_idx: torch.Tensor, num_experts: int, *, backend: str | None = None
) -> MoEDispatch:
    """Group the token slots by expert: counts, offsets, sorted order and its inverse.

    Args:
        expert_idx: (T, k) int64 expert choices, values in [0, num_experts); T may be 0.
        num_experts: E, 1..65 (64 experts plus one "dropped" bucket).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or None (automatic). Triton has no
            dispatch kernel: ``"triton"`` runs the CUDA kernel (or the reference without it).
    Returns:
        :class:`MoEDispatch` (counts (E,), offsets (E + 1,), sorted_slots (T k,), slot_pos
        (T k,)), all int64. Exact: the same as the stable-argsort reference.

    The C++ kernel raises on values outside [0, E); the CUDA kernel cannot check without a host
    sync and gives those slots ``slot_pos = -1`` instead.
    """
    _check_dispatch_inputs(expert_idx, num_experts, check_values=False)
    chosen = resolve_backend(
        _dispatch_request(backend, expert_idx.device), expert_idx.device, DISPATCH_GPU_PREFERENCE
    )
    if chosen in ("cpu", "cuda"):
        return MoEDispatch(*torch.ops.eegfast.moe_dispatch(expert_idx, num_experts))
    _check_dispatch_inputs(expert_idx, num_experts, check_values=True)
    return moe_dispatch_reference(expert_idx, num_experts)


def moe_expert_ffn(
    x: torch.Tensor,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    top_k: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped two-layer GELU MLP over the expert groups of the sorted slot order.

    Row ``j`` of the result is expert ``e``'s ``w2[e] gelu(w1[e] x[sorted_slots[j] // top_k] +
    b1[e]) + b2[e]`` for ``offsets[e] <= j < offsets[e + 1]``, and 0 for ``j >= offsets[E]``.

    Args:
        x: (T, D); w1: (E, H, D); b1: (E, H); w2: (E, D_out, H); b2: (E, D_out); one dtype.
        sorted_slots: (T top_k,) int64, offsets: (E + 1,) int64 from :func:`moe_dispatch`.
            On CPU, a ``sorted_slots`` that is not a permutation (a slot listed twice) runs
            the reference: the C++ backward assumes one.
        top_k: k, the slots per token (``sorted_slots // top_k`` is a slot's token).
        backend: as :func:`moe_dispatch` (None: automatic).
    Returns:
        y_sorted (T top_k, D_out), dtype of x. Differentiable in x, w1, b1, w2, b2.
    """
    _check_ffn_inputs(x, sorted_slots, offsets, w1, b1, w2, b2, top_k)
    chosen = _ffn_backend(backend, x, (x, w1, b1, w2, b2))
    # the reference indexed x with a negative slot from the end (x[-1] for slot -1, silently),
    # the C++ kernel failed with an IndexError naming no argument; CPU tensors only, as in
    # moe_combine (elsewhere a host sync)
    checked = chosen in ("cpu", "reference") and x.device.type == "cpu"
    if checked and sorted_slots.numel() and not torch.compiler.is_compiling():
        low, high = int(sorted_slots.min()), int(sorted_slots.max())
        if low < 0 or high >= sorted_slots.shape[0]:
            raise ValueError(
                f"sorted_slots values must be in [0, {sorted_slots.shape[0]}) (token slots, "
                f"T * top_k), got {low} .. {high}"
            )
    if (
        chosen == "cpu"
        and not torch.compiler.is_compiling()
        and _repeats_a_row(sorted_slots, sorted_slots.shape[0])
    ):
        chosen = "reference"
    if chosen == "reference":
        return moe_expert_ffn_reference(x, sorted_slots, offsets, w1, b1, w2, b2, top_k)
    if chosen == "triton":
        return _triton_ops().moe_expert_ffn_triton(x, sorted_slots, offsets, w1, b1, w2, b2, top_k)[
            0
        ]
    if not x.device.type == "cpu":
        raise ValueError(f"backend={chosen!r}: moe_expert_ffn has no CUDA kernel; use 'triton'")
    return torch.ops.eegfast.moe_expert_ffn(x, sorted_slots, offsets, w1, b1, w2, b2, top_k)[0]


def _ffn_backend(requested: str | None, x: torch.Tensor, differentiable: tuple = ()) -> str:
    """The expert FFN's and combine's backend for ``x``: float64, which the Triton kernels do
    not take, runs on the reference when the choice is automatic (a gradcheck on a GPU), and
    so does a call under forward-mode AD or a torch.func gradient transform of
    ``differentiable`` (the kernels gave a zero tangent, and functorch refused their autograd
    with a message naming neither eegfast nor the op)."""
    chosen = resolve_backend(requested, x.device, FFN_GPU_PREFERENCE)
    if chosen != "reference" and needs_reference_autodiff(differentiable):
        return "reference"
    if chosen == "triton" and x.dtype == torch.float64:
        if requested in (None, "", "auto"):  # automatic (resolve_backend takes "auto" too)
            return "reference"
        raise TypeError(
            f"backend={requested!r}: the Triton MoE kernels take float32, float16 or bfloat16 "
            "inputs, got float64; use backend='reference' (or 'cpu' on CPU tensors)"
        )
    return chosen


def moe_combine(
    y_sorted: torch.Tensor,
    gates: torch.Tensor,
    slot_pos: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Gate-weighted sum of each token's k expert outputs.

    Args:
        y_sorted: (T k, D) expert outputs in sorted order; gates: (T, k) (any float dtype,
            accumulated in fp32); slot_pos: (T k,) int64 from :func:`moe_dispatch`, values in
            [-1, T k): -1 (the CUDA dispatch's mark of a slot whose expert index is outside
            [0, E)) adds nothing. Checked on CPU tensors (on GPUs it would cost a host sync),
            where a row named by two slots runs the reference (the C++ backward assumes none).
        backend: as :func:`moe_dispatch` (None: automatic).
    Returns:
        (T, D) in y_sorted's dtype. Differentiable in y_sorted and gates.
    """
    _check_combine_inputs(y_sorted, gates, slot_pos)
    chosen = _ffn_backend(backend, y_sorted, (y_sorted, gates))
    # the reference's too: it took any negative position for -1 (the slot silently dropped)
    checked = chosen in ("cpu", "reference") and y_sorted.device.type == "cpu"
    if checked and slot_pos.numel() and not torch.compiler.is_compiling():
        low, high = int(slot_pos.min()), int(slot_pos.max())
        if low < -1 or high >= y_sorted.shape[0]:
            raise ValueError(
                f"slot_pos values must be in [-1, {y_sorted.shape[0]}) (rows of y_sorted), "
                f"got {low} .. {high}"
            )
        if _repeats_a_row(slot_pos, y_sorted.shape[0]):
            chosen = "reference"
    if chosen == "reference":
        return moe_combine_reference(y_sorted, gates, slot_pos)
    if chosen == "triton":
        return _triton_ops().moe_combine_triton(y_sorted, gates, slot_pos)
    if not y_sorted.device.type == "cpu":
        raise ValueError(f"backend={chosen!r}: moe_combine has no CUDA kernel; use 'triton'")
    return torch.ops.eegfast.moe_combine(y_sorted, gates, slot_pos)


def moe_ffn(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Dropless top-k MoE FFN: dispatch, grouped expert MLP, gate-weighted combine.

    Args:
        x: (T, D); expert_idx: (T, k) int64 in [0, E); gates: (T, k); w1, b1, w2, b2 as
            :func:`moe_expert_ffn` (E experts).
        backend: as :func:`moe_dispatch` (None: automatic).
    Returns:
        (T, D_out): ``sum_i gates[t, i] expert_{expert_idx[t, i]}(x[t])``.
    """
    if expert_idx.shape[0] != x.shape[0] or gates.shape != expert_idx.shape:
        raise ValueError(
            f"x (T={x.shape[0]}, D), expert_idx {tuple(expert_idx.shape)} and gates "
            f"{tuple(gates.shape)} must agree on (T, k)"
        )
    for name, t in (("expert_idx", expert_idx), ("gates", gates)):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    plan = moe_dispatch(expert_idx, w1.shape[0], backend=backend)
    y_sorted = moe_expert_ffn(
        x, plan.sorted_slots, plan.offsets, w1, b1, w2, b2, expert_idx.shape[1], backend=backend
    )
    return moe_combine(y_sorted, gates, plan.slot_pos, backend=backend)
