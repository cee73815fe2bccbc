"""Scaled softmax attention with a LayerNorm of q and k over the head dim, fused in one op.

LaBraM-family models (and timm ViTs built with ``qk_norm=True``) normalise q and k per head
before the softmax. Here that LayerNorm runs inside the attention kernel, together with key
padding, causal and block-causal masks, and an online softmax that never forms the (N, N)
score matrix (forward and backward).

Public functions:

- :func:`qk_norm_attention` — (B, H, N, D) q, k, v with any strides.
- :func:`qk_norm_attention_packed` — the (B, N, 3·H·D) output of the qkv Linear, split into
  heads by strided views (no permute copies); returns (B, N, H·D), ready for the projection.
- :func:`qk_norm_attention_reference` — plain PyTorch (LayerNorm + explicit masked softmax),
  the definition of correctness; float64-capable and the only backend with dropout.

Kernels: C++ CPU in csrc/qk_norm_attention/ (``torch.ops.eegfast.qk_norm_attention_fwd`` /
``_bwd``) and Triton in :mod:`eegfast.ops.qk_norm_attention_triton`
(``torch.ops.eegfast.qk_norm_attention_fwd_triton`` / ``_bwd_triton``), which registers its
ops' fake and autograd glue by calling :func:`_register_op_glue` of this module. All four
custom ops share one schema (see :func:`_register_op_glue`); ``backend="cuda"`` means the Triton
kernels, as there is no hand-written CUDA kernel for this op. In plain eager mode the public
functions run the ops' work without the dispatcher (an autograd.Function over the same code,
see _OP_PATHS); under torch.compile, export, tracers and dispatch modes they call the ops.

Masks (all optional, combined with a logical AND of "visible"): query i sees key j iff
``not key_padding_mask[b, j]``, and ``j <= i`` if ``causal``, and
``block_causal[j] <= block_causal[i]`` if ``block_causal`` is given. A query that sees no key
gets a zero output row and zero gradients, never NaN.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import NoReturn

import torch
import torch.nn.functional as F

from eegfast.ops._backend import (
    assume_constant_result,
    extension,
    needs_reference_autodiff,
    raising_when_differentiated,
    resolve_backend,
)

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The only GPU backend of this op (backend="cuda" is an alias for it).
GPU_PREFERENCE = ("triton",)
TRITON_MODULE = "eegfast.ops.qk_norm_attention_triton"
CPP_FWD_OP = "eegfast::qk_norm_attention_fwd"
CPP_BWD_OP = "eegfast::qk_norm_attention_bwd"
TRITON_FWD_OP = "eegfast::qk_norm_attention_fwd_triton"


# --------------------------------------------------------------------------------------------
# Reference implementation: the definition of correctness.
# --------------------------------------------------------------------------------------------


def visible_keys(
    batch: int,
    n: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """(B, 1, N, N) bool, True where query i may attend to key j; None when all keys are
    visible to all queries."""
    visible = None
    if causal:
        visible = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if block_causal is not None:
        ids = block_causal.to(device)
        by_block = ids[None, :] <= ids[:, None]  # [i, j]: key block <= query block
        visible = by_block if visible is None else visible & by_block
    if visible is not None:
        visible = visible.expand(batch, 1, n, n)
    if key_padding_mask is not None:
        keys = (~key_padding_mask.to(device))[:, None, None, :]  # (B, 1, 1, N)
        visible = keys.expand(batch, 1, n, n) if visible is None else visible & keys
    return visible


def qk_norm_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    q_norm_bias: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    k_norm_bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Plain PyTorch: ``F.layer_norm`` over D, then an explicit masked softmax over (N, N).

    Same arguments as :func:`qk_norm_attention` (``backend`` is accepted and ignored). Computes
    in the dtype of ``q`` for float32 / float64 and in float32 for float16 / bfloat16 inputs
    (cast back at the end). Differentiable in all tensors. Returns (B, H, N, D) contiguous.
    """
    _check_inputs(q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                  eps, key_padding_mask, block_causal, dropout_p, scale=scale,
                  causal=causal)  # fmt: skip
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale

    def norm(x, weight, bias):
        weight = None if weight is None else weight.to(compute)
        bias = None if bias is None else bias.to(compute)
        return F.layer_norm(x.to(compute), (D,), weight, bias, eps)

    padded = None if key_padding_mask is None else key_padding_mask.to(q.device)[:, None, :, None]
    if padded is not None:
        # Padding keys are ignored whatever they hold: their weights are 0, but 0 times a NaN
        # or inf value (or key, in the backward's products) is NaN. where(), not a product, so
        # that their own gradients are 0 as well. The keys become a fixed row that varies
        # (0, 1, 0, 1, ...), not zeros: with eps = 0 a constant row's LayerNorm is 0 · rsqrt(0)
        # = NaN, which its backward multiplied by the rows' zero gradients into a NaN
        # k_norm_weight gradient.
        k = torch.where(padded, (torch.arange(D, device=k.device) % 2).to(k.dtype), k)
        v = torch.where(padded, 0, v)
    qn = norm(q, q_norm_weight, q_norm_bias)
    kn = norm(k, k_norm_weight, k_norm_bias)
    if padded is not None:
        kn = torch.where(padded, 0, kn)
    scores = (qn * scale) @ kn.transpose(-2, -1)  # (B, H, N, N)
    visible = visible_keys(
        q.shape[0],
        q.shape[2],
        key_padding_mask=key_padding_mask,
        causal=causal,
        block_causal=block_causal,
        device=q.device,
    )
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    # Softmax written out so that rows seeing no key give 0 (not NaN) and zero gradients: the
    # shift is a constant (detached, 0 for empty rows), exp(-inf) = 0, empty rows divide by 1.
    # (amax of an empty dim raises: N = 0, which the kernels accept, has no rows to shift)
    if scores.shape[-1] > 0:
        row_max = scores.detach().amax(dim=-1, keepdim=True)
    else:
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    attn = weights / torch.where(total > 0, total, torch.ones_like(total))
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return (attn @ v.to(compute)).to(q.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks shared by all backends (the C++ kernel repeats them for direct callers).
# --------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    q_norm_bias: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    k_norm_bias: torch.Tensor | None,
    eps: float,
    key_padding_mask: torch.Tensor | None,
    block_causal: torch.Tensor | None,
    dropout_p: float,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> None:
    if not _is_number(eps):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if scale is not None and not _is_number(scale):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not _is_number(dropout_p):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) the numbers are
    # SymFloats, which compare symbolically but break the graph in math.isfinite.
    if not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if scale is not None and not -math.inf < scale < math.inf:
        raise ValueError(f"scale must be a finite number or None, got {scale}")
    # 1 included, as F.dropout and F.scaled_dot_product_attention take it: every weight
    # dropped, a zero output (an nn.Dropout(1.0) attention dropout is valid in a model)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, N, D), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q (B, H, N, D) = {tuple(q.shape)}, "
                f"got {tuple(t.shape)}"
            )
    B, _, N, D = q.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {D} is not supported: it must be in 1..{MAX_HEAD_DIM}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"q is {q.dtype} but {name} is {t.dtype}; pass q, k, v in one dtype")
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")
    params = (
        ("q_norm_weight", q_norm_weight),
        ("q_norm_bias", q_norm_bias),
        ("k_norm_weight", k_norm_weight),
        ("k_norm_bias", k_norm_bias),
    )
    for name, p in params:
        if p is None:
            continue
        _check_tensor_or_none(name, p)
        if p.shape != (D,):
            raise ValueError(f"{name} must have shape (D,) = ({D},), got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if p.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {p.device}")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, B, N)
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"q is on {q.device} but key_padding_mask is on {key_padding_mask.device}"
            )
    if block_causal is not None:
        check_block_causal(block_causal, N)
        if block_causal.device != q.device:
            raise ValueError(f"q is on {q.device} but block_causal is on {block_causal.device}")


