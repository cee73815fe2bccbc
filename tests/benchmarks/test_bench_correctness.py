"""The benchmarks' correctness: results land where they are read, and every timed
row's work is checked against a reference in the same run (a fast wrong kernel must not win)."""

from __future__ import annotations

import json

import pytest
import torch

from eegfast import cli

TOY_SUITE = """
def test_toy(benchmark):
    benchmark.group = "toy"
    benchmark(sum, range(10))
"""


def test_bench_command_reads_its_results_from_a_relative_out_outside_the_checkout(
    tmp_path, monkeypatch, capsys
):
    """pytest runs in the checkout's root: a relative --out was written there and read here
    ("the benchmarks wrote no results"), or an earlier run's bench.json here was reported."""
    suites = tmp_path / "checkout" / "benchmarks"
    suites.mkdir(parents=True)
    (suites / "bench_toy.py").write_text(TOY_SUITE)
    here = tmp_path / "elsewhere"
    (here / "out").mkdir(parents=True)
    stale = {"benchmarks": [{"group": "stale", "name": "old", "fullname": "old",
                             "stats": {"median": 1.0, "rounds": 1}}]}  # fmt: skip
    (here / "out" / "bench.json").write_text(json.dumps(stale))
    monkeypatch.chdir(here)
    args = ["bench", "--benchmarks", "../checkout/benchmarks", "--out", "out", "--quick"]
    assert cli.main(args) == 0
    report = (here / "out" / "bench.md").read_text()
    assert "| toy | test_toy |" in report and "stale" not in report
    assert not (tmp_path / "checkout" / "out").exists()

    # a run that writes no results fails, rather than reporting the previous run's
    (suites / "bench_toy.py").write_text("raise SystemExit('broken suite')\n")
    assert cli.main(args) == 2
    assert "wrote no results" in capsys.readouterr().err


class _DoubledGradient(torch.autograd.Function):
    """The identity forward, twice the gradient backward: a kernel whose forward is right and
    whose backward is wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _instant_timer(fn, grad_to_none):
    for x in grad_to_none:
        x.grad = None
    fn()
    return 1.0


def test_qk_bench_checks_the_gradients_of_the_timed_backward(monkeypatch, tmp_path):
    """fwd+bwd rows time the backward, but only the forward output was compared with the
    reference: a backward giving wrong gradients (here twice the right ones) showed a clean
    max_abs_err and its speed."""
    from benchmarks import gpu_qk_norm_attention as bench

    def wrong_backward(q, k, v, params):
        return _DoubledGradient.apply(bench.layer_norm_sdpa(q, k, v, params))

    impls = {bench.OURS: bench.layer_norm_sdpa, "wrong-backward": wrong_backward}
    monkeypatch.setattr(bench, "implementations", lambda: impls)
    rows = bench.run_cases({"s": (1, 2, 9, 8)}, torch.float32, "cpu", _instant_timer)
    errors = {(r.mode, r.impl): (r.max_abs_err, r.max_grad_err) for r in rows}
    assert errors["fwd", bench.OURS][1] is None and errors["fwd", "wrong-backward"][1] is None
    assert errors["fwd+bwd", bench.OURS][1] < 1e-5
    assert errors["fwd+bwd", "wrong-backward"][0] < 1e-5  # the forward alone looks right
    assert errors["fwd+bwd", "wrong-backward"][1] == pytest.approx(1.0, rel=1e-4)
    paths = bench.write_outputs(tmp_path, "t", {}, rows, "qk", png=False)
    table = paths["md"].read_text()
    assert "| max_abs_err | max_grad_err |" in table and "| 1.00e+00 |" in table


def test_cpu_qk_report_checks_the_gradients_of_the_timed_backward(monkeypatch):
    """The CPU report's forward+backward rows compared only the forward output as well."""
    from benchmarks import report_qk_norm_attention as report

    def wrong_backward(q, k, v, qw, qb, kw, kb):
        d = q.shape[-1]
        qn = torch.nn.functional.layer_norm(q, (d,), qw, qb, report.EPS)
        kn = torch.nn.functional.layer_norm(k, (d,), kw, kb, report.EPS)
        out = torch.nn.functional.scaled_dot_product_attention(qn, kn, v)
        return _DoubledGradient.apply(out)

    monkeypatch.setattr(report, "CPU_SHAPES", [(1, 2, 9, 20)])
    monkeypatch.setattr(report, "layer_norm_sdpa", wrong_backward)
    rows = report.run_cases(1, only=["eegfast-cpu", "torch-ln-sdpa"], progress=str)
    errors = {(r.mode, r.impl): (r.max_abs_error, r.max_grad_error) for r in rows}
    assert errors["forward", "eegfast-cpu"][1] is None
    assert errors["forward+backward", "eegfast-cpu"][1] < 1e-4
    assert errors["forward+backward", "torch-ln-sdpa"][0] < 1e-5
    assert errors["forward+backward", "torch-ln-sdpa"][1] == pytest.approx(1.0, rel=1e-4)
    assert "| max grad error |" in report.markdown("t", {}, rows)


