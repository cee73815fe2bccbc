"""GPU comparison of the fused QK-LayerNorm attention with the ways people run it today.

Run from the repository root on a machine with a CUDA device::

    python -m benchmarks.gpu_qk_norm_attention [--out bench-results] [--shapes base long]
    python -m benchmarks.gpu --ops qk_norm_attention          # the same, from the GPU runner

bf16, shapes (B, H, N, D) of issue 4: Base (128, 10, 257, 20), Large (128, 16, 257, 25),
Huge (64, 16, 257, 50), long context (16, 10, 2049, 20); no masks. Modes: forward (no grad)
and forward + backward (q, k, v and the four LayerNorm parameters). Implementations, in one run:

- ``eegfast-triton``: :func:`eegfast.ops.qk_norm_attention` with ``backend="triton"`` as users
  get it: its three launch choices (below) timed on the first call of each case, the fastest kept
  (the choices are written to the table's header);
- ``eegfast-triton-fused``: the same with the choices pinned to the fused loops (q and k tiles
  normalised inside them) and, at N = 257 and 2049, a 16-row launch of its own for the last row
  (and key) of each head instead of a whole block;
- ``eegfast-triton-prenorm``: the loops reading k (and q in the backward) normalised, as
  zero-padded rows written by one pass per tensor before them
  (``qk_norm_attention_triton.PRE_NORMALISE``), with the tail launch;
- ``eegfast-triton-one-launch``: the fused loops with every row block in the autotuned launch
  (``qk_norm_attention_triton.SPLIT_TAIL`` off);
- ``eegfast-triton-atomic-dq``: the fused loops and tail launch, the backward's dQ added up by
  atomic adds in the dK / dV kernel (``qk_norm_attention_triton.ATOMIC_DQ``): its forward is
  the fused row's;
- ``eegfast-triton-online``: the fused row with the forward's loops without row maxima turned
  off (``qk_norm_attention_triton.UNSHIFTED``): every forward keeps the online maximum, what
  the fused row's forward did before them (its backward is the fused row's);
- ``eager-reference``: :func:`eegfast.ops.qk_norm_attention_reference` (LayerNorm + explicit
  (N, N) softmax);
- ``layernorm+sdpa``: ``F.layer_norm`` then ``F.scaled_dot_product_attention``;
- ``layernorm+sdpa-pad8``: the same with the head dim zero-padded to a multiple of 8 (SDPA's
  fused backends need one; at D = 25 and 50 plain SDPA falls to its math path);
- ``compile(layernorm+sdpa)``: the same under ``torch.compile``;
- ``compile(layernorm+flex)``: ``torch.compile`` of ``F.layer_norm`` + ``flex_attention``
  (the LayerNorm stays outside the attention kernel).

Times are medians of ``triton.testing.do_bench``. Every implementation's output is compared with
the reference computed in float32 (``max_abs_err``), and in forward + backward its gradients
too (``max_grad_err``: the largest error of the seven, relative to the largest reference value
of its kind, :data:`GRAD_GROUPS`), so that a fast wrong backward cannot pass for a fast one.
Writes ``gpu_qk_norm_attention.csv``, ``.md`` (table with ratios and the issue's targets) and
``.png`` into ``--out``, and on a GPU ``gpu_qk_norm_attention_tuning.json``: every autotuning
run's time per config (which configs win, and by how much) and each compiled kernel's
registers and spills. The rows of issue 4's comparison (``eegfast-triton`` and the four
others) run for every shape and mode before the pinned eegfast variants, and the .csv and .md
are rewritten after every row: a run stopped at its time limit keeps what it timed. A row that
fails is reported (its traceback on stderr).

``--smoke`` runs tiny fp32 shapes on CPU with a ``time.perf_counter`` timer (Triton through
``TRITON_INTERPRET=1``) to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import os
import statistics
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

SHAPES: dict[str, tuple[int, int, int, int]] = {
    "base": (128, 10, 257, 20),
    "large": (128, 16, 257, 25),
    "huge": (64, 16, 257, 50),
    "long": (16, 10, 2049, 20),
}
SMOKE_SHAPES: dict[str, tuple[int, int, int, int]] = {"smoke": (1, 2, 33, 20)}
# Targets of issue 4 for eegfast on an H100, milliseconds: (shape, mode) -> bound.
TARGETS_MS: dict[tuple[str, str], float] = {
    ("base", "fwd"): 0.10,
    ("base", "fwd+bwd"): 0.30,
    ("large", "fwd+bwd"): 0.60,
    ("huge", "fwd+bwd"): 0.50,
    ("long", "fwd+bwd"): 0.80,
}
MODES = ("fwd", "fwd+bwd")
EPS = 1e-6
OURS = "eegfast-triton"
FUSED = "eegfast-triton-fused"
PRENORM = "eegfast-triton-prenorm"
ONE_LAUNCH = "eegfast-triton-one-launch"
ATOMIC_DQ = "eegfast-triton-atomic-dq"
ONLINE = "eegfast-triton-online"

# attention(q, k, v, params) -> (B, H, N, D), all four LayerNorm parameters given.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], object]


# --------------------------------------------------------------------------------------------
# What is compared.
# --------------------------------------------------------------------------------------------


def _eegfast_triton(q, k, v, params, *, pre_normalise: bool | None, split_tail: bool | None,
                    atomic_dq: bool | None = False, unshifted: bool = True):  # fmt: skip
    """qk_norm_attention on the Triton backend with its launch choices pinned (or None: chosen
    by timing). The backward reads the switches when it runs, after this returns: each row sets
    them before its forward, and measure() runs a row's backward before the next row's
    forward."""
    from eegfast.ops import qk_norm_attention, qk_norm_attention_triton

    qk_norm_attention_triton.PRE_NORMALISE = pre_normalise
    qk_norm_attention_triton.SPLIT_TAIL = split_tail
    qk_norm_attention_triton.ATOMIC_DQ = atomic_dq
    qk_norm_attention_triton.UNSHIFTED = unshifted
    return qk_norm_attention(q, k, v, *params, eps=EPS, backend="triton")


def eegfast_triton(q, k, v, params):
    """As users get it: every launch choice timed per case."""
    return _eegfast_triton(q, k, v, params, pre_normalise=None, split_tail=None, atomic_dq=None)


def eegfast_triton_fused(q, k, v, params):
    """Fused loops that normalise q and k tiles inside them, tail launch."""
    return _eegfast_triton(q, k, v, params, pre_normalise=False, split_tail=True)


def eegfast_triton_pre_normalised(q, k, v, params):
    """The variant whose loops read padded rows, k (and q in the backward) normalised."""
    return _eegfast_triton(q, k, v, params, pre_normalise=True, split_tail=True)


def eegfast_triton_one_launch(q, k, v, params):
    """The fused loops without the tail launch: every row block in the autotuned one."""
    return _eegfast_triton(q, k, v, params, pre_normalise=False, split_tail=False)


def eegfast_triton_atomic_dq(q, k, v, params):
    """The fused loops and tail launch, dQ added up by atomic adds in the dK / dV kernel."""
    return _eegfast_triton(q, k, v, params, pre_normalise=False, split_tail=True, atomic_dq=True)


def eegfast_triton_online(q, k, v, params):
    """The fused loops and tail launch, the forward always on its online-maximum loops."""
    return _eegfast_triton(q, k, v, params, pre_normalise=False, split_tail=True, unshifted=False)


def eager_reference(q, k, v, params):
    from eegfast.ops import qk_norm_attention_reference

    return qk_norm_attention_reference(q, k, v, *params, eps=EPS)


def layer_norm_sdpa(q, k, v, params):
    D = q.shape[-1]
    q_w, q_b, k_w, k_b = params
    qn = F.layer_norm(q, (D,), q_w, q_b, EPS)
    kn = F.layer_norm(k, (D,), k_w, k_b, EPS)
    return F.scaled_dot_product_attention(qn, kn, v)


def layer_norm_sdpa_padded(q, k, v, params):
    """LayerNorm + SDPA with the head dim zero-padded to a multiple of 8, which SDPA's fused
    backends need: what a user would write at D = 20, 25, 50 to leave the math path. Zero
    columns change no dot product, and the softmax scale stays 1/sqrt(D)."""
    D = q.shape[-1]
    q_w, q_b, k_w, k_b = params
    qn = F.layer_norm(q, (D,), q_w, q_b, EPS)
    kn = F.layer_norm(k, (D,), k_w, k_b, EPS)
    pad = -D % 8
    if pad:
        qn, kn, v = (F.pad(t, (0, pad)) for t in (qn, kn, v))
    return F.scaled_dot_product_attention(qn, kn, v, scale=D**-0.5)[..., :D]


def layer_norm_flex(q, k, v, params):
    from torch.nn.attention.flex_attention import flex_attention

    D = q.shape[-1]
    q_w, q_b, k_w, k_b = params
    qn = F.layer_norm(q, (D,), q_w, q_b, EPS)
    kn = F.layer_norm(k, (D,), k_w, k_b, EPS)
    return flex_attention(qn, kn, v)


def implementations() -> dict[str, Attention]:
    return {
        OURS: eegfast_triton,
        FUSED: eegfast_triton_fused,
        PRENORM: eegfast_triton_pre_normalised,
        ONE_LAUNCH: eegfast_triton_one_launch,
        ATOMIC_DQ: eegfast_triton_atomic_dq,
        ONLINE: eegfast_triton_online,
        "eager-reference": eager_reference,
        "layernorm+sdpa": layer_norm_sdpa,
        "layernorm+sdpa-pad8": layer_norm_sdpa_padded,
        "compile(layernorm+sdpa)": torch.compile(layer_norm_sdpa, dynamic=False),
        "compile(layernorm+flex)": torch.compile(layer_norm_flex, dynamic=False),
    }


def make_inputs(shape, device, dtype, seed=0):
    """q, k, v (B, H, N, D) and LayerNorm params (D,), leaves that require grad."""
    B, H, N, D = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, H, N, D, generator=gen) for _ in range(3)]
    params = [1 + 0.1 * torch.randn(D, generator=gen), 0.1 * torch.randn(D, generator=gen)] * 2
    grad_out = torch.randn(B, H, N, D, generator=gen)
    # copies: q's and k's LayerNorm parameters start equal but are separate leaves (on CPU in
    # fp32 .to() would return the same tensor, and their gradients would add up)
    leaves = [x.to(device=device, dtype=dtype, copy=True).requires_grad_() for x in (*qkv, *params)]
    return leaves[:3], leaves[3:], grad_out.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    B: int
    H: int
    N: int
    D: int
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"
    impl: str
    ms: float | None  # median; None when the implementation could not run
    max_abs_err: float | None = None  # of the output, against the float32 reference
    # fwd+bwd: max over q, k, v and the four LayerNorm parameters of max |grad - reference| /
    # max |reference grad| (float32 reference, the same grad_out)
    max_grad_err: float | None = None
    note: str = ""


# timer(fn, grad_to_none) -> median milliseconds of fn()
Timer = Callable[[Callable[[], object], Sequence[torch.Tensor]], float]


def do_bench_timer(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=list(grad_to_none), return_mode="median")


def perf_counter_timer(
    fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], repeats: int = 3
) -> float:
    times = []
    for _ in range(repeats + 1):
        for x in grad_to_none:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def error_line(error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first_line}"


# Gradients compared on a common scale: q, k, v; the two LayerNorm weights; the two biases.
# (k's bias has an exact gradient of 0, softmax being blind to a per-query shift of the
# scores: its own largest value would make rounding look like a wrong kernel.)
GRAD_GROUPS = ((0, 1, 2), (3, 5), (4, 6))


def relative_grad_error(grads: Sequence[torch.Tensor | None], expected: Sequence[torch.Tensor]):
    """Largest ``max |g - e|`` over the gradients of q, k, v, q_w, q_b, k_w, k_b, each divided
    by the largest reference value of its GRAD_GROUPS group; inf where a gradient is missing."""
    if any(g is None for g in grads):
        return float("inf")
    worst = 0.0
    for group in GRAD_GROUPS:
        scale = max(expected[i].abs().max().item() for i in group) or 1.0
        for i in group:
            worst = max(worst, (grads[i].float() - expected[i]).abs().max().item() / scale)
    return worst


def reference_grads(qkv, params, grad_out) -> list[torch.Tensor]:
    """Gradients of q, k, v and the four LayerNorm parameters by the float32 reference."""
    leaves = [x.detach().float().requires_grad_() for x in (*qkv, *params)]
    eager_reference(*leaves[:3], leaves[3:]).backward(grad_out.float())
    return [x.grad for x in leaves]


def measure(impl: Attention, mode: str, qkv, params, grad_out, timer: Timer):
    """(median ms, output, gradients) of one implementation in one mode; the first call warms
    up, and its gradients (fwd+bwd; None in fwd) are those of q, k, v and the four LayerNorm
    parameters."""
    leaves = [*qkv, *params]
    if mode == "fwd":  # inference: inputs that do not require grad, no autograd graph
        qkv, params = [x.detach() for x in qkv], [p.detach() for p in params]

        def run():
            with torch.no_grad():
                return impl(*qkv, params)

    else:

        def run():
            out = impl(*qkv, params)
            out.backward(grad_out)
            return out

    for x in leaves:
        x.grad = None
    out = run()  # warm-up: compilation and autotuning happen here
    grads = None if mode == "fwd" else [None if x.grad is None else x.grad.clone() for x in leaves]
    return timer(run, leaves), out.detach(), grads


TUNED_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


@contextlib.contextmanager
def switches_restored():
    """The Triton kernels' switches that the eegfast rows set (PRE_NORMALISE, SPLIT_TAIL,
    ATOMIC_DQ, UNSHIFTED) put back as they were on exit, for whatever runs next in this process
    (a decorator of the functions that run those rows)."""
    from eegfast.ops import qk_norm_attention_triton as kernels

    names = ("PRE_NORMALISE", "SPLIT_TAIL", "ATOMIC_DQ", "UNSHIFTED")
    saved = {name: getattr(kernels, name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def record_tuning(log: dict[str, dict], label: str) -> None:
    """Files under ``label`` the config timings (ms) of each autotuned kernel's last tuning run,
    if it tuned since the last call: which configs win and by how much, to prune the lists."""
    from eegfast.ops import qk_norm_attention_triton as kernels

    for name in TUNED_KERNELS:
        timings = getattr(getattr(kernels, name), "configs_timings", None)
        # the autotuner's own dict, replaced (not changed) at its next tuning run
        if not timings or any(logged is timings for logged in log.values()):
            continue
        log[f"{label} {name}"] = timings


def compiled_kernels() -> list[dict]:
    """Every compiled specialisation of the attention kernels in Triton's caches: warps, stages,
    shared memory, and the registers per thread and spilled bytes that this Triton and GPU
    gave it (what the config lists were chosen by, measured here on the Triton that runs)."""
    from eegfast.ops import qk_norm_attention_triton as kernels

    report = []
    for name in (*TUNED_KERNELS, "_pad_rows_kernel", "_bwd_delta_kernel"):
        kernel = getattr(kernels, name)
        # a JIT function holds the caches; an autotuner's is its .fn (shared by the tail launches)
        jit = kernel if hasattr(kernel, "device_caches") else getattr(kernel, "fn", None)
        for caches in getattr(jit, "device_caches", {}).values():
            for key, compiled in caches[0].items():
                meta = getattr(compiled, "metadata", None)
                report.append({
                    "kernel": name,
                    "num_warps": getattr(meta, "num_warps", None),
                    "num_stages": getattr(meta, "num_stages", None),
                    "shared_bytes": getattr(meta, "shared", None),
                    "registers": getattr(compiled, "n_regs", None),
                    "spill_bytes": getattr(compiled, "n_spills", None),
                    "specialisation": str(key),
                })  # fmt: skip
    return report


# What issue 4 compares; run_cases times these for every case before the pinned eegfast
# variants (diagnostics), so that a run stopped at its time limit has the comparison.
ESSENTIAL = (OURS, "eager-reference", "layernorm+sdpa", "layernorm+sdpa-pad8",
             "compile(layernorm+sdpa)", "compile(layernorm+flex)")  # fmt: skip


@switches_restored()
def run_cases(
    shapes: dict[str, tuple[int, int, int, int]],
    dtype: torch.dtype,
    device: str,
    timer: Timer,
    tuning: dict[str, dict] | None = None,
    on_row: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """The table's rows, in table order (case, then implementation); ``tuning`` (if given)
    collects record_tuning's timings; ``on_row(rows so far)`` is called after every row (the
    tables are written there, so that a run killed at its time limit keeps what it timed).
    The ESSENTIAL rows of every case run first, then the other eegfast variants."""
    from tqdm import tqdm

    impls = implementations()
    order = {name: i for i, name in enumerate(impls)}
    cases = [(name, shape, mode) for name, shape in shapes.items() for mode in MODES]
    case_index = {(name, mode): i for i, (name, _, mode) in enumerate(cases)}
    # torch.compile keeps one graph per (shape, grad mode) of each compiled function: past its
    # recompile limit (8: four shapes) it would silently run the rest eagerly
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, len(cases) + 2)
    inputs: dict[tuple[str, str], tuple] = {}
    rows: list[Row] = []
    progress = tqdm(total=len(cases) * len(impls), desc="qk_norm_attention", unit="run")
    passes = ([n for n in impls if n in ESSENTIAL], [n for n in impls if n not in ESSENTIAL])
    try:
        for names, (name, shape, mode) in itertools.product(passes, cases):
            if (name, mode) not in inputs:
                qkv, params, grad_out = make_inputs(shape, device, dtype)
                with torch.no_grad():
                    expected = eager_reference(
                        *(x.float() for x in qkv), [p.float() for p in params]
                    ).float()
                grads = None
                if mode != "fwd":
                    try:
                        grads = reference_grads(qkv, params, grad_out)
                    except Exception:  # (out of memory, say) rows timed, gradients unchecked
                        traceback.print_exc()
                inputs[name, mode] = (qkv, params, grad_out, expected, grads)
            qkv, params, grad_out, expected, expected_grads = inputs[name, mode]
            B, H, N, D = shape
            dtype_name = str(dtype).removeprefix("torch.")
            for impl_name in names:
                impl = impls[impl_name]
                progress.set_postfix_str(f"{name} {mode} {impl_name}")
                case = dict(shape=name, B=B, H=H, N=N, D=D, dtype=dtype_name, mode=mode,
                            impl=impl_name)  # fmt: skip
                try:
                    ms, out, grads = measure(impl, mode, qkv, params, grad_out, timer)
                    error = (out.float() - expected).abs().max().item()
                    grad_error = None
                    if expected_grads is not None:
                        grad_error = relative_grad_error(grads, expected_grads)
                    row = Row(**case, ms=ms, max_abs_err=error, max_grad_err=grad_error)
                except Exception as failure:  # recorded in the table; the others go on
                    traceback.print_exc()
                    row = Row(**case, ms=None, note=f"failed: {error_line(failure)}")
                rows.append(row)
                rows.sort(key=lambda r: (case_index[r.shape, r.mode], order[r.impl]))
                if tuning is not None and impl_name.startswith("eegfast"):
                    record_tuning(tuning, f"{name} {mode} {impl_name}")
                progress.write(f"{name} {mode} {impl_name}: {row.ms} ms {row.note}")
                progress.update()
                if on_row is not None:
                    on_row(rows)
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        torch._dynamo.config.recompile_limit = limit
        progress.close()
    return rows


# --------------------------------------------------------------------------------------------
# Writers.
# --------------------------------------------------------------------------------------------


def ratios(rows: Sequence[Row]) -> list[float | None]:
    """Each row's time over eegfast-triton's in the same (shape, mode): above 1 = we are faster."""
    ours = {(r.shape, r.mode): r.ms for r in rows if r.impl == OURS and r.ms is not None}
    return [
        r.ms / ours[(r.shape, r.mode)] if r.ms is not None and (r.shape, r.mode) in ours else None
        for r in rows
    ]


def target_note(row: Row) -> str:
    bound = TARGETS_MS.get((row.shape, row.mode))
    if row.impl != OURS or bound is None or row.ms is None:
        return ""
    return f"target ≤ {bound:.2f} ms: {'met' if row.ms <= bound else 'MISSED'}"


def csv_text(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    names = [f.name for f in fields(Row)] + ["ratio_vs_eegfast"]
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for row, ratio in zip(rows, ratios(rows), strict=True):
        writer.writerow({**asdict(row), "ratio_vs_eegfast": ratio})
    return buffer.getvalue()


def markdown_text(title: str, env: dict[str, object], rows: Sequence[Row]) -> str:
    lines = [
        f"# {title}",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        "",
        "Ratio = this row's median time / eegfast-triton's for the same shape and mode: above 1 "
        "means eegfast is that many times faster. max_abs_err: largest difference of the output "
        "from `qk_norm_attention_reference` computed in float32 on the same inputs; "
        "max_grad_err (fwd+bwd): largest difference of a gradient (q, k, v, the four LayerNorm "
        "parameters) from the float32 reference's, relative to that gradient's largest value.",
        "",
        "| shape | B | H | N | D | dtype | mode | implementation | median ms | ratio "
        "| max_abs_err | max_grad_err | note |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r, ratio in zip(rows, ratios(rows), strict=True):
        ms = "—" if r.ms is None else f"{r.ms:.3f}"
        shown_ratio = "—" if ratio is None else f"{ratio:.2f}×"
        err = "—" if r.max_abs_err is None else f"{r.max_abs_err:.2e}"
        grad_err = "—" if r.max_grad_err is None else f"{r.max_grad_err:.2e}"
        note = "; ".join(x for x in (target_note(r), r.note) if x).replace("|", "\\|")
        lines.append(
            f"| {r.shape} | {r.B} | {r.H} | {r.N} | {r.D} | {r.dtype} | {r.mode} | {r.impl} "
            f"| {ms} | {shown_ratio} | {err} | {grad_err} | {note} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Grouped bars of median time (log scale), one group per (shape, mode)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys((r.shape, r.mode) for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    width = 0.8 / max(len(impls), 1)
    fig = Figure(figsize=(max(6.0, 1.5 * len(groups)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, impl in enumerate(impls):
        times = {(r.shape, r.mode): r.ms for r in rows if r.impl == impl and r.ms is not None}
        xs = [g for g, group in enumerate(groups) if group in times]
        ax.bar(
            [x + (i - (len(impls) - 1) / 2) * width for x in xs],
            [times[groups[x]] for x in xs],
            width,
            label=impl,
        )
    for g, group in enumerate(groups):
        if group in TARGETS_MS:
            ax.hlines(TARGETS_MS[group], g - 0.4, g + 0.4, colors="black", linestyles="dashed")
    ax.set_xticks(range(len(groups)), [f"{shape}\n{mode}" for shape, mode in groups], fontsize=8)
    if any(r.ms for r in rows):
        ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale); dashed: target")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_bytes_atomic(path, buffer.getvalue())


def write_outputs(
    out_dir: Path | str, title: str, env: dict, rows: Sequence[Row], name: str, png: bool = True
):
    """``name``.csv, .md and (with ``png``) .png in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {suffix: out / f"{name}.{suffix}" for suffix in ("csv", "md", "png")}
    write_bytes_atomic(paths["csv"], csv_text(rows).encode())
    write_bytes_atomic(paths["md"], markdown_text(title, env, rows).encode())
    if png:
        plot(rows, paths["png"], title)
    return paths


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------


