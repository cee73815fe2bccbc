"""Helpers for testing eegfast ops against their references.

- :data:`TOLERANCES` / :func:`assert_close`: dtype-aware comparison.
- hypothesis strategies for shapes with odd sizes and LaBraM's head dims.
- :data:`requires_cuda`: pytest marker that skips without a CUDA device.

Triton kernels run on CPU under ``TRITON_INTERPRET=1``; it must be set before triton is
imported, which ``tests/conftest.py`` does for the test suite.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

# (atol, rtol) per dtype for values computed with fp32 accumulation from inputs of that dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

LABRAM_HEAD_DIMS = (20, 25, 50)
HEAD_DIMS = (*LABRAM_HEAD_DIMS, 64, 128)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale=1.0
):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: expected's)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol * scale, equal_nan=True
    )


def odd_sizes(min_value: int = 1, max_value: int = 300) -> st.SearchStrategy[int]:
    """Sizes biased towards odd and prime values and block-size edges (15, 16, 17, 63 ...)."""
    edges = [
        v
        for v in (1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 257)
        if min_value <= v <= max_value
    ]
    return st.one_of(st.sampled_from(edges), st.integers(min_value, max_value))


def vq_shapes(max_n: int = 200, max_k: int = 300) -> st.SearchStrategy[tuple[int, int, int]]:
    """(N, K, D) for VQ lookups: N may be 0, D covers LaBraM head and code dims."""
    return st.tuples(
        st.one_of(st.just(0), odd_sizes(1, max_n)),
        odd_sizes(1, max_k),
        st.sampled_from((1, 3, 20, 25, 32, 50, 64)),
    )


def strided(t: torch.Tensor, step: int = 2) -> torch.Tensor:
    """A copy of ``t`` that has the same values but a non-unit stride in its last dim."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * step, dtype=t.dtype, device=t.device)
    wide[..., ::step] = t
    return wide[..., ::step]


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every operator that reaches the dispatcher while active, e.g.
    ``"eegfast::qk_norm_attention_fwd"``; ``ops`` is the set of names."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))
