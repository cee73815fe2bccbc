"""The command line: help everywhere, errors, doctor, and the whole recipe on the real sample
(``eegfast quickstart --fast``, then ``eegfast evaluate`` on its outputs)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from eegfast import cli
from eegfast.datasets import SHARED_DATA

TRAINING_COMMANDS = [
    "tokenizer",
    "pretrain",
    "upcycle",
    "finetune",
    "evaluate",
    "bench",
    "doctor",
    "quickstart",
]


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"eegfast {command}" in out and "--" in out


def test_python_dash_m_eegfast_lists_the_commands():
    done = subprocess.run(
        [sys.executable, "-m", "eegfast", "--help"], capture_output=True, text=True, check=True
    )
    for command in TRAINING_COMMANDS:
        assert command in done.stdout


def test_unknown_config_key_exits_2_listing_valid_keys(tmp_path, capsys):
    status = cli.main(
        [
            "tokenizer",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "optim.lrr=1",
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "optim.lr" in err
    assert not (tmp_path / "run").exists()


def test_missing_data_and_unknown_objective_are_clear_errors(tmp_path, capsys):
    assert cli.main(["tokenizer", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "pretrain",
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path),
                "--objective",
                "telepathy",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown pretrain objective 'telepathy'" in err and "masked" in err


def test_doctor_reports_backends_as_json(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["reference"]["available"] is True
    assert {"torch", "sklearn", "mne"} <= set(report["versions"])
    assert report["distributed"]["gloo"] is True
    assert report["cpu_inference_fusion"]["available"] is torch.backends.mkldnn.is_available()
    from eegfast.ops import cpu_attention_isa

    assert report["cpu_attention_isa"] == cpu_attention_isa()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no sample data folder {SHARED_DATA}")
def test_quickstart_fast_then_evaluate(tmp_path, capsys):
    out = tmp_path / "qs"
    assert (
        cli.main(
            ["quickstart", "--data", str(SHARED_DATA), "--out", str(out), "--fast", "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    assert "targets:" in printed and "codes in use" in printed  # eegfast pretrain's summary
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "band-power baseline" in report
    assert "grouped by recording" in report.replace("**", "") and "one subject" in report
    assert "Negative-transfer report" in report and "ODC-By" in report
    finetune = out / "runs" / "finetune"
    rows = list(csv.DictReader((finetune / "results.csv").open()))
    seen = {(r["fold"], r["variant"], r["task"]) for r in rows}
    for fold in ("0", "1"):
        for variant in ("multitask", "single", "band_power"):
            for task in ("motor_imagery", "arithmetic"):
                assert (fold, variant, task) in seen
    assert {r["metric"] for r in rows} == {"balanced_accuracy", "auroc", "auc_pr"}
    for png in ("loss_curves", "confusion_matrices", "roc_curves", "expert_load"):
        assert (finetune / f"{png}.png").stat().st_size > 1000
    tokenizer_metrics = (out / "runs" / "tokenizer" / "metrics.csv").read_text()
    assert "train/feature_spread" in tokenizer_metrics and "feature spread" in report
    for run in ("tokenizer", "pretrain", "finetune/fold0/multitask"):
        assert (out / "runs" / run / "config.yaml").is_file()
        assert list((out / "runs" / run / "tensorboard").glob("events.*"))

    # evaluate: the fine-tuned multi-task model on its data, with a feature export.
    evaluation, features = tmp_path / "eval", tmp_path / "features.npz"
    data = [str(out / "data" / "motor_imagery"), str(out / "data" / "arithmetic")]
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(finetune / "fold0" / "multitask"),
                "--data",
                *data,
                "--out",
                str(evaluation),
                "--export-features",
                str(features),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((evaluation / "summary.json").read_text())
    assert {s["task"] for s in summary["summary"]} == {"motor_imagery", "arithmetic"}
    exported = np.load(features)
    assert exported["features"].shape == (90 + 120, 100)
    assert np.isfinite(exported["features"]).all()
    assert sorted(set(exported["task"].tolist())) == ["arithmetic", "motor_imagery"]
    assert list((finetune / "tensorboard").glob("events.*"))  # per-fold metrics as scalars

    # evaluate: a linear probe on the upcycled backbone's frozen features, same folds design.
    probe = tmp_path / "probe"
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(out / "runs" / "moe"),
                "--data",
                *data,
                "--out",
                str(probe),
                "--folds",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((probe / "results.csv").open()))
    assert {r["variant"] for r in rows} == {"linear_probe", "band_power"}
    assert {r["fold"] for r in rows} == {"0", "1"}


def test_bench_lists_suites_and_rejects_unknown_ones(tmp_path, capsys):
    assert cli.main(["bench", "--list"]) == 0
    assert "vq" in capsys.readouterr().out.split()
    assert cli.main(["bench", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_bench_report_markdown_has_ratios():
    from eegfast.train.commands.bench import markdown

    results = {
        "benchmarks": [
            {
                "group": "g",
                "name": "fast",
                "fullname": "x::fast",
                "stats": {"median": 0.001, "rounds": 5},
            },
            {
                "group": "g",
                "name": "slow",
                "fullname": "x::slow",
                "stats": {"median": 0.003, "rounds": 5},
            },
        ]
    }
    text = markdown(results)
    assert "| g | fast | 1.000 | 1.00x | 5 |" in text and "| g | slow | 3.000 | 3.00x | 5 |" in text


def test_evaluate_takes_no_resume(tmp_path, capsys):
    """evaluate trains nothing: it accepted --resume (even a path that does not exist) and
    ignored it."""
    argv = ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--resume", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "{src}", "--no-progress"],
        ["tokenizer", "--data", "{src}", "--model", "vqnsp_tiny"],
        ["upcycle", "--model", "{src}", "--experts", "2"],
        ["quickstart", "--fast"],
        ["generate", "--model", "{src}", "--prompt", "{src}", "--seconds", "1"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_out_that_cannot_be_created_is_one_line_before_any_work(argv, tmp_path, capsys):
    """--out under a file (or where the user may not write) was a traceback from mkdir, after
    the data were read (prepare) or the whole signal generated (generate)."""
    import mne

    src = tmp_path / "in"
    src.mkdir()
    info = mne.create_info(["CZ", "PZ"], 200.0, "eeg")
    x = np.random.default_rng(0).normal(size=(2, 2000)) * 1e-5
    mne.io.RawArray(x, info, verbose="error").save(src / "rec_raw.fif", verbose="error")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run" / ("x.npy" if argv[0] == "generate" else "sub")
    argv = [a.replace("{src}", str(src)) for a in argv]
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"eegfast {argv[0]}: --out {out}: {blocker} is not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in"]


def test_unwritable_reason_leaves_nothing_behind(tmp_path):
    from eegfast.fileio import unwritable_reason

    assert unwritable_reason(tmp_path / "new" / "deeper") is None
    assert unwritable_reason(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # no folder made, the probe file removed
    (tmp_path / "f").write_text("")
    assert unwritable_reason(tmp_path / "f") == f"{tmp_path / 'f'} is not a folder"


def test_generate_never_replaces_a_folder_named_as_out(tmp_path):
    """--out naming a folder with --overwrite passed the check, and os.replace failed with a
    traceback after the whole generation."""
    from eegfast.train.commands.generate import GenerateError, check_output_path

    folder = tmp_path / "x.edf"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(GenerateError, match="is a folder, not a file"):
            check_output_path(folder, overwrite)
    assert folder.is_dir()


@pytest.mark.parametrize("name", ["prepare", "generate"])
def test_an_out_whose_path_cannot_be_looked_at_is_one_line(name, tmp_path, capsys):
    """A path the OS refuses to look up (a folder on the way the user may not enter, a name
    too long) raised out of Path.exists() as a traceback, not the one line it promises."""
    out = tmp_path / ("a" * 300) / ("x.npy" if name == "generate" else "run")
    from eegfast.fileio import unwritable_reason

    assert "File name too long" in unwritable_reason(out.parent)
    argv = ["generate", "--model", "m", "--prompt", "p", "--seconds", "1"]
    argv = argv if name == "generate" else ["prepare", str(tmp_path)]
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eegfast {name}: --out {out}: cannot ") and err.count("\n") == 1


def test_doctor_says_when_torch_has_no_cuda():
    """A CPU-only torch was printed as "torch built with CUDA None"."""
    from eegfast.train.commands import doctor

    report = doctor.collect()
    report["cuda"]["torch_cuda"] = None
    assert "(torch built without CUDA)" in doctor.format_text(report)
    assert "CUDA None" not in doctor.format_text(report)
    report["cuda"]["torch_cuda"] = "12.8"
    assert "(torch built with CUDA 12.8)" in doctor.format_text(report)


def _fake_steps(monkeypatch, status_of):
    """Run `eegfast quickstart` for real, but its steps (every other command) through
    ``status_of(argv) -> exit status``; returns the list of the steps' argv."""
    real_main, calls = cli.main, []

    def main(argv=None):
        if argv and argv[0] == "quickstart":
            return real_main(argv)
        calls.append(argv)
        return status_of(argv)

    monkeypatch.setattr(cli, "main", main)
    return calls


