"""The GPU benchmarks' plumbing, run on CPU: what a lent GPU's one short lease must not find
broken (results kept when a stage is stopped at its limit, files never left half-written)."""

from __future__ import annotations

import json

import pytest
import torch


class _Stopped(BaseException):
    """What the stage's time limit does to the process (not caught by the rows' handlers)."""


def test_gpu_vq_bench_writes_its_tables_after_every_row(monkeypatch, tmp_path):
    """`benchmarks.gpu --ops vq` wrote gpu_vq.* only after its last row: cuda-bench stopped at
    its limit (cut to the GPU_CHECK_BUDGET left after the pretrain stage) lost every VQ row."""
    import triton.testing

    from benchmarks import _report, gpu

    timed = []

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        timed.append(fn)
        if len(timed) == 3:  # stopped while the third row (torch-compile) is timed
            raise _Stopped
        return float(len(timed))

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    env = dict(gpu="fake", torch="t", cuda="c", triton="t")
    monkeypatch.setattr(gpu, "environment", lambda gpu=False: env)
    monkeypatch.setattr(gpu, "GPU_SHAPES", ((32, 16, 8),))
    ready = type("Status", (), {"available": True})()
    monkeypatch.setattr(gpu, "available_backends", lambda: {"cuda": ready, "triton": ready})
    run_vq_cases = _report.run_vq_cases

    def on_cpu(shapes, dtypes, device, backends, timer, **kwargs):
        assert device == "cuda" and backends == ["cuda", "triton"]
        return run_vq_cases(shapes, dtypes, "cpu", ["cpu"], timer, progress=str, **kwargs)

    monkeypatch.setattr(gpu, "run_vq_cases", on_cpu)
    with pytest.raises(_Stopped):
        gpu.main(["--ops", "vq", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "gpu_vq.json").read_text())
    assert [r["impl"] for r in record["results"]] == ["eegfast-cpu", "torch-eager"]
    assert [r["ms"] for r in record["results"]] == [1.0, 2.0]
    table = (tmp_path / "gpu_vq.md").read_text()
    assert "partial" in table and "| torch-eager | 2.000 | 2.00× |" in table


def test_vq_plot_is_replaced_whole_or_not_at_all(monkeypatch, tmp_path):
    """write_results saved its PNG in place: a run stopped while saving left a truncated plot
    where the previous one was."""
    from matplotlib.figure import Figure

    from benchmarks._report import Result, write_results

    results = [Result("lookup", "eegfast-cpu", 8, 4, 2, "float32", ms=1.0)]
    paths = write_results(tmp_path, "vq", "t", {}, results)
    before = paths["png"].read_bytes()
    assert before.startswith(b"\x89PNG")
    savefig = Figure.savefig

    def stopped_while_saving(self, fname, **kwargs):
        savefig(self, fname, **kwargs)
        if hasattr(fname, "truncate"):
            fname.truncate(10)
        else:
            with open(fname, "r+b") as f:
                f.truncate(10)
        raise _Stopped

    monkeypatch.setattr(Figure, "savefig", stopped_while_saving)
    with pytest.raises(_Stopped):
        write_results(tmp_path, "vq", "t", {}, results * 2)
    assert paths["png"].read_bytes() == before


# tar as the machine's kill at its command limit leaves it: the archive half-written. Every
# other call is the real tar.
STOPPED_TAR = """#!/bin/bash
count=$(($(cat "$TAR_CALLS" 2>/dev/null || echo 0) + 1))
echo $count > "$TAR_CALLS"
if [ "$count" -eq "$STOP_AT" ]; then
  while [ $# -gt 0 ]; do [ "$1" = -czf ] && printf 'half an archive' > "$2"; shift; done
  exit 137
fi
exec "$REAL_TAR" "$@"
"""


