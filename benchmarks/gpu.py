"""GPU comparison of eegfast's VQ ops (CUDA and Triton backends) with PyTorch and the recipe.

Run from the repository root on a machine with a CUDA device::

    python -m benchmarks.gpu [--out bench-results] [--ops vq]

For N=32768 rows, K=8192 codes, D in (32, 64), fp32 and bf16: lookup (eegfast "cuda" and
"triton", each if ``eegfast.ops.available_backends()`` says it is usable; torch eager matmul +
argmax; ``torch.compile`` of it; ``labram_recipe_lookup``) and lookup + EMA update (eegfast vs
``labram_recipe_lookup`` + ``labram_recipe_ema``). Times are medians from
``triton.testing.do_bench``. The first 256 indices of every lookup are checked against
``vq_nearest_reference``. Writes ``gpu_vq.json``, ``gpu_vq.md`` and ``gpu_vq.png`` into ``--out``;
the .json and .md are rewritten after every row, so a run stopped at its time limit keeps the
rows it finished.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable

import torch

from benchmarks._profile import profile_section, write_kernel_tables
from benchmarks._report import environment, run_vq_cases, write_results
from eegfast.ops import available_backends

GPU_SHAPES = ((32768, 8192, 32), (32768, 8192, 64))
GPU_DTYPES = (torch.float32, torch.bfloat16)


def do_bench_timer(fn: Callable[[], object], reset: Callable[[], object] | None) -> float:
    """Median ms of ``fn()`` by ``triton.testing.do_bench``.

    do_bench cannot run an untimed setup, so for ops that change their state (the EMA update)
    ``reset(); fn()`` is timed and the median of ``reset()`` alone is subtracted.
    """
    from triton.testing import do_bench

    if reset is None:
        return do_bench(fn, return_mode="median")

    def reset_then_fn() -> None:
        reset()
        fn()

    return do_bench(reset_then_fn, return_mode="median") - do_bench(reset, return_mode="median")


def run_vq(on_result: Callable[[list], None] | None = None) -> list:
    """The VQ rows; ``on_result(rows so far)`` after every row (the tables are written there)."""
    statuses = available_backends()
    backends = [name for name in ("cuda", "triton") if statuses[name].available]
    for name in ("cuda", "triton"):
        print(f"eegfast backend {name}: {statuses[name]}")
    return run_vq_cases(
        GPU_SHAPES, GPU_DTYPES, "cuda", backends, do_bench_timer, on_result=on_result
    )


def vq_kernel_breakdown() -> str:
    """Markdown: the kernels of eegfast's lookup + EMA step per backend (bf16, D = 32)."""
    from benchmarks._report import EmaState, eegfast_lookup_ema, unit_rows

    statuses = available_backends()
    N, K, D = GPU_SHAPES[0]
    gen = torch.Generator().manual_seed(0)
    z = unit_rows(N, D, gen, "cuda", torch.bfloat16)
    codebook = unit_rows(K, D, gen, "cuda", torch.float32)
    sections = []
    for backend in ("cuda", "triton"):
        if statuses[backend].available:
            state = EmaState.start(codebook, N)
            step = functools.partial(eegfast_lookup_ema, z, state, backend=backend)
            title = f"eegfast-{backend} lookup + EMA, {(N, K, D)} bf16"
            sections.append(profile_section(title, step))
    return "\n".join(sections)


OPS = {"vq": run_vq}
BREAKDOWNS = {"vq": vq_kernel_breakdown}


def run_qk_norm_attention(out_dir: str, env: dict) -> dict:
    from benchmarks import gpu_qk_norm_attention

    return gpu_qk_norm_attention.run(out_dir, env)


def run_moe(out_dir: str, env: dict) -> dict:
    from benchmarks import gpu_moe

    return gpu_moe.run(out_dir, env)


# Ops whose benchmark module writes its own table and plot: name -> run(out_dir, env) -> paths.
SELF_WRITING_OPS = {"qk_norm_attention": run_qk_norm_attention, "moe": run_moe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument(
        "--ops", nargs="+", choices=sorted({*OPS, *SELF_WRITING_OPS}), default=["vq"]
    )
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            f"benchmarks.gpu needs a CUDA device, and torch {torch.__version__} sees none "
            f"(torch.version.cuda={torch.version.cuda}). Run it on a GPU machine; "
            "for CPU numbers use `python -m benchmarks.report_cpu`.",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec("triton") is None:
        print("benchmarks.gpu needs triton (for triton.testing.do_bench)", file=sys.stderr)
        return 2

    env = environment(gpu=True)
    print(f"GPU: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}")
    for op in args.ops:
        if op in SELF_WRITING_OPS:
            paths = SELF_WRITING_OPS[op](args.out, env)
            print(paths["md"].read_text())
            print("wrote " + ", ".join(str(p) for p in paths.values()))
            continue
        name, title = f"gpu_{op}", f"eegfast {op} on {env['gpu']}"

        def partial(results: list, name: str = name, title: str = title) -> None:
            # the table so far, after every row (no plot: a second per write): a stage stopped
            # at its time limit keeps the rows it finished
            write_results(args.out, name, f"{title} (partial: the run goes on)", env, results,
                          png=False)  # fmt: skip

        results = OPS[op](partial)
        paths = write_results(args.out, name, title, env, results)
        paths["kernels"] = write_kernel_tables(
            args.out, f"gpu_{op}", f"eegfast {op}", BREAKDOWNS[op]()
        )
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
