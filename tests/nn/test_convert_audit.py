"""eegfast.nn.convert: timm's current ``Attention`` options without timm, and conversion under
an autocast region.

``TimmStyleAttention`` re-creates the fields and math of ``timm.layers.Attention`` (timm 1.x:
``attn_head_dim``, ``dim_out``, ``scale_norm``, ``proj_bias``, ``forward(x, attn_mask,
is_causal)``), so these run in the main venv, where timm does not import (see test_convert.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eegfast.nn import convert, convert_report
from eegfast.nn.convert import FusedLabramAttention, FusedTimmAttention
from tests.nn.test_convert import ReferenceAttention, ScaledOutputAttention, _randomise


class TimmStyleAttention(nn.Module):
    """timm's ``Attention`` fields and SDPA forward; q/k norms Identity without qk_norm."""

    def __init__(self, dim, num_heads, *, attn_head_dim=None, dim_out=None, qkv_bias=False,
                 qk_norm=True, scale_norm=False, proj_bias=True, attn_drop=0.0,
                 norm_layer=nn.LayerNorm):  # fmt: skip
        super().__init__()
        head_dim = attn_head_dim or dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0,
        )  # fmt: skip
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


@pytest.mark.parametrize(
    "options",
    [
        {"qkv_bias": True, "scale_norm": True},
        {"attn_head_dim": 24, "dim_out": 30, "proj_bias": False},
        {"norm_layer": lambda d: nn.LayerNorm(d, elementwise_affine=False)},
        {"norm_layer": lambda d: nn.LayerNorm(d, eps=1e-2, bias=False)},
    ],
    ids=["qkv_bias-scale_norm", "head_dim-dim_out", "no_affine", "eps-no_bias"],
)
def test_timm_style_attention_options_convert_with_equal_outputs_and_gradients(options):
    original = _randomise(TimmStyleAttention(48, 3, **options)).eval()
    holder = nn.Sequential(copy.deepcopy(original))
    keys = list(holder.state_dict())
    assert convert(holder) == 1
    assert isinstance(holder[0], FusedTimmAttention)
    assert list(holder.state_dict()) == keys

    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(0))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = original(x_ref), holder[0](x_ours)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out_ref * weights).sum().backward()
    (out * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), p_ref in zip(holder[0].named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("norm_layer", "reason"),
    [(None, "qk_norm is off"), (nn.RMSNorm, "implements LayerNorm only")],
)
def test_timm_style_attention_without_layer_norm_q_k_norms_is_left_alone(norm_layer, reason):
    kwargs = {"qk_norm": False} if norm_layer is None else {"norm_layer": norm_layer}
    attention = TimmStyleAttention(48, 3, **kwargs)
    model = nn.Sequential(attention)
    report = convert_report(model)
    assert report.converted == () and reason in report.skipped[0][1]
    assert model[0] is attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convert_inside_an_autocast_region_still_converts(dtype):
    # Verification ran both modules under the caller's autocast, in low precision, and held
    # their difference to the fp32 tolerance: nothing was converted ("outputs differ").
    model = nn.Sequential(
        _randomise(ReferenceAttention(40, 2, qkv_bias=True)).eval(),
        _randomise(TimmStyleAttention(40, 2, qkv_bias=True), seed=1).eval(),
    )
    with torch.autocast("cpu", dtype=dtype):
        report = convert_report(model)
    assert report.skipped == ()
    assert report.converted == ("0", "1")
    assert isinstance(model[0], FusedLabramAttention) and isinstance(model[1], FusedTimmAttention)
    # The verification still refuses a module whose outputs differ.
    model = nn.Sequential(_randomise(ScaledOutputAttention(40, 2)).eval())
    with torch.autocast("cpu", dtype=dtype):
        report = convert_report(model)
    assert report.converted == () and "outputs differ" in report.skipped[0][1]
