"""eegfast.nn.convert: swapping other codebases' q/k-LayerNorm attention for the fused kernel.

The reference-LaBraM modules below are re-created from ../shared/spec/LABRAM.md (one qkv Linear
without bias, optional q_bias / v_bias with no key bias, q_norm / k_norm LayerNorm(head_dim)
shared by heads, head_dim^-0.5 scale, softmax, output projection; pre-norm blocks with
layer scale). The timm tests use a real ``timm.models.vision_transformer.VisionTransformer``,
the braindecode tests a real ``braindecode.models.Labram`` (both run by ``make timm-check``).
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eegfast.ops
from eegfast.nn import ConversionReport, convert, convert_report
from eegfast.nn.convert import FusedLabramAttention, FusedTimmAttention
from eegfast.ops._backend import triton_interpreting
from tests._braindecode import braindecode_labram


class ReferenceAttention(nn.Module):
    """Plain-PyTorch LaBraM attention with the reference's attribute and state-dict names."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_norm=nn.LayerNorm, attn_drop=0.0,
                 proj_drop=0.0, norm_eps=1e-6):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        if qk_norm is not None:
            self.q_norm = qk_norm(head_dim, eps=norm_eps)
            self.k_norm = qk_norm(head_dim, eps=norm_eps)
        else:
            self.q_norm = None
            self.k_norm = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rel_pos_bias=None):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ReferenceBlock(nn.Module):
    def __init__(self, dim, num_heads, **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReferenceAttention(dim, num_heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma_1 = nn.Parameter(0.1 * torch.ones(dim))
        self.gamma_2 = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x, rel_pos_bias=None):
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class ReferenceEncoder(nn.Module):
    """Patch embedding stand-in, cls token, pre-norm blocks, mean-pooled classifier."""

    def __init__(self, dim=40, num_heads=2, depth=2, num_classes=3, **attn_kwargs):
        super().__init__()
        self.patch_embed = nn.Linear(200, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            [ReferenceBlock(dim, num_heads, **attn_kwargs) for _ in range(depth)]
        )
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # (B, C·A, 200)
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (LayerNorm affine, q/v biases), so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _forward_backward(model: nn.Module, x: torch.Tensor, **kwargs):
    x = x.clone().requires_grad_(True)
    out = model(x, **kwargs)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_reference_labram_converts_with_equal_outputs_and_gradients(qkv_bias, backend):
    original = _randomise(ReferenceEncoder(depth=2, qkv_bias=qkv_bias))
    model = copy.deepcopy(original)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())

    assert convert(model, backend=backend) == 2
    assert all(isinstance(block.attn, FusedLabramAttention) for block in model.blocks)
    assert all(block.attn.backend == backend for block in model.blocks)
    # Weights kept: the same parameter objects under the same keys, in the same order.
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[name] for name, p in model.named_parameters())
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)

    x = torch.randn(3, 2 * 5, 200, generator=torch.Generator().manual_seed(1))  # N = 11 tokens
    out_ref, dx_ref, grads_ref = _forward_backward(original, x)
    out, dx, grads = _forward_backward(model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_converted_module_keeps_training_flag_dtype_and_fallback_paths():
    original = _randomise(ReferenceAttention(40, 2, qkv_bias=True)).double()
    original.train()
    original.q_norm.eval()  # a child's own flag must survive as well
    holder = nn.Sequential(copy.deepcopy(original))
    assert convert(holder) == 1
    fused = holder[0]
    assert fused.training and not fused.q_norm.training and fused.proj.training
    assert fused.qkv.weight.dtype == torch.float64 and fused.qkv.weight.device.type == "cpu"
    assert "ReferenceAttention" in repr(fused)

    # rel_pos_bias is not a kernel input: the converted module computes it in plain PyTorch.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 40, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, 9, 9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fused(x, rel_pos_bias=bias), original(x, rel_pos_bias=bias))
    probs = fused(x, return_attention=True)
    assert probs.shape == (2, 2, 9, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 9, dtype=torch.float64))
    # return_qkv: the output and the projection before the q/k norms, (3, B, H, N, D).
    out, qkv = fused(x, return_qkv=True)
    torch.testing.assert_close(out, original(x))
    q_bias, v_bias = original.q_bias, original.v_bias
    expected = F.linear(
        x, original.qkv.weight, torch.cat((q_bias, torch.zeros_like(v_bias), v_bias))
    )
    torch.testing.assert_close(qkv, expected.view(2, 9, 3, 2, 20).permute(2, 0, 3, 1, 4))


