"""Acceptance checks of issue 4 (fused QK-LayerNorm attention) not covered elsewhere: long
sequences past the kernels' block sizes with every mask, and the same argument checks on both
paths of :class:`eegfast.nn.QKNormAttention`."""

import math

import pytest
import torch
import torch.nn.functional as F

from eegfast.nn import QKNormAttention
from eegfast.ops import qk_norm_attention
from eegfast.ops.qk_norm_attention import cpu_attention_isa

requires_cpp = pytest.mark.skipif(cpu_attention_isa() is None, reason="eegfast._C not built")


def chunked_reference(q, k, v, params, *, key_padding_mask, block_causal, chunk=512):
    """float64 causal + block-causal + padded attention, query rows in chunks so that no (N, N)
    matrix is formed (N = 4097 here). Rows that see no key are zero."""
    n, d = q.shape[-2:]
    qn = F.layer_norm(q, (d,), params[0], params[1], 1e-6)
    kn = F.layer_norm(k, (d,), params[2], params[3], 1e-6)
    keys = torch.arange(n)
    rows = []
    for start in range(0, n, chunk):
        queries = torch.arange(start, min(start + chunk, n))
        scores = (qn[:, :, queries] * d**-0.5) @ kn.transpose(-1, -2)
        visible = (keys[None] <= queries[:, None]) & (
            block_causal[None] <= block_causal[queries, None]
        )
        visible = visible[None, None] & ~key_padding_mask[:, None, None, :]
        sees_any = visible.any(-1, keepdim=True)
        scores = torch.where(sees_any, scores.masked_fill(~visible, -math.inf), 0.0)
        rows.append((torch.softmax(scores, -1) * sees_any) @ v)
    return torch.cat(rows, dim=2)


@requires_cpp
def test_cpu_long_odd_sequence_with_every_mask_matches_reference():
    """N = 4097 (one past a power of two, many key blocks), causal, block-causal ids and key
    padding whose first 40 keys are padded (so the first queries see nothing): output and all
    seven gradients against float64."""
    B, H, N, D = 1, 2, 4097, 20
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).requires_grad_() for _ in range(3))
    params = [(1 + 0.3 * torch.randn(D, generator=gen)).requires_grad_() for _ in range(4)]
    padding = torch.rand(B, N, generator=gen) < 0.2
    padding[:, :40] = True
    ids = torch.randint(0, 300, (N,), generator=gen).sort().values
    out = qk_norm_attention(q, k, v, *params, key_padding_mask=padding, causal=True,
                            block_causal=ids, backend="cpu")  # fmt: skip
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, [q, k, v, *params], grad_out)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, *params)]
    expected = chunked_reference(*leaves[:3], leaves[3:], key_padding_mask=padding,
                                 block_causal=ids)  # fmt: skip
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    assert (out[:, :, :40] == 0).all() and not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    for name, got, want in zip(("q", "k", "v", "q_w", "q_b", "k_w"), grads, expected_grads,
                               strict=False):  # fmt: skip
        bound = 2e-5 * max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() < bound, name
    assert (grads[6] == 0).all()  # k_norm_bias: shifts every score of a row alike


@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_module_checks_block_causal_and_causal_on_both_paths(qk_norm):
    """The SDPA path (qk_norm=False, the tokenizer's) took float or bool block ids and a
    non-bool ``causal`` silently, and failed on (B, N) ids inside a broadcast, where the fused
    path raises errors naming the argument."""
    attn = QKNormAttention(16, 2, qk_norm=qk_norm)
    x = torch.randn(2, 5, 16)
    for ids in (torch.zeros(5), torch.zeros(5, dtype=torch.bool)):
        with pytest.raises(TypeError, match="block_causal must be an integer tensor"):
            attn(x, block_causal=ids)
    for ids in (torch.zeros(2, 5, dtype=torch.long), torch.zeros(6, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"block_causal must have shape \(N,\) = \(5,\)"):
            attn(x, block_causal=ids)
    with pytest.raises(TypeError, match="block_causal must be a tensor or None, got list"):
        attn(x, block_causal=[0, 0, 1, 1, 2])
    for causal in (1, torch.tensor(True)):
        with pytest.raises(TypeError, match="causal must be a bool"):
            attn(x, causal=causal)
    ids = torch.tensor([0, 0, 1, 1, 2])
    assert attn(x, causal=True, block_causal=ids).shape == x.shape
