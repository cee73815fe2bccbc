"""VQ nearest-code lookup and code statistics: every backend against the float64 reference."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eegfast.ops import available_backends, vq_code_stats, vq_nearest, vq_nearest_reference
from eegfast.ops.vq import vq_code_stats_reference
from eegfast.testing import assert_close, requires_cuda, strided, vq_shapes
from eegfast.testing.triton_sm90 import KernelSpec, compile_for_sm90, has_ptxas

METRICS = ("cosine", "l2")


def cpu_backends():
    """C++ always (CI builds it), Triton where the interpreter or a GPU is available."""
    backends = ["cpu"]
    if available_backends()["triton"].available:
        backends.append("triton")
    return backends


def backend_dtypes(backend):
    # bf16 is unreliable in the Triton interpreter (numpy has no bf16).
    if backend == "triton":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def sample_inputs(n, k, d, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen).to(dtype).to(device)
    codebook = torch.randn(k, d, generator=gen).to(dtype).to(device)
    return z, codebook


def check_against_reference(z, codebook, metric, backend):
    indices, scores = vq_nearest(z, codebook, metric, return_scores=True, backend=backend)
    ref_indices, ref_scores = vq_nearest_reference(z, codebook, metric)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == scores.shape == (z.shape[0],)
    torch.testing.assert_close(indices.cpu(), ref_indices.cpu(), rtol=0, atol=0)
    assert_close(scores.cpu(), ref_scores.cpu(), torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@given(shape=vq_shapes(), dtype_index=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_correctness_random_shapes(backend, metric, shape, dtype_index, seed):
    dtypes = backend_dtypes(backend)
    z, codebook = sample_inputs(*shape, dtypes[dtype_index % len(dtypes)], seed)
    check_against_reference(z, codebook, metric, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
def test_strided_inputs(backend, metric):
    z, codebook = sample_inputs(67, 129, 25, torch.float32, 1)
    check_against_reference(strided(z), strided(codebook), metric, backend)
    wide = torch.randn(67, 40)
    wide[:, :25] = z
    check_against_reference(wide[:, :25], codebook, metric, backend)  # row stride 40


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs triton (interpreter or GPU)")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_nearest_loops_over_wide_head_dims(metric, dtype, monkeypatch):
    """Past _MAX_BLOCK_D (fp32 128, 2-byte 512: one tile of all D would not fit an H100's shared
    memory or spill registers) the kernel adds the scores up chunk by chunk; here tiles and
    chunks are 16 wide, so D = 40 takes three chunks (the last one partial), D = 32 two whole
    ones, D = 16 one tile."""
    from eegfast.ops import vq_triton

    monkeypatch.setattr(vq_triton, "_MAX_BLOCK_D", {4: 16, 2: 16})
    monkeypatch.setattr(vq_triton, "_CHUNK_D", {4: 16, 2: 16})
    for d in (16, 32, 40):
        z, codebook = sample_inputs(37, 70, d, dtype, seed=d)
        check_against_reference(z, codebook, metric, "triton")
    wide = torch.randn(37, 48, dtype=dtype)
    check_against_reference(wide[:, 3:43], codebook, metric, "triton")  # row stride 48


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs triton (interpreter or GPU)")
def test_triton_row_offsets_past_int32():
    """Row 2 of z starts 2^32 elements in (row stride 2^31 - 8, which fits int32 alone): the
    kernels read it there, not at the wrapped int32 offset -16, where a decoy row sits. The
    storage is 8 GiB of untouched virtual memory; only four rows are written."""
    d, stride = 8, 2**31 - 8
    storage = torch.empty(2 * stride + d + 16, dtype=torch.float16)
    z = storage.as_strided((3, d), (stride, 1), storage_offset=16)
    codebook = torch.eye(d, dtype=torch.float16)[:4]
    z.copy_(codebook[:3])  # row i nearest to code i
    storage[:d] = codebook[3]  # the decoy: what a wrapped offset would read
    assert vq_nearest(z, codebook, "l2", backend="triton").tolist() == [0, 1, 2]
    _, sums = vq_code_stats(z, torch.arange(3), 4, backend="triton")
    torch.testing.assert_close(sums, torch.cat([codebook[:3], torch.zeros(1, d)]).float())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_go_to_lowest_index(backend, metric):
    z, codebook = sample_inputs(50, 40, 20, torch.float32, 2)
    codebook[7] = codebook[3]
    codebook[33] = codebook[3]
    z[:10] = codebook[3]  # these rows tie exactly between codes 3, 7 and 33
    indices = vq_nearest(z, codebook, metric, backend=backend)
    assert (indices[:10] == 3).all()
    check_against_reference(z, codebook, metric, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
def test_near_ties_closer_than_fp32_resolution(backend, metric):
    """Codes that differ below fp32 score resolution: only the float64 re-check gets these."""
    gen = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(1, 32, generator=gen), dim=1)
    codebook = base.repeat(16, 1)
    codebook += 1e-6 * torch.randn(16, 32, generator=gen)  # fp32 scores nearly equal
    codebook = torch.cat([torch.randn(64, 32, generator=gen), codebook])
    z = base + 1e-6 * torch.randn(200, 32, generator=gen)
    check_against_reference(z, codebook, metric, backend)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_pick_the_true_nearest(metric, dtype):
    """Scoring in bf16/fp16 flips choices; fp32 accumulation + float64 re-check does not."""
    z, codebook = sample_inputs(2000, 1024, 32, dtype, 4)
    indices = vq_nearest(z, codebook, metric, backend="cpu")
    ref_indices, _ = vq_nearest_reference(z, codebook, metric)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    if metric == "cosine":  # the naive low-precision answer really differs: the test can fail
        naive = (z @ codebook.T).float() / codebook.float().norm(dim=1)
        assert (naive.argmax(1) != ref_indices).sum() > 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
def test_non_finite_rows_get_minus_one(backend, metric):
    z, codebook = sample_inputs(20, 30, 25, torch.float32, 5)
    z[3, 4] = float("nan")
    z[7, 0] = float("inf")
    z[11, 24] = float("-inf")
    indices, scores = vq_nearest(z, codebook, metric, return_scores=True, backend=backend)
    bad = torch.tensor([3, 7, 11])
    assert (indices[bad] == -1).all() and scores[bad].isnan().all()
    good = torch.ones(20, dtype=torch.bool)
    good[bad] = False
    assert (indices[good] >= 0).all() and scores[good].isfinite().all()
    check_against_reference(z, codebook, metric, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_rows_and_zero_codes(backend):
    z, codebook = sample_inputs(10, 20, 20, torch.float32, 6)
    z[2] = 0
    codebook[0] = 0
    check_against_reference(z, codebook, "cosine", backend)
    check_against_reference(z, codebook, "l2", backend)


@pytest.mark.parametrize("backend", [*cpu_backends(), "reference"])
def test_empty_batch(backend):
    z, codebook = sample_inputs(0, 20, 32, torch.float32, 7)
    indices, scores = vq_nearest(z, codebook, return_scores=True, backend=backend)
    assert indices.shape == scores.shape == (0,)
    counts, sums = vq_code_stats(z, indices, 20, backend=backend)
    assert counts.sum() == 0 and sums.shape == (20, 32)


@pytest.mark.parametrize("backend", [*cpu_backends(), "reference"])
@pytest.mark.parametrize(
    ("z_shape", "c_shape", "kwargs", "error", "message"),
    [
        ((4, 8), (5, 9), {}, ValueError, "codebook has D = 9"),
        ((4, 8), (0, 8), {}, ValueError, "codebook is empty"),
        ((4,), (5, 8), {}, ValueError, "z must have shape"),
        ((4, 8), (5, 8, 1), {}, ValueError, "codebook must have shape"),
        ((4, 8), (5, 8), {"metric": "dot"}, ValueError, "metric must be"),
    ],
)
def test_bad_input_names_the_argument(backend, z_shape, c_shape, kwargs, error, message):
    with pytest.raises(error, match=message):
        vq_nearest(torch.randn(z_shape), torch.randn(c_shape), backend=backend, **kwargs)


def test_bad_dtypes_and_backend_names():
    with pytest.raises(TypeError, match="z must be float32"):
        vq_nearest(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="codebook is torch.float16"):
        vq_nearest(torch.zeros(3, 4), torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="backend must be one of"):
        vq_nearest(torch.zeros(3, 4), torch.zeros(2, 4), backend="fast")
    with pytest.raises(ValueError, match="cannot run on tensors on cpu"):
        vq_nearest(torch.zeros(3, 4), torch.zeros(2, 4), backend="cuda")


def test_cpp_kernel_checks_direct_calls():
    """The C++ op validates its arguments itself, for callers that bypass the wrapper."""
    with pytest.raises(RuntimeError, match="z has D = 8 but codebook has D = 9"):
        torch.ops.eegfast.vq_nearest(torch.randn(4, 8), torch.randn(5, 9), "cosine")
    with pytest.raises(RuntimeError, match="metric must be 'cosine' or 'l2'"):
        torch.ops.eegfast.vq_nearest(torch.randn(4, 8), torch.randn(5, 8), "dot")
    with pytest.raises(ValueError, match=r"indices\[1\] = 9 is outside"):
        torch.ops.eegfast.vq_code_stats(torch.randn(2, 8), torch.tensor([0, 9]), 5)


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("EEGFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EEGFAST_BACKEND must be one of"):
        vq_nearest(torch.zeros(3, 4), torch.ones(2, 4))
    monkeypatch.setenv("EEGFAST_BACKEND", "reference")
    assert vq_nearest(torch.zeros(3, 4), torch.ones(2, 4)).tolist() == [0, 0, 0]


# ---- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
def test_gradients_match_reference(backend, metric):
    z0, c0 = sample_inputs(33, 17, 20, torch.float32, 8)
    z0[5, 0] = float("nan")  # gets no gradient, must not poison the others

    def grads(backend_name):
        z, codebook = z0.clone().requires_grad_(), c0.clone().requires_grad_()
        _, scores = vq_nearest(z, codebook, metric, return_scores=True, backend=backend_name)
        weights = torch.linspace(-1, 1, z.shape[0])
        (torch.where(scores.isnan(), 0, scores) * weights).sum().backward()
        return z.grad, codebook.grad

    gz, gc = grads(backend)
    rz, rc = grads("reference")
    assert_close(gz, rz, torch.float32, scale=10)
    assert_close(gc, rc, torch.float32, scale=10)
    assert (gz[5] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_code_stats_gradient(backend):
    z = torch.randn(40, 25, requires_grad=True)
    indices = torch.randint(-1, 7, (40,))
    _, sums = vq_code_stats(z, indices, 7, backend=backend)
    weights = torch.randn(7, 25)
    (sums * weights).sum().backward()
    expected = torch.where((indices >= 0)[:, None], weights[indices.clamp_min(0)], 0.0)
    torch.testing.assert_close(z.grad, expected)


# ---- code statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@given(shape=vq_shapes(), seed=st.integers(0, 2**16))
def test_code_stats_random_shapes(backend, shape, seed):
    n, k, d = shape
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    indices = torch.randint(-1, k, (n,), generator=gen)
    counts, sums = vq_code_stats(z, indices, k, backend=backend)
    ref_counts, ref_sums = vq_code_stats_reference(z, indices, k)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    assert_close(sums, ref_sums, torch.float32)


@pytest.mark.parametrize("backend", [*cpu_backends(), "reference"])
def test_code_stats_skip_non_finite_rows(backend):
    """Rows that vq_nearest gives index -1 (NaN / inf in z) add nothing, not even to code 0."""
    z = torch.randn(6, 5)
    z[1, 2], z[4, 0] = float("nan"), float("inf")
    indices = vq_nearest(z, torch.randn(3, 5), backend=backend)
    assert indices[1] == indices[4] == -1
    counts, sums = vq_code_stats(z, indices, 3, backend=backend)
    keep = indices >= 0
    expected = torch.zeros(3, 5).index_add(0, indices[keep], z[keep])
    torch.testing.assert_close(sums, expected)
    assert counts.sum() == 4 and torch.isfinite(sums).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_code_stats_low_precision_and_strides(backend):
    z = torch.randn(100, 50).to(torch.float16)
    indices = torch.randint(-1, 13, (100,))
    counts, sums = vq_code_stats(strided(z), indices, 13, backend=backend)
    ref_counts, ref_sums = vq_code_stats_reference(z, indices, 13)
    torch.testing.assert_close(counts, ref_counts)
    assert_close(sums, ref_sums, torch.float32)


def test_code_stats_bad_input():
    with pytest.raises(ValueError, match="indices must have shape"):
        vq_code_stats(torch.randn(4, 3), torch.zeros(5, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="indices must be int64"):
        vq_code_stats(torch.randn(4, 3), torch.zeros(4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="num_codes must be positive"):
        vq_code_stats(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), 0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_code_stats_refuses_indices_outside_minus_one_to_k_on_every_backend(backend):
    """-1 is the only index skipped: the C++ kernel refuses -2 or K, but the reference counted
    nothing for every negative index (as if it were -1) and raised an IndexError naming no
    argument for K or more."""
    z = torch.randn(4, 3)
    for bad, shown in (([0, -2, 1, 2], "-2 .. 2"), ([0, 3, 1, -1], "-1 .. 3")):
        with pytest.raises(ValueError, match=r"outside|\[-1, 3\)") as error:
            vq_code_stats(z, torch.tensor(bad), 3, backend=backend)
        if backend == "reference":
            assert f"got {shown}" in str(error.value)
    counts, _ = vq_code_stats(z, torch.tensor([0, -1, 2, 2]), 3, backend=backend)
    assert counts.tolist() == [1.0, 0.0, 2.0]


# ---- custom-op machinery ----------------------------------------------------------------------


def opcheck_ops():
    ops = [("vq_nearest", "vq_code_stats")]
    if available_backends()["triton"].available:
        from eegfast.ops import vq_triton  # noqa: F401  (registers the Triton ops)

        ops.append(("vq_nearest_triton", "vq_code_stats_triton"))
    return ops


@pytest.mark.parametrize(("nearest_op", "stats_op"), opcheck_ops())
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(nearest_op, stats_op, metric):
    nearest = getattr(torch.ops.eegfast, nearest_op)
    stats = getattr(torch.ops.eegfast, stats_op)
    checks = ["test_schema", "test_autograd_registration", "test_faketensor"]
    # Under TRITON_INTERPRET=1 kernels are InterpretedFunctions, which wrap_triton cannot trace
    # into a graph; test_gpu_opcheck_and_compile runs the full opcheck for the Triton ops.
    if not (nearest_op.endswith("_triton") and not torch.cuda.is_available()):
        checks.append("test_aot_dispatch_dynamic")
    for requires_grad in (False, True):
        z, codebook = sample_inputs(37, 19, 25, torch.float32, 9)
        z.requires_grad_(requires_grad)
        codebook.requires_grad_(requires_grad)
        torch.library.opcheck(nearest, (z, codebook, metric), test_utils=checks)
        indices = vq_nearest_reference(z.detach(), codebook.detach(), metric)[0]
        torch.library.opcheck(stats, (z, indices, 19), test_utils=checks)


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def tokenize(z, codebook):
        indices, scores = vq_nearest(z, codebook, "cosine", return_scores=True, backend="cpu")
        counts, sums = vq_code_stats(z, indices, codebook.shape[0], backend="cpu")
        return indices, scores.sum() + sums.sum()

    z, codebook = sample_inputs(45, 23, 20, torch.float32, 10)
    z.requires_grad_()
    indices, loss = tokenize(z, codebook)
    loss.backward()
    torch.testing.assert_close(indices, vq_nearest_reference(z.detach(), codebook)[0])
    assert z.grad is not None and z.grad.isfinite().all()


@pytest.mark.parametrize("faster", ["reference", "cpu"])
def test_automatic_gpu_backend_is_timed_once_per_case(faster, monkeypatch):
    """Where two GPU backends are ready and the backend is automatic, vq_nearest times both on
    random inputs of the case's size the first time it is seen and runs the faster; later
    calls of the case reuse the choice. On CPU tensors, "reference" and "cpu" stand in for
    the two GPU backends."""
    from eegfast.ops import _variants, vq

    monkeypatch.setattr(_variants, "_CHOSEN", {})
    monkeypatch.setattr(vq, "automatic_gpu_candidates", lambda *args: ("reference", "cpu"))
    timed, ran = [], []
    real_nearest = vq._nearest

    def nearest(backend, z, codebook, metric):
        ran.append((backend, z.shape[0]))
        return real_nearest(backend, z, codebook, metric)

    def timer(call):
        call()
        timed.append(ran[-1])
        return 1.0 if ran[-1][0] == faster else 2.0

    monkeypatch.setattr(vq, "_nearest", nearest)
    monkeypatch.setattr(_variants, "time_ms", timer)
    gen = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(100, 12, generator=gen), torch.randn(40, 12, generator=gen)
    indices = vq_nearest(z, codebook)
    assert timed == [("reference", 128), ("cpu", 128)]  # rows rounded up to a power of two
    assert ran[-1] == (faster, 100)
    assert torch.equal(indices, vq_nearest_reference(z, codebook)[0])
    assert list(_variants.chosen_variants("vq_nearest").values()) == [faster]
    vq_nearest(z[:90], codebook)  # the same case
    assert len(timed) == 2 and ran[-1] == (faster, 90)
    # While torch.compile traces, sizes may be symbolic: no timing, the first ready backend,
    # no graph break.
    compiled = torch.compile(vq_nearest, backend="eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(z, codebook[:31]), vq_nearest_reference(z, codebook[:31])[0])
    assert len(timed) == 2 and ran[-1] == ("cpu", 100)  # resolve_backend's, for CPU tensors


def test_automatic_gpu_candidates():
    from eegfast.ops._backend import automatic_gpu_candidates

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert automatic_gpu_candidates(None, cpu, ("triton", "cuda")) == ()
    assert automatic_gpu_candidates("triton", cuda, ("triton", "cuda")) == ()  # asked for


# ---- GPU --------------------------------------------------------------------------------------


def gpu_backends():
    statuses = available_backends()
    return [name for name in ("cuda", "triton") if statuses[name].available]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1000, 333, 25), (4099, 8192, 32), (257, 1000, 64)])
def test_gpu_backends_match_reference(metric, dtype, shape):
    backends = gpu_backends()
    assert backends, "a CUDA device is visible but neither the cuda nor the triton backend is"
    z, codebook = sample_inputs(*shape, dtype, 11, device="cuda")
    z[0, 0] = float("nan")
    for backend in backends:
        check_against_reference(z, codebook, metric, backend)
        indices = vq_nearest(z, codebook, metric, backend=backend)
        counts, sums = vq_code_stats(z, indices, shape[1], backend=backend)
        ref_counts, ref_sums = vq_code_stats_reference(z, indices, shape[1])
        torch.testing.assert_close(counts, ref_counts)
        assert_close(sums, ref_sums, torch.float32, scale=10)


@requires_cuda
@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    for backend in gpu_backends():
        op = "vq_nearest" if backend == "cuda" else "vq_nearest_triton"
        z, codebook = sample_inputs(300, 77, 50, torch.float32, 12, device="cuda")
        torch.library.opcheck(getattr(torch.ops.eegfast, op), (z, codebook, "cosine"))
        compiled = torch.compile(
            lambda a, b, name=backend: vq_nearest(a, b, backend=name), fullgraph=True
        )
        torch.testing.assert_close(compiled(z, codebook), vq_nearest_reference(z, codebook)[0])


@requires_cuda
@pytest.mark.gpu
def test_gpu_automatic_backend_is_the_faster_ready_one(monkeypatch):
    """With both GPU backends ready, the automatic choice times them once for the case and
    keeps one; the indices are the reference's either way."""
    from eegfast.ops import _variants

    if len(gpu_backends()) < 2:
        pytest.skip("needs both GPU backends (the CUDA extension and triton)")
    monkeypatch.delenv("EEGFAST_BACKEND", raising=False)
    monkeypatch.setattr(_variants, "_CHOSEN", {})
    z, codebook = sample_inputs(4096, 1024, 32, torch.bfloat16, 5, device="cuda")
    indices = vq_nearest(z, codebook)
    chosen = _variants.chosen_variants("vq_nearest")
    assert len(chosen) == 1 and set(chosen.values()) <= {"cuda", "triton"}, chosen
    torch.testing.assert_close(indices, vq_nearest_reference(z, codebook)[0])


