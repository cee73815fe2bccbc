"""Triton QK-LayerNorm attention kernels against a float64 plain-PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), fp32 and fp16 only
(numpy has no bf16), at small shapes: the interpreter runs every program instance in Python.
The forward and backward ops are called directly, so lse, the LayerNorm statistics and all
seven gradients are checked, not only what autograd exposes.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from eegfast.ops import available_backends
from eegfast.testing import OpRecorder, odd_sizes, requires_cuda, strided
from eegfast.testing.triton_sm90 import KernelSpec, compile_for_sm90, has_ptxas, loop_mixes

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not available_backends()["triton"].available,
        reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
    ),
]

EPS = 1e-6
PARAM_NAMES = ("q_w", "q_b", "k_w", "k_b")
GRAD_NAMES = ("q", "k", "v", *PARAM_NAMES)
# Largest error allowed, relative to max(1, largest reference magnitude) of each tensor. The
# fp16 bound covers rounding LN(q), LN(k) and the probabilities to fp16 before the tensor-core
# products (as flash attention does); fp32 is exact fp32 arithmetic in a different order.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}
FWD_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def triton_ops():
    from eegfast.ops import qk_norm_attention_triton

    return qk_norm_attention_triton


def reference(q, k, v, params, *, scale, key_padding_mask=None, causal=False, block_ids=None):
    """float64 LayerNorm + explicit masked softmax: out (B, H, N, D) and lse (B, H, N).

    Written here (not imported) so the kernels are checked against an independent formula.
    """
    B, H, N, D = q.shape
    q_w, q_b, k_w, k_b = params
    qn = F.layer_norm(q, (D,), q_w, q_b, EPS)
    kn = F.layer_norm(k, (D,), k_w, k_b, EPS)
    scores = scale * qn @ kn.transpose(-1, -2)
    visible = torch.ones(B, 1, N, N, dtype=torch.bool)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(N, N, dtype=torch.bool).tril()
    if block_ids is not None:
        visible = visible & (block_ids[None, :] <= block_ids[:, None])
    sees_any = visible.any(-1, keepdim=True)
    # Rows that see nothing: softmax over zeros (finite, gradients flow) times an all-zero mask.
    safe = torch.where(sees_any, scores.masked_fill(~visible, -math.inf), 0.0)
    out = (torch.softmax(safe, -1) * visible) @ v
    lse = torch.where(sees_any[..., 0], torch.logsumexp(safe, -1), -math.inf)
    return out, lse


def make_case(B, H, N, D, dtype, *, seed, affine=True, mask=None, block_size=None):
    """Inputs (B, H, N, D), LayerNorm params (D,) or None, padding mask and block ids."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(3))
    params = [None] * 4
    if affine:
        params = [
            (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype),
            (0.3 * torch.randn(D, generator=gen)).to(dtype),
            (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype),
            (0.3 * torch.randn(D, generator=gen)).to(dtype),
        ]
    key_padding_mask = None
    if mask == "random":
        key_padding_mask = torch.rand(B, N, generator=gen) < 0.3
    elif mask == "full_row":  # batch 0 has every key padded: all its rows see nothing
        key_padding_mask = torch.rand(B, N, generator=gen) < 0.3
        key_padding_mask[0] = True
    block_ids = None
    if block_size is not None:
        block_ids = torch.arange(N) // block_size
    grad_out = torch.randn(B, N, H, D, generator=gen).to(dtype)
    return q, k, v, params, key_padding_mask, block_ids, grad_out


def assert_close_scaled(actual, expected, tol, name):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name} has non-finite values"
    bound = tol * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def op_pair(backend):
    """(forward op, backward op) of ``backend``: "triton" or "cpu" (C++)."""
    if backend == "triton":
        ops = triton_ops()
        return ops.qk_norm_attention_fwd_triton, ops.qk_norm_attention_bwd_triton
    return torch.ops.eegfast.qk_norm_attention_fwd, torch.ops.eegfast.qk_norm_attention_bwd


