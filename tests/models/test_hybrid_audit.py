"""Hybrid model audit: input checks of the forecasting losses and of generation, the float64
losses, and checkpoints that rebuild with their own head sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eegfast.models.hybrid import (
    create_hybrid_model,
    forecast_features,
    generate,
    load_hybrid_model,
)
from eegfast.testing import assert_close

C, A = 3, 4  # electrodes, patches
CHANS = torch.tensor([0, 1, 20, 42])


def _signal(batch=2, dtype=torch.float32, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.randn(batch, C, A, 200, generator=g)).to(dtype)


def _codes(batch=2, seed=2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, C * A), generator=torch.Generator().manual_seed(seed))


def test_hybrid_patch_size_must_be_the_backbones():
    """A signal head of another size than the backbone's patches: patch_size=1 broadcast
    against the 200-sample targets and trained silently, others failed deep in the loss."""
    for size in (1, 100):
        with pytest.raises(ValueError, match="patch_size"):
            create_hybrid_model("labram_tiny_pretrain", hybrid={"patch_size": size})
    model = create_hybrid_model("labram_tiny_pretrain", hybrid={"patch_size": 200})
    assert model.config.patch_size == 200


def test_forecast_losses_take_the_inputs_the_masked_model_takes():
    """(B, C, A·200) signals and int32 codes, which the masked half accepts, failed in the
    forecasting half ("not enough values to unpack", "labels must be ... int64")."""
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain", hybrid={"mask_weight": 0.5})
    x, codes = _signal(), _codes()
    mask = torch.zeros(2, C * A, dtype=torch.bool)
    mask[:, ::2] = True
    expected = model(x, CHANS, codes, mask)
    flat = model(x.flatten(2), CHANS, codes, mask)
    small = model(x, CHANS, codes.int(), mask)
    for got in (flat, small):
        assert_close(got.loss, expected.loss)
        assert_close(got.ar_loss, expected.ar_loss)


def test_forecast_losses_name_bad_inputs():
    """With mask_weight 0 only the forecasting half sees the inputs: bad ones are named."""
    model = create_hybrid_model("labram_tiny_pretrain", hybrid={"mask_weight": 0.0})
    x, codes = _signal(), _codes()
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, A, 200\)"):
        model(x[..., :100], CHANS, codes)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C·A\)"):
        model(x, CHANS, codes[:, :-1])
    with pytest.raises(ValueError, match="targets must be integer"):
        model(x, CHANS, codes.float())


def test_float64_forecast_losses_are_computed_in_float64():
    """A float64 model's forecasting losses were rounded to float32 (relative error ~1e-8)."""
    torch.manual_seed(0)
    model = create_hybrid_model(
        "labram_tiny_pretrain", hybrid={"mask_weight": 0.0}, dtype=torch.float64
    )
    x, codes = _signal(dtype=torch.float64), _codes()
    got = model.forecast_losses(x, CHANS, codes)
    head = model.forecast_head
    h = forecast_features(model.backbone, x, CHANS)[:, :, :-1]
    nxt, next_x = codes.reshape(2, C, A)[:, :, 1:], x[:, :, 1:]
    token = F.cross_entropy(head.logits(h).flatten(0, 2), nxt.flatten())
    signal = 0.5 * (F.mse_loss(head.samples(h), next_x) + F.mse_loss(head.samples(h, nxt), next_x))
    for name in ("ar_loss", "ar_token_loss", "ar_signal_loss", "ar_token_accuracy"):
        assert got[name].dtype == torch.float64, name
    torch.testing.assert_close(got["ar_signal_loss"], signal, rtol=1e-12, atol=0)
    torch.testing.assert_close(got["ar_token_loss"], token, rtol=1e-12, atol=0)


def test_generate_refuses_an_integer_prompt():
    """The output comes back in the prompt's dtype: an int64 prompt gave a continuation
    truncated to zeros."""
    model = create_hybrid_model("labram_tiny_pretrain").eval()
    prompt = (10 * _signal(batch=1)).long()
    with pytest.raises(ValueError, match="prompt must be a floating-point"):
        generate(model, prompt, CHANS, 1, temperature=0.0)


@pytest.mark.parametrize(
    ("hybrid", "config"),
    [({"vocab_size": 512}, {}), ({}, {"patch_size": 196})],
)
def test_load_hybrid_model_rebuilds_the_heads_own_sizes(hybrid, config):
    """A forecasting head over another codebook size than lm_head's, and a backbone of
    196-sample patches (25 conv steps, as 200): load_hybrid_model built the head from
    lm_head's size and the backbone with 200 samples, and the checkpoint did not load."""
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain", hybrid=hybrid or None, **config)
    again = load_hybrid_model(model.state_dict())
    assert again.config.vocab_size == model.config.vocab_size
    assert again.config.patch_size == model.config.patch_size
    assert again.backbone.config.patch_size == model.backbone.config.patch_size
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


def test_load_hybrid_model_names_missing_tensors():
    """A checkpoint without a tensor the architecture is read from: a ValueError naming it
    (a KeyError got past `eegfast generate`'s handling of bad checkpoints)."""
    state = dict(create_hybrid_model("labram_tiny_pretrain").state_dict())
    for key in ("student.pos_embed", "student.patch_embed.conv1.weight"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_hybrid_model(broken)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cached_generation_calls_a_hooked_qkv_projection(qkv_bias):
    """The key/value cache projected q, k, v with the qkv Linear's weight alone: a hook on it
    (or a LoRA adapter in its place), which the re-encoding path calls, was skipped, and the
    cached continuation was not the re-encoded one."""
    torch.manual_seed(0)
    model = create_hybrid_model(
        "labram_tiny_pretrain", dtype=torch.float64, qkv_bias=qkv_bias
    ).eval()
    with torch.no_grad():
        for block in model.backbone.blocks:
            if block.attn.q_bias is not None:
                block.attn.q_bias.normal_(0, 0.5)
                block.attn.v_bias.normal_(0, 0.5)
    qkv = model.backbone.blocks[0].attn.qkv
    _check_cache_runs_hook(model, qkv, lambda module, args, out: out + 0.5)


def _check_cache_runs_hook(model, module, hook) -> None:
    """Generation with a forward ``hook`` on ``module``: the cached continuation equals the
    re-encoded one, and the hook changes it."""
    prompt = _signal(batch=1, dtype=torch.float64)[:, :, :2]
    plain = generate(model, prompt, CHANS, 3, mode="regression")
    handle = module.register_forward_hook(hook)
    try:
        cached = generate(model, prompt, CHANS, 3, mode="regression", use_cache=True)
        encoded = generate(model, prompt, CHANS, 3, mode="regression", use_cache=False)
    finally:
        handle.remove()
    assert (encoded - plain).abs().amax() > 1e-6  # the hook acts
    assert_close(cached, encoded, scale=1e3)


@pytest.mark.parametrize("where", ["block", "attn"])
def test_cached_generation_runs_hooks_on_a_block_or_its_attention(where):
    """A cached step runs a block's parts itself: a forward hook on a whole block or on its
    attention (an ablation) acted only with use_cache=False, so the two paths differed."""
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain", dtype=torch.float64).eval()
    block = model.backbone.blocks[0]
    module = block if where == "block" else block.attn
    _check_cache_runs_hook(model, module, lambda m, args, out: out * 0.5)
