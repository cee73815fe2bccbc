"""NormEMAVectorQuantizer: reference key names, training behaviour, errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eegfast.nn import NormEMAVectorQuantizer
from eegfast.nn.vq import code_perplexity, feature_dims, feature_spread

SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "spec" / "labram_state_dicts.json"


def reference_quantizer_keys():
    if not SPEC.exists():
        pytest.skip(f"spec file {SPEC} not found")
    models = json.loads(SPEC.read_text())["models"]
    keys = models["vqnsp_encoder_base_decoder_3x200x12"]["keys"]
    prefix = "quantize."
    return {k.removeprefix(prefix): v for k, v in keys.items() if k.startswith(prefix)}


def test_state_dict_matches_reference_tokenizer():
    expected = reference_quantizer_keys()
    num_codes, code_dim = expected["embedding.weight"]
    quantizer = NormEMAVectorQuantizer(num_codes, code_dim)
    actual = {k: list(v.shape) for k, v in quantizer.state_dict().items()}
    assert actual == expected
    # A reference checkpoint's values load strictly and are used for lookup.
    loaded = {k: torch.rand(v) for k, v in expected.items()}
    loaded["embedding.weight"] = F.normalize(torch.randn(num_codes, code_dim), dim=1)
    loaded["embedding.initted"] = torch.ones(1)
    quantizer.load_state_dict(loaded, strict=True)
    quantizer.eval()
    z = loaded["embedding.weight"][:10] * 3
    assert quantizer(z).indices.tolist() == list(range(10))


def clustered(n=512, d=16, clusters=8, seed=0):
    centers = torch.randn(clusters, d, generator=torch.Generator().manual_seed(0))
    centers = F.normalize(centers, dim=1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (n,), generator=gen)
    return centers[labels] + 0.05 * torch.randn(n, d, generator=gen)


def test_training_initialises_and_tracks_the_data():
    quantizer = NormEMAVectorQuantizer(32, 16, decay=0.8)
    assert quantizer.embedding.initted.item() == 0
    z = clustered().reshape(4, 128, 16)
    out = quantizer(z)
    assert quantizer.embedding.initted.item() == 1
    assert out.quantized.shape == z.shape and out.indices.shape == (4, 128)
    losses = [quantizer(clustered(seed=s).reshape(4, 128, 16)).loss.item() for s in range(1, 6)]
    assert losses[-1] < 0.01  # codes sit on the clusters
    torch.testing.assert_close(quantizer.codebook.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(quantizer.cluster_size, quantizer.embedding.cluster_size)
    assert 1 <= out.perplexity.item() <= 32 and 0 < out.usage.item() <= 1


def test_straight_through_gradient_and_eval_is_frozen():
    quantizer = NormEMAVectorQuantizer(16, 8, kmeans_init=False).eval()
    before = quantizer.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    z = torch.randn(20, 8, requires_grad=True)
    weights = torch.randn(20, 8)
    out = quantizer(z)
    (out.quantized * weights).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (F.normalize(z2, dim=1) * weights).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    for key, value in quantizer.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_commitment_loss_is_beta_times_the_distance_and_trains_the_input():
    """loss = beta · mean |sg(code) - z|^2 of the l2-normalised input: its gradient reaches z
    (it trains the encoder; the codebook follows the EMA), scaled by beta."""
    torch.manual_seed(0)
    quantizer = NormEMAVectorQuantizer(16, 8, beta=0.25, kmeans_init=False).eval()
    z = torch.randn(3, 5, 8, requires_grad=True)
    out = quantizer(z)
    code = quantizer.codebook[out.indices.reshape(-1)]
    expected = 0.25 * F.mse_loss(code, F.normalize(z.reshape(-1, 8), dim=1))
    torch.testing.assert_close(out.loss, expected)
    (grad,) = torch.autograd.grad(out.loss, z)
    (expected_grad,) = torch.autograd.grad(expected, z)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad)


def test_non_finite_input_is_an_error():
    quantizer = NormEMAVectorQuantizer(16, 8, kmeans_init=False)
    z = torch.randn(5, 8)
    z[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="1 of 5 input vectors contain NaN"):
        quantizer(z)
    with pytest.raises(ValueError, match="last dim code_dim = 8"):
        quantizer(torch.randn(5, 7))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -1.0}, "beta must be >= 0, got -1.0"),
        ({"beta": float("nan")}, "beta must be >= 0"),
        ({"dead_code_threshold": -0.5}, r"dead_code_threshold must be in \[0, 1\] or None"),
        # above the count of 1 that a restart gives, every code was re-seeded at every step
        ({"dead_code_threshold": 2.0}, r"dead_code_threshold must be in \[0, 1\] or None"),
        ({"dead_code_threshold": float("inf")}, "dead_code_threshold must be in"),
        ({"decay": 1.0}, r"decay must be in \[0, 1\)"),
        ({"eps": -1e-5}, "eps must be finite and >= 0, got -1e-05"),
        ({"eps": float("nan")}, "eps must be finite and >= 0, got nan"),
        ({"kmeans_iters": -1}, "kmeans_iters must be >= 0, got -1"),
    ],
)
def test_bad_quantizer_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NormEMAVectorQuantizer(16, 8, **kwargs)
    # the tokenizer's config reaches them too (eegfast tokenizer --set vq.beta=...)
    from eegfast.models import create_model

    if set(kwargs) <= {"beta", "dead_code_threshold"}:
        with pytest.raises(ValueError, match=message):
            create_model("vqnsp_tiny", **kwargs)


def test_training_calls_read_nothing_back_once_initialised():
    """After the k-means initialisation, a training call reads no value back to the host (on a
    GPU each read waits for the device): ``initted`` is read once, not at every call, and the
    finiteness check runs only where asked. A state dict that clears ``initted``
    initialises the codebook again."""
    from tests.train.fakes import HostReads

    quantizer = NormEMAVectorQuantizer(32, 16, decay=0.8, check_finite=False)
    quantizer(clustered().reshape(4, 128, 16))  # k-means on the first batch
    with HostReads() as reads:
        out = quantizer(clustered(seed=1).reshape(4, 128, 16))
    assert reads.count == 0 and torch.isfinite(out.loss)
    z = torch.randn(5, 16)
    z[2, 3] = float("nan")  # unchecked: index -1, left out of the EMA, the loss non-finite
    out = quantizer(z)
    assert out.indices[2] == -1 and not torch.isfinite(out.loss)
    assert torch.isfinite(quantizer.codebook).all() and torch.isfinite(quantizer.cluster_size).all()

    state = quantizer.state_dict()
    state["embedding.initted"] = torch.zeros(1)
    quantizer.load_state_dict(state)
    before = quantizer.codebook.clone()
    quantizer(clustered(seed=2).reshape(4, 128, 16))
    assert quantizer.embedding.initted.item() == 1 and not torch.equal(before, quantizer.codebook)


def test_feature_spread_is_the_mean_pairwise_cosine_distance():
    gen = torch.Generator().manual_seed(3)
    rows = F.normalize(torch.randn(37, 16, generator=gen) + 0.7, dim=1)
    pairwise = 1 - (rows @ rows.T).mean()
    torch.testing.assert_close(feature_spread(rows), pairwise, atol=1e-6, rtol=0)
    # only kept rows count; rows that are not finite never do
    keep = torch.arange(37) % 3 != 0
    kept = rows[keep]
    torch.testing.assert_close(
        feature_spread(rows, keep), 1 - (kept @ kept.T).mean(), atol=1e-6, rtol=0
    )
    with_nan = rows.clone()
    with_nan[~keep] = float("nan")
    torch.testing.assert_close(feature_spread(with_nan), feature_spread(rows, keep))
    # one direction: 0; opposite pairs: 1
    same = F.normalize(torch.ones(5, 4), dim=1)
    assert feature_spread(same).abs().item() < 1e-6
    assert feature_spread(torch.cat([same, -same])).item() == pytest.approx(1.0)


def test_feature_dims_counts_the_directions_the_rows_use():
    torch.manual_seed(0)
    # rows spread evenly over k orthogonal axes (both signs): k directions
    for k in (1, 2, 5, 16):
        axes = torch.eye(16)[:k]
        rows = torch.cat([axes, -axes]).repeat(10, 1)
        assert feature_dims(rows).item() == pytest.approx(k, rel=1e-5)
    # two opposite directions: 1, though their spread is 1
    u = F.normalize(torch.randn(1, 16), dim=1)
    split = torch.cat([u.expand(40, 16), -u.expand(60, 16)])
    assert feature_dims(split).item() == pytest.approx(1.0, rel=1e-5)
    assert feature_spread(split).item() > 0.95
    # the participation ratio of M's eigenvalues, with padding and non-finite rows left out
    rows = F.normalize(torch.randn(300, 12) * torch.linspace(0.2, 3, 12), dim=1)
    keep = torch.rand(300) < 0.7
    kept = rows[keep].double()
    eig = torch.linalg.eigvalsh(kept.T @ kept / len(kept))
    expected = eig.sum() ** 2 / eig.square().sum()
    torch.testing.assert_close(feature_dims(rows, keep).double(), expected, rtol=1e-5, atol=0)
    with_nan = rows.clone()
    with_nan[~keep] = float("nan")
    torch.testing.assert_close(feature_dims(with_nan), feature_dims(rows, keep))
    assert feature_dims(rows, torch.zeros(300, dtype=torch.bool)).item() == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 step still gets fp32 dims
        under_autocast = feature_dims(rows, keep)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, feature_dims(rows, keep))


def test_code_perplexity_is_exp_of_the_usage_entropy():
    assert code_perplexity(torch.tensor([0, 7, 0, 0])).item() == pytest.approx(1.0)
    assert code_perplexity(torch.full((64,), 3.5)).item() == pytest.approx(64.0)
    assert code_perplexity(torch.zeros(8)).item() == pytest.approx(1.0)
    counts = torch.tensor([1, 1, 2, 0])  # probabilities 1/4, 1/4, 1/2: entropy 1.5 ln 2
    assert code_perplexity(counts).item() == pytest.approx(2**1.5)
    assert code_perplexity(counts.float()).dtype == torch.float32  # EMA counts keep their dtype
    # what the quantizer reports for a batch
    quantizer = NormEMAVectorQuantizer(32, 16)
    out = quantizer(clustered().reshape(4, 128, 16))
    uses = torch.bincount(out.indices.flatten(), minlength=32)
    torch.testing.assert_close(out.perplexity, code_perplexity(uses).float())


def test_quantizer_reports_the_spread_of_its_inputs():
    quantizer = NormEMAVectorQuantizer(32, 16)
    z = clustered().reshape(4, 128, 16)
    out = quantizer(z)
    torch.testing.assert_close(out.spread, feature_spread(F.normalize(z.reshape(-1, 16), dim=1)))
    torch.testing.assert_close(out.dims, feature_dims(F.normalize(z.reshape(-1, 16), dim=1)))
    assert out.dims.item() > 4  # 8 random cluster centres
    assert out.spread.item() > 0.5  # 8 clusters in 16 dims
    # encoder collapse: every input the same direction at different scales
    collapsed = torch.rand(4, 128, 1) * F.normalize(torch.randn(16), dim=0)
    assert quantizer(collapsed).spread.abs().item() < 1e-5
    # padding left out
    valid = torch.zeros(4, 128, dtype=torch.bool)
    valid[:, :64] = True
    mixed = torch.where(valid[..., None], collapsed, z)
    assert quantizer(mixed, valid).spread.abs().item() < 1e-5


def test_reference_checkpoint_trains_on_from_its_codebook():
    """A reference tokenizer EMA-updates ``embedding.weight`` itself and never updates
    ``embedding.embed_avg`` (its random initial codebook stays there): training on from such a
    checkpoint keeps the trained codes, and eegfast's own state dicts load unchanged."""
    gen = torch.Generator().manual_seed(5)
    num_codes, code_dim = 64, 16
    trained = F.normalize(torch.randn(num_codes, code_dim, generator=gen), dim=1)
    reference = {
        "cluster_size": torch.rand(num_codes, generator=gen) * 5 + 1,
        "embedding.weight": trained,
        "embedding.cluster_size": torch.rand(num_codes, generator=gen) * 10,
        "embedding.embed_avg": F.normalize(torch.randn(num_codes, code_dim, generator=gen), dim=1),
        "embedding.initted": torch.ones(1),
    }
    quantizer = NormEMAVectorQuantizer(num_codes, code_dim, dead_code_threshold=None)
    quantizer.load_state_dict(reference)
    # the sums rebuilt as code x EMA count: an EMA sum is count x mean, so the next batch's
    # sums weigh in as much as they would have in the reference's own run
    expected = trained * reference["cluster_size"][:, None]
    torch.testing.assert_close(quantizer.embedding.embed_avg, expected)
    labels = torch.randint(0, num_codes, (256,), generator=gen)
    z = trained[labels] + 0.02 * torch.randn(256, code_dim, generator=gen)  # on the codes
    quantizer(z)
    assert (quantizer.codebook * trained).sum(dim=1).min() > 0.99
    # eegfast's own state (restarted and unused codes included) loads exactly as saved
    ours = NormEMAVectorQuantizer(32, 16, decay=0.8, dead_code_threshold=0.5)
    for seed in range(3):
        ours(clustered(seed=seed).reshape(4, 128, 16))
    saved = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.load_state_dict(saved)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_the_codebook_and_ema_state_float32(dtype):
    """``model.to(bf16)`` casts every floating buffer; the quantizer's stay float32, so the EMA
    counts still move by the small steps a bf16 count loses (7 -> 0.99 x 7 + 0.08 rounds back
    to 7 in bf16); device moves are kept."""
    quantizer = NormEMAVectorQuantizer(8, 4, kmeans_init=False).to(dtype)
    buffers = dict(quantizer.named_buffers())
    assert {name: b.dtype for name, b in buffers.items()} == {
        name: torch.float32 for name in buffers
    }
    quantizer.cluster_size.fill_(7.0)
    quantizer.embedding.cluster_size.fill_(7.0)
    z = quantizer.codebook[:1].repeat(8, 1).to(dtype)  # 8 rows to code 0, a step of +0.08
    quantizer.train()
    quantizer(z)
    assert float(quantizer.cluster_size[0]) == pytest.approx(0.99 * 7 + 0.01 * 8, abs=1e-5)
    assert quantizer.double().codebook.dtype == torch.float32  # the kernels take float32 at most
