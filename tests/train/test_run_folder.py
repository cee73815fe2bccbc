"""The training commands' run folder: --out, --resume, --overwrite, the writer's lock, Ctrl-C,
and the one-line errors for arguments that cannot work."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eegfast.cli import main as cli
from eegfast.train import checkpoint as ckpt
from eegfast.train.commands import common
from eegfast.train.data import load_data
from eegfast.train.runlog import read_metrics
from tests.train._sample import sample_recording_cut

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two 24-s cuts of the sample (one subject, a rest and a task recording), 4-s windows."""
    root = tmp_path_factory.mktemp("runfolder")
    cuts = [sample_recording_cut(f"Subject00_{i}.edf", 24.0, root) for i in (1, 2)]
    out = root / "prepared"
    argv = ["prepare", *[f"arith={c}" for c in cuts], "--out", str(out), "--window", "4"]
    argv += ["--filename-rule", "_1_cut$=rest", "--filename-rule", "_2_cut$=task"]
    assert cli([*argv, "--no-progress"]) == 0
    return out


def _with_sets(argv, items):
    """``KEY=VALUE`` items become ``--set KEY=VALUE``; flags (and a flag's value) pass as is."""
    out, raw = list(argv), False
    for item in items:
        if item.startswith("--") or raw:
            out.append(item)
            raw = item == "--resume" or item == "--folds"
        else:
            out += ["--set", item]
    return out


def tokenizer_argv(prepared, out, *sets):
    argv = ["tokenizer", "--data", str(prepared), "--out", str(out), "--model", "vqnsp_tiny"]
    defaults = ("train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2")
    return [*_with_sets(argv, (*defaults, *sets)), "--no-progress"]


def pretrain_argv(prepared, tokenizer, out, *sets):
    argv = ["pretrain", "--data", str(prepared), "--out", str(out), "--tokenizer", str(tokenizer)]
    argv += ["--model", "labram_tiny_pretrain"]
    defaults = ("train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2")
    return [*_with_sets(argv, (*defaults, *sets)), "--no-progress"]


@pytest.fixture(scope="module")
def tokenizer_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokrun") / "tok"
    assert cli(tokenizer_argv(prepared, out)) == 0
    return out


