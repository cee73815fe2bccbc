"""VQ-NSP tokenizer: reference keys, equivalence, training step, dead codes, padding."""

import pytest
import torch
import torch.nn.functional as F

from eegfast.models import VQNSP, create_model, load_checkpoint
from eegfast.models.reference import RefVQNSP
from eegfast.models.vqnsp import fourier_targets, standardise
from tests.models._spec import random_reference_state, reference_shapes


def test_keys_and_shapes_match_reference():
    model = create_model("vqnsp_base")
    assert isinstance(model, VQNSP)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_shapes("vqnsp_base")
    state = random_reference_state("vqnsp_base", seed=4)
    report = load_checkpoint(model, {"model": state})
    assert report.ok and sorted(report.loaded) == sorted(state)
    assert torch.equal(model.quantize.codebook, state["quantize.embedding.weight"])


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    model = create_model("vqnsp_tiny", kmeans_init=False, beta=1.0)  # the reference's weight
    ref = RefVQNSP(100, 2, 1, 4, 4, code_dim=16, num_codes=256)
    state = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    for key in state:
        if "norm" in key and key.endswith("weight"):
            state[key] += 1.0
    state["quantize.embedding.weight"] = F.normalize(state["quantize.embedding.weight"], dim=1)
    state["quantize.embedding.initted"] = torch.ones(1)
    model.load_state_dict(state)
    ref.load_state_dict(state)
    return model, ref


def test_matches_reference_recreation():
    model, ref = tiny_pair()
    model.eval()
    x = torch.randn(2, 3, 4, 200)
    chans = torch.tensor([0, 7, 8, 9])
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_codebook_indices(x, chans), ref.get_codebook_indices(x, chans)
        )
        out = model(x, chans)
        expected = ref(x, chans)
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    assert out.indices.shape == (2, 12)


def test_fourier_targets_are_standardised_per_sample():
    x = torch.randn(3, 4, 2, 200) * torch.tensor([1.0, 5.0, 0.1])[:, None, None, None]
    for target in fourier_targets(x):
        flat = target.flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(flat.std(1), torch.ones(3), atol=1e-4, rtol=0)
    valid = torch.tensor([[True, True, False, False]] * 3)
    masked = standardise(x, valid)
    torch.testing.assert_close(masked[:, :2], standardise(x[:, :2]), atol=1e-5, rtol=1e-5)


