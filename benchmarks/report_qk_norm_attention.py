"""CPU comparison of eegfast's fused QK-LayerNorm attention with PyTorch.

Run from the repository root::

    python -m benchmarks.report_qk_norm_attention [--out bench-results] [--repeats 20]
        [--clock wall|cpu] [--threads N] [--name cpu_qk_norm_attention]
        [--only eegfast-cpu,torch-ln-sdpa]

Compares, forward and forward+backward, at LaBraM-Base's attention shape on CPU:
``eegfast-cpu`` (C++ kernel), ``eager-reference`` (:func:`qk_norm_attention_reference`:
LayerNorm + explicit masked softmax), ``torch-ln-sdpa`` (``F.layer_norm`` +
``F.scaled_dot_product_attention``) and ``torch-compile-ln-sdpa`` (``torch.compile`` of the
latter). Writes ``cpu_qk_norm_attention.{json,md,png}`` into ``--out``: median and minimum
wall times, and each row's ratio to eegfast (above 1: eegfast is that many times faster). Every
row's output is compared with the float64 reference, and in forward+backward its gradients too.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._report import environment, error_line, interleaved_times
from benchmarks.gpu_qk_norm_attention import relative_grad_error
from eegfast.fileio import write_bytes_atomic
from eegfast.ops import qk_norm_attention, qk_norm_attention_reference

# (B, H, N, D): LaBraM-Base (10 heads of 20) on 256 patches + cls, batch 8.
CPU_SHAPES = ((8, 10, 257, 20),)
IMPLS = ("eegfast-cpu", "eager-reference", "torch-ln-sdpa", "torch-compile-ln-sdpa")
MODES = ("forward", "forward+backward")
EPS = 1e-6


@dataclass
class Inputs:
    """q, k, v (B, H, N, D) and the four LayerNorm parameters (D,), float32, seed 0."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: tuple[torch.Tensor, ...]
    grad_out: torch.Tensor

    @classmethod
    def make(cls, shape: tuple[int, int, int, int], *, requires_grad: bool) -> Inputs:
        gen = torch.Generator().manual_seed(0)
        d = shape[-1]
        q, k, v = (torch.randn(shape, generator=gen).requires_grad_(requires_grad) for _ in "qkv")
        params = tuple(
            (1 + 0.1 * torch.randn(d, generator=gen)).requires_grad_(requires_grad)
            for _ in range(4)
        )
        return cls(q, k, v, params, torch.randn(shape, generator=gen))

    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, *self.params]


def eegfast_cpu(q, k, v, qw, qb, kw, kb):
    return qk_norm_attention(q, k, v, qw, qb, kw, kb, eps=EPS, backend="cpu")


def eager_reference(q, k, v, qw, qb, kw, kb):
    return qk_norm_attention_reference(q, k, v, qw, qb, kw, kb, eps=EPS)


def layer_norm_sdpa(q, k, v, qw, qb, kw, kb):
    """What a user writes without eegfast: torch LayerNorm kernels, then fused SDPA."""
    d = q.shape[-1]
    qn = F.layer_norm(q, (d,), qw, qb, EPS)
    kn = F.layer_norm(k, (d,), kw, kb, EPS)
    return F.scaled_dot_product_attention(qn, kn, v)


def implementations(inputs: Inputs, only: Sequence[str] = IMPLS) -> dict[str, Callable | str]:
    """Implementations by name (those in ``only``); a str value says why one cannot run.
    torch.compile is compiled (and its backward too, when inputs require grad) before anything
    is timed."""
    impls: dict[str, Callable | str] = {
        name: fn
        for name, fn in (
            ("eegfast-cpu", eegfast_cpu),
            ("eager-reference", eager_reference),
            ("torch-ln-sdpa", layer_norm_sdpa),
        )
        if name in only
    }
    if "torch-compile-ln-sdpa" not in only:
        return impls
    compiled = torch.compile(layer_norm_sdpa, dynamic=False)
    try:
        out = compiled(inputs.q, inputs.k, inputs.v, *inputs.params)
        if out.requires_grad:
            out.backward(inputs.grad_out)
        impls["torch-compile-ln-sdpa"] = compiled
    except Exception as error:  # recorded in the results, not raised
        impls["torch-compile-ln-sdpa"] = f"torch.compile failed: {error_line(error)}"
    return impls


def step(fn: Callable, inputs: Inputs, mode: str) -> None:
    """One forward (no autograd graph), or one forward + backward."""
    if mode == "forward":
        with torch.no_grad():
            fn(inputs.q, inputs.k, inputs.v, *inputs.params)
        return
    for leaf in inputs.leaves():
        leaf.grad = None
    out = fn(inputs.q, inputs.k, inputs.v, *inputs.params)
    out.backward(inputs.grad_out)


def max_error(fn: Callable, inputs: Inputs) -> float:
    """Largest |output - float64 reference| (forward), a check that every row computed the
    same thing."""
    with torch.no_grad():
        out = fn(inputs.q, inputs.k, inputs.v, *inputs.params)
        expected = eager_reference(
            *(t.double() for t in (inputs.q, inputs.k, inputs.v, *inputs.params))
        )
    return float((out.double() - expected).abs().max())


def max_grad_error(fn: Callable, inputs: Inputs) -> float:
    """Largest error of the gradients of q, k, v and the four LayerNorm parameters against the
    float64 reference's (same grad_out), relative as in :func:`relative_grad_error`: the
    forward+backward rows time the backward, which the forward's check does not cover."""
    leaves = inputs.leaves()
    for leaf in leaves:
        leaf.grad = None
    fn(inputs.q, inputs.k, inputs.v, *inputs.params).backward(inputs.grad_out)
    grads = [leaf.grad for leaf in leaves]
    reference = [leaf.detach().double().requires_grad_() for leaf in leaves]
    eager_reference(*reference).backward(inputs.grad_out.double())
    for leaf in leaves:
        leaf.grad = None
    return relative_grad_error(grads, [leaf.grad for leaf in reference])


