"""pytest-benchmark suite of the MoE ops on CPU, and the task-routing experiment.

Run from the repository root::

    pytest benchmarks/bench_moe.py --benchmark-only
    python -m benchmarks.bench_moe --task-routing [--out bench-results]

Groups (one op at one shape, side by side):

- ``dispatch T=8192 E=8 k=2``: eegfast ``moe_dispatch`` (C++ counting sort) against the torch
  chain (stable argsort + bincount + cumsum + inverse scatter: :func:`moe_dispatch_reference`).
- ``moe-ffn-forward T=8192 D=200 H=800 E=8 k=2`` (no grad): the whole :class:`MoEFFN` forward
  (router, top-k, dispatch, expert GEMMs, combine) against a dense FFN over T·k tokens (the same
  GEMM FLOPs: the target is within 1.1x of it), a plain loop over experts
  (:func:`moe_ffn_expert_loop`) and argsort + gather (:func:`moe_ffn_torch_sorted`); the loop
  and sorted baselines include the same router.
- ``moe-ffn-train``: forward + backward of the same.

``--task-routing`` trains small MoE FFNs on a synthetic multi-task regression (each task its own
teacher MLP over the same inputs, so only the task id tells them apart) with task-aware routing
by per-task gate bias, by task embedding, and without task input, and prints / writes the
held-out error of each (``moe_task_routing.json`` / ``.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eegfast.fileio import write_text_atomic
from eegfast.nn import MoEFFN
from eegfast.ops import moe_dispatch
from eegfast.ops.moe import moe_dispatch_reference, moe_ffn_expert_loop, moe_ffn_torch_sorted

DISPATCH_SHAPE = (8192, 8, 2)  # T, E, k
FFN_SHAPE = (8192, 200, 800, 8, 2)  # T, D, H, E, k


# --------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dispatch_input():
    T, E, k = DISPATCH_SHAPE
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    return logits.topk(k, dim=1).indices


@pytest.mark.parametrize("impl", ["eegfast-cpu", "torch-argsort"])
def test_dispatch(benchmark, dispatch_input, impl):
    T, E, k = DISPATCH_SHAPE
    benchmark.group = f"dispatch T={T} E={E} k={k}"
    benchmark.extra_info.update(op="dispatch", impl=impl, threads=torch.get_num_threads())
    if impl == "eegfast-cpu":
        result = benchmark(moe_dispatch, dispatch_input, E, backend="cpu")
    else:
        result = benchmark(moe_dispatch_reference, dispatch_input, E)
    expected = moe_dispatch_reference(dispatch_input, E)
    assert all(torch.equal(a, b) for a, b in zip(result, expected, strict=True))


class DenseFFN(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def routed_baseline(moe: MoEFFN, ffn):
    """Same router as MoEFFN, then a plain-PyTorch expert computation ``ffn``."""

    def forward(x):
        probs = moe.router_logits(x, None).softmax(-1)
        top_p, idx = probs.topk(moe.top_k, -1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        weights = (moe.fc1_weight, moe.fc1_bias, moe.fc2_weight, moe.fc2_bias)
        return ffn(x, idx, gates, *weights)

    return forward


@pytest.fixture(scope="module")
def ffn_case():
    T, D, H, E, k = FFN_SHAPE
    torch.manual_seed(0)
    moe = MoEFFN(D, H, E, k, backend="cpu")
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    dense = DenseFFN(D, H)
    x = torch.randn(T, D)
    impls = {
        "eegfast-moe": moe,
        "dense-ffn-Tk-tokens": lambda x: dense(x.repeat(k, 1)),
        "loop-over-experts": routed_baseline(moe, moe_ffn_expert_loop),
        "argsort-gather": routed_baseline(moe, moe_ffn_torch_sorted),
    }
    return {"x": x, "impls": impls, "moe": moe, "dense": dense}


FFN_IMPLS = ["eegfast-moe", "dense-ffn-Tk-tokens", "loop-over-experts", "argsort-gather"]


@pytest.mark.parametrize("impl", FFN_IMPLS)
def test_moe_ffn_forward(benchmark, ffn_case, impl):
    T, D, H, E, k = FFN_SHAPE
    benchmark.group = f"moe-ffn-forward T={T} D={D} H={H} E={E} k={k}"
    benchmark.extra_info.update(op="moe-ffn-forward", impl=impl, threads=torch.get_num_threads())
    fn = ffn_case["impls"][impl]
    with torch.no_grad():
        benchmark.pedantic(fn, (ffn_case["x"],), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", FFN_IMPLS)
def test_moe_ffn_train(benchmark, ffn_case, impl):
    T, D, H, E, k = FFN_SHAPE
    benchmark.group = f"moe-ffn-train T={T} D={D} H={H} E={E} k={k}"
    benchmark.extra_info.update(op="moe-ffn-train", impl=impl, threads=torch.get_num_threads())
    fn = ffn_case["impls"][impl]
    x = ffn_case["x"].clone().requires_grad_()

    def step():
        fn(x).sum().backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


# --------------------------------------------------------------------------------------------
# Task-aware routing experiment
# --------------------------------------------------------------------------------------------


def _teacher(dim: int, generator: torch.Generator):
    w1 = torch.randn(4 * dim, dim, generator=generator) / dim**0.5
    w2 = torch.randn(dim, 4 * dim, generator=generator) / (4 * dim) ** 0.5
    return lambda x: F.gelu(x @ w1.T) @ w2.T


def task_routing_run(
    routing: str | None,
    seed: int,
    *,
    num_tasks: int = 4,
    dim: int = 16,
    hidden: int = 32,
    num_experts: int = 8,
    top_k: int = 2,
    steps: int = 400,
    batch: int = 256,
) -> float:
    """Held-out MSE (relative to the targets' variance) after training one MoE FFN on the
    synthetic multi-task problem; ``routing`` None = no task input (the router sees x only)."""
    data_gen = torch.Generator().manual_seed(1000 + seed)
    teachers = [_teacher(dim, data_gen) for _ in range(num_tasks)]
    torch.manual_seed(seed)
    moe = MoEFFN(
        dim,
        hidden,
        num_experts,
        top_k,
        num_tasks=num_tasks if routing else 0,
        task_routing=routing or "bias",
        backend="cpu",
    )
    optimizer = torch.optim.Adam(moe.parameters(), lr=3e-3)

    def sample(n, gen):
        x = torch.randn(n, dim, generator=gen)
        tasks = torch.randint(0, num_tasks, (n,), generator=gen)
        y = torch.stack([teachers[t](x) for t in range(num_tasks)])[tasks, torch.arange(n)]
        return x, tasks, y

    train_gen = torch.Generator().manual_seed(2000 + seed)
    for _ in range(steps):
        x, tasks, y = sample(batch, train_gen)
        out = moe(x, task_id=tasks if routing else None)
        aux = moe.last_aux
        loss = F.mse_loss(out, y) + 1e-2 * aux.load_balance_loss + 1e-3 * aux.z_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moe.eval()
    with torch.no_grad():
        x, tasks, y = sample(4096, torch.Generator().manual_seed(3000 + seed))
        out = moe(x, task_id=tasks if routing else None)
        return float(F.mse_loss(out, y) / y.var())


def task_routing_experiment(seeds: int = 3) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for routing in ("bias", "embedding", None):
        name = routing or "no-task-input"
        results[name] = [task_routing_run(routing, seed) for seed in range(seeds)]
        print(f"{name:>14}: " + " ".join(f"{v:.4f}" for v in results[name]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_moe", description=__doc__)
    parser.add_argument("--task-routing", action="store_true", help="run the routing experiment")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    if not args.task_routing:
        parser.print_help()
        return 0
    torch.set_num_threads(1)  # tiny problem: threads only add synchronisation
    start = time.perf_counter()
    results = task_routing_experiment(args.seeds)
    lines = [
        "# Task-aware routing on a synthetic multi-task regression",
        "",
        "Held-out MSE / target variance (lower is better), one column per seed; "
        "4 tasks, D=16, hidden 32, 8 experts, top-2, 400 Adam steps of 256 tokens.",
        "",
        "| routing | " + " | ".join(f"seed {i}" for i in range(args.seeds)) + " | mean |",
        "|---|" + "---:|" * (args.seeds + 1),
    ]
    for name, values in results.items():
        mean = sum(values) / len(values)
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {mean:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "moe_task_routing.md", "\n".join(lines) + "\n")
    write_text_atomic(out / "moe_task_routing.json", json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    print(f"({time.perf_counter() - start:.0f} s) wrote {out / 'moe_task_routing.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