def test_attention_dropout_is_left_alone_in_training_and_converted_in_eval():
    model = ReferenceEncoder(depth=2, attn_drop=0.1)
    report = convert_report(model)
    assert report.converted == ()
    assert [name for name, _ in report.skipped] == ["blocks.0.attn", "blocks.1.attn"]
    assert "attn_drop.p=0.1 in training mode" in report.skipped[0][1]

    model.eval()
    assert convert(model) == 2
    # Trained again later: attention dropout runs in plain PyTorch instead of being dropped.
    model.train()
    x = torch.randn(2, 6, 200)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.equal(a, b)


class RotaryAttention(ReferenceAttention):
    """Same fields, one more forward argument: converting it would silently drop ``rope``."""

    def forward(self, x, rope=None):
        return super().forward(x)


class ScaledOutputAttention(ReferenceAttention):
    """Same fields and signature, different math: only the verification run can tell."""

    def forward(self, x, rel_pos_bias=None):
        return 2.0 * super().forward(x, rel_pos_bias)


@pytest.mark.parametrize(
    ("attention", "reason"),
    [
        (ReferenceAttention(40, 2, qk_norm=None), "qk_norm is off"),
        (ReferenceAttention(40, 2, qk_norm=nn.RMSNorm), "implements LayerNorm only"),
        (RotaryAttention(40, 2), "its forward takes 'rope'"),
        (ScaledOutputAttention(40, 2), "outputs differ from the original"),
    ],
)
def test_unsafe_modules_are_left_alone_with_a_reason(attention, reason):
    model = nn.Sequential(nn.Linear(40, 40), attention)
    report = convert_report(model)
    assert report.converted == ()
    assert len(report.skipped) == 1
    assert report.skipped[0][0] == "1"
    assert reason in report.skipped[0][1]
    assert model[1] is attention
    assert convert(model) == 0


def test_dry_run_shared_modules_and_root():
    shared = ReferenceAttention(40, 2)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    report = convert_report(model, dry_run=True)
    assert isinstance(report, ConversionReport)
    assert report.converted == ("a",) and report.dry_run
    assert model["a"] is shared
    assert "would convert 1" in str(report)

    assert convert(model) == 1
    assert isinstance(model["a"], FusedLabramAttention)
    assert model["b"][0] is model["a"]  # one replacement for one shared module
    assert convert_report(model) == ConversionReport((), ())  # converted modules stay as they are

    root = convert_report(ReferenceAttention(40, 2))
    assert root.converted == () and "root module" in root.skipped[0][1]
    with pytest.raises(ValueError, match="backend"):
        convert(model, backend="fastest")
    with pytest.raises(TypeError, match="nn.Module"):
        convert(torch.zeros(3))


