"""QKNormAttention, Block, Mlp and TemporalConv against plain-PyTorch computations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eegfast.nn import Block, Mlp, QKNormAttention, TemporalConv
from eegfast.nn.layers import masked_group_norm


def manual_attention(attn: QKNormAttention, x, visible=None):
    """Softmax attention spelled out from the module's parameters; visible (B|1, 1, N, N)."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    q, k, v = F.linear(x, attn.qkv.weight, bias).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    return attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return module


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize(
    "qkv_bias, qk_norm, dim, heads",
    [(False, True, 40, 2), (True, False, 50, 2), (True, True, 75, 3)],
)
def test_attention_matches_manual(backend, qkv_bias, qk_norm, dim, heads):
    # seeded: with whatever the global RNG held (the tests run before), an unlucky draw took
    # an fp32 gradient past the tolerance
    torch.manual_seed(dim + heads)
    attn = randomise(QKNormAttention(dim, heads, qkv_bias, qk_norm, backend=backend))
    x = torch.randn(3, 17, dim, requires_grad=True)
    out = attn(x)
    x2 = x.detach().clone().requires_grad_(True)
    expected = manual_attention(attn, x2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    params = [p for p in attn.parameters()]
    got = torch.autograd.grad(out, [x, *params], grad)
    want = torch.autograd.grad(expected, [x2, *params], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_masks(qk_norm):
    attn = randomise(QKNormAttention(40, 2, True, qk_norm), seed=1)
    B, N = 2, 9
    x = torch.randn(B, N, 40)
    padding = torch.zeros(B, N, dtype=torch.bool)
    padding[0, 6:] = True
    blocks = torch.tensor([0, 1, 1, 1, 2, 2, 2, 3, 3])
    for kwargs, visible in [
        (dict(key_padding_mask=padding), (~padding)[:, None, None, :]),
        (dict(causal=True), torch.ones(N, N, dtype=torch.bool).tril()[None, None]),
        (dict(block_causal=blocks), (blocks[None, :] <= blocks[:, None])[None, None]),
        (
            dict(key_padding_mask=padding, block_causal=blocks),
            (~padding)[:, None, None, :] & (blocks[None, :] <= blocks[:, None])[None, None],
        ),
    ]:
        torch.testing.assert_close(
            attn(x, **kwargs), manual_attention(attn, x, visible), atol=1e-5, rtol=1e-5
        )
    # a padded sample gives its unpadded output on its real tokens
    alone = attn(x[:1, :6])
    torch.testing.assert_close(
        attn(x, key_padding_mask=padding)[:1, :6], alone, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_rejects_bad_inputs_naming_them(qk_norm):
    """Both paths (the fused op with qk_norm, SDPA without) take the documented (B, N) bool
    mask only: the SDPA path used to cast a float or integer mask to bool, which the fused
    path rejects; a 2-D x failed in tuple unpacking."""
    attn = QKNormAttention(16, 2, qk_norm=qk_norm)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, dim\).*got \(5, 16\)"):
        attn(torch.randn(5, 16))
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        attn(x.tolist())
    for mask in (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long)):
        with pytest.raises(TypeError, match="key_padding_mask must be bool"):
            attn(x, key_padding_mask=mask)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\) = \(2, 5\)"):
        attn(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a tensor or None, got list"):
        attn(x, key_padding_mask=[[False] * 5] * 2)
    # A mask on another device is refused on both paths (the SDPA path used to copy it).
    with pytest.raises(ValueError, match="but key_padding_mask is on meta"):
        attn(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="but block_causal is on meta"):
        attn(x, block_causal=torch.zeros(5, dtype=torch.long, device="meta"))
    assert attn(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)).shape == x.shape


def test_attention_visibility_takes_a_device_named_with_or_without_its_index():
    """``device="cpu:0"`` (or ``"cuda"`` for a mask on ``cuda:0``) names the mask's device:
    comparing torch.device objects refused it as another device."""
    from eegfast.nn.attention import attention_visibility

    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 3] = True
    want = attention_visibility(2, 4, key_padding_mask=mask, device="cpu")
    got = attention_visibility(2, 4, key_padding_mask=mask, device="cpu:0")
    assert torch.equal(got, want) and not bool(got[0, 0, 0, 3])
    with pytest.raises(ValueError, match="but key_padding_mask is on cpu"):
        attention_visibility(2, 4, key_padding_mask=mask, device="meta")


