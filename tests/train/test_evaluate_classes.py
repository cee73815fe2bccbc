"""``eegfast evaluate`` scores in the model's classes (matched by name), whatever classes and
class order the evaluated folder has, and its ``predictions.csv`` places windows as
``eegfast predict`` does; fine-tuned checkpoints record their classes and data settings. On
cuts of the real sample, with a model fine-tuned for 2 steps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from eegfast.cli import main as cli
from eegfast.train import checkpoint as ckpt
from tests.train._sample import prepare_windows, sample_recording_cut

RULES = ("--filename-rule", "_1_cut$=rest", "--filename-rule", "_2_cut$=task")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``arith``: Subject00's two 24-s cuts as rest/task (4-s windows); the same recordings
    with the classes numbered the other way round (``reordered``); the task cut alone
    (``only_task``: one class of the two); the task cut labelled ``sleep``; and a single-task
    model fine-tuned on ``arith`` for 2 steps (2 folds, by recording)."""
    root = tmp_path_factory.mktemp("evaluate_classes")
    cuts = [sample_recording_cut(f"Subject00_{i}.edf", 24.0, root) for i in (1, 2)]
    both = [f"arith={c}" for c in cuts]
    runs = {
        "arith": prepare_windows(root / "arith", both, *RULES),
        "reordered": prepare_windows(root / "reordered", both, *RULES, "--classes", "task,rest"),
        "only_task": prepare_windows(root / "only_task", both[1:], *RULES),
        "sleep": prepare_windows(root / "sleep", both[1:], "--filename-rule", "_2_cut$=sleep"),
    }
    ft = root / "ft"
    argv = ["finetune", "--data", str(runs["arith"]), "--out", str(ft), "--folds", "2"]
    for item in (
        "model.name=labram_tiny",
        "train.max_steps=2",
        "train.batch_size=4",
        "finetune.band_power_baseline=false",
    ):
        argv += ["--set", item]
    assert cli([*argv, "--no-progress"]) == 0
    runs["model"] = ft / "fold0" / "single-arith"
    return runs


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _evaluate(runs, data: str, out: Path, model: Path | None = None) -> int:
    argv = ["evaluate", "--model", str(model or runs["model"]), "--data", str(runs[data])]
    return cli([*argv, "--out", str(out), "--include-training-windows", "--no-progress"])


def _metrics(out: Path) -> dict[str, str]:
    return {r["metric"]: r["value"] for r in _rows(out / "results.csv")}


def test_a_folder_with_a_subset_of_the_classes_is_scored_in_the_model_classes(
    runs, tmp_path, capsys
):
    """The data's only class is the model's second: labels compared with that output, the
    absent class said in words (no crash, no ROC curve without both classes)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert _evaluate(runs, "arith", full) == 0
    capsys.readouterr()
    assert _evaluate(runs, "only_task", part) == 0
    captured = capsys.readouterr()
    assert "no scored window of class rest" in captured.out
    assert "warning" not in captured.err
    rows = _rows(part / "predictions.csv")
    assert len(rows) == 6 and {r["label"] for r in rows} == {"task"}
    # the same windows scored with both classes present: the same outputs and predictions
    same = [r for r in _rows(full / "predictions.csv") if r["recording"] == rows[0]["recording"]]
    assert [(r["predicted"], r["probabilities"]) for r in same] == [
        (r["predicted"], r["probabilities"]) for r in rows
    ]
    hits = sum(r["predicted"] == "task" for r in rows)
    metrics = _metrics(part)
    assert float(metrics["balanced_accuracy"]) == pytest.approx(hits / 6)
    assert metrics["auroc"] == "nan"
    assert not (part / "roc_curves.png").exists()


def test_classes_numbered_otherwise_give_the_same_scores(runs, tmp_path):
    """A folder numbering the same classes the other way round: labels matched by name, so
    predictions, probabilities and metrics are those of the folder in the model's order."""
    natural, reordered = tmp_path / "natural", tmp_path / "reordered"
    assert _evaluate(runs, "arith", natural) == 0
    assert _evaluate(runs, "reordered", reordered) == 0
    key = ("recording", "window", "label", "predicted", "probabilities", "classes")
    assert [tuple(r[k] for k in key) for r in _rows(natural / "predictions.csv")] == [
        tuple(r[k] for k in key) for r in _rows(reordered / "predictions.csv")
    ]
    # which probability is which class: the model's order, named in the file
    assert {r["classes"] for r in _rows(reordered / "predictions.csv")} == {'["rest", "task"]'}
    assert _metrics(natural) == _metrics(reordered)


