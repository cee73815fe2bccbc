"""Masked + autoregressive ("hybrid") pretraining on the LaBraM backbone, and EEG generation.

One backbone, two passes per batch:

* **masked**: the ordinary LaBraM masked-EEG-modelling loss of the wrapped pretraining model
  (symmetric masking, VQ-NSP code targets).
* **autoregressive (forecasting)**: the same student backbone runs unmasked with a block-causal
  attention mask whose blocks are time patches, and a small forecasting head predicts, from the
  output of electrode ``c`` at patch ``a``, the VQ-NSP code of patch ``a + 1`` of the same
  electrode (cross-entropy) and/or its 200 samples (mean squared error).

``loss = λ·masked + (1 − λ)·autoregressive``; both parts are returned for logging.

Block ids (the ``block_causal`` argument of :func:`eegfast.ops.qk_norm_attention`): token order
is electrode-major, token ``1 + c·A + a`` for electrode ``c`` and patch ``a``. The cls token gets
block id 0 and patch ``a`` gets id ``a + 1``, so every token sees the cls token and all electrodes
of its own and earlier patches, and the cls token sees only itself (it is a constant start token;
its output is never used for forecasting). With this rule the cached keys/values of a prefix do
not change when patches are appended, which is what makes key/value caching exact.

Causality of the patch embedding: LaBraM's ``TemporalConv`` pools its GroupNorm statistics over
all C·A patches of a sample, so an early patch's embedding would depend on later patches. The
forecasting pass therefore embeds each time patch on its own (statistics over the C electrodes of
that patch only; same weights). The masked pass keeps the reference behaviour.

Checkpoint layout: the wrapped pretraining model's children are registered under their own
names (``student.*``, ``lm_head.*``, ...), and the forecasting head under ``forecast_head.*``,
so a hybrid checkpoint has exactly the keys of a masked-pretraining checkpoint plus
``forecast_head.*`` and fine-tunes through the same key mapping.

Generation (:func:`generate`) continues a (B, C, A, 200) prompt patch by patch. Each new patch is
either drawn from the token head (temperature / top-k sampling, then the signal head conditioned
on the drawn code) or taken from the plain regression head. With ``use_cache=True`` the
LayerNorm'ed keys and the values of every block are cached, and a new patch's C tokens attend to
the cache plus themselves with ``torch.nn.functional.scaled_dot_product_attention``; without
the cache the whole context is re-encoded by the block-causal forward at every step. The time
embedding has a fixed number of rows (16 in LaBraM), so the context is a window: when it is full
it is cut to its last ``keep`` patches and re-encoded (the same rule in both paths, so they give
the same result).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eegfast.models.labram import (
    _check_signal,
    check_channel_padding_mask,
    token_padding_mask,
    zero_padded_electrodes,
)
from eegfast.nn.linear import has_call_hooks
from eegfast.nn.losses import linear_cross_entropy

__all__ = [
    "create_hybrid_model",
    "hybrid_config_from_state_dict",
    "load_hybrid_model",
    "ForecastHead",
    "HybridConfig",
    "HybridOutput",
    "HybridPretrainModel",
    "KVCache",
    "forecast_features",
    "generate",
    "patch_block_ids",
    "sample_codes",
]


# --------------------------------------------------------------------------------------------
# Configuration and outputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HybridConfig:
    """Settings of the hybrid objective.

    Args:
        mask_weight: λ in ``λ·masked + (1 − λ)·autoregressive``, in [0, 1].
        predict_tokens: forecast the next patch's VQ-NSP code (needs tokenizer targets).
        predict_signal: forecast the next patch's samples (regression head; needed to generate).
        signal_weight: weight of the signal MSE inside the autoregressive loss.
        vocab_size: number of VQ-NSP codes; None = the masked model's ``config.vocab_size``.
        patch_size: samples per patch of the signal head: None or the backbone's
            ``config.patch_size`` (200), which it forecasts.
    """

    mask_weight: float = 0.5
    predict_tokens: bool = True
    predict_signal: bool = True
    signal_weight: float = 1.0
    vocab_size: int | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_weight <= 1.0:
            raise ValueError(f"mask_weight (λ) must be in [0, 1], got {self.mask_weight}")
        if not (self.predict_tokens or self.predict_signal):
            raise ValueError("at least one of predict_tokens / predict_signal must be True")
        if self.signal_weight < 0:
            raise ValueError(f"signal_weight must be >= 0, got {self.signal_weight}")


@dataclass
class HybridOutput:
    """Losses of one hybrid step (scalars; ``loss`` carries the graph).

    ``masked_loss`` / ``ar_loss`` are the two parts before weighting; ``ar_token_loss`` and
    ``ar_signal_loss`` are the parts of ``ar_loss`` (None when that head is off).
    """

    loss: torch.Tensor
    masked_loss: torch.Tensor
    ar_loss: torch.Tensor
    ar_token_loss: torch.Tensor | None = None
    ar_signal_loss: torch.Tensor | None = None
    ar_token_accuracy: torch.Tensor | None = None
    masked_accuracy: torch.Tensor | None = None

    def scalar_tensors(self) -> dict[str, torch.Tensor]:
        """Every loss/accuracy, detached, where it was computed (no wait for the device)."""
        names = (
            "loss",
            "masked_loss",
            "ar_loss",
            "ar_token_loss",
            "ar_signal_loss",
            "ar_token_accuracy",
            "masked_accuracy",
        )
        values = {name: getattr(self, name) for name in names}
        return {name: value.detach() for name, value in values.items() if value is not None}

    def scalars(self) -> dict[str, float]:
        """Every loss/accuracy as a float, for logging."""
        return {name: float(value) for name, value in self.scalar_tensors().items()}


# --------------------------------------------------------------------------------------------
# Block-causal forecasting pass over the student backbone
# --------------------------------------------------------------------------------------------


def patch_block_ids(
    num_electrodes: int, num_patches: int, *, first_patch: int = 0, device=None
) -> torch.Tensor:
    """Block ids (1 + C·A,) int32 of the cls + electrode-major tokens: cls 0, patch a -> a + 1.

    ``first_patch`` offsets the patch index (ids of a chunk of patches appended to a cache).
    """
    # int32: what the Triton kernels compare (int64 ids would be ranked on every call)
    patches = torch.arange(first_patch + 1, first_patch + num_patches + 1, device=device,
                           dtype=torch.int32)  # fmt: skip
    ids = patches.repeat(num_electrodes)  # token c·A + a -> a + 1 (electrode-major)
    return torch.cat((torch.zeros(1, dtype=ids.dtype, device=device), ids))


def _patch_tokens(student: nn.Module, x: torch.Tensor, padding: torch.Tensor | None):
    """Per-time-patch patch embedding: x (B, C, A, T) -> (B, C·A, E), electrode-major.

    Each time patch is embedded on its own so GroupNorm statistics never mix time patches.
    padding: (B, C) bool, True = padded electrode.
    """
    B, C, A, T = x.shape
    per_patch = x.transpose(1, 2).reshape(B * A, C, 1, T)
    mask = None if padding is None else padding.repeat_interleave(A, dim=0)  # (B·A, C·1)
    tokens = student.patch_embed(per_patch, mask)  # (B·A, C, E)
    E = tokens.shape[-1]  # not -1 in the reshapes: an empty batch (B = 0) made it ambiguous
    return tokens.reshape(B, A, C, E).transpose(1, 2).reshape(B, C * A, E)


def embed_tokens(
    student: nn.Module,
    x: torch.Tensor,
    input_chans,
    *,
    channel_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal token embeddings (B, 1 + C·A, E) of a window x (B, C, A, T), time rows 0..A-1:
    per-time-patch patch embedding, then the student's own cls/spatial/time embedding."""
    B, C, A, _ = x.shape
    x = zero_padded_electrodes(x, channel_padding_mask)
    chans = student.resolve_input_chans(input_chans, C, x.device, batch=B)
    patches = _patch_tokens(student, x, channel_padding_mask)
    return student.embed_patches(patches, C, chans)


