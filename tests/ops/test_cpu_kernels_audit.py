"""Audit of the C++ CPU kernels: argument checks of the registered ops reached directly or from
a compiled graph (where the public functions skip their own Python checks)."""

import pytest
import torch

from eegfast.ops import moe_expert_ffn


def ffn_problem(T=2, k=2, E=2, D=3, H=5, seed=0):
    """x (T, D) and expert weights w1 (E, H, D), b1 (E, H), w2 (E, D, H), b2 (E, D)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    w1, b1 = torch.randn(E, H, D, generator=gen), torch.randn(E, H, generator=gen)
    w2, b2 = torch.randn(E, D, H, generator=gen), torch.randn(E, D, generator=gen)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("bad_slot", [4, 5, -1])
def test_expert_ffn_op_names_sorted_slots_out_of_range(bad_slot):
    """moe_expert_ffn gathers x[sorted_slots // top_k] by index_select: a slot outside
    [0, T * top_k) failed with "IndexError: index out of range in self", naming no argument."""
    x, w1, b1, w2, b2 = ffn_problem()
    sorted_slots = torch.tensor([0, 2, 1, bad_slot])
    offsets = torch.tensor([0, 2, 4])
    with pytest.raises(RuntimeError, match=rf"sorted_slots\[3\] = {bad_slot} is outside \[0, "):
        torch.ops.eegfast.moe_expert_ffn(x, sorted_slots, offsets, w1, b1, w2, b2, 2)


def test_compiled_expert_ffn_names_sorted_slots_out_of_range():
    """Under torch.compile, eegfast.ops.moe_expert_ffn skips its Python value check (it would
    read the tensor during tracing): the C++ op's own check must name the argument."""
    x, w1, b1, w2, b2 = ffn_problem()
    offsets = torch.tensor([0, 2, 4])

    def fn(x, sorted_slots):
        return moe_expert_ffn(x, sorted_slots, offsets, w1, b1, w2, b2, 2, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    good = torch.tensor([0, 2, 1, 3])
    torch.testing.assert_close(compiled(x, good), fn(x, good))
    with pytest.raises(RuntimeError, match=r"sorted_slots\[1\] = 9 is outside"):
        compiled(x, torch.tensor([0, 9, 1, 3]))


def test_expert_ffn_backward_op_checks_offsets_against_the_slots():
    """The backward narrowed grad_y to offsets[E] rows unchecked: offsets[E] > T * top_k failed
    with "start (0) + length (9) exceeds dimension size (8)", naming no argument (the forward
    checks it)."""
    T, k, E, D, H = 4, 2, 2, 3, 5
    x, w1, _, w2, _ = ffn_problem(T, k, E, D, H)
    slots = torch.arange(T * k)
    a1 = h = torch.randn(T * k, H)
    with pytest.raises(RuntimeError, match=r"moe_expert_ffn_bwd: offsets\[E\] = 9 > T \* top_k"):
        torch.ops.eegfast.moe_expert_ffn_bwd(
            torch.randn(T * k, D), x, slots, torch.tensor([0, 4, 9]), slots, w1, w2, a1, h, k
        )
