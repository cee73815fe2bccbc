"""MoE ops against the testing standard: hypothesis shapes on every CPU-runnable backend.

What tests/ops/test_moe.py leaves out, added here: the Triton kernels (under TRITON_INTERPRET=1,
set by tests/conftest.py) on hypothesis-drawn shapes in fp32 and fp16, outputs and all gradients;
the C++ kernels in fp32 with LaBraM's widths (D 20 / 25 / 50) and non-contiguous x, weights and
gates; the expert FFN ops with a dropped bucket (offsets[E] < T k); and torch.library.opcheck
of every MoE op on drawn shapes and layouts (a fake kernel whose strides differ from the real
kernel's breaks torch.compile).
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eegfast.ops import available_backends, moe_dispatch, moe_expert_ffn, moe_ffn
from eegfast.ops.moe import moe_expert_ffn_reference, moe_ffn_expert_loop
from eegfast.testing import odd_sizes, strided

TRITON = available_backends()["triton"].available
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton (GPU or TRITON_INTERPRET=1)")

LAYOUTS = ("contiguous", "strided", "transposed")
WIDTHS = st.one_of(st.sampled_from((20, 25, 50)), odd_sizes(1, 40))
# Largest error allowed relative to max(1, largest reference magnitude) of each tensor. fp16:
# the kernels store the hidden activations in fp16 between the two products.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-2}
NAMES = ("out", "dx", "dgates", "dw1", "db1", "dw2", "db2")


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``t``, stored differently (a 2-D or 3-D tensor)."""
    if layout == "strided":
        return strided(t, 2)
    if layout == "transposed":  # the last two dims stored the other way round
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def make_inputs(T, D, H, E, k, *, seed):
    """float64 x (T, D), expert_idx (T, k), gates (T, k), w1, b1, w2, b2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w1 = torch.randn(E, H, D, generator=gen, dtype=torch.float64) / D**0.5
    b1 = 0.1 * torch.randn(E, H, generator=gen, dtype=torch.float64)
    w2 = torch.randn(E, D, H, generator=gen, dtype=torch.float64) / H**0.5
    b2 = 0.1 * torch.randn(E, D, generator=gen, dtype=torch.float64)
    expert_idx = torch.rand(T, E, generator=gen).argsort(1)[:, :k]  # k distinct experts
    gates = torch.rand(T, k, generator=gen, dtype=torch.float64).softmax(-1)
    return x, expert_idx, gates, w1, b1, w2, b2


def results(fn, x, expert_idx, gates, w1, b1, w2, b2, grad):
    """fn's output and the gradients of x, gates, w1, b1, w2, b2 for the output gradient
    ``grad``, all float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gates, w1, b1, w2, b2)]
    lx, lg, lw1, lb1, lw2, lb2 = leaves
    out = fn(lx, expert_idx, lg, lw1, lb1, lw2, lb2)
    if not out.requires_grad:  # T = 0: no graph, every gradient is zero
        return [out.double(), *(torch.zeros_like(t, dtype=torch.float64) for t in leaves)]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]
    return [out.detach().double(), *(g.double() for g in grads)]


