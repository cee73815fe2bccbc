"""Triton kernel paths that the interpreter's own launch choices never reach.

Under TRITON_INTERPRET=1 every attention kernel runs one block configuration, (32, 32), with
the tail launch's (16, 32): equal row and key blocks, so code that mixes BLOCK_M and BLOCK_N up
(causal loop bounds, the first query tile of a key block, whole tiles against the 16-wide
tails) gives the same results either way there, and is only wrong on a GPU, whose autotuned
configs pair 16 ... 128 rows with 32 ... 128 keys. These tests run the interpreter with those
pairs. Each test here was checked to fail on a one-line mutation of the kernels that every
other test passed (see the docstrings).
"""

import pytest
import torch
import triton

from eegfast.ops import available_backends
from tests.ops.test_qk_norm_attention_triton import (
    EPS,
    FWD_TOLERANCE,
    assert_close_scaled,
    check_against_reference,
    make_case,
    reference,
    triton_ops,
)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not available_backends()["triton"].available,
        reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
    ),
]

# (kernel, block it owns, block it steps over) of the three attention kernels and their tail
# launches (see qk_norm_attention_triton._launch_spans).
_KERNELS = (
    ("_fwd_kernel", "BLOCK_M", "BLOCK_N"),
    ("_bwd_dq_kernel", "BLOCK_M", "BLOCK_N"),
    ("_bwd_dkdv_kernel", "BLOCK_N", "BLOCK_M"),
)
# The tail launches' GPU configs (_FWD_TAIL_CONFIGS, _DQ_TAIL_CONFIGS, _DKDV_TAIL_CONFIGS):
# 16 rows (dK / dV: keys) per program, 64 keys (32 queries) per step.
_GPU_TAIL_STEPS = {"_fwd_kernel": 64, "_bwd_dq_kernel": 64, "_bwd_dkdv_kernel": 32}


def use_blocks(monkeypatch, owned: int, stepped: int) -> None:
    """Every attention kernel launched with ``owned`` rows (dK / dV: keys) per program and
    ``stepped`` keys (dK / dV: queries) per loop step, the tail kernels with their GPU configs."""
    ops = triton_ops()
    for name, owned_key, stepped_key in _KERNELS:
        kernel = getattr(ops, name)
        config = triton.Config({owned_key: owned, stepped_key: stepped}, num_warps=1, num_stages=1)
        monkeypatch.setattr(ops, name, ops._keyed_autotune([config], kernel.fn))
        tail_name = name.replace("_kernel", "_tail_kernel")
        tail = triton.Config({owned_key: ops._TAIL_ROWS, stepped_key: _GPU_TAIL_STEPS[name]},
                             num_warps=1, num_stages=1)  # fmt: skip
        monkeypatch.setattr(ops, tail_name, ops._keyed_autotune([tail], kernel.fn))


# (rows owned, keys stepped) of GPU configs, N, the tail launch, masks: more keys than rows
# and fewer, with the causal mask alone (the forward's whole key tiles skip the masks off the
# diagonal only without padding or block ids, which force them on every tile) at N = 177, one
# launch whose whole query tiles of 32 and 64 rows end at 160 and 128; then the largest rows
# with every mask, and the float32 dK / dV kernel's 16 keys over 64 queries without masks, at
# N = 150: the tail launch (128 rows in whole blocks, then 16-row programs at 128 and 144).
_GPU_BLOCK_CASES = [
    (32, 64, 177, False, "causal"),
    (64, 32, 177, False, "causal"),
    (128, 64, 150, True, "all"),
    (16, 64, 150, True, "none"),
]
_MASKS = {"causal": (None, True, None), "all": ("random", True, 5), "none": (None, False, None)}


@pytest.mark.parametrize(("owned", "stepped", "N", "split", "masks"), _GPU_BLOCK_CASES)
def test_attention_with_gpu_block_pairs(owned, stepped, N, split, masks, monkeypatch):
    """Forward, lse and all seven gradients against the float64 reference with GPU block
    pairs. Mutations this catches (every interpreted test passed them): the forward's causal
    interior ``n_interior = start_m0`` or ``hi = start_m0 + BLOCK_N``, the dQ kernel's causal
    ``hi = start_m0 + BLOCK_N``, the dK / dV kernel's first query ``lo = start_n0`` or
    whole query tiles ``m_full = N // BLOCK_N * BLOCK_N``."""
    ops = triton_ops()
    use_blocks(monkeypatch, owned, stepped)
    monkeypatch.setattr(ops, "SPLIT_TAIL", split)
    mask, causal, block_size = _MASKS[masks]
    inputs = make_case(1, 1, N, 20, torch.float32, seed=N + owned + stepped, mask=mask,
                       block_size=block_size)  # fmt: skip
    check_against_reference(*inputs, causal=causal)