@pytest.fixture(scope="module")
def pretrain_run(prepared, tokenizer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("prerun") / "pre"
    assert cli(pretrain_argv(prepared, tokenizer_run, out)) == 0
    return out


def steps(run: Path) -> list[int]:
    return [c.step for c in ckpt.list_checkpoints(run / "checkpoints")]


# --- A1: an --out holding an earlier run ---------------------------------------------------


def test_rerun_into_a_used_out_is_refused_and_overwrite_replaces_it(prepared, tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli(tokenizer_argv(prepared, out, "train.max_steps=4")) == 0
    assert steps(out) == [2, 4]
    capsys.readouterr()
    assert cli(tokenizer_argv(prepared, out)) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "--resume auto" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert steps(out) == [2, 4]  # nothing touched
    assert cli(tokenizer_argv(prepared, out, "train.max_steps=1", "--overwrite")) == 0
    printed = capsys.readouterr().out
    assert steps(out) == [1]  # the old run's checkpoints are gone, the new one kept
    assert f"checkpoint {out / 'checkpoints' / 'step-00000001'}" in printed
    assert (out / "checkpoints" / "step-00000001").is_dir()
    assert {s for s, _ in read_metrics(out / "metrics.csv")["train/loss"]} <= {1}
    assert "max_steps: 1" in (out / "config.yaml").read_text()


def test_overwrite_and_resume_exclude_each_other(prepared, tmp_path, capsys):
    argv = tokenizer_argv(prepared, tmp_path / "tok", "--overwrite", "--resume", "auto")
    assert cli(argv) == 2
    assert "--overwrite and --resume" in capsys.readouterr().err


# --- A2: finetune --resume takes only auto ---------------------------------------------------


def test_finetune_resume_with_a_checkpoint_path_is_refused(tmp_path, capsys):
    argv = ["finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ft")]
    assert cli([*argv, "--resume", str(tmp_path / "run/checkpoints/step-00000004")]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "use --resume auto" in err
    assert not (tmp_path / "ft").exists()


# --- A4: one writer per run folder; temp folders of live writers are kept --------------------


def test_a_second_writer_is_refused_while_the_lock_is_held(prepared, tmp_path, capsys):
    out = tmp_path / "tok"
    with common.hold_lock(out):
        with pytest.raises(common.CommandError, match=f"--out {out}: another eegfast run"):
            with common.hold_lock(out):
                pass
        assert cli(tokenizer_argv(prepared, out)) == 2
        assert "another eegfast run is writing" in capsys.readouterr().err
        assert not (out / "config.yaml").exists()
    assert cli(tokenizer_argv(prepared, out)) == 0  # released


def test_save_keeps_temp_folders_of_live_processes(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, live.pid, os.getpid()):
            (folder / f".tmp-step-00000001-{pid}").mkdir()
        ckpt.save_checkpoint(folder, 2, {"w": torch.zeros(2)}, {"step": 2}, {})
        left = sorted(p.name for p in folder.iterdir())
    finally:
        live.kill()
        live.wait()
    assert left == [f".tmp-step-00000001-{live.pid}", "step-00000002"]


# --- A6: a resumed pretraining keeps its tokenizer checkpoint --------------------------------


def test_resumed_pretraining_keeps_the_tokenizer_checkpoint_it_started_with(
    prepared, tmp_path, capsys
):
    tok = tmp_path / "tok"
    assert cli(tokenizer_argv(prepared, tok)) == 0
    pre = tmp_path / "pre"
    assert cli(pretrain_argv(prepared, tok, pre)) == 0
    recorded = ckpt.latest_checkpoint(pre / "checkpoints").meta["tokenizer"]
    assert recorded["checkpoint"] == str((tok / "checkpoints" / "step-00000002").resolve())
    # the tokenizer run gets a newer checkpoint
    assert cli(tokenizer_argv(prepared, tok, "train.max_steps=4", "--resume", "auto")) == 0
    capsys.readouterr()
    assert cli(pretrain_argv(prepared, tok, pre, "train.max_steps=4", "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "note: --tokenizer" in printed and "step-00000002" in printed
    assert ckpt.latest_checkpoint(pre / "checkpoints").meta["tokenizer"] == recorded
    shutil.rmtree(tok / "checkpoints" / "step-00000002")
    assert cli(pretrain_argv(prepared, tok, pre, "train.max_steps=6", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {tok}" in err and "gone or changed" in err
    assert steps(pre) == [2, 4]


def _set_metric(checkpoint: Path, metric: float) -> None:
    meta_file = checkpoint / ckpt.META
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "metric": metric}))


@pytest.mark.parametrize("held_out", [True, False])
def test_pretraining_takes_the_tokenizer_runs_best_checkpoint_when_it_held_data_out(
    prepared, tmp_path, capsys, held_out
):
    """A tokenizer run with data.val_fraction > 0 gives its checkpoint with the lowest
    val/loss (as finetune --init takes a pretraining run's best), not its newest; one without
    gives its newest (its metric is the training loss); a resume keeps the one it started
    with when the run's best has since changed."""
    tok = tmp_path / "tok"
    sets = ["train.max_steps=4"] + (["data.val_fraction=0.5"] if held_out else [])
    assert cli(tokenizer_argv(prepared, tok, *sets)) == 0
    older, newest = (tok / "checkpoints" / f"step-0000000{s}" for s in (2, 4))
    assert ("validation" in ckpt.checkpoint_meta(newest)) == held_out
    _set_metric(older, -1.0)  # below any loss: the older one ranks first where metrics rank
    expected = older if held_out else newest
    capsys.readouterr()
    pre = tmp_path / "pre"
    assert cli(pretrain_argv(prepared, tok, pre)) == 0
    printed = capsys.readouterr().out
    recorded = ckpt.latest_checkpoint(pre / "checkpoints").meta["tokenizer"]
    assert recorded["checkpoint"] == str(expected.resolve())
    why = "the lowest val/loss" if held_out else "its newest checkpoint"
    assert f"note: --tokenizer {tok}: using {expected.name}, " in printed and why in printed
    from eegfast.train.commands.pretrain import load_tokenizer

    loaded = load_tokenizer(str(tok), torch.device("cpu")).state_dict()
    saved = ckpt.load_weights(expected)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    if held_out:  # the tokenizer run's best moves on: the resumed pretraining keeps its own
        _set_metric(newest, ckpt.checkpoint_meta(older)["metric"] - 1.0)
        argv = pretrain_argv(prepared, tok, pre, "train.max_steps=4", "--resume", "auto")
        assert cli(argv) == 0
        printed = capsys.readouterr().out
        assert "the tokenizer checkpoint this run started with" in printed
        assert ckpt.latest_checkpoint(pre / "checkpoints").meta["tokenizer"] == recorded


def test_pretrain_target_cache_limit_is_wired(prepared, tokenizer_run, tmp_path, capsys):
    """pretrain.cache_targets_max_mb reaches the cache (0: every window left out, said in the
    summary); a negative limit is a one-line error before any work."""
    out = tmp_path / "pre"
    argv = pretrain_argv(prepared, tokenizer_run, out, "pretrain.cache_targets_max_mb=0")
    assert cli(argv) == 0
    printed, err = capsys.readouterr()
    assert "warning: the tokenizer-target cache is full (0 MiB, 0 windows)" in err
    assert "0 of 2 batches from the cache (0 windows, 0.0 MiB; full, 4 rows left out)" in printed
    bad = pretrain_argv(
        prepared, tokenizer_run, tmp_path / "bad", "pretrain.cache_targets_max_mb=-1"
    )
    assert cli(bad) == 2
    assert "pretrain.cache_targets_max_mb must be >= 0, got -1" in capsys.readouterr().err


# --- B: one-line errors before any work --------------------------------------------------


@pytest.mark.parametrize("command", ["prepare", "tokenizer", "pretrain", "finetune", "evaluate"])
def test_out_that_is_a_file_is_a_one_line_error(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    argv = {
        "prepare": ["prepare", str(tmp_path / "x.edf")],
        "tokenizer": ["tokenizer", "--data", str(tmp_path)],
        "pretrain": ["pretrain", "--data", str(tmp_path), "--tokenizer", str(tmp_path)],
        "finetune": ["finetune", "--data", str(tmp_path)],
        "evaluate": ["evaluate", "--data", str(tmp_path), "--model", str(tmp_path)],
    }[command]
    assert cli([*argv, "--out", str(afile)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"eegfast {command}: --out {afile}: exists and is not a folder"
    )
    assert afile.read_text() == "keep me"


def test_upcycle_out_file_and_layers_out_of_range(pretrain_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli(["upcycle", "--model", str(pretrain_run), "--out", str(afile)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    out = tmp_path / "moe"
    argv = ["upcycle", "--model", str(pretrain_run), "--out", str(out)]
    assert cli([*argv, "--set", "upcycle.layers=[99]"]) == 2
    err = capsys.readouterr().err
    assert "upcycle.layers: [99] out of range" in err and "0..1" in err
    assert cli(argv) == 0
    assert cli(argv) == 2  # an upcycled model there already
    assert "--overwrite" in capsys.readouterr().err
    assert cli([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("command", "model", "message"),
    [
        ("pretrain", "labram_tiny", "--model labram_tiny is not a pretraining model; use one of"),
        ("pretrain", "vqnsp_tiny", "--model vqnsp_tiny is not a pretraining model"),
        ("tokenizer", "labram_tiny", "--model labram_tiny is not a tokenizer (vqnsp_*)"),
    ],
)
def test_wrong_model_for_the_command(command, model, message, tmp_path, capsys):
    argv = [command, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", model]
    if command == "pretrain":
        argv += ["--tokenizer", str(tmp_path)]
    assert cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_arguments(prepared, tokenizer_run, pretrain_run, tmp_path, capsys):
    out = tmp_path / "tok"
    # another kind of checkpoint
    argv = tokenizer_argv(prepared, out, "--resume", str(pretrain_run / "checkpoints"))
    assert cli(argv) == 2
    step = pretrain_run / "checkpoints" / "step-00000002"
    assert cli(tokenizer_argv(prepared, out, "--resume", str(step))) == 2
    err = capsys.readouterr().err
    assert f"--resume {step}: a 'pretrain' checkpoint, this command trains a 'tokenizer'" in err
    # a typo
    assert cli(tokenizer_argv(prepared, out, "--resume", "AUTO")) == 2
    err = capsys.readouterr().err
    assert "--resume AUTO:" in err and "auto, a checkpoint folder" in err
    # a run folder: its newest checkpoint
    assert (
        cli(tokenizer_argv(prepared, out, "train.max_steps=3", "--resume", str(tokenizer_run))) == 0
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert f"resumed from {tokenizer_run / 'checkpoints' / 'step-00000002'}" in printed
    # the larger max_steps, said in one line
    assert "eegfast tokenizer: warning: resuming " in captured.err
    assert "train.max_steps: 2 -> 3" in captured.err
    assert steps(out) == [3]
    # a finished run
    assert cli(tokenizer_argv(prepared, out, "train.max_steps=3", "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert f"already complete at step 3; checkpoint {out / 'checkpoints' / 'step-00000003'}" in (
        printed
    )
    assert "None" not in printed


def test_ctrl_c_prints_one_line_and_keeps_checkpoints(prepared, tokenizer_run, tmp_path):
    out = tmp_path / "pre"
    argv = pretrain_argv(prepared, tokenizer_run, out, "train.max_steps=100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eegfast", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not steps(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("eegfast pretrain: interrupted at step ")
    assert "continue with --resume auto" in lines[0]
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert f"last checkpoint {latest.path}" in lines[0]
    ckpt.load_training_state(latest.path)  # loadable
    ckpt.load_weights(latest.path)
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --- B: finetune notes, tasks and evaluate's warning ---------------------------------------


def finetune_argv(prepared, pretrain_run, out, *extra):
    argv = ["finetune", "--data", str(prepared), "--init", str(pretrain_run), "--out", str(out)]
    for item in (
        "train.max_steps=2",
        "train.batch_size=4",
        "finetune.band_power_baseline=false",
    ):
        argv += ["--set", item]
    return [*argv, *extra, "--no-progress"]


def test_finetune_unknown_task_lists_the_tasks(prepared, tmp_path, capsys):
    argv = ["finetune", "--data", str(prepared), "--out", str(tmp_path / "ft"), "--tasks", "nope"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "--tasks: nope not in the data; its tasks are arith" in err


def test_finetune_folds_note_and_evaluate_warns_about_training_windows(
    prepared, pretrain_run, tmp_path, capsys
):
    out = tmp_path / "ft"
    assert cli(finetune_argv(prepared, pretrain_run, out, "--folds", "10")) == 0
    printed = capsys.readouterr().out
    assert "10 folds requested, only 2 groups: using 2" in printed
    assert "10 folds requested, only 2 groups: using 2" in (out / "report.md").read_text()
    fold = out / "fold0" / "single-arith"
    meta = ckpt.latest_checkpoint(fold / "checkpoints").meta
    assert len(meta["train_recordings"]) == 1
    # the backbone was pretrained on the same recordings: recorded, carried on, and reported
    seen = ckpt.latest_checkpoint(pretrain_run / "checkpoints").meta["pretrained_on"]
    assert len(seen["recordings"]) == 2 and "/" not in "".join(seen["recordings"])
    assert "pretrained (self-supervised, without labels) on 2 of the 2 tested" in (
        (out / "report.md").read_text()
    )
    # rerun refused, --resume auto continues every fold's own run
    assert cli(finetune_argv(prepared, pretrain_run, out)) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert cli(finetune_argv(prepared, pretrain_run, out, "--resume", "auto")) == 0
    # evaluate leaves the fold's training windows out; --include-training-windows scores them
    evaluation = tmp_path / "eval"
    argv = ["evaluate", "--model", str(fold), "--data", str(prepared), "--out", str(evaluation)]
    assert cli([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 of 12 windows are from the 1 recording(s) this model was fine-tuned on: left out" in (
        printed
    )
    with open(evaluation / "predictions.csv", newline="") as f:
        held_out = list(csv.DictReader(f))
    assert len(held_out) == 6
    report = (evaluation / "report.md").read_text()  # one model's scores: no folds, no baseline
    assert "## Metrics\n" in report and "| task | method | balanced_accuracy |" in report
    for fold_wording in ("cross-validation for", " ± ", "Against the classic baseline"):
        assert fold_wording not in report
    assert not {row["recording"] for row in held_out} & set(meta["train_recordings"])
    assert all(len(row["probabilities"].split()) == 2 for row in held_out)
    everything = tmp_path / "eval-all"
    argv[-1] = str(everything)
    assert cli([*argv, "--include-training-windows", "--no-progress"]) == 0
    assert "warning: 6 of 12 windows are from the 1 recording(s)" in capsys.readouterr().out
    assert "overstate held-out performance" in (everything / "report.md").read_text()
    assert len((everything / "predictions.csv").read_text().splitlines()) == 1 + 12
    # a model fine-tuned on every recording of the data has nothing held out to score
    meta_path = ckpt.resolve_weights_path(fold).parent / "meta.json"
    recorded = json.loads(meta_path.read_text())
    recorded["train_recordings"] = sorted({item.recording for item in load_data([prepared]).items})
    meta_path.write_text(json.dumps(recorded))
    argv[-1] = str(tmp_path / "eval-none")
    assert cli([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "all 12 labelled windows" in err and "--include-training-windows" in err


def test_evaluate_export_features_must_be_npz(tmp_path, capsys):
    """The features are an .npz archive: another suffix is refused before any work."""
    argv = ["evaluate", "--model", str(tmp_path / "nothing"), "--data", str(tmp_path)]
    argv += ["--out", str(tmp_path / "eval"), "--export-features", str(tmp_path / "feat.txt")]
    assert cli(argv) == 2
    assert "--export-features" in capsys.readouterr().err and not (tmp_path / "eval").exists()


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(prepared, tmp_path, capsys):
    """``--resume RUN/checkpoints/step-2`` in a run that went on to step 4: step 4 (the abandoned
    run's) is moved aside with a one-line warning, so ``--resume auto`` then continues this run
    (step 3), not the abandoned one."""
    out = tmp_path / "tok"
    assert cli(tokenizer_argv(prepared, out, "train.max_steps=4", "train.keep_last=5")) == 0
    assert steps(out) == [2, 4]
    branch = out / "checkpoints" / "step-00000002"
    argv = tokenizer_argv(prepared, out, "train.max_steps=3", "train.checkpoint_every=1",
                          "train.keep_last=5", "--resume", str(branch))  # fmt: skip
    assert cli(argv) == 0
    err = capsys.readouterr().err
    aside = out / "checkpoints" / "abandoned-after-step-00000002"
    assert "eegfast tokenizer: warning: resuming from step 2" in err
    assert "(step-00000004)" in err and str(aside) in err
    assert steps(out) == [2, 3] and (aside / "step-00000004" / ckpt.STATE).is_file()
    assert cli(tokenizer_argv(prepared, out, "train.max_steps=3", "--resume", "auto")) == 0
    assert "already complete at step 3" in capsys.readouterr().out


def test_a_run_refused_after_claiming_a_new_out_leaves_no_folder(prepared, tmp_path, capsys):
    """Settings found bad after --out was claimed (every recording held out) left a folder
    holding only the lock file; a folder that was there before is left as it was."""
    out = tmp_path / "tok"
    assert cli(tokenizer_argv(prepared, out, "data.val_fraction=0.9")) == 2
    assert "data.val_fraction" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    assert cli(tokenizer_argv(prepared, out, "data.val_fraction=0.9")) == 2
    assert out.is_dir()


def test_a_fine_tuning_folder_given_as_weights_names_its_fold_models(tmp_path):
    """finetune --init / upcycle --model given the top folder of a fine-tuning said only "no
    weights at ..."; the error names the fold models to choose from, as predict's does."""
    for fold in ("fold1", "fold2"):
        (tmp_path / "ft" / fold / "multitask" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="a fine-tuning folder, with one model per fold"):
        ckpt.resolve_weights_path(tmp_path / "ft")
    try:
        ckpt.resolve_weights_path(tmp_path / "ft")
    except FileNotFoundError as err:
        assert str(tmp_path / "ft" / "fold1" / "multitask") in str(err)
    with pytest.raises(FileNotFoundError, match="expected a .safetensors file"):
        ckpt.resolve_weights_path(tmp_path / "elsewhere")


def test_overwrite_that_fails_before_writing_keeps_the_earlier_run(prepared, tmp_path, capsys):
    # --overwrite deleted the earlier run as --out was claimed: a typo in --data (found after
    # the claim) left only .lock where the checkpoints had been
    out = tmp_path / "tok"
    assert cli(tokenizer_argv(prepared, out, "train.max_steps=2")) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = tokenizer_argv(tmp_path / "no-such-data", out, "train.max_steps=1", "--overwrite")
    assert cli(argv) == 2
    assert "no-such-data" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # all of it back
    assert steps(out) == [2]


def test_overwrite_sets_the_earlier_run_aside_until_the_new_one_has_written(tmp_path):
    import argparse

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "metrics.csv").write_text("step,train/loss\n2,1.0\n")
    (out / "fold0" / "single").mkdir(parents=True)
    (out / "fold0" / "single" / "config.yaml").write_text("old: 1\n")
    (out / "notes.txt").write_text("mine")  # not a run's: never touched
    args = argparse.Namespace(out=out, overwrite=True, resume=None)

    with pytest.raises(RuntimeError, match="failed after writing"):  # wrote, then failed
        with common.run_folder(args):
            assert not (out / "metrics.csv").exists()  # set aside while the run goes on
            assert [p.name for p in out.glob(".replaced-*")] == [f".replaced-{os.getpid()}"]
            (out / "metrics.csv").write_text("step,train/loss\n1,2.0\n")
            raise RuntimeError("failed after writing")
    assert (out / "metrics.csv").read_text().endswith("1,2.0\n")  # the new run's, resumable
    assert not (out / "checkpoints").exists() and not (out / "fold0").exists()
    assert not list(out.glob(".replaced-*")) and (out / "notes.txt").read_text() == "mine"

    # a run killed (no cleanup) before writing: the next claim puts its predecessor back
    aside = out / ".replaced-99999999"
    (aside / "fold1" / "single").mkdir(parents=True)
    (aside / "fold1" / "single" / "config.yaml").write_text("old: 2\n")
    os.replace(out / "metrics.csv", aside / "metrics.csv")
    with pytest.raises(common.CommandError, match="holds an earlier run"):
        with common.run_folder(argparse.Namespace(out=out, overwrite=False, resume=None)):
            pass
    assert (out / "fold1" / "single" / "config.yaml").read_text() == "old: 2\n"
    assert (out / "metrics.csv").is_file() and not aside.exists()

    with common.run_folder(args):  # a run that ends: the earlier one is gone
        (out / "config.yaml").write_text("new: 1\n")
    assert not (out / "metrics.csv").exists() and not (out / "fold1").exists()
    assert not list(out.glob(".replaced-*")) and (out / "config.yaml").is_file()


def test_the_finished_line_counts_steps_in_english():
    from types import SimpleNamespace

    done = [SimpleNamespace(step=n, checkpoint=Path("c"), resumed_from=None) for n in (1, 2)]
    assert common.finished_message(done[0], "trained") == "trained for 1 step; checkpoint c"
    assert common.finished_message(done[1], "trained") == "trained for 2 steps; checkpoint c"