def check_against_reference(q, k, v, params, key_padding_mask, block_ids, grad_out, *,
                            causal=False, scale=None, backend="triton"):  # fmt: skip
    """Forward outputs, lse, stats and all seven gradients of ``backend``'s ops vs float64."""
    fwd, bwd = op_pair(backend)
    B, H, N, D = q.shape
    dtype = q.dtype
    scale = D**-0.5 if scale is None else scale
    masks = dict(key_padding_mask=key_padding_mask, block_ids=block_ids, causal=causal)
    out, lse, q_stats, k_stats = fwd(
        q, k, v, *params, EPS, scale, key_padding_mask, causal, block_ids
    )
    assert out.shape == (B, N, H, D) and out.is_contiguous() and out.dtype == dtype
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    assert q_stats.shape == k_stats.shape == (B, H, N, 2)

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    param_leaves = [None if p is None else p.detach().double().requires_grad_() for p in params]
    ref_out, ref_lse = reference(*leaves, param_leaves, scale=scale, **masks)
    assert_close_scaled(out.transpose(1, 2), ref_out, FWD_TOLERANCE[dtype], "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert_close_scaled(lse[finite], ref_lse[finite], FWD_TOLERANCE[dtype], "lse")
    for name, x, stats in (("q_stats", q, q_stats), ("k_stats", k, k_stats)):
        x64 = x.double()
        var = x64.var(-1, unbiased=False)
        assert_close_scaled(stats[..., 0], x64.mean(-1), 1e-5, f"{name} mean")
        assert_close_scaled(stats[..., 1] * (var + EPS).sqrt(), torch.ones_like(var), 1e-4, name)

    ref_out.backward(grad_out.double().transpose(1, 2))
    grads = bwd(
        grad_out, q, k, v, *params, out, lse, q_stats, k_stats, scale,
        key_padding_mask, causal, block_ids,
    )  # fmt: skip
    assert len(grads) == 7
    for name, grad, leaf in zip(GRAD_NAMES, grads, leaves + param_leaves, strict=True):
        if leaf is None:
            assert grad.shape == (0,), f"d{name} of a None parameter must have shape (0,)"
            continue
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert_close_scaled(grad, leaf.grad, TOLERANCE[dtype], f"d{name}")
    if params[3] is not None:  # the key bias shifts whole score rows: exactly no gradient
        assert param_leaves[3].grad.abs().max() < 1e-9
        assert torch.count_nonzero(grads[6]) == 0, "dk_b must be exactly zero"
    return out, lse, grads


# (B, H, N, D, dtype, mask, causal, block_size, affine): odd N, LaBraM head dims, every mask.
CASES = [
    (1, 2, 1, 20, torch.float32, None, False, None, True),
    (2, 1, 7, 25, torch.float32, "random", False, None, True),
    (1, 2, 33, 20, torch.float32, None, True, None, True),
    (2, 1, 33, 50, torch.float32, "full_row", False, None, False),
    (1, 1, 70, 64, torch.float32, None, False, 3, True),
    (2, 1, 70, 20, torch.float32, "random", True, 4, True),
    (1, 1, 7, 128, torch.float32, None, True, None, True),
    (1, 2, 33, 25, torch.float16, "random", False, None, True),
    (1, 1, 70, 50, torch.float16, None, True, None, True),
    (2, 1, 33, 20, torch.float16, "full_row", False, 5, True),
]


@pytest.mark.parametrize(
    ("B", "H", "N", "D", "dtype", "mask", "causal", "block_size", "affine"), CASES
)
def test_matches_reference(B, H, N, D, dtype, mask, causal, block_size, affine):
    q, k, v, params, kpm, ids, grad_out = make_case(
        B, H, N, D, dtype, seed=N * D, affine=affine, mask=mask, block_size=block_size
    )
    check_against_reference(q, k, v, params, kpm, ids, grad_out, causal=causal)


@settings(max_examples=10)
@given(
    n=odd_sizes(1, 48),
    d=st.sampled_from((20, 25, 50, 64)),
    dtype=st.sampled_from((torch.float32, torch.float16)),
    mask=st.sampled_from((None, "random", "full_row")),
    causal=st.booleans(),
    block_size=st.sampled_from((None, 1, 2, 5)),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_masks(n, d, dtype, mask, causal, block_size, affine, seed):
    inputs = make_case(2, 1, n, d, dtype, seed=seed, affine=affine, mask=mask,
                       block_size=block_size)  # fmt: skip
    check_against_reference(*inputs, causal=causal, scale=0.7 / math.sqrt(d))


def test_int64_block_ids_outside_int32_range():
    """The kernels compare int32 ids: int64 ids past 2**31 (which a cast would wrap to negative
    numbers) must give the visibility of the ids themselves."""
    B, H, N, D = 1, 2, 21, 20
    q, k, v, params, _, ids, grad_out = make_case(B, H, N, D, torch.float32, seed=12, block_size=4)
    wide = ids * 2**31 + (ids % 2) * 3 - 2**33  # negative, past both int32 ends, uneven steps
    assert wide.dtype == torch.int64 and (wide.max() > 2**31 or wide.min() < -(2**31))
    check_against_reference(q, k, v, params, None, wide, grad_out, causal=False)


def test_packed_and_strided_inputs_without_copies():
    """q, k, v as views of one (B, N, 3·H·D) qkv buffer, and with a non-unit inner stride."""
    B, H, N, D = 2, 2, 33, 25
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3 * H * D, generator=gen)
    q, k, v = qkv.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
    assert q.stride() == (N * 3 * H * D, D, 3 * H * D, 1)
    _, _, _, params, kpm, ids, grad_out = make_case(B, H, N, D, torch.float32, seed=4,
                                                    mask="random", block_size=2)  # fmt: skip
    out, lse, grads = check_against_reference(q, k, v, params, kpm, ids, grad_out)
    contiguous = triton_ops().qk_norm_attention_fwd_triton(
        q.contiguous(), k.contiguous(), v.contiguous(), *params, EPS, D**-0.5, kpm, False, ids
    )
    torch.testing.assert_close(out, contiguous[0], rtol=0, atol=0)
    check_against_reference(strided(q), strided(k), v.transpose(2, 3).contiguous().transpose(2, 3),
                            params, kpm, ids, grad_out)  # fmt: skip


def test_autograd_through_public_packed_api():
    """qk_norm_attention_packed(backend="triton"): the autograd glue registered for the Triton
    ops gives the reference gradients for the qkv buffer and the four parameters."""
    from eegfast.ops.qk_norm_attention import qk_norm_attention_packed

    B, H, N, D = 2, 2, 33, 20
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(B, N, 3 * H * D, generator=gen)
    _, _, _, params, kpm, ids, _ = make_case(B, H, N, D, torch.float32, seed=10, mask="full_row",
                                             block_size=3)  # fmt: skip
    grad = torch.randn(B, N, H * D, generator=gen)
    leaves = [x.clone().requires_grad_() for x in (qkv, *params)]
    out = qk_norm_attention_packed(leaves[0], H, *leaves[1:], eps=EPS, key_padding_mask=kpm,
                                   block_causal=ids, backend="triton")  # fmt: skip
    grads = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [x.double().requires_grad_() for x in (qkv, *params)]
    q, k, v = ref_leaves[0].unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
    ref_out, _ = reference(q, k, v, ref_leaves[1:], scale=D**-0.5, key_padding_mask=kpm,
                           block_ids=ids)  # fmt: skip
    ref_out = ref_out.transpose(1, 2).reshape(B, N, H * D)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    assert_close_scaled(out, ref_out, TOLERANCE[torch.float32], "out")
    for name, a, b in zip(("qkv", *PARAM_NAMES), grads, ref_grads, strict=True):
        assert_close_scaled(a, b, TOLERANCE[torch.float32], f"d{name}")


@pytest.mark.parametrize("grads", [False, True])
def test_public_function_launches_directly_in_eager_mode(grads):
    """Plain eager calls launch the kernels without the triton_op dispatch (the eager
    autograd.Function, the (B, H, N, D) gradient read in place); under a dispatch mode the
    registered ops run. Same bits either way."""
    from eegfast.ops import qk_norm_attention

    q, k, v, params, kpm, ids, _ = make_case(2, 2, 33, 20, torch.float32, seed=12,
                                             mask="random", block_size=4)  # fmt: skip
    grad = torch.randn(2, 2, 33, 20, generator=torch.Generator().manual_seed(13))

    def results():
        leaves = [x.clone().requires_grad_(grads) for x in (q, k, v, *params)]
        out = qk_norm_attention(*leaves, eps=EPS, key_padding_mask=kpm, block_causal=ids,
                                backend="triton")  # fmt: skip
        return out, [out, *(torch.autograd.grad(out, leaves, grad) if grads else ())]

    eager_out, eager = results()
    with OpRecorder() as recorder:
        traced_out, traced = results()
    expected = {"eegfast::qk_norm_attention_fwd_triton"}
    if grads:
        expected.add("eegfast::qk_norm_attention_bwd_triton")
        function = eager_out.grad_fn.next_functions[0][0]  # under the (B, H, N, D) view
        assert type(function).__name__ == "qk_norm_attention_fwd_triton_eagerBackward"
    assert expected <= recorder.ops
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_public_function_traces_without_graph_breaks():
    """torch.compile sees qk_norm_attention(backend="triton") as one graph: the Triton ops'
    import is not traced (an importlib call inside broke the graph twice per call), and N = 130
    launches each kernel twice (see _launch_spans)."""
    from eegfast.ops import qk_norm_attention

    q, k, v, params, kpm, ids, _ = make_case(1, 2, 130, 20, torch.float32, seed=14,
                                             mask="random", block_size=4)  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *params)]

    def loss(*tensors):
        out = qk_norm_attention(*tensors, eps=EPS, key_padding_mask=kpm, block_causal=ids,
                                backend="triton")  # fmt: skip
        return out.square().sum()

    explained = torch._dynamo.explain(loss)(*leaves)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_rows_that_see_nothing_are_zero_with_zero_gradients():
    q, k, v, params, _, _, grad_out = make_case(2, 2, 33, 20, torch.float32, seed=5)
    kpm = torch.zeros(2, 33, dtype=torch.bool)
    kpm[0] = True  # batch 0: every key padded
    ids = torch.arange(33) % 4  # not sorted: query i with id 0 sees only keys with id 0
    ids[:3] = torch.tensor([2, 3, 1])
    kpm[1, ids == 0] = True  # batch 1: queries with id 0 see no key
    ops = triton_ops()
    out, lse, q_stats, k_stats = ops.qk_norm_attention_fwd_triton(
        q, k, v, *params, EPS, 0.3, kpm, False, ids
    )
    empty_rows = torch.zeros(2, 33, dtype=torch.bool)
    empty_rows[0] = True
    empty_rows[1] = ids == 0
    assert (out[empty_rows] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[empty_rows]).all()
    assert torch.isfinite(lse.transpose(1, 2)[~empty_rows]).all()
    dq, dk, dv, *param_grads = ops.qk_norm_attention_bwd_triton(
        grad_out, q, k, v, *params, out, lse, q_stats, k_stats, 0.3, kpm, False, ids
    )
    for grad in (dq, dk, dv, *param_grads):
        assert torch.isfinite(grad).all()
    assert (dq.transpose(1, 2)[empty_rows] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all()  # padded keys get no gradient
    check_against_reference(q, k, v, params, kpm, ids, grad_out, scale=0.3)


def test_backward_is_deterministic():
    q, k, v, params, kpm, ids, grad_out = make_case(2, 2, 70, 20, torch.float32, seed=6,
                                                    mask="random")  # fmt: skip
    ops = triton_ops()
    saved = ops.qk_norm_attention_fwd_triton(q, k, v, *params, EPS, 0.2, kpm, True, ids)
    first = ops.qk_norm_attention_bwd_triton(grad_out, q, k, v, *params, *saved, 0.2, kpm, True,
                                             ids)  # fmt: skip
    second = ops.qk_norm_attention_bwd_triton(grad_out, q, k, v, *params, *saved, 0.2, kpm, True,
                                              ids)  # fmt: skip
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    ops = triton_ops()
    q = torch.randn(1, 1, 5, 129)
    with pytest.raises(ValueError, match="1..128"):
        ops.qk_norm_attention_fwd_triton(q, q, q, None, None, None, None, EPS, 1.0, None, False,
                                         None)  # fmt: skip
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="same shape"):
        ops.qk_norm_attention_fwd_triton(q, q[:, :, :4], q, None, None, None, None, EPS, 1.0,
                                         None, False, None)  # fmt: skip
    with pytest.raises(TypeError, match="one dtype"):
        ops.qk_norm_attention_fwd_triton(q, q.half(), q, None, None, None, None, EPS, 1.0, None,
                                         False, None)  # fmt: skip
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        q64 = q.double()
        ops.qk_norm_attention_fwd_triton(q64, q64, q64, None, None, None, None, EPS, 1.0, None,
                                         False, None)  # fmt: skip
    with pytest.raises(ValueError, match="q_w"):
        ops.qk_norm_attention_fwd_triton(q, q, q, torch.ones(7), None, None, None, EPS, 1.0,
                                         None, False, None)  # fmt: skip
    with pytest.raises(ValueError, match="key_padding_mask"):
        bad_mask = torch.zeros(1, 4, dtype=torch.bool)
        ops.qk_norm_attention_fwd_triton(q, q, q, None, None, None, None, EPS, 1.0, bad_mask,
                                         False, None)  # fmt: skip
    with pytest.raises(ValueError, match="block_ids"):
        ops.qk_norm_attention_fwd_triton(q, q, q, None, None, None, None, EPS, 1.0, None, False,
                                         torch.arange(4))  # fmt: skip


