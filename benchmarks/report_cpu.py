"""CPU comparison of eegfast's VQ ops with PyTorch and the reference LaBraM recipe.

Run from the repository root::

    python -m benchmarks.report_cpu [--out bench-results] [--repeats 5]

Writes ``cpu_vq.json``, ``cpu_vq.md`` (table with ratios) and ``cpu_vq.png`` into ``--out``.
Times are medians of ``--repeats`` runs with ``time.perf_counter`` after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks._report import environment, run_vq_cases, write_results

# (N, K, D): a tokenizer batch against the LaBraM codebook; code dim 32 (code default) and 64.
CPU_SHAPES = ((4096, 8192, 32), (4096, 8192, 64))


def median_ms(fn: Callable[[], object], reset: Callable[[], object] | None, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs after one warm-up; ``reset``
    runs before each, untimed."""
    times = []
    for _ in range(repeats + 1):
        if reset is not None:
            reset()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report_cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    args = parser.parse_args(argv)

    env = environment()
    print(f"CPU: {env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}")
    results = run_vq_cases(
        CPU_SHAPES,
        [torch.float32],
        "cpu",
        ["cpu"],
        lambda fn, reset: median_ms(fn, reset, args.repeats),
    )
    paths = write_results(args.out, "cpu_vq", "eegfast VQ on CPU", env, results)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
