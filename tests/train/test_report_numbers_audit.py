"""The numbers a fine-tuning or evaluation report writes, recomputed from its predictions
(eegfast/train/finetune.py's write_outputs)."""

from __future__ import annotations

import csv

import numpy as np
from sklearn.metrics import average_precision_score

from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.finetune import CVResult, _record, write_outputs


def _binary_run(task: str, tests: list[list[int]]) -> tuple[CVResult, TrainData]:
    """One window per subject, labels given per fold (``tests``: each fold's test labels);
    random class-1 probabilities, the same windows for the model and the baseline."""
    labels = [y for fold in tests for y in fold]
    items = [ItemInfo(0, task, f"s{i}", f"r{i}", y, (0, 1, 2), 4) for i, y in enumerate(labels)]
    data = TrainData(dataset=None, items=items, label_names={task: ["rest", "task"]}, roots=[])
    result = CVResult(grouping={task: "by subject"}, units={task: "subject"})
    rng = np.random.default_rng(0)
    start = 0
    for fold, part in enumerate(tests):
        test = np.arange(start, start + len(part))
        start += len(part)
        for variant in ("single", "band_power"):
            p = rng.random(len(test))
            _record(result, fold, variant, task, data, test, np.stack([1 - p, p], 1))
    return result, data


def test_results_csv_keeps_a_task_name_with_a_comma_in_one_field(tmp_path):
    """A task is named after its folder by default (``Patients, 2023``): written unquoted, the
    name split results.csv's rows into six fields, shifting metric and value."""
    result, data = _binary_run("Patients, 2023", [[0, 1, 0, 1], [1, 0, 1, 0]])
    write_outputs(result, data, tmp_path, title="t")
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.rows)
    assert {r["task"] for r in rows} == {"Patients, 2023"}
    assert all(None not in r for r in rows)  # no field past the header's five
    expected = [f"{r['value']:.6g}" for r in result.rows]
    assert [r["value"] for r in rows] == expected


def test_auc_pr_chance_is_the_mean_of_the_folds_it_is_averaged_over(tmp_path):
    """AUC-PR's chance level is the positive share of the test windows of a fold, and the
    table's AUC-PR is a mean over the folds where it is defined: its chance is the mean of
    those folds' shares. The pooled share (0.429 here) counted the windows of a fold testing
    one class (AUC-PR undefined there) and weighed folds by their size."""
    folds = [[1, 1, 1, 1], [0, 0, 0, 1], [0, 1]]  # shares 1 (AUC-PR n/a), 0.25 and 0.5
    result, data = _binary_run("arith", folds)
    payload = write_outputs(result, data, tmp_path, title="t")
    report = (tmp_path / "report.md").read_text()
    assert "share of the test windows, 0.375" in report  # (0.25 + 0.5) / 2
    # the mean it is the chance of: over the two folds that test both classes
    means = {(s["variant"], s["metric"]): s for s in payload["summary"]}
    assert means[("single", "auc_pr")]["folds"] == 2
    per_fold = [
        average_precision_score(p["y"], p["probs"][:, 1])
        for p in result.predictions
        if p["variant"] == "single" and len(set(p["y"])) == 2
    ]
    assert means[("single", "auc_pr")]["mean"] == np.mean(per_fold)
