"""Audit of MoEFFN: capacity factors too large for int64, constructor errors naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

from eegfast.nn import MoEFFN
from tests.nn.test_moe import make_moe


@pytest.mark.parametrize("padded", [False, True])
def test_a_huge_capacity_factor_drops_nothing(padded):
    """c * T * k / E past int64 (1e30: "no limit" in practice) raised OverflowError, or, with a
    padding mask (the capacity computed on the device), wrapped to a negative capacity that
    dropped every slot: the layer's output was 0 for every token, silently."""
    moe = make_moe(capacity_factor=1e30)
    dropless = make_moe()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    padding = mask if padded else None
    out = moe(x, padding_mask=padding)
    assert int(moe.last_aux.dropped) == 0
    torch.testing.assert_close(out, dropless(x, padding_mask=padding))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity_factor": float("inf")}, "capacity_factor must be finite and > 0, or None"),
        ({"capacity_factor": float("nan")}, "capacity_factor must be finite and > 0, or None"),
        ({"capacity_factor": 0.0}, "capacity_factor must be finite and > 0, or None"),
        ({"jitter_eps": float("nan")}, "jitter_eps must be >= 0"),
        ({"hidden": 0}, "hidden must be an int >= 1, got 0"),
        ({"dim": 0}, "dim must be an int >= 1, got 0"),
        ({"out_dim": -1}, "out_dim must be an int >= 1, got -1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    options = {"dim": 8, "hidden": 16, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        MoEFFN(**options)
