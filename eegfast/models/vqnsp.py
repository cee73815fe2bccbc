"""VQ-NSP: LaBraM's neural tokenizer (vector-quantised neural spectrum prediction).

encoder (LaBraM trunk, qkv biases, no q/k norm, no layer scale) → ``fc_norm`` of the patch
tokens → ``encode_task_layer`` (Linear, Tanh, Linear to the code dim, in fp32) →
:class:`eegfast.nn.NormEMAVectorQuantizer` (cosine, EMA, k-means init; plus dead-code restart
and usage/perplexity metrics, which the reference lacks) → decoder (3-block trunk on the codes)
→ two heads predicting each patch's Fourier amplitude and phase, both standardised per sample
over electrodes, patches and frequencies. Loss = commitment + MSE(amplitude) + MSE(phase).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eegfast.models.labram import (
    LaBraM,
    LaBraMConfig,
    _check_signal,
    token_padding_mask,
    zero_padded_electrodes,
)
from eegfast.nn.vq import NormEMAVectorQuantizer, code_perplexity
from eegfast.ops import vq_nearest


def _encoder_default() -> LaBraMConfig:
    return LaBraMConfig(qkv_bias=True, qk_norm=False, init_values=0.0)


def _decoder_default() -> LaBraMConfig:
    return LaBraMConfig(
        depth=3, patch_embed="code", code_dim=64, qkv_bias=True, qk_norm=False, init_values=0.0
    )


@dataclass(frozen=True)
class VQNSPConfig:
    """Tokenizer: encoder and decoder transformers, codebook size and EMA settings.

    ``dead_code_threshold``: codes whose EMA count falls below it (in [0, 1]) are re-seeded
    from the batch (None: never, as the reference).
    """

    encoder: LaBraMConfig = field(default_factory=_encoder_default)
    decoder: LaBraMConfig = field(default_factory=_decoder_default)
    code_dim: int = 64
    num_codes: int = 8192
    beta: float = 1.0
    decay: float = 0.99
    kmeans_init: bool = True
    dead_code_threshold: float | None = 1e-3

    def __post_init__(self) -> None:
        if self.decoder.patch_embed != "code" or self.decoder.code_dim != self.code_dim:
            raise ValueError(
                "decoder must have patch_embed='code' and code_dim equal to code_dim "
                f"({self.code_dim}), got {self.decoder.patch_embed!r}, {self.decoder.code_dim}"
            )
        if self.encoder.patch_embed != "temporal_conv":
            raise ValueError("encoder must have patch_embed='temporal_conv'")


class TokenizerOutput(NamedTuple):
    """What :meth:`VQNSP.forward` returns: ``loss`` () (with the graph) = ``commitment_loss``
    + ``amplitude_loss`` + ``phase_loss`` (each ()); ``indices`` (B, C·A) int64 code of every
    patch, -1 for padded electrodes; ``perplexity``, ``codebook_usage``, ``feature_spread``
    and ``feature_dims`` () (:class:`eegfast.nn.QuantizerOutput`'s ``perplexity``,
    ``usage``, ``spread``, ``dims``)."""

    loss: torch.Tensor  # (): commitment + amplitude + phase
    commitment_loss: torch.Tensor
    amplitude_loss: torch.Tensor
    phase_loss: torch.Tensor
    indices: torch.Tensor  # (B, C·A) long code of each patch, -1 for padded electrodes
    perplexity: torch.Tensor  # (): exp(entropy) of this batch's code usage
    codebook_usage: torch.Tensor  # (): fraction of codes used by this batch
    # (): mean cosine distance of the batch's normalised encoder outputs (QuantizerOutput.spread);
    # near 0 means encoder collapse: every patch gets the same features
    feature_spread: torch.Tensor
    # (): effective number of directions of those outputs (QuantizerOutput.dims); near 1 means
    # they lie on one line (one direction, or two opposite ones that feature_spread misses)
    feature_dims: torch.Tensor


def standardise(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std per sample over all but dim 0 (unbiased std, as the reference).

    valid: (B, C) bool, True = real electrode of x (B, C, ...); padded ones are left out of the
    statistics.

    A sample whose values are all equal (a flat, e.g. zero-filled, window) gives 0 everywhere,
    not the reference's 0/0 = NaN, which would make the whole batch's loss NaN.
    """
    dims = tuple(range(1, x.dim()))
    if valid is None:
        # all equal by comparison, not by std == 0: the rounded mean of equal values (0.1)
        # is off by an ulp, and centred / std of that rounding error gave ±1 everywhere
        flat = x.amax(dims, keepdim=True) == x.amin(dims, keepdim=True)
        return _scaled(x - x.mean(dims, keepdim=True), x.std(dims, keepdim=True), flat)
    keep = valid.to(torch.bool).view(*valid.shape, *([1] * (x.dim() - 2))).expand_as(x)
    count = keep.sum(dims, keepdim=True).to(x.dtype)
    # where, not a product with 0: a NaN or inf of a padded electrode stays out of the sums
    mean = torch.where(keep, x, 0.0).sum(dims, keepdim=True) / count.clamp_min(1)
    var = torch.where(keep, (x - mean).square(), 0.0).sum(dims, keepdim=True)
    var = var / (count - 1).clamp_min(1)
    high = torch.where(keep, x, -torch.inf).amax(dims, keepdim=True)
    flat = high == torch.where(keep, x, torch.inf).amin(dims, keepdim=True)
    return _scaled(x - mean, var.sqrt(), flat)


