"""The benchmark writers (benchmarks/_report.py) and runners' plumbing, without timing anything."""

import json

import pytest
import torch

from benchmarks import gpu, report_cpu
from benchmarks._report import (
    Result,
    environment,
    interleaved_times,
    ratios,
    run_vq_cases,
    write_results,
)


def fake_results() -> list[Result]:
    case = dict(n=32768, k=8192, d=32, dtype="bfloat16")
    return [
        Result("lookup", "eegfast-cuda", **case, ms=0.5, matches_reference="256/256"),
        Result("lookup", "eegfast-triton", **case, ms=0.4, matches_reference="256/256"),
        Result("lookup", "torch-eager", **case, ms=1.2, matches_reference="250/256"),
        Result("lookup", "torch-compile", **case, ms=None, note="torch.compile failed: X | Y"),
        Result("lookup", "labram-recipe", **case, ms=2.0, matches_reference="249/256"),
        Result("lookup+ema", "eegfast-cuda", **case, ms=0.8),
        Result("lookup+ema", "labram-recipe", **case, ms=4.0),
    ]


def test_ratios_are_relative_to_the_fastest_eegfast_row_of_the_group():
    assert ratios(fake_results()) == pytest.approx([1.25, 1.0, 3.0, None, 5.0, 1.0, 5.0])


def test_write_results_writes_json_markdown_and_png(tmp_path):
    env = {"git_commit": "abc123", "gpu": "Fake GPU", "torch": "2.13.0"}
    paths = write_results(tmp_path / "out", "gpu_vq", "fake run", env, fake_results())

    payload = json.loads(paths["json"].read_text())
    assert payload["environment"] == env
    assert [r["impl"] for r in payload["results"]][:2] == ["eegfast-cuda", "eegfast-triton"]
    assert payload["results"][2]["ratio_vs_eegfast"] == pytest.approx(3.0)
    assert payload["results"][3]["ms"] is None

    markdown = paths["md"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| op |"))
    assert "ratio" in header
    assert "| 3.00× |" in markdown  # torch-eager: 1.2 ms / 0.4 ms
    assert "| 5.00× |" in markdown
    assert "X \\| Y" in markdown  # a '|' in a note must not break the table
    assert "Fake GPU" in markdown and "abc123" in markdown

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_environment_records_machine_versions_and_commit():
    env = environment()
    for key in ("git_commit", "torch", "cpu", "torch_threads"):
        assert env[key]
    json.dumps(env)


def test_run_vq_cases_records_every_implementation(monkeypatch):
    # No compilation (seconds) in a unit test: torch.compile returns the function itself.
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    resets = []

    def timer(fn, reset):
        if reset is not None:
            reset()
            resets.append(True)
        fn()
        return 1.0

    results = run_vq_cases([(40, 24, 8)], [torch.float32], "cpu", ["cpu"], timer, progress=str)
    assert [(r.op, r.impl) for r in results] == [
        ("lookup", "eegfast-cpu"),
        ("lookup", "torch-eager"),
        ("lookup", "torch-compile"),
        ("lookup", "labram-recipe"),
        ("lookup+ema", "eegfast-cpu"),
        ("lookup+ema", "labram-recipe"),
    ]
    assert all(r.ms == 1.0 for r in results)
    assert results[0].matches_reference == "40/40"
    assert len(resets) == 2


def test_cpu_median_ms_runs_reset_before_every_run():
    calls = []
    report_cpu.median_ms(lambda: calls.append("fn"), lambda: calls.append("reset"), repeats=3)
    assert calls == ["reset", "fn"] * 4  # one warm-up, then three timed runs


def test_gpu_runner_exits_with_a_message_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path)]) == 2
    assert "CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_failing_implementation_is_recorded_and_the_others_still_run(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)

    def timer(fn, reset):
        fn()
        return 1.0

    results = run_vq_cases([(16, 8, 4)], [torch.float32], "cpu", ["bogus"], timer, progress=str)
    failed = [r for r in results if r.impl == "eegfast-bogus"]
    assert [r.op for r in failed] == ["lookup", "lookup+ema"]
    assert all(r.ms is None and r.note.startswith("failed: ValueError") for r in failed)
    assert all(r.ms == 1.0 for r in results if r.impl != "eegfast-bogus")


