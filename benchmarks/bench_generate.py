"""Generation speed of the hybrid model: key/value cache vs re-encoding the context (patches/s).

pytest-benchmark (CPU)::

    pytest benchmarks/bench_generate.py --benchmark-only

Script (CPU or GPU; writes JSON + Markdown into ``--out``)::

    python -m benchmarks.bench_generate [--device cuda] [--sizes tiny base] [--out bench-results]

One case = one model size, 19 electrodes (the 10-20 montage of the bundled eegmat recordings),
a prompt of 4 one-second patches, then N patches generated with ``mode="tokens"`` (top-k
sampling + the code-conditioned signal head). N = 12 stays inside LaBraM's 16-patch window;
N = 28 makes the window slide (cut to 8 patches and re-encoded every 8 steps). "no cache"
re-encodes the whole window with the block-causal forward at every step (the fused attention op
with ``block_causal`` ids), "cache" runs only the new patch's 19 tokens through the blocks
against the cached LayerNorm'ed keys/values. Both produce the same output (tests check it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from eegfast.electrodes import labram_input_chans
from eegfast.fileio import write_text_atomic
from eegfast.models.hybrid import create_hybrid_model, generate

PROMPT_PATCHES = 4
CASES = [("tiny", 12), ("tiny", 28), ("base", 12), ("base", 28)]
EEGMAT_NAMES = (
    "FP1", "FP2", "F3", "F4", "F7", "F8", "T7", "T8", "C3", "C4",
    "P7", "P8", "P3", "P4", "O1", "O2", "FZ", "CZ", "PZ",
)  # fmt: skip


def build(size: str, device: torch.device, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = create_hybrid_model(f"labram_{size}_pretrain", device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompt = 0.2 * torch.randn(1, len(EEGMAT_NAMES), PROMPT_PATCHES, 200, generator=g)
    chans = torch.tensor(labram_input_chans(EEGMAT_NAMES))
    return model, prompt.to(device=device, dtype=dtype), chans.to(device)


def run_once(model, prompt, chans, patches: int, use_cache: bool) -> torch.Tensor:
    g = torch.Generator(device=prompt.device).manual_seed(0)
    return generate(model, prompt, chans, patches, top_k=50, generator=g, use_cache=use_cache)


# --------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}patches")
def case(request):
    size, patches = request.param
    model, prompt, chans = build(size, torch.device("cpu"))
    return size, patches, model, prompt, chans


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate(benchmark, case, use_cache):
    size, patches, model, prompt, chans = case
    benchmark.group = f"generate {size} C={len(EEGMAT_NAMES)} prompt={PROMPT_PATCHES} N={patches}"
    benchmark.extra_info.update(
        size=size, patches=patches, cache=use_cache, threads=torch.get_num_threads()
    )
    rounds = 3 if size == "tiny" else 1
    benchmark.pedantic(
        run_once, args=(model, prompt, chans, patches, use_cache), rounds=rounds, iterations=1
    )
    benchmark.extra_info["patches_per_s"] = patches / benchmark.stats.stats.median


# --------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------


def measure(size: str, patches: int, device: torch.device, repeats: int) -> dict:
    model, prompt, chans = build(size, device)
    row = {
        "size": size,
        "patches": patches,
        "electrodes": len(EEGMAT_NAMES),
        "prompt": PROMPT_PATCHES,
    }
    outputs = {}
    for use_cache in (True, False):
        run_once(model, prompt, chans, min(patches, 3), use_cache)  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[use_cache] = run_once(model, prompt, chans, patches, use_cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        key = "cache" if use_cache else "no_cache"
        row[f"{key}_s"] = statistics.median(times)
        row[f"{key}_patches_per_s"] = patches / statistics.median(times)
    row["speedup"] = row["no_cache_s"] / row["cache_s"]
    row["max_abs_diff"] = float((outputs[True] - outputs[False]).abs().max())
    return row


def main(argv: list[str] | None = None) -> int:
    from benchmarks._report import environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sizes = list(dict.fromkeys(size for size, _ in CASES))
    parser.add_argument("--sizes", nargs="+", choices=sizes, default=sizes)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [
        measure(size, patches, device, args.repeats)
        for size, patches in CASES
        if size in args.sizes
    ]
    env = environment(gpu=device.type == "cuda")
    lines = [
        f"# Generation speed: KV cache vs re-encoding ({device.type})",
        "",
        ", ".join(f"{k}={v}" for k, v in env.items()),
        "",
        # (no '|' inside a cell: it would split the header, and the table would not render)
        "| model | patches | cache (patches/s) | no cache (patches/s) | speed-up | max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['patches']} | {r['cache_patches_per_s']:.1f} | "
            f"{r['no_cache_patches_per_s']:.1f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"generate_{device.type}.md", text)
    write_text_atomic(
        out / f"generate_{device.type}.json",
        json.dumps({"environment": env, "results": rows}, indent=2),
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
