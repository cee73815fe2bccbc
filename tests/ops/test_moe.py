"""MoE dispatch / expert FFN / combine: every backend against plain-PyTorch references.

The reference for outputs and gradients is a per-token loop over each token's experts
(``moe_ffn_per_token_reference``); dispatch must equal the stable-argsort reference exactly.
"""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eegfast.ops import available_backends, moe_combine, moe_dispatch, moe_expert_ffn, moe_ffn
from eegfast.ops.moe import (
    moe_dispatch_reference,
    moe_ffn_expert_loop,
    moe_ffn_per_token_reference,
    moe_ffn_torch_sorted,
)
from eegfast.testing import odd_sizes, requires_cuda, strided
from eegfast.testing.triton_sm90 import KernelSpec, compile_for_sm90, has_ptxas

TRITON = available_backends()["triton"].available


def ffn_backends():
    return ["reference", "cpu", *(["triton"] if TRITON else [])]


def make_problem(T, D, H, E, k, dtype=torch.float32, seed=0, device="cpu", expert_idx=None):
    """x, expert_idx, gates and expert weights (as leaf tensors requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    w1 = torch.randn(E, H, D, generator=gen) / D**0.5
    b1 = torch.randn(E, H, generator=gen) * 0.1
    w2 = torch.randn(E, D, H, generator=gen) / H**0.5
    b2 = torch.randn(E, D, generator=gen) * 0.1
    if expert_idx is None:
        scores = torch.rand(T, E, generator=gen)
        expert_idx = scores.topk(k, dim=1).indices
    gates = torch.rand(T, k, generator=gen).softmax(-1)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    return tensors[0], expert_idx.to(device), gates.to(device).requires_grad_(), *tensors[1:]


def outputs_and_grads(fn, x, expert_idx, gates, w1, b1, w2, b2):
    out = fn(x, expert_idx, gates, w1, b1, w2, b2)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    leaves = (x, gates, w1, b1, w2, b2)
    if not out.requires_grad:  # the per-token loop at T = 0 builds no graph: all grads are 0
        return [out, *(torch.zeros_like(t) for t in leaves)]
    grads = torch.autograd.grad((out.float() * weight).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]
    return [out, *grads]


NAMES = ("out", "dx", "dgates", "dw1", "db1", "dw2", "db2")


def assert_all_close(actual, expected, atol, rtol):
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol, msg=name)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def check_dispatch(expert_idx, num_experts, backend):
    got = moe_dispatch(expert_idx, num_experts, backend=backend)
    ref = moe_dispatch_reference(expert_idx, num_experts)
    for name, a, b in zip(got._fields, got, ref, strict=True):
        assert a.dtype == torch.int64, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Invariants, independent of the reference: a permutation, its inverse, grouped by expert
    # in non-decreasing order, slot order kept within a group.
    S = expert_idx.numel()
    flat = expert_idx.reshape(-1)
    assert torch.equal(got.sorted_slots.sort().values, torch.arange(S))
    assert torch.equal(got.slot_pos[got.sorted_slots], torch.arange(S))
    experts_in_order = flat[got.sorted_slots]
    assert bool((experts_in_order[1:] >= experts_in_order[:-1]).all())
    same = experts_in_order[1:] == experts_in_order[:-1]
    assert bool((got.sorted_slots[1:] > got.sorted_slots[:-1])[same].all())
    assert int(got.counts.sum()) == S and int(got.offsets[-1]) == S


@given(
    T=st.one_of(st.just(0), odd_sizes(1, 600)),
    k=st.integers(1, 4),
    E=st.one_of(st.sampled_from((1, 2, 8, 16, 64, 65)), st.integers(1, 65)),
    seed=st.integers(0, 2**16),
)
def test_dispatch_exact_random(T, k, E, seed):
    gen = torch.Generator().manual_seed(seed)
    expert_idx = torch.randint(0, E, (T, k), generator=gen)
    check_dispatch(expert_idx, E, "cpu")


def test_dispatch_edge_cases():
    check_dispatch(torch.zeros(0, 2, dtype=torch.long), 8, "cpu")  # T = 0
    check_dispatch(torch.full((37, 2), 5), 8, "cpu")  # all tokens to one expert
    sparse = torch.randint(0, 2, (41, 2)) * 7  # experts 1..6 empty
    got = moe_dispatch(sparse, 8, backend="cpu")
    assert got.counts[1:7].eq(0).all()
    check_dispatch(sparse, 8, "cpu")
    check_dispatch(torch.randint(0, 8, (25, 2)).T.contiguous().T, 8, "cpu")  # strided input


def test_dispatch_bad_input():
    # ValueError from every backend (the C++ kernel's check is TORCH_CHECK_VALUE)
    for backend in ("cpu", "reference"):
        for bad in ([[0, 8]], [[0, -1]]):
            with pytest.raises(ValueError, match="outside"):
                moe_dispatch(torch.tensor(bad), 8, backend=backend)
    with pytest.raises(ValueError, match="num_experts"):
        moe_dispatch(torch.zeros(3, 2, dtype=torch.long), 66)
    with pytest.raises(ValueError, match=r"\(T, k\)"):
        moe_dispatch(torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="int64"):
        moe_dispatch(torch.zeros(3, 2, dtype=torch.int32), 4)


# --------------------------------------------------------------------------------------------
# Expert FFN + combine: outputs and all gradients against the per-token loop
# --------------------------------------------------------------------------------------------


def with_backend(backend):
    return lambda *args: moe_ffn(*args, backend=backend)


@pytest.mark.parametrize("backend", ffn_backends())
def test_against_per_token_loop(backend):
    problem = make_problem(T=29, D=20, H=36, E=5, k=2, dtype=torch.float64, seed=1)
    if backend == "triton":  # no fp64 dots in Triton: fp32 inputs, compare to fp64 loop
        p32 = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in problem]
        got = outputs_and_grads(with_backend(backend), *p32)
        atol = rtol = 1e-4
    else:
        got = outputs_and_grads(with_backend(backend), *problem)
        atol = rtol = 1e-10
    expected = outputs_and_grads(moe_ffn_per_token_reference, *problem)
    assert_all_close(got, expected, atol, rtol)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # forward AD's jit-scripted decomps
def test_func_transforms_and_forward_ad_run_on_the_reference():
    """torch.func.grad failed with functorch's message about setup_context, and torch.func.jvp
    returned a zero tangent (silently wrong), on the kernels: both run the reference now."""
    problem = make_problem(T=9, D=6, H=10, E=3, k=2, dtype=torch.float64, seed=4)
    x, expert_idx, gates, w1, b1, w2, b2 = problem

    def loss(backend):
        return lambda x, w1: moe_ffn(x, expert_idx, gates, w1, b1, w2, b2, backend=backend)

    for name, transform in (
        ("grad", lambda f: torch.func.grad(lambda x, w: f(x, w).square().sum(), (0, 1))(x, w1)),
        ("jvp", lambda f: torch.func.jvp(f, (x, w1), (torch.ones_like(x), w1))[1]),
    ):
        got, want = transform(loss("cpu")), transform(loss("reference"))
        got, want = (
            (got,) if torch.is_tensor(got) else got,
            (want,) if torch.is_tensor(want) else want,
        )
        for a, b in zip(got, want, strict=True):
            assert b.abs().max() > 0.1, name
            torch.testing.assert_close(a, b, msg=name)


def test_double_backward_through_the_kernels_raises():
    """create_graph=True through the C++ kernels: differentiating their gradients raises naming
    the reference (it failed inside the kernel's matmuls), also when x reaches the loss by a
    second path (where a pruned error node would have dropped the kernels' term silently)."""
    problem = make_problem(T=9, D=6, H=10, E=3, k=2, dtype=torch.float64, seed=5)
    x, expert_idx, gates, w1, b1, w2, b2 = problem
    out = moe_ffn(x, expert_idx, gates, w1, b1, w2, b2, backend="cpu")
    (g,) = torch.autograd.grad(out.square().sum() + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not support double backward.*'reference'"):
        torch.autograd.grad(g.sum(), x)
    out = moe_ffn(x, expert_idx, gates, w1, b1, w2, b2, backend="reference")
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert gg.abs().max() > 0


@settings(max_examples=20)
@given(
    T=st.one_of(st.just(0), odd_sizes(1, 60)),
    D=odd_sizes(1, 40),
    H=odd_sizes(1, 70),
    E=st.integers(1, 9),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_cpu_random_shapes(T, D, H, E, k, seed):
    k = min(k, E)
    problem = make_problem(T, D, H, E, k, dtype=torch.float64, seed=seed)
    got = outputs_and_grads(with_backend("cpu"), *problem)
    expected = outputs_and_grads(moe_ffn_expert_loop, *problem)
    assert_all_close(got, expected, 1e-10, 1e-10)


@pytest.mark.parametrize(
    "case", ["T0", "one_expert", "empty_experts", "k1", "strided_x", "odd_dims"]
)
def test_edge_cases(case):
    T, D, H, E, k, idx = 23, 12, 20, 6, 2, None
    if case == "T0":
        T = 0
    elif case == "one_expert":
        idx = torch.stack([torch.full((T,), 3), torch.full((T,), 3)], 1)  # both slots, one expert
    elif case == "empty_experts":
        idx = torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 5)], 1)
    elif case == "k1":
        k = 1
    elif case == "odd_dims":
        D, H = 7, 33
    problem = list(make_problem(T, D, H, E, k, seed=3, expert_idx=idx))
    if case == "strided_x":
        problem[0] = strided(problem[0].detach()).requires_grad_()
    expected = outputs_and_grads(moe_ffn_per_token_reference, *problem)
    for backend in ffn_backends():
        got = outputs_and_grads(with_backend(backend), *problem)
        assert_all_close(got, expected, 2e-5, 2e-5)


def low_precision_backends():
    cases = [("cpu", torch.float16), ("cpu", torch.bfloat16)]
    if TRITON:
        cases.append(("triton", torch.float16))  # the interpreter has no bf16
    return cases


@pytest.mark.parametrize(("backend", "dtype"), low_precision_backends())
def test_low_precision_against_fp32(backend, dtype):
    """Error against the fp32 reference at most ~2x that of plain PyTorch in the same dtype."""
    p64 = make_problem(T=40, D=32, H=64, E=4, k=2, dtype=torch.float64, seed=5)
    low = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in p64]
    low[2] = p64[2].detach().float().requires_grad_()  # gates stay fp32
    expected = outputs_and_grads(moe_ffn_expert_loop, *p64)
    got = outputs_and_grads(with_backend(backend), *low)
    torch_low = outputs_and_grads(moe_ffn_expert_loop, *low)
    for name, g, t, e in zip(NAMES, got, torch_low, expected, strict=True):
        assert g.dtype == (torch.float32 if name == "dgates" else dtype), name
        err = (g.double() - e.double()).abs().max().item()
        base = (t.double() - e.double()).abs().max().item()
        scale = e.double().abs().max().item() + 1e-6
        assert err <= 2 * base + 1e-3 * scale, (name, err, base)