@pytest.mark.parametrize("atomic_dq", [False, True])
def test_opcheck(atomic_dq, monkeypatch):
    ops = triton_ops()
    monkeypatch.setattr(ops, "ATOMIC_DQ", atomic_dq)  # the backward's dQ by atomic adds too
    q, k, v, params, kpm, ids, grad_out = make_case(1, 2, 17, 20, torch.float32, seed=7,
                                                    mask="random", block_size=3)  # fmt: skip
    checks = ["test_schema", "test_autograd_registration", "test_faketensor"]
    # Under TRITON_INTERPRET=1 the kernels are InterpretedFunctions, which wrap_triton cannot
    # trace into a graph, so AOT dispatch cannot run on CPU; test_gpu_opcheck_and_compile runs
    # the full opcheck on a GPU.
    if torch.cuda.is_available():
        checks.append("test_aot_dispatch_dynamic")
    fwd = torch.ops.eegfast.qk_norm_attention_fwd_triton
    bwd = torch.ops.eegfast.qk_norm_attention_bwd_triton
    for requires_grad in (False, True):
        leaves = [x.clone().requires_grad_(requires_grad) for x in (q, k, v, *params)]
        args = (*leaves, EPS, 0.25, kpm, True, ids)
        torch.library.opcheck(fwd, args, test_utils=checks)
    saved = ops.qk_norm_attention_fwd_triton(q, k, v, *params, EPS, 0.25, kpm, True, ids)
    bwd_args = (grad_out, q, k, v, *params, *saved, 0.25, kpm, True, ids)
    torch.library.opcheck(bwd, bwd_args, test_utils=checks)
    no_params = (grad_out, q, k, v, None, None, None, None, *saved, 0.25, None, False, None)
    torch.library.opcheck(bwd, no_params, test_utils=checks)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[9]])
def test_pre_normalised_variant(case, monkeypatch):
    """The loops over zero-padded, pre-normalised rows (PRE_NORMALISE) give what the fused
    loops give, bit for bit (the same arithmetic on the same values), forward and all seven
    gradients, and pass the reference check; without LayerNorm parameters too (CASES[3]). v
    and grad_out come from padded copies at D = 25 (4-byte fp32 row vectors), as given in the
    other cases."""
    B, H, N, D, dtype, mask, causal, block_size, affine = case
    inputs = make_case(B, H, N, D, dtype, seed=N + D, affine=affine, mask=mask,
                       block_size=block_size)  # fmt: skip
    ops = triton_ops()
    assert ops._needs_padded_rows(ops._row_align(D, *inputs[:3]), dtype) == (D == 25)
    monkeypatch.setattr(ops, "PRE_NORMALISE", False)
    fused_out, fused_lse, fused_grads = check_against_reference(*inputs, causal=causal)
    monkeypatch.setattr(ops, "PRE_NORMALISE", True)
    out, lse, grads = check_against_reference(*inputs, causal=causal)
    assert torch.equal(out, fused_out) and torch.equal(lse, fused_lse)
    for name, grad, fused in zip(GRAD_NAMES, grads, fused_grads, strict=True):
        assert torch.equal(grad, fused), f"d{name}"


def score_bound_log2(q, params, scale):
    """The forward's bound on |score| log2 e of these inputs (see _fwd_kernel): the largest
    |LN(q) w + b| times sqrt(D) max |w_k| + |b_k|, times |scale| log2 e."""
    D = q.shape[-1]
    q_w, q_b, k_w, k_b = (None if p is None else p.double() for p in params)
    q_norm = F.layer_norm(q.double(), (D,), q_w, q_b, EPS).norm(dim=-1).max().item()
    key_bound = math.sqrt(D) * (1.0 if k_w is None else k_w.abs().max().item())
    key_bound += 0.0 if k_b is None else k_b.norm().item()
    return q_norm * key_bound * abs(scale) / math.log(2)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[9]])
