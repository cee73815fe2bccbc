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
