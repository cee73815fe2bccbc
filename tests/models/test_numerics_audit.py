"""The tokenizer's target standardisation on flat samples and non-finite padding."""

from __future__ import annotations

import pytest
import torch

from eegfast.models.vqnsp import standardise


@pytest.mark.parametrize("value", [0.1, 1 / 3, -2.3])
def test_standardise_gives_zero_for_a_sample_of_equal_values(value):
    """As documented, a sample whose values are all equal gives 0, for any value: the mean
    of n copies of 0.1 rounds an ulp away from 0.1, its std is that rounding error (not 0),
    and centred / std had given ±1 everywhere."""
    x = torch.randn(3, 19, 4, 200)
    x[0] = value
    valid = torch.ones(3, 19, dtype=torch.bool)
    valid[:, 7:] = False
    for out in (standardise(x), standardise(x, valid)):
        assert out[0].abs().max() == 0
        assert out[1].std() > 0.5  # the other samples are standardised as before
    torch.testing.assert_close(standardise(x, valid)[1, :7], standardise(x[:, :7])[1])


def test_standardise_keeps_non_finite_padding_out_of_the_statistics():
    x = torch.randn(2, 5, 3, 10)
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    filled = x.clone()
    filled[0, 3:] = float("nan")
    torch.testing.assert_close(standardise(filled, valid)[0, :3], standardise(x, valid)[0, :3])
    torch.testing.assert_close(standardise(filled, valid)[0, :3], standardise(x[:, :3])[0])
