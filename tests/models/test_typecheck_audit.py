"""Defects a static type check (mypy) pointed at in eegfast.models: values that may be None
used without a check on a path the public API reaches, and hints narrower than the inputs."""

from __future__ import annotations

import typing
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from eegfast.models import HybridConfig, HybridPretrainModel, create_model, load_checkpoint


class _NoConfigMaskedModel(nn.Module):
    """A masked model of the documented interface (``student``, its own head) that carries no
    ``config`` of its own."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.student = inner.student
        self.lm_head = inner.lm_head


def test_hybrid_without_a_vocab_size_to_take_names_config_vocab_size():
    # was AttributeError: 'NoneType' object has no attribute 'vocab_size'
    masked = _NoConfigMaskedModel(create_model("labram_tiny_pretrain"))
    with pytest.raises(ValueError, match=r"config\.vocab_size.*_NoConfigMaskedModel"):
        HybridPretrainModel(masked, HybridConfig())
    # given explicitly, the same masked model is fine
    vocab = masked.lm_head.out_features
    model = HybridPretrainModel(masked, HybridConfig(vocab_size=vocab))
    assert model.config.vocab_size == vocab


def test_embed_patches_with_a_mask_and_no_mask_token_names_mask_token():
    # was AttributeError: 'NoneType' object has no attribute 'to'
    model = create_model("labram_tiny")
    patches = torch.randn(1, 2, model.config.embed_dim)
    chans = torch.tensor([0, 1, 2])
    mask = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="mask_token"):
        model.embed_patches(patches, 2, chans, mask=mask)
    token = torch.zeros(1, 1, model.config.embed_dim)
    assert model.embed_patches(patches, 2, chans, mask=mask, mask_token=token).shape == (1, 3, 100)


def test_load_checkpoint_hint_admits_the_wrapped_dicts_it_loads():
    """``source`` takes a training script's ``{"model": state_dict}``, as its docstring says:
    its hint was ``Mapping[str, Tensor]``, which a type checker refused that dict by."""
    model = create_model("labram_tiny")
    report = load_checkpoint(model, {"model": model.state_dict()})
    assert not report.missing
    hint = typing.get_type_hints(load_checkpoint)["source"]
    mappings = [a for a in typing.get_args(hint) if typing.get_origin(a) is Mapping]
    assert mappings and all(typing.get_args(m)[1] is typing.Any for m in mappings)
    assert "model" in load_checkpoint.__doc__