def test_quickstart_without_the_sample_is_one_line(tmp_path, monkeypatch, capsys):
    """A --data folder without the files, or no sample and no network, was a traceback of
    SampleDataError (exit status 1), not the one line every other user error is."""
    from eegfast import datasets

    calls = _fake_steps(monkeypatch, lambda argv: 0)
    missing = tmp_path / "no-such-folder"
    assert cli.main(["quickstart", "--data", str(missing), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eegfast quickstart: --data: {missing} does not hold the sample")
    assert len(err.splitlines()) == 1 and "Traceback" not in err

    # Nothing found anywhere and the download refused (a closed port stands for no network).
    monkeypatch.setattr(datasets, "SHARED_DATA", tmp_path / "no-shared-data")
    monkeypatch.setenv("EEGFAST_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("EEGFAST_SAMPLE_MIRROR", "http://127.0.0.1:9/")
    assert cli.main(["quickstart", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err  # pooch's "Downloading data from ..." line, then ours
    assert err.splitlines()[-1].startswith("eegfast quickstart: could not download S001R04.edf")
    assert "EEGFAST_DATA" in err and "Traceback" not in err
    assert calls == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quickstart_ctrl_c_in_a_step_says_how_to_restart(tmp_path, monkeypatch, capsys):
    """A step stopped by Ctrl-C (its status 130, its message: "continue with --resume auto",
    which the quickstart does not take) was reported as a failed step with exit status 2."""
    calls = _fake_steps(monkeypatch, lambda argv: 130 if argv[0] == "prepare" else 0)
    out = tmp_path / "qs"
    assert cli.main(["quickstart", "--data", str(SHARED_DATA), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "failed with exit status" not in err
    assert "stopped during step 'prepare motor imagery'; run the same command again" in err
    assert [argv[0] for argv in calls] == ["prepare"]  # nothing after the interrupted step


def test_quickstart_names_the_data_folder_and_its_licence(tmp_path, monkeypatch, capsys):
    """The quickstart printed neither where the sample came from (--data, EEGFAST_DATA, the
    cache, ../shared/data or a download) nor that the EEG is ODC-By data to attribute."""
    _fake_steps(monkeypatch, lambda argv: 130)
    assert cli.main(["quickstart", "--data", str(SHARED_DATA), "--out", str(tmp_path)]) == 130
    first = capsys.readouterr().out.splitlines()[0]
    assert f"PhysioNet sample recordings in {SHARED_DATA} " in first and "ODC-By 1.0" in first


@pytest.mark.parametrize(
    "option, message",
    [(["--folds", "1"], "--folds must be >= 2"), (["--experts", "1"], "--experts must be >= 2")],
)
def test_quickstart_checks_its_options_before_any_step(
    option, message, tmp_path, monkeypatch, capsys
):
    """--folds 1 or --experts 1 failed only in the finetune or upcycle step, after minutes of
    training."""
    calls = _fake_steps(monkeypatch, lambda argv: 0)
    out = tmp_path / "qs"
    status = cli.main(["quickstart", "--data", str(SHARED_DATA), "--out", str(out), *option])
    assert status == 2 and message in capsys.readouterr().err
    assert calls == [] and not out.exists()


def test_quickstart_report_gives_the_measured_training_time(tmp_path):
    """The report said "trained for about two minutes" whatever the run took (a --fast run
    takes seconds, a loaded machine several minutes)."""
    from eegfast.train.commands.quickstart import write_report

    runs = tmp_path / "runs"
    for run in ("tokenizer", "pretrain"):
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.csv").write_text("step,tag,value\n10,train/loss,1.5\n")
    (runs / "moe").mkdir()
    (runs / "moe" / "upcycle.json").write_text(
        json.dumps(
            {
                "arch": {"upcycle": {"num_experts": 4, "top_k": 2}},
                "task_names": ["a"],
                "dense_parameters": 10,
                "moe_parameters": 30,
                "probe_max_abs_diff": 1e-7,
            }
        )
    )
    (runs / "finetune").mkdir()
    (runs / "finetune" / "summary.json").write_text(json.dumps({"comparisons": {}}))
    (runs / "finetune" / "report.md").write_text("# fine-tuning\n\nbody\n")
    timings = {"prepare": 60.0, "tokenizer": 30.0, "pretrain": 42.0, "upcycle": 1.0}
    timings["finetune"] = 18.0
    report = write_report(tmp_path, runs, timings, 151.0, "ATTRIBUTION", fast=True).read_text()
    assert "trained for 1.5 min on 6 recordings" in report  # 30 + 42 + 18 s
    assert "about two minutes" not in report


def test_bench_report_says_when_the_tree_was_edited():
    """bench.md named the commit alone where pytest-benchmark saw uncommitted changes: the
    numbers were labelled with code that is not what ran."""
    from eegfast.train.commands.bench import markdown

    commit = {"id": "abc123", "dirty": True}
    assert "- commit: abc123 with uncommitted changes\n" in markdown({"commit_info": commit})
    commit["dirty"] = False
    assert "- commit: abc123\n" in markdown({"commit_info": commit})


def test_ctrl_c_while_a_command_loads_is_one_line_and_status_130(monkeypatch, capsys, tmp_path):
    """Ctrl-C before a command's own handling starts (its module importing torch) printed
    Python's traceback; it is one line and the status of SIGINT, as later."""

    def interrupted(name, module_name=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    assert cli.main(["pretrain", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "eegfast pretrain: interrupted"
