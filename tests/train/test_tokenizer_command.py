"""``eegfast tokenizer``: the ``vq`` settings, feature-spread logging and the collapse warning."""

from __future__ import annotations

import json
import re

import pytest

from eegfast.cli import main as cli
from eegfast.train.arch import load_trained
from eegfast.train.commands import tokenizer as command
from eegfast.train.config import ConfigError, RunConfig
from eegfast.train.runlog import read_metrics
from tests.train._sample import sample_recording_cut


def test_collapse_warnings_from_one_log_point():
    healthy = {"train/feature_spread": 0.8, "train/perplexity": 40.0, "train/loss": 1.0}
    assert command.collapse_warnings(20, healthy) == {}
    assert command.collapse_warnings(10, {"train/loss": 1.0}) == {}  # nothing to judge
    collapsed = {"train/feature_spread": 2e-4, "train/perplexity": 90.0}
    warnings = command.collapse_warnings(300, collapsed)
    assert list(warnings) == ["encoder"]
    assert "step 300" in warnings["encoder"] and "0.0002" in warnings["encoder"]
    assert "perplexity 90.0" in warnings["encoder"] and "vq.beta" in warnings["encoder"]
    warnings = command.collapse_warnings(40, {"train/feature_spread": 0.9, "train/perplexity": 1.3})
    assert list(warnings) == ["codebook"]
    assert "codebook collapse: at step 40" in warnings["codebook"]
    assert "1.30" in warnings["codebook"] and "vq.dead_code_threshold" in warnings["codebook"]
    both = {"train/feature_spread": 0.009, "train/perplexity": 1.0}
    assert set(command.collapse_warnings(50, both)) == {"encoder", "codebook"}
    # features along one line, two opposite ways: the spread looks healthy, the dims do not
    line = {"train/feature_spread": 0.99, "train/feature_dims": 1.06, "train/perplexity": 2.3}
    warnings = command.collapse_warnings(150, line)
    assert list(warnings) == ["encoder"]
    assert "lie along one line (train/feature_dims 1.06, perplexity 2.3)" in warnings["encoder"]
    for dims in (2.8, 1.36):  # healthy; the quickstart's transient dip
        assert command.collapse_warnings(150, {**line, "train/feature_dims": dims}) == {}


def test_collapse_watch_prints_each_kind_once_it_persists(capsys):
    assert command.COLLAPSE_LOG_POINTS == 3
    watch = command.collapse_watch(None)
    watch(10, {"train/feature_spread": 0.7, "train/perplexity": 30.0})
    # a dip at one or two log points in a row, then recovery: no warning
    for step, ppl in ((20, 1.1), (30, 1.2), (40, 9.0), (50, 1.1), (60, 30.0)):
        watch(step, {"train/feature_spread": 0.7, "train/perplexity": ppl})
    assert capsys.readouterr().out == ""
    for step in (70, 80, 90, 100):
        watch(step, {"train/feature_spread": 0.7, "train/perplexity": 1.1})
    printed = capsys.readouterr().out
    assert printed.count("codebook collapse") == 1 and "at step 90" in printed
    for step in (110, 120, 130):
        watch(step, {"train/feature_spread": 0.01, "train/perplexity": 1.1})
    printed = capsys.readouterr().out
    assert printed.count("encoder collapse: at step 130") == 1 and "codebook" not in printed


