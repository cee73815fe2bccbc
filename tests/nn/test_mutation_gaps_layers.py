"""QKNormAttention, Block and drop_path: properties no other test pinned (found by mutating the
code).

Each test fails on a deliberate one-line mutation of eegfast/nn/attention.py or
eegfast/nn/layers.py that the rest of the suite let through; the mutation is named in the
test's docstring.
"""

import pytest
import torch

from eegfast.nn import Block, QKNormAttention
from eegfast.nn.layers import drop_path
from tests.nn.test_attention import manual_attention, randomise


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("hooked_proj", [False, True])
def test_attention_and_projection_dropout_are_off_in_eval(qk_norm, hooked_proj):
    """A model trained with attention / projection dropout is evaluated without it. Mutations
    caught: the attention dropout rate passed to the op in eval mode too; the projection
    dropout applied with training=True on the path that calls a hooked ``proj``. (Every other
    test evaluates modules built with p = 0.)"""
    attn = randomise(QKNormAttention(40, 2, True, qk_norm, attn_drop=0.5, proj_drop=0.5), seed=7)
    attn.eval()
    if hooked_proj:  # a feature hook: proj is called as a module, then proj_drop
        attn.proj.register_forward_hook(lambda module, inputs, output: None)
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), manual_attention(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init_values", [0.1, 0.25])
def test_layer_scale_starts_at_init_values(init_values):
    """γ1 and γ2 start at ``init_values`` (LaBraM: 0.1), the scale of a freshly initialised
    (pretraining) model's residual branches. Mutations caught: either γ initialised to 1 (every
    other test overwrites γ with random values or loads it from a checkpoint)."""
    block = Block(40, 2, init_values=init_values)
    for gamma in (block.gamma_1, block.gamma_2):
        assert gamma.shape == (40,)
        torch.testing.assert_close(gamma.detach(), torch.full((40,), init_values))


def test_drop_path_is_the_identity_outside_training():
    """Mutation caught: ``drop_path(x, p, training=False)`` dropping samples all the same (the
    tests only called it with training=True)."""
    x = torch.randn(64, 3, 8)
    assert drop_path(x, 0.5, False) is x
    assert drop_path(x, 0.0, True) is x
