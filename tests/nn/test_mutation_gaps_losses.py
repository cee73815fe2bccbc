"""linear_cross_entropy: properties no other test pinned (found by mutating the code).

Each test fails on one deliberate one-line mutation of eegfast/nn/losses.py that the rest of the
suite let through; the mutation is named in the test's docstring.
"""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from eegfast.nn.losses import linear_cross_entropy


def test_bf16_autocast_softmax_and_cross_entropy_are_fp32():
    """The products run in bf16 under autocast, the softmax and CE in fp32 (as documented and
    as the autocast head + ``F.cross_entropy(logits.float())``). Mutation caught: the logits
    kept in bf16 for the log-softmax, which rounds every CE to bf16 (~4e-3 relative, inside the
    bf16 test's tolerance). The inputs are multiples of 1/8 whose logits bf16 holds exactly,
    so the products are exact and only the softmax's precision shows."""
    gen = torch.Generator().manual_seed(0)
    T, E, V = 24, 4, 97
    hidden = torch.randint(-4, 5, (T, E), generator=gen).float()
    weight = torch.randint(-4, 5, (V, E), generator=gen).float() / 8  # |logit| <= 8, step 1/8
    labels = torch.randint(0, V, (T,), generator=gen)
    token_weight = torch.rand(T, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, None, labels, token_weight, chunk_rows=7)
    logits = hidden @ weight.t()
    assert torch.equal(logits.bfloat16().float(), logits)  # exact in bf16 as well
    expected = F.cross_entropy(logits, labels, reduction="none")
    assert out.per_token.dtype == torch.float32
    torch.testing.assert_close(out.per_token, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, (expected * token_weight).sum(), rtol=1e-6, atol=1e-6)


def test_without_gradients_only_the_logits_product_runs():
    """Under no_grad (evaluation) a weight that requires grad must not make the forward compute
    the gradients too. Mutation caught: ``need_*`` taken from ``ctx.needs_input_grad`` alone,
    ignoring that grad mode is off: three products a chunk instead of one, values unchanged."""
    gen = torch.Generator().manual_seed(1)
    T, E, V = 12, 16, 40
    hidden = torch.randn(T, E, generator=gen, requires_grad=True)
    weight = torch.randn(V, E, generator=gen, requires_grad=True)
    bias = torch.randn(V, generator=gen, requires_grad=True)
    labels = torch.randint(0, V, (T,), generator=gen)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        linear_cross_entropy(hidden, weight, bias, labels, torch.ones(T), chunk_rows=5)
    padded = (E + 1 + 7) // 8 * 8  # the bias rides as a column, zero-padded to 8
    assert counter.get_total_flops() == 2 * T * padded * V
