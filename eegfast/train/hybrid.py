"""``eegfast pretrain --objective hybrid``: masked + block-causal forecasting pretraining.

Imported lazily by :func:`eegfast.train.objectives.get_objective` (``LAZY_OBJECTIVES``); it
registers :func:`hybrid_step` under the name ``hybrid``.

The model must be a :class:`eegfast.models.hybrid.HybridPretrainModel`; build it with
:func:`create_hybrid_pretrain_model` (a drop-in ``create`` function for
:func:`eegfast.train.arch.build_model`, taking the masked model's name and keyword arguments plus
an optional ``hybrid`` dict of :class:`~eegfast.models.hybrid.HybridConfig` fields, e.g.
``{"mask_weight": 0.5}``). Its checkpoints hold the masked model's keys plus ``forecast_head.*``,
so ``eegfast finetune --set model.init=RUN`` loads them like any pretraining checkpoint.

Per step: the frozen tokenizer gives the codes of every patch; the masked half uses the same
deterministic per-sample masks as the ``masked`` objective; the loss is
``λ·masked + (1 − λ)·forecast`` and every part is logged (``masked_loss``, ``ar_loss``,
``ar_token_loss``, ``ar_signal_loss``, ``ar_token_accuracy``, ``masked_accuracy``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from eegfast.models.checkpoint import unwrap_model
from eegfast.models.hybrid import HybridPretrainModel, create_hybrid_model
from eegfast.train.objectives import (
    StepContext,
    StepOutput,
    host_token_padding,
    register_objective,
    step_masks,
    to_device,
    tokenizer_codes,
)

__all__ = ["create_hybrid_pretrain_model", "hybrid_step"]


def create_hybrid_pretrain_model(name: str, *, hybrid: dict | None = None, **kwargs: Any):
    """``create_model(name, **kwargs)`` (a ``*_pretrain`` model) wrapped for the hybrid loss."""
    return create_hybrid_model(name, hybrid=hybrid, **kwargs)


def hybrid_step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
    """One hybrid step: batch x (B, C, A, 200), input_chans, index (B,) [+ channel_padding_mask]."""
    core = unwrap_model(model)  # (under DDP and torch.compile, in either order)
    if not isinstance(core, HybridPretrainModel):
        raise ValueError(
            "--objective hybrid needs a HybridPretrainModel (build it with "
            "eegfast.train.hybrid.create_hybrid_pretrain_model), got "
            f"{type(core).__name__}"
        )
    config = core.config
    needs_codes = config.mask_weight > 0 or config.predict_tokens
    if needs_codes and ctx.tokenizer is None:
        raise ValueError(
            "hybrid pretraining needs a trained tokenizer (model.tokenizer=PATH) for the masked "
            "loss and the next-code targets"
        )
    token_padding = host_token_padding(batch)
    batch = to_device(batch, ctx.device)
    x, chans = batch["x"], batch["input_chans"]
    padding = batch.get("channel_padding_mask")
    if x.shape[2] < 2:
        raise ValueError(f"hybrid pretraining needs windows of >= 2 patches, got A={x.shape[2]}")
    targets = None
    if needs_codes:
        # with the padding mask, as the masked objective: without it the tokenizer attends to
        # the padded electrodes and codes the real ones differently
        targets = tokenizer_codes(ctx, batch, x, chans, padding)
    mask = None
    if config.mask_weight > 0:
        mask = step_masks(ctx, batch, token_padding)
    out = model(x, chans, targets, mask, channel_padding_mask=padding)
    metrics = {k: v for k, v in out.scalar_tensors().items() if k != "loss"}
    return StepOutput(out.loss, metrics)


register_objective("hybrid", hybrid_step)