@dataclass
class Row:
    shape: tuple[int, int, int, int]
    mode: str
    impl: str
    median_ms: float | None
    min_ms: float | None
    max_abs_error: float | None
    note: str = ""
    max_grad_error: float | None = None  # forward+backward only


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_cases(
    repeats: int,
    clock: str = "wall",
    *,
    only: Sequence[str] = IMPLS,
    progress: Callable[[str], None] = print,
) -> list[Row]:
    """Each shape and mode: the implementations (those in ``only``) timed round-robin
    (``interleaved_times``), median and minimum in ms. ``clock="cpu"`` measures this process's
    CPU time (all threads), which other processes on a shared machine disturb less than wall
    time. Fewer implementations in the round-robin disturb each other's caches less."""
    rows = []
    for shape in CPU_SHAPES:
        for mode in MODES:
            progress(f"{mode:17s} {shape}: {', '.join(only)}")
            inputs = Inputs.make(shape, requires_grad=mode != "forward")
            impls = implementations(inputs, only)
            runnable = {
                name: functools.partial(step, fn, inputs, mode)
                for name, fn in impls.items()
                if not isinstance(fn, str)
            }
            timed = interleaved_times(runnable, repeats, (CLOCKS[clock],))
            for name, fn in impls.items():
                times = fn if isinstance(fn, str) else timed[name]
                if isinstance(times, str | Exception):
                    note = times if isinstance(times, str) else error_line(times)
                    rows.append(Row(shape, mode, name, None, None, None, note))
                    continue
                ms = [t[0] * 1e3 for t in times]
                error = max_error(fn, inputs)
                grad_error = None if mode == "forward" else max_grad_error(fn, inputs)
                rows.append(Row(shape, mode, name, statistics.median(ms), min(ms), error,
                                max_grad_error=grad_error))  # fmt: skip
    return rows


def ratios(rows: list[Row]) -> list[float | None]:
    """Median time over eegfast-cpu's median for the same shape and mode."""
    ours = {(r.shape, r.mode): r.median_ms for r in rows if r.impl == "eegfast-cpu"}
    result = []
    for r in rows:
        base = ours.get((r.shape, r.mode))
        result.append(r.median_ms / base if r.median_ms and base else None)
    return result


def markdown(title: str, env: dict[str, object], rows: list[Row]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        "",
        "Ratio = this row's median / eegfast-cpu's median for the same shape and mode: above 1 "
        "means eegfast is that many times faster. Max abs error: forward output against the "
        "float64 reference; max grad error (forward+backward): largest gradient error (q, k, v, "
        "LayerNorm parameters) against the float64 reference's, relative to the largest "
        "reference gradient of its kind. The implementations of one shape and mode are timed "
        "round-robin (one call of each in turn), so load from other processes (see "
        "load_average_1m) hits them alike; compare rows of one run only.",
        "",
        "| B, H, N, D | mode | implementation | median ms | min ms | ratio | max abs error "
        "| max grad error | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r, ratio in zip(rows, ratios(rows), strict=True):

        def fmt(x, spec):
            return "—" if x is None else format(x, spec)

        lines.append(
            f"| {', '.join(map(str, r.shape))} | {r.mode} | {r.impl} | {fmt(r.median_ms, '.2f')} "
            f"| {fmt(r.min_ms, '.2f')} | {fmt(ratio, '.2f')}{'×' if ratio else ''} "
            f"| {fmt(r.max_abs_error, '.1e')} | {fmt(r.max_grad_error, '.1e')} "
            f"| {r.note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys((r.shape, r.mode) for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    width = 0.8 / len(impls)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, impl in enumerate(impls):
        times = {(r.shape, r.mode): r.median_ms for r in rows if r.impl == impl and r.median_ms}
        xs = [g for g, group in enumerate(groups) if group in times]
        offset = (i - (len(impls) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [times[groups[x]] for x in xs], width,
               label=impl)  # fmt: skip
    ax.set_xticks(range(len(groups)), [f"{mode}\n{shape}" for shape, mode in groups], fontsize=8)
    ax.set_ylabel("median wall time (ms)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    write_bytes_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report_qk_norm_attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what is timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--name", default="cpu_qk_norm_attention", help="output file stem")
    parser.add_argument(
        "--only",
        default=",".join(IMPLS),
        help=f"comma-separated implementations to time, eegfast-cpu among them (default: "
        f"all of {', '.join(IMPLS)})",
    )
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in IMPLS]
    if unknown or "eegfast-cpu" not in only:
        parser.error(
            f"--only: {', '.join(unknown) or 'eegfast-cpu is missing'}; choose from "
            f"{', '.join(IMPLS)}, eegfast-cpu included (the ratios are relative to it)"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    env = {**environment(), "clock": args.clock}
    title = f"eegfast fused QK-LayerNorm attention on CPU (float32, {args.clock} time)"
    print(f"CPU: {env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}")
    rows = run_cases(args.repeats, args.clock, only=only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name
    records = [
        {**asdict(r), "ratio_vs_eegfast": x} for r, x in zip(rows, ratios(rows), strict=True)
    ]
    report = {"title": title, "environment": env, "results": records}
    write_bytes_atomic(out / f"{name}.json", (json.dumps(report, indent=2) + "\n").encode())
    text = markdown(title, env, rows)
    write_bytes_atomic(out / f"{name}.md", text.encode())
    plot(rows, out / f"{name}.png", title)
    print(text)
    print(f"wrote {out / name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
