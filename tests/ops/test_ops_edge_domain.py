"""The ops at the edges of their domain: attention dropout at p = 1, and the VQ reference's
gradient where a row has no code and the codebook's code 0 is not finite."""

import pytest
import torch

from eegfast.ops import qk_norm_attention_packed, vq_nearest
from eegfast.ops.qk_norm_attention import qk_norm_attention


def test_attention_dropout_p_one_drops_every_weight():
    """dropout_p = 1 drops every attention weight, as F.dropout and
    F.scaled_dot_product_attention do (zeros, not NaN); the op refused it, so a model with
    nn.Dropout(1.0) as attention dropout ran with qk_norm=False and failed with qk_norm=True."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen, requires_grad=True) for _ in range(3))
    weight = torch.randn(8, generator=gen, requires_grad=True)
    out = qk_norm_attention(q, k, v, weight, None, weight, None, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for grad in (q.grad, k.grad, v.grad, weight.grad):
        assert torch.equal(grad, torch.zeros_like(grad))
    qkv = torch.randn(2, 5, 3 * 3 * 8, generator=gen)
    packed = qk_norm_attention_packed(qkv, 3, dropout_p=1.0)
    assert packed.shape == (2, 5, 24) and torch.equal(packed, torch.zeros_like(packed))


@pytest.mark.parametrize("dropout_p", [1.5, -0.1, float("nan")])
def test_attention_dropout_p_outside_zero_one_is_refused_by_name(dropout_p):
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        qk_norm_attention(q, q, q, dropout_p=dropout_p, backend="reference")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_vq_reference_gradient_of_a_row_without_code_is_zero(metric, bad):
    """A row that gets index -1 (a NaN row, or every code non-finite) contributes nothing to
    the gradients. The reference scored it against code 0 (index -1 clamped): when code 0 is
    not finite, its gradient came out NaN (0 times NaN in the backward), where the kernels give
    0; one NaN gradient then poisons a clip_grad_norm_ over all parameters."""
    z = torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 1.0, 0.0], [0.3, -1.0, 2.0]])
    codebook = torch.tensor([[1.0, bad, 0.0], [0.5, 1.0, -1.0], [-1.0, 0.0, 2.0]])
    grads = {}
    for backend in ("cpu", "reference"):
        z_, codebook_ = z.clone().requires_grad_(), codebook.clone().requires_grad_()
        indices, scores = vq_nearest(z_, codebook_, metric, return_scores=True, backend=backend)
        assert indices[1] == -1 and 0 not in indices.tolist()
        scores.nansum().backward()
        grads[backend] = (z_.grad, codebook_.grad)
    for got, want in zip(grads["reference"], grads["cpu"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    # no code is finite: every row gets -1, and no gradient at all
    codebook_ = torch.full((2, 3), bad, requires_grad=True)
    _, scores = vq_nearest(z, codebook_, metric, return_scores=True, backend="reference")
    scores.nansum().backward()
    assert torch.equal(codebook_.grad, torch.zeros_like(codebook_))
