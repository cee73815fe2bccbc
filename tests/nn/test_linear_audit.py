"""fused_linear and Block: argument layouts and shapes the oneDNN path misread, drop path p = 1."""

import pytest
import torch
import torch.nn.functional as F

import eegfast.nn.linear as fl
from eegfast.nn import Block, fused_linear
from eegfast.nn.layers import drop_path

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_a_strided_bias_is_read_by_its_strides(epilogue):
    # A bias that is a column of a larger tensor (stride 2): oneDNN had read the first N
    # floats of its storage, so the output was off by up to ~2 without any error.
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen)
    bias = torch.randn(4, 2, generator=gen)[:, 1]
    residual = torch.randn(3, 4, generator=gen) if epilogue == "residual" else None
    with torch.no_grad():
        got = fused_linear(x, weight, bias, gelu=epilogue == "gelu", residual=residual)
    assert weight in fl._PACKED  # the oneDNN path
    expected = F.linear(x, weight, bias)
    expected = F.gelu(expected) if epilogue == "gelu" else expected
    expected = expected if residual is None else residual + expected
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.randn(3, 6)}, r"x must be \(\.\.\., K\) with K = weight.shape\[1\] = 5"),
        ({"weight": torch.randn(5)}, r"weight must be \(N, K\), got shape \(5,\)"),
        ({"bias": torch.tensor(1.0)}, r"bias must have shape \(N,\) = \(4,\).*got \(\)"),
        ({"bias": torch.randn(3)}, r"bias must have shape \(N,\) = \(4,\).*got \(3,\)"),
        ({"scale": torch.tensor(2.0)}, r"scale must have shape \(N,\) = \(4,\).*got \(\)"),
        ({"scale": torch.randn(7)}, r"scale must have shape \(N,\) = \(4,\).*got \(7,\)"),
    ],
    ids=["x-features", "weight-1d", "bias-0d", "bias-size", "scale-0d", "scale-size"],
)
def test_mismatched_shapes_are_refused_naming_the_argument(kwargs, match, grad):
    # The oneDNN path had answered "could not create a primitive descriptor" (naming nothing),
    # an IndexError (0-d scale, 1-D weight) or, for a 0-d bias, a silently wrong output.
    args = {"x": torch.randn(3, 5), "weight": torch.randn(4, 5), "bias": None, "scale": None}
    args.update(kwargs)
    args["weight"].requires_grad_(grad)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
        fused_linear(args["x"], args["weight"], args["bias"], scale=args["scale"])


@needs_onednn
def test_a_weight_without_output_features_gives_an_empty_output():
    # N = 0 (nn.Linear(5, 0)) is valid for F.linear; oneDNN had refused it under no_grad.
    x, weight, bias = torch.randn(3, 5), torch.randn(0, 5), torch.randn(0)
    with torch.no_grad():
        got = fused_linear(x, weight, bias, residual=torch.randn(3, 0))
        assert fused_linear(x, weight, bias, gelu=True).shape == (3, 0)
    assert got.shape == (3, 0)


def test_drop_path_of_one_drops_every_sample_instead_of_nan():
    # keep = 0: the keep scale was 0 / 0 = NaN, so the whole batch (and a Block's output)
    # became NaN in training; all samples dropped is the limit (timm returns zeros).
    x = torch.randn(4, 3, 8)
    assert torch.equal(drop_path(x, 1.0, True), torch.zeros_like(x))
    block = Block(8, 2, drop_path=1.0).train()
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)  # both branches dropped


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_drop_path_outside_the_unit_interval_is_refused_by_name(rate):
    # -0.1 had silently meant no drop path; 1.5 failed in training as "bernoulli_ expects p
    # to be in [0, 1], but got p=-0.5" (the keep probability, not the argument given).
    with pytest.raises(
        ValueError, match=rf"drop_path must be a probability in \[0, 1\], got {rate}"
    ):
        Block(8, 2, drop_path=rate)
    with pytest.raises(ValueError, match="drop_path must be a probability"):
        drop_path(torch.randn(2, 3), rate, True)