def assert_scaled_close(actual, expected, tol):
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.shape == e.shape, f"{name}: {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        size = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(
            a, e, atol=tol * size, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def check_moe_ffn(backend, dtype, shape, layouts, seed):
    """moe_ffn on ``backend`` in ``dtype`` against the float64 expert loop on the same rounded
    inputs; layouts: of x, w1, w2 and gates."""
    x, expert_idx, gates, w1, b1, w2, b2 = make_inputs(*shape, seed=seed)
    # gates stay float32 in low precision (as the MoE layer's router gives them)
    gate_dtype = torch.float32 if dtype == torch.float16 else dtype
    rounded = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
    rx, rw1, rb1, rw2, rb2 = rounded
    rgates = gates.to(gate_dtype)
    grad = torch.randn(x.shape[0], w2.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    x_layout, w1_layout, w2_layout, gates_layout = layouts

    def kernel(lx, idx, lg, lw1, lb1, lw2, lb2):
        return moe_ffn(as_layout(lx, x_layout), idx, as_layout(lg, gates_layout),
                       as_layout(lw1, w1_layout), lb1, as_layout(lw2, w2_layout), lb2,
                       backend=backend)  # fmt: skip

    got = results(kernel, rx, expert_idx, rgates, rw1, rb1, rw2, rb2, grad)
    assert got[0].shape == (x.shape[0], w2.shape[1])
    expected = results(moe_ffn_expert_loop, rx.double(), expert_idx, rgates.double(),
                       rw1.double(), rb1.double(), rw2.double(), rb2.double(), grad)  # fmt: skip
    assert_scaled_close(got, expected, TOLERANCE[dtype])


SHAPES = st.tuples(
    st.one_of(st.just(0), odd_sizes(1, 40)),  # T
    WIDTHS,  # D
    odd_sizes(1, 40),  # H
    st.integers(1, 6),  # E
    st.integers(1, 3),  # k
).filter(lambda s: s[4] <= s[3])


@needs_triton
@settings(max_examples=8)
@given(
    shape=SHAPES,
    dtype=st.sampled_from((torch.float32, torch.float16)),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 4),
    seed=st.integers(0, 2**16),
)
def test_triton_moe_ffn_random_shapes(shape, dtype, layouts, seed):
    check_moe_ffn("triton", dtype, shape, layouts, seed)


@settings(max_examples=25)
@given(
    shape=SHAPES,
    dtype=st.sampled_from((torch.float32, torch.float64)),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 4),
    seed=st.integers(0, 2**16),
)
def test_cpu_moe_ffn_random_shapes_and_layouts(shape, dtype, layouts, seed):
    check_moe_ffn("cpu", dtype, shape, layouts, seed)


def ffn_backends():
    return ["cpu", *(["triton"] if TRITON else [])]


@settings(max_examples=6)
@given(
    shape=SHAPES,
    backend=st.sampled_from(ffn_backends()),
    seed=st.integers(0, 2**16),
)
def test_expert_ffn_with_a_dropped_bucket(shape, backend, seed):
    """Slots dispatched to bucket E (past the E experts: dropped by a capacity limit) give zero
    rows and no gradient; every other row and gradient is the reference's."""
    T, D, H, E, k = shape
    x, _, _, w1, b1, w2, b2 = make_inputs(*shape, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    bucketed = torch.randint(0, E + 1, (T, k), generator=gen)
    plan = moe_dispatch(bucketed, E + 1)
    offsets = plan.offsets[: E + 1]
    grad = torch.randn(T * k, D, generator=gen, dtype=torch.float64)

    def run(name, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
        lx, lw1, lb1, lw2, lb2 = leaves
        y = moe_expert_ffn(lx, plan.sorted_slots, offsets, lw1, lb1, lw2, lb2, k, backend=name)
        if not y.requires_grad:
            return [y.double(), *(torch.zeros_like(t, dtype=torch.float64) for t in leaves)]
        grads = torch.autograd.grad(y, leaves, grad.to(dtype))
        return [y.detach().double(), *(g.double() for g in grads)]

    got = run(backend, torch.float32)
    expected = run("reference", torch.float64)
    end = int(offsets[-1])
    assert (got[0][end:] == 0).all()
    for name, a, e in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), got, expected, strict=True):
        size = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a, e, atol=5e-5 * size, rtol=5e-5, msg=name)
    assert torch.equal(expected[0], moe_expert_ffn_reference(
        x, plan.sorted_slots, offsets, w1, b1, w2, b2, k))  # fmt: skip


# ---- opcheck on drawn shapes and layouts ------------------------------------------------------


def opcheck_cases():
    """(suffix, test_utils) of the MoE op families runnable here."""
    cases = [("", None)]  # C++: every opcheck test
    if TRITON:
        from eegfast.ops import moe_triton  # noqa: F401  (registers the Triton ops)

        # Under TRITON_INTERPRET=1 wrap_triton cannot trace the kernels into a graph, so AOT
        # dispatch runs on a GPU only (test_moe.py's test_gpu_opcheck_and_compile).
        utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
        if torch.cuda.is_available():
            utils.append("test_aot_dispatch_dynamic")
        cases.append(("_triton", utils))
    return cases


