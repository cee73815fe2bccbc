"""LaBraM pretraining step (GPU) and inference (CPU): eegfast against the reference recipe.

Run from the repository root::

    pytest benchmarks/bench_pretrain.py --benchmark-only      # CPU inference, pytest-benchmark
    python -m benchmarks.bench_pretrain --cpu                  # CPU inference table
    python -m benchmarks.bench_pretrain --cpu-train            # CPU fine-tuning step table
    python -m benchmarks.bench_pretrain --gpu [--size large]   # GPU training step table

CPU inference: LaBraM-Base classifier, fp32, 2 threads, batch 8 × 23 electrodes × 10 s
(231 tokens): eegfast (default backend: C++ attention kernel) against the plain-PyTorch
re-creation of the reference architecture (:mod:`eegfast.models.reference`, eager). Outputs
are checked to agree. CPU fine-tuning step: the same model and batch, forward + cross-entropy +
backward + clipping + AdamW, eegfast against the re-creation (first two losses reported).

GPU training step (LaBraM-Base by default: batch 64, 32 electrodes × 8 patches = 256 tokens):
frozen tokenizer forward for the targets + masked-modelling loss + backward + gradient
clipping (3.0) + AdamW, in mixed precision. Compared in the same run:

* ``reference-eager``: the reference recipe re-created in eager PyTorch — fp16 autocast with a
  GradScaler, two sequential student passes (:class:`RefPretrain`), the tokenizer
  :class:`RefVQNSP` under fp16 autocast, ``torch.optim.AdamW`` (fused on a GPU, as for eegfast:
  :func:`adamw`, so that the speed-up is the models', not an optimizer flag's);
* ``reference-compile``: the same with the student and the tokenizer under ``torch.compile``;
* ``eegfast``: :class:`LaBraMPretrain` (one batched forward over both views, fused Triton
  QK-norm attention), tokenizer in bf16 inference mode, fused AdamW;
* ``eegfast-compile``: the same with the student and the tokenizer's forward under
  ``torch.compile``; ``eegfast-compile-cudagraphs``: in its ``reduce-overhead`` mode (CUDA
  graphs: LaBraM's 200-wide layers make many short kernels, whose launches this replays at
  once).

Every row starts from the same weights (:func:`initial_weights`: the re-created reference
models take eegfast's state dicts, key for key), batch and mask, and reports the losses of its
first two steps: they agree up to mixed precision unless a row computes another loss or makes
another update (a GradScaler row may skip its first update at the initial loss scale).
Samples/s come from ``triton.testing.do_bench`` (median of at least ~15 timed steps), peak
memory from ``torch.cuda.max_memory_allocated`` over one warm step, after the rows before it
were released. The rows run in the order above but with ``eegfast`` second, and the tables are
rewritten after every row: a run stopped at its time limit keeps the rows it finished (the
compiled ones take minutes to compile). A row that fails is reported (its traceback on
stderr) and the others go on. Results go to ``--out`` (default ``bench-results``) as Markdown
and JSON: ``cpu_labram_inference.*`` and ``gpu_pretrain_<size>.*``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from benchmarks._profile import profile_section, write_kernel_tables
from benchmarks._report import environment, error_line, interleaved_times
from eegfast.fileio import write_text_atomic
from eegfast.models import create_model, random_patch_mask
from eegfast.models.reference import RefPretrain, RefTransformer, RefVQNSP, reference_pretrain_loss

SIZES = {"base": (200, 12, 10, 8), "large": (400, 24, 16, 16)}
CPU_CASE = dict(batch=8, n_chans=23, n_patches=10, threads=2)
GPU_CASE = dict(batch=64, n_chans=32, n_patches=8)
CPU_TARGET = (
    "Target: eegfast ≥ 2× the eager re-creation of the reference. Each pair of rows is one "
    "process: with glibc as the process starts (whose regime depends on allocation history: "
    "the reference's large attention tensors may be unmapped on free and page-faulted in again "
    "on every call), and with freed memory retained (no page faults for either)."
)
GPU_TARGET = "Targets on H100: Base ≥ 2,500 samples/s with ≤ 6 GB peak; Large ≥ 1,000 samples/s."


@dataclass
class Row:
    impl: str
    ms: float | None  # None: the implementation failed (see note)
    samples_per_s: float | None
    peak_mib: float | None = None
    max_abs_diff: float | None = None
    note: str = ""
    speedup: float | None = None  # against the baseline of its own group (else of the table)
    # GPU rows: the losses of the first two (warm-up) steps. Every row starts from the same
    # weights, batch and mask, so they agree up to mixed precision unless a row computes
    # another loss (step 1) or makes another update (step 2: the first loss alone, near
    # 2 ln(vocab) from any initialisation, says little).
    first_losses: tuple[float, float] | None = None


# --------------------------------------------------------------------------------------------
# CPU inference.
# --------------------------------------------------------------------------------------------


def cpu_inference_impls(seed: int = 0) -> tuple[dict[str, Callable[[], torch.Tensor]], tuple]:
    """Callables for eegfast and the eager re-creation with identical weights and inputs."""
    torch.manual_seed(seed)
    model = create_model("labram_base", num_classes=6).eval()
    ref = RefTransformer(*SIZES["base"], num_classes=6).eval()
    ref.load_state_dict(model.state_dict())
    B, C, A = CPU_CASE["batch"], CPU_CASE["n_chans"], CPU_CASE["n_patches"]
    x = torch.randn(B, C, A, 200)
    chans = torch.arange(C + 1)
    impls = {"eegfast": lambda: model(x, chans), "reference-eager": lambda: ref(x, chans)}
    return impls, (x, chans)


def minor_page_faults() -> float:
    """Minor page faults of this process so far (first touches of freshly mapped memory)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float, float]]:
    """Median wall ms, process-CPU ms and minor page faults per call of each callable, timed
    round-robin (one untimed warm-up round first). CPU time (all threads) is the steadier
    number on a shared machine."""
    clocks = (time.perf_counter, time.process_time, minor_page_faults)
    timed = interleaved_times(fns, repeats, clocks, warmup=1)
    out = {}
    for name, times in timed.items():
        if isinstance(times, Exception):
            raise times
        wall, cpu, faults = (statistics.median(t[i] for t in times) for i in range(3))
        out[name] = (wall * 1e3, cpu * 1e3, faults)
    return out


