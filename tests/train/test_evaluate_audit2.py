"""``eegfast evaluate`` of a fine-tuned model, second audit: what it replaces in --out (never a
training run's report and logs; an earlier evaluation's TensorBoard events too) and the tasks
of --data it does not score, said in the report. On cuts of the real sample, with the two-head
model of ``test_predict`` (tasks arith and other, fine-tuned for 2 steps)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eegfast.cli import main as cli
from eegfast.train.commands.common import hold_lock
from tests.train._sample import prepare_windows
from tests.train.test_predict import runs  # noqa: F401


def _evaluate(model: Path, out: Path, *data: Path, extra: tuple[str, ...] = ()) -> int:
    argv = ["evaluate", "--model", str(model), "--data", *map(str, data), "--out", str(out)]
    return cli([*argv, *extra, "--no-progress"])


def test_an_out_holding_a_training_run_is_refused(runs, capsys):  # noqa: F811
    """``--out`` given as the fine-tuning's folder (or a fold model's own): the evaluation
    replaced its report.md, results.csv, summary.json, predictions.npz and plots without a
    word, and added its scalars to the run's TensorBoard logs."""
    ft = runs["ft"]
    report = (ft / "report.md").read_text()
    for out in (ft, runs["model"]):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert _evaluate(runs["model"], out, runs["arith"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: holds a training run" in err and "choose another --out" in err
        assert len(err.strip().splitlines()) == 1
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (ft / "report.md").read_text() == report


def _scalar_tags(folder: Path) -> set[str]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_an_earlier_evaluations_tensorboard_events_are_replaced(runs, tmp_path):  # noqa: F811
    """A second evaluation into the same --out left the first one's events file beside its
    own: TensorBoard showed the first model's (or task's) scores as this evaluation's."""
    out = tmp_path / "eval"
    extra = ("--include-training-windows",)
    assert _evaluate(runs["model"], out, runs["arith"], extra=extra) == 0
    assert _scalar_tags(out / "tensorboard") == {
        f"cv/arith/{m}/multitask" for m in ("balanced_accuracy", "auroc", "auc_pr")
    }
    assert _evaluate(runs["model"], out, runs["other"], extra=extra) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert {t.split("/")[1] for t in _scalar_tags(out / "tensorboard")} == {"other"}


def test_tasks_of_the_data_that_are_not_scored_are_said(runs, tmp_path, capsys):  # noqa: F811
    """A task missing from the report's table was not said to be: a task of --data the model
    has no head for, one whose labelled windows are all from recordings the model was
    fine-tuned on (fold0 trained on Subject00_1), one without labelled windows."""
    cuts = runs["arith"].parent
    trained = prepare_windows(
        tmp_path / "trained",
        [f"arith={cuts / 'Subject00_1_cut.fif'}"],
        *("--filename-rule", "_1_cut$=rest"),
    )
    out = tmp_path / "eval"
    assert _evaluate(runs["model"], out, trained, runs["other"], runs["new"]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for said in (
        "task 'new' of --data: --model has no head for it (its heads: arith, other): not scored",
        "task 'arith': all its 6 labelled windows are from recordings the model was fine-tuned "
        "on: not scored (--include-training-windows scores them)",
    ):
        assert said in printed and f"- {said}" in report
    assert "| other |" in report and "| arith |" not in report

    unlabelled = prepare_windows(tmp_path / "unlabelled", [f"arith={cuts / 'Subject00_2_cut.fif'}"])
    out = tmp_path / "eval2"
    assert _evaluate(runs["model"], out, unlabelled, runs["other"]) == 0
    said = "task 'arith': no labelled window in --data: not scored"
    assert said in capsys.readouterr().out and f"- {said}" in (out / "report.md").read_text()


def test_an_evaluation_does_not_write_where_another_command_is_writing(runs, tmp_path, capsys):  # noqa: F811
    """Two evaluations into one --out at once (a sweep given one folder) wrote their report
    files over each other's, leaving a mix of the two; predict already took the folder's lock."""
    out = tmp_path / "eval"
    with hold_lock(out):  # another evaluation (or predict) writing there now
        assert _evaluate(runs["model"], out, runs["arith"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: another eegfast run is writing to this folder" in err
    assert not (out / "report.md").exists() and not (out / "results.csv").exists()
    assert _evaluate(runs["model"], out, runs["arith"]) == 0  # once it is done
    assert (out / "report.md").is_file()
