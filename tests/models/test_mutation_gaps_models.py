"""Model checks that a mutation audit found missing: each test fails on a one-line change of
the code it names."""

import math

import pytest
import torch

from eegfast.models import random_patch_mask
from tests.models.test_pretrain import tiny_pair


def test_padded_electrodes_targets_count_in_no_loss_or_accuracy():
    """A padded electrode's patches are never masked, so they are in view 2 (the complement):
    whatever codes the targets hold there (-1 as the tokenizer marks them, or real codes), they
    enter neither view's loss nor the accuracies."""
    model, _ = tiny_pair(seed=5)
    B, C, A = 2, 3, 2
    x, chans = torch.randn(B, C, A, 200), torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    tokens = padding.repeat_interleave(A, dim=1)
    mask = random_patch_mask(B, C * A, 0.5, padding_mask=tokens,
                             generator=torch.Generator().manual_seed(2))  # fmt: skip
    targets = torch.randint(0, 256, (B, C * A), generator=torch.Generator().manual_seed(6))
    marked = targets.masked_fill(tokens, -1)
    with torch.no_grad():
        expected = model(x, chans, marked, mask, channel_padding_mask=padding)
        got = model(x, chans, targets, mask, channel_padding_mask=padding)
    for name in ("loss", "loss_masked", "loss_complement", "accuracy", "accuracy_complement"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), msg=name)


def test_block_in_training_scales_both_branches_by_their_layer_scale():
    """With stochastic depth in training, a block is x + drop_path(γ1·attn), then
    + drop_path(γ2·mlp) (the same random draws): both γ applied, not only the first."""
    from eegfast.nn import Block
    from eegfast.nn.layers import drop_path

    block = Block(40, 2, init_values=0.1, drop_path=0.3).train()
    with torch.no_grad():  # distinct, non-trivial layer scales
        block.gamma_1.uniform_(0.5, 1.5)
        block.gamma_2.uniform_(2.0, 3.0)
    x = torch.randn(16, 5, 40)
    torch.manual_seed(1)
    got = block(x)
    torch.manual_seed(1)
    h = x + drop_path(block.gamma_1 * block.attn(block.norm1(x)), 0.3, True)
    want = h + drop_path(block.gamma_2 * block.mlp(block.norm2(h)), 0.3, True)
    torch.testing.assert_close(got, want)


def test_hybrid_signal_weight_scales_the_signal_term_of_the_forecasting_loss():
    """``ar_loss = ar_token_loss + signal_weight · ar_signal_loss``."""
    from tests.models.test_hybrid import A, C, _inputs, _model

    model = _model(signal_weight=2.5)
    x, chans = _inputs()
    targets = torch.randint(0, 256, (2, C * A), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ar = model.forecast_losses(x, chans, targets)
    assert ar["ar_signal_loss"] > 0
    torch.testing.assert_close(ar["ar_loss"], ar["ar_token_loss"] + 2.5 * ar["ar_signal_loss"])


def test_upcycled_layers_keep_the_dense_mlps_dropout():
    """A dense MLP with dropout p gives MoE layers that drop their outputs with the same p in
    training (it was passed on as 0, silently training without dropout)."""
    from eegfast.models import create_model, upcycle

    model = create_model("labram_tiny", num_classes=3, drop_rate=0.4)
    upcycle(model, num_experts=4, top_k=2)
    moe = model.blocks[0].mlp.train()
    torch.manual_seed(0)
    out = moe(torch.randn(64, 50, moe.dim))
    assert 0.35 < float((out == 0).float().mean()) < 0.45


def test_upcycled_router_starts_near_uniform():
    """Upcycling gives a fresh router with small weights (std 0.02, as documented), so routing
    starts near uniform: the mean router entropy of a forward is close to log(E)."""
    from eegfast.models import create_model, upcycle

    torch.manual_seed(0)
    model = upcycle(create_model("labram_tiny", num_classes=3).eval(), num_experts=8, top_k=2)
    with torch.no_grad():
        model(torch.randn(2, 4, 3, 200), torch.tensor([0, 1, 2, 3, 4]))
    for block in model.blocks:
        assert float(block.mlp.last_aux.router_entropy) > 0.95 * math.log(8)


def test_initialisation_scales_the_head_and_the_residual_outputs_by_depth():
    """As documented in ``LaBraM.reset_parameters``: the head's weights are
    N(0, init_std) · ``head_init_scale``, and block i's output projections (attention and
    MLP) N(0, init_std) / sqrt(2 (i + 1))."""
    from eegfast.models import create_model

    torch.manual_seed(0)
    model = create_model("labram_tiny", num_classes=50, head_init_scale=0.01)
    std = model.config.init_std
    assert float(model.head.weight.detach().std()) == pytest.approx(std * 0.01, rel=0.1)
    for i, block in enumerate(model.blocks):
        want = std / math.sqrt(2.0 * (i + 1))
        assert float(block.attn.proj.weight.detach().std()) == pytest.approx(want, rel=0.1)
        assert float(block.mlp.fc2.weight.detach().std()) == pytest.approx(want, rel=0.1)