@pytest.mark.skipif(not has_ptxas(), reason="this triton install has no bundled ptxas")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """What the interpreter accepts but the compiler rejects (non-constexpr globals, types)."""
    int_ptrs = {"best_code_ptr": "*i32", "index_ptr": "*i64", "flag_ptr": "*i8"}
    f64 = {name: "*fp64" for name in ("z_ptr", "code_ptr", "code_norm_ptr", "max_norm_sq_ptr")}
    bf16 = {"z_ptr": "*bf16", "code_ptr": "*bf16"}
    specs = [
        KernelSpec(
            "_nearest_kernel",
            dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, D_CHUNKED=False, PRECISION="ieee", ALIGN=8),
            {**int_ptrs, **bf16},
        ),  # fmt: skip
        *(
            KernelSpec(
                "_rescore_kernel",
                dict(IS_COSINE=cosine, BLOCK_K=64, BLOCK_D=32),
                {**int_ptrs, **f64},
            )  # fmt: skip
            for cosine in (True, False)
        ),
        KernelSpec(
            "_code_stats_kernel", dict(BLOCK_N=64, BLOCK_D=32, ALIGN=8), {**int_ptrs, **bf16}
        ),
    ]
    compiled = compile_for_sm90("eegfast.ops.vq_triton", specs)
    assert "warp_group_dot" in compiled["_nearest_kernel"]["ttgir"]  # tensor cores
    assert set(compiled) == {"_nearest_kernel", "_rescore_kernel", "_code_stats_kernel"}
    # bf16 rows of D = 32 as the launches describe them (D and strides divided by 8): whole
    # 16-byte vectors, no 2-byte loads, and no spilled registers
    for name in ("_nearest_kernel", "_code_stats_kernel"):
        ptx = compiled[name]["ptx"]
        assert not re.search(r"ld\.global(?:\.\w+)*\.b16", ptx), f"{name}: 2-byte loads"
        assert re.search(r"ld\.global(?:\.\w+)*\.v4", ptx), f"{name}: no 16-byte loads"
    for name, kernel in compiled.items():
        assert kernel["spill_bytes"] == 0, f"{name}: {kernel['registers']} registers, spills"