def test_attention_state_dict_keys():
    assert set(QKNormAttention(200, 10).state_dict()) == {
        "qkv.weight", "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias",
        "proj.weight", "proj.bias",
    }  # fmt: skip
    assert set(QKNormAttention(200, 10, qkv_bias=True, qk_norm=False).state_dict()) == {
        "qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias",
    }  # fmt: skip
    with pytest.raises(ValueError, match="num_heads"):
        QKNormAttention(30, 4)
    with pytest.raises(ValueError, match="last dim"):
        QKNormAttention(20, 2)(torch.randn(1, 3, 21))


def test_attention_dropout_is_a_module_that_rate_setting_code_reaches():
    """Code that sets dropout by walking modules() (as for timm and the reference LaBraM)
    changes the attention dropout the kernel applies."""
    torch.manual_seed(0)
    attn = QKNormAttention(40, 2).train()
    x = torch.randn(2, 9, 40)
    assert isinstance(attn.attn_drop, nn.Dropout) and attn.attn_drop.p == 0.0
    torch.testing.assert_close(attn(x), attn.eval()(x))  # p = 0: no dropout when training
    for module in attn.modules():
        if isinstance(module, nn.Dropout) and module is not attn.proj_drop:
            module.p = 0.5
    attn.train()
    assert (attn(x) - attn.eval()(x)).abs().max() > 1e-3
    assert attn.state_dict().keys() == QKNormAttention(40, 2).state_dict().keys()


def test_block_matches_manual_and_passes_task_id():
    block = randomise(Block(40, 2, init_values=0.1, drop_path=0.0), seed=2)
    x = torch.randn(2, 7, 40)
    a = manual_attention(block.attn, block.norm1(x))
    h = x + block.gamma_1 * a
    expected = h + block.gamma_2 * block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)

    seen = []

    class RecordingFFN(Mlp):
        def forward(self, x, task_id=None):
            seen.append(task_id)
            return super().forward(x)

    block.mlp = RecordingFFN(40, 160)
    task = torch.tensor([3, 1])
    block(x, task_id=task)
    assert seen == [task]

    class PlainAttention(QKNormAttention):  # a replacement that knows no residual argument
        def forward(self, x, *, key_padding_mask=None, causal=False, block_causal=None):
            return super().forward(x, key_padding_mask=key_padding_mask)

    attn_state = block.attn.state_dict()
    block.attn = PlainAttention(40, 2)
    block.attn.load_state_dict(attn_state)
    mlp = block.mlp
    expected = h + block.gamma_2 * mlp.fc2(F.gelu(mlp.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert Block(40, 2, init_values=0.0).gamma_1 is None
    assert "gamma_1" not in Block(40, 2, init_values=0.0).state_dict()


def test_block_drop_path_only_in_training():
    block = Block(40, 2, drop_path=0.5).train()
    x = torch.randn(64, 3, 40)
    torch.manual_seed(0)
    out = block(x)
    # some samples skip both residual branches entirely, others do not
    unchanged = (out - x).abs().amax((1, 2)) == 0
    assert 0 < int(unchanged.sum()) < 64
    block.eval()
    torch.testing.assert_close(block(x), block(x))


def test_block_drop_path_residual_is_the_composition_in_one_pass():
    """The training path's x + drop_path(γ·branch) as one addcmul with a (B, 1, dim) factor:
    the same samples dropped (the same random draw) and the same values and gradients as the
    composition x + γ·branch·mask / keep."""
    from eegfast.nn.layers import drop_path

    block = Block(40, 2, init_values=0.1, drop_path=0.3).train()
    x = torch.randn(16, 5, 40, requires_grad=True)
    branch = torch.randn(16, 5, 40, requires_grad=True)
    torch.manual_seed(1)
    fused = block._dropped_residual(x, branch, block.gamma_1)
    torch.manual_seed(1)
    composed = x + drop_path(block.gamma_1 * branch, 0.3, True)
    keep = 1 - 0.3
    torch.manual_seed(1)
    mask = torch.empty(16, 1, 1).bernoulli_(keep)
    written_out = x + block.gamma_1 * branch * mask / keep
    assert 0 < int(mask.sum()) < 16
    torch.testing.assert_close(fused, composed)
    torch.testing.assert_close(fused, written_out)
    grad = torch.randn_like(fused)
    grads = [torch.autograd.grad(y, (x, branch, block.gamma_1), grad) for y in (fused, written_out)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)
    # without layer scale
    torch.manual_seed(2)
    fused = block._dropped_residual(x, branch, None)
    torch.manual_seed(2)
    torch.testing.assert_close(fused, x + branch * torch.empty(16, 1, 1).bernoulli_(keep) / keep)


def test_block_drop_path_keep_scale_is_not_rounded_to_a_low_precision_branch():
    """Under bf16 autocast the branch is bf16 while the residual and γ are float32: the keep
    scale 1 / (1 - p) was drawn in the branch's dtype (1 / 0.9 -> 1.109375 in bf16), so every
    kept branch was shrunk by 0.16% against inference (where it is scaled by 1); the
    composition x + drop_path(γ·branch) computed it in float32."""
    block = Block(40, 2, init_values=0.1, drop_path=0.1).train()
    x = torch.randn(16, 5, 40)
    branch = torch.randn(16, 5, 40).bfloat16()
    for gamma in (block.gamma_1, None):
        torch.manual_seed(3)
        fused = block._dropped_residual(x, branch, gamma)
        torch.manual_seed(3)
        mask = torch.empty(16, 1, 1).bernoulli_(0.9)
        assert 0 < int(mask.sum()) < 16
        scaled = branch.float() if gamma is None else gamma * branch.float()
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, x + scaled * (mask / 0.9))


def test_drop_path_of_a_bf16_tensor_is_not_scaled_by_a_rounded_keep_scale():
    """drop_path(x) of a bf16 x: each kept element is x / (1 - p) rounded once, as the
    composition x * mask / keep gave it, not x times 1 / 0.9 rounded to bf16 (1.109375)."""
    from eegfast.nn.layers import drop_path

    x = torch.randn(64, 5, 8).bfloat16()
    torch.manual_seed(4)
    got = drop_path(x, 0.1, True)
    torch.manual_seed(4)
    mask = torch.empty(64, 1, 1).bernoulli_(0.9)
    assert 0 < int(mask.sum()) < 64 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, (x.float() * mask / 0.9).bfloat16(), rtol=0, atol=0)