@pytest.mark.parametrize("shape", [(150, 40, 150, 2, 2), (37, 25, 70, 3, 2)])
def test_moe_kernels_with_gpu_blocks(shape, monkeypatch):
    """The MoE GEMMs with the GPU's blocks (rows 128, columns 64 / 128, K 32 / 64; weight
    gradients 64 x 128 over 64-row steps) instead of the interpreter's 32 all round, outputs
    and all gradients against the float64 expert loop. (150, 40, 150, 2, 2): groups of ~150
    rows (a whole and a partial 128-row block, three 64-row steps), H = 150 (two column blocks
    of 128, three K blocks of 64); (37, 25, 70, 3, 2): one short block per group. Mutations
    this catches (every interpreted test passed them): the row GEMM's columns ``pid * BLOCK_M``,
    the weight gradient's rows ``pid * BLOCK_N`` or its steps over the group ``BLOCK_N``."""
    from eegfast.ops import moe_triton
    from tests.ops.test_moe_hypothesis import check_moe_ffn

    monkeypatch.setattr(moe_triton, "triton_interpreting", lambda: False)
    assert moe_triton._gemm_blocks(150, 150)["BLOCK_M"] == 128
    check_moe_ffn("triton", torch.float32, shape, ("contiguous",) * 4, seed=sum(shape))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_vq_near_ties_in_different_code_tiles(metric):
    """Near ties below fp32 resolution between codes of different 64-code tiles (5, 70, 130):
    the running runner-up must carry the earlier tiles' best over, and take a later tile's
    best that did not win, or the row's fp32 gap looks clear and the float64 re-check never
    sees it. Mutations this catches (every interpreted test passed them, whose near ties all
    lie in one tile): ``second = tile_second`` when a tile wins, ``second`` kept when it
    loses."""
    from eegfast.ops import vq_nearest
    from eegfast.ops.vq import vq_nearest_reference

    gen = torch.Generator().manual_seed(8)
    base = torch.nn.functional.normalize(torch.randn(1, 32, generator=gen), dim=1)
    codebook = torch.randn(160, 32, generator=gen)
    ties = [5, 70, 130]
    codebook[ties] = base + 1e-6 * torch.randn(len(ties), 32, generator=gen)
    z = base + 1e-6 * torch.randn(48, 32, generator=gen)
    indices = vq_nearest(z, codebook, metric, backend="triton")
    expected, _ = vq_nearest_reference(z, codebook, metric)
    assert torch.equal(indices, expected)


def test_moe_expert_ffn_op_zeroes_every_output_of_dropped_rows(monkeypatch):
    """The raw op's three outputs (y, and the pre-activation a1 and activation h it saves for
    the backward) are zero at rows past offsets[E], as the kernel says it writes them.
    Uninitialised memory is filled with NaN here (deterministic mode), so a row the kernel
    leaves unwritten shows. Mutation this catches: a1's zeros not stored for dropped rows."""
    from eegfast.ops import moe_triton

    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    gen = torch.Generator().manual_seed(2)
    T, D, H, E, k = 21, 20, 40, 3, 2
    x = torch.randn(T, D, generator=gen)
    w1, b1 = torch.randn(E, H, D, generator=gen), torch.randn(E, H, generator=gen)
    w2, b2 = torch.randn(E, D, H, generator=gen), torch.randn(E, D, generator=gen)
    sorted_slots = torch.randperm(T * k, generator=gen)
    offsets = torch.tensor([0, 9, 20, 30])  # rows 30 ... 41 dropped
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outputs = moe_triton.moe_expert_ffn_triton(x, sorted_slots, offsets, w1, b1, w2, b2, k)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for name, out in zip(("y", "a1", "h"), outputs, strict=True):
        assert torch.isfinite(out).all(), name
        assert out[30:].eq(0).all(), name


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # a mutation's overflow
@pytest.mark.parametrize("large", ["q_weight", "k_bias"])
def test_attention_score_bound_counts_every_layer_norm_parameter(large):
    """The forward drops the row maxima only where |LN(q) w_q + b_q| |LN(k) w_k + b_k| |scale|
    is within unshifted_score_limit. Scores driven out of range by one parameter alone, the
    others small (q's weight 40 with k = q; or k's bias of norm 1000 over weights 0.01), must
    still take the online softmax and match the reference. Mutations this catches: the bound
    from LN(q) without its affine, or without k's bias."""
    B, H, N, D = 1, 2, 33, 20
    q, k, v, _, _, _, _ = make_case(B, H, N, D, torch.float32, seed=21)
    gen = torch.Generator().manual_seed(22)
    if large == "q_weight":
        k = q
        params = [torch.full((D,), 40.0), None, torch.ones(D), None]
    else:
        k_b = torch.randn(D, generator=gen)
        params = [torch.ones(D), None, torch.full((D,), 0.01), 1000 * k_b / k_b.norm()]
    scale = D**-0.5
    out, lse, _, _ = triton_ops().qk_norm_attention_fwd_triton(
        q, k, v, *params, EPS, scale, None, False, None
    )
    ref_out, ref_lse = reference(q.double(), k.double(), v.double(),
                                 [None if p is None else p.double() for p in params],
                                 scale=scale)  # fmt: skip
    assert_close_scaled(out.transpose(1, 2), ref_out, FWD_TOLERANCE[torch.float32], "out")
    assert_close_scaled(lse, ref_lse, FWD_TOLERANCE[torch.float32], "lse")


