"""Masked EEG modelling (LaBraM pretraining) with the symmetric objective in one forward.

The reference runs the student twice per step, on a random 50% patch mask and on its
complement. Both views share the patch embedding (the mask replaces patch embeddings *after*
the TemporalConv), so here the patch embedding runs once, the two views are concatenated along
the batch and go through the blocks together, and ``lm_head`` only sees the tokens that enter
the loss (the masked ones of each view: C·A per sample instead of 2·C·A), picked with a
``where`` so that all shapes stay static for ``torch.compile``. The head and its cross-entropy
run as :func:`eegfast.nn.linear_cross_entropy`: in row chunks, with the gradients computed as
each chunk's logits are at hand, so the (B·C·A, 8192) logits are never kept for the backward.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from eegfast.models.labram import (
    LaBraMConfig,
    LaBraMTrunk,
    _check_signal,
    _check_size,
    token_padding_mask,
    zero_padded_electrodes,
)
from eegfast.nn.losses import linear_cross_entropy


@dataclass(frozen=True)
class PretrainConfig:
    """Masked-modelling model: the student backbone, vocabulary and mask ratio."""

    backbone: LaBraMConfig = field(default_factory=LaBraMConfig)
    vocab_size: int = 8192
    mask_ratio: float = 0.5

    def __post_init__(self) -> None:
        # named errors: a string or None ratio failed with "'<' not supported between ...", a
        # float or bool vocab_size deep in nn.Linear with "empty(): argument 'size' ..."
        if not isinstance(self.backbone, LaBraMConfig):
            raise ValueError(f"backbone must be a LaBraMConfig, got {type(self.backbone).__name__}")
        ratio = self.mask_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
            raise ValueError(f"mask_ratio must be a number in (0, 1), got {ratio!r}")
        _check_size("vocab_size", self.vocab_size, low=1)


class PretrainOutput(NamedTuple):
    """What :meth:`LaBraMPretrain.forward` returns: ``loss`` () (with the graph), the sum of
    the two views' mean CE; ``accuracy`` () over both views' predicted tokens; the per-view
    ``loss_masked``, ``loss_complement``, ``accuracy_masked``, ``accuracy_complement`` ()
    (detached); ``mask`` (B, C·A) bool, True = masked in view 1."""

    loss: torch.Tensor  # (): CE(masked) + CE(complement), each a mean over its tokens
    accuracy: torch.Tensor  # (): top-1 accuracy over all predicted tokens of both views
    loss_masked: torch.Tensor  # (): CE of view 1 (the given mask), detached
    loss_complement: torch.Tensor  # (): CE of view 2 (the complementary mask), detached
    accuracy_masked: torch.Tensor
    accuracy_complement: torch.Tensor
    mask: torch.Tensor  # (B, C·A) bool: the mask of view 1


def random_patch_mask(
    batch: int,
    n_tokens: int,
    ratio: float = 0.5,
    *,
    padding_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(B, N) bool, True = masked: exactly ``ceil(ratio · n_valid)`` random valid tokens of
    each sample (``padding_mask`` (B, N) True = padded, never masked).

    ``ceil`` as the reference, which keeps ``floor(n · (1 - ratio))`` tokens: with an odd
    number of patches and ratio 0.5 it masks the larger half (``round`` would mask the
    smaller or the larger half depending on the parity of n / 2).
    """
    if generator is None:
        # no generator= at all: under torch.compile, once B or C·A is dynamic, torch.rand with
        # generator=None (its generator overload) cannot take symbolic sizes and the traced
        # call failed ("SymIntArrayRef expected to contain only concrete integers")
        noise = torch.rand(batch, n_tokens, device=device)
    else:
        noise = torch.rand(batch, n_tokens, generator=generator, device=generator.device)
        noise = noise.to(device)
    if padding_mask is None:
        n_valid = torch.full((batch, 1), n_tokens, device=noise.device)
    else:
        padding_mask = padding_mask.to(noise.device)
        noise = noise.masked_fill(padding_mask, 2.0)  # padded tokens sort last
        n_valid = (~padding_mask).sum(1, keepdim=True)
    # float64 and a tolerance: ratio · n that is an integer in exact arithmetic (0.7 · 10)
    # must not round up from its binary representation
    n_masked = torch.ceil(n_valid.double() * ratio - 1e-9).long()
    rank = noise.argsort(1).argsort(1)
    return rank < n_masked


