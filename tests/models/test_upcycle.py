"""Sparse upcycling: dense → MoE without changing the model's outputs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eegfast.models import create_hybrid_model, create_model, upcycle
from eegfast.models.hybrid import forecast_features, generate
from eegfast.nn import Mlp, MoEFFN, moe_aux_losses


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
    # one int for a list ("'int' object is not iterable"), or 1.0 (a float index)
    with pytest.raises(TypeError, match="layers must be a list of block indices, got 1"):
        upcycle(RefModel(depth=2), layers=1)
    with pytest.raises(TypeError, match="layers must hold ints, got 1.0"):
        upcycle(RefModel(depth=2), layers=[1.0])
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


# --------------------------------------------------------------------------------------------
# Padded electrodes: not routed, not in the aux losses (batches that mix electrode sets)
# --------------------------------------------------------------------------------------------

AUX_NAMES = ("load_balance_loss", "z_loss", "expert_load", "router_entropy", "dropped")


def _make_routing_matter(model, capacity, seed=1):
    """Upcycle with distinct experts and a decisive router (outputs depend on the routing)."""
    upcycle(
        model,
        num_experts=4,
        top_k=2,
        noise_std=0.3,
        capacity_factor=capacity,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.weight.normal_(0, 1.0)
    return model


def _with_padded_electrode(x, chans, fill=0.0, at=1):
    """Insert a padded electrode (values ``fill``) at electrode index ``at`` of every sample:
    x (B, C, A, T) -> (B, C + 1, A, T), chans (C + 1,) -> (C + 2,), mask (B, C + 1)."""
    B, C, A, T = x.shape
    x_pad = torch.cat((x[:, :at], torch.full((B, 1, A, T), fill), x[:, at:]), dim=1)
    chans_pad = torch.cat((chans[: at + 1], chans[:1], chans[at + 1 :]))
    padding = torch.zeros(B, C + 1, dtype=torch.bool)
    padding[:, at] = True
    return x_pad, chans_pad, padding


def _aux(blocks):
    return [block.mlp.last_aux for block in blocks]


def _assert_same_aux(got, expected):
    for layer, (a, b) in enumerate(zip(got, expected, strict=True)):
        for name in AUX_NAMES:
            torch.testing.assert_close(a[name], b[name], msg=f"blocks[{layer}] {name}")


@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("training", [False, True])
def test_labram_padded_electrodes_are_not_routed(capacity, training):
    """A batch with a padded electrode gives the real tokens the outputs, and the MoE layers
    the aux losses, of the batch without it; with a capacity factor the padding would take
    expert slots that real tokens then lose. In training (drop path, same RNG draws) too."""
    torch.manual_seed(0)
    model = create_model("labram_tiny", num_classes=3, drop_path_rate=0.5).train(training)
    _make_routing_matter(model, capacity)
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 4, 9, 2])
    x_pad, chans_pad, padding = _with_padded_electrode(x, chans, fill=5.0)
    torch.manual_seed(7)
    expected = model.forward_features(x, chans)  # the head's logits are ~1e-3 of these
    expected_aux = _aux(model.blocks)
    torch.manual_seed(7)
    got = model.forward_features(x_pad, chans_pad, channel_padding_mask=padding)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _assert_same_aux(_aux(model.blocks), expected_aux)
    if capacity is not None:
        assert sum(int(aux.dropped) for aux in expected_aux) > 0  # the capacity binds


def test_labram_mixed_electrode_sets_each_sample_as_alone():
    """Dropless: each sample of a mixed batch gets the output it gets alone, and gradients
    are finite with non-finite values in the padded electrode."""
    torch.manual_seed(0)
    model = _make_routing_matter(create_model("labram_tiny", num_classes=3).eval(), None)
    a, b = torch.randn(1, 4, 2, 200), torch.randn(1, 2, 2, 200)
    chans_a, chans_b = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 9, 8])
    x = torch.cat([a, torch.cat([b, torch.full((1, 2, 2, 200), math.nan)], dim=1)])
    chans = torch.stack([chans_a, torch.cat([chans_b, torch.zeros(2, dtype=torch.long)])])
    padding = torch.tensor([[False] * 4, [False] * 2 + [True] * 2])
    batched = model(x, chans, channel_padding_mask=padding)
    assert torch.isfinite(batched).all()
    with torch.no_grad():
        torch.testing.assert_close(batched[0], model(a, chans_a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], model(b, chans_b)[0], atol=1e-5, rtol=1e-5)
    model(x, chans, channel_padding_mask=padding)
    loss = batched.square().sum() + sum(moe_aux_losses(model).values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_pretrain_padded_electrodes_are_not_routed():
    torch.manual_seed(0)
    model = create_model("labram_tiny_pretrain", attention_backend="reference")
    _make_routing_matter(model.student, 0.5)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # a loss that the features move
    B, C, A = 2, 3, 2
    x, chans = torch.randn(B, C, A, 200), torch.tensor([0, 4, 9, 2])
    targets = torch.randint(0, 256, (B, C, A))
    mask = torch.rand(B, C, A, generator=torch.Generator().manual_seed(3)) < 0.5
    expected = model(x, chans, targets.flatten(1), mask.flatten(1))
    expected_aux = _aux(model.student.blocks)
    x_pad, chans_pad, padding = _with_padded_electrode(x, chans, fill=-3.0)
    targets_pad = torch.cat((targets[:, :1], torch.full((B, 1, A), -1), targets[:, 1:]), dim=1)
    mask_pad = torch.cat((mask[:, :1], torch.zeros(B, 1, A, dtype=torch.bool), mask[:, 1:]), 1)
    got = model(
        x_pad, chans_pad, targets_pad.flatten(1), mask_pad.flatten(1), channel_padding_mask=padding
    )
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.accuracy, expected.accuracy)
    _assert_same_aux(_aux(model.student.blocks), expected_aux)
    assert sum(int(aux.dropped) for aux in expected_aux) > 0


def test_hybrid_forecast_padded_electrodes_are_not_routed():
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain")
    _make_routing_matter(model.backbone, None)
    x, chans = torch.randn(2, 3, 3, 200), torch.tensor([0, 4, 9, 2])
    expected = forecast_features(model.backbone, x, chans)
    expected_aux = _aux(model.backbone.blocks)
    x_pad, chans_pad, padding = _with_padded_electrode(x, chans, fill=2.0, at=2)
    got = forecast_features(model.backbone, x_pad, chans_pad, channel_padding_mask=padding)
    torch.testing.assert_close(got[:, ~padding[0]], expected, atol=1e-5, rtol=1e-5)
    _assert_same_aux(_aux(model.backbone.blocks), expected_aux)


def test_hybrid_block_causal_passes_refuse_capacity_limited_experts():
    """With a capacity limit a later patch took an earlier patch's expert slot (patch 0..3
    features moved by ~1e-2 when patch 4 changed): the forecast pass and generation refuse
    it, naming the layer; dropless layers keep the earlier patches independent of later ones."""
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain").eval()
    _make_routing_matter(model.backbone, 0.5)
    x, chans = torch.randn(1, 3, 5, 200), torch.tensor([0, 4, 9, 2])
    with pytest.raises(ValueError, match=r"blocks\[0\]\.mlp has capacity_factor=0.5"):
        forecast_features(model.backbone, x, chans)
    with pytest.raises(ValueError, match="dropless"):
        generate(model, x[:, :, :2], chans, 1)
    for block in model.backbone.blocks:
        block.mlp.capacity_factor = None
    changed = x.clone()
    changed[:, :, 4] += 3.0
    with torch.no_grad():
        before, after = (
            forecast_features(model.backbone, x, chans),
            forecast_features(model.backbone, changed, chans),
        )
    torch.testing.assert_close(before[:, :, :4], after[:, :, :4])


def test_upcycled_model_compiles_with_padding_mask():
    torch.manual_seed(0)
    model = _make_routing_matter(create_model("labram_tiny", num_classes=3).eval(), 0.5)
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, True, False]])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, chans, channel_padding_mask=padding)
    got_aux = _aux(model.blocks)
    expected = model(x, chans, channel_padding_mask=padding)
    torch.testing.assert_close(out, expected)
    _assert_same_aux(got_aux, _aux(model.blocks))
    out.sum().backward()
    assert model.blocks[0].mlp.router.weight.grad is not None


def test_deepcopy_and_averaged_model_after_a_training_forward():
    """An upcycled model can be deep-copied (EMA, AveragedModel, snapshots) after a training
    forward, whose aux losses are non-leaf tensors in ``last_aux``."""
    torch.manual_seed(0)
    model = upcycle(create_model("labram_tiny", num_classes=3), num_experts=4, top_k=2)
    x, chans = torch.randn(2, 3, 2, 200), torch.arange(4)
    loss = model(x, chans).sum() + sum(moe_aux_losses(model).values())
    twin = copy.deepcopy(model)  # raised: non-leaf tensors do not support deepcopy
    average = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model too
    assert all(m.last_aux is None for m in twin.modules() if isinstance(m, MoEFFN))
    # the original keeps its report (the step still needs it), the copy computes the same
    assert model.blocks[0].mlp.last_aux is not None
    loss.backward()
    with torch.no_grad():
        expected = model.eval()(x, chans)
        torch.testing.assert_close(twin.eval()(x, chans), expected)
        torch.testing.assert_close(average.eval()(x, chans), expected)
    assert twin.blocks[1].mlp.last_aux is not None  # its own forward's report


def test_noise_on_a_one_value_tensor_is_finite():
    """A dense layer with one output: its bias has no std (NaN), which made every expert's
    bias, and so the output, NaN; now it is copied exactly and the weights get their noise."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    moe = MoEFFN.from_dense(
        fc1, fc2, 3, 2, noise_std=0.1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(moe.fc2_bias).all()
    torch.testing.assert_close(moe.fc2_bias, fc2.bias.detach().expand(3, 1))
    assert not torch.equal(moe.fc2_weight[0], moe.fc2_weight[1])  # the noise is still there
    assert torch.isfinite(moe(torch.randn(5, 4))).all()