def test_mlp_uses_exact_gelu_and_ignores_task_id():
    mlp = randomise(Mlp(8, 32), seed=3)
    x = torch.randn(5, 8) * 3
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="none"))
    torch.testing.assert_close(mlp(x, task_id=torch.tensor(1)), expected)
    # without autograd the GELU runs in place on fc1's output: same values
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), expected)
    # a swapped-in activation is honoured on both paths
    mlp.act = torch.nn.GELU(approximate="tanh")
    expected_tanh = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert not torch.allclose(expected_tanh, expected)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected_tanh)
    mlp.act = torch.nn.ReLU()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.fc2(torch.relu(mlp.fc1(x))))


def reference_temporal_conv(conv: TemporalConv, x):
    B, C, A, T = x.shape
    h = x.reshape(B, 1, C * A, T)
    for c, n in ((conv.conv1, conv.norm1), (conv.conv2, conv.norm2), (conv.conv3, conv.norm3)):
        h = F.gelu(n(c(h)))
    return torch.cat([h[:, :, :, t] for t in range(h.shape[-1])], dim=1).transpose(1, 2)


def test_temporal_conv_layout_and_padding():
    conv = randomise(TemporalConv(8), seed=4)
    x = torch.randn(2, 3, 4, 200)
    out = conv(x)
    assert out.shape == (2, 12, 200) and conv.embed_dim == 200
    torch.testing.assert_close(out, reference_temporal_conv(conv, x), atol=1e-5, rtol=1e-5)
    # GroupNorm statistics pool over all patches of a sample: changing one patch moves others
    x2 = x.clone()
    x2[0, 0, 0] += 5
    assert not torch.allclose(conv(x2)[0, 5], out[0, 5])
    # padded electrodes are left out of the statistics: real patches keep their embedding
    padded = torch.cat([x, torch.randn(2, 2, 4, 200)], dim=1)
    mask = torch.zeros(2, 5 * 4, dtype=torch.bool)
    mask[:, 12:] = True
    torch.testing.assert_close(conv(padded, mask)[:, :12], out, atol=1e-5, rtol=1e-5)


def test_masked_group_norm_without_padding_is_group_norm():
    norm = randomise(nn.GroupNorm(4, 8), seed=5)
    x = torch.randn(3, 8, 10, 25)
    valid = torch.ones(3, 10, dtype=torch.bool)
    torch.testing.assert_close(masked_group_norm(x, norm, valid), norm(x), atol=1e-5, rtol=1e-5)


