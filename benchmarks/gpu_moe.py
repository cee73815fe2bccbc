"""GPU benchmark of the top-k MoE expert FFN against the ways people write it today.

Run from the repository root on a machine with a CUDA device::

    python -m benchmarks.gpu_moe [--out bench-results]
    python -m benchmarks.gpu --ops moe          # the same, from the GPU runner

bf16, top-2, forward + backward (x, gates and all expert weights), shapes of issue 8:
Base (T=32896 tokens, D=200, hidden 800, 8 experts) and Huge (T=16448, D=800, hidden 3200,
16 experts), plus a sweep over the number of experts (4..64) at the Base size. The routing
(expert ids and gates) is drawn once from a random router; every implementation gets the same.

- ``eegfast``: :func:`eegfast.ops.moe_ffn` (fused CUDA dispatch when the extension has CUDA,
  Triton grouped GEMMs and combine);
- ``loop-over-experts``: :func:`eegfast.ops.moe.moe_ffn_expert_loop` (mask, gather, two
  linears, index_add per expert);
- ``argsort+grouped_mm``: :func:`eegfast.ops.moe.moe_ffn_torch_sorted` (stable argsort, one
  gather, ``torch._grouped_mm`` where available, index_add), and ``argsort+grouped_mm-compile``,
  the same under ``torch.compile`` (the named shapes; not the expert sweep);
- ``dense-ffn``: one dense FFN over the T tokens (what the MoE costs relative to the model it
  was upcycled from), and ``dense-ffn-Tk`` over T·k tokens (the same GEMM FLOPs as top-k).

Times are medians of ``triton.testing.do_bench``. Outputs are compared with the fp32 loop over
experts (``max_abs_err``), and so are the gradients of x, the gates and the expert weights that
the timed backward computes (``max_grad_err``, relative to each gradient's largest value).
Writes ``gpu_moe.csv``, ``gpu_moe.md`` (table with ratios and the issue's targets) and
``gpu_moe.png`` (time vs number of experts) into ``--out``.

``--smoke`` runs tiny fp32 shapes on CPU with a ``time.perf_counter`` timer (Triton through
``TRITON_INTERPRET=1``) to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._profile import profile_section, write_kernel_tables
from eegfast.fileio import write_bytes_atomic

SHAPES = {  # name: (T, D, H, E)
    "base": (32896, 200, 800, 8),
    "huge": (16448, 800, 3200, 16),
}
SWEEP_EXPERTS = (4, 8, 16, 32, 64)
SMOKE_SHAPES = {"smoke": (64, 16, 32, 4)}
SMOKE_SWEEP = (2, 4)
TOP_K = 2
TARGET_MS = {"base": 1.3, "huge": 2.6}  # issue 8, H100 bf16 fwd+bwd


@dataclass
class Row:
    shape: str
    T: int
    D: int
    H: int
    E: int
    impl: str
    ms: float | None
    max_abs_err: float | None
    note: str = ""
    # the largest max |grad - fp32 reference grad| / max |reference grad| over x, the gates and
    # the expert weights (the MoE rows; the dense FFNs compute another function)
    max_grad_err: float | None = None


def _moe_eegfast(*args):
    from eegfast.ops import moe_ffn

    return moe_ffn(*args)


def _dense(x, idx, gates, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1[0], b1[0])), w2[0], b2[0])


def _dense_tk(x, idx, gates, w1, b1, w2, b2):
    return _dense(x.repeat(idx.shape[1], 1), idx, gates, w1, b1, w2, b2)


def _compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile (inductor on a GPU; on CPU, for --smoke, aot_eager, which
    checks the row without a C++ toolchain's minutes of compilation). Compiled on first call,
    that is in the untimed warm-up."""
    compiled: dict[str, Callable] = {}

    def run(x, *args):
        backend = "inductor" if x.is_cuda else "aot_eager"
        if backend not in compiled:
            compiled[backend] = torch.compile(fn, backend=backend)
        return compiled[backend](x, *args)

    return run


