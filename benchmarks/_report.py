"""Shared by the benchmark runners (bench_vq.py, report_cpu.py, gpu.py).

- The implementations compared: eegfast ops, torch eager and ``torch.compile`` matmul + argmax,
  and the reference LaBraM recipe (imported from :mod:`eegfast.ops.vq`, never copied).
- :func:`run_vq_cases`: every comparison over shapes and dtypes, with the timer passed in
  (median of ``time.perf_counter`` runs on CPU, ``triton.testing.do_bench`` on GPU).
- :func:`environment`: what the numbers were measured on (CPU/GPU, versions, git commit).
- :func:`write_results`: JSON, Markdown table with ratios, and a PNG bar plot.
- :func:`interleaved_times`: round-robin timing of several callables (CPU comparisons).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

import eegfast
from eegfast.fileio import write_bytes_atomic, write_text_atomic
from eegfast.ops import vq_ema_update, vq_nearest, vq_nearest_reference
from eegfast.ops.vq import labram_recipe_ema, labram_recipe_lookup

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECK_ROWS = 256  # rows of every lookup result compared with vq_nearest_reference
EMA_TOLERANCE = 1e-3  # a code's largest difference from the float64 EMA step (unit-norm codes)

# --------------------------------------------------------------------------------------------
# What is compared.
# --------------------------------------------------------------------------------------------


def unit_rows(n: int, d: int, generator: torch.Generator, device="cpu", dtype=torch.float32):
    """(n, d) random rows of unit l2 norm, as the tokenizer's normalised encoder outputs."""
    rows = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    return rows.to(device=device, dtype=dtype)