def test_a_layer_that_cannot_be_upcycled_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = create_model("labram_tiny", num_classes=3).eval()
    model.blocks[1].mlp.act = nn.GELU(approximate="tanh")  # not the exact GELU: refused
    x, chans = torch.randn(1, 2, 2, 200), torch.arange(3)
    before = model(x, chans)
    with pytest.raises(TypeError, match=r"blocks\[1\]\.mlp\.act"):
        upcycle(model, num_experts=4, top_k=2)
    # blocks[0] was already an MoE layer when blocks[1] raised: half an upcycled model
    assert all(type(block.mlp) is Mlp for block in model.blocks)
    torch.testing.assert_close(model(x, chans), before)


class FunctionalReluMlp(nn.Module):
    """fc1 / fc2 with the activation in forward(): no ``act`` module to inspect."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_an_mlp_without_an_act_module_is_refused():
    """It was upcycled into GELU experts: different outputs, no error."""
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].mlp = FunctionalReluMlp(8, 16)
    with pytest.raises(
        TypeError, match=r"blocks\[0\]\.mlp\.act must be nn\.GELU\(\) \(exact\), got None"
    ):
        upcycle(model, num_experts=2, top_k=1)
    assert isinstance(model.blocks[0].mlp, FunctionalReluMlp)