def test_moe_combine_gradients_past_one_block_of_features():
    """moe_combine's backward loops over the features in blocks of 128: at D = 200 the gate
    gradient (a dot product over all of D) and grad_y must cover both blocks. Mutation this
    catches (every test had D <= 128): the gate gradient from the last block only."""
    from eegfast.ops import moe_combine

    gen = torch.Generator().manual_seed(4)
    T, k, D = 13, 2, 200
    y = torch.randn(T * k, D, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, k, generator=gen, dtype=torch.float64)
    slot_pos = torch.randperm(T * k, generator=gen)
    grad = torch.randn(T, D, generator=gen, dtype=torch.float64)
    leaves = [t.float().requires_grad_() for t in (y, gates)]
    out = moe_combine(*leaves, slot_pos, backend="triton")
    got = torch.autograd.grad(out, leaves, grad.float())
    ref_leaves = [t.clone().requires_grad_() for t in (y, gates)]
    expected_out = (ref_leaves[1][:, :, None] * ref_leaves[0][slot_pos].reshape(T, k, D)).sum(1)
    expected = torch.autograd.grad(expected_out, ref_leaves, grad)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("grad_y", "grad_gates"), got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_q_k_v_and_grad_out_in_layouts_of_their_own(causal):
    """Every stride of q, k, v and grad_out its own: q contiguous (B, H, N, D), k a (B, N, H, D)
    buffer seen as (B, H, N, D), v rows 23 apart, grad_out (B, N, H, D) with rows of 26 (the
    tests of packed qkv give q, k and v the same strides). Mutations this catches: a kernel
    reading k with q's head stride, or k's statistics rows with q's row stride."""
    B, H, N, D = 2, 2, 33, 20
    q, k, v, params, kpm, ids, grad_out = make_case(B, H, N, D, torch.float32, seed=23,
                                                    mask="random", block_size=3)  # fmt: skip
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_rows = torch.zeros(B, H, N, D + 3)
    v_rows[..., :D] = v
    g_rows = torch.zeros(B, N, H, D + 6)
    g_rows[..., :D] = grad_out
    v, grad_out = v_rows[..., :D], g_rows[..., :D]
    strides = {q.stride(), k.stride(), v.stride(), grad_out.transpose(1, 2).stride()}
    assert len(strides) == 4
    check_against_reference(q, k, v, params, kpm, ids, grad_out, causal=causal)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_vq_rescores_only_rows_without_a_clear_winner(metric, monkeypatch):
    """The float64 re-check is for near ties: on random inputs (clear winners, 200 codes in
    four tiles) the fp32 kernel's best / runner-up gap must flag almost no row. A wrong code
    index or runner-up in the fp32 kernel is invisible in the results (the re-check fixes the
    rows it flags), but flags every row: float64 work on every row on a GPU. Mutations this
    catches: the tile's code index without the tile's offset (every row whose best lies past
    the first tile flagged)."""
    from eegfast.ops import vq_nearest, vq_triton
    from eegfast.ops.vq import vq_nearest_reference

    flags = []
    launch = vq_triton.wrap_triton

    def spy(kernel):  # records the flags the re-scoring kernel is launched with
        launcher = launch(kernel)
        if kernel is not vq_triton._rescore_kernel:
            return launcher

        class Recorded:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    flags.append(args[3].clone())
                    return launcher[grid](*args, **kwargs)

                return run

        return Recorded()

    monkeypatch.setattr(vq_triton, "wrap_triton", spy)
    gen = torch.Generator().manual_seed(9)
    z, codebook = torch.randn(100, 32, generator=gen), torch.randn(200, 32, generator=gen)
    indices = vq_nearest(z, codebook, metric, backend="triton")
    assert torch.equal(indices, vq_nearest_reference(z, codebook, metric)[0])
    (flagged,) = flags
    assert flagged.shape == (100,) and int(flagged.sum()) <= 2, int(flagged.sum())