class BraindecodeAttention(nn.Module):
    """The structure of braindecode's LaBraM attention (``braindecode.models.labram._Attention``,
    braindecode 1.8): the reference's fields, ``qk_scale`` / ``attn_head_dim`` options, a
    relative-position table only with a window size, and ``forward(x, return_attention,
    return_qkv)`` without ``rel_pos_bias``."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0,
                 window_size=None, attn_head_dim=None):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        head_dim = attn_head_dim or dim // num_heads
        all_head_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * all_head_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(all_head_dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(all_head_dim)) if qkv_bias else None
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.window_size = window_size
        if window_size:
            n = window_size[0] * window_size[1] + 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n * n, num_heads))
            self.register_buffer("relative_position_index", torch.arange(n * n).view(n, n))
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, return_attention=False, return_qkv=False):
        B, N, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = self.q_norm(q).type_as(v)
        k = self.k_norm(k).type_as(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            n = self.relative_position_index.shape[0]
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + table.view(n, n, -1).permute(2, 0, 1)[None]
        attn = self.attn_drop(attn.softmax(dim=-1))
        if return_attention:
            return attn
        x = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1)))
        if return_qkv:
            return x, qkv
        return x


def test_braindecode_labram_attention_converts_with_its_calling_convention():
    # attn_head_dim 16 (all_head_dim 48 != dim 40) and a qk_scale override: both honoured.
    original = _randomise(BraindecodeAttention(40, 3, qk_scale=0.3, attn_head_dim=16)).eval()
    holder = nn.Sequential(copy.deepcopy(original))
    assert convert(holder) == 1
    fused = holder[0]
    assert isinstance(fused, FusedLabramAttention)
    assert fused.forward_args == ("return_attention", "return_qkv")

    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)
        # Positional arguments mean what they meant to braindecode's forward, not rel_pos_bias.
        torch.testing.assert_close(fused(x, True), original(x, True), rtol=1e-4, atol=1e-5)
        out, qkv = fused(x, False, True)
        out_ref, qkv_ref = original(x, False, True)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(qkv, qkv_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="multiple values for argument 'return_attention'"):
        fused(x, True, return_attention=True)
    with pytest.raises(TypeError, match="at most 2 positional"):
        fused(x, False, False, None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'attn_mask'"):
        fused(x, attn_mask=None)

    # The state dict goes both ways.
    fresh = BraindecodeAttention(40, 3, qk_scale=0.3, attn_head_dim=16)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(original.state_dict(), strict=True)

    # braindecode's decoder mode (a window size) adds a relative-position table: left alone.
    windowed = BraindecodeAttention(40, 2, window_size=(2, 3))
    report = convert_report(nn.Sequential(windowed))
    assert report.converted == ()
    assert "relative_position_bias_table" in report.skipped[0][1]


def test_return_attention_in_training_is_after_attention_dropout():
    original = _randomise(ReferenceAttention(40, 2, qkv_bias=True, attn_drop=0.5)).eval()
    holder = nn.Sequential(copy.deepcopy(original))
    assert convert(holder) == 1  # converted in eval, then trained
    fused = holder[0].train()
    reference = BraindecodeAttention(40, 2, attn_drop=0.5)  # probs after dropout, as LaBraM
    reference.load_state_dict(original.state_dict())
    reference.train()
    x = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    expected = reference(x, return_attention=True)
    torch.manual_seed(0)
    torch.testing.assert_close(fused(x, return_attention=True), expected)


def _backward_hook(module, grad_input, grad_output):
    return None


@pytest.mark.parametrize(
    ("add_hook", "reason"),
    [
        (lambda a: a.register_full_backward_hook(_backward_hook), "it has hooks (backward_hooks)"),
        (lambda a: a.register_full_backward_pre_hook(lambda m, g: None), "backward_pre_hooks"),
        (lambda a: a.register_state_dict_pre_hook(lambda m, p, k: None), "state_dict_pre_hooks"),
        (
            lambda a: a.register_load_state_dict_post_hook(lambda m, k: None),
            "load_state_dict_post_hooks",
        ),  # fmt: skip
        (
            lambda a: a.q_norm.register_full_backward_hook(_backward_hook),
            "q_norm has hooks (backward_hooks)",
        ),  # fmt: skip
        (
            lambda a: a.attn_drop.register_forward_hook(lambda m, i, o: None),
            "attn_drop has hooks (forward_hooks)",
        ),  # fmt: skip
    ],
)
def test_hooks_a_replacement_would_drop_or_bypass_leave_the_module_alone(add_hook, reason):
    attention = ReferenceAttention(40, 2)
    add_hook(attention)
    model = nn.Sequential(attention)
    report = convert_report(model)
    assert report.converted == ()
    assert reason in report.skipped[0][1]
    assert model[0] is attention


def test_head_dim_above_the_kernel_limit_is_left_alone_on_meta_too():
    # On the meta device there is no verification run to catch it: the structural check must.
    with torch.device("meta"):
        wide = ReferenceAttention(2 * 160, 2)
    report = convert_report(nn.Sequential(wide))
    assert report.converted == ()
    assert "head dim 160 is above" in report.skipped[0][1]


def test_compiled_attention_module_is_left_alone_with_a_clear_reason():
    # torch.compile's wrapper keeps calling the module it wraps: replacing that inside it
    # would report a conversion that never runs.
    model = nn.Sequential(torch.compile(ReferenceAttention(40, 2), backend="eager"))
    report = convert_report(model)
    assert report.converted == ()
    assert "torch.compile" in report.skipped[0][1]


# --------------------------------------------------------------------------------------------
# A real timm ViT.
# --------------------------------------------------------------------------------------------


def _timm():
    """timm, or a skip naming why it is missing. It needs a torchvision built for this torch,
    which PyPI's torchvision is not for the main venv's torch 2.13 CPU wheel; ``make test`` runs
    these tests in a second venv (``make timm-check``) with EEGFAST_REQUIRE_TIMM=1, where a
    missing timm fails instead of skipping."""
    try:
        import timm
    except ImportError as error:
        if os.environ.get("EEGFAST_REQUIRE_TIMM", "").strip() == "1":
            pytest.fail(f"EEGFAST_REQUIRE_TIMM=1 but timm does not import: {error}")
        pytest.skip(
            f"timm is not installed ({error}): it needs a torchvision built for this torch "
            f"({torch.__version__}); `make timm-check` (part of `make test`) runs these tests "
            "in build/venv-timm with torch 2.14.1 + torchvision 0.29.1 + timm"
        )
    return timm


def _timm_backend() -> str | None:
    """The backend for the converted timm models: automatic (C++ on CPU) where the extension is
    built; where it is not (`make timm-check`'s venv: the extension is built for the main venv's
    torch), the Triton kernels under the interpreter rather than only the reference."""
    backends = eegfast.ops.available_backends()
    if not backends["cpu"].available and backends["triton"].available and triton_interpreting():
        return "triton"
    return None


def _small_vit(timm, *, qk_norm: bool, seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=60, depth=3, num_heads=3,
                              num_classes=5, qk_norm=qk_norm, qkv_bias=True)  # fmt: skip
    return _randomise(model, seed).eval()


def test_timm_vit_converts_with_equal_outputs_and_gradients():
    timm = _timm()
    original = _small_vit(timm, qk_norm=True)  # head_dim 20, as LaBraM-Base
    model = copy.deepcopy(original).train()
    keys_before = list(model.state_dict())

    backend = _timm_backend()
    report = convert_report(model, backend=backend)
    assert report.skipped == ()
    assert len(report.converted) == len(model.blocks) == 3
    assert all(isinstance(block.attn, FusedTimmAttention) for block in model.blocks)
    assert all(block.attn.backend == backend for block in model.blocks)
    assert list(model.state_dict()) == keys_before

    original.train()  # drop rates are 0: train mode changes nothing but must be kept
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out_ref, dx_ref, grads_ref = _forward_backward(original, x)
    out, dx, grads = _forward_backward(model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)

    # An explicit attention mask is served by timm's own SDPA math, not dropped.
    attn, attn_ref = model.blocks[0].attn, original.blocks[0].attn
    tokens = torch.randn(2, 17, 60)
    mask = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attn(tokens, attn_mask=mask), attn_ref(tokens, attn_mask=mask))
    torch.testing.assert_close(attn(tokens, is_causal=True), attn_ref(tokens, is_causal=True))

    # The converted model's state dict loads into a fresh timm model and gives its outputs.
    fresh = _small_vit(timm, qk_norm=True, seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-4, atol=1e-5)


def test_timm_create_model_and_qk_norm_off():
    timm = _timm()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True,
                            img_size=32, num_classes=4).eval()  # fmt: skip
    reference = copy.deepcopy(vit)
    assert convert(vit, backend=_timm_backend()) == len(vit.blocks) == 12
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference(x), rtol=1e-4, atol=1e-5)

    plain = _small_vit(timm, qk_norm=False)
    report = convert_report(plain)
    assert report.converted == ()
    assert len(report.skipped) == 3
    assert all("qk_norm is off" in reason for _, reason in report.skipped)

    # timm's rotary attention has the same fields but a `rope` argument: left alone.
    if hasattr(timm.layers, "AttentionRope"):
        rope = timm.layers.AttentionRope(60, 3, qk_norm=True, norm_layer=nn.LayerNorm)
        report = convert_report(nn.Sequential(rope))
        assert report.converted == () and "'rope'" in report.skipped[0][1]


# --------------------------------------------------------------------------------------------
# A real braindecode LaBraM.
# --------------------------------------------------------------------------------------------


BRAINDECODE_NAMES = ["FP1", "FZ", "CZ", "O2"]  # a subset of its 128 electrodes, by name


def _small_labram(Labram, *, seed: int = 0, **kwargs) -> nn.Module:
    """braindecode Labram small enough for the Triton interpreter: 2 patches of 64 samples,
    embed 8 steps × 4 conv channels = 32, 2 heads of 16, 2 blocks; 4 electrodes = 9 tokens."""
    config = dict(n_times=128, n_chans=4, n_outputs=3, patch_size=64, conv_out_channels=4,
                  num_layers=2, num_heads=2)  # fmt: skip
    config.update(kwargs)
    torch.manual_seed(seed)
    return _randomise(Labram(**config), seed).eval()


@pytest.mark.parametrize(("qkv_bias", "use_mean_pooling"), [(True, True), (False, False)])
def test_braindecode_labram_converts_with_equal_outputs_and_gradients(qkv_bias, use_mean_pooling):
    Labram = braindecode_labram()
    original = _small_labram(Labram, qkv_bias=qkv_bias, use_mean_pooling=use_mean_pooling)
    model = copy.deepcopy(original)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())

    backend = _timm_backend()
    assert convert(model, backend=backend) == len(model.blocks) == 2
    assert all(isinstance(block.attn, FusedLabramAttention) for block in model.blocks)
    assert all(block.attn.backend == backend for block in model.blocks)
    assert model.blocks[0].attn.forward_args == ("return_attention", "return_qkv")
    assert convert_report(model, dry_run=True) == ConversionReport((), (), dry_run=True)
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[name] for name, p in model.named_parameters())

    # Training mode (drop rates 0), electrodes by name as braindecode takes them.
    original.train()
    model.train()
    x = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(8))
    out_ref, dx_ref, grads_ref = _forward_backward(original, x, ch_names=BRAINDECODE_NAMES)
    out, dx, grads = _forward_backward(model, x, ch_names=BRAINDECODE_NAMES)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)

    # Its other outputs and calling conventions, in eval mode.
    original.eval()
    model.eval()
    with torch.no_grad():
        for kwargs in ({"return_patch_tokens": True}, {"return_all_tokens": True}):
            torch.testing.assert_close(
                model(x, ch_names=BRAINDECODE_NAMES, **kwargs),
                original(x, ch_names=BRAINDECODE_NAMES, **kwargs),
                rtol=1e-4, atol=1e-5, msg=str(kwargs),
            )  # fmt: skip
        got = model(x, ch_names=BRAINDECODE_NAMES, return_features=True)
        want = original(x, ch_names=BRAINDECODE_NAMES, return_features=True)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
        # Another electrode subset and order: other position-embedding rows, fewer tokens.
        names = ["O2", "FP1", "CZ"]
        torch.testing.assert_close(
            model(x[:, :3], ch_names=names), original(x[:, :3], ch_names=names),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
        # The block's own options: the attention probabilities and (out, qkv).
        tokens = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(9))
        block, block_ref = model.blocks[1], original.blocks[1]
        torch.testing.assert_close(
            block(tokens, return_attention=True), block_ref(tokens, return_attention=True)
        )
        (y, qkv), (y_ref, qkv_ref) = (
            block(tokens, return_qkv=True),
            block_ref(tokens, return_qkv=True),
        )
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(qkv, qkv_ref, rtol=1e-5, atol=1e-6)


def test_braindecode_labram_checkpoints_load_both_ways_after_convert():
    Labram = braindecode_labram()
    model = _small_labram(Labram, qkv_bias=True)
    keys = list(model.state_dict())
    assert convert(model, backend=_timm_backend()) == 2
    assert list(model.state_dict()) == keys

    # The converted model's checkpoint loads into braindecode's own Labram ...
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _small_labram(Labram, seed=1, qkv_bias=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, ch_names=BRAINDECODE_NAMES), fresh(x, ch_names=BRAINDECODE_NAMES),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
    # ... and a braindecode checkpoint loads into the converted model.
    other = _small_labram(Labram, seed=2, qkv_bias=True)
    model.load_state_dict(other.state_dict(), strict=True)
    assert all(isinstance(block.attn, FusedLabramAttention) for block in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, ch_names=BRAINDECODE_NAMES), other(x, ch_names=BRAINDECODE_NAMES),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_braindecode_labram_options_the_kernel_cannot_serve_are_left_alone_with_reasons():
    Labram = braindecode_labram()
    x = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(11))

    # Decoder mode (neural_tokenizer=False): each attention adds a relative-position bias.
    decoder = _small_labram(Labram, neural_tokenizer=False, embed_dim=32)
    reference = copy.deepcopy(decoder)
    report = convert_report(decoder, backend=_timm_backend())
    assert report.converted == ()
    assert [name for name, _ in report.skipped] == ["blocks.0.attn", "blocks.1.attn"]
    assert all("relative_position_bias_table" in reason for _, reason in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(x, ch_names=BRAINDECODE_NAMES), reference(x, ch_names=BRAINDECODE_NAMES)
        )

    # qk_norm=None: nothing to fuse.
    report = convert_report(_small_labram(Labram, qk_norm=None), dry_run=True)
    assert report.converted == () and len(report.skipped) == 2
    assert all("qk_norm is off" in reason for _, reason in report.skipped)

    # Attention dropout: left alone in training mode, converted in eval mode.
    dropping = _small_labram(Labram, attn_drop_prob=0.1).train()
    report = convert_report(dropping, dry_run=True)
    assert report.converted == ()
    assert all("attn_drop.p=0.1 in training mode" in reason for _, reason in report.skipped)
    assert convert(dropping.eval(), backend=_timm_backend()) == 2


@pytest.mark.parametrize("where", ["attention", "q_norm", "attn_drop"])
def test_forward_replaced_on_the_instance_leaves_the_module_alone(where):
    # Wrappers such as accelerate's hooks set `module.forward` on the instance; a replacement
    # would drop it (the attention) or the fused kernel would bypass it (q_norm, attn_drop).
    attention = _randomise(ReferenceAttention(40, 2)).eval()
    target = attention if where == "attention" else getattr(attention, where)
    calls = []
    class_forward = target.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return class_forward(*args, **kwargs)

    target.forward = counting_forward
    model = nn.Sequential(attention)
    report = convert_report(model)
    assert report.converted == ()
    assert "forward replaced on the instance" in report.skipped[0][1]
    assert model[0] is attention
    calls.clear()
    model(torch.randn(2, 5, 40))
    assert calls == [1]


def test_torch_jit_script_of_a_converted_model_fails_saying_what_to_use_instead():
    model = _randomise(ReferenceEncoder(depth=1)).eval()
    reference = copy.deepcopy(model)
    assert convert(model) == 1
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch\.jit\.script.*export"):
        torch.jit.script(model)
    # The documented alternative gives the original's outputs.
    x = torch.randn(2, 5, 200, generator=torch.Generator().manual_seed(12))
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), reference(x), rtol=1e-4, atol=1e-5)


class LowRankAdaptedLinear(nn.Module):
    """A LoRA-style adapter around a Linear (not itself an nn.Linear, as peft's): the merged
    ``weight`` for code that reads it, and base + low-rank update in forward."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base.weight + self.lora_b.weight @ self.lora_a.weight

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def test_attention_whose_qkv_is_wrapped_in_an_adapter_is_reported_left_alone():
    model = _randomise(ReferenceEncoder(depth=2)).eval()
    model.blocks[1].attn.qkv = LowRankAdaptedLinear(model.blocks[1].attn.qkv)
    adapted = model.blocks[1].attn
    report = convert_report(model)
    assert report.converted == ("blocks.0.attn",)
    assert [name for name, _ in report.skipped] == ["blocks.1.attn"]
    assert "qkv is LowRankAdaptedLinear, not an nn.Linear" in report.skipped[0][1]
    assert model.blocks[1].attn is adapted