class LaBraMForMaskedModeling(LaBraMTrunk):
    """The student: trunk + learned ``mask_token`` + final ``norm`` over all tokens.

    Keys as the reference's ``student.*`` (it also holds an ``lm_head`` that the reference's
    symmetric objective never uses — the wrapper's own ``lm_head`` predicts the codes; it is
    kept so that checkpoints load strictly).
    """

    def __init__(self, config: LaBraMConfig, vocab_size: int, *, device=None, dtype=None):
        super().__init__(config, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim, **factory))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps, **factory)
        self.lm_head = nn.Linear(config.embed_dim, vocab_size, **factory)
        self._init_trunk()
        nn.init.trunc_normal_(self.mask_token, std=config.init_std)

    def forward(
        self,
        x: torch.Tensor,
        input_chans=None,
        mask: torch.Tensor | None = None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, A, 200), mask (B, C·A) True = masked -> normed tokens (B, 1 + C·A, E).

        channel_padding_mask: (B, C) bool, True = padded electrode (its values are ignored).
        """
        x = _check_signal(x, self.config.patch_size)
        B, C, A, _ = x.shape
        x = zero_padded_electrodes(x, channel_padding_mask)
        if mask is not None:
            mask = _check_mask(mask, B, C * A)
        chans = self.resolve_input_chans(input_chans, C, x.device, batch=B)
        key_padding = token_padding_mask(channel_padding_mask, A)
        patches = self.patch_embed(x, None if key_padding is None else key_padding[:, 1:])
        tokens = self.embed_patches(patches, C, chans, mask=mask, mask_token=self.mask_token)
        tokens = self.run_blocks(tokens, key_padding_mask=key_padding, task_id=task_id)
        return self.norm(tokens)


def _check_mask(mask: torch.Tensor, batch: int, n_tokens: int) -> torch.Tensor:
    """A (B, C·A) mask as bool (nonzero = masked, as the reference's 0/1 masks of any dtype),
    or ValueError naming ``mask``."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, n_tokens):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape (B, C·A) = {(batch, n_tokens)}, got {shape}")
    return mask.to(torch.bool)


def _repeat_batch(t, times: int = 2):
    """Concatenate a per-sample tensor with itself along dim 0 (None and shared tensors pass)."""
    return t if t is None else torch.cat([t] * times, dim=0)