def check_key_padding_mask(key_padding_mask: object, batch: int, n: int) -> None:
    """TypeError / ValueError naming ``key_padding_mask`` unless it is a (batch, n) bool tensor
    (True = padding key): a float mask is ambiguous (additive -inf / 0, or 1 = padding?), and a
    cast to bool would silently pick one reading. Shared with the unfused layer path."""
    _check_tensor_or_none("key_padding_mask", key_padding_mask)
    if key_padding_mask.shape != (batch, n):
        raise ValueError(
            f"key_padding_mask must have shape (B, N) = ({batch}, {n}), "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be bool (True = padding key), got {key_padding_mask.dtype}"
        )


def check_block_causal(block_causal: object, n: int) -> None:
    """TypeError / ValueError naming ``block_causal`` unless it is an (n,) integer tensor (one
    block id per token, shared by the batch). Shared with the unfused layer path, which
    otherwise took float or bool ids and failed on a (B, N) tensor in a broadcast."""
    _check_tensor_or_none("block_causal", block_causal)
    if block_causal.shape != (n,):
        raise ValueError(
            f"block_causal must have shape (N,) = ({n},), got {tuple(block_causal.shape)}"
        )
    if block_causal.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"block_causal must be an integer tensor, got {block_causal.dtype}")


def _check_tensor_or_none(name: str, value: object) -> None:
    """TypeError naming the argument ``name`` unless ``value`` is a tensor or None."""
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")


