"""VQ ops against the testing standard: hypothesis shapes, layouts and gradients per backend.

What tests/ops/test_vq.py and test_vq_ema.py leave out, added here: the gradients of the
chosen scores on drawn shapes, metrics, dtypes and layouts (C++, and Triton under
TRITON_INTERPRET=1 in fp32 / fp16); code statistics in low precision and with any strides; the
EMA update on every backend against a float64 one-hot formula (rows left out with index -1,
decay, smoothing, no renormalisation); and torch.library.opcheck of the four VQ ops on drawn
shapes, dtypes and layouts.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from eegfast.ops import available_backends, vq_code_stats, vq_ema_update, vq_nearest
from eegfast.ops.vq import vq_code_stats_reference, vq_nearest_reference
from eegfast.testing import assert_close, odd_sizes, strided

TRITON = available_backends()["triton"].available
BACKENDS = ("cpu", *(("triton",) if TRITON else ()))
METRICS = ("cosine", "l2")
LAYOUTS = ("contiguous", "strided", "transposed")
SHAPES = st.tuples(
    st.one_of(st.just(0), odd_sizes(1, 90)),  # N
    odd_sizes(1, 70),  # K
    st.sampled_from((1, 3, 20, 25, 32, 50)),  # D
)


def dtypes(backend):
    # numpy, which the Triton interpreter computes with, has no bf16
    if backend == "triton":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as the 2-D ``t``, stored differently."""
    if layout == "strided":
        return strided(t, 2)
    if layout == "transposed":  # column-major
        return t.T.contiguous().T
    return t


def inputs(n, k, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen).to(dtype)
    codebook = torch.randn(k, d, generator=gen).to(dtype)
    return z, codebook


@settings(max_examples=60)
@given(
    backend=st.sampled_from(BACKENDS),
    metric=st.sampled_from(METRICS),
    shape=SHAPES,
    dtype_index=st.integers(0, 2),
    layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
    seed=st.integers(0, 2**16),
)
def test_nearest_scores_and_gradients_random_shapes(backend, metric, shape, dtype_index,
                                                    layouts, seed):  # fmt: skip
    """Indices exactly, scores and the gradients of z and the codebook against the float64
    reference on the same rounded inputs."""
    backend_dtypes = dtypes(backend)
    dtype = backend_dtypes[dtype_index % len(backend_dtypes)]
    z0, c0 = inputs(*shape, dtype, seed)
    weights = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 1))

    def run(name):
        z, codebook = (t.clone().requires_grad_() for t in (z0, c0))
        indices, scores = vq_nearest(as_layout(z, layouts[0]), as_layout(codebook, layouts[1]),
                                     metric, return_scores=True, backend=name)  # fmt: skip
        if scores.numel():
            (scores * weights).sum().backward()
            return indices, scores, z.grad, codebook.grad
        return indices, scores, torch.zeros_like(z), torch.zeros_like(codebook)

    indices, scores, dz, dc = run(backend)
    ref_indices, ref_scores, ref_dz, ref_dc = run("reference")
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    assert scores.dtype == torch.float32
    assert_close(scores, ref_scores, torch.float32)
    assert dz.dtype == dc.dtype == dtype
    # gradients: float32 arithmetic from the same inputs (l2: 2 (z - c), sums over rows)
    scale = 10 * max(1.0, ref_dc.float().abs().max().item())
    assert_close(dz.float(), ref_dz.float(), dtype, scale=scale)
    assert_close(dc.float(), ref_dc.float(), dtype, scale=scale)


@settings(max_examples=25)
@given(
    backend=st.sampled_from(BACKENDS),
    shape=SHAPES,
    dtype_index=st.integers(0, 2),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_code_stats_random_shapes_dtypes_and_layouts(backend, shape, dtype_index, layout, seed):
    """Counts exactly, sums and the gradient of z against the reference, indices -1 skipped."""
    n, k, d = shape
    backend_dtypes = dtypes(backend)
    dtype = backend_dtypes[dtype_index % len(backend_dtypes)]
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, d, generator=gen).to(dtype)
    indices = torch.randint(-1, k, (n,), generator=gen)
    weights = torch.randn(k, d, generator=gen)
    z = z0.clone().requires_grad_()
    counts, sums = vq_code_stats(as_layout(z, layout), indices, k, backend=backend)
    ref_counts, ref_sums = vq_code_stats_reference(z0, indices, k)
    assert counts.dtype == sums.dtype == torch.float32
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    assert_close(sums, ref_sums, torch.float32, scale=10)
    if n:
        (sums * weights).sum().backward()
        expected = torch.where((indices >= 0)[:, None], weights[indices.clamp_min(0)], 0.0)
        torch.testing.assert_close(z.grad, expected.to(dtype))


