"""Multi-head self-attention with optional per-head LayerNorm on queries and keys (LaBraM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eegfast.nn.linear import fused_linear, linear_call_fusable, scaled_residual
from eegfast.ops import qk_norm_attention_packed
from eegfast.ops.qk_norm_attention import check_block_causal, check_key_padding_mask


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether tensors on ``a`` and ``b`` share a device; a device named without an index
    (``cpu``, ``cuda``: the current one) matches any index of its type (``cpu:0``)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def attention_visibility(
    batch: int,
    n: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_causal: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean "query may see key" mask, (B, 1, N, N) or (1, 1, N, N), or None if all visible.

    Semantics of the eegfast attention ops: ``key_padding_mask`` (B, N) bool, True = padding
    key; ``causal``: j <= i; ``block_causal`` (N,) block ids: block[j] <= block[i]. Masks AND.
    The masks are checked as by the fused op (:func:`check_key_padding_mask`: a bool tensor;
    :func:`check_block_causal`: (N,) integer ids; ``causal`` a bool), so that both paths of
    :class:`QKNormAttention` take the same arguments. With ``device`` given, a mask on another
    device is refused as the fused op refuses it (a silent copy would hide a per-call transfer).
    """
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, batch, n)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if block_causal is not None:
        check_block_causal(block_causal, n)
    if device is not None:
        device = torch.device(device)
        for name, mask in (("key_padding_mask", key_padding_mask), ("block_causal", block_causal)):
            if mask is not None and not _same_device(mask.device, device):
                raise ValueError(f"the input is on {device} but {name} is on {mask.device}")
    visible = None
    if causal:
        visible = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    if block_causal is not None:
        blocks = block_causal.to(device)
        in_past = (blocks[None, :] <= blocks[:, None])[None, None]
        visible = in_past if visible is None else visible & in_past
    if key_padding_mask is not None:
        keys = (~key_padding_mask.to(device))[:, None, None, :]
        visible = keys if visible is None else visible & keys
    if visible is not None and visible.shape[0] != batch:
        visible = visible.expand(batch, -1, n, n)
    return visible


def labram_qkv_bias(
    q_bias: torch.Tensor | None, v_bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The qkv Linear's bias in LaBraM's layout: ``[q_bias | 0 | v_bias]`` (k gets no bias)."""
    if q_bias is None:
        return None
    return torch.cat((q_bias, torch.zeros_like(v_bias), v_bias))


class QKNormAttention(nn.Module):
    """Self-attention of LaBraM: one qkv Linear, optional q/k LayerNorm, output projection.

    State-dict keys are those of the reference implementation: ``qkv.weight`` (no Linear bias),
    ``q_bias`` and ``v_bias`` when ``qkv_bias`` (keys get no bias), ``q_norm.*`` / ``k_norm.*``
    (one ``LayerNorm(head_dim)`` each, shared by all heads) when ``qk_norm``, and ``proj.*``.

    With ``qk_norm`` the fused op :func:`eegfast.ops.qk_norm_attention_packed` reads q/k/v
    straight out of the qkv projection (no permute copies) and normalises inside the kernel;
    without it (the tokenizer) PyTorch's ``scaled_dot_product_attention`` is used.

    Args:
        dim: model width; ``num_heads`` must divide it.
        num_heads: number of heads H; head dim D = dim // H.
        qkv_bias: learn ``q_bias`` and ``v_bias`` (the tokenizer's setting).
        qk_norm: LayerNorm over D on queries and keys before the dot product.
        norm_eps: epsilon of the q/k LayerNorms (1e-6 in LaBraM).
        attn_drop: dropout on attention probabilities (training only; the reference backend
            of the fused op is used when this is > 0).
        proj_drop: dropout after the output projection.
        backend: backend of the fused op (None = automatic, see :mod:`eegfast.ops`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        *,
        norm_eps: float = 1e-6,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        # A module, as in timm and the reference LaBraM, so code that sets dropout rates by
        # walking model.modules() reaches it; the kernel takes its p (it never calls it).
        self.attn_drop = nn.Dropout(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **factory)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim, **factory))
            self.v_bias = nn.Parameter(torch.zeros(dim, **factory))
        else:
            self.q_bias = self.v_bias = None
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps, **factory)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps, **factory)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, qkv_bias={self.q_bias is not None}, "
            f"qk_norm={self.q_norm is not None}, backend={self.backend}"
        )

    def _qkv_bias(self) -> torch.Tensor | None:
        return labram_qkv_bias(self.q_bias, self.v_bias)

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> q, k, v side by side (B, N, 3·dim), LaBraM's bias included.

        A replaced or hooked ``qkv`` (a LoRA adapter, a feature hook) is called, as ``proj``
        is; it has no bias of its own, so ``[q_bias | 0 | v_bias]`` is added to its output.
        """
        if linear_call_fusable(self.qkv):
            return fused_linear(x, self.qkv.weight, self._qkv_bias())
        qkv = self.qkv(x)
        return qkv if self.q_bias is None else qkv + self._qkv_bias()

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        block_causal: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim).

        key_padding_mask: (B, N) bool, True = padding token (ignored as a key).
        causal / block_causal: as in :func:`eegfast.ops.qk_norm_attention`.
        residual (B, N, dim) / scale (dim,): return ``residual + scale ⊙ attn(x)`` instead,
        fused into the output projection where :func:`~eegfast.nn.linear.fused_linear`
        can (a pre-norm block's residual branch with layer scale).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape (B, N, dim) with last dim dim = {self.dim}, "
                f"got {tuple(x.shape)}"
            )
        B, N, C = x.shape
        qkv = self.qkv_projection(x)  # (B, N, 3·H·D)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.q_norm is not None:
            out = qk_norm_attention_packed(
                qkv,
                self.num_heads,
                self.q_norm.weight,
                self.q_norm.bias,
                self.k_norm.weight,
                self.k_norm.bias,
                eps=self.q_norm.eps,
                scale=self.scale,
                key_padding_mask=key_padding_mask,
                causal=causal,
                block_causal=block_causal,
                dropout_p=dropout_p,
                backend="reference" if dropout_p > 0 else self.backend,
            )
        else:
            q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            visible = attention_visibility(
                B,
                N,
                key_padding_mask=key_padding_mask,
                causal=causal,
                block_causal=block_causal,
                device=x.device,
            )
            if key_padding_mask is not None:
                # padding keys are ignored whatever they hold, as by the fused op: their weight
                # is 0, but 0 times a NaN or inf key or value is NaN (the whole sample's output)
                padded = key_padding_mask[:, None, :, None]  # (B, 1, N, 1)
                k, v = torch.where(padded, 0, k), torch.where(padded, 0, v)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, dropout_p=dropout_p, scale=self.scale
            )
            if visible is not None:  # rows that see no key: zeros, as the fused op
                out = out.masked_fill(~visible.any(-1, keepdim=True), 0.0)
            out = out.transpose(1, 2).reshape(B, N, C)
        if (self.training and self.proj_drop.p > 0) or not linear_call_fusable(self.proj):
            # a replaced or hooked proj (LoRA, a feature hook) is called, as the reference does
            return scaled_residual(self.proj_drop(self.proj(out)), scale, residual)
        return fused_linear(out, self.proj.weight, self.proj.bias, scale=scale, residual=residual)