def _is_number(value: object) -> bool:
    """Whether ``value`` is a real number (a torch.compile SymInt / SymFloat, a NumPy scalar
    included), not a bool."""
    if type(value) in (float, int):  # the usual case, without numbers.Real's slow ABC check
        return True
    return isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(
        value, bool
    )


# --------------------------------------------------------------------------------------------
# Custom-op glue: fake (meta) kernels and autograd, shared by the C++ and Triton ops.
#
# fwd(q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal, block_ids)
#   -> out (B, N, H, D) contiguous in q's dtype, lse (B, H, N), q_stats, k_stats (B, H, N, 2)
#      (mean, rstd); lse and stats are float32, float64 for float64 inputs.
# bwd(grad_out, q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats, scale,
#     key_padding_mask, causal, block_ids) -> dq, dk, dv (B, H, N, D) contiguous in q's dtype,
#      d q_w, d q_b, d k_w, d k_b: (D,) in the parameter's dtype, or (0,) for a None parameter.
# --------------------------------------------------------------------------------------------


def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, q_w, q_b, k_w, k_b, eps, scale, key_padding_mask, causal, block_ids):
    B, H, N, D = q.shape
    stats = _stats_dtype(q)
    return (
        q.new_empty(B, N, H, D),
        q.new_empty(B, H, N, dtype=stats),
        q.new_empty(B, H, N, 2, dtype=stats),
        q.new_empty(B, H, N, 2, dtype=stats),
    )


def _bwd_fake(grad_out, q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats, scale,
              key_padding_mask, causal, block_ids):  # fmt: skip
    shape = q.shape

    def param_grad(p):
        return q.new_empty(0) if p is None else p.new_empty(p.shape)

    return (
        q.new_empty(shape),
        q.new_empty(shape),
        q.new_empty(shape),
        param_grad(q_w),
        param_grad(q_b),
        param_grad(k_w),
        param_grad(k_b),
    )


def _fwd_setup_context(ctx, inputs, output) -> None:
    out, lse, q_stats, k_stats = output
    ctx.mark_non_differentiable(lse, q_stats, k_stats)
    # their gradients stay None: materialising them built three zero tensors per backward
    # (~70 us at (8, 10, 257, 20) on 2 CPU cores, torch profiler)
    ctx.set_materialize_grads(False)
    _save_for_backward(ctx, inputs, out, lse, q_stats, k_stats)


def _save_for_backward(ctx, inputs, out, lse, q_stats, k_stats) -> None:
    """What _input_grads reads: the inputs, the forward's outputs and its flags."""
    q, k, v, q_w, q_b, k_w, k_b, _eps, scale, key_padding_mask, causal, block_ids = inputs
    ctx.scale = scale
    ctx.causal = causal
    ctx.has_param = tuple(p is not None for p in (q_w, q_b, k_w, k_b))
    ctx.save_for_backward(
        q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats, key_padding_mask, block_ids
    )


def _op(qualified_name: str):
    """torch.ops.<namespace>.<name> of "namespace::name"."""
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def _double_backward_message(bwd_op: str) -> str:
    """The error of a gradient taken through ``bwd_op``, which has no derivative."""
    return (
        f"qk_norm_attention does not support double backward on its kernel backends: {bwd_op} "
        "is not differentiable, so the second-order term (create_graph=True, e.g. a gradient "
        "penalty, or torch.autograd.functional.hessian) would be lost; pass "
        "backend='reference', which supports it"
    )


def _bwd_backward(ctx, *grads) -> NoReturn:
    """The autograd formula registered on the backward ops: there is none."""
    raise RuntimeError(ctx.message)