@pytest.mark.parametrize("backend", ffn_backends())
def test_dropped_bucket_rows_are_zero(backend):
    """Rows at and past offsets[E] (dropped slots) give zeros and get no weight gradient."""
    x, _, _, w1, b1, w2, b2 = make_problem(T=10, D=8, H=16, E=3, k=2, seed=7)
    bucketed = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(0))
    bucketed[0, 0] = 3  # at least one dropped slot
    plan = moe_dispatch(bucketed, 4)
    offsets = plan.offsets[:4]
    y = moe_expert_ffn(x, plan.sorted_slots, offsets, w1, b1, w2, b2, 2, backend=backend)
    end = int(offsets[-1])
    assert end < 20 and y[end:].eq(0).all()
    ref = moe_expert_ffn(x, plan.sorted_slots, offsets, w1, b1, w2, b2, 2, backend="reference")
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y.sum(), (x, w1))
    ref_grads = torch.autograd.grad(ref.sum(), (x, w1))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_combine_alone():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(26, 9, generator=gen, requires_grad=True)
    gates = torch.rand(13, 2, generator=gen, requires_grad=True)
    slot_pos = torch.randperm(26, generator=gen)
    for backend in ffn_backends():
        out = moe_combine(y, gates, slot_pos, backend=backend)
        expected = torch.stack(
            [
                gates[t, 0] * y[slot_pos[2 * t]] + gates[t, 1] * y[slot_pos[2 * t + 1]]
                for t in range(13)
            ]
        )
        torch.testing.assert_close(out, expected)
        g = torch.autograd.grad(out.square().sum(), (y, gates))
        ge = torch.autograd.grad(expected.square().sum(), (y, gates))
        for a, b in zip(g, ge, strict=True):
            torch.testing.assert_close(a, b)


