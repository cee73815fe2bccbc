"""The pretraining head's loss: ``linear_cross_entropy`` against the kept-logits path.

Run from the repository root::

    python -m benchmarks.bench_losses            # CPU: fp32, 2 threads, 4096 tokens
    python -m benchmarks.bench_losses --gpu      # GPU: bf16 autocast, LaBraM-Base's 16384 tokens

Forward + backward of the masked-modelling head of LaBraM (200 → 8192 codes, weighted
cross-entropy over the predicted tokens): eegfast's chunked :func:`linear_cross_entropy`
against ``lm_head`` + ``F.cross_entropy`` in eager PyTorch and under ``torch.compile``, timed
round-robin in one process. On a GPU also the peak memory of each (allocated above the
inputs). Each row's loss and gradients (hidden, weight, bias) are compared with torch eager's,
so that a wrong backward cannot pass for a fast one. Results go to ``--out`` (default
``bench-results``) as ``<device>_losses.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._report import environment, interleaved_times
from eegfast.fileio import write_text_atomic
from eegfast.nn import linear_cross_entropy

E, V = 200, 8192


def kept_logits(hidden, weight, bias, labels, token_weight):
    """What the head did before: logits, the weighted cross-entropy over them and the
    accuracy (which the fused path gives too)."""
    logits = F.linear(hidden, weight, bias)
    per_token = F.cross_entropy(logits, labels, reduction="none")
    correct = logits.argmax(-1) == labels
    return (per_token * token_weight).sum(), correct


def fused(hidden, weight, bias, labels, token_weight):
    out = linear_cross_entropy(hidden, weight, bias, labels, token_weight)
    return out.loss, out.correct


def make_step(loss_fn: Callable, inputs: dict, device: torch.device, dtype) -> Callable:
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = loss_fn(**inputs)
        loss.backward()
        for name in ("hidden", "weight", "bias"):
            inputs[name].grad = None
        return loss.detach()

    return step


IMPLS = ("eegfast-linear-ce", "torch-eager", "torch-compile")


def gradients(loss_fn: Callable, inputs: dict, device: torch.device, dtype) -> list[torch.Tensor]:
    """Gradients of hidden, weight and bias (float32) of one forward + backward."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = loss_fn(**inputs)
    leaves = [inputs[name] for name in ("hidden", "weight", "bias")]
    grads = torch.autograd.grad(loss, leaves)
    return [g.float() for g in grads]


def max_grad_diff(grads: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest ``max |g - e| / max |e|`` over the gradients."""
    return max(
        ((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        for g, e in zip(grads, expected, strict=True)
    )


def run(device: torch.device, tokens: int, dtype: torch.dtype, repeats: int, only=IMPLS) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden": torch.randn(tokens, E, generator=g).to(device).requires_grad_(),
        "weight": (0.02 * torch.randn(V, E, generator=g)).to(device).requires_grad_(),
        "bias": torch.zeros(V, device=device, requires_grad=True),
        "labels": torch.randint(0, V, (tokens,), generator=g).to(device),
        "token_weight": torch.full((tokens,), 1.0 / tokens, device=device),
    }
    impls = {
        "eegfast-linear-ce": fused,
        "torch-eager": kept_logits,
        "torch-compile": torch.compile(kept_logits) if "torch-compile" in only else None,
    }
    impls = {name: fn for name, fn in impls.items() if name in only}
    steps = {name: make_step(fn, inputs, device, dtype) for name, fn in impls.items()}
    losses: dict[str, float] = {}
    failed: dict[str, Exception] = {}
    for name, step in steps.items():  # compiles here; a failure is reported, the others go on
        try:
            losses[name] = float(step())
        except Exception as error:
            traceback.print_exc()
            failed[name] = error
    steps = {name: step for name, step in steps.items() if name not in failed}
    # the timed work is forward + backward: every row's gradients against torch eager's
    expected = gradients(kept_logits, inputs, device, dtype)
    grad_diffs: dict[str, float | None] = {}
    for name in steps:
        try:
            grads = gradients(impls[name], inputs, device, dtype)
            grad_diffs[name] = max_grad_diff(grads, expected)
        except Exception:  # reported as missing, the row's timing still stands
            traceback.print_exc()
            grad_diffs[name] = None
    peaks: dict[str, float] = {}
    if device.type == "cuda":
        for name, step in steps.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20

    def timed(step):
        def call():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return call

    times: dict = {**failed, **interleaved_times({n: timed(s) for n, s in steps.items()}, repeats)}
    rows = []
    for name in impls:
        result = times[name]
        if isinstance(result, Exception):
            rows.append({"impl": name, "error": repr(result)})
            continue
        ms = 1e3 * statistics.median(t[0] for t in result)
        rows.append({"impl": name, "ms": ms, "loss": losses[name], "peak_mib": peaks.get(name),
                     "max_grad_diff": grad_diffs[name]})  # fmt: skip
    fused_ms = next((r.get("ms") for r in rows if r["impl"] == "eegfast-linear-ce"), None)
    for row in rows:
        if "ms" in row and fused_ms:
            row["speedup_of_eegfast"] = row["ms"] / fused_ms
    return {"tokens": tokens, "E": E, "V": V, "dtype": str(dtype), "rows": rows}


def markdown(result: dict, env: dict) -> str:
    lines = [
        f"# Pretraining head loss, forward + backward: {result['tokens']} tokens, "
        f"{result['E']} → {result['V']}, {result['dtype']}",
        "",
        f"{env.get('gpu') or env.get('cpu')}, torch {env['torch']}, commit {env['git_commit']}",
        "",
        "max grad diff: largest difference of a gradient (hidden, weight, bias) from torch "
        "eager's, relative to that gradient's largest value.",
        "",
        "| impl | ms (median) | eegfast faster by | peak MiB | loss | max grad diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['impl']} | failed: {row['error']} | | | | |")
            continue
        peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        diff = "—" if row["max_grad_diff"] is None else f"{row['max_grad_diff']:.1e}"
        lines.append(
            f"| {row['impl']} | {row['ms']:.2f} | {row.get('speedup_of_eegfast', 1):.2f}× | "
            f"{peak} | {row['loss']:.5f} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="on the GPU, bf16 autocast")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--only", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}"
    )
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        device, dtype = torch.device("cuda"), torch.bfloat16
        tokens, repeats = args.tokens or 16384, args.repeats or 50
    else:
        torch.set_num_threads(args.threads)
        device, dtype = torch.device("cpu"), torch.float32
        tokens, repeats = args.tokens or 4096, args.repeats or 10
    only = tuple(args.only.split(","))
    unknown = set(only) - set(IMPLS)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    result = run(device, tokens, dtype, repeats, only)
    env = environment(gpu=args.gpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{device.type}_losses"
    write_text_atomic(stem.with_suffix(".json"), json.dumps({"env": env, **result}, indent=2))
    text = markdown(result, env)
    write_text_atomic(stem.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