# glibc settings under which freed memory stays with the process: large tensors are then
# reused instead of being unmapped on free and faulted in again, page by page, on the next
# allocation. Which regime a process is in by default depends on its allocation history
# (glibc raises its mmap threshold as it sees large frees); this pins it.
RETAIN_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 31),
    "MALLOC_TOP_PAD_": str(1 << 27),
}


def run_cpu(repeats: int = 7, regime: str = "") -> list[Row]:
    """Rows of eegfast and the reference in this process; ``regime`` labels the rows."""
    torch.set_num_threads(CPU_CASE["threads"])
    impls, _ = cpu_inference_impls()
    with torch.inference_mode():
        outputs = {name: fn() for name, fn in impls.items()}
        ms = interleaved_medians(impls, repeats)
    expected = outputs["reference-eager"]
    scale = expected.abs().max().item()
    base_wall, base_cpu = ms["reference-eager"][:2]
    label = f" ({regime})" if regime else ""
    return [
        Row(
            name + label,
            ms[name][0],
            CPU_CASE["batch"] / ms[name][0] * 1e3,
            max_abs_diff=(outputs[name] - expected).abs().max().item() / scale,
            note=f"process CPU time {ms[name][1]:.0f} ms, speed-up by CPU time "
            f"{base_cpu / ms[name][1]:.2f}×; {ms[name][2]:.0f} page faults per call",
            speedup=base_wall / ms[name][0],
        )
        for name in impls
    ]


