"""Edge cases of the GPU kernels' launchers found by review, checked under TRITON_INTERPRET=1
(tests/conftest.py sets it) against the C++ kernels."""

from __future__ import annotations

import pytest
import torch

from eegfast.ops import available_backends, vq_code_stats

requires_triton = pytest.mark.skipif(
    not available_backends()["triton"].available, reason="triton is not installed"
)


@pytest.mark.triton
@requires_triton
def test_triton_code_stats_counts_rows_of_zero_features():
    """z of shape (N, 0): the C++ and CUDA kernels count the rows (cols = max(D, 1)); the Triton
    launcher divided by next_power_of_2(0) = 0 (ZeroDivisionError)."""
    z = torch.randn(5, 0)
    indices = torch.tensor([0, 1, 1, -1, 2])
    counts, sums = vq_code_stats(z, indices, 3, backend="triton")
    expected_counts, expected_sums = vq_code_stats(z, indices, 3, backend="cpu")
    torch.testing.assert_close(counts, expected_counts, rtol=0, atol=0)
    assert sums.shape == expected_sums.shape == (3, 0)


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize(("D", "H"), [(0, 3), (3, 0)], ids=["no_features", "no_hidden_units"])
def test_triton_moe_bias_gradients_with_an_empty_weight_dim(D, H):
    """x with no features (D = 0) still has db1 = the column sums of da1, and no hidden units
    (H = 0) still db2 = those of dy: the weight-gradient kernel writes db in its first column
    block, and a grid of cdiv(0, BLOCK_N) = 0 column blocks left db1 / db2 uninitialised."""
    from eegfast.ops import moe_dispatch, moe_expert_ffn

    T, D_out, E, k = 4, 2, 2, 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen)
    w1, b1 = torch.randn(E, H, D, generator=gen), torch.randn(E, H, generator=gen)
    w2, b2 = torch.randn(E, D_out, H, generator=gen), torch.randn(E, D_out, generator=gen)
    dispatch = moe_dispatch(torch.tensor([[0], [1], [1], [0]]), E, backend="cpu")
    grad_y = torch.randn(T * k, D_out, generator=gen)

    def grads(backend: str) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        y = moe_expert_ffn(leaves[0], dispatch.sorted_slots, dispatch.offsets, *leaves[1:], k,
                           backend=backend)  # fmt: skip
        return list(torch.autograd.grad(y, leaves, grad_y))

    for name, got, expected in zip(("dx", "dw1", "db1", "dw2", "db2"), grads("triton"),
                                   grads("cpu"), strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected, msg=name)


def test_code_stats_on_a_gpu_take_the_reference_under_deterministic_algorithms(monkeypatch):
    """The Triton and CUDA code-stats kernels add with float atomics (run-to-run rounding);
    under torch.use_deterministic_algorithms(True) a GPU tensor now takes the reference
    (index_add, deterministic in that mode). Shown with meta tensors standing in for a GPU's
    and a GPU kernel that must not be reached."""
    from eegfast.ops import vq as vq_module

    def gpu_kernel(*args):
        raise AssertionError("the atomic GPU kernel ran under deterministic algorithms")

    monkeypatch.setattr(vq_module, "resolve_backend", lambda *args: "triton")
    monkeypatch.setattr(
        vq_module, "_triton_ops", lambda: type("T", (), {"vq_code_stats_triton": gpu_kernel})
    )
    z = torch.empty(6, 4, device="meta")
    indices = torch.empty(6, dtype=torch.int64, device="meta")
    with pytest.raises(AssertionError, match="atomic GPU kernel"):
        vq_code_stats(z, indices, 3)  # not deterministic: the kernel's path
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        counts, sums = vq_code_stats(z, indices, 3)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert counts.shape == (3,) and sums.shape == (3, 4)