@pytest.mark.skipif(not has_ptxas(), reason="this triton install has no bundled ptxas")
def test_widest_nearest_tiles_fit_h100_shared_memory():
    """The nearest-code kernel's widest tiles as the launches make them, one tile of all D
    (_MAX_BLOCK_D, BLOCK_N 32) and the chunks past it (_CHUNK_D, BLOCK_N 64), fp32 with 3-pass
    TF32 and bf16, fit an H100 block's 227 KB of shared memory without spilling registers; one
    tile of all D at fp32 D = 512 took 394 KB (the launch failed: OutOfResources)."""
    from eegfast.ops.vq_triton import _CHUNK_D, _MAX_BLOCK_D

    for size, dtype, precision in ((4, "fp32", "tf32x3"), (2, "bf16", "ieee")):
        for block_n, block_d, chunked in ((32, _MAX_BLOCK_D[size], False),
                                          (64, _CHUNK_D[size], True)):  # fmt: skip
            spec = KernelSpec(
                "_nearest_kernel",
                dict(BLOCK_N=block_n, BLOCK_K=64, BLOCK_D=block_d, D_CHUNKED=chunked,
                     PRECISION=precision, ALIGN=8),
                {"best_code_ptr": "*i32", "z_ptr": f"*{dtype}", "code_ptr": f"*{dtype}"},
            )  # fmt: skip
            (kernel,) = compile_for_sm90("eegfast.ops.vq_triton", [spec]).values()
            assert kernel["shared_bytes"] <= 227 * 1024, spec
            assert kernel["spill_bytes"] == 0, spec