def run_cpu_retaining_memory(repeats: int) -> list[Row]:
    """:func:`run_cpu` in a child process started with :data:`RETAIN_MEMORY_ENV`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "benchmarks.bench_pretrain", "--cpu", "--malloc", "retain"]
        cmd += ["--repeats", str(repeats), "--out", tmp]
        env = {**os.environ, **RETAIN_MEMORY_ENV}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        record = json.loads((Path(tmp) / "cpu_labram_inference.json").read_text())
    return [Row(**row) for row in record["rows"]]


# --------------------------------------------------------------------------------------------
# CPU fine-tuning step.
# --------------------------------------------------------------------------------------------

CPU_TRAIN_TITLE = (
    "LaBraM-Base fine-tuning step on CPU (fp32, 2 threads, batch 8 × 23 electrodes × 10 s: "
    "forward, cross-entropy, backward, gradient clipping, AdamW)"
)
CPU_TRAIN_NOTE = (
    "No target: fine-tuning on a CPU is what `make demo` does. Both rows start from the same "
    "weights (drop path off: the re-creation has none), batch and labels, and report the losses "
    "of their first two steps. AdamW is torch's foreach implementation in both."
)


def cpu_train_steps(
    seed: int = 0, case: dict[str, int] = CPU_CASE
) -> dict[str, Callable[[], torch.Tensor]]:
    """One fine-tuning step of eegfast and of the eager re-creation, same weights and batch
    (``case``: batch, n_chans, n_patches). Each step returns its loss (detached)."""
    torch.manual_seed(seed)
    model = create_model("labram_base", num_classes=4, drop_path_rate=0.0).train()
    ref = RefTransformer(*SIZES["base"], num_classes=4).train()
    ref.load_state_dict(model.state_dict())
    B, C, A = case["batch"], case["n_chans"], case["n_patches"]
    x = torch.randn(B, C, A, 200)
    chans = torch.arange(C + 1)
    labels = torch.randint(0, 4, (B,))

    def stepper(net: torch.nn.Module) -> Callable[[], torch.Tensor]:
        optimizer = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.05, foreach=True)

        def step() -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(net(x, chans), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return {"eegfast": stepper(model), "reference-eager": stepper(ref)}


def run_cpu_train(repeats: int = 5) -> list[Row]:
    """Rows of :func:`cpu_train_steps`, timed round-robin after two untimed steps each."""
    torch.set_num_threads(CPU_CASE["threads"])
    steps = cpu_train_steps()
    first = {name: (float(step()), float(step())) for name, step in steps.items()}
    ms = interleaved_medians(steps, repeats)
    base_wall, base_cpu = ms["reference-eager"][:2]
    return [
        Row(
            name,
            ms[name][0],
            CPU_CASE["batch"] / ms[name][0] * 1e3,
            note=f"process CPU time {ms[name][1]:.0f} ms, speed-up by CPU time "
            f"{base_cpu / ms[name][1]:.2f}×; {ms[name][2]:.0f} page faults per step",
            speedup=base_wall / ms[name][0],
            first_losses=first[name],
        )
        for name in steps
    ]


@pytest.fixture(scope="module")
def cpu_impls():
    # the case's thread count for this module's rows only: `eegfast bench` runs every suite in
    # one process, and the suites after this one ran on 2 threads whatever the machine had
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_CASE["threads"])
    try:
        yield cpu_inference_impls()[0]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["eegfast", "reference-eager"])
def test_cpu_inference(benchmark, cpu_impls, impl):
    benchmark.group = "LaBraM-Base inference, 8 × 23 electrodes × 10 s, fp32, 2 threads"
    benchmark.extra_info.update(impl=impl, **CPU_CASE)
    with torch.inference_mode():
        benchmark.pedantic(cpu_impls[impl], rounds=5, warmup_rounds=1)


# --------------------------------------------------------------------------------------------
# GPU training step.
# --------------------------------------------------------------------------------------------


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """The recipe's AdamW, the same for every row: torch's fused kernel on a GPU (one launch
    for all parameters; with a GradScaler it also skips the host's read of found_inf)."""
    return torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, betas=(0.9, 0.98),
                             fused=device.type == "cuda")  # fmt: skip


def initial_weights(size: str) -> dict[str, dict[str, torch.Tensor]]:
    """One set of starting weights for every row (host copies): the eegfast student and
    tokenizer as created with seed 0. The re-created reference models have the same keys and
    shapes (checkpoint compatibility), so every row computes the same first loss."""
    torch.manual_seed(0)
    student = create_model(f"labram_{size}_pretrain").state_dict()
    return {"student": student, "tokenizer": create_model("vqnsp_base").state_dict()}