def matmul_argmax(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch nearest code by cosine for unit-norm rows: one matmul, then argmax."""
    return (z @ codebook.T).argmax(1)


def eegfast_lookup(z: torch.Tensor, codebook: torch.Tensor, *, backend: str) -> torch.Tensor:
    return vq_nearest(z, codebook, "cosine", backend=backend)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    clocks: Sequence[Callable[[], float]] = (time.perf_counter,),
    warmup: int = 2,
) -> dict[str, list[tuple[float, ...]] | Exception]:
    """Seconds per call of each callable under each clock, timed round-robin: every round
    runs each callable once in turn, so load from other processes on a shared machine hits
    all of them alike and their ratios stay meaningful. ``warmup`` untimed rounds come first.
    A callable that raises is left out of the later rounds; its exception is its result."""
    results: dict[str, list[tuple[float, ...]] | Exception] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            times = results[name]
            if isinstance(times, Exception):
                continue
            start = [clock() for clock in clocks]
            try:
                fn()
            except Exception as failure:  # recorded; the others go on
                results[name] = failure
                continue
            if round_ >= warmup:
                times.append(tuple(clock() - s for clock, s in zip(clocks, start, strict=True)))
    return results


def error_line(error: Exception) -> str:
    """``Type: first line of the message`` (at most 300 characters of it)."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first_line}"


def lookup_impls(
    backends: Sequence[str], z: torch.Tensor, codebook: torch.Tensor
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str]:
    """Lookup implementations by name; a str value is the reason the implementation cannot run.

    ``torch-compile`` is compiled here, by one call on ``(z, codebook)``, so that timing it
    later excludes compilation.
    """
    impls: dict[str, Callable | str] = {
        f"eegfast-{backend}": functools.partial(eegfast_lookup, backend=backend)
        for backend in backends
    }
    impls["torch-eager"] = matmul_argmax
    compiled = torch.compile(matmul_argmax, dynamic=False)
    try:
        compiled(z, codebook)
        impls["torch-compile"] = compiled
    except Exception as error:  # any compiler failure is recorded, not raised
        impls["torch-compile"] = f"torch.compile failed: {error_line(error)}"
    impls["labram-recipe"] = labram_recipe_lookup
    return impls


@dataclass
class EmaState:
    """Codebook (K, D) float32 with its EMA counts (K,) and sums (K, D), updated in place."""

    codebook: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor

    @classmethod
    def start(cls, codebook: torch.Tensor, num_rows: int) -> EmaState:
        """A consistent state (``embed_sum / cluster_size == codebook``) with every code having
        seen ``num_rows / K`` rows, as after a k-means initialisation."""
        codebook = codebook.float()
        cluster_size = torch.full(
            (codebook.shape[0],), num_rows / codebook.shape[0], device=codebook.device
        )
        return cls(codebook.clone(), cluster_size, codebook * cluster_size[:, None])

    def clone(self) -> EmaState:
        return EmaState(self.codebook.clone(), self.cluster_size.clone(), self.embed_sum.clone())

    def copy_(self, other: EmaState) -> None:
        self.codebook.copy_(other.codebook)
        self.cluster_size.copy_(other.cluster_size)
        self.embed_sum.copy_(other.embed_sum)


def eegfast_lookup_ema(z: torch.Tensor, state: EmaState, *, backend: str) -> None:
    """One tokenizer step with eegfast: exact lookup, then the one-hot-free EMA update."""
    indices = vq_nearest(z, state.codebook.to(z.dtype), "cosine", backend=backend)
    vq_ema_update(z, indices, state.codebook, state.cluster_size, state.embed_sum, backend=backend)


def recipe_lookup_ema(z: torch.Tensor, state: EmaState) -> None:
    """One tokenizer step with the reference recipe: distance matrix, argmin, one-hot EMA."""
    indices = labram_recipe_lookup(z, state.codebook.to(z.dtype))
    labram_recipe_ema(z, indices, state.codebook, state.cluster_size, state.embed_sum)


def ema_impls(backends: Sequence[str]) -> dict[str, Callable[[torch.Tensor, EmaState], None]]:
    impls: dict[str, Callable] = {
        f"eegfast-{backend}": functools.partial(eegfast_lookup_ema, backend=backend)
        for backend in backends
    }
    impls["labram-recipe"] = recipe_lookup_ema
    return impls


def reference_match(
    indices: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, rows: int = CHECK_ROWS
) -> str:
    """'matching/rows': how many of the first ``rows`` indices equal vq_nearest_reference."""
    rows = min(rows, z.shape[0])
    expected, _ = vq_nearest_reference(z[:rows], codebook, "cosine")
    return f"{int((indices[:rows].cpu() == expected.cpu()).sum())}/{rows}"


def ema_reference_step(z: torch.Tensor, initial: EmaState, decay: float = 0.99, eps: float = 1e-5):
    """(codebook, cluster_size) in float64 after one lookup + EMA step from ``initial``: codes
    by :func:`vq_nearest_reference` against the codebook in z's dtype (as both implementations
    look up), the recipe's update by bincount and index_add (no (N, K) one-hot)."""
    codes = initial.codebook.to(z.dtype)
    indices, _ = vq_nearest_reference(z, codes, "cosine")
    k = codes.shape[0]
    z64 = z.double()
    counts = torch.bincount(indices, minlength=k).double()
    sums = torch.zeros(k, z.shape[1], dtype=torch.float64, device=z.device)
    sums.index_add_(0, indices, z64)
    cluster_size = decay * initial.cluster_size.double() + (1 - decay) * counts
    embed_sum = decay * initial.embed_sum.double() + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    codebook = torch.nn.functional.normalize(embed_sum / smoothed[:, None], dim=1)
    return codebook, cluster_size


def ema_match(step: Callable, z: torch.Tensor, initial: EmaState) -> str:
    """'matching/K': codes whose vector and EMA count, after one ``step`` from ``initial``, are
    within EMA_TOLERANCE of :func:`ema_reference_step` (a lookup that differs from the
    reference's on near-ties moves the two codes concerned)."""
    state = initial.clone()
    step(z, state)
    codebook, cluster_size = ema_reference_step(z, initial)
    code_error = (state.codebook.double() - codebook).abs().amax(1)
    count_error = (state.cluster_size.double() - cluster_size).abs()
    ok = (code_error <= EMA_TOLERANCE) & (count_error <= EMA_TOLERANCE * (1 + cluster_size))
    return f"{int(ok.sum())}/{codebook.shape[0]}"


# --------------------------------------------------------------------------------------------
# Running the comparisons.
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One measured (or skipped) implementation of one op at one shape and dtype."""

    op: str  # "lookup" or "lookup+ema"
    impl: str  # "eegfast-cpu", "torch-eager", "labram-recipe", ...
    n: int
    k: int
    d: int
    dtype: str
    ms: float | None  # median time; None if the implementation could not run
    # lookup: "256/256", first rows equal to vq_nearest_reference; lookup+ema: "8192/8192",
    # codes within EMA_TOLERANCE of ema_reference_step
    matches_reference: str | None = None
    note: str = ""

    @property
    def group(self) -> tuple:
        return (self.op, self.n, self.k, self.d, self.dtype)

    @property
    def is_eegfast(self) -> bool:
        return self.impl.startswith("eegfast")


# timer(fn, reset) -> median milliseconds of fn(); reset (or None) restores the state fn changes.
Timer = Callable[[Callable[[], object], Callable[[], object] | None], float]


def _time_lookup(timer: Timer, fn: Callable, z: torch.Tensor, codebook: torch.Tensor):
    indices = fn(z, codebook)  # also the warm-up
    ms = timer(functools.partial(fn, z, codebook), None)
    return ms, reference_match(indices, z, codebook)


def _time_step(timer: Timer, step: Callable, z: torch.Tensor, initial: EmaState):
    state = initial.clone()
    ms = timer(functools.partial(step, z, state), functools.partial(state.copy_, initial))
    # the timed rows of lookup+ema must be right too: a step from a fresh copy, checked
    return ms, ema_match(step, z, initial)


def _measure(op: str, impl: str, case: dict, measure: Callable, *args) -> Result:
    """Result of ``measure(*args) -> (ms, matches_reference)``, or of its failure."""
    try:
        ms, match = measure(*args)
    except Exception as error:  # recorded in the results; the other implementations go on
        return Result(op, impl, **case, ms=None, note=f"failed: {error_line(error)}")
    return Result(op, impl, **case, ms=ms, matches_reference=match)


def run_vq_cases(
    shapes: Sequence[tuple[int, int, int]],
    dtypes: Sequence[torch.dtype],
    device: str,
    backends: Sequence[str],
    timer: Timer,
    *,
    progress: Callable[[str], None] = print,
    on_result: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Time lookup and lookup+EMA for every shape (N, K, D) and dtype with every implementation.

    Inputs are random unit-norm rows (seed 0). The first ``CHECK_ROWS`` indices of each lookup
    are compared with :func:`vq_nearest_reference` (float64), and the state after one lookup +
    EMA step with :func:`ema_reference_step` (:func:`ema_match`). ``on_result(results so far)``
    is called after every result (the GPU runner writes its tables there, so that a run stopped
    at its time limit keeps the rows it finished).
    """
    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        if on_result is not None:
            on_result(results)

    for n, k, d in shapes:
        for dtype in dtypes:
            generator = torch.Generator().manual_seed(0)
            z = unit_rows(n, d, generator, device, dtype)
            codebook = unit_rows(k, d, generator, device, dtype)
            case = dict(n=n, k=k, d=d, dtype=str(dtype).removeprefix("torch."))
            for name, fn in lookup_impls(backends, z, codebook).items():
                progress(f"lookup     {name:16s} {case}")
                if isinstance(fn, str):
                    add(Result("lookup", name, **case, ms=None, note=fn))
                else:
                    add(_measure("lookup", name, case, _time_lookup, timer, fn, z, codebook))
            initial = EmaState.start(codebook, n)
            for name, step in ema_impls(backends).items():
                progress(f"lookup+ema {name:16s} {case}")
                add(_measure("lookup+ema", name, case, _time_step, timer, step, z, initial))
    return results


# --------------------------------------------------------------------------------------------
# Where it ran.
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(*, gpu: bool = False) -> dict[str, object]:
    """CPU, thread count, versions and git commit; with ``gpu``, also the GPU and CUDA/Triton."""
    env: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "eegfast": eegfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings: the 1-minute load when this was taken.
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if gpu:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "not installed"
        major, minor = torch.cuda.get_device_capability()
        env.update(
            gpu=torch.cuda.get_device_name(),
            gpu_capability=f"sm_{major}{minor}",
            cuda=torch.version.cuda,
            triton=triton_version,
        )
    return env


# --------------------------------------------------------------------------------------------
# Writers.
# --------------------------------------------------------------------------------------------


def ratios(results: Sequence[Result]) -> list[float | None]:
    """For each result: its time over the fastest eegfast time in its group (op, shape, dtype).

    Above 1: eegfast is that many times faster. None where either time is missing.
    """
    best: dict[tuple, float] = {}
    for r in results:
        if r.is_eegfast and r.ms is not None:
            best[r.group] = min(best.get(r.group, math.inf), r.ms)
    return [r.ms / best[r.group] if r.ms is not None and r.group in best else None for r in results]


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| op | N | K | D | dtype | implementation | median ms "
        "| ratio (this / best eegfast) | matches reference | note |",
        "|---|---:|---:|---:|---|---|---:|---:|---|---|",
    ]
    for r, ratio in zip(results, ratios(results), strict=True):
        ms = "—" if r.ms is None else f"{r.ms:.3f}"
        shown_ratio = "—" if ratio is None else f"{ratio:.2f}×"
        note = r.note.replace("|", "\\|")
        lines.append(
            f"| {r.op} | {r.n} | {r.k} | {r.d} | {r.dtype} | {r.impl} | {ms} | {shown_ratio} "
            f"| {r.matches_reference or '—'} | {note} |"
        )
    return "\n".join(lines)