@pytest.mark.parametrize("backend", [*cpu_backends(), "reference"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_codes_are_never_chosen(backend, metric, bad):
    """A NaN or inf code anywhere in the codebook leaves every row's nearest finite code as it
    was. Under l2 the reference took the largest code norm, NaN or inf, as its tie scale: a
    NaN made no code a candidate and an inf made every code one (index 0 for every row, in the
    C++ kernel too for inf); the C++ kernel's largest norm skipped a NaN code followed by
    others."""
    z, codebook = sample_inputs(40, 24, 8, torch.float32, seed=5)
    expected = vq_nearest_reference(z, codebook, metric)[0]
    spoiled = codebook.clone()
    spoiled[[2, 9]] = float(bad)  # codes 2 and 9 whole, code 17 in one element
    spoiled[17, 3] = float(bad)
    keep = torch.ones(24, dtype=torch.bool)
    keep[[2, 9, 17]] = False
    # the nearest among the finite codes, mapped back to codebook indices
    want = keep.nonzero().squeeze(1)[vq_nearest_reference(z, codebook[keep], metric)[0]]
    assert not torch.equal(want, torch.zeros_like(want))
    indices, scores = vq_nearest(z, spoiled, metric, return_scores=True, backend=backend)
    torch.testing.assert_close(indices, want, rtol=0, atol=0)
    assert torch.isfinite(scores).all()
    assert (indices == expected)[keep[expected]].all()


@pytest.mark.parametrize("backend", [*cpu_backends(), "reference"])
@pytest.mark.parametrize("metric", METRICS)
def test_codebook_without_a_finite_code_gives_minus_one(backend, metric):
    """NaN codes are never chosen: with no finite code every row gets -1 and score NaN (the
    reference gave index 0, a NaN code; the C++ kernel 0 under cosine and -1 under l2)."""
    z, _ = sample_inputs(10, 1, 6, torch.float32, seed=2)
    codebook = torch.full((5, 6), float("nan"))
    indices, scores = vq_nearest(z, codebook, metric, return_scores=True, backend=backend)
    assert indices.tolist() == [-1] * 10
    assert torch.isnan(scores).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["cosine_tiny_rows", "l2_far_rows", "l2_tiny_codes"])
def test_ties_by_the_reference_tolerance_match_at_extreme_scales(backend, case):
    """Rows the reference counts as ties (scores within TIE_TOLERANCE of the best: cosine rows
    with |z| < 1e-12, whose norm is clamped like F.normalize; l2 rows whose distance is
    dominated by |z|^2) go to the lowest index. The kernels' fp32 fast path took its winner
    whenever the gap exceeded the fp32 error bound alone, so these rows got other indices."""
    metric = "cosine" if case.startswith("cosine") else "l2"
    z, codebook = sample_inputs(30, 20, 8, torch.float32, seed=4)
    if case == "cosine_tiny_rows":
        z = z * 1e-40  # fp32 subnormals
    elif case == "l2_far_rows":
        z = z * 1e30
    else:
        codebook = codebook * 1e-40
    check_against_reference(z, codebook, metric, backend)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_non_finite_codes_and_extreme_scales_as_the_cpu(metric):
    """The CUDA kernel's share of the CPU fixes (largest finite code norm, no finite code -> -1,
    the fast path's tie and underflow terms), and Triton's, on a device: NaN / inf codes never
    chosen, an all-NaN codebook gives -1, extreme-scale ties go to the reference's index."""
    z, codebook = sample_inputs(40, 24, 8, torch.float32, seed=5, device="cuda")
    keep = torch.ones(24, dtype=torch.bool, device="cuda")
    keep[[2, 9, 17]] = False
    want = keep.nonzero().squeeze(1)[vq_nearest_reference(z, codebook[keep], metric)[0]]
    for backend in gpu_backends():
        for bad in ("nan", "inf"):
            spoiled = codebook.clone()
            spoiled[[2, 9]] = float(bad)
            spoiled[17, 3] = float(bad)
            indices = vq_nearest(z, spoiled, metric, backend=backend)
            torch.testing.assert_close(indices, want, rtol=0, atol=0, msg=f"{backend} {bad}")
        empty = torch.full((5, 8), float("nan"), device="cuda")
        assert vq_nearest(z, empty, metric, backend=backend).eq(-1).all(), backend
        scaled = (z * 1e-40, codebook) if metric == "cosine" else (z * 1e30, codebook)
        check_against_reference(*scaled, metric, backend)
        check_against_reference(z, codebook * 1e-40, metric, backend)