def test_quantizer_kwargs_from_the_vq_section():
    assert command.quantizer_kwargs(RunConfig()) == {}  # the model config decides
    config = RunConfig().with_overrides({"vq.beta": 0.0, "vq.dead_code_threshold": 0.0})
    assert command.quantizer_kwargs(config) == {"beta": 0.0, "dead_code_threshold": None}
    config = RunConfig().with_overrides({"vq.dead_code_threshold": 0.5})
    assert command.quantizer_kwargs(config) == {"dead_code_threshold": 0.5}
    with pytest.raises(ConfigError, match="vq.beta must be >= 0"):
        RunConfig().with_overrides({"vq.beta": -1.0})
    for bad in (-1.0, 1.5):  # above 1 a restarted code (count 1) is re-seeded every step
        with pytest.raises(ConfigError, match=r"vq.dead_code_threshold must be in \[0, 1\]"):
            RunConfig().with_overrides({"vq.dead_code_threshold": bad})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder from a 24-s cut of the real Subject00_1 recording."""
    root = tmp_path_factory.mktemp("tok")
    fif = sample_recording_cut("Subject00_1.edf", 24.0, root)
    out = root / "prepared"
    assert cli(["prepare", f"rest={fif}", "--out", str(out), "--window", "4", "--no-progress"]) == 0
    return out


def run_tokenizer(prepared, out, *sets):
    argv = ["tokenizer", "--data", str(prepared), "--out", str(out), "--model", "vqnsp_tiny"]
    for item in ("train.max_steps=3", "train.batch_size=2", "train.log_every=1", *sets):
        argv += ["--set", item]
    return cli([*argv, "--no-progress"])


def test_vq_settings_reach_the_checkpoint_and_spread_is_logged(prepared, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run_tokenizer(prepared, out, "vq.beta=0.25", "vq.dead_code_threshold=0") == 0
    printed = capsys.readouterr().out
    assert "encoder collapse" not in printed
    assert re.search(
        r"codebook: \d+ of 256 codes used by the patches of 6 training windows "
        r"\(perplexity \d+\.\d; EMA perplexity \d+\.\d\)",
        printed,
    )
    meta = json.loads(next(out.glob("checkpoints/*/meta.json")).read_text())
    assert meta["arch"]["kwargs"] == {"beta": 0.25, "dead_code_threshold": None}
    model, _ = load_trained(out, prefer="latest")
    assert model.quantize.beta == 0.25 and model.quantize.dead_code_threshold is None
    metrics = read_metrics(out / "metrics.csv")
    spread, dims = metrics["train/feature_spread"], metrics["train/feature_dims"]
    assert [step for step, _ in spread] == [1, 2, 3] == [step for step, _ in dims]
    assert all(0.0 <= value <= 1.0 for _, value in spread)
    assert all(1.0 <= value <= 16.0 for _, value in dims)  # vqnsp_tiny's 16-dim codes


def test_collapse_warning_comes_while_training(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "COLLAPSED_SPREAD", 2.0)  # any spread counts as collapsed
    monkeypatch.setattr(command, "COLLAPSE_LOG_POINTS", 2)
    assert run_tokenizer(prepared, tmp_path / "tok", "train.log_every=1") == 0
    printed = capsys.readouterr().out
    # logged at steps 1, 2 and 3 (the last); warned once, at the second log point in a row
    assert "warning: encoder collapse: at step 2" in printed
    assert printed.count("encoder collapse") == 1


def test_codebook_summary_counts_the_codes_the_data_gets_not_restarted_ema_counts(prepared):
    """Every code's EMA count at 1 (as k-means and dead-code restarts leave them), but one
    direction in the codebook: the summary said 256 of 256 codes active; the data gets 1."""
    import torch

    from eegfast.models import create_model
    from eegfast.train.data import load_data

    torch.manual_seed(0)
    model = create_model("vqnsp_tiny")
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(model.quantize.embedding.weight[:1].expand(256, -1))
        model.quantize.cluster_size.fill_(1.0)
    data = load_data([str(prepared)])
    summary = command.codebook_summary(model, data, torch.device("cpu"), max_windows=5)
    assert summary.startswith("codebook: 1 of 256 codes used by the patches of 5 training windows")
    assert "(perplexity 1.0; EMA perplexity 256.0)" in summary
    assert model.training  # left as it was


def test_resume_without_model_continues_the_runs_tokenizer(prepared, tmp_path, capsys):
    """``--resume auto`` without ``--model`` had built the default vqnsp_base for a vqnsp_tiny
    run (and stopped on its checkpoint's shapes); it continues the run's own model, and another
    model named explicitly is a one-line error that leaves the run as it was."""
    out = tmp_path / "tok"
    assert run_tokenizer(prepared, out) == 0
    argv = ["tokenizer", "--data", str(prepared), "--out", str(out), "--resume", "auto"]
    argv += ["--set", "train.max_steps=5", "--set", "train.batch_size=2", "--no-progress"]
    capsys.readouterr()
    assert cli(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    meta = json.loads(sorted(out.glob("checkpoints/*/meta.json"))[-1].read_text())
    assert meta["step"] == 5 and meta["arch"]["name"] == "vqnsp_tiny"
    argv[argv.index("train.max_steps=5")] = "train.max_steps=7"
    assert cli([*argv, "--model", "vqnsp_base"]) == 2
    err = capsys.readouterr().err
    assert "--model vqnsp_base: the run being resumed trains vqnsp_tiny" in err
    assert len(err.strip().splitlines()) == 1
    newest = json.loads(sorted(out.glob("checkpoints/*/meta.json"))[-1].read_text())
    assert newest["step"] == 5


def test_sigterm_stops_a_run_as_ctrl_c_does_with_status_143(prepared, tmp_path):
    """SIGTERM (a scheduler preempting the job) had ended the process at once, saying nothing:
    it stops as Ctrl-C does, naming the step and the last checkpoint, with status 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tok"
    argv = [sys.executable, "-m", "eegfast", "tokenizer", "--data", str(prepared)]
    argv += ["--out", str(out), "--model", "vqnsp_tiny", "--no-progress"]
    for item in ("train.max_steps=100000", "train.batch_size=2", "train.checkpoint_every=2"):
        argv += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/step-*/meta.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "eegfast tokenizer: interrupted at step" in err
    assert "; last checkpoint " in err and "continue with --resume auto" in err
    assert "Traceback" not in err
    assert (out / "metrics.csv").read_text().startswith("step,tag,value\n")