def embed_next_patch(
    student: nn.Module,
    patch: torch.Tensor,
    input_chans,
    time_row: int,
    *,
    channel_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens (B, C, E) of one patch (B, C, T) at time-embedding row ``time_row`` (no cls).

    The same sums as :meth:`embed_patches` for that patch of a window (eval: no dropout).
    channel_padding_mask: (B, C) bool, True = padded electrode (left out of the statistics).
    """
    B, C, _ = patch.shape
    if not 0 <= time_row < student.time_embed.shape[1]:
        raise ValueError(f"time_row must be in [0, {student.time_embed.shape[1]}), got {time_row}")
    patch = zero_padded_electrodes(patch, channel_padding_mask)
    chans = student.resolve_input_chans(input_chans, C, patch.device, batch=B)
    tokens = _patch_tokens(student, patch[:, :, None], channel_padding_mask)  # (B, C, E)
    rows = student.pos_embed[0][chans]  # (C+1, E) or (B, C+1, E)
    if rows.dim() == 2:
        rows = rows.unsqueeze(0)
    return tokens + rows[:, 1:] + student.time_embed[0, time_row]


def check_causal_routing(student: nn.Module) -> None:
    """ValueError unless every MoE layer of ``student``'s blocks is dropless.

    A capacity limit (``capacity_factor``) sizes the experts' slots by all tokens of the pass
    and fills them in token order, so a later patch could push an earlier patch's token out of
    an expert: its features would depend on the future, which the block-causal pass and the
    exact KV cache of generation promise they do not.
    """
    for i, block in enumerate(getattr(student, "blocks", ())):
        capacity = getattr(getattr(block, "mlp", None), "capacity_factor", None)
        if capacity is not None:
            raise ValueError(
                f"blocks[{i}].mlp has capacity_factor={capacity}: the hybrid's block-causal "
                "passes need dropless MoE layers (a capacity limit lets later patches take "
                "earlier patches' expert slots); upcycle with capacity_factor=None"
            )


def forecast_features(
    student: nn.Module,
    x: torch.Tensor,
    input_chans=None,
    *,
    channel_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-causal pass of the student: x (B, C, A, T) or (B, C, A·T) -> normed patch
    features (B, C, A, E).

    Output (c, a) depends only on patches 0..a (all electrodes) of x.
    channel_padding_mask: (B, C) bool, True = padded electrode (ignored as a key).
    """
    # checked as the models check x: a (B, C, A·T) signal failed with "not enough values to
    # unpack", and patches of another length deep in the patch embedding's reshape
    x = _check_signal(x, student.config.patch_size)
    B, C, A, _ = x.shape
    check_causal_routing(student)
    h = embed_tokens(student, x, input_chans, channel_padding_mask=channel_padding_mask)
    ids = patch_block_ids(C, A, device=x.device)
    key_padding = None
    if channel_padding_mask is not None:
        key_padding = torch.cat(
            (
                torch.zeros(B, 1, dtype=torch.bool, device=x.device),
                channel_padding_mask.to(x.device).bool().repeat_interleave(A, dim=1),
            ),
            dim=1,
        )
    # (the trunk's own loop: checkpointed per block if enabled, an MoE layer's aux values
    # stored outside the checkpointed region, which torch.compile needs to keep one graph)
    h = student.run_blocks(h, key_padding_mask=key_padding, block_causal=ids)
    h = student.norm(h)
    return h[:, 1:].reshape(B, C, A, h.shape[-1])


# --------------------------------------------------------------------------------------------
# Forecasting head
# --------------------------------------------------------------------------------------------


class ForecastHead(nn.Module):
    """Next-patch heads over features h (..., E).

    * ``token``: Linear(E, vocab) -> logits of the next patch's code.
    * ``signal``: MLP(E -> E -> patch_size) of the next patch's samples, from h alone
      (regression: the conditional mean) or from ``h + code_embed[code]`` (the samples given a
      code, used after drawing a code). Both are trained: the conditioned one with the true
      next code (teacher forcing).
    """

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        patch_size: int,
        *,
        predict_tokens: bool = True,
        predict_signal: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim, self.vocab_size, self.patch_size = dim, vocab_size, patch_size
        self.token = nn.Linear(dim, vocab_size, **factory) if predict_tokens else None
        self.code_embed = (
            nn.Embedding(vocab_size, dim, **factory) if predict_tokens and predict_signal else None
        )
        if predict_signal:
            self.signal = nn.Sequential(
                nn.Linear(dim, dim, **factory), nn.GELU(), nn.Linear(dim, patch_size, **factory)
            )
        else:
            self.signal = None
        if self.code_embed is not None:
            nn.init.normal_(self.code_embed.weight, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, vocab_size={self.vocab_size}, patch_size={self.patch_size}, "
            f"tokens={self.token is not None}, signal={self.signal is not None}"
        )

    def token_layer(self) -> nn.Linear:
        """The token head's Linear(E, vocab)."""
        if self.token is None:
            raise RuntimeError("this model has no token head (predict_tokens=False)")
        return self.token

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.token_layer()(h)

    def samples(self, h: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(..., E) [+ codes (...)] -> (..., patch_size)."""
        if self.signal is None:
            raise RuntimeError("this model has no signal head (predict_signal=False)")
        if codes is not None:
            if self.code_embed is None:
                raise RuntimeError("this model's signal head is not conditioned on codes")
            h = h + self.code_embed(codes)
        return self.signal(h)


# --------------------------------------------------------------------------------------------
# The hybrid pretraining model
# --------------------------------------------------------------------------------------------


class HybridPretrainModel(nn.Module):
    """Masked + forecasting pretraining around a LaBraM pretraining model.

    Args:
        masked_model: the masked-modelling pretraining model (``forward(x, input_chans, targets,
            mask=None, ...)`` with ``.loss`` and ``.accuracy``, and a ``.student`` backbone).
            Its children are registered here under their own names (shared, not copied), so
            the state dict is the masked model's plus ``forecast_head.*``.
        config: :class:`HybridConfig`.
    """

    def __init__(
        self,
        masked_model: nn.Module,
        config: HybridConfig = HybridConfig(),
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if (
            next(masked_model.named_parameters(recurse=False), None) is not None
            or next(masked_model.named_buffers(recurse=False), None) is not None
        ):
            raise ValueError("masked_model must keep its parameters inside child modules")
        for name, child in masked_model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_masked", masked_model)  # not a child: no duplicate keys
        student = masked_model.student
        masked_config = getattr(masked_model, "config", None)
        if config.vocab_size is None:
            vocab_size = getattr(masked_config, "vocab_size", None)
            if vocab_size is None:
                # a masked model of the documented interface need not carry a config: an
                # AttributeError on None named neither the model nor the missing setting
                raise ValueError(
                    "config.vocab_size: required when masked_model has no config.vocab_size "
                    f"to take it from ({type(masked_model).__name__})"
                )
            config = dataclasses.replace(config, vocab_size=int(vocab_size))
        if config.patch_size is None:
            config = dataclasses.replace(config, patch_size=int(student.config.patch_size))
        elif config.patch_size != student.config.patch_size:
            # the signal head's output is compared with (and generates) the backbone's patches:
            # any other size fails in the loss, or (patch_size=1) broadcasts against them
            raise ValueError(
                f"hybrid patch_size must be the backbone's patch_size "
                f"({student.config.patch_size}) or None, got {config.patch_size}"
            )
        self.config = config
        dim = student.cls_token.shape[-1]
        if device is None:
            device = student.cls_token.device
        if dtype is None:
            dtype = student.cls_token.dtype
        self.forecast_head = ForecastHead(
            dim,
            config.vocab_size,
            config.patch_size,
            predict_tokens=config.predict_tokens,
            predict_signal=config.predict_signal,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return f"mask_weight={self.config.mask_weight}"

    def train(self, mode: bool = True):  # keep the unregistered wrapper's flag in step
        super().train(mode)
        self._masked.training = mode
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (both the masked and forecasting passes)."""
        self.backbone.set_grad_checkpointing(enable)

    @property
    def backbone(self) -> nn.Module:
        return self._masked.student

    @property
    def max_patches(self) -> int:
        return int(self.backbone.time_embed.shape[1])

    def forecast_losses(
        self,
        x: torch.Tensor,
        input_chans: torch.Tensor | None,
        targets: torch.Tensor | None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Next-patch losses of x (B, C, A, T) or (B, C, A·T), as the masked model takes it;
        targets (B, C·A) integer codes, electrode-major (-1 = no code)."""
        x = _check_signal(x, self.backbone.config.patch_size)
        B, C, A, T = x.shape
        if A < 2:
            raise ValueError(f"forecasting needs at least 2 patches per sample, got A={A}")
        if targets is not None:
            # as the masked model checks them (any integer dtype: the token loss needs int64);
            # with mask_weight 0 nothing else does
            if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
                raise ValueError(f"targets must be integer code indices, got {targets.dtype}")
            if tuple(targets.shape) != (B, C * A):
                raise ValueError(
                    f"targets must have shape (B, C·A) = {(B, C * A)}, got {tuple(targets.shape)}"
                )
            targets = targets.long()
        # the signal targets below are weighted by 0 where padded, and NaN·0 = NaN
        x = zero_padded_electrodes(x, channel_padding_mask)
        h = forecast_features(
            self.backbone, x, input_chans, channel_padding_mask=channel_padding_mask
        )
        h = h[:, :, :-1]  # (B, C, A-1, E): patch a predicts patch a + 1
        # Means over the valid positions as weighted sums (no boolean indexing: on a GPU that
        # waits for the device, and under torch.compile it makes shapes data-dependent), in at
        # least float32 and never below the features' precision (a float64 model's losses
        # were rounded to float32).
        dtype = torch.promote_types(h.dtype, torch.float32)
        real = torch.ones(B, C, A - 1, device=x.device, dtype=dtype)
        if channel_padding_mask is not None:
            real = real * (~channel_padding_mask.to(x.device).bool()).to(dtype)[:, :, None]
        weight = real / real.sum().clamp_min(1)  # (B, C, A-1), sums to 1
        head, out = self.forecast_head, {}
        next_codes = None
        if self.config.predict_tokens:
            if targets is None:
                raise ValueError("predict_tokens needs tokenizer targets (B, C·A)")
            next_codes = targets.reshape(B, C, A)[:, :, 1:]
            # -1: no code (padding, or a patch the tokenizer could not code): weight 0 in the
            # token terms (it was trained as code 0); no host-side check (a GPU sync)
            coded = real * (next_codes >= 0).to(dtype)
            code_weight = coded / coded.sum().clamp_min(1)
            next_codes = next_codes.clamp_min(0)
            layer = head.token_layer()
            token = linear_cross_entropy(
                h.flatten(0, 2),
                layer.weight,
                layer.bias,
                next_codes.flatten(),
                code_weight.flatten(),
            )
            out["ar_token_loss"] = token.loss
            out["ar_token_accuracy"] = (token.correct.to(dtype) * code_weight.flatten()).sum()
        if self.config.predict_signal:
            next_x = x[:, :, 1:].to(dtype)

            def mean_squared_error(predicted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                return ((predicted.to(dtype) - next_x).pow(2).mean(-1) * weight).sum()

            loss = mean_squared_error(head.samples(h), weight)
            if next_codes is not None:
                conditioned = mean_squared_error(head.samples(h, next_codes), code_weight)
                loss = 0.5 * (loss + conditioned)
            out["ar_signal_loss"] = loss
        ar = torch.zeros((), device=x.device, dtype=dtype)
        if "ar_token_loss" in out:
            ar = ar + out["ar_token_loss"]
        if "ar_signal_loss" in out:
            ar = ar + self.config.signal_weight * out["ar_signal_loss"]
        out["ar_loss"] = ar
        return out

    def forward(
        self,
        x: torch.Tensor,
        input_chans: torch.Tensor | None,
        targets: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        **masked_kwargs,
    ) -> HybridOutput:
        """x (B, C, A, 200) or (B, C, A·200), input_chans (C + 1,) or (B, C + 1), targets
        (B, C·A) integer codes (-1 = no code).

        ``mask`` and ``masked_kwargs`` go to the masked model unchanged.
        """
        lam = self.config.mask_weight
        if lam > 0:
            masked_out = self._masked(
                x,
                input_chans,
                targets,
                mask,
                channel_padding_mask=channel_padding_mask,
                **masked_kwargs,
            )
            masked_loss, masked_acc = masked_out.loss, getattr(masked_out, "accuracy", None)
        else:
            masked_loss, masked_acc = torch.zeros((), device=x.device), None
        ar = (
            self.forecast_losses(x, input_chans, targets, channel_padding_mask=channel_padding_mask)
            if lam < 1
            else {"ar_loss": torch.zeros((), device=x.device)}
        )
        loss = lam * masked_loss + (1.0 - lam) * ar["ar_loss"]
        return HybridOutput(
            loss=loss,
            masked_loss=masked_loss.detach(),
            ar_loss=ar["ar_loss"].detach(),
            ar_token_loss=_detached(ar.get("ar_token_loss")),
            ar_signal_loss=_detached(ar.get("ar_signal_loss")),
            ar_token_accuracy=_detached(ar.get("ar_token_accuracy")),
            masked_accuracy=_detached(masked_acc if isinstance(masked_acc, torch.Tensor) else None),
        )


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


# --------------------------------------------------------------------------------------------
# Key/value cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Per-block LayerNorm'ed keys and values, (B, H, capacity, D) each, filled up to ``length``.

    ``key_padding``: (B, length) bool, True = a padded electrode's token (never attended), or
    None when no electrode is padded.
    """

    def __init__(
        self,
        num_blocks: int,
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        *,
        device,
        dtype,
    ) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.capacity, self.length = capacity, 0
        self.key_padding: torch.Tensor | None = None

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, n, D) after the cached tokens; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def _attention_step(
    attn: nn.Module, x: torch.Tensor, cache: KVCache, layer: int, visible: torch.Tensor | None
) -> torch.Tensor:
    """QKNormAttention over cache + new tokens: x (B, n, dim) normed input -> (B, n, dim)."""
    B, n, dim = x.shape
    H, D = attn.num_heads, attn.head_dim
    # the attention's own projection: a replaced or hooked qkv (a LoRA adapter, a feature
    # hook) is called, as in the re-encoding path (its weight alone made the cache differ)
    q, k, v = attn.qkv_projection(x).view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    keys, values = cache.append(layer, k, v)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(B, n, dim))


def _blocks_step(
    student: nn.Module, h: torch.Tensor, cache: KVCache, visible: torch.Tensor | None
) -> torch.Tensor:
    """Run the new tokens h (B, n, E) through every block against the cache, then the norm."""
    for layer, block in enumerate(student.blocks):
        a = _attention_step(block.attn, block.norm1(h), cache, layer, visible)
        h = h + (a if block.gamma_1 is None else block.gamma_1 * a)
        m = block.mlp(block.norm2(h))
        h = h + (m if block.gamma_2 is None else block.gamma_2 * m)
    cache.advance(h.shape[1])
    return student.norm(h)


def _prefill(
    student: nn.Module,
    x: torch.Tensor,
    input_chans,
    cache: KVCache,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode a window x (B, C, A, T) into an empty cache; features of its last patch (B, C, E).

    padding: (B, C) bool, True = padded electrode (its tokens are never attended).
    """
    B, C, A, _ = x.shape
    h = embed_tokens(student, x, input_chans, channel_padding_mask=padding)
    ids = patch_block_ids(C, A, device=x.device)
    visible = ids[None, :] <= ids[:, None]  # (N, N) block-causal
    if padding is not None:
        cache.key_padding = token_padding_mask(padding, A)  # (B, N); cls never padded
        visible = visible[None, None] & ~cache.key_padding[:, None, None, :]  # (B, 1, N, N)
    out = _blocks_step(student, h, cache, visible)
    return out[:, 1:].reshape(B, C, A, out.shape[-1])[:, :, -1]


def _extend(
    student: nn.Module,
    patch: torch.Tensor,
    input_chans,
    cache: KVCache,
    time_row: int,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append one patch (B, C, T) at time-embedding row ``time_row``; return its features (B, C, E).

    Its C tokens see the whole cache and each other (one block): no causal mask needed, only
    the padded electrodes' keys (padding (B, C) bool) are hidden.
    """
    h = embed_next_patch(student, patch, input_chans, time_row, channel_padding_mask=padding)
    visible = None
    if padding is not None:
        cache.key_padding = torch.cat((cache.key_padding, padding), dim=1)
        visible = ~cache.key_padding[:, None, None, :]  # (B, 1, 1, cached + C)
    return _blocks_step(student, h, cache, visible)


# --------------------------------------------------------------------------------------------
# Sampling and the generation loop
# --------------------------------------------------------------------------------------------


def sample_codes(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one code per row of logits (..., V): temperature 0 = argmax; top_k keeps the k best."""
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if temperature == 0:
        return logits.argmax(-1)
    # Best score shifted to 0 and float64: a tiny temperature then sends the others to -inf
    # (probability 0) instead of overflowing to inf, and inf - inf = NaN in the softmax.
    scores = logits.double()
    scores = (scores - scores.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        # exactly k codes: a threshold at the k-th score would keep every code tied with it
        best = scores.topk(top_k, dim=-1).indices
        scores = torch.full_like(scores, -math.inf).scatter(-1, best, scores.gather(-1, best))
    probs = scores.softmax(-1).reshape(-1, scores.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


@torch.no_grad()
def generate(
    model: HybridPretrainModel,
    prompt: torch.Tensor,
    input_chans: torch.Tensor | None,
    num_patches: int,
    *,
    mode: str = "tokens",
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    max_context: int | None = None,
    keep: int | None = None,
    progress: Callable[[int], None] | None = None,
    channel_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, C, A0, T) by ``num_patches`` patches -> (B, C, num_patches, T).

    The prompt is cast to the model's dtype; the output has the prompt's dtype.

    Args:
        mode: ``"tokens"`` (draw a code per electrode with ``temperature`` / ``top_k``, then the
            code-conditioned signal head) or ``"regression"`` (the plain regression head;
            deterministic).
        use_cache: key/value cache (exact; the same result as re-encoding the context). Not
            used while a block or its attention has hooks (they run as the model runs).
        max_context: patches in the context window (default and maximum: the time embedding's
            rows). ``keep``: patches kept when the window is full (default ``max_context // 2``;
            the kept window is re-encoded once, then cached steps resume).
        progress: called with 1 after each generated patch (e.g. ``tqdm.update``).
        channel_padding_mask: (B, C) bool, True = padded electrode (a batch of different
            electrode sets, as the data loader pads them): padded electrodes are left out of
            the patch embedding's statistics and of attention, and come back as zeros.
    """
    if mode not in ("tokens", "regression"):
        raise ValueError(f"mode must be 'tokens' or 'regression', got {mode!r}")
    if prompt.dim() != 4:
        raise ValueError(f"prompt must be (B, C, A, T), got {tuple(prompt.shape)}")
    if not prompt.is_floating_point():
        # the output comes back in the prompt's dtype: an integer one truncated the generated
        # signal (units of 100 µV, mostly below 1) to zeros
        raise ValueError(
            f"prompt must be a floating-point signal (units of 100 µV), got {prompt.dtype}"
        )
    B, C, A0, T = prompt.shape
    if A0 < 1:
        raise ValueError("prompt must hold at least one patch")
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    head = model.forecast_head
    if head.signal is None:
        raise ValueError("generation needs a model trained with predict_signal=True")
    if mode == "tokens" and head.code_embed is None:
        raise ValueError(
            "mode='tokens' needs a model with both token and signal heads; use mode='regression'"
        )
    if T != model.config.patch_size:
        raise ValueError(f"prompt patches must have {model.config.patch_size} samples, got {T}")
    limit = model.max_patches
    max_context = limit if max_context is None else max_context
    if not 1 <= max_context <= limit:
        raise ValueError(f"max_context must be in [1, {limit}], got {max_context}")
    keep = max(max_context // 2, 1) if keep is None else keep
    if not 1 <= keep <= max_context:
        raise ValueError(f"keep must be in [1, max_context={max_context}], got {keep}")

    check_channel_padding_mask(channel_padding_mask, B, C)
    padding = None
    if channel_padding_mask is not None:
        padding = channel_padding_mask.to(prompt.device)
        prompt = zero_padded_electrodes(prompt, padding)

    student = model.backbone
    check_causal_routing(student)
    if use_cache and any(has_call_hooks(m) for b in student.blocks for m in (b, b.attn)):
        # a cached step runs a block's norms, attention maths and MLP itself: hooks on a whole
        # block or its attention (an ablation, a probe) would act only when re-encoding
        use_cache = False
    was_training = model.training
    model.eval()
    try:
        # in the model's dtype: the patch embedding's convolution needs it
        patches = list(prompt.to(student.cls_token.dtype).unbind(2))  # each (B, C, T)
        start = max(0, A0 - max_context)  # first patch of the window
        cache, cache_start = None, -1
        out = []
        for _ in range(num_patches):
            end = len(patches)
            if end - start > max_context:
                start = end - keep
            if use_cache:
                if cache is None or cache_start != start:  # window moved: re-encode it
                    attn = student.blocks[0].attn
                    cache = KVCache(
                        len(student.blocks), B, attn.num_heads, attn.head_dim,
                        1 + C * max_context, device=prompt.device, dtype=student.cls_token.dtype,
                    )  # fmt: skip
                    window = torch.stack(patches[start:end], dim=2)
                    h = _prefill(student, window, input_chans, cache, padding)
                else:
                    h = _extend(
                        student, patches[end - 1], input_chans, cache, end - 1 - start, padding
                    )
                cache_start = start
            else:
                window = torch.stack(patches[start:end], dim=2)
                h = forecast_features(student, window, input_chans, channel_padding_mask=padding)
                h = h[:, :, -1]
            if mode == "tokens":
                codes = sample_codes(
                    head.logits(h), temperature=temperature, top_k=top_k, generator=generator
                )
                nxt = head.samples(h, codes)
            else:
                nxt = head.samples(h)
            if padding is not None:
                nxt = nxt.masked_fill(padding[:, :, None], 0)
            patches.append(nxt)
            out.append(nxt)
            if progress is not None:
                progress(1)
        return torch.stack(out, dim=2).to(prompt.dtype)
    finally:
        model.train(was_training)


def create_hybrid_model(
    name: str = "labram_base_pretrain",
    *,
    hybrid: HybridConfig | dict | None = None,
    device=None,
    dtype=None,
    **config,
) -> HybridPretrainModel:
    """A registered masked-pretraining model (``create_model(name, **config)``) wrapped for
    the hybrid objective; ``hybrid`` is a :class:`HybridConfig` or a dict of its fields.

    Example::

        model = create_hybrid_model("labram_tiny_pretrain", hybrid={"mask_weight": 0.3})
        out = model(x, input_chans, codes)   # out.loss, out.masked_loss, out.ar_loss
    """
    from eegfast.models.registry import create_model

    if isinstance(hybrid, dict):
        unknown = sorted(set(hybrid) - {f.name for f in dataclasses.fields(HybridConfig)})
        if unknown:
            raise TypeError(
                f"unknown hybrid config keys {unknown}; valid: "
                + ", ".join(f.name for f in dataclasses.fields(HybridConfig))
            )
        hybrid = HybridConfig(**hybrid)
    masked = create_model(name, device=device, dtype=dtype, **config)
    if not hasattr(masked, "student"):
        raise ValueError(f"{name!r} is not a masked-pretraining model (no .student backbone)")
    return HybridPretrainModel(masked, hybrid or HybridConfig(), device=device, dtype=dtype)


def hybrid_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Architecture of a hybrid checkpoint read from its tensor shapes.

    Returns ``{"backbone": {...LaBraMConfig fields}, "vocab_size": V, "hybrid": {...}}``;
    raises ValueError naming what is missing when ``state`` is not a hybrid checkpoint.
    """
    # every tensor read below: a missing one is named in a ValueError (a KeyError got past the
    # callers' handling of a bad checkpoint)
    need = (
        "student.cls_token",
        "student.pos_embed",
        "student.time_embed",
        "student.patch_embed.conv1.weight",
        "student.blocks.0.attn.qkv.weight",
        "student.blocks.0.mlp.fc1.weight",
        "lm_head.weight",
    )
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a LaBraM pretraining checkpoint: missing {missing}")
    if not any(k.startswith("forecast_head.") for k in state):
        raise ValueError(
            "not a hybrid checkpoint: no forecast_head.* tensors (train it with "
            "`eegfast pretrain --objective hybrid`)"
        )
    embed = int(state["student.cls_token"].shape[-1])
    # The depth is the number of blocks, numbered 0, 1, ... without a gap: read as the highest
    # number plus one, one tensor named student.blocks.100000.x (in a 1.6 MB file) built
    # 100 001 blocks, 50 s and all the memory there was, before the strict load named it.
    numbers = {k.split(".")[2] for k in state if k.startswith("student.blocks.")}
    depth = len(numbers)
    if numbers != {str(i) for i in range(depth)}:
        found = sorted(numbers, key=lambda n: (not n.isdigit(), len(n), n))
        shown = ", ".join(found[:4]) + (f", ..., {found[-1]}" if len(found) > 4 else "")
        raise ValueError(
            f"not a checkpoint eegfast writes: its {depth} blocks (student.blocks.<i>) are "
            f"numbered {shown}, not 0 to {depth - 1}"
        )
    q_norm = state.get("student.blocks.0.attn.q_norm.weight")
    if q_norm is None:
        raise ValueError("hybrid checkpoints need q/k-normed attention (no q_norm found)")
    backbone = {
        "embed_dim": embed,
        "depth": depth,
        "num_heads": embed // int(q_norm.shape[0]),
        "mlp_ratio": state["student.blocks.0.mlp.fc1.weight"].shape[0] / embed,
        "conv_channels": int(state["student.patch_embed.conv1.weight"].shape[0]),
        "pos_rows": int(state["student.pos_embed"].shape[1]),
        "max_patches": int(state["student.time_embed"].shape[1]),
        "qkv_bias": "student.blocks.0.attn.q_bias" in state,
        "init_values": 0.1 if "student.blocks.0.gamma_1" in state else 0.0,
    }
    hybrid = {
        "predict_tokens": "forecast_head.token.weight" in state,
        "predict_signal": "forecast_head.signal.2.weight" in state,
    }
    if hybrid["predict_signal"]:
        # the signal head forecasts whole backbone patches: its size is the backbone's too
        hybrid["patch_size"] = int(state["forecast_head.signal.2.weight"].shape[0])
        backbone["patch_size"] = hybrid["patch_size"]
    # the forecasting head's own codebook size (HybridConfig.vocab_size may differ from the
    # masked head's): rebuilt from lm_head, its checkpoint did not load
    for key in ("forecast_head.token.weight", "forecast_head.code_embed.weight"):
        if key in state:
            hybrid["vocab_size"] = int(state[key].shape[0])
            break
    return {
        "backbone": backbone,
        "vocab_size": int(state["lm_head.weight"].shape[0]),
        "hybrid": hybrid,
    }


def load_hybrid_model(
    state: dict[str, torch.Tensor], *, mask_weight: float = 0.5, device=None, dtype=None
) -> HybridPretrainModel:
    """Rebuild a :class:`HybridPretrainModel` from a state dict (architecture from its shapes)
    and load it strictly."""
    from eegfast.models.checkpoint import load_checkpoint
    from eegfast.models.labram import LaBraMConfig
    from eegfast.models.pretrain import LaBraMPretrain, PretrainConfig

    arch = hybrid_config_from_state_dict(state)
    masked = LaBraMPretrain(
        PretrainConfig(backbone=LaBraMConfig(**arch["backbone"]), vocab_size=arch["vocab_size"]),
        device=device,
        dtype=dtype,
    )
    model = HybridPretrainModel(
        masked, HybridConfig(mask_weight=mask_weight, **arch["hybrid"]), device=device, dtype=dtype
    )
    load_checkpoint(model, state, strict=True)
    return model