def implementations() -> dict[str, Callable]:
    from eegfast.ops.moe import moe_ffn_expert_loop, moe_ffn_torch_sorted

    return {
        "eegfast": _moe_eegfast,
        "loop-over-experts": moe_ffn_expert_loop,
        "argsort+grouped_mm": moe_ffn_torch_sorted,
        "dense-ffn": _dense,
        "dense-ffn-Tk": _dense_tk,
        # torch.compile's chance at the best plain-PyTorch MoE (the named shapes only: each
        # expert count of the sweep would compile again), last: its compilation takes the
        # longest, and a run stopped at its time limit keeps the rows before
        "argsort+grouped_mm-compile": _compiled(moe_ffn_torch_sorted),
    }


def make_inputs(T, D, H, E, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    router = torch.randn(D, E, generator=gen) / D**0.5
    probs = (x @ router).softmax(-1)
    top_p, idx = probs.topk(TOP_K, -1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    w1 = torch.randn(E, H, D, generator=gen) / D**0.5
    b1 = torch.randn(E, H, generator=gen) * 0.02
    w2 = torch.randn(E, D, H, generator=gen) / H**0.5
    b2 = torch.randn(E, D, generator=gen) * 0.02
    tensors = [t.to(device=device, dtype=dtype) for t in (x, w1, b1, w2, b2)]
    leaves = [t.requires_grad_() for t in tensors]
    gates = gates.to(device).requires_grad_()
    return leaves[0], idx.to(device), gates, *leaves[1:]


def do_bench_timer(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=list(grad_to_none), return_mode="median")


def perf_counter_timer(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor]) -> float:
    fn()
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def measure(name, impl, inputs, reference, timer) -> tuple[float | None, float | None, str]:
    grad_out = torch.randn_like(reference.to(inputs[0].dtype))
    if name.startswith("dense"):
        # the dense FFN's own weights (expert 0's, as leaves of their own): through the
        # stacked (E, ...) ones its backward would also write zero gradients for the other
        # E - 1 experts' weights (~160 MB at Huge), work a dense model does not do
        x, idx, gates, *weights = inputs
        inputs = (x, idx, gates, *(w[:1].detach().requires_grad_() for w in weights))
    if name == "dense-ffn-Tk":
        grad_out = grad_out.repeat(TOP_K, 1)
    leaves = [t for t in inputs if t.is_floating_point()]

    def step():
        out = impl(*inputs)
        out.backward(grad_out)

    try:
        with torch.no_grad():
            out = impl(*inputs)
        err = None
        if not name.startswith("dense"):
            err = float((out.float() - reference).abs().max())
        return timer(step, leaves), err, ""
    except Exception as error:  # a baseline that cannot run here is reported, not fatal
        from benchmarks._report import error_line

        return None, None, error_line(error)


def reference_grads(inputs, grad_out) -> list[torch.Tensor]:
    """Gradients of x, the gates and the expert weights by the fp32 loop over experts."""
    from eegfast.ops.moe import moe_ffn_expert_loop

    ref = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs]
    moe_ffn_expert_loop(*ref).backward(grad_out.float())
    return [t.grad for t in ref if t.is_floating_point()]


def max_grad_error(impl, inputs, grad_out, expected: Sequence[torch.Tensor]) -> float:
    """The largest relative gradient error of one forward + backward of ``impl`` (inf where a
    gradient is missing): the rows time the backward, which the output's check does not see."""
    leaves = [t for t in inputs if t.is_floating_point()]
    for t in leaves:
        t.grad = None
    impl(*inputs).backward(grad_out)
    worst = 0.0
    for t, e in zip(leaves, expected, strict=True):
        if t.grad is None:
            return float("inf")
        scale = e.abs().max().item() or 1.0
        worst = max(worst, (t.grad.float() - e).abs().max().item() / scale)
        t.grad = None
    return worst