def test_moe_bench_checks_the_gradients_of_the_timed_backward(monkeypatch):
    """The MoE rows time forward + backward, but only the forward output was compared."""
    from benchmarks import gpu_moe
    from eegfast.ops.moe import moe_ffn_expert_loop

    def wrong_backward(*inputs):
        return _DoubledGradient.apply(moe_ffn_expert_loop(*inputs))

    impls = {"eegfast": moe_ffn_expert_loop, "wrong-backward": wrong_backward}
    monkeypatch.setattr(gpu_moe, "implementations", lambda: impls)
    rows = gpu_moe.run_cases({"s": (16, 8, 12, 4)}, (), "cpu", torch.float32, _instant_timer)
    errors = {r.impl: (r.max_abs_err, r.max_grad_err) for r in rows}
    assert errors["eegfast"][1] < 1e-6
    assert errors["wrong-backward"][0] < 1e-6  # the forward alone looks right
    assert errors["wrong-backward"][1] == pytest.approx(1.0, rel=1e-4)
    assert "| max grad err |" in gpu_moe.markdown_text("t", {}, rows)


def test_vq_lookup_ema_rows_are_checked_against_a_float64_step(monkeypatch):
    """lookup+ema rows were timed with no check of the codebook they leave ("—" in "matches
    reference"): an EMA kernel with the wrong decay looked as good as a right one."""
    from benchmarks import _report
    from eegfast.ops import vq_ema_update, vq_nearest

    def wrong_decay(z, state):
        indices = vq_nearest(z, state.codebook.to(z.dtype), "cosine", backend="cpu")
        vq_ema_update(z, indices, state.codebook, state.cluster_size, state.embed_sum,
                      decay=0.5, backend="cpu")  # fmt: skip

    right = _report.ema_impls(["cpu"])
    monkeypatch.setattr(_report, "ema_impls", lambda backends: {**right, "wrong": wrong_decay})
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)

    def timer(fn, reset):
        if reset is not None:
            reset()
        fn()
        return 1.0

    results = _report.run_vq_cases([(96, 16, 8)], [torch.float32, torch.bfloat16], "cpu",
                                   ["cpu"], timer, progress=str)  # fmt: skip
    ema = {(r.impl, r.dtype): r.matches_reference for r in results if r.op == "lookup+ema"}
    assert ema["labram-recipe", "float32"] == "16/16"  # in bf16 its lookup may differ on ties
    for dtype in ("float32", "bfloat16"):
        assert ema["eegfast-cpu", dtype] == "16/16"
        assert int(ema["wrong", dtype].split("/")[0]) < 8