def test_combine_skips_slots_without_a_row():
    """slot_pos -1 (the CUDA dispatch's mark of an expert index outside [0, E)) adds nothing
    and reads nothing, on every backend; its gate gets a zero gradient. Row 25 of y (the
    NaN one), which no slot points to then, must not reach the output or the gradients."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(26, 9, generator=gen)
    y[25] = torch.nan
    y.requires_grad_()
    gates = torch.rand(13, 2, generator=gen, requires_grad=True)
    slot_pos = torch.arange(26)
    slot_pos[[3, 25]] = -1  # token 1's second slot, token 12's second slot
    for backend in ffn_backends():
        out = moe_combine(y, gates, slot_pos, backend=backend)
        kept = (slot_pos >= 0).reshape(13, 2, 1)
        expected = (gates[:, :, None] * torch.where(kept, y.reshape(13, 2, 9), 0)).sum(1)
        torch.testing.assert_close(out, expected, msg=backend)
        grad_y, grad_gates = torch.autograd.grad(out.sum(), (y, gates))
        assert grad_gates[1, 1] == 0 and grad_gates[12, 1] == 0, backend
        assert grad_y[[3, 25]].abs().sum() == 0 and grad_y.isfinite().all(), backend
    with pytest.raises(ValueError, match=r"slot_pos values must be in \[-1, 26\).*-2 \.\. 23"):
        moe_combine(y, gates, torch.arange(26) - 2, backend="cpu")


def test_float64_never_reaches_the_triton_kernels(monkeypatch):
    """Triton's fp64 tiles do not compile for a GPU: an automatic choice of Triton runs float64
    on the reference, an explicit one says what to use."""
    from eegfast.ops import moe as moe_ops

    monkeypatch.setattr(moe_ops, "resolve_backend", lambda *args: "triton")  # as on a GPU
    x64, x32 = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3)
    assert moe_ops._ffn_backend(None, x64) == "reference"
    assert moe_ops._ffn_backend(None, x32) == "triton"
    with pytest.raises(TypeError, match="backend='triton'.*float64.*backend='reference'"):
        moe_ops._ffn_backend("triton", x64)
    if TRITON:
        x, expert_idx, _, w1, b1, w2, b2 = make_problem(T=5, D=4, H=6, E=2, k=2,
                                                        dtype=torch.float64)  # fmt: skip
        plan = moe_dispatch(expert_idx, 2)
        with pytest.raises(TypeError, match="float64"):
            # the op itself checks too (a caller past moe_expert_ffn)
            moe_ops._triton_ops().moe_expert_ffn_triton(x, plan.sorted_slots, plan.offsets, w1,
                                                        b1, w2, b2, 2)  # fmt: skip


def test_plain_pytorch_baselines_agree():
    """The benchmark baselines compute the same function (so their timings compare)."""
    problem = make_problem(T=31, D=10, H=14, E=4, k=2, dtype=torch.float64, seed=11)
    expected = moe_ffn_per_token_reference(*problem)
    torch.testing.assert_close(moe_ffn_expert_loop(*problem), expected)
    torch.testing.assert_close(moe_ffn_torch_sorted(*problem), expected)


# --------------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------------


def op_samples(dtype=torch.float32):
    x, idx, gates, w1, b1, w2, b2 = make_problem(T=9, D=8, H=16, E=3, k=2, dtype=dtype, seed=13)
    plan = moe_dispatch(idx, 3)
    ffn_args = (x, plan.sorted_slots, plan.offsets, w1, b1, w2, b2, 2)
    y, a1, h = torch.ops.eegfast.moe_expert_ffn(
        *[a.detach() if torch.is_tensor(a) else a for a in ffn_args]
    )
    grad_y = torch.randn_like(y)
    bwd_args = (
        grad_y,
        x.detach(),
        plan.sorted_slots,
        plan.offsets,
        plan.slot_pos,
        w1.detach(),
        w2.detach(),
        a1,
        h,
        2,
    )
    combine_args = (y.detach().requires_grad_(), gates, plan.slot_pos)
    combine_bwd_args = (torch.randn(9, 8), y.detach(), gates.detach(), plan.slot_pos)
    return idx, ffn_args, bwd_args, combine_args, combine_bwd_args


def test_opcheck_cpu_ops():
    idx, ffn_args, bwd_args, combine_args, combine_bwd_args = op_samples()
    ops = torch.ops.eegfast
    torch.library.opcheck(ops.moe_dispatch, (idx, 3))
    torch.library.opcheck(ops.moe_dispatch, (torch.zeros(0, 2, dtype=torch.long), 3))
    torch.library.opcheck(ops.moe_expert_ffn, ffn_args)
    torch.library.opcheck(ops.moe_expert_ffn_bwd, bwd_args)
    torch.library.opcheck(ops.moe_combine, combine_args)
    torch.library.opcheck(ops.moe_combine_bwd, combine_bwd_args)


@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or TRITON_INTERPRET=1)")
def test_opcheck_triton_ops():
    from eegfast.ops import moe_triton  # noqa: F401  (registers the ops)

    _, ffn_args, bwd_args, combine_args, combine_bwd_args = op_samples()
    ops = torch.ops.eegfast
    # Under TRITON_INTERPRET=1 kernels are InterpretedFunctions, which wrap_triton cannot trace
    # into a graph; test_gpu_opcheck_and_compile runs the full opcheck for the Triton ops.
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if torch.cuda.is_available():
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.moe_expert_ffn_triton, ffn_args, test_utils=utils)
    torch.library.opcheck(ops.moe_expert_ffn_bwd_triton, bwd_args, test_utils=utils)
    torch.library.opcheck(ops.moe_combine_triton, combine_args, test_utils=utils)
    torch.library.opcheck(ops.moe_combine_bwd_triton, combine_bwd_args, test_utils=utils)


@pytest.mark.triton
@pytest.mark.skipif(not TRITON, reason="needs triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("b_layout", ["k_unit", "n_unit", "no_unit"])
@pytest.mark.parametrize(("K", "N"), [(24, 40), (6, 10), (7, 9)])  # vector_align 8, 2, 1
def test_grouped_rows_gemm_layouts_and_alignments(b_layout, K, N):
    """The grouped GEMM takes sizes and strides divided by their common power-of-two factor
    and B with its unit stride along k (a transposed weight, the forward), along n (the
    backward) or neither: every case equals per-group matmuls, dropped rows zero."""
    from eegfast.ops import moe_triton

    gen = torch.Generator().manual_seed(K * N)
    E, offsets = 3, torch.tensor([0, 5, 11, 17], dtype=torch.int64)  # rows 17, 18: dropped
    a = torch.randn(19, K, generator=gen)
    if b_layout == "k_unit":
        b = torch.randn(E, N, K, generator=gen).transpose(1, 2)
    elif b_layout == "n_unit":
        b = torch.randn(E, K, N, generator=gen)
    else:  # every stride 2 or more: a view taking every other element of both dims
        b = torch.randn(E, 2 * K, 2 * N, generator=gen)[:, ::2, ::2]
    bias = torch.randn(E, N, generator=gen)
    out = torch.full((19, N), float("nan"))
    index = torch.arange(19, dtype=torch.int64)
    moe_triton._rows_gemm(a, index, 1, b, bias, out, None, offsets, moe_triton._ACT_NONE,
                          gather=False)  # fmt: skip
    expected = torch.zeros(19, N)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        expected[lo:hi] = a[lo:hi] @ b[e] + bias[e]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_cpu():
    problem = make_problem(T=21, D=8, H=16, E=4, k=2, seed=17)

    def fn(x, idx, gates, w1, b1, w2, b2):
        return moe_ffn(x, idx, gates, w1, b1, w2, b2, backend="cpu") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(compiled, *problem)
    expected = outputs_and_grads(fn, *problem)
    assert_all_close(got, expected, 1e-6, 1e-6)


# --------------------------------------------------------------------------------------------
# GPU (not run in this CPU-only CI)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not has_ptxas(), reason="this triton install has no bundled ptxas")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """Every MoE kernel as LaBraM-Base's MoE launches it (D = 200, H = 800, bf16: sizes and
    strides divided by 8; B's unit stride along k in the forward's fc1, along n in the
    backward) compiles for an H100: tensor-core dots in the GEMMs, whose tiles reach shared
    memory by asynchronous copies (pipelined); no 2-byte loads anywhere and no spilled
    registers. With the sizes and strides as plain runtime integers (200 is not a multiple of
    16, which is all Triton finds out about an integer by itself) every element was its own
    2-byte load and the GEMMs spilled 300-700 bytes."""
    types = {name: "*bf16" for name in ("a_ptr", "b_ptr", "bias_ptr", "aux_ptr", "out_ptr",
             "p_ptr", "q_ptr", "dw_ptr", "db_ptr", "src_ptr", "gate_ptr", "y_ptr",
             "grad_out_ptr", "grad_y_ptr", "grad_gate_ptr")}  # fmt: skip
    types |= {"index_ptr": "*i64", "offsets_ptr": "*i64", "pos_ptr": "*i64"}
    gemm = dict(PRECISION="ieee", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_E=16, ALIGN=8)
    specs = [
        KernelSpec("_grouped_rows_kernel",
                   dict(gemm, GATHER=True, HAS_BIAS=True, ACT=1, B_UNIT=0), types, num_warps=8),
        KernelSpec("_grouped_rows_kernel",
                   dict(gemm, GATHER=False, HAS_BIAS=False, ACT=2, B_UNIT=1), types, num_warps=8),
        KernelSpec("_grouped_weight_grad_kernel",
                   dict(PRECISION="ieee", BLOCK_M=64, BLOCK_N=128, BLOCK_J=64, ALIGN=8,
                        GATHER=True, HAS_BIAS_GRAD=True), types, num_warps=8),
        KernelSpec("_gather_sum_kernel", dict(HAS_GATES=True, BLOCK_T=32, BLOCK_D=128, ALIGN=8),
                   types),
        KernelSpec("_combine_bwd_kernel", dict(BLOCK_T=16, BLOCK_D=128, ALIGN=8), types),
    ]  # fmt: skip
    for spec in specs:  # one at a time: the rows kernel twice
        compiled = compile_for_sm90("eegfast.ops.moe_triton", [spec])[spec.name]
        label = f"{spec.name} {spec.constants}"
        if spec.name.startswith("_grouped"):
            assert "warp_group_dot" in compiled["ttgir"], f"{label}: no tensor-core dot"
            assert "async_copy_global_to_local" in compiled["ttgir"], f"{label}: not pipelined"
        # 2-byte loads: none in the GEMMs; in the row kernels only the gates (one per token)
        two_byte = len(re.findall(r"ld\.global(?:\.\w+)*\.b16", compiled["ptx"]))
        assert two_byte <= (0 if spec.name.startswith("_grouped") else 4), f"{label}: {two_byte}"
        assert re.search(r"(ld|st)\.global(?:\.\w+)*\.v4", compiled["ptx"]), f"{label}: no vectors"
        assert compiled["spill_bytes"] == 0, f"{label}: {compiled['registers']} registers, spills"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_and_cuda_dispatch(dtype):
    x, idx, gates, w1, b1, w2, b2 = make_problem(
        T=1000, D=200, H=800, E=8, k=2, seed=19, device="cuda"
    )
    check = moe_dispatch(idx, 8)
    ref = moe_dispatch_reference(idx, 8)
    for a, b in zip(check, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    problem = [
        t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t
        for t in (x, idx, gates, w1, b1, w2, b2)
    ]
    problem[2] = gates
    got = outputs_and_grads(with_backend("triton"), *problem)
    expected = outputs_and_grads(moe_ffn_expert_loop, *problem)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, e in zip(NAMES, got, expected, strict=True):
        scale = e.double().abs().max().item() + 1e-6
        assert (a.double() - e.double()).abs().max().item() <= 4 * tol * scale, name


@requires_cuda
@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    from eegfast.ops import moe_triton  # noqa: F401  (registers the ops)

    _, ffn_args, bwd_args, combine_args, combine_bwd_args = op_samples()
    to_cuda = lambda args: tuple(a.cuda() if torch.is_tensor(a) else a for a in args)  # noqa: E731
    ops = torch.ops.eegfast
    torch.library.opcheck(ops.moe_dispatch, (to_cuda(ffn_args)[1][None], 20))
    torch.library.opcheck(ops.moe_expert_ffn_triton, to_cuda(ffn_args))
    torch.library.opcheck(ops.moe_expert_ffn_bwd_triton, to_cuda(bwd_args))
    torch.library.opcheck(ops.moe_combine_triton, to_cuda(combine_args))
    torch.library.opcheck(ops.moe_combine_bwd_triton, to_cuda(combine_bwd_args))
    problem = make_problem(T=300, D=64, H=128, E=8, k=2, seed=23, device="cuda")
    fn = lambda *args: moe_ffn(*args, backend="triton")  # noqa: E731
    got = outputs_and_grads(torch.compile(fn, fullgraph=True), *problem)
    expected = outputs_and_grads(fn, *problem)
    assert_all_close(got, expected, 1e-4, 1e-4)


def test_cpu_combine_gradient_when_slot_pos_repeats_a_row():
    """Two slots reading one row of y: its gradient is the sum of both slots' gradients (the
    C++ backward kept only the last one it stored)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(6, 5, generator=gen, requires_grad=True)
    gates = torch.rand(3, 2, generator=gen, requires_grad=True)
    slot_pos = torch.tensor([0, 0, 4, 1, 4, 5])  # rows 0 and 4 read twice, 2 and 3 never
    grad_out = torch.randn(3, 5, generator=gen)
    got = torch.autograd.grad(moe_combine(y, gates, slot_pos, backend="cpu"), (y, gates), grad_out)
    want = torch.autograd.grad(
        moe_combine(y, gates, slot_pos, backend="reference"), (y, gates), grad_out
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_cpu_expert_ffn_gradient_when_sorted_slots_is_not_a_permutation():
    """Rows j of the sorted order read x[sorted_slots[j] // top_k]: a slot listed twice sends
    gradient to its token from both rows (the C++ backward's gather found only one of them, and
    a slot not listed read an uninitialised position)."""
    gen = torch.Generator().manual_seed(1)
    T, k, E, D, H = 3, 2, 2, 4, 6
    w1 = torch.randn(E, H, D, generator=gen)
    b1 = torch.randn(E, H, generator=gen)
    w2 = torch.randn(E, D, H, generator=gen)
    b2 = torch.randn(E, D, generator=gen)
    sorted_slots = torch.tensor([0, 0, 3, 3, 5, 5])  # slots 1, 2, 4 not listed
    offsets = torch.tensor([0, 3, 6])
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    grad_y = torch.randn(T * k, D, generator=gen)
    grads = {}
    for backend in ("cpu", "reference"):
        y = moe_expert_ffn(x, sorted_slots, offsets, w1, b1, w2, b2, k, backend=backend)
        (grads[backend],) = torch.autograd.grad(y, x, grad_y)
    torch.testing.assert_close(grads["cpu"], grads["reference"])


def test_cpu_kernels_check_slot_positions_on_direct_calls():
    """The registered C++ ops (reached directly or from a compiled graph, where moe_combine
    skips its Python check) refuse slot positions outside the rows, a backward slot_pos that
    names a row twice, and an FFN backward whose slot_pos does not invert sorted_slots."""
    y, gates = torch.randn(4, 3), torch.rand(2, 2)
    with pytest.raises(RuntimeError, match=r"slot_pos\[3\] = 7 is outside \[-1, 4\)"):
        torch.ops.eegfast.moe_combine(y, gates, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(RuntimeError, match="slot_pos names row 1 twice"):
        torch.ops.eegfast.moe_combine_bwd(torch.randn(2, 3), y, gates, torch.tensor([0, 1, 1, 3]))
    T, k, E, D, H = 2, 2, 2, 3, 5
    x, w1, w2 = torch.randn(T, D), torch.randn(E, H, D), torch.randn(E, D, H)
    sorted_slots, offsets = torch.tensor([0, 2, 1, 3]), torch.tensor([0, 2, 4])
    a1 = h = torch.randn(T * k, H)
    args = (torch.randn(T * k, D), x, sorted_slots, offsets)
    good = torch.tensor([0, 2, 1, 3])  # the inverse of sorted_slots
    torch.ops.eegfast.moe_expert_ffn_bwd(*args, good, w1, w2, a1, h, k)
    with pytest.raises(RuntimeError, match="slot_pos its inverse"):
        torch.ops.eegfast.moe_expert_ffn_bwd(*args, torch.tensor([0, 1, 2, 3]), w1, w2, a1, h, k)


def test_index_and_gate_tensors_on_another_device_are_refused_by_name():
    """The C++ kernels read sorted_slots, offsets, gates and slot_pos through pointers of the
    main input's device without checking where they live: a tensor of another device (here
    "meta", which has no storage; a CUDA tensor next to CPU ones alike) was read as host
    memory and moe_combine / moe_expert_ffn returned garbage without an error."""
    T, k, E, D, H = 3, 2, 2, 4, 5
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, D, generator=gen)
    w1, b1 = torch.randn(E, H, D, generator=gen), torch.randn(E, H, generator=gen)
    w2, b2 = torch.randn(E, D, H, generator=gen), torch.randn(E, D, generator=gen)
    expert_idx = torch.tensor([[0, 1], [1, 0], [1, 1]])
    gates = torch.rand(T, k, generator=gen)
    plan = moe_dispatch(expert_idx, E)
    y = torch.randn(T * k, D, generator=gen)
    for backend in ("cpu", "reference"):
        for name in ("sorted_slots", "offsets"):
            args = {"sorted_slots": plan.sorted_slots, "offsets": plan.offsets}
            args[name] = args[name].to("meta")
            with pytest.raises(ValueError, match=f"x is on cpu but {name} is on meta"):
                moe_expert_ffn(x, args["sorted_slots"], args["offsets"], w1, b1, w2, b2, k,
                               backend=backend)  # fmt: skip
        with pytest.raises(ValueError, match="y_sorted is on cpu but gates is on meta"):
            moe_combine(y, gates.to("meta"), plan.slot_pos, backend=backend)
        with pytest.raises(ValueError, match="y_sorted is on cpu but slot_pos is on meta"):
            moe_combine(y, gates, plan.slot_pos.to("meta"), backend=backend)
        for name in ("expert_idx", "gates"):
            args = {"expert_idx": expert_idx, "gates": gates}
            args[name] = args[name].to("meta")
            with pytest.raises(ValueError, match=f"x is on cpu but {name} is on meta"):
                moe_ffn(x, args["expert_idx"], args["gates"], w1, b1, w2, b2, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_expert_ffn_refuses_slot_ids_outside_the_slots_by_name(backend):
    """sorted_slots holds token slots t * top_k + i in [0, T * top_k): the reference read a
    negative one from the end (slot -1 computed the last token's row, silently), the C++
    kernel raised an IndexError that named no argument."""
    T, k, E, D, H = 3, 2, 2, 4, 5
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=gen)
    w1, b1 = torch.randn(E, H, D, generator=gen), torch.randn(E, H, generator=gen)
    w2, b2 = torch.randn(E, D, H, generator=gen), torch.randn(E, D, generator=gen)
    offsets = torch.tensor([0, 3, 6])
    for bad, shown in (([0, 1, 2, 3, 4, -1], "-1 .. 4"), ([0, 1, 2, 3, 4, 6], "0 .. 6")):
        with pytest.raises(ValueError, match=rf"sorted_slots values must be in \[0, 6\).*{shown}"):
            moe_expert_ffn(x, torch.tensor(bad), offsets, w1, b1, w2, b2, k, backend=backend)


def test_reference_combine_refuses_slot_positions_below_minus_one():
    """Only -1 marks a slot without a row: the reference took -2 (any negative) for it and
    dropped the slot silently, where the C++ kernel refuses it."""
    y, gates = torch.randn(4, 3), torch.rand(2, 2)
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=r"slot_pos values must be in \[-1, 4\).*-2 \.\. 3"):
            moe_combine(y, gates, torch.tensor([0, -2, 3, 1]), backend=backend)