def run_cases(shapes, sweep, device, dtype, timer, on_row=None) -> list[Row]:
    """Every case and implementation; ``on_row(rows)`` after each row (the tables are written
    there, so that a run stopped at its time limit keeps the rows it finished)."""
    from eegfast.ops.moe import moe_ffn_expert_loop

    impls = implementations()
    cases = [(name, *shape) for name, shape in shapes.items()]
    base_name, (T0, D0, H0, _) = next(iter(shapes.items()))
    cases += [(f"{base_name}-E{E}", T0, D0, H0, E) for E in sweep]
    # the compiled rows last, after every other row of every case: their compilation takes
    # longest, and a run stopped at its time limit keeps the rows before (none in the sweep)
    plain = [n for n in impls if not n.endswith("-compile")]
    passes = [
        (cases, plain),
        ([c for c in cases if "-E" not in c[0]], [n for n in impls if n not in plain]),
    ]
    case_order = {c[0]: i for i, c in enumerate(cases)}
    impl_order = {n: i for i, n in enumerate(impls)}
    rows = []
    for pass_cases, names in passes:
        for shape, T, D, H, E in pass_cases:
            names_here = [
                n
                for n in names
                if not (shape != base_name and "-E" in shape and n.startswith("dense"))
            ]  # the dense FFN does not depend on E
            if not names_here:
                continue
            inputs = make_inputs(T, D, H, E, device, dtype)
            with torch.no_grad():
                ref_inputs = [t.detach().float() if t.is_floating_point() else t for t in inputs]
                reference = moe_ffn_expert_loop(*ref_inputs)
            gen = torch.Generator().manual_seed(1)
            grad_out = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
            try:
                expected_grads = reference_grads(inputs, grad_out)
            except Exception:  # (out of memory, say) the rows are timed, their gradients unchecked
                traceback.print_exc()
                expected_grads = None
            for name in names_here:
                impl = impls[name]
                ms, err, note = measure(name, impl, inputs, reference, timer)
                grad_err = None
                if ms is not None and expected_grads is not None and not name.startswith("dense"):
                    try:
                        grad_err = max_grad_error(impl, inputs, grad_out, expected_grads)
                    except Exception as failure:
                        traceback.print_exc()
                        note = (note + "; " if note else "") + "gradient check failed"
                        note += f": {type(failure).__name__}"
                rows.append(Row(shape, T, D, H, E, name, ms, err, note, max_grad_err=grad_err))
                rows.sort(key=lambda r: (case_order[r.shape], impl_order[r.impl]))  # as in cases
                if on_row is not None:
                    on_row(rows)
                shown = ms if ms is None else round(ms, 3)
                print(f"{shape:>10} E={E:<3} {name:>20}: {shown} ms {note}")
            del inputs, reference
    return rows


def ratios(rows: Sequence[Row]) -> list[float | None]:
    """time / eegfast's time in the same case (> 1: eegfast is faster)."""
    ours = {(r.shape, r.E): r.ms for r in rows if r.impl == "eegfast"}
    out = []
    for r in rows:
        base = ours.get((r.shape, r.E))
        out.append(r.ms / base if r.ms and base else None)
    return out


def csv_text(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f.name for f in fields(Row)] + ["ratio_vs_eegfast"])
    for row, ratio in zip(rows, ratios(rows), strict=True):
        writer.writerow([*asdict(row).values(), ratio])
    return buffer.getvalue()