def test_interleaved_times_runs_round_robin_and_keeps_failures_apart():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def broken():
        calls.append("broken")
        raise RuntimeError("no kernel here")

    ticks = iter(range(1000))
    fns = {"a": make("a"), "b": make("b"), "broken": broken}
    times = interleaved_times(fns, repeats=3, clocks=(lambda: float(next(ticks)),), warmup=1)
    # one warm-up round, then three timed rounds, each callable once per round, in turn
    assert calls == ["a", "b", "broken"] + ["a", "b"] * 3
    assert len(times["a"]) == len(times["b"]) == 3
    assert all(len(t) == 1 and t[0] > 0 for t in times["a"])
    assert isinstance(times["broken"], RuntimeError)


def test_qk_norm_attention_report_times_only_the_chosen_implementations(monkeypatch, tmp_path):
    from benchmarks import report_qk_norm_attention as report

    monkeypatch.setattr(report, "CPU_SHAPES", [(1, 2, 9, 20)])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **_: compiled.append(fn) or fn)
    rows = report.run_cases(1, only=["eegfast-cpu", "torch-ln-sdpa"], progress=str)
    assert [(r.mode, r.impl) for r in rows] == [
        (mode, impl) for mode in report.MODES for impl in ("eegfast-cpu", "torch-ln-sdpa")
    ]
    assert not compiled  # torch.compile is not even built when it is not timed
    assert all(r.median_ms > 0 and r.max_abs_error < 1e-5 for r in rows)
    with pytest.raises(SystemExit):  # the ratios need eegfast-cpu
        report.main(["--only", "torch-ln-sdpa", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        report.main(["--only", "eegfast-cpu,flash", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_kernel_breakdown_names_the_work_and_its_share():
    from benchmarks._profile import kernel_table, kernel_times, profile_section

    a, b = torch.randn(300, 300), torch.randn(300, 300)
    times = kernel_times(lambda: (a @ b).relu(), iterations=3)
    names = [t.name for t in times]
    assert "aten::mm" in names and ("aten::relu" in names or "aten::clamp_min" in names)
    assert all(t.ms > 0 for t in times) and times == sorted(times, key=lambda t: -t.ms)
    assert next(t for t in times if t.name == "aten::mm").launches == 1
    table = kernel_table("matmul", times, top=1)
    assert table.startswith("### matmul") and f"{len(times) - 1} others" in table

    def broken():
        raise ValueError("no device")

    assert "not profiled: ValueError: no device" in profile_section("broken", broken)


def test_head_loss_benchmark_writes_rows_that_agree(tmp_path, capsys):
    from benchmarks import bench_losses

    only = "eegfast-linear-ce,torch-eager"
    bench_losses.main(["--tokens", "48", "--repeats", "1", "--only", only, "--out", str(tmp_path)])
    result = json.loads((tmp_path / "cpu_losses.json").read_text())
    rows = {row["impl"]: row for row in result["rows"]}
    assert set(rows) == set(only.split(","))
    assert rows["eegfast-linear-ce"]["loss"] == pytest.approx(rows["torch-eager"]["loss"], 1e-5)
    assert "| torch-eager |" in (tmp_path / "cpu_losses.md").read_text()
    with pytest.raises(SystemExit, match="--only: unknown"):
        bench_losses.main(["--only", "flash", "--out", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# The GPU benchmarks' plumbing on CPU (what a lent GPU's short lease must not find broken).
# --------------------------------------------------------------------------------------------


def _qk_fakes(monkeypatch, bench, calls, kill_at=None):
    """bench.implementations() replaced by cheap LayerNorm + SDPA stand-ins (no compilation)
    that log their (impl, mode) calls; ``kill_at``: the (impl, mode) that raises
    KeyboardInterrupt, as the stage's time limit stops the process."""

    def fake(name):
        def attention(q, k, v, params):
            mode = "fwd+bwd" if torch.is_grad_enabled() else "fwd"
            calls.append((name, mode))
            if (name, mode) == kill_at:
                raise KeyboardInterrupt
            return bench.layer_norm_sdpa(q, k, v, params)

        return attention

    names = [bench.OURS, bench.FUSED, "eager-reference", "layernorm+sdpa"]
    monkeypatch.setattr(bench, "implementations", lambda: {n: fake(n) for n in names})
    return names


def _instant_timer(fn, grad_to_none):
    for x in grad_to_none:
        x.grad = None
    fn()
    return 1.0


def test_qk_bench_writes_its_table_after_every_row_and_times_the_comparison_first(tmp_path):
    """A stage stopped at its time limit (the first GPU run lost its whole table so) keeps the
    rows it timed, and those are issue 4's comparison of every case before the pinned eegfast
    variants."""
    from benchmarks import gpu_qk_norm_attention as bench

    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        names = _qk_fakes(mp, bench, calls, kill_at=("layernorm+sdpa", "fwd+bwd"))

        def write(rows):
            bench.write_outputs(tmp_path, "partial", {}, rows, "qk", png=False)

        with pytest.raises(KeyboardInterrupt):
            bench.run_cases({"s": (1, 2, 9, 8)}, torch.float32, "cpu", _instant_timer,
                            on_row=write)  # fmt: skip
    lines = (tmp_path / "qk.csv").read_text().splitlines()[1:]
    done = [tuple(line.split(",")[6:8]) for line in lines]
    assert done == [("fwd", bench.OURS), ("fwd", "eager-reference"), ("fwd", "layernorm+sdpa"),
                    ("fwd+bwd", bench.OURS), ("fwd+bwd", "eager-reference")]  # fmt: skip
    assert (bench.FUSED, "fwd") not in calls  # the variants wait for the comparison

    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        _qk_fakes(mp, bench, calls)
        rows = bench.run_cases({"s": (1, 2, 9, 8)}, torch.float32, "cpu", _instant_timer)
    # the table keeps its order: case, then implementation
    assert [(r.mode, r.impl) for r in rows] == [(m, n) for m in bench.MODES for n in names]
    assert all(r.ms == 1.0 and r.max_abs_err < 1e-5 for r in rows)


def test_qk_bench_lets_torch_compile_keep_a_graph_for_every_case(monkeypatch):
    """dynamo keeps one graph per (shape, grad mode) of a compiled function, up to its
    recompile limit (8) and then runs the function eagerly, silently: every case must fit."""
    from benchmarks import gpu_qk_norm_attention as bench

    limits = []
    monkeypatch.setattr(
        bench,
        "implementations",
        lambda: {bench.OURS: lambda q, k, v, p: limits.append(
            torch._dynamo.config.recompile_limit) or bench.layer_norm_sdpa(q, k, v, p)},
    )  # fmt: skip
    before = torch._dynamo.config.recompile_limit
    shapes = {f"s{n}": (1, 1, n, 8) for n in (3, 4, 5, 6, 7)}  # 10 cases
    bench.run_cases(shapes, torch.float32, "cpu", _instant_timer)
    assert min(limits) >= 2 * len(shapes)
    assert torch._dynamo.config.recompile_limit == before


def test_qk_bench_gpu_entry_writes_every_file_around_a_failing_extra(monkeypatch, tmp_path):
    """run() (the GPU entry, otherwise run only on a GPU): the partial table while rows come
    in, then table, plot, tuning report and kernel tables, even when reading Triton's caches
    for the tuning report fails."""
    from benchmarks import gpu_qk_norm_attention as bench

    case = dict(shape="base", B=128, H=10, N=257, D=20, dtype="bfloat16")
    rows = [bench.Row(**case, mode="fwd", impl=bench.OURS, ms=0.1, max_abs_err=1e-3)]
    seen = []

    def run_cases(shapes, dtype, device, timer, tuning, on_row):
        assert list(shapes) == ["base"] and dtype == torch.bfloat16 and device == "cuda"
        on_row(rows)
        seen.append((tmp_path / "gpu_qk_norm_attention.md").read_text())
        return rows

    def broken():
        raise AttributeError("'tuple' object has no attribute 'items'")

    monkeypatch.setattr(bench, "run_cases", run_cases)
    monkeypatch.setattr(bench, "compiled_kernels", broken)
    monkeypatch.setattr(bench, "kernel_breakdown", lambda shapes, device, dtype: "### kernels")
    paths = bench.run(tmp_path, {"gpu": "fake"}, ["base"])
    assert "partial" in seen[0] and "| eegfast-triton |" in seen[0]
    assert "partial" not in paths["md"].read_text()
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    tuning = json.loads(paths["tuning"].read_text())
    assert tuning["compiled"] == [{"failed": "AttributeError: 'tuple' object has no attribute "
                                             "'items'"}]  # fmt: skip
    assert "### kernels" in paths["kernels"].read_text()


def _fake_cuda(monkeypatch, bench, events):
    """torch.cuda's synchronisation and memory counters, do_bench and the profiler replaced,
    so that run_gpu runs its rows on CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda *a, **k: events.append("reset"))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**20)
    monkeypatch.setattr(bench, "step_ms", lambda step, one_step_ms: 2.0)
    monkeypatch.setattr(bench, "profile_section", lambda title, fn, iterations=10: f"### {title}")
    monkeypatch.setattr(bench, "environment", lambda gpu=False: {"gpu": "fake"})
    monkeypatch.setattr(bench, "initial_weights", lambda size: {"size": size})
    run_gpu = bench.run_gpu
    monkeypatch.setattr(bench, "run_gpu", lambda size, on_row=None: run_gpu(
        size, on_row, device="cpu", case=TINY_CASE))  # fmt: skip


TINY_CASE = dict(batch=2, n_chans=2, n_patches=2)


def _no_nan(constant):
    raise ValueError(f"not JSON: {constant}")


def test_gpu_pretrain_keeps_every_row_through_a_failure_and_a_killed_run(monkeypatch, tmp_path):
    """A row failing with an exception that has no message (it crashed the whole benchmark:
    the note read the message's first line) is reported and the others go on; the tables are
    written after every row, so a run stopped at its time limit keeps the finished rows; the
    JSON stays strict (no NaN for a failed row)."""
    from benchmarks import bench_pretrain as bench

    events: list = []
    _fake_cuda(monkeypatch, bench, events)

    def working(size, compiled, data, initial):
        x, chans, mask = data
        assert x.shape == (2, 2, 2, 200) and mask.shape == (2, 4)
        return lambda: torch.tensor(9.0)

    def failing(size, compiled, data, initial):
        raise AssertionError

    def killed(size, compiled, data, initial):
        raise KeyboardInterrupt

    impls = (("reference-eager", working, False), ("eegfast", failing, None),
             ("reference-compile", working, True),
             ("eegfast-compile", killed, "default"))  # fmt: skip
    monkeypatch.setattr(bench, "GPU_IMPLS", impls)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--gpu", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "gpu_pretrain_base.json").read_text(), parse_constant=_no_nan)
    rows = {row["impl"]: row for row in record["rows"]}
    assert list(rows) == ["reference-eager", "eegfast", "reference-compile"]
    assert rows["reference-eager"]["ms"] == 2.0 and rows["reference-eager"]["peak_mib"] == 3.0
    assert rows["reference-eager"]["samples_per_s"] == pytest.approx(1000.0)  # batch 2 / 2 ms
    assert rows["eegfast"]["ms"] is None and rows["eegfast"]["note"] == "failed: AssertionError: "
    table = (tmp_path / "gpu_pretrain_base.md").read_text()
    assert "| eegfast | — | — | — |" in table and "| reference-compile | 2.0 |" in table
    assert rows["reference-eager"]["first_losses"] == [9.0, 9.0] and "| 9.0000 / 9.0000 |" in table
    assert (tmp_path / "gpu_pretrain_base_kernels.md").exists()


def test_gpu_pretrain_peak_memory_is_measured_without_the_rows_before(monkeypatch):
    """Each row's peak is reset once the rows before it are freed, reference cycles included
    (the compiled reference row stores a compiled bound method on its tokenizer)."""
    import gc
    import weakref

    from benchmarks import bench_pretrain as bench

    events: list = []
    _fake_cuda(monkeypatch, bench, events)
    alive: list[weakref.ref] = []

    class Model:  # stands for a row's model, optimizer and tokenizer
        def __init__(self):
            self.me = self  # a reference cycle, as tokenizer.get_codebook_indices = compiled

    def builder(size, compiled, data, initial):
        model = Model()
        alive.append(weakref.ref(model))
        return lambda: torch.tensor(float(model is not None))

    def reset():
        events.append(sum(ref() is not None for ref in alive))

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(bench, "GPU_IMPLS", tuple((n, builder, c) for n, _, c in bench.GPU_IMPLS))
    gc.disable()  # as between the collector's runs in a real benchmark
    try:
        rows, _ = bench.run_gpu("base")
    finally:
        gc.enable()
    assert [r.ms for r in rows] == [2.0] * len(bench.GPU_IMPLS)
    assert events == [1] * len(bench.GPU_IMPLS)  # only the row being measured is alive


def test_gpu_pretrain_rows_start_from_one_set_of_weights(monkeypatch):
    """Every row's builder gets the same initial weights, and each row reports the losses of
    its first two steps (rows computing another loss or update show it in the table)."""
    from benchmarks import bench_pretrain as bench

    _fake_cuda(monkeypatch, bench, [])
    given = []

    def builder(size, compiled, data, initial):
        given.append(initial)
        losses = iter([8.0 + len(given), 7.0, 7.0, 7.0])
        return lambda: torch.tensor(next(losses))

    monkeypatch.setattr(
        bench, "GPU_IMPLS", (("reference-eager", builder, False), ("eegfast", builder, None))
    )
    rows, _ = bench.run_gpu("base")
    assert given == [{"size": "base"}] * 2 and given[0] is given[1]
    assert [r.first_losses for r in rows] == [(9.0, 7.0), (10.0, 7.0)]


def test_gpu_pretrain_times_enough_steps_of_the_slow_rows(monkeypatch):
    """do_bench times rep / (step time) steps: a fixed 200 ms timed one step of the eager
    reference (~130 ms a step on an H200), the baseline of every speed-up."""
    import triton.testing

    from benchmarks import bench_pretrain as bench

    seen = {}

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.update(rep=rep, return_mode=return_mode)
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    for one_step_ms in (25.0, 130.0, 400.0):
        assert bench.step_ms(lambda: None, one_step_ms) == 1.0
        assert seen["rep"] / one_step_ms >= 10 and seen["return_mode"] == "median"


def test_head_loss_benchmark_reports_a_failing_row_and_times_the_others(monkeypatch, tmp_path):
    from benchmarks import bench_losses

    def broken(*args, **kwargs):
        raise AssertionError

    monkeypatch.setattr(bench_losses, "linear_cross_entropy", broken)
    only = "eegfast-linear-ce,torch-eager"
    bench_losses.main(["--tokens", "48", "--repeats", "1", "--only", only, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu_losses.json").read_text())["rows"]
    assert [row["impl"] for row in rows] == ["eegfast-linear-ce", "torch-eager"]
    assert "AssertionError" in rows[0]["error"] and rows[1]["ms"] > 0


def test_moe_benchmark_reports_an_error_without_a_message():
    from benchmarks import gpu_moe

    def broken(*inputs):
        raise AssertionError

    inputs = gpu_moe.make_inputs(8, 4, 8, 2, "cpu", torch.float32)
    reference = torch.zeros(8, 4)
    assert gpu_moe.measure("eegfast", broken, inputs, reference, _instant_timer) == (
        None, None, "AssertionError: ")  # fmt: skip


# scripts/gpu_check.sh with a stand-in python: answers the version and CUDA questions, and
# every stage's command sleeps STAGE_SECONDS.
FAKE_PY = """#!/bin/bash
case "$*" in
  *cuda.is_available*) exit "${FAKE_NO_CUDA:-0}" ;;
  *"import torch, triton"*) echo "torch fake"; exit 0 ;;
esac
echo "$*" >> "$CALLS"
sleep "${STAGE_SECONDS:-0}"
"""


def _gpu_check(tmp_path, *stages, **env):
    """(exit status, summary.txt, the stages' commands) of one run in a folder of its own."""
    import os
    import subprocess
    from pathlib import Path

    tmp_path = tmp_path / str(len(list(tmp_path.iterdir())))
    tmp_path.mkdir()
    python = tmp_path / "python"
    python.write_text(FAKE_PY)
    python.chmod(0o755)
    out = tmp_path / "out"
    variables = {**os.environ, "OUT": str(out), "PY": str(python), "CALLS": str(tmp_path / "calls"),
                 "GPU_CHECK_RESULTS": str(tmp_path / "results"), **env}  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "scripts/gpu_check.sh", *stages], cwd=root, env=variables,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    calls = tmp_path / "calls"
    ran = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, (out / "summary.txt").read_text(), ran


def test_gpu_check_stops_before_any_stage_without_cuda_or_with_an_unknown_stage(tmp_path):
    status, summary, ran = _gpu_check(tmp_path, "pretrain", "head-loss", FAKE_NO_CUDA="1")
    assert status == 2 and "sees no CUDA device: nothing run" in summary and not ran
    status, summary, ran = _gpu_check(tmp_path, "pretrain", "head_loss")
    assert status == 2 and "unknown stage 'head_loss'" in summary and not ran


def test_gpu_check_keeps_within_its_budget_and_reports_failures(tmp_path):
    """The lent machine kills a command at 600 s, and what is not in $OUT by then is lost: the
    stages' limits are cut to GPU_CHECK_BUDGET, a stage without time left is skipped, and the
    exit status says so."""
    status, summary, ran = _gpu_check(tmp_path, "pretrain", "head-loss", "cuda-bench",
                                      GPU_CHECK_BUDGET="48", STAGE_SECONDS="4")  # fmt: skip
    assert [call.split()[1] for call in ran] == ["benchmarks.bench_pretrain"]
    limit = int(summary.split("start pretrain (limit ")[1].split("s)")[0])
    assert limit <= 33  # 48 s less the 15 s kept for the last tar, not the stage's 400 s
    assert "skip head-loss" in summary and "skip cuda-bench" in summary and status == 1
    status, summary, ran = _gpu_check(tmp_path, "head-loss", STAGE_SECONDS="0")
    assert status == 0 and "end head-loss: exit 0" in summary
