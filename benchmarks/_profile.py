"""Where a benchmarked step spends its time, kernel by kernel (torch.profiler).

The GPU benchmarks time whole steps; a lent GPU is scarce, so each run also records which
kernels the eegfast rows launch and how long each takes, to direct the next change without a
second run. :func:`kernel_times` profiles a callable; :func:`kernel_table` renders the result.
On CPU the profiler reports operators instead of kernels (used by the tests and ``--smoke``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eegfast.fileio import write_text_atomic


@dataclass
class KernelTime:
    name: str
    ms: float  # per call of the profiled callable
    launches: float  # per call


def kernel_times(fn: Callable[[], object], iterations: int = 10) -> list[KernelTime]:
    """Device time per kernel (CPU: per operator) of one ``fn()``, largest first.

    ``fn`` runs once untimed (compilation, autotuning), then ``iterations`` times under the
    profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(iterations):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    times = []
    for event in prof.key_averages():
        if on_gpu:
            total_us = getattr(event, "self_device_time_total", 0.0)
        else:
            total_us = event.self_cpu_time_total
        if total_us > 0:
            ms = total_us / iterations / 1e3
            times.append(KernelTime(event.key, ms, event.count / iterations))
    return sorted(times, key=lambda t: t.ms, reverse=True)


def kernel_table(title: str, times: Sequence[KernelTime], top: int = 20) -> str:
    """Markdown: the ``top`` kernels by time, with their share of the profiled total."""
    total = sum(t.ms for t in times) or float("nan")
    lines = [
        f"### {title}",
        "",
        f"Profiled total {total:.3f} ms per call: self time of the GPU kernels (on CPU, of the "
        "operators), not wall time.",
        "",
        "| kernel | ms per call | share | launches per call |",
        "|---|---:|---:|---:|",
    ]
    for t in times[:top]:
        name = t.name if len(t.name) <= 90 else t.name[:87] + "..."
        name = name.replace("|", "\\|")
        lines.append(f"| `{name}` | {t.ms:.4f} | {t.ms / total:.1%} | {t.launches:g} |")
    if len(times) > top:
        rest = sum(t.ms for t in times[top:])
        lines.append(f"| {len(times) - top} others | {rest:.4f} | {rest / total:.1%} | |")
    return "\n".join(lines) + "\n"


def write_kernel_tables(out_dir: Path | str, name: str, title: str, sections: str) -> Path:
    """``out_dir``/``name``_kernels.md: the :func:`profile_section` tables of one benchmark."""
    path = Path(out_dir) / f"{name}_kernels.md"
    write_text_atomic(path, f"# Kernels of {title}\n\n{sections}")
    return path


def profile_section(title: str, fn: Callable[[], object], iterations: int = 10) -> str:
    """:func:`kernel_table` of ``fn``, or a line saying why it could not be profiled."""
    try:
        return kernel_table(title, kernel_times(fn, iterations))
    except Exception as error:  # a report line, not a failed benchmark run
        return f"### {title}\n\nnot profiled: {type(error).__name__}: {error}\n"
