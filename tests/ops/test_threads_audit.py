"""The C++ CPU kernels on 1, 2, 3 and 7 threads (``torch.set_num_threads``), shapes whose
(batch, head) pairs, query rows and codebook rows split unevenly over them."""

import contextlib

import pytest
import torch

from eegfast.ops import vq_code_stats, vq_nearest
from tests.ops.test_qk_norm_attention import make_case, result_names, run

THREADS = (1, 2, 3, 7)


@contextlib.contextmanager
def num_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 1, 257, 20), (1, 3, 300, 25), (2, 1, 129, 7)])
def test_attention_on_any_thread_count(shape):
    """With few (batch, head) pairs the query rows are split into more chunks on more threads
    (``query_chunks``): the forward is the same bit for bit, the backward's key-side sums are
    added in another order, within float32 rounding."""
    case = make_case(*shape, seed=5, padding=True)
    results = []
    for count in THREADS:
        with num_threads(count):
            results.append(run(case, "cpu"))
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0])  # out
        for name, a, b in zip(result_names(case)[1:], other[1:], results[0][1:], strict=True):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * scale, msg=name)


@pytest.mark.parametrize(("n", "k", "d"), [(1000, 513, 32), (37, 7, 5)])
def test_vq_kernels_on_any_thread_count(n, k, d):
    """Nearest codes and per-code sums: the same bits on any thread count."""
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    results = []
    for count in THREADS:
        with num_threads(count):
            indices, scores = vq_nearest(z, codebook, return_scores=True, backend="cpu")
            l2 = vq_nearest(z, codebook, "l2", backend="cpu")
            results.append((indices, scores, l2, *vq_code_stats(z, indices, k, backend="cpu")))
    for other in results[1:]:
        for a, b in zip(other, results[0], strict=True):
            assert torch.equal(a, b)