def test_unshifted_forward_when_scores_are_bounded(case, monkeypatch):
    """With LayerNorm'ed q and k the scores are bounded by the parameters; within
    unshifted_score_limit the forward takes exp2 of the raw scores, with no row maxima. Both
    loops pass the reference check (forward and every gradient, which use the forward's lse);
    they are different arithmetic, so forcing the online loops must change the output bits,
    which shows the default launch took the unshifted ones."""
    B, H, N, D, dtype, mask, causal, block_size, affine = case
    q, k, v, params, kpm, ids, grad_out = make_case(B, H, N, D, dtype, seed=N + 2 * D,
                                                    affine=affine, mask=mask,
                                                    block_size=block_size)  # fmt: skip
    if affine:  # weights near 1, small biases: LaBraM's initialisation
        params = [(torch.ones(D) + 0.05 * p.float()).to(dtype) if i % 2 == 0 else
                  (0.05 * p.float()).to(dtype) for i, p in enumerate(params)]  # fmt: skip
    ops = triton_ops()
    assert score_bound_log2(q, params, D**-0.5) <= ops.unshifted_score_limit(dtype)
    inputs = (q, k, v, params, kpm, ids, grad_out)
    out, lse, grads = check_against_reference(*inputs, causal=causal)
    monkeypatch.setattr(ops, "UNSHIFTED", False)
    assert ops.unshifted_score_limit(dtype) == -math.inf
    online_out, online_lse, online_grads = check_against_reference(*inputs, causal=causal)
    assert not torch.equal(out, online_out) and not torch.equal(lse, online_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unshifted_forward_at_the_edge_of_its_range(dtype):
    """Scores as large as the limit allows: LayerNorm weights scaled so that the bound is 95%
    of unshifted_score_limit, and k = q so that each row's own score comes near it (the
    largest probabilities ~2^40 in fp32, ~2^13 in fp16, the smallest their inverses). The
    unshifted loops, still chosen, match the reference, forward and gradients."""
    B, H, N, D = 1, 2, 33, 20
    q, _, v, params, _, _, grad_out = make_case(B, H, N, D, dtype, seed=11)
    ops = triton_ops()
    weights = [torch.ones(D), None, torch.ones(D), None]
    factor = math.sqrt(0.95 * ops.unshifted_score_limit(dtype) / score_bound_log2(
        q, weights, D**-0.5))  # fmt: skip
    params = [(factor * torch.ones(D)).to(dtype), None, (factor * torch.ones(D)).to(dtype), None]
    bound = score_bound_log2(q, params, D**-0.5)
    assert 0.9 * ops.unshifted_score_limit(dtype) < bound <= ops.unshifted_score_limit(dtype)
    out, lse, _ = check_against_reference(q, q, v, params, None, None, grad_out)
    online = ops._forward(q, q, v, *params, EPS, D**-0.5, None, False, None, eager=True,
                          score_limit=-math.inf)  # fmt: skip
    assert not torch.equal(out, online[0])  # the default took the unshifted loops


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the forced overflow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_online_forward_when_scores_may_overflow(dtype):
    """Large LayerNorm weights (and q = k, so some scores reach their bound): beyond the
    limit the forward keeps the online maximum and matches the reference (forward only: these
    scores make the gradients too ill-conditioned for a fixed tolerance); the raw-score loops
    forced on the same inputs overflow, so the bound check is what keeps them away."""
    B, H, N, D = 1, 2, 33, 20
    q, _, v, params, _, _, _ = make_case(B, H, N, D, dtype, seed=5)
    params = [(8.0 * p.float()).to(dtype) for p in params]
    ops = triton_ops()
    scale = D**-0.5
    assert score_bound_log2(q, params, scale) > ops.unshifted_score_limit(dtype)

    def forward(score_limit=None):
        return ops._forward(q, q, v, *params, EPS, scale, None, False, None, eager=True,
                            score_limit=score_limit)  # fmt: skip

    out, lse, _, _ = forward()
    ref_out, ref_lse = reference(q.double(), q.double(), v.double(),
                                 [p.double() for p in params], scale=scale)  # fmt: skip
    assert_close_scaled(out.transpose(1, 2), ref_out, FWD_TOLERANCE[dtype], "out")
    assert_close_scaled(lse, ref_lse, FWD_TOLERANCE[dtype], "lse")
    assert not torch.isfinite(forward(score_limit=math.inf)[0]).all()


def test_pad_rows_reads_any_layout():
    """_pad_rows: the rows of a strided (B, N, H, D) buffer seen as (B, H, N, D) (grad_out's
    layout), zero past D; LayerNorm from stored stats equals the computed one."""
    ops = triton_ops()
    B, N, H, D = 2, 37, 3, 20
    x = torch.randn(B, N, H, D)
    padded = ops._pad_rows(x.transpose(1, 2), ops._COPY)
    assert padded.shape == (B * H, N, 32)
    assert torch.equal(padded[..., :D], x.transpose(1, 2).reshape(B * H, N, D))
    assert torch.count_nonzero(padded[..., D:]) == 0
    w, b = 1 + 0.1 * torch.randn(D), 0.1 * torch.randn(D)
    stats = torch.empty(B, H, N, 2)
    normalised = ops._pad_rows(x.transpose(1, 2), ops._NORMALISE, w, b, stats, EPS)
    again = ops._pad_rows(x.transpose(1, 2), ops._NORMALISE_FROM_STATS, w, b, stats)
    assert torch.equal(normalised, again)
    expected = torch.nn.functional.layer_norm(x.transpose(1, 2), (D,), w, b, EPS)
    torch.testing.assert_close(normalised[..., :D], expected.reshape(B * H, N, D))
    assert torch.count_nonzero(normalised[..., D:]) == 0


def test_row_align_divides_every_stride_and_the_head_dim():
    """The kernels take strides divided by _row_align's factor and multiply them back: it must
    divide D and every outer stride, and be 1 where a stride needs int64."""
    ops = triton_ops()
    x = torch.empty(2, 3, 5, 20)
    assert ops._row_align(20, x) == 4
    assert ops._row_align(20, x, x.transpose(1, 2)) == 4
    assert ops._row_align(25, torch.empty(2, 3, 5, 25)) == 1
    assert ops._row_align(64, torch.empty(2, 3, 5, 64)) == 8
    assert ops._row_align(64, torch.empty(2, 3, 5, 66)[..., :64]) == 2  # rows 66 apart
    packed = torch.empty(2, 7, 3 * 3 * 20)  # (B, N, 3 H D) qkv, H = 3, D = 20
    q = packed.unflatten(-1, (3, 3, 20)).permute(2, 0, 3, 1, 4)[0]
    assert ops._row_align(20, q) == 4

    class Huge:  # a stride past int32 (no storage needed to ask)
        @staticmethod
        def stride():
            return (2**31 + 4, 20, 20, 1)

    assert ops._row_align(20, Huge()) == 1


@pytest.mark.parametrize("split", [True, False])
def test_launch_spans_cover_every_row_once(split):
    """_launch_spans: consecutive spans from 0 to N; a main span is whole blocks of every
    autotuned size; a tail span (at most _TAIL_MAX_ROWS rows) exactly when N is a multiple of
    _BLOCK_MULTIPLE plus a few rows and the split is on."""
    ops = triton_ops()
    block_sizes = {c.kwargs[name] for configs, name in (
        (ops._FWD_CONFIGS, "BLOCK_M"), (ops._DQ_CONFIGS, "BLOCK_M"), (ops._DKDV_CONFIGS, "BLOCK_N"),
        (ops._FWD_WIDE_CONFIGS, "BLOCK_M"), (ops._DQ_WIDE_CONFIGS, "BLOCK_M"),
        (ops._DKDV_WIDE_CONFIGS, "BLOCK_N"), (ops._FWD_FP32_CONFIGS, "BLOCK_M"),
        (ops._DQ_FP32_CONFIGS, "BLOCK_M"), (ops._DKDV_FP32_CONFIGS, "BLOCK_N"),
        (ops._FWD_FP32_WIDE_CONFIGS, "BLOCK_M"), (ops._DQ_FP32_WIDE_CONFIGS, "BLOCK_M"),
        (ops._DKDV_FP32_WIDE_CONFIGS, "BLOCK_N"),
    ) for c in configs}  # fmt: skip
    assert all(ops._BLOCK_MULTIPLE % size == 0 for size in block_sizes)
    for N in (1, 17, 32, 33, 127, 128, 129, 160, 161, 231, 257, 2049):
        spans = ops._launch_spans(N, split)
        assert ops._has_short_tail(N) == (0 < N % 128 <= ops._TAIL_MAX_ROWS)
        assert [first for first, _, _ in spans] == [0, *(f + e for f, e, _ in spans[:-1])]
        assert sum(extent for _, extent, _ in spans) == N
        tails = [extent for _, extent, tail in spans if tail]
        expected_tail = N % 128 if split and 0 < N % 128 <= ops._TAIL_MAX_ROWS else None
        assert tails == ([] if expected_tail is None else [expected_tail]), N
        for _, extent, tail in spans:
            assert tail or extent % ops._BLOCK_MULTIPLE == 0 or len(spans) == 1
    if split:
        assert ops._launch_spans(257, split) == [(0, 256, False), (256, 1, True)]


def test_tail_launch_with_every_mask(monkeypatch):
    """N = 130 (128 rows in whole blocks, 2 in the tail launch) with padding, causal and
    block-causal masks: forward and all seven gradients match the reference, and the same bits
    as one launch over all rows (SPLIT_TAIL off) up to rounding."""
    inputs = make_case(1, 1, 130, 20, torch.float32, seed=130, mask="random", block_size=7)
    monkeypatch.setattr(triton_ops(), "SPLIT_TAIL", True)
    split_out, split_lse, split_grads = check_against_reference(*inputs, causal=True)
    monkeypatch.setattr(triton_ops(), "SPLIT_TAIL", False)
    out, lse, grads = check_against_reference(*inputs, causal=True)
    torch.testing.assert_close(split_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split_lse, lse, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(GRAD_NAMES, split_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d{name}")


@pytest.mark.parametrize(
    ("pre", "split", "N", "expected"),
    [
        (None, None, 257, ["FT", "FF", "TT", "TF"]),
        (None, None, 256, ["FT", "TT"]),  # no short tail: the split changes nothing
        (True, None, 2049, ["TT", "TF"]),
        (None, False, 130, ["FF", "TF"]),
        (False, True, 257, ["FT"]),
        (False, None, 100, ["FT"]),
    ],
)
def test_candidate_variants(pre, split, N, expected, monkeypatch):
    """Both values of each unpinned switch, the split only where N has a short tail, the
    defaults (fused loops, tail launch) first."""
    ops = triton_ops()
    monkeypatch.setattr(ops, "PRE_NORMALISE", pre)
    monkeypatch.setattr(ops, "SPLIT_TAIL", split)
    got = ["".join("FT"[flag] for flag in variant[:2]) for variant in ops._candidate_variants(N)]
    assert got == expected


@pytest.mark.parametrize(
    ("atomic", "deterministic", "expected"),
    [(None, False, [False, True]), (True, False, [True]), (None, True, [False]),
     (True, True, [False])],
)  # fmt: skip
def test_atomic_dq_candidates(atomic, deterministic, expected, monkeypatch):
    """dQ by atomic adds is a backward candidate only, unless pinned, and never under
    deterministic algorithms (float sums in another order each run)."""
    ops = triton_ops()
    monkeypatch.setattr(ops, "PRE_NORMALISE", False)
    monkeypatch.setattr(ops, "SPLIT_TAIL", True)
    monkeypatch.setattr(ops, "ATOMIC_DQ", atomic)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    assert [v.atomic_dq for v in ops._candidate_variants(257, "backward")] == expected
    assert [v.atomic_dq for v in ops._candidate_variants(257, "forward")] == [False]


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[5], CASES[8], CASES[9]])
@pytest.mark.parametrize("pre_normalise", [False, True])
def test_atomic_dq_variant(case, pre_normalise, monkeypatch):
    """The dK / dV kernel adding dQ's shares by atomic adds, then the LayerNorm backward pass
    (ATOMIC_DQ), gives every gradient within the reference check, with the fused and the
    pre-normalised loops, every mask, fp32 and fp16, with and without LayerNorm parameters;
    dK and dV are the bits of the default variant, dQ and its parameters' gradients equal up
    to the order of the sums."""
    B, H, N, D, dtype, mask, causal, block_size, affine = case
    inputs = make_case(B, H, N, D, dtype, seed=N + D + 1, affine=affine, mask=mask,
                       block_size=block_size)  # fmt: skip
    ops = triton_ops()
    monkeypatch.setattr(ops, "PRE_NORMALISE", pre_normalise)
    monkeypatch.setattr(ops, "ATOMIC_DQ", False)
    _, _, plain = check_against_reference(*inputs, causal=causal)
    monkeypatch.setattr(ops, "ATOMIC_DQ", True)
    _, _, atomic = check_against_reference(*inputs, causal=causal)
    for name in ("k", "v", "k_w", "k_b"):
        i = GRAD_NAMES.index(name)
        assert torch.equal(atomic[i], plain[i]), f"d{name}"
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name in ("q", "q_w", "q_b"):
        i = GRAD_NAMES.index(name)
        torch.testing.assert_close(atomic[i], plain[i], rtol=tol, atol=tol, msg=f"d{name}")


@pytest.mark.parametrize("N", [70, 130])
def test_autotune_timing_runs_do_not_add_into_dq(N, monkeypatch):
    """On a GPU the autotuner times each config on the call's own arguments before running the
    chosen one: with dQ added up by atomic adds, each timed run must leave the sums as they
    were. Emulated here with two configs per dK / dV kernel and a timer that runs each twice;
    N = 130 also has the tail launch (it adds into what the body launch added)."""
    import triton

    ops = triton_ops()
    timed_runs = []

    def timer(kernel_call, quantiles):
        for _ in range(2):
            kernel_call()
            timed_runs.append(1)
        return [1.0, 1.0, 1.0]

    for name in ("_bwd_dkdv_kernel", "_bwd_dkdv_tail_kernel"):
        kernel = getattr(ops, name)
        config = kernel.configs[0]
        twins = [triton.Config(dict(config.kwargs), num_warps=w, num_stages=1) for w in (1, 2)]
        monkeypatch.setattr(ops, name, ops._keyed_autotune(twins, kernel.fn, do_bench=timer))
    inputs = make_case(1, 2, N, 20, torch.float32, seed=N, mask="random")
    monkeypatch.setattr(ops, "PRE_NORMALISE", False)
    monkeypatch.setattr(ops, "SPLIT_TAIL", True)
    monkeypatch.setattr(ops, "ATOMIC_DQ", True)
    check_against_reference(*inputs)  # dQ and its parameters' gradients included
    assert timed_runs, "the autotuner timed nothing: the test checks nothing"


@pytest.fixture
def timed_variants(monkeypatch):
    """Both switches unpinned and timing on (off under the interpreter), nothing remembered.
    Returns the list of (step, variant, args) each timed run appends, and sets the timer: it
    runs the call once and reports ``times[(step, variant)]`` (set by the test)."""
    from eegfast.ops import _variants

    ops = triton_ops()
    monkeypatch.setattr(ops, "PRE_NORMALISE", None)
    monkeypatch.setattr(ops, "SPLIT_TAIL", None)
    monkeypatch.setattr(ops, "MEASURE_VARIANTS", True)
    monkeypatch.setattr(_variants, "_CHOSEN", {})
    ran, times = [], {}
    for step, real in (("forward", ops._run_forward), ("backward", ops._run_backward)):

        def record(args, variant, real=real, step=step):
            ran.append((step, variant, args))
            return real(args, variant)

        monkeypatch.setattr(ops, real.__name__, record)

    def timer(call):
        call()
        return times[ran[-1][:2]]

    monkeypatch.setattr(_variants, "time_ms", timer)
    return ran, times


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed timing only warns
def test_loop_variants_timed_once_per_case(timed_variants):
    """Unpinned, the first call of a case times each candidate on the call's own tensors,
    forward and backward apart, and runs the fastest (the results still match the reference);
    later calls of the case run it without timing; another case is timed anew."""
    from eegfast.ops._variants import chosen_variants

    ops = triton_ops()
    ran, times = timed_variants
    V = ops.LoopVariant
    candidates = ops._candidate_variants(130)
    assert len(candidates) == 4
    for rank, variant in enumerate(candidates):  # forward: pre-normalised, one launch fastest
        times["forward", variant] = 1.0 if variant == V(True, False) else 2.0 + rank
        times["backward", variant] = 1.0 if variant == V(False, False) else 2.0 + rank
    inputs = make_case(1, 2, 130, 20, torch.float32, seed=31, mask="random", block_size=5)
    first = check_against_reference(*inputs)
    assert [(step, variant) for step, variant, _ in ran] == [
        *(("forward", v) for v in candidates),
        *(("backward", v) for v in candidates),
    ]
    assert all(args[0] is inputs[0] for step, _, args in ran if step == "forward")
    assert all(args[1] is inputs[0] for step, _, args in ran if step == "backward")
    chosen = {key[0]: v for key, v in chosen_variants().items()}
    assert chosen == {"qk_norm_attention forward": V(True, False),
                      "qk_norm_attention backward": V(False, False)}  # fmt: skip
    again = check_against_reference(*inputs)
    assert len(ran) == 8  # remembered
    assert torch.equal(first[0], again[0])
    for a, b in zip(first[2], again[2], strict=True):
        assert torch.equal(a, b)
    short = make_case(1, 1, 100, 20, torch.float32, seed=32)  # no short tail: 2 candidates
    times.update({("forward", v): 1.0 for v in ops._candidate_variants(100)})
    times.update({("backward", v): 1.0 for v in ops._candidate_variants(100)})
    check_against_reference(*short)
    assert len(ran) == 12


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_loop_variants_timed_on_stand_ins_while_tracing(timed_variants):
    """Called on fake tensors (torch.compile tracing the ops), the candidates are timed on real
    stand-ins of the same layouts (no padding), and the choice is remembered for the real
    calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from eegfast.ops._variants import chosen_variants

    ops = triton_ops()
    ran, times = timed_variants
    times.update({(step, v): 1.0 + v.pre_normalise for step in ("forward", "backward")
                  for v in ops._candidate_variants(33)})  # fmt: skip
    q, k, v, params, kpm, ids, grad_out = make_case(1, 2, 33, 20, torch.float32, seed=33,
                                                    mask="random", block_size=4)  # fmt: skip
    v = v.transpose(2, 3).contiguous().transpose(2, 3)  # a layout of its own
    fwd_args = (q, k, v, *params, EPS, 0.3, kpm, False, ids)
    saved = ops._forward(*fwd_args, eager=True, variant=ops.LoopVariant(False, False))
    bwd_args = (grad_out, q, k, v, *params, *saved, 0.3, kpm, False, ids)
    # What the ops' bodies get while AOT autograd traces them (on a GPU; under the interpreter
    # wrap_triton cannot trace the launches that follow the choice, so the choice is called
    # directly here).
    with FakeTensorMode() as mode:
        fwd_fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fwd_args]
        bwd_fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bwd_args]
        for step, args, run, stand_ins in (
            ("forward", fwd_fake, ops._run_forward, ops._forward_stand_ins),
            ("backward", bwd_fake, ops._run_backward, ops._backward_stand_ins),
        ):
            assert ops._loop_variant(step, tuple(args), run, stand_ins) == ops.LoopVariant(
                False, True
            )
    assert [step for step, _, _ in ran] == ["forward"] * 2 + ["backward"] * 2
    for step, _, args in ran:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        assert tensors and not any(is_fake(t) for t in tensors)
        sq, sv = args[:3:2] if step == "forward" else args[1:4:2]
        assert sq.shape == q.shape and sv.stride() == v.stride()
        pad = args[9] if step == "forward" else args[13]
        assert pad.dtype == torch.bool and not pad.any()
    assert {variant for variant in chosen_variants().values()} == {ops.LoopVariant(False, True)}
    check_against_reference(q, k, v, params, kpm, ids, grad_out, scale=0.3)
    assert len(ran) == 4  # the real calls reuse the traced choice


def compiled_config_lists() -> dict:
    """Per autotuned kernel, as a GPU process sees it (the interpreter has one config each):
    its four config lists (2-byte inputs with BLOCK_D <= 32 and past it, float32 likewise), the
    whole list, and what its pruning keeps for each dtype and BLOCK_D (configs as strings)."""
    script = """
import json
import torch
from eegfast.ops import qk_norm_attention_triton as T
def names(configs):
    return [str(c) for c in configs]
lists = {}
for name, prefix in (("_fwd_kernel", "FWD"), ("_bwd_dkdv_kernel", "DKDV"),
                     ("_bwd_dq_kernel", "DQ")):
    kernel = getattr(T, name)
    kinds = {kind: names(getattr(T, f"_{prefix}{suffix}_CONFIGS"))
             for kind, suffix in (("narrow", ""), ("wide", "_WIDE"), ("fp32", "_FP32"),
                                  ("fp32_wide", "_FP32_WIDE"))}
    kept = {f"{dtype} {d}": names(kernel.early_config_prune(
                kernel.configs, {"q_ptr": torch.empty(0, dtype=getattr(torch, dtype))},
                BLOCK_D=d))
            for dtype in ("bfloat16", "float16", "float32") for d in (32, 64, 128)}
    owned = "BLOCK_N" if name == "_bwd_dkdv_kernel" else "BLOCK_M"
    lists[name] = {**kinds, "all": names(kernel.configs), **kept,
                   "owned_blocks": sorted({c.kwargs[owned] for c in kernel.configs}),
                   "block_multiple": T._BLOCK_MULTIPLE}
print(json.dumps(lists))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_configs_by_input_dtype_and_head_dim():
    """On a GPU the autotuner times the configs for the launch's kind only: 2-byte inputs with
    BLOCK_D <= 32, or (64, 128) the ones chosen not to spill registers there; float32 inputs
    (3-pass TF32, three times the operand registers) their own two lists. Every block size a
    GPU launch can own divides _BLOCK_MULTIPLE (the interpreted test of _launch_spans sees only
    the interpreter's one config)."""
    for name, lists in compiled_config_lists().items():
        kinds = ("narrow", "wide", "fp32", "fp32_wide")
        assert all(lists[kind] for kind in kinds), name
        assert lists["all"] == [c for kind in kinds for c in lists[kind]], name
        for dtype in ("bfloat16", "float16"):
            assert lists[f"{dtype} 32"] == lists["narrow"], name
            assert lists[f"{dtype} 64"] == lists[f"{dtype} 128"] == lists["wide"], name
        assert lists["float32 32"] == lists["fp32"], name
        assert lists["float32 64"] == lists["float32 128"] == lists["fp32_wide"], name
        # the main launch of a split covers a multiple of it in whole blocks (_launch_spans)
        assert all(lists["block_multiple"] % size == 0 for size in lists["owned_blocks"]), name


def test_autotuning_keys_on_every_switch_that_changes_a_kernel():
    """Triton's autotuner caches the best config by the named key arguments and tensor dtypes
    only: every compile-time switch of an autotuned kernel must be in the key (but the tuned
    block sizes, BLOCK_D and PRECISION, which follow D and the dtype, and the fixed PART), or
    a launch with another loop body reuses a config tuned for a different one."""
    import inspect

    ops = triton_ops()
    derived = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "PRECISION", "PART"}
    kernels = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_tail_kernel",
               "_bwd_dkdv_tail_kernel", "_bwd_dq_tail_kernel")  # fmt: skip
    for name in kernels:
        tuner = getattr(ops, name)
        params = inspect.signature(tuner.base_fn).parameters.values()
        switches = {p.name for p in params if "constexpr" in str(p.annotation)} - derived
        assert switches <= set(tuner.keys), (name, switches - set(tuner.keys))