def _make_backward(bwd_op: str, *, strided_grad: bool):
    """The autograd formula registered on a forward op, calling ``bwd_op``; ``strided_grad``:
    that op reads grad_out with any strides whose rows are contiguous (the C++ op), so the
    transposed view autograd passes for a (B, H, N, D) contiguous gradient is not copied."""

    def backward(ctx, grad_out, _grad_lse, _grad_q_stats, _grad_k_stats):
        if grad_out is None:  # not materialised: nothing flowed into the output
            return (None,) * 12
        return _input_grads(ctx, _op(bwd_op), grad_out, strided_grad)

    return backward


def _input_grads(ctx, bwd: Callable, grad_out: torch.Tensor, strided_grad: bool) -> tuple:
    """The 12 input gradients of a forward op from ``bwd`` (the backward op or its eager
    form) and the tensors _fwd_setup_context saved; grad_out (B, N, H, D)."""
    q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats, mask, block_ids = ctx.saved_tensors
    dq, dk, dv, *param_grads = bwd(
        grad_out if strided_grad else grad_out.contiguous(),
        q, k, v, q_w, q_b, k_w, k_b, out, lse, q_stats, k_stats,
        ctx.scale, mask, ctx.causal, block_ids,
    )  # fmt: skip
    param_grads = [g if has else None for g, has in zip(param_grads, ctx.has_param, strict=True)]
    return dq, dk, dv, *param_grads, None, None, None, None, None