def markdown_report(title: str, env: dict[str, object], results: Sequence[Result]) -> str:
    env_lines = "\n".join(f"- {key}: {value}" for key, value in env.items())
    return (
        f"# {title}\n\n{env_lines}\n\n"
        "Ratio = this row's median time / the fastest eegfast time for the same op, shape and "
        'dtype: above 1 means eegfast is that many times faster. "matches reference": lookup, '
        f"how many of the first {CHECK_ROWS} indices equal the float64 `vq_nearest_reference`; "
        "lookup+ema, how many codes (vector and EMA count) are within "
        f"{EMA_TOLERANCE:g} of a float64 step from the reference's codes.\n\n"
        f"{markdown_table(results)}\n"
    )


def plot_results(results: Sequence[Result], path: Path, title: str) -> None:
    """Grouped bar chart of median times (log scale), one group per op/shape/dtype."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(r.group for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    width = 0.8 / max(len(impls), 1)
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, impl in enumerate(impls):
        times = {r.group: r.ms for r in results if r.impl == impl and r.ms is not None}
        xs = [g for g, group in enumerate(groups) if group in times]
        ax.bar(
            [x + (i - (len(impls) - 1) / 2) * width for x in xs],
            [times[groups[x]] for x in xs],
            width,
            label=impl,
        )
    ax.set_xticks(
        range(len(groups)),
        [f"{op}\nN={n} K={k}\nD={d} {dtype}" for op, n, k, d, dtype in groups],
        fontsize=7,
    )
    if any(r.ms for r in results):
        ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    # atomic, as the tables: a run stopped while saving leaves the previous plot
    write_bytes_atomic(path, buffer.getvalue())


def write_results(
    out_dir: Path | str,
    name: str,
    title: str,
    env: dict[str, object],
    results: Sequence[Result],
    *,
    png: bool = True,
) -> dict[str, Path]:
    """Write ``name``.json, ``name``.md and (with ``png``) ``name``.png into ``out_dir``;
    returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {suffix: out / f"{name}.{suffix}" for suffix in ("json", "md", "png")}
    records = [
        {**asdict(r), "ratio_vs_eegfast": ratio}
        for r, ratio in zip(results, ratios(results), strict=True)
    ]
    # atomic: a stage killed at its time limit leaves the previous tables, never half of one
    write_text_atomic(
        paths["json"],
        json.dumps({"title": title, "environment": env, "results": records}, indent=2) + "\n",
    )
    write_text_atomic(paths["md"], markdown_report(title, env, results))
    if png:
        plot_results(results, paths["png"], title)
    return paths