@pytest.mark.parametrize(("suffix", "utils"), opcheck_cases())
@settings(max_examples=4)
@given(
    shape=st.tuples(
        odd_sizes(1, 17), WIDTHS, odd_sizes(1, 24), st.integers(1, 4), st.integers(1, 2)
    ).filter(lambda s: s[4] <= s[3]),  # fmt: skip
    dtype=st.sampled_from((torch.float32, torch.float16)),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 4),
    seed=st.integers(0, 2**16),
)
# x column-major: the fake dx of the FFN backward ops had x's strides, the kernels' are row-major
@example(shape=(5, 20, 8, 3, 2), dtype=torch.float32,
         layouts=("transposed", "contiguous", "contiguous", "contiguous"), seed=0)  # fmt: skip
def test_opcheck_every_moe_op(suffix, utils, shape, dtype, layouts, seed):
    T, D, H, E, k = shape
    x, expert_idx, gates, w1, b1, w2, b2 = make_inputs(*shape, seed=seed)
    x_layout, w1_layout, w2_layout, y_layout = layouts
    x = as_layout(x.to(dtype), x_layout)
    w1 = as_layout(w1.to(dtype), w1_layout)
    w2 = as_layout(w2.to(dtype), w2_layout)
    b1, b2, gates = b1.to(dtype), b2.to(dtype), gates.float()
    ops = torch.ops.eegfast
    kwargs = {} if utils is None else {"test_utils": utils}
    if suffix == "":
        torch.library.opcheck(ops.moe_dispatch, (expert_idx, E), **kwargs)
    plan = moe_dispatch(expert_idx, E)
    ffn_op = getattr(ops, "moe_expert_ffn" + suffix)
    ffn_args = (x, plan.sorted_slots, plan.offsets, w1, b1, w2, b2, k)
    for requires_grad in (False, True):
        leaves = [t.detach().requires_grad_(requires_grad) for t in (x, w1, b1, w2, b2)]
        args = (leaves[0], plan.sorted_slots, plan.offsets, *leaves[1:], k)
        torch.library.opcheck(ffn_op, args, **kwargs)
    y, a1, h = ffn_op(*ffn_args)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    bwd_args = (grad_y, x, plan.sorted_slots, plan.offsets, plan.slot_pos, w1, w2, a1, h, k)
    torch.library.opcheck(getattr(ops, "moe_expert_ffn_bwd" + suffix), bwd_args, **kwargs)
    y = as_layout(y, y_layout)
    combine_op = getattr(ops, "moe_combine" + suffix)
    for requires_grad in (False, True):
        args = (y.detach().requires_grad_(requires_grad), gates.requires_grad_(requires_grad),
                plan.slot_pos)  # fmt: skip
        torch.library.opcheck(combine_op, args, **kwargs)
    grad_out = as_layout(torch.randn(T, D).to(dtype), y_layout)
    combine_bwd = getattr(ops, "moe_combine_bwd" + suffix)
    torch.library.opcheck(combine_bwd, (grad_out, y, gates.detach(), plan.slot_pos), **kwargs)


def test_compiled_moe_ffn_with_a_column_major_x():
    """x stored column-major (a transposed view, as ``hidden.T`` gives): the fake kernel of
    the FFN's backward op gave dx x's strides while the kernels return it row-major, and the
    compiled graph's stride assertion failed in the backward."""
    x, expert_idx, gates, w1, b1, w2, b2 = make_inputs(9, 20, 12, 3, 2, seed=3)
    x_t = x.float().T.contiguous().requires_grad_()  # (D, T): x = x_t.T is column-major
    params = [t.float().requires_grad_() for t in (w1, b1, w2, b2)]
    grad = torch.randn(9, 20, generator=torch.Generator().manual_seed(4))

    def loss(x_t, w1, b1, w2, b2):
        out = moe_ffn(x_t.T, expert_idx, gates.float(), w1, b1, w2, b2, backend="cpu")
        return (out * grad).sum()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    # compiled afresh: a graph cached on disk keeps the strides of the fake kernel it was
    # compiled with, whatever the fake kernel now says
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        got = torch.autograd.grad(compiled(x_t, *params), (x_t, *params))
    expected = torch.autograd.grad(loss(x_t, *params), (x_t, *params))
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
