"""Activation checkpointing of a model without ``set_grad_checkpointing`` survives a copy and
a pickle: ``copy.deepcopy`` (an EMA, ``AveragedModel``) and ``torch.save(model)`` then
``torch.load`` give models whose own blocks are recomputed in the backward pass."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from eegfast.train.engine import enable_activation_checkpointing
from tests.train.fakes import TinyClassifier


def _round_trip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _block_runs(model: nn.Module, x: torch.Tensor) -> list[int]:
    """How many times each block's body runs in one forward and backward: 1, or 2 when the
    backward recomputes it (a pre-hook inside the block: the checkpoint calls the block's class
    forward, which calls its submodules again, and may stop the recomputation once it has
    what the backward needs, before a submodule's forward hook)."""
    runs = [0] * len(model.blocks)
    handles = [
        block.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    try:
        model(x).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return runs


@pytest.mark.parametrize("how", ["original", "deepcopy", "torch.save"])
def test_checkpointed_blocks_stay_checkpointed_in_copies_and_reloads(how):
    """``torch.save(model)`` + ``torch.load``: the blocks' replaced forward was a method bound
    to the block, pickled as the name ``forward`` and reloaded as the class's plain forward,
    so the reloaded model trained without checkpointing (its activation memory back)."""
    torch.manual_seed(0)
    model = TinyClassifier(depth=2)
    keys = list(model.state_dict())
    assert enable_activation_checkpointing(model) == 2
    other = {"original": lambda m: m, "deepcopy": copy.deepcopy, "torch.save": _round_trip}[how]
    copied = other(model)
    assert list(copied.state_dict()) == keys
    x = torch.randn(3, 2, 1, 200)
    assert _block_runs(copied, x) == [2, 2]
    if copied is model:
        return
    # its own blocks: their weights shape its output and get its gradients, not the original's
    assert all(p.grad is not None for p in copied.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        want = model(x)
        for p in copied.blocks.parameters():
            p.add_(0.1)
        assert not torch.allclose(copied(x), want)
    # and a copy of the copy too
    assert _block_runs(_round_trip(copied), x) == [2, 2]