def test_training_step_updates_codebook_and_logs_usage():
    model = create_model("vqnsp_tiny", dead_code_threshold=None, beta=0.5).train()
    x, chans = torch.randn(4, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    out = model(x, chans)  # first batch: k-means initialisation of the codebook
    assert bool(model.quantize.embedding.initted.item())
    assert torch.isfinite(out.loss) and out.perplexity >= 1.0
    assert 0 < out.codebook_usage.item() <= 24 / 256
    assert out.commitment_loss > 0 and 0 < out.feature_spread <= 1
    torch.testing.assert_close(out.loss, out.commitment_loss + out.amplitude_loss + out.phase_loss)
    with torch.no_grad():  # beta times the mean squared distance to the codes (eval: no EMA)
        check = model.eval()(x, chans)
        z = F.normalize(model.encode_features(x, chans).reshape(-1, 16), dim=1)
        codes = model.quantize.codebook[check.indices.reshape(-1)]
        torch.testing.assert_close(check.commitment_loss, 0.5 * F.mse_loss(codes, z))
    model.train()
    out.loss.backward()  # straight-through: the encoder learns from the reconstruction
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.encode_task_layer[0].weight.grad.abs().sum() > 0
    before = model.quantize.codebook.clone()
    model(torch.randn(4, 3, 2, 200), chans)
    assert not torch.equal(before, model.quantize.codebook)  # EMA step
    stats = model.codebook_stats()
    assert 1.0 <= stats["ema_perplexity"] <= 256 and 0 < stats["active_fraction"] <= 1


def test_feature_spread_and_dims_see_encoder_collapse():
    model = create_model("vqnsp_tiny").train()
    x, chans = torch.randn(4, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    out = model(x, chans)
    assert out.feature_spread > 0.1 and out.feature_dims > 2
    with torch.no_grad():  # every patch's features on one line: +-w (a sign that varies)
        layer = model.encode_task_layer[2]
        direction = torch.randn(layer.out_features)
        layer.weight.copy_(direction[:, None] * F.normalize(torch.randn(layer.in_features), dim=0))
        layer.bias.zero_()
    out = model(x, chans)
    assert out.feature_dims.item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():  # every patch's features the same: the collapsed encoder
        layer.weight.zero_()
        layer.bias.normal_()
    out = model(x, chans)
    assert out.feature_spread.abs() < 1e-5 and out.feature_dims.item() == pytest.approx(1.0)


def test_dead_codes_are_restarted():
    model = create_model("vqnsp_tiny", dead_code_threshold=0.5).train()
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    model(x, chans)
    model.quantize.cluster_size.zero_()  # every code now looks dead
    before = model.quantize.codebook.clone()
    model(x, chans)
    moved = (model.quantize.codebook - before).abs().amax(1) > 0
    assert moved.float().mean() > 0.9
    z = F.normalize(model.encode_features(x, chans).reshape(-1, 16), dim=1)
    # restarted codes are re-seeded from this batch's encoder outputs
    similarity = model.quantize.codebook[moved] @ z.t()
    assert (similarity.amax(1) > 0.999).float().mean() > 0.9


def test_padding_gives_the_unpadded_codes_and_loss():
    model, _ = tiny_pair(seed=2)
    model.eval()
    a = torch.randn(1, 3, 2, 200)
    x = torch.cat([a, torch.randn(1, 2, 2, 200)], dim=1)
    chans = torch.tensor([0, 1, 2, 3, 4, 5])
    padding = torch.tensor([[False, False, False, True, True]])
    with torch.no_grad():
        alone = model(a, chans[:4])
        padded = model(x, chans, channel_padding_mask=padding)
        indices = model.get_codebook_indices(x, chans, channel_padding_mask=padding)
    assert (padded.indices[0, 6:] == -1).all() and (indices[0, 6:] == -1).all()
    torch.testing.assert_close(padded.indices[:, :6], alone.indices)
    torch.testing.assert_close(indices[:, :6], alone.indices)
    torch.testing.assert_close(padded.loss, alone.loss, atol=1e-5, rtol=1e-5)


def test_padded_training_step_updates_the_codebook_as_the_unpadded_one(monkeypatch):
    """Training mode with padded electrodes, two steps: the unpadded batch's loss, codes,
    codebook updates and EMA counts (padded patches get index -1 and no part in them),
    reached with no boolean indexing and no value read back (the finiteness check off, as on
    a GPU; the host-side input_chans check aside)."""
    import copy

    from tests.train.fakes import HostReads

    model, _ = tiny_pair(seed=3)
    model.quantize.dead_code_threshold = None  # restarts draw random rows: none here
    padded_model = copy.deepcopy(model).train()
    model.train()
    a = torch.randn(2, 3, 2, 200)
    x = torch.cat([a, torch.randn(2, 2, 2, 200)], dim=1)
    chans = torch.tensor([0, 1, 2, 3, 4, 5])
    padding = torch.tensor([[False, False, False, True, True]] * 2)
    model(a, chans[:4])  # a first step each: initted is read once, at the first call
    padded_model(x, chans, channel_padding_mask=padding)
    alone = model(a, chans[:4])
    padded_model.quantize.check_finite = False
    with HostReads.on_device(monkeypatch) as reads:
        padded = padded_model(x, chans, channel_padding_mask=padding)
    assert reads.count == 0
    assert (padded.indices[:, 6:] == -1).all()
    torch.testing.assert_close(padded.indices[:, :6], alone.indices)
    torch.testing.assert_close(padded.loss, alone.loss, atol=1e-5, rtol=1e-5)
    ours, theirs = padded_model.quantize, model.quantize
    torch.testing.assert_close(ours.cluster_size, theirs.cluster_size)
    torch.testing.assert_close(ours.codebook, theirs.codebook, atol=1e-6, rtol=1e-5)


def test_config_checks():
    with pytest.raises(TypeError, match="valid keys"):
        create_model("vqnsp_tiny", n_outputs=3)
    model = create_model("vqnsp_tiny", code_dim=8)
    assert model.decoder.patch_embed.proj.weight.shape[1] == 8
    assert create_model("vqnsp_tiny", ch_names=["Cz"]).encoder.config.input_chans == (0, 42)


def test_non_finite_padded_electrodes_give_the_zero_fill_codes_and_loss():
    """NaN/inf in a padded electrode: the codes and loss of a zero fill (the Fourier targets'
    statistics and the encoder applied the padding as a product with 0, which lets NaN
    through); a padding mask that does not fit x is named."""
    model, _ = tiny_pair(seed=4)
    model.eval()
    x = torch.randn(2, 3, 2, 200)
    chans = torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    x[1, 2] = 0.0
    with torch.no_grad():
        expected = model(x, chans, channel_padding_mask=padding)
        for fill in (float("nan"), float("inf")):
            junk = x.clone()
            junk[1, 2] = fill
            got = model(junk, chans, channel_padding_mask=padding)
            indices = model.get_codebook_indices(junk, chans, channel_padding_mask=padding)
            torch.testing.assert_close(got.loss, expected.loss)
            torch.testing.assert_close(got.indices, expected.indices)
            torch.testing.assert_close(indices, expected.indices)
    for wrong in (padding[:, :2], padding.float()):
        with pytest.raises(ValueError, match=r"channel_padding_mask must be a \(B, C\)"):
            model(x, chans, channel_padding_mask=wrong)
        with pytest.raises(ValueError, match=r"channel_padding_mask must be a \(B, C\)"):
            model.get_codebook_indices(x, chans, channel_padding_mask=wrong)


def test_flat_window_keeps_the_loss_finite():
    """A flat (zero-filled) window has no spread to standardise its Fourier targets by: its
    targets are 0 (not 0/0 = NaN, which made the whole batch's loss NaN); the other windows'
    targets are unchanged."""
    x = torch.randn(3, 4, 2, 200)
    x[1] = 0.0
    valid = torch.tensor([[True, True, True, False]] * 3)
    for mask in (None, valid):
        for target, alone in zip(
            fourier_targets(x, mask),
            fourier_targets(x[[0, 2]], None if mask is None else mask[[0, 2]]),
            strict=True,
        ):
            assert torch.isfinite(target).all() and (target[1] == 0).all()
            torch.testing.assert_close(target[[0, 2]], alone)
    model = create_model("vqnsp_tiny").train()
    chans = torch.tensor([0, 1, 2, 3, 4])
    out = model(x, chans)
    assert torch.isfinite(out.loss)
    padding = torch.tensor([[False, False, True, True]] * 3)
    assert torch.isfinite(model(x, chans, channel_padding_mask=padding).loss)


def test_non_finite_real_patches_are_an_error_for_codebook_indices():
    """A real patch whose encoder features are not finite is named, as in forward, instead of
    getting index -1, which reads as padding (its targets silently left out of pretraining)."""
    model, _ = tiny_pair(seed=5)
    model.eval()
    x = torch.randn(2, 3, 2, 200)
    x[0, 1, 0, 7] = float("nan")
    chans = torch.tensor([0, 1, 2, 3])
    with pytest.raises(FloatingPointError, match="get_codebook_indices: 6 of 12 patches"):
        model.get_codebook_indices(x, chans)
    with pytest.raises(FloatingPointError, match="6 of 12 input vectors contain NaN"):
        model(x, chans)
    model.quantize.check_finite = False  # unchecked (a GPU's default): index -1
    assert (model.get_codebook_indices(x, chans)[0] == -1).all()