def test_windows_of_a_class_the_model_does_not_have_are_refused(runs, tmp_path, capsys):
    assert _evaluate(runs, "sleep", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"eegfast evaluate: --data {runs['sleep']}: task 'arith' has windows labelled sleep" in (
        err
    )
    assert "its 'arith' classes: rest, task" in err
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_evaluate_places_windows_as_predict_does(runs, tmp_path):
    """Window index in its recording and start time, as predict writes them: rows line up."""
    evaluation, prediction = tmp_path / "eval", tmp_path / "pred"
    assert _evaluate(runs, "arith", evaluation) == 0
    argv = ["predict", "--model", str(runs["model"]), "--data", str(runs["arith"])]
    assert cli([*argv, "--out", str(prediction), "--no-progress"]) == 0
    predicted = {
        (r["task"], r["recording"], r["window"], r["start_s"]): r
        for r in _rows(prediction / "predictions.csv")
    }
    scored = _rows(evaluation / "predictions.csv")
    assert len(scored) == 12 and {r["window"] for r in scored} == {str(w) for w in range(6)}
    for r in scored:
        twin = predicted[(r["task"], r["recording"], r["window"], r["start_s"])]
        assert (twin["label"], twin["predicted"]) == (r["label"], r["predicted"])
        assert float(r["start_s"]) == 4 * int(r["window"])


def test_the_checkpoint_records_classes_windows_and_preprocessing(runs, tmp_path, capsys):
    """Recorded in every fine-tuned checkpoint, and used when the training folders are gone."""
    meta = ckpt.latest_checkpoint(runs["model"] / "checkpoints").meta
    assert meta["label_names"] == {"arith": ["rest", "task"]}
    assert meta["window_seconds"] == [4]
    index = json.loads((runs["arith"] / "index.json").read_text())
    assert meta["preprocess"] == [
        {"root": str(runs["arith"]), "settings": index["settings"]["preprocess"]}
    ]
    # the training folder moved: the classes and window length still come from the checkpoint
    model = tmp_path / "model"
    shutil.copytree(runs["model"], model)
    for meta_path in model.glob("checkpoints/*/meta.json"):
        recorded = json.loads(meta_path.read_text())
        recorded["config"]["data"]["roots"] = [str(tmp_path / "moved")]
        meta_path.write_text(json.dumps(recorded))
    assert _evaluate(runs, "only_task", tmp_path / "eval", model=model) == 0
    assert {r["label"] for r in _rows(tmp_path / "eval" / "predictions.csv")} == {"task"}
    capsys.readouterr()
    # ... and so does the window length the model was fine-tuned on
    source = index["recordings"][0]["file"]
    short = prepare_windows(tmp_path / "short", [f"arith={source}"], *RULES, "--window", "2")
    capsys.readouterr()
    assert _evaluate({**runs, "short": short}, "short", tmp_path / "eval-short", model=model) == 2
    assert "2-s windows, the model was fine-tuned on 4-s windows" in capsys.readouterr().err


def test_an_old_checkpoint_without_class_names_or_folders_is_refused(runs, tmp_path, capsys):
    """Neither recorded nor readable, and --data has another number of classes: refused."""
    model = tmp_path / "model"
    shutil.copytree(runs["model"], model)
    for meta_path in model.glob("checkpoints/*/meta.json"):
        recorded = json.loads(meta_path.read_text())
        for key in ("label_names", "window_seconds", "preprocess"):
            del recorded[key]
        recorded["config"]["data"]["roots"] = [str(tmp_path / "moved")]
        meta_path.write_text(json.dumps(recorded))
    assert _evaluate(runs, "only_task", tmp_path / "eval", model=model) == 2
    err = capsys.readouterr().err
    assert "the class names of its 'arith' head (2 outputs) are not recorded" in err
    assert "--data has 1 classes for 'arith' (task)" in err
    assert _evaluate(runs, "reordered", tmp_path / "eval2", model=model) == 0
    assert "its outputs are taken to be --data's classes in --data's order (task, rest)" in (
        capsys.readouterr().out
    )


def test_a_folder_without_labels_is_refused_pointing_to_predict(runs, tmp_path, capsys):
    """A folder of the model's task without labels (new recordings) was refused with "all 0
    labelled windows of ['arith'] are from the recordings --model was fine-tuned on", which
    is not what is wrong; it says there is no label to score against, and names predict."""
    cut = sample_recording_cut("Subject00_2.edf", 8.0, tmp_path)
    unlabelled = prepare_windows(tmp_path / "unlabelled", [f"arith={cut}"])
    argv = ["evaluate", "--model", str(runs["model"]), "--data", str(unlabelled)]
    assert cli([*argv, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data {unlabelled}: no labelled window of arith to score" in err
    assert "eegfast predict" in err and "all 0" not in err
    assert len(err.splitlines()) == 1


def test_a_task_asked_for_that_the_model_has_no_head_for_is_refused(runs, tmp_path, capsys):
    """``--tasks arith,other`` on a model with an ``arith`` head only: the report held arith's
    scores alone and said nothing of ``other``."""
    cut = sample_recording_cut("Subject00_1.edf", 8.0, tmp_path)
    other = prepare_windows(tmp_path / "other", [f"other={cut}"], *RULES)
    argv = ["evaluate", "--model", str(runs["model"]), "--data", str(runs["arith"]), str(other)]
    argv += ["--tasks", "arith,other", "--out", str(tmp_path / "ev"), "--no-progress"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--tasks other: --model {runs['model']} has no head for it (its heads: arith)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ev" / "report.md").exists()


def test_predictions_csv_names_classes_holding_spaces_readably(tmp_path):
    """Class names from annotations often hold spaces ("Sleep stage W"): joined with spaces,
    the ``classes`` column could not be split back into the names its probabilities follow."""
    from types import SimpleNamespace

    import numpy as np

    from eegfast.train.commands.evaluate import write_predictions

    names = ["Sleep stage W", "Sleep stage 1", "REM"]
    recording = {"starts": [0, 800]}
    data = SimpleNamespace(
        dataset=SimpleNamespace(recordings=[recording]),
        label_names={"sleep": names},
        items=[SimpleNamespace(recording="r.edf", subject="s1", label=i) for i in (0, 2)],
    )
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    path = write_predictions(tmp_path / "p.csv", data, [("sleep", np.arange(2), probs)])
    rows = _rows(path)
    for row in rows:
        classes = json.loads(row["classes"])
        assert classes == names
        assert len(row["probabilities"].split()) == len(classes)
    assert [r["predicted"] for r in rows] == ["Sleep stage W", "REM"]