def _function_class(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd.Function subclass named ``name`` (its grad_fn: ``name + "Backward"``)."""
    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


def _eager_function(
    name: str, fwd: Callable, bwd: Callable, *, strided_grad: bool, bwd_name: str
) -> type[torch.autograd.Function]:
    """An autograd.Function over the eager forms of the ops, returning only the (B, N, H, D)
    output (lse and the statistics are saved, not returned: one output for the autograd engine
    to track). Not a view of it: a view made inside a custom Function cannot be modified in
    place, and callers do (``attn(x).mul_(s)``). Once differentiable: gradients taken with
    create_graph=True raise (naming ``bwd_name``) when differentiated."""

    message = _double_backward_message(bwd_name)

    def forward(ctx, *args):
        out, lse, q_stats, k_stats = fwd(*args)
        _save_for_backward(ctx, args, out, lse, q_stats, k_stats)
        return out

    def backward(ctx, grad_out):
        if not torch.is_grad_enabled():  # a plain backward (create_graph=False)
            return _input_grads(ctx, bwd, grad_out, strided_grad)
        # create_graph=True: the kernels' gradients have no graph; once_differentiable only
        # catches a grad_out that requires grad, and out.sum()'s does not, so the second-order
        # term would be silently dropped. Differentiating them raises instead.
        with torch.no_grad():
            grads = _input_grads(ctx, bwd, grad_out, strided_grad)
        return raising_when_differentiated(grads, message, (grad_out, *ctx.saved_tensors))

    return _function_class(name, forward, backward)


@dataclass(frozen=True)
class _OpPaths:
    """How the public functions run one forward op (see _register_op_glue)."""

    eager_forward: Callable  # the forward without the dispatcher
    eager: type[torch.autograd.Function]  # eager_forward and the backward without it


# fwd op name -> its _OpPaths. Calling a custom op from Python passes the dispatcher, the op's
# registered autograd wrapper (torch._library.autograd, which rebuilds the schema's argument
# list per call) and, for a triton_op, a torch.compile-disabled frame: at a tiny shape the Triton
# path's host work for a forward + backward was ~300 us on a Zen 4 core with the kernel launches
# stubbed out, ~180 us without those layers. The public functions call the kernels directly in
# plain eager mode, and the registered ops, which torch.compile and the tracers see, otherwise
# (see _plain_eager).
_OP_PATHS: dict[str, _OpPaths] = {}


def _below_autograd(qualified_name: str) -> Callable:
    """A call of the op that skips its autograd wrapper (the eager form of the C++ ops)."""
    op = _op(qualified_name).default

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


def _register_op_glue(
    fwd_op: str,
    bwd_op: str,
    *,
    strided_grad: bool = False,
    eager: tuple[Callable, Callable] | None = None,
) -> None:
    """Fake kernels for both ops, the autograd formula of ``fwd_op`` (calling ``bwd_op``)
    registered on the op, and the public functions' eager path for it (_OP_PATHS).

    ``eager``: (forward, backward) with the ops' schemas that launch the kernels without the
    dispatcher; by default, the ops called below their autograd wrappers. Used for the C++ ops
    here and by :mod:`eegfast.ops.qk_norm_attention_triton` for its ops, which share the schema
    documented above.
    """
    torch.library.register_fake(fwd_op)(_fwd_fake)
    torch.library.register_fake(bwd_op)(_bwd_fake)
    backward = _make_backward(bwd_op, strided_grad=strided_grad)
    torch.library.register_autograd(fwd_op, backward, setup_context=_fwd_setup_context)
    # The backward op's own "derivative": an error. Without one, a double backward on the op
    # path (under dispatch modes) only warned that no autograd kernel was registered and left
    # the second-order gradients None.
    message = _double_backward_message(bwd_op)

    def bwd_setup_context(ctx, inputs, output) -> None:
        ctx.message = message

    torch.library.register_autograd(bwd_op, _bwd_backward, setup_context=bwd_setup_context)
    eager_fwd, eager_bwd = eager or (_below_autograd(fwd_op), _below_autograd(bwd_op))
    _OP_PATHS[fwd_op] = _OpPaths(
        eager_forward=eager_fwd,
        eager=_eager_function(
            fwd_op.split("::")[1] + "_eager",
            eager_fwd,
            eager_bwd,
            strided_grad=strided_grad,
            bwd_name=bwd_op,
        ),
    )


def _plain_eager(tensors: tuple) -> bool:
    """Whether the kernels may be called without the dispatcher: not under torch.compile,
    export or torch.jit.trace, no dispatch mode (fake tensors, make_fx, FlopCounterMode) or
    functorch transform active, and every tensor a plain one (or a Parameter)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch.jit.is_tracing():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def _cpp_ops_built() -> bool:
    """Whether eegfast._C has this op (an extension built before it existed does not)."""
    return extension() is not None and hasattr(torch.ops.eegfast, "qk_norm_attention_fwd")


if _cpp_ops_built():
    _register_op_glue(CPP_FWD_OP, CPP_BWD_OP, strided_grad=True)


def cpu_output_pool_bytes() -> int:
    """Bytes of freed outputs the C++ CPU kernels keep for their next calls.

    The forward's output and the backward's dq, dk, dv come from a pool that keeps freed blocks
    (up to ``EEGFAST_CPU_POOL_MB``, default 64; 0 keeps none) instead of returning them to the C
    library: depending on the process's other allocations, glibc hands multi-MB blocks back to
    the kernel, and the next call then faults every page in again. 0 when the extension is not
    built.
    """
    if not _cpp_ops_built():
        return 0
    return int(torch.ops.eegfast.cpu_pool_cached_bytes())


def cpu_attention_isa() -> str | None:
    """Which instance of the C++ CPU attention kernels runs here: ``"amx"`` (AVX-512, and the
    forward of bfloat16 inputs on the AMX tile unit), ``"avx512"`` (512-bit vectors), ``"avx2"``
    or ``"generic"`` (256-bit); None when the extension is not built.

    The CPU decides, capped by ``EEGFAST_CPU_ISA`` (one of those names). ``"amx"`` needs
    AMX-BF16 (Intel Sapphire Rapids and later) and the OS's permission, which the kernels ask
    for on first use. Its bfloat16 forward rounds the probabilities to bfloat16 for P·V (float32
    accumulation; the scores are float32-accurate), as GPU attention kernels do; the float32
    instances compute bfloat16 inputs in float32 throughout.
    """
    if not _cpp_ops_built():
        return None
    return str(torch.ops.eegfast.cpu_attention_isa())


def release_cpu_output_pool() -> None:
    """Frees the blocks :func:`cpu_output_pool_bytes` counts (as ``torch.cuda.empty_cache``)."""
    if _cpp_ops_built():
        torch.ops.eegfast.cpu_pool_release()


@functools.cache
def _triton_module() -> tuple[ModuleType | None, str]:
    """The Triton ops module, imported on first use (triton is optional), or why not."""
    try:
        return importlib.import_module(TRITON_MODULE), f"{TRITON_MODULE} loaded"
    except ImportError as error:
        return None, f"{TRITON_MODULE} could not be imported: {error}"


# Evaluated once while torch.compile traces a call, like resolve_backend.
@assume_constant_result
def _choose_backend(
    requested: str | None, device: torch.device, dropout: bool, float64: bool = False
) -> str:
    """'reference', 'cpu' or 'triton' for this call; raises if an explicit choice cannot run.
    float64 inputs, which the Triton kernels do not take, run on the reference when the choice
    is automatic (a gradcheck on a GPU, say)."""
    requested = requested or None  # "" is no choice, as in resolve_backend
    # backend="auto" (which resolve_backend accepts and lists) is the automatic choice, one
    # that also overrides EEGFAST_BACKEND; only None defers to that variable
    automatic = requested in (None, "auto")
    if dropout:
        env = os.environ.get("EEGFAST_BACKEND")
        if not automatic and requested != "reference":
            raise ValueError(
                "dropout_p > 0 is only implemented by backend='reference', "
                f"got backend={requested!r}"
            )
        if requested is None and env not in (None, "", "auto", "reference"):
            raise ValueError(
                f"dropout_p > 0 is only implemented by backend='reference' (EEGFAST_BACKEND "
                f"selects {env!r}); pass backend='reference' or dropout_p=0"
            )
        return "reference"
    if requested == "cuda":  # no hand-written CUDA kernel for this op: CUDA means Triton
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' cannot run on tensors on {device}")
        requested = "triton"
    chosen = resolve_backend(requested, device, GPU_PREFERENCE)
    if chosen == "cuda":  # EEGFAST_BACKEND=cuda
        chosen = "triton"
    if chosen == "cpu" and not _cpp_ops_built():
        if requested == "cpu":
            raise RuntimeError(
                "backend='cpu': eegfast._C has no qk_norm_attention kernels; rebuild it with "
                "`pip install --no-build-isolation -e .`"
            )
        return "reference"
    if chosen == "triton" and float64:
        if automatic:
            return "reference"
        raise TypeError(
            f"backend={requested!r}: the Triton kernels take float32, float16 or bfloat16 "
            "inputs, got float64; use backend='reference' (or 'cpu' on CPU tensors)"
        )
    if chosen == "triton" and _triton_module()[0] is None:
        if automatic and device.type == "cuda":
            return "reference"
        choice = f"backend={requested!r}" if requested else "EEGFAST_BACKEND='triton'"
        raise RuntimeError(f"{choice} is not available: {_triton_module()[1]}")
    return chosen


# --------------------------------------------------------------------------------------------
# Public ops.
# --------------------------------------------------------------------------------------------


def qk_norm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    q_norm_bias: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    k_norm_bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``softmax(scale · LN_q(q) · LN_k(k)^T + mask) · v`` without an (N, N) matrix.

    Args:
        q, k, v: (B, H, N, D), one float dtype (float32, float16, bfloat16; float64 on the
            reference and C++ backends), any strides. D in 1..128. Low-precision inputs are
            computed with float32 accumulation.
        q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias: (D,) LayerNorm affine
            parameters shared by all heads, or None (no scale / no shift).
        eps: LayerNorm epsilon (added to the variance).
        scale: multiplies the scores; default ``D ** -0.5``.
        key_padding_mask: (B, N) bool, True where a KEY is padding and must be ignored: what
            its k and v rows hold (NaN or inf included) reaches neither the output nor any
            gradient, and their own gradients are 0.
        causal: query i sees key j only if ``j <= i``.
        block_causal: (N,) integer block id of every token (e.g. its time patch); query i sees
            key j only if ``block_causal[j] <= block_causal[i]``.
        dropout_p: dropout on the attention weights in [0, 1], applied whenever > 0 (pass 0
            in eval; 1 drops every weight: a zero output). Only the reference backend
            implements it; the automatic choice then runs the reference, an explicit other
            backend raises ValueError.
        backend: ``"reference"``, ``"cpu"`` (C++), ``"triton"``, ``"cuda"`` (= Triton) or None
            (automatic: C++ on CPU tensors, Triton on CUDA tensors; ``EEGFAST_BACKEND`` when
            set); ``"auto"`` is the automatic choice whatever ``EEGFAST_BACKEND`` says. See
            :mod:`eegfast.ops`.
            Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``)
            and the ``torch.func`` gradient transforms (``grad``, ``vjp``, ``jacrev``,
            ``hessian``) run on the reference whatever the backend: the kernels support
            neither. Nor do they support double backward (``create_graph=True`` and a
            gradient of the gradient): that raises RuntimeError; use ``"reference"``.

    Returns:
        (B, H, N, D) in q's dtype. From the kernels it is a view of a contiguous (B, N, H, D)
        buffer (so ``out.transpose(1, 2).reshape(B, N, H * D)`` is free).

    Rows whose query sees no key are zero and get zero gradients. The kernels return the
    gradient of ``k_norm_bias`` as exact zeros: the key bias adds the same q_n . b to every
    score of a query row, which the softmax ignores (the reference's autograd gives rounding
    noise around zero).
    """
    _check_inputs(q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                  eps, key_padding_mask, block_causal, dropout_p, scale=scale,
                  causal=causal)  # fmt: skip
    # a branch, not the comparison itself: under torch.compile(dynamic=True) dropout_p is a
    # SymFloat and the comparison a SymBool, which the constant-folded _choose_backend cannot
    # take, while a branch on it is decided (and guarded) at trace time
    dropout = True if dropout_p > 0 else False  # noqa: SIM210
    chosen = _choose_backend(backend, q.device, dropout, q.dtype == torch.float64)
    if chosen != "reference" and needs_reference_autodiff(
        (q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    ):
        chosen = "reference"
    kwargs = dict(eps=eps, scale=scale, key_padding_mask=key_padding_mask, causal=causal,
                  block_causal=block_causal)  # fmt: skip
    if chosen == "reference":
        return qk_norm_attention_reference(
            q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
            dropout_p=dropout_p, **kwargs,
        )  # fmt: skip
    return _run_kernel(chosen, q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                       **kwargs)  # fmt: skip


def _run_kernel(chosen, q, k, v, q_w, q_b, k_w, k_b, *, eps, scale, key_padding_mask, causal,
                block_causal) -> torch.Tensor:  # fmt: skip
    """(B, H, N, D) output of the C++ or Triton forward op: a view of its (B, N, H, D) one."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, q_w, q_b, k_w, k_b, float(eps), scale, key_padding_mask, bool(causal),
            block_causal)  # fmt: skip
    # (for "triton", _choose_backend has imported the Triton ops, which registers them: an
    # import here would be traced by torch.compile, which cannot, and break the graph)
    op_name = TRITON_FWD_OP if chosen == "triton" else CPP_FWD_OP
    if _plain_eager((q, k, v, q_w, q_b, k_w, k_b, key_padding_mask, block_causal)):
        paths = _OP_PATHS[op_name]
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, q_w, q_b, k_w, k_b)
        ):
            return paths.eager.apply(*args).transpose(1, 2)
        return paths.eager_forward(*args)[0].transpose(1, 2)
    # the registered op and its registered autograd: what torch.compile and the tracers see
    out, *_ = _op(op_name)(*args)
    return out.transpose(1, 2)


