"""Padding that holds NaN or inf stays out of the real tokens' results in the layers
themselves (QKNormAttention's SDPA path, TemporalConv's masked GroupNorm), not only once a
model has zeroed the padded electrodes."""

from __future__ import annotations

import pytest
import torch

from eegfast.nn import QKNormAttention, TemporalConv


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_attention_ignores_a_non_finite_padding_token(qk_norm, fill):
    """qk_norm=False (the tokenizer's attention) runs PyTorch's SDPA: a padded key's weight
    is 0 there, but 0 · NaN is NaN, so one NaN padding token made every token of its sample
    NaN, where the fused op (qk_norm=True) ignores padding keys whatever they hold."""
    torch.manual_seed(0)
    attn = QKNormAttention(16, 2, qkv_bias=True, qk_norm=qk_norm).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        expected = attn(x, key_padding_mask=padding)
        filled = x.clone()
        filled[0, 3:] = fill
        got = attn(filled, key_padding_mask=padding)
    torch.testing.assert_close(got[:, :3], expected[:, :3])
    torch.testing.assert_close(got[1], expected[1])


def test_temporal_conv_ignores_a_non_finite_padded_patch():
    """TemporalConv's padding_mask leaves padded patches out of the GroupNorm statistics:
    with a product by 0, a NaN patch made the statistics, and so the whole sample, NaN."""
    torch.manual_seed(0)
    conv = TemporalConv(8)
    x = torch.randn(2, 3, 2, 200)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True  # electrode 2 of sample 0 (its two patches)
    with torch.no_grad():
        expected = conv(x, padding)
        filled = x.clone()
        filled[0, 2] = float("nan")
        got = conv(filled, padding)
    torch.testing.assert_close(got[0, :4], expected[0, :4])
    torch.testing.assert_close(got[1], expected[1])
