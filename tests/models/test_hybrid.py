"""Hybrid masked + forecasting objective: block-causal masks, loss mixing, checkpoints, KV cache."""

from __future__ import annotations

import pytest
import torch

from eegfast.models import create_model
from eegfast.models.checkpoint import load_checkpoint
from eegfast.models.hybrid import (
    HybridConfig,
    HybridPretrainModel,
    create_hybrid_model,
    forecast_features,
    generate,
    load_hybrid_model,
    patch_block_ids,
    sample_codes,
)
from eegfast.ops.qk_norm_attention import qk_norm_attention, qk_norm_attention_reference
from eegfast.testing import assert_close

C, A = 3, 5  # electrodes, patches


def _model(dtype=torch.float32, seed=0, **hybrid) -> HybridPretrainModel:
    torch.manual_seed(seed)
    model = create_hybrid_model("labram_tiny_pretrain", hybrid=hybrid or None, dtype=dtype)
    # Non-zero embeddings so that cls/time/electrode rows matter (init is ~N(0, 0.02)).
    with torch.no_grad():
        for p in (model.student.pos_embed, model.student.time_embed):
            p.normal_(0, 0.5)
    return model


def _inputs(batch=2, c=C, a=A, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (0.3 * torch.randn(batch, c, a, 200, generator=g)).to(dtype)
    chans = torch.tensor([0, 1, 20, 42, 60, 82, 5][: c + 1])
    return x, chans


# --------------------------------------------------------------------------------------------
# Block ids and the attention op's block-causal mask
# --------------------------------------------------------------------------------------------


def test_patch_block_ids_follow_electrode_major_tokens():
    ids = patch_block_ids(C, A)
    assert ids.shape == (1 + C * A,)
    assert ids[0] == 0  # cls
    for c in range(C):
        for a in range(A):
            assert ids[1 + c * A + a] == a + 1
    assert patch_block_ids(2, 3, first_patch=4).tolist() == [0, 5, 6, 7, 5, 6, 7]


@pytest.mark.parametrize("impl", [qk_norm_attention_reference, qk_norm_attention])
def test_block_causal_attention_ignores_future_patches(impl):
    """With the hybrid's block ids, changing a key/value of patch k leaves every query of
    patches < k (and cls) unchanged, and changes queries of patch k."""
    g = torch.Generator().manual_seed(0)
    ids = patch_block_ids(C, A)
    n, heads, d = ids.numel(), 2, 20
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    base = impl(q, k, v, w, b, w, b, block_causal=ids)
    future = 3  # perturb every token of patch 3
    hit = ids == future + 1
    k2, v2 = k.clone(), v.clone()
    k2[:, :, hit] += torch.randn(k2[:, :, hit].shape, generator=g)
    v2[:, :, hit] += 1.0
    moved = impl(q, k2, v2, w, b, w, b, block_causal=ids)
    past = ids <= future
    torch.testing.assert_close(moved[:, :, past], base[:, :, past], rtol=0, atol=0)
    assert (moved[:, :, hit] - base[:, :, hit]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# The forecasting pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("future", [1, 2, 4])
def test_forecast_features_do_not_look_ahead(future):
    model = _model().eval()
    x, chans = _inputs()
    with torch.no_grad():
        base = forecast_features(model.backbone, x, chans)
        x2 = x.clone()
        x2[:, :, future] = torch.randn_like(x2[:, :, future])  # every electrode of one patch
        moved = forecast_features(model.backbone, x2, chans)
    assert base.shape == (2, C, A, model.backbone.config.embed_dim)
    assert_close(moved[:, :, :future], base[:, :, :future])
    assert (moved[:, :, future:] - base[:, :, future:]).abs().amax() > 1e-3


def test_forecast_features_do_not_look_ahead_with_padded_electrodes():
    model = _model().eval()
    x, chans = _inputs(c=4)
    padding = torch.tensor([[False, False, False, False], [False, False, True, True]])
    x[1, 2:] = 0.0
    with torch.no_grad():
        base = forecast_features(model.backbone, x, chans, channel_padding_mask=padding)
        x2 = x.clone()
        x2[:, :2, 3] += 1.0
        moved = forecast_features(model.backbone, x2, chans, channel_padding_mask=padding)
        # padded electrodes do not act on real ones: change them, real outputs stay
        x3 = x.clone()
        x3[1, 2:] = 5.0
        other = forecast_features(model.backbone, x3, chans, channel_padding_mask=padding)
    assert_close(moved[:, :, :3], base[:, :, :3])
    assert (moved[:, :2, 3:] - base[:, :2, 3:]).abs().amax() > 1e-3
    assert_close(other[1, :2], base[1, :2])


def test_whole_sample_patch_embedding_would_leak_the_future():
    """Why the forecasting pass embeds each time patch on its own: LaBraM's TemporalConv pools
    GroupNorm statistics over all patches of a sample."""
    model = _model().eval()
    x, _ = _inputs()
    x2 = x.clone()
    x2[:, :, -1] *= 10.0
    with torch.no_grad():
        whole = model.backbone.patch_embed(x).reshape(2, C, A, -1)
        whole2 = model.backbone.patch_embed(x2).reshape(2, C, A, -1)
    assert (whole[:, :, 0] - whole2[:, :, 0]).abs().amax() > 1e-3


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_loss_is_lambda_mix_of_masked_and_forecast(lam):
    model = _model(mask_weight=lam)
    x, chans = _inputs()
    targets = torch.randint(0, 256, (2, C * A), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, C * A, dtype=torch.bool)
    mask[:, ::2] = True
    out = model(x, chans, targets, mask)
    masked = model._masked(x, chans, targets, mask).loss
    ar = model.forecast_losses(x, chans, targets)
    expected = lam * (masked if lam > 0 else 0) + (1 - lam) * (ar["ar_loss"] if lam < 1 else 0)
    assert_close(out.loss, torch.as_tensor(expected, dtype=torch.float32), scale=10)
    if lam < 1:
        assert_close(out.ar_loss, ar["ar_loss"].detach())
        assert_close(out.ar_loss, ar["ar_token_loss"] + ar["ar_signal_loss"])
    if lam > 0:
        assert_close(out.masked_loss, masked.detach())
    out.loss.backward()
    head_grad = model.forecast_head.token.weight.grad
    lm_grad = model.lm_head.weight.grad
    assert (head_grad is not None and head_grad.abs().sum() > 0) == (lam < 1)
    assert (lm_grad is not None and lm_grad.abs().sum() > 0) == (lam > 0)
    assert set(out.scalars()) >= {"loss", "masked_loss", "ar_loss"}


def test_forecast_losses_are_means_over_unpadded_positions_without_host_reads(monkeypatch):
    """The forecasting losses and accuracy with an electrode padded (its codes -1): the means
    over the unpadded positions as boolean selection gives them, and gradients to match; and
    no value read back to the host on the way (on a GPU each read waits for the device; the
    model's host-side check of input_chans aside, which a GPU run never makes)."""
    import torch.nn.functional as F

    from tests.train.fakes import HostReads

    model = _model()
    x, chans = _inputs()
    padding = torch.tensor([[False, False, True], [False, False, False]])
    targets = torch.randint(0, 256, (2, C * A), generator=torch.Generator().manual_seed(3))
    targets = targets.masked_fill(padding.repeat_interleave(A, dim=1), -1)
    with HostReads.on_device(monkeypatch) as reads:
        got = model.forecast_losses(x, chans, targets, channel_padding_mask=padding)
    assert reads.count == 0

    head = model.forecast_head
    h = forecast_features(model.backbone, x, chans, channel_padding_mask=padding)[:, :, :-1]
    valid = ~padding[:, :, None].expand(2, C, A - 1)
    codes, next_x = targets.reshape(2, C, A)[:, :, 1:], x[:, :, 1:]
    logits = head.logits(h)[valid]
    expected_token = F.cross_entropy(logits, codes[valid])
    accuracy = (logits.argmax(-1) == codes[valid]).float().mean()
    signal = F.mse_loss(head.samples(h)[valid], next_x[valid])
    signal = 0.5 * (signal + F.mse_loss(head.samples(h, codes.clamp_min(0))[valid], next_x[valid]))
    assert_close(got["ar_token_loss"], expected_token)
    assert_close(got["ar_token_accuracy"], accuracy)
    assert_close(got["ar_signal_loss"], signal)
    weight = head.token.weight
    (ours,) = torch.autograd.grad(got["ar_token_loss"] + got["ar_signal_loss"], weight)
    (theirs,) = torch.autograd.grad(expected_token + signal, weight)
    assert_close(ours, theirs)


def test_forecast_patches_without_a_code_count_in_no_token_term():
    """A -1 code at a real patch (no tokenizer code for it) was trained as code 0 in the token
    loss and the code-conditioned signal loss; it now counts in neither (the plain signal loss,
    which needs no code, keeps it)."""
    import torch.nn.functional as F

    model = _model()
    x, chans = _inputs()
    targets = torch.randint(0, 256, (2, C * A), generator=torch.Generator().manual_seed(4))
    targets[1, A + 1] = -1  # sample 1, electrode 1, patch 1: a next-patch target of patch 0
    got = model.forecast_losses(x, chans, targets)

    head = model.forecast_head
    h = forecast_features(model.backbone, x, chans)[:, :, :-1]
    codes, next_x = targets.reshape(2, C, A)[:, :, 1:], x[:, :, 1:]
    coded = codes >= 0
    logits = head.logits(h)[coded]
    assert_close(got["ar_token_loss"], F.cross_entropy(logits, codes[coded]))
    assert_close(got["ar_token_accuracy"], (logits.argmax(-1) == codes[coded]).float().mean())
    plain = F.mse_loss(head.samples(h), next_x)
    conditioned = F.mse_loss(head.samples(h, codes.clamp_min(0))[coded], next_x[coded])
    assert_close(got["ar_signal_loss"], 0.5 * (plain + conditioned))


def test_forecast_targets_are_the_next_patch():
    """Token head trained to predict code of (c, a+1): a constant code per patch index is
    learnable from position alone; the loss on shifted targets must drop well below chance."""
    model = _model(mask_weight=0.0, predict_signal=False)
    x, chans = _inputs(batch=2)
    codes = torch.arange(A).repeat(C)[None].expand(2, -1) * 7  # code of patch a = 7a
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(12):
        out = model(x, chans, codes)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.ar_token_loss)
    assert float(out.ar_token_loss) < 0.3 * first
    assert float(out.ar_token_accuracy) == 1.0


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="mask_weight"):
        HybridConfig(mask_weight=1.5)
    with pytest.raises(ValueError, match="predict_tokens"):
        HybridConfig(predict_tokens=False, predict_signal=False)
    with pytest.raises(TypeError, match="unknown hybrid config keys"):
        create_hybrid_model("labram_tiny_pretrain", hybrid={"lambda": 0.5})
    model = _model(mask_weight=0.0)
    x, chans = _inputs(a=1)
    with pytest.raises(ValueError, match="at least 2 patches"):
        model(x, chans, torch.zeros(2, C, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(*_inputs(), None)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def test_hybrid_checkpoint_fine_tunes_like_a_masked_one():
    model = _model()
    masked_keys = set(create_model("labram_tiny_pretrain").state_dict())
    keys = set(model.state_dict())
    assert keys - masked_keys == {k for k in keys if k.startswith("forecast_head.")}
    assert masked_keys <= keys
    classifier = create_model("labram_tiny", n_outputs=3)
    report = load_checkpoint(classifier, model.state_dict(), strict=True)
    assert report.ok and set(report.initialised) == {
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    torch.testing.assert_close(classifier.pos_embed, model.student.pos_embed)
    torch.testing.assert_close(
        classifier.blocks[1].attn.qkv.weight, model.student.blocks[1].attn.qkv.weight
    )


def test_load_hybrid_model_rebuilds_from_shapes():
    model = _model(predict_tokens=False)
    again = load_hybrid_model(model.state_dict())
    assert again.config.predict_tokens is False and again.config.vocab_size == 256
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="not a hybrid checkpoint"):
        load_hybrid_model(create_model("labram_tiny_pretrain").state_dict())


# --------------------------------------------------------------------------------------------
# Generation: cache == no cache, sampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "max_context", "keep"),
    [("regression", None, None), ("tokens", 4, 2), ("tokens", 3, 3)],
)
def test_cached_generation_equals_recomputation(mode, max_context, keep):
    """fp64 so that the comparison is exact up to summation order; windows slide (3-patch
    prompt + 14 patches > 16 rows of the time embedding; max_context 3-4: several times)."""
    model = _model(dtype=torch.float64).eval()
    x, chans = _inputs(batch=1, dtype=torch.float64, a=3)
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        runs.append(
            generate(
                model,
                x,
                chans,
                14,
                mode=mode,
                temperature=1.3,
                top_k=20,
                generator=g,
                use_cache=use_cache,
                max_context=max_context,
                keep=keep,
            )
        )
    assert runs[0].shape == (1, C, 14, 200)
    assert_close(runs[0], runs[1], scale=1e3)
    assert runs[0].abs().amax() > 0


def test_greedy_generation_is_deterministic_and_continues_the_prompt():
    model = _model(dtype=torch.float64).eval()
    x, chans = _inputs(dtype=torch.float64, a=3)
    a = generate(model, x, chans, 4, temperature=0.0)
    b = generate(model, x, chans, 4, temperature=0.0, use_cache=False)
    assert_close(a, b, scale=1e3)
    other = x.clone()
    other[:, :, 0] += 1.0  # the output depends on the prompt
    assert (generate(model, other, chans, 4, temperature=0.0) - a).abs().amax() > 1e-6
    # the first generated patch is the model's forecast from the prompt
    with torch.no_grad():
        h = forecast_features(model.backbone, x, chans)[:, :, -1]
        codes = model.forecast_head.logits(h).argmax(-1)
        first = model.forecast_head.samples(h, codes)
    assert_close(a[:, :, 0], first)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(("max_context", "keep"), [(None, None), (4, 2)])
def test_generation_with_padded_electrodes_matches_each_sample_alone(use_cache, max_context, keep):
    """A batch of different electrode sets (padded as the data loader pads them): each sample's
    continuation is the one it gets alone, padded electrodes do not act on real ones (even as
    NaN) and come back as zeros."""
    model = _model(dtype=torch.float64).eval()
    x, _ = _inputs(batch=2, dtype=torch.float64, a=3)
    chans = torch.tensor([[0, 1, 20, 42], [0, 5, 60, 0]])  # sample 1: 2 electrodes + padding
    padding = torch.tensor([[False, False, False], [False, False, True]])
    x[1, 2] = float("nan")
    settings = dict(use_cache=use_cache, max_context=max_context, keep=keep)
    for mode in ("tokens", "regression"):
        both = generate(
            model, x, chans, 6, mode=mode, temperature=0.0, channel_padding_mask=padding,
            **settings,
        )  # fmt: skip
        alone = [
            generate(model, x[:1], chans[0], 6, mode=mode, temperature=0.0, **settings),
            generate(model, x[1:, :2], chans[1, :3], 6, mode=mode, temperature=0.0, **settings),
        ]
        # float32 tolerance: the masked GroupNorm of the patch embedding computes in float32
        assert_close(both[:1], alone[0], dtype=torch.float32)
        assert_close(both[1:, :2], alone[1], dtype=torch.float32)
        assert torch.equal(both[1, 2], torch.zeros_like(both[1, 2]))
    with pytest.raises(ValueError, match="channel_padding_mask"):
        generate(model, x, chans, 1, channel_padding_mask=padding[:, :2])


def test_generation_casts_the_prompt_to_the_model_dtype():
    model = _model(dtype=torch.float64).eval()
    x, chans = _inputs(a=2)  # float32 prompt, float64 model
    out = generate(model, x, chans, 2, temperature=0.0)
    assert out.dtype == torch.float32
    assert_close(out, generate(model, x.double(), chans, 2, temperature=0.0).float())


def test_sample_codes_edge_cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    # a tiny temperature is greedy, not an overflow to inf and NaN probabilities
    for temperature in (1e-39, 1e-300):
        assert torch.equal(
            sample_codes(logits, temperature=temperature, generator=g), logits.argmax(-1)
        )
    # top_k keeps exactly k codes, also when several codes tie with the k-th best
    tied = torch.tensor([[0.0, 2.0, 2.0, 2.0, -1.0]]).expand(400, -1)
    drawn = sample_codes(tied, top_k=2, generator=g)
    assert drawn.unique().numel() == 2 and (tied.gather(1, drawn[:, None]) == 2.0).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_codes(logits, temperature=float("nan"))


def test_sample_codes_temperature_and_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    assert torch.equal(sample_codes(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_codes(logits, top_k=1, generator=g), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        drawn = sample_codes(logits, top_k=3, generator=g)
        assert (drawn[:, None] == top3).any(-1).all()
    # high temperature spreads draws over many codes, low temperature concentrates them
    row = logits[:1].expand(2000, -1)
    hot = sample_codes(row, temperature=10.0, generator=g).unique().numel()
    cold = sample_codes(row, temperature=0.05, generator=g).unique().numel()
    assert hot > 30 and cold <= 3
    with pytest.raises(ValueError, match="temperature"):
        sample_codes(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_codes(logits, top_k=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 1 or None, got 2.5"):
        sample_codes(logits, top_k=2.5)  # (torch's own error named k)


def test_generate_argument_errors():
    model = _model().eval()
    x, chans = _inputs(a=2)
    with pytest.raises(ValueError, match="num_patches"):
        generate(model, x, chans, 0)
    with pytest.raises(ValueError, match="mode"):
        generate(model, x, chans, 1, mode="beam")
    with pytest.raises(ValueError, match="200 samples"):
        generate(model, x[..., :100], chans, 1)
    with pytest.raises(ValueError, match="max_context"):
        generate(model, x, chans, 1, max_context=17)
    no_signal = _model(predict_signal=False).eval()
    with pytest.raises(ValueError, match="predict_signal"):
        generate(no_signal, x, chans, 1)
    no_tokens = _model(predict_tokens=False).eval()
    with pytest.raises(ValueError, match="regression"):
        generate(no_tokens, x, chans, 1, mode="tokens")
    assert generate(no_tokens, x, chans, 2, mode="regression").shape == (2, C, 2, 200)


# --------------------------------------------------------------------------------------------
# The training hook
# --------------------------------------------------------------------------------------------


def test_hybrid_objective_is_registered_with_the_engine():
    from eegfast.train.objectives import StepContext, get_objective

    step = get_objective("hybrid")
    model = _model(mask_weight=0.4)
    tokenizer = create_model("vqnsp_tiny").eval()
    x, chans = _inputs()
    batch = {"x": x, "input_chans": chans, "index": torch.arange(2)}
    ctx = StepContext(device=torch.device("cpu"), tokenizer=tokenizer)
    out = step(model, batch, ctx)
    assert {"masked_loss", "ar_loss", "ar_token_loss", "ar_signal_loss"} <= set(out.metrics)
    expected = 0.4 * out.metrics["masked_loss"] + 0.6 * out.metrics["ar_loss"]
    assert abs(float(out.loss.detach()) - expected) < 1e-4 * max(1.0, expected)
    out.loss.backward()
    with pytest.raises(ValueError, match="HybridPretrainModel"):
        step(create_model("labram_tiny_pretrain"), batch, ctx)
    with pytest.raises(ValueError, match="tokenizer"):
        step(model, batch, StepContext(device=torch.device("cpu")))


def test_non_finite_padded_electrodes_give_the_zero_fill_losses():
    """NaN/inf in a padded electrode: the losses of a zero fill (the forecasting losses weight
    padded positions by 0, and NaN·0 = NaN)."""
    model = _model()
    x, chans = _inputs()
    padding = torch.tensor([[False, False, True], [False, False, False]])
    targets = torch.randint(0, 256, (2, C * A), generator=torch.Generator().manual_seed(3))
    targets = targets.masked_fill(padding.repeat_interleave(A, dim=1), -1)
    mask = torch.zeros(2, C * A, dtype=torch.bool)
    mask[:, ::2] = True
    x[0, 2] = 0.0
    expected = model(x, chans, targets, mask, channel_padding_mask=padding)
    for fill in (float("nan"), float("inf")):
        junk = x.clone()
        junk[0, 2] = fill
        got = model(junk, chans, targets, mask, channel_padding_mask=padding)
        assert_close(got.loss, expected.loss)
        assert_close(got.ar_signal_loss, expected.ar_signal_loss)
        features = forecast_features(model.backbone, junk, chans, channel_padding_mask=padding)
        assert torch.isfinite(features).all()