def autotuned_configs() -> dict[str, str]:
    """The configs the Triton autotuner chose, per kernel and tuning key, for the notes."""
    from eegfast.ops import qk_norm_attention_triton as kernels

    chosen = {}
    for name in TUNED_KERNELS:
        for key, config in getattr(getattr(kernels, name), "cache", {}).items():
            chosen[f"{name}{tuple(key)}"] = str(config)
    return chosen


def launch_choices() -> dict[str, str]:
    """The loop variants eegfast-triton's calls chose, per case (see _loop_variant)."""
    from eegfast.ops import launch_choices

    return {f"{what} {case}": str(variant) for (what, case), variant in launch_choices().items()}


@switches_restored()
def kernel_breakdown(shapes: dict[str, tuple[int, int, int, int]], device: str, dtype) -> str:
    """Markdown: the kernels of eegfast's forward and forward + backward (each pinned variant),
    per shape."""
    ours = {
        FUSED: eegfast_triton_fused,
        PRENORM: eegfast_triton_pre_normalised,
        ATOMIC_DQ: eegfast_triton_atomic_dq,
    }
    sections = []
    for name, shape in shapes.items():
        qkv, params, grad_out = make_inputs(shape, device, dtype)
        for (impl_name, impl), mode in itertools.product(ours.items(), MODES):

            def profiler(run, leaves, title=f"{impl_name}, {name} {shape}, {mode}"):
                def step():  # measure()'s timer slot: profile instead of timing
                    for x in leaves:
                        x.grad = None
                    run()

                return profile_section(title, step)

            sections.append(measure(impl, mode, qkv, params, grad_out, profiler)[0])
    return "\n".join(sections)


