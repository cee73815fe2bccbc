"""QK-LayerNorm attention ops against the testing standard: the ops themselves, on drawn
shapes, layouts and masks.

What tests/ops/test_qk_norm_attention.py and test_qk_norm_attention_triton.py leave out, added
here: the Triton ops (TRITON_INTERPRET=1, set by tests/conftest.py) on drawn batch and head
counts with q, k, v and the output gradient in any layout (strided, transposed, packed); the C++
ops called directly on drawn shapes in fp32 and fp16, lse and the LayerNorm statistics checked
too; unsorted block ids; and torch.library.opcheck of every attention op, helper ops included,
on drawn shapes, dtypes, layouts and masks.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eegfast.ops import available_backends
from eegfast.testing import odd_sizes, strided
from tests.ops.test_qk_norm_attention_triton import EPS, check_against_reference, op_pair

TRITON = available_backends()["triton"].available
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton (GPU or TRITON_INTERPRET=1)")
LAYOUTS = ("contiguous", "strided", "transposed", "packed")
GRAD_LAYOUTS = ("contiguous", "strided", "heads_first")


def laid_out(q, k, v, layout):
    """q, k, v (B, H, N, D) with the same values, stored as ``layout``."""
    if layout == "packed":  # views of one (B, N, 3 H D) qkv buffer, as after the qkv linear
        B, H, N, D = q.shape
        qkv = torch.stack((q, k, v), 0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)
        return qkv.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "strided":
        return tuple(strided(t, 2) for t in (q, k, v))
    if layout == "transposed":  # (B, N, H, D) storage
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


def grad_laid_out(grad_out, layout):
    """grad_out (B, N, H, D) with the same values, stored as ``layout``."""
    if layout == "strided":
        return strided(grad_out, 2)
    if layout == "heads_first":  # what autograd passes for a (B, H, N, D) gradient
        return grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    return grad_out


def make_inputs(B, H, N, D, dtype, *, seed, affine, mask, ids):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(3))
    params = [None] * 4
    if affine:
        params = [(s + 0.3 * torch.randn(D, generator=gen)).to(dtype) for s in (1, 0, 1, 0)]
    key_padding_mask = None
    if mask != "none":
        key_padding_mask = torch.rand(B, N, generator=gen) < 0.3
        if mask == "full_row":  # batch 0: every key padded, its rows see nothing
            key_padding_mask[0] = True
    block_ids = None
    if ids == "sorted":
        block_ids = torch.randint(0, 4, (N,), generator=gen).sort().values
    elif ids == "unsorted":
        block_ids = torch.randint(0, 4, (N,), generator=gen)
    grad_out = torch.randn(B, N, H, D, generator=gen).to(dtype)
    return q, k, v, params, key_padding_mask, block_ids, grad_out


CASES = dict(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    d=st.sampled_from((20, 25, 50)),
    dtype=st.sampled_from((torch.float32, torch.float16)),
    layout=st.sampled_from(LAYOUTS),
    grad_layout=st.sampled_from(GRAD_LAYOUTS),
    mask=st.sampled_from(("none", "random", "full_row")),
    ids=st.sampled_from((None, "sorted", "unsorted")),
    causal=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)


def run_case(backend, B, H, n, d, dtype, layout, grad_layout, mask, ids, causal, affine, seed):
    q, k, v, params, kpm, block_ids, grad_out = make_inputs(
        B, H, n, d, dtype, seed=seed, affine=affine, mask=mask, ids=ids
    )
    q, k, v = laid_out(q, k, v, layout)
    check_against_reference(q, k, v, params, kpm, block_ids, grad_laid_out(grad_out, grad_layout),
                            causal=causal, scale=0.8 / d**0.5, backend=backend)  # fmt: skip


@needs_triton
@settings(max_examples=12)
@given(n=odd_sizes(1, 40), **CASES)
def test_triton_ops_random_shapes_and_layouts(B, H, n, d, dtype, layout, grad_layout, mask, ids,
                                              causal, affine, seed):  # fmt: skip
    run_case("triton", B, H, n, d, dtype, layout, grad_layout, mask, ids, causal, affine, seed)


@settings(max_examples=50)
@given(n=odd_sizes(1, 140), **CASES)
def test_cpp_ops_random_shapes_and_layouts(B, H, n, d, dtype, layout, grad_layout, mask, ids,
                                           causal, affine, seed):  # fmt: skip
    run_case("cpu", B, H, n, d, dtype, layout, grad_layout, mask, ids, causal, affine, seed)


# ---- opcheck on drawn shapes, dtypes, layouts and masks -----------------------------------------


def op_families():
    """(backend, test_utils) of the attention op pairs runnable here."""
    families = [("cpu", None)]  # C++: every opcheck test
    if TRITON:
        # Under TRITON_INTERPRET=1 wrap_triton cannot trace the kernels into a graph, so AOT
        # dispatch runs on a GPU only (test_gpu_opcheck_and_compile of the Triton test file).
        utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
        if torch.cuda.is_available():
            utils.append("test_aot_dispatch_dynamic")
        families.append(("triton", utils))
    return families


@pytest.mark.parametrize(("backend", "utils"), op_families())
@settings(max_examples=3)
@given(
    shape=st.tuples(
        st.integers(1, 2), st.integers(1, 2), odd_sizes(1, 20), st.sampled_from((20, 25, 50))
    ),  # fmt: skip
    dtype=st.sampled_from((torch.float32, torch.float16)),
    layout=st.sampled_from(LAYOUTS),
    mask=st.sampled_from(("none", "random")),
    ids=st.sampled_from((None, "unsorted")),
    causal=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_opcheck_attention_ops(backend, utils, shape, dtype, layout, mask, ids, causal, affine,
                               seed):  # fmt: skip
    fwd, bwd = op_pair(backend)
    q, k, v, params, kpm, block_ids, grad_out = make_inputs(
        *shape, dtype, seed=seed, affine=affine, mask=mask, ids=ids
    )
    q, k, v = laid_out(q, k, v, layout)
    kwargs = {} if utils is None else {"test_utils": utils}
    scale = shape[3] ** -0.5
    for requires_grad in (False, True):
        leaves = [None if t is None else t.detach().requires_grad_(requires_grad)
                  for t in (q, k, v, *params)]  # fmt: skip
        torch.library.opcheck(fwd, (*leaves, EPS, scale, kpm, causal, block_ids), **kwargs)
    saved = fwd(q, k, v, *params, EPS, scale, kpm, causal, block_ids)
    bwd_args = (grad_out, q, k, v, *params, *saved, scale, kpm, causal, block_ids)
    torch.library.opcheck(bwd, bwd_args, **kwargs)


def test_opcheck_cpu_helper_ops():
    """The C++ output pool's and instruction set's ops (no tensor arguments)."""
    ops = torch.ops.eegfast
    torch.library.opcheck(ops.cpu_pool_cached_bytes, ())
    torch.library.opcheck(ops.cpu_pool_release, ())
    # opcheck's AOT-dispatch test cannot compare str outputs (it asks for tensors or numbers)
    torch.library.opcheck(ops.cpu_attention_isa, (),
                          test_utils=["test_schema", "test_autograd_registration",
                                      "test_faketensor"])  # fmt: skip
    assert ops.cpu_attention_isa() in ("avx512", "avx2", "generic", "amx")