def ema_reference(z, indices, codebook, cluster_size, embed_sum, *, decay, eps, normalize):
    """One EMA step in float64 with a one-hot matrix: the new codebook, counts and sums."""
    K = codebook.shape[0]
    keep = indices >= 0
    one_hot = F.one_hot(indices[keep], K).double()
    cluster_size = decay * cluster_size.double() + (1 - decay) * one_hot.sum(0)
    embed_sum = decay * embed_sum.double() + (1 - decay) * one_hot.T @ z[keep].double()
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + K * eps) * total
    updated = embed_sum / smoothed[:, None]
    if normalize:  # only the codes this step's rows chose: the others keep their direction
        updated = F.normalize(updated, dim=1, eps=1e-12)
        changed = one_hot.sum(0) > 0
    else:  # Laplace smoothing rescales every code ever used
        changed = cluster_size > 0
    codebook = torch.where(changed[:, None], updated, codebook.double())
    return codebook, cluster_size, embed_sum


@settings(max_examples=25)
@given(
    backend=st.sampled_from(("reference", *BACKENDS)),
    shape=SHAPES,
    decay=st.sampled_from((0.0, 0.5, 0.9, 0.99)),
    normalize=st.booleans(),
    unused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ema_update_random_shapes(backend, shape, decay, normalize, unused, seed):
    """vq_ema_update against the float64 one-hot step: some rows left out (index -1); with
    ``unused``, some codes never assigned (count 0, which keep their value)."""
    n, k, d = shape
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    codebook = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    cluster_size = torch.rand(k, generator=gen) + 0.5
    embed_sum = codebook * cluster_size[:, None]
    indices = vq_nearest(z, codebook, backend="reference")
    indices[torch.rand(n, generator=gen) < 0.2] = -1
    if unused:  # codes 0 and 2 have never been used
        for code in (0, 2):
            cluster_size[code % k] = 0
            embed_sum[code % k] = 0
            indices[indices == code % k] = -1
    expected = ema_reference(z, indices, codebook, cluster_size, embed_sum, decay=decay,
                             eps=1e-5, normalize=normalize)  # fmt: skip
    stats = vq_ema_update(z, indices, codebook, cluster_size, embed_sum, decay=decay, eps=1e-5,
                          normalize=normalize, backend=backend)  # fmt: skip
    counts = torch.bincount(indices[indices >= 0], minlength=k).float()
    torch.testing.assert_close(stats["counts"], counts, rtol=0, atol=0)
    assert not stats["dead"].any()
    names = ("codebook", "cluster_size", "embed_sum")
    actuals = (codebook, cluster_size, embed_sum)
    for name, actual, want in zip(names, actuals, expected, strict=True):
        assert actual.dtype == torch.float32, name
        torch.testing.assert_close(actual.double(), want, atol=1e-5, rtol=1e-5, msg=name)


# ---- opcheck on drawn shapes, dtypes and layouts ------------------------------------------------


def op_families():
    """(suffix, test_utils) of the VQ op families runnable here."""
    families = [("", None)]  # C++: every opcheck test
    if TRITON:
        from eegfast.ops import vq_triton  # noqa: F401  (registers the Triton ops)

        # Under TRITON_INTERPRET=1 wrap_triton cannot trace the kernels into a graph, so AOT
        # dispatch runs on a GPU only (test_vq.py's test_gpu_opcheck_and_compile).
        utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
        if torch.cuda.is_available():
            utils.append("test_aot_dispatch_dynamic")
        families.append(("_triton", utils))
    return families


@pytest.mark.parametrize(("suffix", "utils"), op_families())
@settings(max_examples=8)
@given(
    metric=st.sampled_from(METRICS),
    shape=st.tuples(odd_sizes(1, 40), odd_sizes(1, 30), st.sampled_from((1, 20, 25, 50))),
    dtype=st.sampled_from((torch.float32, torch.float16)),
    layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
    seed=st.integers(0, 2**16),
)
def test_opcheck_every_vq_op(suffix, utils, metric, shape, dtype, layouts, seed):
    n, k, d = shape
    z0, c0 = inputs(n, k, d, dtype, seed)
    kwargs = {} if utils is None else {"test_utils": utils}
    nearest = getattr(torch.ops.eegfast, "vq_nearest" + suffix)
    stats = getattr(torch.ops.eegfast, "vq_code_stats" + suffix)
    indices = vq_nearest_reference(z0, c0, metric)[0]
    for requires_grad in (False, True):
        z = as_layout(z0.clone().requires_grad_(requires_grad), layouts[0])
        codebook = as_layout(c0.clone().requires_grad_(requires_grad), layouts[1])
        torch.library.opcheck(nearest, (z, codebook, metric), **kwargs)
        torch.library.opcheck(stats, (z, indices, k), **kwargs)