# Spill bytes the compile test lets a kernel have with every mask on (padding, causal and
# block-causal at once, with the affine LayerNorms: the most registers). ptxas versions differ
# there by a few registers: of the forward tail configs tried, each spilled 4-16 bytes in some
# masked case under Triton 3.6's ptxas or 3.9's (benchmarks/results/2026-12-05-sm90-registers).
# More is a config too large for the register file (fp32 inputs with every mask: up to 188).
_MASKED_SPILL_SLACK = 16


@pytest.mark.skipif(not has_ptxas(), reason="this triton install has no bundled ptxas")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The three autotuned kernels (first config) compile for an H100 with tensor-core dots, in
    both loop variants (PRE_NORMALISE or not), and so do their tail launches' configs and
    _pad_rows_kernel: catches what the interpreter accepts but the compiler rejects, and block
    sizes or warp counts too large for the register file. Without masks (LaBraM's case) none
    spills registers; with every mask on, at most _MASKED_SPILL_SLACK bytes (see there).
    `make triton-gpu-check` runs this under the GPU machines' Triton too, whose ptxas differs."""
    flags = ("HAS_Q_W", "HAS_Q_B", "HAS_K_W", "HAS_K_B", "HAS_PAD", "CAUSAL", "BLOCK_CAUSAL")
    constants = dict.fromkeys(flags, True) | dict(BLOCK_D=32, PRECISION="ieee", PART=16, D=20,
                                                  ALIGN=4, PADDED_PLAIN=False,
                                                  ATOMIC_DQ=False)  # fmt: skip
    data = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
            "q_w_ptr", "q_b_ptr", "k_w_ptr", "k_b_ptr")  # fmt: skip
    padded = ("q_n_ptr", "k_n_ptr", "v_p_ptr", "g_p_ptr", "x_ptr", "w_ptr", "b_ptr")
    types = {**{name: "*bf16" for name in (*data, *padded)}, "pad_ptr": "*u8", "ids_ptr": "*i32",
             "eps": "fp32", "scale": "fp32", "qk_scale_log2": "fp32",
             "unshifted_limit": "fp32"}  # fmt: skip
    names = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    tails = ("_fwd_tail_kernel", "_bwd_dkdv_tail_kernel", "_bwd_dq_tail_kernel")
    specs = [[KernelSpec(n, dict(constants, PRE_NORMALISED=pre), types) for n in names + tails]
             for pre in (False, True)]  # fmt: skip
    specs[1].append(KernelSpec("_pad_rows_kernel", dict(constants, MODE=1, BLOCK_M=64), types))
    for variant in specs:  # fused, then PRE_NORMALISED and _pad_rows_kernel
        compiled = compile_for_sm90("eegfast.ops.qk_norm_attention_triton", variant)
        for name in names:
            assert "warp_group_dot" in compiled[name]["ttgir"], f"{name}: no tensor-core dot"
        for name, kernel in compiled.items():
            spilled = kernel["spill_bytes"]
            assert spilled <= _MASKED_SPILL_SLACK, (
                f"{name}: {kernel['registers']} registers, {spilled}"
            )
    assert "_pad_rows_kernel" in compiled
    # the fallback for a triton without the ptxas-report knob reads the same numbers
    from eegfast.testing.triton_sm90 import _ptxas_report

    report = _ptxas_report(compiled["_fwd_kernel"]["ptx"])
    assert f"Used {compiled['_fwd_kernel']['registers']} registers" in report, report[-1000:]
    # Huge's D = 50 (BLOCK_D 64) with the first config of each kernel's list for wide heads,
    # fused loops (the tiles' LayerNorm adds the most registers): no spills either
    wide = dict(constants, D=50, BLOCK_D=64, ALIGN=2, PRE_NORMALISED=False)
    lists = compiled_config_lists()
    compiled = compile_for_sm90("eegfast.ops.qk_norm_attention_triton",
                                [KernelSpec(n, wide, types, config=len(lists[n]["narrow"]))
                                 for n in names])  # fmt: skip
    for name, kernel in compiled.items():
        assert kernel["spill_bytes"] == 0, f"{name} at D = 50: {kernel['registers']} registers"

    # LaBraM's case (no mask, D = 20, strides divisible by 4): the rows reach shared memory by
    # asynchronous copies, software-pipelined, in both loop variants; the fused loops load them
    # as 8-byte vectors, not 2-byte elements (a head dim and strides the compiler could not
    # bound made every element its own load, and the LayerNorm reductions 6x the shuffles),
    # and the padded variant stores fewer normalised tiles to shared memory itself
    no_masks = dict(constants, HAS_PAD=False, CAUSAL=False, BLOCK_CAUSAL=False)
    variants = [
        compile_for_sm90("eegfast.ops.qk_norm_attention_triton",
                         [KernelSpec(n, dict(no_masks, PRE_NORMALISED=pre), types)
                          for n in names + tails])
        for pre in (False, True)
    ]  # fmt: skip
    for variant in variants:
        for name, kernel in variant.items():
            assert kernel["spill_bytes"] == 0, f"{name}: {kernel['registers']} registers, spills"
    for name in names:
        fused, padded = (variant[name] for variant in variants)
        for variant in (fused, padded):
            assert "async_copy_global_to_local" in variant["ttgir"], f"{name}: not pipelined"
        # the forward's score bound reads k_w and k_b once per program, an element a thread
        # (_norm_bound): those two are the only 2-byte loads allowed
        allowed = 2 if name == "_fwd_kernel" else 0
        assert fused["ptx"].count("ld.global.b16") <= allowed, name
        assert "ld.global.v2" in fused["ptx"], name
        stores = [variant["ptx"].count("st.shared") for variant in (padded, fused)]
        assert stores[0] < stores[1], f"{name}: st.shared {stores[0]} (padded) vs {stores[1]}"

    # dQ by atomic adds (ATOMIC_DQ): the dK / dV kernels with the extra product and the fp32
    # reductions into global memory, and the pass that finishes dQ, in both loop variants,
    # without masks (no spill) and with every mask on (the slack above); but the fused loops'
    # dK / dV kernel, at the register file's limit (255, sm_90; 4-64 bytes spilled under
    # Triton 3.6 and 3.9, with and without masks): its spills must stay out of its loop over
    # whole query tiles (the most tensor-core products), whose machine code may not touch
    # local memory (3.6 puts 5 local loads in the 16-row tail loop with every mask on).
    atomic_names = ("_bwd_dkdv_kernel", "_bwd_dkdv_tail_kernel", "_bwd_dq_finish_kernel")
    for masks in (no_masks, constants):
        for pre in (False, True):
            atomic = dict(masks, PRE_NORMALISED=pre, ATOMIC_DQ=True, BLOCK_M=64)
            compiled = compile_for_sm90(
                "eegfast.ops.qk_norm_attention_triton",
                [KernelSpec(n, atomic, types, sass=True) for n in atomic_names],
            )
            slack = 0 if masks is no_masks else _MASKED_SPILL_SLACK
            for name, kernel in compiled.items():
                if not pre and name == "_bwd_dkdv_kernel":
                    loops = loop_mixes(kernel["sass"])
                    whole_tiles = max(loops, key=lambda loop: loop.count("HGMMA"))
                    assert not whole_tiles.count("LDL", "STL"), (name, "local memory in the loop")
                    continue
                assert kernel["spill_bytes"] <= slack, (name, pre, kernel["registers"])
            for name in atomic_names[:2]:
                ptx = compiled[name]["ptx"]
                assert "red.global" in ptx or "atom.global" in ptx, f"{name}: no atomic add"
                assert "warp_group_dot" in compiled[name]["ttgir"] or "mma" in ptx, name


