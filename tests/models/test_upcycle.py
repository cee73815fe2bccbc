"""Sparse upcycling: dense → MoE without changing the model's outputs."""

import pytest
import torch
from torch import nn

from eegfast.models import create_model, upcycle
from eegfast.nn import MoEFFN, moe_aux_losses


class RefMlp(nn.Module):
    """The reference LaBraM / timm Mlp: fc1, act, drop, fc2."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))  # calls mlp(x) without task_id, as the reference


class RefModel(nn.Module):
    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(RefBlock(dim, 4) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_reference_style_model_outputs_unchanged():
    torch.manual_seed(0)
    model = RefModel().eval()
    x = torch.randn(4, 11, 16)
    dense = model(x)
    dense_mlp = model.blocks[1].mlp
    upcycle(model, num_experts=8, top_k=2, layers=[0, -2])
    assert isinstance(model.blocks[0].mlp, MoEFFN) and isinstance(model.blocks[1].mlp, MoEFFN)
    assert isinstance(model.blocks[2].mlp, RefMlp)
    moe = model.blocks[1].mlp
    for e in range(8):  # every expert an exact copy
        assert torch.equal(moe.fc1_weight[e], dense_mlp.fc1.weight)
        assert torch.equal(moe.fc2_bias[e], dense_mlp.fc2.bias)
    out = model(x)
    # renormalised top-2 gates sum to 1, so the weighted sum of identical experts = dense
    flat = model.blocks[1].norm2(x.reshape(-1, 16))
    probs = moe.router_logits(flat, None).softmax(-1)
    top = probs.topk(2, -1).values
    torch.testing.assert_close((top / top.sum(-1, keepdim=True)).sum(-1), torch.ones(44))
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6)
    assert set(moe_aux_losses(model)) == {"load_balance_loss", "z_loss"}


def test_eegfast_labram_outputs_unchanged_and_task_routing():
    torch.manual_seed(0)
    model = create_model("labram_tiny", num_classes=3).eval()
    x = torch.randn(2, 4, 3, 200)
    chans = list(range(5))
    dense = model(x, chans)
    upcycle(model, num_experts=4, top_k=2, num_tasks=3)
    assert all(isinstance(b.mlp, MoEFFN) for b in model.blocks)
    torch.testing.assert_close(model(x, chans), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model(x, chans, task_id=torch.tensor([0, 2])), dense, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="task_id"):
        model(x, chans, task_id=torch.tensor([0, 3]))
    loss = model(x, chans, task_id=torch.tensor([0, 2])).sum() + sum(moe_aux_losses(model).values())
    loss.backward()
    assert model.blocks[0].mlp.fc1_weight.grad is not None


def test_noise_and_errors():
    torch.manual_seed(0)
    model = RefModel(depth=2)
    upcycle(
        model, num_experts=3, top_k=1, noise_std=0.01, generator=torch.Generator().manual_seed(1)
    )
    w = model.blocks[0].mlp.fc1_weight
    assert not torch.equal(w[0], w[1])
    assert (w[0] - w[1]).std() < 0.05 * w[0].std()
    with pytest.raises(ValueError, match="already a MoEFFN"):
        upcycle(model, layers=[0])
    with pytest.raises(IndexError, match="out of range"):
        upcycle(RefModel(depth=2), layers=[2])
    with pytest.raises(ValueError, match="top_k"):
        upcycle(RefModel(depth=2), num_experts=2, top_k=3)
    with pytest.raises(TypeError, match="no .blocks"):
        upcycle(nn.Linear(2, 2))
    bad = RefModel(depth=1)
    bad.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    with pytest.raises(TypeError, match="exact"):
        upcycle(bad)


def test_upcycled_layers_take_the_model_mode():
    """Upcycling a model in eval mode gives MoE layers in eval mode: no output dropout, the
    dense model's (deterministic) outputs; a model in training mode keeps training layers."""
    torch.manual_seed(0)
    model = RefModel(depth=2)
    for block in model.blocks:
        block.mlp.drop.p = 0.5
    model.eval()
    x = torch.randn(3, 7, 16)
    dense = model(x)
    upcycle(model, num_experts=4, top_k=2)
    assert not any(block.mlp.training for block in model.blocks)
    torch.testing.assert_close(model(x), dense, atol=1e-6, rtol=1e-6)
    training = upcycle(RefModel(depth=2).train(), num_experts=4, top_k=2)
    assert all(block.mlp.training for block in training.blocks)