def test_block_inference_follows_weight_updates_made_through_data():
    # ``p.data.mul_()`` / ``p.data.copy_()`` (weight init, EMA teachers) bump the version
    # counter of the ``.data`` alias only: the packed weights of the CPU inference path must
    # still see the new values, not serve the ones packed before the update.
    block = randomise(Block(40, 2, qkv_bias=True)).eval()
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        block(x)  # packs the weights where the fused path applies
        block.attn.proj.weight.data.mul_(-2.0)
        block.mlp.fc2.weight.data.copy_(torch.randn(40, 160) * 0.1)
        block.mlp.fc1.weight.data.add_(0.5)
        block.gamma_1.data.mul_(3.0)  # the layer scale folded into the packed proj weight
        got = block(x)
        expected = copy.deepcopy(block)(x)  # new weight tensors: packed afresh
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_hooks_on_a_blocks_attention_and_mlp_see_the_branch_alone(training):
    # The block fuses its residual and layer scale into attn / mlp's output projection: a
    # forward hook on block.attn had seen x + γ·attn(x), and an ablation hook returning zeros
    # had zeroed the whole residual stream instead of the attention branch.
    block = randomise(Block(40, 2, qkv_bias=True)).train(training)
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        attn_out = block.attn(block.norm1(x))
        mid = x + block.gamma_1 * attn_out
        mlp_out = block.mlp(block.norm2(mid))
    seen = {}
    block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o.detach()))
    block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o.detach()))
    with torch.no_grad():
        torch.testing.assert_close(block(x), mid + block.gamma_2 * mlp_out)
    torch.testing.assert_close(seen["attn"], attn_out)
    torch.testing.assert_close(seen["mlp"], mlp_out)

    block.attn.register_forward_hook(lambda m, i, o: torch.zeros_like(o))  # ablate attention
    with torch.no_grad():
        expected = x + block.gamma_2 * block.mlp(block.norm2(x))
        torch.testing.assert_close(block(x), expected)


class LowRankAdapter(nn.Module):
    """A LoRA-style wrapper put in place of a Linear: exposes its base's weight and bias (as
    peft's adapters do) but adds a low-rank term in forward."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(2, base.in_features) * 0.3)
        self.up = nn.Parameter(torch.randn(base.out_features, 2) * 0.3)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.down.t() @ self.up.t()


@pytest.mark.parametrize("name", ["mlp.fc1", "mlp.fc2", "attn.proj", "attn.qkv"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("replaced", [True, False])
def test_replaced_or_hooked_linears_of_a_block_are_called(name, grad, replaced):
    # Mlp and QKNormAttention applied fc1 / fc2 / proj / qkv through their ``weight``: an
    # adapter put in their place was silently skipped and their forward hooks never ran. (The
    # qkv Linear has no bias of its own: LaBraM's q/v bias is added to what it returns.)
    # Not replaced: the plain nn.Linear with a forward hook, which must be called as well.
    torch.manual_seed(0)
    block = randomise(Block(40, 2, qkv_bias=True)).eval()
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(3))
    parent_name, child = name.split(".")
    parent = block.get_submodule(parent_name)
    if replaced:
        setattr(parent, child, LowRankAdapter(getattr(parent, child)))
    calls = []
    getattr(parent, child).register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.set_grad_enabled(grad):
        got = block(x)
    # the composition spelled out, every submodule called
    with torch.no_grad():
        a = block.attn
        bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
        qkv = (a.qkv(block.norm1(x)) + bias).view(2, 9, 3, 2, 20)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        probs = ((a.q_norm(q) @ a.k_norm(k).transpose(-1, -2)) * 20**-0.5).softmax(-1)
        mid = x + block.gamma_1 * a.proj((probs @ v).transpose(1, 2).reshape(2, 9, 40))
        mlp = block.mlp
        expected = mid + block.gamma_2 * mlp.fc2(mlp.act(mlp.fc1(block.norm2(mid))))
    assert len(calls) == 2  # once by the block, once above
    # (1e-4: torch 2.11's CPU GEMMs round one element of the two compositions 1.1e-5 apart;
    # an adapter or hook skipped moves the output by ~0.1)
    torch.testing.assert_close(got.detach(), expected, atol=1e-4, rtol=1e-4)
