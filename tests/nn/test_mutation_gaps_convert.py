"""eegfast.nn.convert: properties no other test pinned (found by mutating the code).

Each test fails on a deliberate one-line mutation of eegfast/nn/convert.py that the rest of the
suite let through (timm itself does not import here: the timm-style module re-creates its
fields and math, see test_convert_audit.py); the mutation is named in the test's docstring.
"""

import copy

import torch
from torch import nn

from eegfast.nn import convert, convert_report
from eegfast.nn.convert import FusedTimmAttention
from tests.nn.test_convert import ReferenceAttention, _randomise
from tests.nn.test_convert_audit import TimmStyleAttention


def _converted(original: nn.Module) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(original))
    assert convert(holder) == 1
    assert isinstance(holder[0], FusedTimmAttention)
    return holder[0]


def test_timm_attention_dropout_is_off_in_eval():
    """A timm model trained with attention dropout converts in eval and serves it without
    dropout. Mutation caught: the replacement's dropout rate taken whatever its mode (its SDPA
    path then drops probabilities in eval: verification refused every such module)."""
    original = _randomise(TimmStyleAttention(48, 3, attn_drop=0.5)).eval()
    fused = _converted(original)
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)


def test_timm_is_causal_and_attn_mask_are_honoured():
    """``forward(x, attn_mask, is_causal)`` as timm's: the fused kernel's causal path and the
    SDPA path of an explicit mask. Mutations caught: ``is_causal`` not passed to the kernel;
    ``attn_mask`` not passed to SDPA (no test called either)."""
    original = _randomise(TimmStyleAttention(48, 3, qkv_bias=True), seed=1).eval()
    fused = _converted(original)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 48, generator=gen)
    mask = torch.rand(2, 1, 9, 9, generator=gen) > 0.3
    mask |= torch.eye(9, dtype=torch.bool)  # every query sees at least itself
    with torch.no_grad():
        for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask.float()}):
            got, want = fused(x, **kwargs), original(x, **kwargs)
            assert not torch.allclose(want, original(x), rtol=1e-3, atol=1e-3)  # masks matter
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=str(kwargs))
        torch.testing.assert_close(fused(x, None, True), original(x, None, True))


def test_q_and_k_norms_with_different_eps_are_left_alone_with_the_reason():
    """The kernel takes one eps for both norms. Mutation caught: the eps check dropped (a small
    difference then passes verification and k is normalised with q's eps; a large one was
    refused only as "outputs differ")."""
    for k_eps in (1e-5, 1e-2):
        attention = ReferenceAttention(40, 2)
        attention.k_norm.eps = k_eps
        model = nn.Sequential(attention)
        report = convert_report(model)
        assert report.converted == () and model[0] is attention
        assert f"q_norm.eps (1e-06) and k_norm.eps ({k_eps}) differ" in report.skipped[0][1]


def test_labram_attention_whose_qkv_linear_has_a_bias_too_is_left_alone():
    """The LaBraM replacement adds ``[q_bias | 0 | v_bias]``, never a bias of the qkv Linear.
    With that bias at zero (a zero-initialised model) verification cannot tell, and the
    replacement would never use or train it. Mutation caught: the structural check dropped."""
    attention = ReferenceAttention(40, 2, qkv_bias=True)
    attention.qkv = nn.Linear(40, 120, bias=True)
    nn.init.zeros_(attention.qkv.bias)
    model = nn.Sequential(attention)
    report = convert_report(model)
    assert report.converted == () and model[0] is attention
    assert "qkv has a Linear bias as well as q_bias/v_bias" in report.skipped[0][1]