# --------------------------------------------------------------------------------------------
# GPU only (not run in CPU CI): bf16, LaBraM shapes, torch.compile.
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not has_ptxas(), reason="this triton install has no bundled ptxas")
@pytest.mark.parametrize("pre_normalised", [False, True])
def test_unshifted_forward_loop_is_shorter_in_sm90_machine_code(pre_normalised):
    """LaBraM's case (bf16, D = 20, no masks) compiled for sm_90: the forward holds an online
    and an unshifted loop over whole key tiles and one of each over the 16-key tails. The
    unshifted ones have no row maxima (no FMNMX), the same tensor-core products and exp2 of
    every score, and at least 15% fewer instructions an iteration (Triton 3.9: 546 -> 448
    fused, 331 -> 235 pre-normalised)."""
    constants = dict(HAS_Q_W=True, HAS_Q_B=True, HAS_K_W=True, HAS_K_B=True, HAS_PAD=False,
                     CAUSAL=False, BLOCK_CAUSAL=False, BLOCK_D=32, PRECISION="ieee", D=20,
                     ALIGN=4, PADDED_PLAIN=False, PRE_NORMALISED=pre_normalised)  # fmt: skip
    pointers = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "q_w_ptr", "q_b_ptr", "k_w_ptr", "k_b_ptr",
                "k_n_ptr", "v_p_ptr")  # fmt: skip
    types = {**dict.fromkeys(pointers, "*bf16"), "pad_ptr": "*u8", "ids_ptr": "*i32",
             "eps": "fp32", "qk_scale_log2": "fp32", "unshifted_limit": "fp32"}  # fmt: skip
    spec = KernelSpec("_fwd_kernel", constants, types, sass=True)
    sass = compile_for_sm90("eegfast.ops.qk_norm_attention_triton", [spec])["_fwd_kernel"]["sass"]
    loops = [loop for loop in loop_mixes(sass) if loop.count("HGMMA")]
    assert len(loops) == 4, [loop.instructions for loop in loops]
    online, unshifted = sorted(loops, key=lambda loop: -loop.instructions)[:2]
    assert online.count("FMNMX") > 0 and unshifted.count("FMNMX") == 0
    assert online.count("HGMMA") == unshifted.count("HGMMA")
    assert unshifted.count("MUFU") >= 32  # a 64 x 64 tile over 128 threads: 32 exp2 each
    assert unshifted.instructions <= 0.85 * online.instructions, (
        online.instructions, unshifted.instructions)  # fmt: skip


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("D", (20, 25, 50, 64, 128))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_matches_reference(D, dtype):
    """LaBraM's N = 257 on the GPU kernels (autotuned configs), every mask at once."""
    check_labram_shape(D, dtype, masked=True, device="cuda")