def markdown_text(title: str, env: dict, rows: Sequence[Row]) -> str:
    lines = [f"# {title}", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    lines += [
        "bf16, top-2, forward + backward; median ms (`triton.testing.do_bench`); ratio = time / "
        "eegfast time in the same case (> 1: eegfast faster). max grad err: the largest "
        "gradient error (x, gates, expert weights) against the fp32 loop's, relative to that "
        "gradient's largest value.",
        "",
        "| case | T | D | H | E | impl | ms | ratio | max abs err vs fp32 | max grad err | note |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r, ratio in zip(rows, ratios(rows), strict=True):
        ms = "—" if r.ms is None else f"{r.ms:.3f}"
        rt = "—" if ratio is None else f"{ratio:.2f}x"
        err = "—" if r.max_abs_err is None else f"{r.max_abs_err:.2e}"
        grad_err = "—" if r.max_grad_err is None else f"{r.max_grad_err:.2e}"
        note = r.note
        if r.impl == "eegfast" and r.shape in TARGET_MS and r.ms is not None:
            met = "met" if r.ms <= TARGET_MS[r.shape] else "NOT met"
            note = f"target <= {TARGET_MS[r.shape]} ms: {met}"
        lines.append(
            f"| {r.shape} | {r.T} | {r.D} | {r.H} | {r.E} | {r.impl} | {ms} | {rt} | {err} "
            f"| {grad_err} | {note} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if "-E" in r.shape and r.ms is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r.impl for r in sweep):
        points = sorted((r.E, r.ms) for r in sweep if r.impl == impl)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
    dense = [r for r in rows if r.impl == "dense-ffn" and "-E" not in r.shape]
    if dense and dense[0].ms is not None:
        ax.axhline(dense[0].ms, color="gray", linestyle="--", label=f"dense FFN ({dense[0].shape})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of experts")
    ax.set_ylabel("ms (fwd + bwd)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def write_outputs(out_dir, title, env, rows, name="gpu_moe", with_plot=True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: out / f"{name}.{s}" for s in ("csv", "md", "png")}
    write_bytes_atomic(paths["csv"], csv_text(rows).encode())
    write_bytes_atomic(paths["md"], markdown_text(title, env, rows).encode())
    if with_plot:
        plot(rows, paths["png"], title)
    return paths


def kernel_breakdown(shapes, device, dtype) -> str:
    """Markdown: the kernels of eegfast's forward + backward, per shape."""
    sections = []
    for name, (T, D, H, E) in shapes.items():
        inputs = make_inputs(T, D, H, E, device, dtype)
        leaves = [t for t in inputs if t.is_floating_point()]
        grad_out = torch.randn(T, D, device=device, dtype=dtype)

        def step(inputs=inputs, leaves=leaves, grad_out=grad_out):
            for t in leaves:
                t.grad = None
            _moe_eegfast(*inputs).backward(grad_out)

        sections.append(profile_section(f"eegfast, {name} (T={T}, D={D}, H={H}, E={E})", step))
    return "\n".join(sections)


def run(out_dir: Path | str, env: dict) -> dict[str, Path]:
    """The GPU benchmark (entry point of ``python -m benchmarks.gpu --ops moe``)."""
    title = f"eegfast MoE FFN on {env.get('gpu', 'GPU')}"

    def tables(rows):
        write_outputs(out_dir, title, env, rows, with_plot=False)

    rows = run_cases(SHAPES, SWEEP_EXPERTS, "cuda", torch.bfloat16, do_bench_timer, tables)
    paths = write_outputs(out_dir, title, env, rows)
    breakdown = kernel_breakdown(SHAPES, "cuda", torch.bfloat16)
    paths["kernels"] = write_kernel_tables(out_dir, "gpu_moe", title, breakdown)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_moe", description=__doc__)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    args = parser.parse_args(argv)
    from benchmarks._report import environment

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        title, env = "MoE smoke run (CPU, meaningless)", environment()

        def tables(rows):
            write_outputs(args.out, title, env, rows, "smoke_moe", with_plot=False)

        rows = run_cases(
            SMOKE_SHAPES, SMOKE_SWEEP, "cpu", torch.float32, perf_counter_timer, tables
        )
        paths = write_outputs(args.out, title, env, rows, "smoke_moe")
        breakdown = kernel_breakdown(SMOKE_SHAPES, "cpu", torch.float32)
        paths["kernels"] = write_kernel_tables(args.out, "smoke_moe", title, breakdown)
    else:
        if not torch.cuda.is_available():
            print("benchmarks.gpu_moe needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        env = environment(gpu=True)
        paths = run(args.out, env)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