def qk_norm_attention_packed(
    qkv: torch.Tensor,
    num_heads: int,
    q_norm_weight: torch.Tensor | None = None,
    q_norm_bias: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    k_norm_bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`qk_norm_attention` on the output of a qkv Linear, without permute copies.

    Args:
        qkv: (B, N, 3·H·D), laid out ``[q | k | v]`` with each part split into heads
            ``h·D:(h+1)·D`` (timm / LaBraM layout). q, k, v are read as strided views.
        num_heads: H.
        Other arguments: as :func:`qk_norm_attention`.

    Returns:
        (B, N, H·D) in qkv's dtype, the input of the output projection.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must have shape (B, N, 3 * H * D), got {shape}")
    if not isinstance(num_heads, (int, torch.SymInt)) or isinstance(num_heads, bool):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    # (checked here: qk_norm_attention's errors name q, k, v, which this caller never passed)
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"qkv must be float32, float16, bfloat16 or float64, got {qkv.dtype}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv's last dim ({qkv.shape[-1]}) must be 3 * num_heads * D with num_heads = "
            f"{num_heads}"
        )
    B, N, _ = qkv.shape
    D = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, D)).permute(2, 0, 3, 1, 4).unbind(0)
    out = qk_norm_attention(
        q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, eps=eps, scale=scale,
        key_padding_mask=key_padding_mask, causal=causal, block_causal=block_causal,
        dropout_p=dropout_p, backend=backend,
    )  # fmt: skip
    return out.transpose(1, 2).reshape(B, N, num_heads * D)
