"""pytest-benchmark suite of the VQ ops on CPU, against PyTorch and the reference LaBraM recipe.

Run from the repository root::

    pytest benchmarks/bench_vq.py --benchmark-only

Each group (one op at one shape) shows side by side: eegfast ``cpu`` backend, torch eager
matmul + argmax, ``torch.compile`` of it, and ``labram_recipe_lookup``; and for lookup + EMA
update, eegfast (``vq_nearest`` + ``vq_ema_update``) against the recipe
(``labram_recipe_lookup`` + ``labram_recipe_ema``). ``python -m benchmarks.report_cpu`` runs
the same comparisons and writes a table with ratios.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._report import (
    EmaState,
    ema_impls,
    lookup_impls,
    reference_match,
    unit_rows,
)
from benchmarks.report_cpu import CPU_SHAPES

SLOW = {"labram-recipe"}  # few rounds, so the suite stays within ~2 minutes on 2 cores


@pytest.fixture(scope="module", params=CPU_SHAPES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def case(request):
    """Inputs and lookup implementations (torch.compile already compiled) for one shape."""
    n, k, d = request.param
    generator = torch.Generator().manual_seed(0)
    z, codebook = unit_rows(n, d, generator), unit_rows(k, d, generator)
    return {
        "shape": (n, k, d),
        "z": z,
        "codebook": codebook,
        "lookups": lookup_impls(["cpu"], z, codebook),
    }


def _describe(benchmark, op: str, impl: str, case) -> None:
    n, k, d = case["shape"]
    benchmark.group = f"{op} N={n} K={k} D={d}"
    benchmark.extra_info.update(
        op=op, impl=impl, N=n, K=k, D=d, dtype="float32", threads=torch.get_num_threads()
    )


@pytest.mark.parametrize("impl", ["eegfast-cpu", "torch-eager", "torch-compile", "labram-recipe"])
def test_lookup(benchmark, case, impl):
    _describe(benchmark, "lookup", impl, case)
    fn = case["lookups"][impl]
    if isinstance(fn, str):
        pytest.skip(fn)  # e.g. "torch.compile failed: <error>"
    args = (case["z"], case["codebook"])
    if impl in SLOW:
        indices = benchmark.pedantic(fn, args=args, rounds=3, warmup_rounds=1)
    else:
        indices = benchmark(fn, *args)
    benchmark.extra_info["matches_reference_first_rows"] = reference_match(indices, *args)


@pytest.mark.parametrize("impl", ["eegfast-cpu", "labram-recipe"])
def test_lookup_ema(benchmark, case, impl):
    _describe(benchmark, "lookup+ema", impl, case)
    step = ema_impls(["cpu"])[impl]
    z, initial = case["z"], EmaState.start(case["codebook"], case["z"].shape[0])

    def fresh_state():  # untimed: every round starts from the same codebook and EMA state
        return (z, initial.clone()), {}

    rounds = 3 if impl in SLOW else 7
    benchmark.pedantic(step, setup=fresh_state, rounds=rounds, warmup_rounds=1)