def reference_step(
    size: str, compile_model: bool, data, initial: dict | None = None
) -> Callable[[], torch.Tensor]:
    """The reference recipe: fp16 autocast + GradScaler, two sequential student passes. The
    step returns its loss (detached, not read back)."""
    x, chans, mask = data
    device = x.device
    embed, depth, heads, conv = SIZES[size]
    model = RefPretrain(embed, depth, heads, conv)
    tokenizer = RefVQNSP()
    if initial is not None:
        model.load_state_dict(initial["student"])
        tokenizer.load_state_dict(initial["tokenizer"])
    model, tokenizer = model.to(device), tokenizer.to(device).eval()
    optimizer = adamw(model, device)
    scaler = torch.amp.GradScaler(device.type)
    loss_fn = reference_pretrain_loss
    if compile_model:
        model, tokenizer.get_codebook_indices = (
            torch.compile(model),
            torch.compile(tokenizer.get_codebook_indices),
        )

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16):
            loss, _, _ = loss_fn(model, tokenizer, x, chans, mask)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def eegfast_step(
    size: str, compile_mode: str | None, data, initial: dict | None = None
) -> Callable[[], torch.Tensor]:
    """eegfast: bf16 autocast, one batched forward over both views, fused AdamW; with a
    ``compile_mode``, the student and the tokenizer's forward under ``torch.compile`` in that
    mode (``reduce-overhead``: CUDA graphs, the launches of a step replayed at once). The step
    returns its loss (detached, not read back)."""
    x, chans, mask = data
    device = x.device
    model = create_model(f"labram_{size}_pretrain")
    tokenizer = create_model("vqnsp_base")
    if initial is not None:
        model.load_state_dict(initial["student"])
        tokenizer.load_state_dict(initial["tokenizer"])
    model, tokenizer = model.to(device), tokenizer.to(device).eval()
    optimizer = adamw(model, device)
    forward, codes = model, tokenizer.get_codebook_indices
    if compile_mode is not None:
        forward = torch.compile(model, mode=compile_mode)
        codes = torch.compile(codes, mode=compile_mode)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.inference_mode():
                targets = codes(x, chans)
            loss = forward(x, chans, targets.clone(), mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# The GPU table's rows in the order they run: what issue 9 compares first (the recipe eager,
# eegfast, the recipe compiled), so that a run stopped at its time limit has those.
GPU_IMPLS: tuple[tuple[str, Callable[..., Callable[[], torch.Tensor]], bool | str | None], ...] = (
    ("reference-eager", reference_step, False),
    ("eegfast", eegfast_step, None),
    ("reference-compile", reference_step, True),
    ("eegfast-compile", eegfast_step, "default"),
    ("eegfast-compile-cudagraphs", eegfast_step, "reduce-overhead"),
)
MIN_TIMED_STEPS = 15  # do_bench times rep / (one step) steps: the slow rows get this many


def step_ms(step: Callable[[], object], one_step_ms: float) -> float:
    """Median ms of ``step()`` by ``triton.testing.do_bench``, over at least ~MIN_TIMED_STEPS
    steps (``one_step_ms``: one warm step's wall time; a fixed ``rep`` would time a single
    step of the slow reference rows, the baseline of every speed-up)."""
    from triton.testing import do_bench

    rep = max(1000.0, MIN_TIMED_STEPS * one_step_ms)
    return do_bench(step, warmup=one_step_ms, rep=rep, return_mode="median")


def release_memory() -> None:
    """Frees what earlier rows left (reference cycles such as a compiled bound method stored
    on its module, dynamo's caches of their models), so that the next row's peak memory is
    its own."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_gpu(
    size: str,
    on_row: Callable[[list[Row], str], None] | None = None,
    *,
    device: str = "cuda",
    case: dict[str, int] = GPU_CASE,
) -> tuple[list[Row], str]:
    """Rows of the GPU_IMPLS, and Markdown of the kernels of the eager ones. ``on_row(rows,
    kernels)`` is called after every row (the tables are written there)."""
    B, C, A = case["batch"], case["n_chans"], case["n_patches"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C, A, 200, device=device, generator=gen)
    chans = torch.arange(C + 1, device=device)
    mask = random_patch_mask(B, C * A, 0.5, generator=gen, device=device)
    rows: list[Row] = []
    sections: list[str] = []
    initial = initial_weights(size)
    for name, builder, compiled in GPU_IMPLS:
        release_memory()  # the previous row's step is gone by now
        step = None
        try:
            step = builder(size, compiled, (x, chans, mask), initial)
            # compile and warm up outside the timing; the first two losses are read back
            first_losses = (float(step()), float(step()))
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            one_step_ms = (time.perf_counter() - start) * 1e3
            peak = torch.cuda.max_memory_allocated() / 2**20
            ms = step_ms(step, one_step_ms)
            rows.append(Row(name, ms, B / ms * 1e3, peak, first_losses=first_losses))
            if not compiled:
                sections.append(profile_section(f"{name}, one training step", step, 5))
        except Exception as error:  # report and go on with the other implementations
            traceback.print_exc()
            rows.append(Row(name, None, None, note=f"failed: {error_line(error)}"))
        del step
        print(rows[-1], file=sys.stderr, flush=True)
        if on_row is not None:
            on_row(rows, "\n".join(sections))
    release_memory()
    return rows, "\n".join(sections)


# --------------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------------


def markdown(title: str, env: dict, rows: list[Row], baseline: str, target: str) -> str:
    base = next((r.ms for r in rows if r.impl == baseline), None)
    lines = [f"# {title}", "", target, "",
             "| impl | ms / iteration | samples/s | speed-up vs " + baseline
             + " | peak MiB | max rel. diff of outputs | loss, steps 1 / 2 | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        speedup = r.speedup
        if speedup is None and r.ms is not None and base is not None:
            speedup = base / r.ms
        ms = "—" if r.ms is None else f"{r.ms:.1f}"
        rate = "—" if r.samples_per_s is None else f"{r.samples_per_s:.1f}"
        shown_speedup = "—" if speedup is None else f"{speedup:.2f}×"
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        loss = "" if r.first_losses is None else " / ".join(f"{v:.4f}" for v in r.first_losses)
        note = r.note.replace("|", "\\|")
        lines.append(
            f"| {r.impl} | {ms} | {rate} | {shown_speedup} | {peak} | {diff} | {loss} | {note} |"
        )
    lines += ["", "Environment:", "", "```json", json.dumps(env, indent=2), "```", ""]
    return "\n".join(lines)


def save(
    out: Path, name: str, title: str, env: dict, rows: list[Row], baseline, target, echo=True
) -> None:
    write_text_atomic(out / f"{name}.md", markdown(title, env, rows, baseline, target))
    record = {"title": title, "environment": env, "rows": [asdict(r) for r in rows]}
    write_text_atomic(out / f"{name}.json", json.dumps(record, indent=2) + "\n")
    if echo:
        print(markdown(title, env, rows, baseline, target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU inference benchmark")
    parser.add_argument("--cpu-train", action="store_true", help="CPU fine-tuning step")
    parser.add_argument("--gpu", action="store_true", help="GPU training-step benchmark")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--malloc",
        choices=("both", "default", "retain"),
        default="both",
        help="CPU: glibc regime(s) to measure: as this process starts ('default'), with freed "
        "memory retained ('retain', set via MALLOC_* environment variables), or both",
    )
    args = parser.parse_args(argv)
    if not (args.cpu or args.cpu_train or args.gpu):
        parser.error("choose --cpu, --cpu-train and/or --gpu")
    if args.cpu:
        if args.malloc == "retain" and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            parser.error("--malloc retain: start the process with " + " ".join(
                f"{k}={v}" for k, v in RETAIN_MEMORY_ENV.items()))  # fmt: skip
        rows = []
        if args.malloc in ("both", "default"):
            rows += run_cpu(args.repeats, "glibc default" if args.malloc == "both" else "")
        if args.malloc == "both":
            rows += run_cpu_retaining_memory(args.repeats)
        elif args.malloc == "retain":
            rows += run_cpu(args.repeats, "freed memory retained")
        save(args.out, "cpu_labram_inference",
             "LaBraM-Base inference on CPU (fp32, 2 threads, batch 8 × 23 electrodes × 10 s)",
             environment(), rows, "reference-eager", CPU_TARGET)  # fmt: skip
    if args.cpu_train:
        save(args.out, "cpu_labram_finetune_step", CPU_TRAIN_TITLE, environment(),
             run_cpu_train(args.repeats), "reference-eager", CPU_TRAIN_NOTE)  # fmt: skip
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device")
        title = (f"LaBraM-{args.size.capitalize()} pretraining step (batch 64, 32 × 8 patches, "
                 "tokenizer forward, mixed precision, AdamW)")  # fmt: skip
        env, name = environment(gpu=True), f"gpu_pretrain_{args.size}"

        def write(rows: list[Row], kernels: str, echo: bool = False) -> None:
            save(args.out, name, title, env, rows, "reference-eager", GPU_TARGET, echo)
            write_kernel_tables(args.out, name, title, kernels)

        write(*run_gpu(args.size, write), echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
