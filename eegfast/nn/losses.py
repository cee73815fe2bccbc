"""Cross-entropy over a large vocabulary straight from the hidden states.

LaBraM's pretraining head maps 200-dim tokens onto 8192 codes: the logits are 41× the size of
the hidden states. Plain ``F.cross_entropy(lm_head(h), y)`` under bf16 autocast makes the logits,
an fp32 copy and fp32 log-probabilities in the forward (1.25 GiB at once for a LaBraM-Base step
of batch 64, 16384 predicted tokens) and keeps the log-probabilities for the backward (0.5 GiB
of the 3.6 GiB that step saves; a FakeTensor trace gives 3.61 → 3.12 GiB with this function),
whose gradient makes 0.75 GiB more. :func:`linear_cross_entropy` goes through the rows in
chunks and computes the gradients of the hidden states, weight and bias while each chunk's
logits are at hand, so nothing the size of the logits outlives its chunk, and it is gone over
fewer times than by autograd (the bias, the token weights and the bias gradient ride on the
products); the backward only scales those gradients by the loss's incoming gradient. The
products are the same three as autograd's (logits, grad·W, gradᵀ·h), in the same precision (the
autocast dtype when autocast is on, fp32 softmax; fp64 throughout for fp64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Rows per chunk: an fp32 chunk of logits of about this many bytes (64 MiB: 2048 rows of 8192).
CHUNK_BYTES = 64 << 20


class LinearCrossEntropy(NamedTuple):
    """What :func:`linear_cross_entropy` returns: ``loss`` () Σ token_weight · CE with
    gradients; ``per_token`` (T,) float32 CE (float64 for float64 inputs) and ``correct`` (T,)
    bool (the label is the argmax, the first of tied logits), both detached."""

    loss: torch.Tensor  # (): Σ_t token_weight[t] · CE[t], differentiable
    per_token: torch.Tensor  # (T,) fp32 (fp64 for fp64 inputs) CE of every token, detached
    correct: torch.Tensor  # (T,) bool: the label is the argmax (the first of tied logits)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    # float64 is not autocast-eligible: the autocast head's Linear keeps fp64 products.
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _with_column(matrix: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """(R, E) matrix and (R,) column -> (R, E') with the column at E, zeros after it, E' the
    next multiple of 8 above E."""
    R, E = matrix.shape
    out = matrix.new_zeros(R, (E + 1 + 7) // 8 * 8)
    out[:, :E] = matrix
    out[:, E] = column
    return out


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weight, chunk_rows, grad_enabled):
        T, V = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden)
        # softmax, CE and the accumulations in fp32, but never below the inputs' own precision:
        # a float64 model's loss and gradients had been fp32 (off by ~1e-7, failing gradcheck)
        acc = torch.promote_types(dtype, torch.float32)
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        E = hidden.shape[1]
        with torch.autocast(hidden.device.type, enabled=False):
            # With a bias, the rows get a column of ones and the weight the bias as a column
            # (zero-padded to 8 columns for aligned GEMM rows): the logits come from one plain
            # product, and the bias gradient from the weight gradient's product.
            w = weight.to(dtype) if bias is None else _with_column(weight.to(dtype), bias)
            per_token = hidden.new_empty(T, dtype=acc)
            correct = torch.empty(T, dtype=torch.bool, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(w, dtype=acc) if need_w or need_b else None
            # Chunk by index, the last slice clamped by the slicing itself: under torch.compile
            # a Python range over T (or min(.., T)) pins the graph to this T, so every other
            # token count (electrode set, window length) compiled a graph of its own; this way
            # it depends only on how many chunks there are.
            for chunk in range((T + chunk_rows - 1) // chunk_rows):
                rows = slice(chunk * chunk_rows, (chunk + 1) * chunk_rows)
                h = hidden[rows].to(dtype)
                if bias is not None:
                    h = _with_column(h, torch.ones_like(h[:, 0]))
                logits = (h @ w.t()).to(acc)  # (rows, V)
                label = labels[rows]
                # argmax as the reference's accuracy (the first of tied logits): counting ties
                # as correct would call constant logits right for every label
                correct[rows] = logits.argmax(dim=1) == label
                log_p = torch.log_softmax(logits, dim=1)
                del logits
                try:
                    per_token[rows] = log_p.gather(1, label[:, None]).squeeze(1).neg()
                except RuntimeError as err:  # on a CPU (a GPU stops at a device-side assert)
                    if "out of bounds" not in str(err):
                        raise
                    raise ValueError(f"labels must be in [0, V={V}): {err}") from err
                if not (need_h or need_w or need_b):
                    continue
                # d(w_t · CE_t)/d logits = w_t · (softmax − onehot): softmax − onehot in place
                # of log_p, the token weights applied to the (rows, E) sides of the products.
                # Not in the product dtype: a GradScaler's scale only reaches these gradients in
                # the backward, and small weights (1/T for T tokens) times the products would
                # be fp16 subnormals or 0. grad·W is weighted in fp32; h enters gradᵀ·h weighted
                # by w_t / max|w| (at most 1), the product then multiplied by max|w| in fp32.
                grad = log_p.exp_()
                grad.scatter_add_(1, label[:, None], torch.full_like(grad[:, :1], -1.0))
                grad = grad.to(dtype)
                weights = token_weight[rows, None].to(acc)
                if need_h:
                    grad_h[rows] = ((grad @ w)[:, :E].to(acc) * weights).to(hidden.dtype)
                if grad_w is not None:
                    peak = weights.abs().amax().clamp_min(torch.finfo(acc).tiny)
                    grad_w += (grad.t() @ (h * (weights / peak).to(dtype))).to(acc) * peak
            grad_b = None
            if grad_w is not None and bias is not None:
                grad_b = grad_w[:, E].clone() if need_b else None
                grad_w = grad_w[:, :E].contiguous() if need_w else None
            loss = (per_token * token_weight.to(acc)).sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(per_token, correct)
        return loss, per_token, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_correct):
        if torch.is_grad_enabled():  # create_graph: the saved gradients are constants
            raise RuntimeError(
                "linear_cross_entropy has no second derivative (backward with "
                "create_graph=True); use F.cross_entropy(F.linear(...)) for that"
            )
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.to(torch.promote_types(grad_loss.dtype, torch.float32))
        out_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        out_w = None if grad_w is None else grad_w * scale
        out_b = None if grad_b is None else grad_b * scale
        return out_h, out_w, out_b, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_weight: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> LinearCrossEntropy:
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` without keeping the logits.

    Args:
        hidden: (T, E) hidden states.
        weight: (V, E) and bias (V,) or None: the output layer (an ``nn.Linear``'s).
        labels: (T,) int64 in [0, V).
        token_weight: (T,) each token's weight in the loss (not differentiated): 1/T for
            a mean, 0 to leave a token out.
        chunk_rows: rows a chunk (default: an fp32 chunk of logits of about 64 MiB).

    Returns:
        ``loss`` (): Σ token_weight · CE, with gradients for ``hidden``, ``weight`` and
        ``bias``; ``per_token`` (T,) fp32 CE (fp64 for fp64 inputs) and ``correct`` (T,)
        bool, detached.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (T, E), got shape {tuple(hidden.shape)}")
    T, E = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != E:
        raise ValueError(f"weight must be (V, E={E}), got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(
            f"weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be (V={V},), got shape {tuple(bias.shape)}")
    if labels.shape != (T,) or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be (T={T},) int64, got shape {tuple(labels.shape)} {labels.dtype}"
        )
    if token_weight.shape != (T,):
        raise ValueError(f"token_weight must be (T={T},), got shape {tuple(token_weight.shape)}")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * V))
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    loss, per_token, correct = _LinearCrossEntropyFunction.apply(
        hidden, weight, bias, labels, token_weight.detach(), chunk_rows, torch.is_grad_enabled()
    )
    return LinearCrossEntropy(loss, per_token, correct)