def test_pretrain_rows_train_with_the_same_optimizer(monkeypatch):
    """The eegfast rows used torch's fused AdamW and the reference rows its default one: part of
    the reported speed-up was an optimizer flag open to the reference too."""
    from benchmarks import bench_pretrain as bench
    from eegfast.models import random_patch_mask

    built = []

    class Recorder:
        def __init__(self, params, **kwargs):
            built.append(kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    x, chans = torch.randn(1, 2, 2, 200), torch.arange(3)
    data = (x, chans, random_patch_mask(1, 4, 0.5))
    bench.reference_step("base", False, data)
    bench.eegfast_step("base", None, data)
    assert len(built) == 2 and built[0] == built[1]
    bench.adamw(torch.nn.Linear(2, 2), torch.device("cuda"))
    assert built[-1]["fused"] is True


def test_cpu_finetune_step_rows_compute_the_same_training_steps():
    """The CPU fine-tuning rows start from one set of weights and batch and make the same
    updates: their first two losses agree (a row that trained another model, dropped a term
    or skipped the update would differ at step 1 or 2)."""
    from benchmarks import bench_pretrain as bench

    steps = bench.cpu_train_steps(case=dict(batch=2, n_chans=3, n_patches=2))
    losses = {name: [float(step()) for _ in range(3)] for name, step in steps.items()}
    assert losses["eegfast"] == pytest.approx(losses["reference-eager"], rel=1e-4)
    assert losses["eegfast"][2] != pytest.approx(losses["eegfast"][0], rel=1e-3)  # it trains


def test_head_loss_bench_checks_the_gradients_of_the_timed_backward(monkeypatch):
    """The head-loss rows time forward + backward but compared only the loss values."""
    from types import SimpleNamespace

    from benchmarks import bench_losses

    def wrong_backward(hidden, weight, bias, labels, token_weight):
        loss, correct = bench_losses.kept_logits(hidden, weight, bias, labels, token_weight)
        return SimpleNamespace(loss=_DoubledGradient.apply(loss), correct=correct)

    monkeypatch.setattr(bench_losses, "linear_cross_entropy", wrong_backward)
    only = ("eegfast-linear-ce", "torch-eager")
    result = bench_losses.run(torch.device("cpu"), 48, torch.float32, 1, only)
    rows = {row["impl"]: row for row in result["rows"]}
    assert rows["eegfast-linear-ce"]["loss"] == pytest.approx(rows["torch-eager"]["loss"])
    assert rows["torch-eager"]["max_grad_diff"] == 0.0
    assert rows["eegfast-linear-ce"]["max_grad_diff"] == pytest.approx(1.0, rel=1e-5)
    assert "| max grad diff |" in bench_losses.markdown(result, {"torch": "t", "git_commit": "c"})


def test_moe_bench_gives_torch_compile_its_chance_on_the_named_shapes():
    """The strongest plain-PyTorch MoE runs under torch.compile too, checked like the others
    (output and gradients against the fp32 loop); the expert sweep leaves it out."""
    from benchmarks import gpu_moe

    seen = []
    rows = gpu_moe.run_cases(
        {"tiny": (12, 8, 16, 3)},
        (2,),
        "cpu",
        torch.float32,
        gpu_moe.perf_counter_timer,
        lambda rows: seen.append([r.impl for r in rows]),
    )
    # timed after every other row, the sweep's included (its compilation takes longest)
    assert [("argsort+grouped_mm-compile" in names) for names in seen] == [False] * (
        len(seen) - 1
    ) + [True]
    compiled = [r for r in rows if r.impl == "argsort+grouped_mm-compile"]
    assert [r.shape for r in compiled] == ["tiny"]
    assert compiled[0].ms is not None and compiled[0].max_abs_err < 1e-5
    assert compiled[0].max_grad_err < 1e-5


@pytest.mark.parametrize("D", [20, 25, 50])
def test_qk_bench_padded_sdpa_baseline_computes_the_attention(D):
    """The head-dim-padded SDPA baseline keeps the softmax scale of D and drops the padding."""
    from benchmarks import gpu_qk_norm_attention as bench

    (q, k, v), params, _ = bench.make_inputs((2, 3, 17, D), "cpu", torch.float32)
    with torch.no_grad():
        got = bench.layer_norm_sdpa_padded(q, k, v, params)
        torch.testing.assert_close(got, bench.eager_reference(q, k, v, params))
    assert "layernorm+sdpa-pad8" in bench.ESSENTIAL


def test_moe_bench_writes_its_tables_after_every_row(monkeypatch, tmp_path):
    """A run stopped at its time limit (here: interrupted at the second row) keeps the rows it
    finished in gpu_moe.csv / .md."""
    from benchmarks import gpu_moe

    def interrupted(*inputs):
        raise KeyboardInterrupt

    impls = {"eegfast": gpu_moe.implementations()["eegfast"], "loop-over-experts": interrupted}
    monkeypatch.setattr(gpu_moe, "implementations", lambda: impls)

    def tables(rows):
        gpu_moe.write_outputs(tmp_path, "t", {}, rows, with_plot=False)

    with pytest.raises(KeyboardInterrupt):
        gpu_moe.run_cases(
            {"tiny": (12, 8, 16, 3)}, (), "cpu", torch.float32, gpu_moe.perf_counter_timer, tables
        )
    table = (tmp_path / "gpu_moe.md").read_text()
    assert "| tiny | 12 | 8 | 16 | 3 | eegfast |" in table and "loop-over-experts" not in table