@pytest.mark.filterwarnings("ignore:.*encountered in matmul:RuntimeWarning")  # the overflow
def test_vq_rows_whose_fp32_score_overflows():
    """A row of z near fp32's largest values (|z_i| = 1e37) and a long code half aligned with
    it: that code's fp32 dot product overflows to +inf, the kernel's best score, while the
    runner-up (a short code along z, cosine 1: the true nearest) stays finite. An infinite best
    must send the row to the float64 re-check, not be taken at the fp32 argmax. Mutation this
    catches: the re-check flag without its test for an infinite best score."""
    from eegfast.ops import vq_nearest
    from eegfast.ops.vq import vq_nearest_reference

    gen = torch.Generator().manual_seed(10)
    signs = torch.randn(4, 32, generator=gen).sign()
    z = 1e37 * signs
    codebook = torch.randn(3, 32, generator=gen)
    codebook[0] = 20 * signs[0] + 30 * torch.randn(32, generator=gen)  # cosine ~0.6, dot inf
    codebook[1] = 0.5 * signs[0]  # cosine 1 with row 0, dot 1.6e38
    indices = vq_nearest(z, codebook, "cosine", backend="triton")
    expected = vq_nearest_reference(z, codebook, "cosine")[0]
    assert expected[0] == 1 and torch.equal(indices, expected)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the phantom keys' exp2
@pytest.mark.parametrize("atomic_dq", [False, True])
def test_attention_keys_past_n_with_overflowing_probabilities(atomic_dq, monkeypatch):
    """N = 17: the last key block holds 15 keys past N, which the unmasked dK / dV loops
    score too (LN of a zero row: k's bias, here 0, so score 0). With k = -q and q's weight 30,
    every real score lies in [-134, -112] and so does lse: the phantom keys' probabilities,
    exp(112) and more, overflow fp32. They must reach no gradient (dK's rows past N are
    dropped before the k-norm weight's sums; dQ's shares by atomic adds are masked). Mutation
    this catches: dK's rows past N kept in the k-norm weight's gradient (NaN). Scores this
    large make the gradients ill-conditioned (the C++ kernels' errors reach 5e-4 too): a looser
    tolerance, every gradient finite."""
    from tests.ops import test_qk_norm_attention_triton

    ops = triton_ops()
    monkeypatch.setattr(ops, "ATOMIC_DQ", atomic_dq)
    monkeypatch.setitem(test_qk_norm_attention_triton.TOLERANCE, torch.float32, 1e-2)
    B, H, N, D = 1, 1, 17, 20
    q, _, v, _, _, _, grad_out = make_case(B, H, N, D, torch.float32, seed=24)
    gen = torch.Generator().manual_seed(25)
    q = torch.randn(D, generator=gen) + 0.3 * torch.randn(B, H, N, D, generator=gen)
    params = [torch.full((D,), 30.0), None, torch.ones(D), torch.zeros(D)]
    check_against_reference(q, -q, v, params, None, None, grad_out)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows
def test_attention_atomic_dq_ignores_nan_padding_keys(monkeypatch):
    """Padding keys holding NaN / inf change no gradient with dQ added up by atomic adds
    (ATOMIC_DQ), where the dK / dV kernel's dQ shares dSᵀ K take every key row: the padding
    keys' rows of K must be zeros there (0 · NaN is NaN), not only their probabilities
    (tests/ops/test_qk_norm_attention.py checks this with the default variant). Mutation this
    catches: the padding keys' normalised rows not zeroed in the dK / dV kernel."""
    ops = triton_ops()
    monkeypatch.setattr(ops, "ATOMIC_DQ", True)
    q, k, v, params, kpm, _, grad_out = make_case(2, 2, 37, 20, torch.float32, seed=26,
                                                  mask="random")  # fmt: skip
    padded = kpm[:, None, :, None]
    clean_k, clean_v = k.masked_fill(padded, 0), v.masked_fill(padded, 0)
    bad_k, bad_v = clean_k.clone(), clean_v.clone()
    rows = kpm.nonzero()
    (b0, n0), (b1, n1) = rows[0].tolist(), rows[-1].tolist()
    bad_k[b0, 0, n0, 2], bad_k[b1, 1, n1] = float("nan"), float("inf")
    bad_v[b0, 1, n0, 0], bad_v[b1, 0, n1, 1] = float("nan"), float("-inf")

    def grads(k_in, v_in):
        saved = ops.qk_norm_attention_fwd_triton(q, k_in, v_in, *params, EPS, 0.25, kpm, False,
                                                 None)  # fmt: skip
        return saved[0], ops.qk_norm_attention_bwd_triton(
            grad_out, q, k_in, v_in, *params, *saved, 0.25, kpm, False, None
        )

    clean_out, clean = grads(clean_k, clean_v)
    bad_out, bad = grads(bad_k, bad_v)
    torch.testing.assert_close(bad_out, clean_out, rtol=0, atol=0)
    for name, a, b in zip(("q", "k", "v", "q_w", "q_b", "k_w", "k_b"), bad, clean, strict=True):
        assert torch.isfinite(a).all(), f"d{name}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d{name}")