def test_gpu_check_keeps_the_last_whole_archive_when_a_tar_is_stopped(tmp_path):
    """results.tar.gz was rewritten in place after every stage: a tar stopped half-way left a
    truncated archive where the previous stage's tables were."""
    import os
    import shutil
    import tarfile

    from tests.test_bench_report import _gpu_check

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tar").write_text(STOPPED_TAR)
    (bin_dir / "tar").chmod(0o755)
    runs, results = tmp_path / "runs", tmp_path / "results"
    runs.mkdir()
    results.mkdir()
    (results / "gpu_pretrain_base.md").write_text("| reference-eager | 2.0 |\n")
    env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", REAL_TAR=shutil.which("tar"),
               TAR_CALLS=str(tmp_path / "tar_calls"), STOP_AT="2",
               GPU_CHECK_RESULTS=str(results))  # fmt: skip
    status, summary, ran = _gpu_check(runs, "pretrain", "head-loss", **env)
    assert status == 0 and len(ran) == 2
    with tarfile.open(runs / "0" / "out" / "results.tar.gz") as archive:
        assert "./gpu_pretrain_base.md" in archive.getnames()


@pytest.mark.parametrize("name", ["dense-ffn", "dense-ffn-Tk"])
def test_moe_bench_dense_rows_time_a_dense_ffn_backward(name):
    """The dense FFN rows used expert 0 of the stacked (E, H, D) weights: their timed backward
    also wrote zero gradients for every other expert's weights (E times the dense model's)."""
    from benchmarks import gpu_moe

    inputs = gpu_moe.make_inputs(12, 8, 16, 4, "cpu", torch.float32)
    timed_grads = []

    def timer(fn, grad_to_none):
        fn()
        timed_grads.extend(t.grad for t in grad_to_none if t.grad is not None)
        return 1.0

    reference = torch.zeros(12, 8)
    impl = gpu_moe.implementations()[name]
    assert gpu_moe.measure(name, impl, inputs, reference, timer) == (1.0, None, "")
    # x, then fc1's and fc2's weight and bias: one expert's, not E = 4
    shapes = [tuple(g.shape) for g in timed_grads]
    assert shapes == [(12, 8), (1, 16, 8), (1, 16), (1, 8, 16), (1, 8)]


def test_generate_bench_table_renders_and_rejects_an_unknown_size(monkeypatch, tmp_path, capsys):
    """The table's header had 'max |diff|': one cell more than the rows and the delimiter
    row, so the Markdown did not render as a table; `--sizes large` (no such case) wrote an
    empty table and exited 0."""
    from benchmarks import bench_generate

    monkeypatch.setattr(bench_generate, "CASES", [("tiny", 1)])
    args = ["--device", "cpu", "--sizes", "tiny", "--repeats", "1", "--out", str(tmp_path)]
    assert bench_generate.main(args) == 0
    rows = [line for line in (tmp_path / "generate_cpu.md").read_text().splitlines()
            if line.startswith("|")]  # fmt: skip
    assert len(rows) == 3
    cells = [row.count("|") for row in rows]
    assert cells == [cells[0]] * 3
    with pytest.raises(SystemExit):
        bench_generate.main(["--sizes", "large", "--out", str(tmp_path / "large")])
    assert "invalid choice: 'large'" in capsys.readouterr().err
    assert not (tmp_path / "large").exists()


def test_qk_plot_is_written_once_the_comparison_rows_are_done(monkeypatch, tmp_path):
    """The attention plot was written only at the end of the run: a GPU stage stopped at its
    time limit during the diagnostic variants kept the tables but had no plot of issue 4's
    comparison. It is written when the first row past the ESSENTIAL ones arrives."""
    from benchmarks import gpu_qk_norm_attention as qk

    def row(impl: str, ms: float) -> qk.Row:
        return qk.Row("base", 2, 2, 17, 20, "bfloat16", "fwd", impl, ms)

    essential = [row(impl, 1.0 + i) for i, impl in enumerate(qk.ESSENTIAL)]
    plots = []
    monkeypatch.setattr(qk, "plot", lambda rows, path, title: plots.append(len(rows)))

    class _Stopped(Exception):
        pass

    def stopped_during_the_variants(shapes, dtype, device, timer, tuning, on_row):
        rows = []
        for r in [*essential, row("eegfast-variant", 9.0), row("eegfast-variant2", 9.0)]:
            rows.append(r)
            on_row(list(rows))
        raise _Stopped  # (the stage's time limit)

    monkeypatch.setattr(qk, "run_cases", stopped_during_the_variants)
    with pytest.raises(_Stopped):
        qk.run(tmp_path, {"gpu": "fake"}, shapes=("base",))
    assert plots == [len(essential) + 1]  # once, with every comparison row
    assert "partial" in (tmp_path / "gpu_qk_norm_attention.md").read_text()
