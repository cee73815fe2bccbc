"""Transformer layers of LaBraM: MLP, pre-norm block with layer scale, patch embeddings."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from eegfast.nn.attention import QKNormAttention
from eegfast.nn.linear import fused_linear, has_call_hooks, linear_call_fusable, scaled_residual
from eegfast.nn.moe import MoEAux, MoEFFN


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability ``p``."""
    if p == 0.0 or not training:
        return x
    # the scale in at least float32: in bf16, 1 / (1 - p) itself rounds (1 / 0.9 -> 1.109375)
    # and would shrink every kept sample; this way each element is x / (1 - p) rounded once
    scale = _sample_keep_scale(x, p, torch.promote_types(x.dtype, torch.float32))
    return (x * scale).to(x.dtype)


def _sample_keep_scale(x: torch.Tensor, p: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, ..., 1) in ``dtype`` (default x's): 0 for a dropped sample, 1 / (1 - p) for a
    kept one (stochastic depth)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_path must be a probability in [0, 1], got {p!r}")
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    if keep == 0.0:  # every sample dropped (as timm); 0 / 0 had made the whole batch NaN
        return x.new_zeros(shape, dtype=dtype)
    return x.new_empty(shape, dtype=dtype).bernoulli_(keep).div_(keep)


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2 (keys ``fc1.*``, ``fc2.*`` as the reference).

    ``forward(x, task_id=None, padding_mask=None)`` takes ``task_id`` and the token padding
    mask so that a (task-routed) MoE FFN can replace ``Block.mlp`` without changing the block;
    a dense MLP ignores both (it is per token: padding cannot affect the other tokens).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        out_dim: int | None = None,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim, **factory)
        self.drop = nn.Dropout(drop)

    def forward(
        self,
        x: torch.Tensor,
        task_id: torch.Tensor | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (..., dim) -> (..., out_dim); with ``residual`` (..., out_dim) and/or ``scale``
        (out_dim,): ``residual + scale ⊙ mlp(x)``, fused into fc2 where
        :func:`~eegfast.nn.linear.fused_linear` can."""
        # Through the weights only where that is what calling the modules does: a replaced or
        # hooked fc1 / act / fc2 (a LoRA adapter, a quantized Linear, a feature hook) is called.
        exact_gelu = type(self.act) is nn.GELU and self.act.approximate == "none"
        if exact_gelu and linear_call_fusable(self.fc1) and not has_call_hooks(self.act):
            h = fused_linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
        else:
            h = self.act(self.fc1(x))
        if (self.training and self.drop.p > 0) or not linear_call_fusable(self.fc2):
            return scaled_residual(self.drop(self.fc2(self.drop(h))), scale, residual)
        return fused_linear(h, self.fc2.weight, self.fc2.bias, scale=scale, residual=residual)


@functools.cache
def _forward_takes_padding_mask(forward) -> bool:
    """Whether an MLP ``forward`` function has a ``padding_mask`` (or ``**kwargs``) parameter."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "padding_mask" or p.kind is p.VAR_KEYWORD for p in params)


def _takes_padding_mask(mlp: nn.Module) -> bool:
    """Whether ``Block.mlp`` takes the token padding mask: an :class:`~eegfast.nn.MoEFFN` does
    (a constant under torch.compile); the dense :class:`Mlp` has no use for it; a replacement
    module gets it if its ``forward`` names ``padding_mask``."""
    forward = type(mlp).forward
    if forward is MoEFFN.forward:
        return True
    if forward is Mlp.forward:
        return False
    return _forward_takes_padding_mask(forward)


class Block(nn.Module):
    """Pre-norm transformer block: ``x += γ1·attn(LN(x)); x += γ2·mlp(LN(x))``.

    Layer scale γ (``gamma_1``, ``gamma_2``) exists only when ``init_values`` > 0 (the
    backbone: 0.1; the tokenizer has none). Drop path applies to both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        init_values: float | None = 0.1,
        drop_path: float = 0.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.attn = QKNormAttention(
            dim,
            num_heads,
            qkv_bias,
            qk_norm,
            norm_eps=norm_eps,
            attn_drop=attn_drop,
            proj_drop=drop,
            backend=backend,
            **factory,
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, **factory)
        if not 0.0 <= drop_path <= 1.0:  # a negative rate had silently meant none
            raise ValueError(f"drop_path must be a probability in [0, 1], got {drop_path!r}")
        self.drop_path = drop_path
        if init_values is not None and init_values > 0:  # as documented (and the reference)
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values), **factory))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values), **factory))
        else:
            self.gamma_1 = self.gamma_2 = None

    def extra_repr(self) -> str:
        return f"layer_scale={self.gamma_1 is not None}, drop_path={self.drop_path}"

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        block_causal: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, MoEAux | None]:
        """x: (B, N, dim) -> (B, N, dim); masks as in :class:`QKNormAttention`.

        ``key_padding_mask`` (B, N) (True = padding token) also goes to an MLP that takes a
        ``padding_mask`` (an MoE FFN: padding tokens are not routed and stay out of its aux
        losses); a dense MLP, per token, needs none.

        ``return_aux``: return ``(x, aux)``, aux the :class:`~eegfast.nn.MoEAux` of an MoE
        FFN without hooks, which then does not store it in its ``last_aux`` (None for any
        other MLP, which behaves as without it). For an activation-checkpointed region, in
        which torch.compile refuses that write: the caller sets ``last_aux`` outside it."""
        masks = dict(key_padding_mask=key_padding_mask, causal=causal, block_causal=block_causal)
        mlp_kwargs: dict = {"task_id": task_id}
        if key_padding_mask is not None and _takes_padding_mask(self.mlp):
            mlp_kwargs["padding_mask"] = key_padding_mask
        # (a hooked MoE keeps its tensor output, which its hooks expect, and stores its aux)
        aux_out = return_aux and type(self.mlp).forward is MoEFFN.forward
        aux_out = aux_out and not has_call_hooks(self.mlp)
        if aux_out:
            mlp_kwargs["return_aux"] = True
        aux = None
        if self.drop_path > 0.0 and self.training:
            x = self._dropped_residual(x, self.attn(self.norm1(x), **masks), self.gamma_1)
            m = self.mlp(self.norm2(x), **mlp_kwargs)
            if aux_out:
                m, aux = m
            x = self._dropped_residual(x, m, self.gamma_2)
            return (x, aux) if return_aux else x
        # Residual and layer scale go into the output projections (one pass each, fused into
        # the GEMM on CPU inference, see eegfast.nn.linear); not into a hooked module's output,
        # which its hooks must see as the branch alone (an ablation hook returning zeros had
        # zeroed the whole residual stream).
        attn, mlp = self.attn, self.mlp
        if type(attn).forward is QKNormAttention.forward and not has_call_hooks(attn):
            x = attn(self.norm1(x), **masks, residual=x, scale=self.gamma_1)
        else:  # a replaced or hooked attention
            x = scaled_residual(attn(self.norm1(x), **masks), self.gamma_1, x)
        if type(mlp).forward is Mlp.forward and not has_call_hooks(mlp):
            x = mlp(self.norm2(x), residual=x, scale=self.gamma_2)
        else:
            m = mlp(self.norm2(x), **mlp_kwargs)
            if aux_out:
                m, aux = m
            x = scaled_residual(m, self.gamma_2, x)
        return (x, aux) if return_aux else x

    def _dropped_residual(self, x: torch.Tensor, branch: torch.Tensor, gamma) -> torch.Tensor:
        """x + drop_path(γ·branch) (training with stochastic depth), as one pass over the
        (B, N, dim) activations: the per-sample keep scale and γ make a (B, 1, dim) factor
        (the composition took four: γ·branch, the mask, the rescale, the add; their backward
        as many again)."""
        # in the result's dtype: a bf16 branch (autocast) beside a float32 residual would round
        # 1 / (1 - p) (1 / 0.9 -> 1.109375), shrinking every kept branch against inference
        dtype = torch.promote_types(x.dtype, branch.dtype)
        if gamma is not None:
            dtype = torch.promote_types(dtype, gamma.dtype)
        factor = _sample_keep_scale(branch, self.drop_path, dtype)
        if gamma is not None:
            factor = factor * gamma
        return torch.addcmul(x, factor, branch)


def as_weight_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x cast to the dtype of a patch embedding's ``weight`` (the model's dtype).

    A model's input is cast as :func:`eegfast.models.hybrid.generate` casts its prompt, so a
    float64 signal runs through a float32 model (and a float32 one through a bfloat16 model)
    instead of failing deep in the convolution with "Input type (double) and bias type
    (float) should be the same". A non-floating x (integer or bool) is refused by name: it
    is not a signal in units of 100 µV.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"x must be a floating-point signal (units of 100 µV; the model is "
            f"{weight.dtype}), got {x.dtype}"
        )
    return x.to(weight.dtype)


def masked_group_norm(
    x: torch.Tensor, norm: nn.GroupNorm, valid: torch.Tensor | None
) -> torch.Tensor:
    """GroupNorm of x (B, K, P, T) whose statistics pool only over valid patches.

    valid: (B, P) bool (True = real patch) or None (plain GroupNorm over all P patches, the
    reference). Padded patches are normalised with the valid patches' statistics; their values
    are ignored downstream.
    """
    if valid is None:
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    B, K, P, T = x.shape
    G = norm.num_groups
    # statistics in at least fp32 (half-precision sums lose the small patches' share), but
    # never below x's own precision: a float64 model must stay float64
    grouped = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(B, G, K // G, P, T)
    # where, not a product with 0: a NaN or inf in a padded patch (0 · NaN = NaN) had made
    # the whole sample's statistics, so every patch of it, NaN
    keep = valid.to(torch.bool)[:, None, None, :, None]
    count = (valid.sum(1).to(grouped.dtype) * (K // G) * T).clamp_min(1)[:, None, None, None, None]
    mean = torch.where(keep, grouped, 0.0).sum((2, 3, 4), keepdim=True) / count
    centred = grouped - mean
    var = torch.where(keep, centred.square(), 0.0).sum((2, 3, 4), keepdim=True) / count
    out = (centred * torch.rsqrt(var + norm.eps)).reshape(B, K, P, T).to(x.dtype)
    return out * norm.weight[:, None, None] + norm.bias[:, None, None]


class TemporalConv(nn.Module):
    """LaBraM's patch embedding: three Conv → GroupNorm → GELU blocks over each 200-sample patch.

    conv1: 1 → k channels, kernel 15, stride 8, padding 7 (200 → 25 steps); conv2, conv3: k → k,
    kernel 3, padding 1. GroupNorm(4 groups) statistics pool over all C·A patches of a sample
    (so one patch's embedding depends on the whole sample), over the non-padded ones when a
    padding mask is given. Output features are ordered time-major: index t·k + channel.
    """

    def __init__(
        self,
        out_chans: int = 8,
        *,
        num_groups: int = 4,
        patch_size: int = 200,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if out_chans % num_groups != 0:
            raise ValueError(f"out_chans ({out_chans}) must be divisible by {num_groups} groups")
        factory = {"device": device, "dtype": dtype}
        self.out_chans, self.patch_size = out_chans, patch_size
        self.conv1 = nn.Conv2d(1, out_chans, (1, 15), (1, 8), (0, 7), **factory)
        self.norm1 = nn.GroupNorm(num_groups, out_chans, **factory)
        self.conv2 = nn.Conv2d(out_chans, out_chans, (1, 3), padding=(0, 1), **factory)
        self.norm2 = nn.GroupNorm(num_groups, out_chans, **factory)
        self.conv3 = nn.Conv2d(out_chans, out_chans, (1, 3), padding=(0, 1), **factory)
        self.norm3 = nn.GroupNorm(num_groups, out_chans, **factory)
        self.steps = (patch_size + 2 * 7 - 15) // 8 + 1
        self.embed_dim = self.steps * out_chans

    def extra_repr(self) -> str:
        return f"out_chans={self.out_chans}, embed_dim={self.embed_dim}"

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, A, T) patches -> (B, C·A, steps·k) tokens, electrode-major.

        padding_mask: (B, C·A) bool, True = padded patch (left out of the GroupNorm statistics).
        A floating x of another dtype is cast to the weights' (see :func:`as_weight_dtype`).
        """
        B, C, A, T = x.shape
        x = as_weight_dtype(x, self.conv1.weight)
        valid = None if padding_mask is None else ~padding_mask
        if torch.compiler.is_compiling():
            # conv1 (kernel 1 × 15) with every patch a sample of its own, the same products: the
            # (B, 1, C·A, T) view strides batches by T·C·A and patches by T, and inductor orders
            # the strides of a view it keeps for the backward (or passes to a kernel) without
            # the shapes' ranges: once C and A were both dynamic "T·C·A < T" was undecidable and
            # the compile failed ("cannot determine truth value of Relational") at the third
            # electrode set / window length of a run. (B·C·A, 1, 1, T) strides are all constant.
            h = self.conv1(x.reshape(B * C * A, 1, 1, T))  # (B·C·A, k, 1, steps)
            h = h.reshape(B, C * A, self.out_chans, -1).transpose(1, 2)  # (B, k, C·A, steps)
        else:
            h = self.conv1(x.reshape(B, 1, C * A, T))
        h = F.gelu(masked_group_norm(h, self.norm1, valid))
        for conv, norm in ((self.conv2, self.norm2), (self.conv3, self.norm3)):
            h = F.gelu(masked_group_norm(conv(h), norm, valid))
        return h.permute(0, 2, 3, 1).reshape(B, C * A, self.embed_dim)  # (B, P, steps·k)


class CodePatchEmbed(nn.Module):
    """Linear embedding of per-patch vectors (the tokenizer decoder's input, codes of dim F).

    Holds the weight as the reference's 1×1 ``Conv2d`` (``proj.weight`` (E, F, 1, 1)) for
    state-dict compatibility and applies it as a Linear.
    """

    def __init__(self, in_dim: int, embed_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, embed_dim, 1, device=device, dtype=dtype)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, A, F) -> (B, C·A, E). padding_mask is accepted for symmetry and unused."""
        B, C, A, F_in = x.shape  # (F_in, not -1, in the reshape: B = 0 leaves -1 undefined)
        x = as_weight_dtype(x, self.proj.weight)
        return F.linear(x.reshape(B, C * A, F_in), self.proj.weight.flatten(1), self.proj.bias)