def run(out_dir: Path | str, env: dict, shapes: Sequence[str] = tuple(SHAPES)) -> dict:
    """The GPU benchmark (called by ``benchmarks.gpu``); returns the written paths."""
    chosen = {s: SHAPES[s] for s in shapes}
    tuning: dict[str, dict] = {}
    title = f"eegfast qk_norm_attention (bf16) on {env.get('gpu', 'GPU')}"
    name = "gpu_qk_norm_attention"

    plotted = False

    def partial(rows: list[Row]) -> None:
        """The table so far; the plot (a second a write) once, when the first diagnostic row
        shows that issue 4's comparison (the ESSENTIAL rows of every case) is complete: a run
        stopped at its time limit had the tables but no plot."""
        nonlocal plotted
        png = not plotted and rows[-1].impl not in ESSENTIAL
        plotted = plotted or png
        write_outputs(out_dir, title + " (partial: the run goes on)", env, rows, name, png=png)

    rows = run_cases(chosen, torch.bfloat16, "cuda", do_bench_timer, tuning, partial)
    env = {**env, "autotuned": autotuned_configs(), "launch choices": launch_choices()}
    paths = write_outputs(out_dir, title, env, rows, name)
    paths["tuning"] = Path(out_dir) / "gpu_qk_norm_attention_tuning.json"
    timings = {label: {str(c): ms for c, ms in t.items()} for label, t in tuning.items()}
    try:  # reads Triton's internals: a change there must not cost the kernel tables below
        compiled = compiled_kernels()
    except Exception as error:
        traceback.print_exc()
        compiled = [{"failed": error_line(error)}]
    tuning_report = {"timings_ms": timings, "compiled": compiled}
    write_bytes_atomic(paths["tuning"], json.dumps(tuning_report, indent=1).encode())
    breakdown = kernel_breakdown(chosen, "cuda", torch.bfloat16)
    paths["kernels"] = write_kernel_tables(out_dir, "gpu_qk_norm_attention", title, breakdown)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_qk_norm_attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--smoke", action="store_true", help="tiny fp32 shapes on CPU: checks the script only"
    )
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before eegfast imports triton
    from benchmarks._report import environment

    if args.smoke:
        env = environment()
        rows = run_cases(SMOKE_SHAPES, torch.float32, "cpu", perf_counter_timer)
        title = "qk_norm_attention smoke run (CPU, numbers meaningless)"
        paths = write_outputs(args.out, title, env, rows, "smoke_qk_norm_attention")
        breakdown = kernel_breakdown(SMOKE_SHAPES, "cpu", torch.float32)
        paths["kernels"] = write_kernel_tables(args.out, "smoke_qk_norm_attention", title,
                                               breakdown)  # fmt: skip
    else:
        if not torch.cuda.is_available():
            print(
                "benchmarks.gpu_qk_norm_attention needs a CUDA device (use --smoke to check the "
                "script on CPU)",
                file=sys.stderr,
            )
            return 2
        env = environment(gpu=True)
        paths = run(args.out, env, args.shapes)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