@pytest.mark.gpu
@requires_cuda
def test_gpu_launch_choices_timed_when_compiled_and_reused_eagerly(monkeypatch):
    """Unpinned, torch.compile's tracing times the launch choices (forward and backward) on
    stand-ins; the eager calls of the same case reuse the forward's; results agree."""
    from eegfast.ops import _variants, qk_norm_attention

    ops = triton_ops()
    monkeypatch.setattr(_variants, "_CHOSEN", {})
    monkeypatch.setattr(ops, "PRE_NORMALISE", None)
    monkeypatch.setattr(ops, "SPLIT_TAIL", None)
    q, k, v, params, _, _, grad_out = make_case(2, 3, 257, 20, torch.bfloat16, seed=57)
    leaves = [x.cuda().requires_grad_() for x in (q, k, v, *params)]
    grad_out = grad_out.cuda().transpose(1, 2)  # (B, H, N, D) as the public function returns

    def attention(q, k, v, *params):
        return qk_norm_attention(q, k, v, *params, eps=EPS, backend="triton")

    compiled_out = torch.compile(attention, fullgraph=True, dynamic=False)(*leaves)
    compiled_grads = torch.autograd.grad(compiled_out, leaves, grad_out)
    chosen = _variants.chosen_variants()
    steps = sorted(what for what, _ in chosen)
    assert steps == ["qk_norm_attention backward", "qk_norm_attention forward"], chosen
    assert all(variant in ops._candidate_variants(257) for variant in chosen.values())
    eager_out = attention(*leaves)
    eager_grads = torch.autograd.grad(eager_out, leaves, grad_out)
    forward_cases = [case for what, case in _variants.chosen_variants() if "forward" in what]
    assert len(forward_cases) == 1, forward_cases
    torch.testing.assert_close(compiled_out, eager_out, rtol=2e-2, atol=2e-2)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def check_labram_shape(D, dtype, *, masked, device):
    """N = 257 against the float64 reference on ``device``: every mask at once, or none (the
    unmasked loops, whose last, 16-wide tiles alone compare with N)."""
    q, k, v, params, kpm, ids, grad_out = make_case(3, 4, 257, D, dtype, seed=D, mask="full_row",
                                                    block_size=16)  # fmt: skip
    causal = masked
    if not masked:
        kpm = ids = None

    def on_device(x):
        return None if x is None else x.to(device)

    ops = triton_ops()
    scale = D**-0.5
    device_params = [on_device(p) for p in params]
    device_masks = (on_device(kpm), causal, on_device(ids))
    q_d, k_d, v_d, grad_d = (on_device(x) for x in (q, k, v, grad_out))
    saved = ops.qk_norm_attention_fwd_triton(q_d, k_d, v_d, *device_params, EPS, scale,
                                             *device_masks)  # fmt: skip
    grads = ops.qk_norm_attention_bwd_triton(grad_d, q_d, k_d, v_d, *device_params, *saved, scale,
                                             *device_masks)  # fmt: skip
    out, lse = saved[0].cpu(), saved[1].cpu()
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    param_leaves = [p.double().requires_grad_() for p in params]
    ref_out, ref_lse = reference(*leaves, param_leaves, scale=scale, key_padding_mask=kpm,
                                 causal=causal, block_ids=ids)  # fmt: skip
    fwd_tolerance = 1e-4 if dtype == torch.float32 else FWD_TOLERANCE[dtype]
    assert_close_scaled(out.transpose(1, 2), ref_out, fwd_tolerance, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert_close_scaled(lse[finite], ref_lse[finite], fwd_tolerance, "lse")
    ref_out.backward(grad_out.double().transpose(1, 2))
    # fp32 runs 3-pass TF32 tensor-core products on the GPU: near, not exactly, fp32 error.
    tolerance = 1e-4 if dtype == torch.float32 else TOLERANCE[dtype]
    for name, grad, leaf in zip(GRAD_NAMES, grads, leaves + param_leaves, strict=True):
        assert_close_scaled(grad.cpu(), leaf.grad, tolerance, f"d{name}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("D", (20, 25))
def test_gpu_without_masks(D):
    """LaBraM's own case: no masks, bf16 (D = 20 loads vectors, D = 25 elements)."""
    check_labram_shape(D, torch.bfloat16, masked=False, device="cuda")


def test_labram_shape_without_masks_interpreted():
    """The same N = 257 without masks under the interpreter (fp32): whole tiles, then the
    16-wide tails of all three loops."""
    check_labram_shape(20, torch.float32, masked=False, device="cpu")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("D", (20, 50))
def test_gpu_pre_normalised_variant(D, monkeypatch):
    monkeypatch.setattr(triton_ops(), "PRE_NORMALISE", True)
    test_gpu_matches_reference(D, torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("unshifted", [True, False])
def test_gpu_online_and_unshifted_forward(unshifted, monkeypatch):
    """Each of the forward's softmax loops on the GPU, bf16, every mask, N = 257: these inputs'
    score bound (~16) is within the bf16 limit, so the default takes the unshifted loops, and
    UNSHIFTED off the online ones."""
    monkeypatch.setattr(triton_ops(), "UNSHIFTED", unshifted)
    check_labram_shape(20, torch.bfloat16, masked=True, device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("D", (20, 25, 50))
def test_gpu_atomic_dq_variant(D, monkeypatch):
    """dQ by atomic adds on the GPU (vector reductions into global memory), every mask."""
    monkeypatch.setattr(triton_ops(), "ATOMIC_DQ", True)
    test_gpu_matches_reference(D, torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_gpu_opcheck_and_compile():
    ops = triton_ops()
    # N = 129: the autotuned launch and the tail launch (see _launch_spans) both traced
    q, k, v, params, kpm, ids, grad_out = make_case(2, 2, 129, 25, torch.bfloat16, seed=8,
                                                    mask="random", block_size=4)  # fmt: skip
    q, k, v, kpm, ids, grad_out = (x.cuda() for x in (q, k, v, kpm, ids, grad_out))
    params = [p.cuda().requires_grad_() for p in params]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    args = (*leaves, *params, EPS, 0.2, kpm, False, ids)
    torch.library.opcheck(torch.ops.eegfast.qk_norm_attention_fwd_triton, args)

    def attention(q, k, v, *params):
        return ops.qk_norm_attention_fwd_triton(q, k, v, *params, EPS, 0.2, kpm, False, ids)[0]

    compiled = torch.compile(attention, fullgraph=True)
    eager_out = attention(*leaves, *params)
    compiled_out = compiled(*leaves, *params)
    torch.testing.assert_close(compiled_out, eager_out)
    eager_grads = torch.autograd.grad(eager_out, [*leaves, *params], grad_out)
    compiled_grads = torch.autograd.grad(compiled_out, [*leaves, *params], grad_out)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_benchmark_report_writers(tmp_path):
    """benchmarks/gpu_qk_norm_attention.py's ratios, targets and files, on made-up rows (the
    timings themselves need a GPU)."""
    from benchmarks import gpu_qk_norm_attention as bench

    case = dict(shape="base", B=128, H=10, N=257, D=20, dtype="bfloat16")
    rows = [
        bench.Row(**case, mode="fwd+bwd", impl=bench.OURS, ms=0.25, max_abs_err=1e-3),
        bench.Row(**case, mode="fwd+bwd", impl="compile(layernorm+sdpa)", ms=1.5),
        bench.Row(**case, mode="fwd", impl=bench.OURS, ms=0.2),
        bench.Row(**case, mode="fwd", impl="compile(layernorm+flex)", ms=None, note="failed: x|y"),
    ]
    assert bench.ratios(rows) == [1.0, 6.0, 1.0, None]
    paths = bench.write_outputs(tmp_path, "test", {"gpu": "none"}, rows, "bench")
    table = paths["md"].read_text()
    assert "6.00×" in table and "target ≤ 0.30 ms: met" in table
    assert "target ≤ 0.10 ms: MISSED" in table and "failed: x\\|y" in table
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    assert paths["png"].stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temp files


def test_benchmark_records_each_tuning_run_once(monkeypatch):
    """record_tuning files a kernel's config timings when it has tuned since the last call."""
    from types import SimpleNamespace

    from benchmarks import gpu_qk_norm_attention as bench

    ops = triton_ops()
    first = {"BLOCK_M: 64": [0.2, 0.19, 0.21]}
    for name in bench.TUNED_KERNELS:
        monkeypatch.setattr(ops, name, SimpleNamespace(configs_timings=None))
    monkeypatch.setattr(ops, "_fwd_kernel", SimpleNamespace(configs_timings=first))
    log: dict = {}
    bench.record_tuning(log, "base fwd eegfast-triton")
    bench.record_tuning(log, "base fwd eegfast-triton-prenorm")  # no new tuning: nothing filed
    assert list(log) == ["base fwd eegfast-triton _fwd_kernel"]
    assert log["base fwd eegfast-triton _fwd_kernel"]["BLOCK_M: 64"] == first["BLOCK_M: 64"]
    ops._fwd_kernel.configs_timings = {"BLOCK_M: 32": [0.3]}  # a new tuning run
    bench.record_tuning(log, "long fwd eegfast-triton")
    assert list(log)[-1] == "long fwd eegfast-triton _fwd_kernel" and len(log) == 2


def test_benchmark_lists_compiled_kernels(monkeypatch):
    """compiled_kernels reads each compiled specialisation's warps, registers and spills from
    Triton's per-device caches (here stand-ins shaped like them)."""
    from types import SimpleNamespace

    from benchmarks import gpu_qk_norm_attention as bench

    ops = triton_ops()
    compiled = SimpleNamespace(metadata=SimpleNamespace(num_warps=4, num_stages=3, shared=8192),
                               n_regs=151, n_spills=0)  # fmt: skip
    jit = SimpleNamespace(device_caches={0: ({"key-a": compiled}, {}, None, None, None)},
                          fn=lambda: None)  # fmt: skip
    for name in (*bench.TUNED_KERNELS, "_pad_rows_kernel", "_bwd_delta_kernel"):
        monkeypatch.setattr(ops, name, SimpleNamespace(fn=SimpleNamespace(device_caches={})))
    monkeypatch.setattr(ops, "_fwd_kernel", SimpleNamespace(fn=jit))  # an autotuner
    monkeypatch.setattr(ops, "_pad_rows_kernel", jit)  # a JIT function (its .fn: the Python one)
    report = bench.compiled_kernels()
    expected = {"num_warps": 4, "num_stages": 3, "shared_bytes": 8192, "registers": 151,
                "spill_bytes": 0, "specialisation": "key-a"}  # fmt: skip
    assert report == [{"kernel": "_fwd_kernel", **expected},
                      {"kernel": "_pad_rows_kernel", **expected}]  # fmt: skip