class LaBraMPretrain(nn.Module):
    """Symmetric masked EEG modelling: ``student``, ``lm_head`` over the vocabulary, and the
    reference's (unused) ``projection_head`` so that reference checkpoints load strictly.

    ``forward(x, input_chans, targets, mask=None)``: targets (B, C·A) are the tokenizer's code
    indices; ``mask`` (B, C·A) True = masked (random ``mask_ratio`` per sample if None).
    Loss = CE over the masked tokens of view 1 + CE over the tokens of view 2 (mask
    complement), as the reference, computed in one batched forward.
    """

    def __init__(self, config: PretrainConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        E = config.backbone.embed_dim
        self.student = LaBraMForMaskedModeling(
            config.backbone, config.vocab_size, device=device, dtype=dtype
        )
        self.lm_head = nn.Linear(E, config.vocab_size, **factory)
        self.projection_head = nn.Sequential(nn.Linear(E, E, **factory), nn.ReLU())
        nn.init.trunc_normal_(self.lm_head.weight, std=config.backbone.init_std)
        nn.init.zeros_(self.lm_head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.set_grad_checkpointing(enable)

    def forward(
        self,
        x: torch.Tensor,
        input_chans,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PretrainOutput:
        """x (B, C, A, 200); input_chans (C+1,) or (B, C+1); targets (B, C·A) integer, -1 =
        no target (the tokenizer's mark of a padded or unusable patch: left out of the losses
        and accuracies); mask (B, C·A) bool or None; channel_padding_mask (B, C) bool, True =
        padded electrode (its values are ignored)."""
        student = self.student
        x = _check_signal(x, student.config.patch_size)
        B, C, A, _ = x.shape
        x = zero_padded_electrodes(x, channel_padding_mask)
        P = C * A
        if targets.shape != (B, P):
            raise ValueError(
                f"targets must have shape (B, C·A) = {(B, P)}, got {tuple(targets.shape)}"
            )
        key_padding = token_padding_mask(channel_padding_mask, A)
        patch_padding = None if key_padding is None else key_padding[:, 1:]
        targets = self._check_targets(targets)
        if mask is None:
            mask = random_patch_mask(
                B,
                P,
                self.config.mask_ratio,
                padding_mask=patch_padding,
                generator=generator,
                device=x.device,
            )
        else:
            mask = _check_mask(mask, B, P)
        chans = student.resolve_input_chans(input_chans, C, x.device, batch=B)

        # Both views share the patch embedding; they differ only in which tokens are masked.
        patches = student.patch_embed(x, patch_padding)
        both_masks = torch.cat([mask, ~mask], dim=0)
        tokens = student.embed_patches(
            _repeat_batch(patches),
            C,
            chans if chans.dim() == 1 else _repeat_batch(chans),
            mask=both_masks,
            mask_token=student.mask_token,
        )
        tokens = student.run_blocks(
            tokens,
            key_padding_mask=_repeat_batch(key_padding),
            task_id=task_id if task_id is None or task_id.dim() == 0 else _repeat_batch(task_id),
        )

        # Every patch is predicted exactly once: by view 1 where masked, by view 2 elsewhere.
        # Picking those tokens with a where() keeps every shape static (no boolean indexing),
        # so torch.compile sees one graph, and the final norm and lm_head run on B·C·A rows
        # (the norm is per token, so normalising after picking is the same).
        body = tokens[:, 1:]
        predicted = student.norm(torch.where(mask[..., None], body[:B], body[B:]))  # (B, P, E)
        labels = targets.clamp_min(0)  # positions without a target (-1) carry no weight below
        # A -1 at a real patch (codes of a padded batch passed without its mask, or a patch the
        # tokenizer could not code) was trained as code 0; checking for it would cost a host
        # sync per step on a GPU, so it is left out, as padding is.
        valid = targets >= 0
        if patch_padding is not None:
            valid = valid & ~patch_padding
        in_view1, in_view2 = (mask & valid).float(), (~mask & valid).float()
        n1, n2 = in_view1.sum().clamp_min(1), in_view2.sum().clamp_min(1)
        # loss1 + loss2 as one weighted sum; the head's logits (B·P × vocab) are never kept
        head = linear_cross_entropy(
            predicted.flatten(0, 1),
            self.lm_head.weight,
            self.lm_head.bias,
            labels.flatten(),
            (in_view1 / n1 + in_view2 / n2).flatten(),
        )
        per_token = head.per_token.view(B, P)
        correct = head.correct.view(B, P).float()
        loss1 = (per_token * in_view1).sum() / n1
        loss2 = (per_token * in_view2).sum() / n2
        acc1 = (correct * in_view1).sum() / n1
        acc2 = (correct * in_view2).sum() / n2
        accuracy = (correct * valid).sum() / valid.sum().clamp_min(1)
        return PretrainOutput(
            loss=head.loss,
            accuracy=accuracy,
            loss_masked=loss1,
            loss_complement=loss2,
            accuracy_masked=acc1,
            accuracy_complement=acc2,
            mask=mask,
        )

    @staticmethod
    def _check_targets(targets: torch.Tensor) -> torch.Tensor:
        """targets (B, C·A) as int64 (any integer dtype is accepted; a float, complex or bool
        tensor is refused by name rather than failing later as the loss's ``labels``).

        Their values are not checked here: that would read them back to the host each step.
        """
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer code indices, got {targets.dtype}")
        return targets.long()


PRETRAIN_ONLY_PREFIXES = ("mask_token", "norm.", "lm_head.")


def pretrain_to_classifier_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Map a pretraining state dict (reference ``student.*`` layout, or this package's
    :class:`LaBraMPretrain`) to the classifier's keys.

    Kept: ``student.{cls_token, pos_embed, time_embed, patch_embed.*, blocks.*}`` → without the
    ``student.`` prefix. Dropped: the student's ``mask_token``, ``norm.*`` and ``lm_head.*``
    and the wrapper's ``lm_head.*`` and ``projection_head.*`` (pretraining only). The
    classifier's ``fc_norm.*`` and ``head.*`` are new and keep their initialisation.
    """
    if not any(k.startswith("student.") for k in state_dict):
        raise ValueError(
            "not a pretraining state dict: no 'student.' keys (found e.g. "
            f"{sorted(state_dict)[:3]})"
        )
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("student."):
            continue
        key = key[len("student.") :]
        if key.startswith(PRETRAIN_ONLY_PREFIXES):
            continue
        out[key] = value
    return out
