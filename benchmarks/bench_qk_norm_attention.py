"""pytest-benchmark suite of the fused QK-LayerNorm attention on CPU, against PyTorch.

Run from the repository root::

    pytest benchmarks/bench_qk_norm_attention.py --benchmark-only

Each group (one mode at one shape) shows side by side: eegfast ``cpu`` backend, the eager
reference (LayerNorm + explicit softmax), torch LayerNorm + ``F.scaled_dot_product_attention``,
and ``torch.compile`` of the latter. ``python -m benchmarks.report_qk_norm_attention`` runs the
same comparisons and writes a table with ratios.
"""

from __future__ import annotations

import pytest

from benchmarks.report_qk_norm_attention import (
    CPU_SHAPES,
    IMPLS,
    MODES,
    Inputs,
    implementations,
    step,
)


@pytest.fixture(scope="module", params=[(s, m) for s in CPU_SHAPES for m in MODES],
                ids=lambda p: "{}-B{}-H{}-N{}-D{}".format(p[1], *p[0]))  # fmt: skip
def case(request):
    """Inputs and implementations (torch.compile already compiled) for one shape and mode."""
    shape, mode = request.param
    inputs = Inputs.make(shape, requires_grad=mode != "forward")
    return {"shape": shape, "mode": mode, "inputs": inputs, "impls": implementations(inputs)}


@pytest.mark.parametrize("impl", IMPLS)
def test_qk_norm_attention(benchmark, case, impl):
    b, h, n, d = case["shape"]
    benchmark.group = f"qk_norm_attention {case['mode']} B={b} H={h} N={n} D={d}"
    benchmark.extra_info.update(impl=impl, mode=case["mode"], B=b, H=h, N=n, D=d, dtype="float32")
    fn = case["impls"][impl]
    if isinstance(fn, str):
        pytest.skip(fn)  # e.g. "torch.compile failed: <error>"
    benchmark(step, fn, case["inputs"], case["mode"])