def _scaled(centred: torch.Tensor, std: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """centred / std, and 0 for the samples that are ``flat`` (all values equal) or whose std
    is 0."""
    flat = flat | (std == 0)
    return torch.where(flat, 0.0, centred / torch.where(flat, 1.0, std))


def fourier_targets(
    x: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised amplitude and phase of each patch's DFT: x (B, C, A, T) -> 2 × (B, C, A, T)."""
    if x.numel() == 0:  # (an empty batch: MKL's FFT refuses a transform of 0 signals)
        empty = x.float().new_empty(x.shape)
        return empty, empty.clone()
    spectrum = torch.fft.fft(x.float(), dim=-1)
    return standardise(spectrum.abs(), valid), standardise(spectrum.angle(), valid)


def _task_layer(dim: int, out: int, *, device=None, dtype=None) -> nn.Sequential:
    factory = {"device": device, "dtype": dtype}
    return nn.Sequential(nn.Linear(dim, dim, **factory), nn.Tanh(), nn.Linear(dim, out, **factory))


class VQNSP(nn.Module):
    """The VQ-NSP tokenizer; state-dict keys as the reference (``encoder.*``, ``decoder.*``,
    ``quantize.*``, ``encode_task_layer.*``, ``decode_task_layer.*``,
    ``decode_task_layer_angle.*``).

    ``forward(x, input_chans)`` trains it (returns :class:`TokenizerOutput`);
    ``get_codebook_indices(x, input_chans)`` gives pretraining targets (no EMA update).
    """

    def __init__(self, config: VQNSPConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.encoder = LaBraM(config.encoder, **factory)
        self.decoder = LaBraM(config.decoder, **factory)
        self.quantize = NormEMAVectorQuantizer(
            config.num_codes,
            config.code_dim,
            beta=config.beta,
            decay=config.decay,
            kmeans_init=config.kmeans_init,
            dead_code_threshold=config.dead_code_threshold,
            device=device,  # the codebook and its EMA state stay float32 in any model dtype
        )
        E_enc, E_dec = config.encoder.embed_dim, config.decoder.embed_dim
        patch = config.encoder.patch_size
        self.encode_task_layer = _task_layer(E_enc, config.code_dim, **factory)
        self.decode_task_layer = _task_layer(E_dec, patch, **factory)
        self.decode_task_layer_angle = _task_layer(E_dec, patch, **factory)
        for layer in (self.encode_task_layer, self.decode_task_layer, self.decode_task_layer_angle):
            for module in layer:
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder and decoder block in the backward pass instead of storing
        its activations (``train.activation_checkpointing``). Without this method the engine
        replaced each block's ``forward`` on the instance by a closure over the block: a copy
        of the model (``copy.deepcopy``, an EMA or ``AveragedModel``) then ran the original's
        blocks, with the original's weights, and ``torch.save(model)`` could not pickle it."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    def encode_features(
        self, x: torch.Tensor, input_chans=None, *, channel_padding_mask=None
    ) -> torch.Tensor:
        """x (B, C, A, 200) -> encoder features projected to the code dim, (B, C·A, code_dim)
        fp32 (not yet normalised)."""
        tokens = self.encoder.forward_patch_tokens(
            x, input_chans, channel_padding_mask=channel_padding_mask
        )
        layer = self.encode_task_layer
        with torch.autocast(tokens.device.type, enabled=False):
            return layer(tokens.to(layer[0].weight.dtype))

    def decode(
        self, codes: torch.Tensor, input_chans=None, *, channel_padding_mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, C, A, code_dim) -> predicted amplitude and phase, each (B, C·A, 200)."""
        features = self.decoder.forward_patch_tokens(
            codes, input_chans, channel_padding_mask=channel_padding_mask
        )
        return self.decode_task_layer(features), self.decode_task_layer_angle(features)

    def forward(
        self,
        x: torch.Tensor,
        input_chans=None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
    ) -> TokenizerOutput:
        """x (B, C, A, 200) in units of 100 µV; input_chans (C+1,) or (B, C+1);
        channel_padding_mask (B, C) bool, True = padded electrode (its values are ignored)."""
        x = _check_signal(x, self.config.encoder.patch_size)
        B, C, A, T = x.shape
        # before the Fourier targets too: their per-sample statistics weight padding by 0
        x = zero_padded_electrodes(x, channel_padding_mask)
        valid_chans = None if channel_padding_mask is None else ~channel_padding_mask.bool()
        amplitude, phase = fourier_targets(x, valid_chans)
        z = self.encode_features(x, input_chans, channel_padding_mask=channel_padding_mask)
        padding = token_padding_mask(channel_padding_mask, A)
        if padding is None:
            q = self.quantize(z)
            codes, indices = q.quantized, q.indices
        else:  # padded patches neither get codes (index -1, zeros) nor update the codebook
            valid = ~padding[:, 1:]
            q = self.quantize(z, valid)
            codes = torch.where(valid[..., None], q.quantized, 0.0)
            indices = q.indices
        codes = codes.view(B, C, A, codes.shape[-1])  # (not -1: B = 0 leaves it undefined)
        pred_amplitude, pred_phase = self.decode(
            codes, input_chans, channel_padding_mask=channel_padding_mask
        )
        amplitude, phase = amplitude.view(B, C * A, T), phase.view(B, C * A, T)
        if padding is None:
            amplitude_loss = F.mse_loss(pred_amplitude.float(), amplitude)
            phase_loss = F.mse_loss(pred_phase.float(), phase)
        else:
            keep = valid[..., None].float()
            n = keep.sum().clamp_min(1) * T
            amplitude_loss = ((pred_amplitude.float() - amplitude).square() * keep).sum() / n
            phase_loss = ((pred_phase.float() - phase).square() * keep).sum() / n
        return TokenizerOutput(
            loss=q.loss + amplitude_loss + phase_loss,
            commitment_loss=q.loss,
            amplitude_loss=amplitude_loss,
            phase_loss=phase_loss,
            indices=indices,
            perplexity=q.perplexity,
            codebook_usage=q.usage,
            feature_spread=q.spread,
            feature_dims=q.dims,
        )

    @torch.no_grad()
    def get_codebook_indices(
        self,
        x: torch.Tensor,
        input_chans=None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Code index of every patch: x (B, C, A, 200) -> (B, C·A) long (-1 where padded).

        Never updates the codebook (safe to call in training mode on a frozen tokenizer).
        Non-finite encoder features of a real patch raise FloatingPointError where the
        quantizer checks them (``quantize.check_finite``; None: on CPU tensors), as in
        ``forward``, instead of giving index -1, which reads as padding (under torch.compile
        on CPU: RuntimeError, from a check in the graph).
        """
        z = self.encode_features(x, input_chans, channel_padding_mask=channel_padding_mask)
        B, P, D = z.shape
        codebook = self.quantize.codebook
        flat = F.normalize(z.reshape(B * P, D).to(codebook.dtype), dim=1)
        indices = vq_nearest(flat, codebook, "cosine").view(B, P)
        padding = None
        if channel_padding_mask is not None:
            A = P // channel_padding_mask.shape[1]
            padding = token_padding_mask(channel_padding_mask, A)[:, 1:]
        check = self.quantize.check_finite
        if check if check is not None else flat.device.type == "cpu":
            missing = indices < 0 if padding is None else (indices < 0) & ~padding
            if torch.compiler.is_compiling() and flat.device.type == "cpu":
                # traced, the host read below would break the graph: checked in the graph
                # (a RuntimeError instead, without the count)
                torch._assert_async(
                    ~missing.any(),
                    "get_codebook_indices: patches have non-finite encoder features (NaN or "
                    "inf in x, or an overflow)",
                )
            elif bool(missing.any()):
                raise FloatingPointError(
                    f"get_codebook_indices: {int(missing.sum())} of {missing.numel()} patches "
                    "have non-finite encoder features (NaN or inf in x, or an overflow)"
                )
        return indices if padding is None else indices.masked_fill(padding, -1)

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, float]:
        """Codebook health from the EMA counts: perplexity of the EMA usage distribution and
        the fraction of codes whose EMA count is above the dead-code threshold (or > 0)."""
        counts = self.quantize.cluster_size.float()
        threshold = self.config.dead_code_threshold or 0.0
        return {
            "ema_perplexity": float(code_perplexity(counts)),
            "active_fraction": float((counts > threshold).float().mean()),
        }
