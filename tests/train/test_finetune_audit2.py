"""Fine-tuning audit, second pass: a class missing from a fold's training part, Cohen's κ of
a fold that tests one class, finetune's unused data.val_fraction (no model training)."""

from __future__ import annotations

import math
import re

import numpy as np

from eegfast import cli
from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.finetune import CVResult, _record, plan_folds, write_outputs
from eegfast.train.metrics import classification_metrics


def _rare_class_data() -> TrainData:
    """6 subjects with classes a and b (3 windows each); class rare only in subject S0."""
    items = [
        ItemInfo(0, "t", f"S{s}", f"S{s}.edf", label, (0, 1), 1)
        for s in range(6)
        for label in (0, 1)
        for _ in range(3)
    ]
    items += [ItemInfo(0, "t", "S0", "S0.edf", 2, (0, 1), 1)] * 3
    return TrainData(None, items, {"t": ["a", "b", "rare"]}, [])


def test_a_class_missing_from_a_folds_training_part_is_flagged():
    """Class `rare` has one subject: the fold testing S0 trains every model (and the
    baselines) without it and scores its windows as missed whatever the model; the report
    said nothing (its warning was for a training part of one class only)."""
    data = _rare_class_data()
    plans, grouping = plan_folds(data, ["t"], 3, "subject", 0)
    lacking = [
        p.fold + 1 for p in plans if 2 not in {data.items[int(i)].label for i in p.train["t"]}
    ]
    assert len(lacking) == 1
    note = grouping["t"]
    assert f"WARNING: fold {lacking[0]} trains on no window of rare, and tests them all" in note
    assert "as many subjects as there are folds, 3; or lower finetune.folds" in note
    assert "trains on a only" not in note and "numbers mean nothing" not in note


def test_no_missing_class_warning_when_every_fold_trains_on_every_class():
    items = [
        ItemInfo(0, "t", f"S{s}", f"S{s}.edf", label, (0, 1), 1)
        for s in range(6)
        for label in (0, 1, 2)
    ]
    data = TrainData(None, items, {"t": ["a", "b", "c"]}, [])
    _, grouping = plan_folds(data, ["t"], 3, "subject", 0)
    assert grouping["t"] == "by subject (6 subjects)"


def test_cohen_kappa_is_undefined_in_a_fold_that_tests_one_class():
    """With one class tested, κ is 0 for any imperfect model (chance agreement equals the
    observed one) and NaN for a perfect one: it was 0.0 here, whatever the model had learnt,
    and pulled the mean over folds down, where AUROC is NaN for such folds."""
    probs = np.eye(3)[[1, 0, 1, 1]]  # 3 of 4 right
    got = classification_metrics([1, 1, 1, 1], probs, 3)
    assert math.isnan(got["cohen_kappa"])
    assert got["balanced_accuracy"] == 0.75  # the recall of the one class: defined
    two = classification_metrics([0, 1, 1, 1], probs, 3)
    assert not math.isnan(two["cohen_kappa"])


def test_finetune_says_it_does_not_use_val_fraction(tmp_path, capsys):
    """`--set data.val_fraction=0.1` (or a config file shared with pretrain) was ignored
    silently: no validation part, no best epoch; each fold's last model is tested."""
    argv = ["finetune", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "ft")]
    cli.main([*argv, "--set", "data.val_fraction=0.1"])
    err = capsys.readouterr().err
    assert re.search(r"warning: data\.val_fraction=0\.1 is not used by finetune", err), err
    assert "its last model is tested" in err
    cli.main([*argv[:-1], str(tmp_path / "ft2")])
    assert "val_fraction" not in capsys.readouterr().err


def test_predictions_npz_says_whose_windows_each_row_is(tmp_path):
    """predictions.npz held labels and probabilities only: nothing tied a row to a subject or
    recording, so per-subject scores could not be computed from it."""
    items = [
        ItemInfo(0, "t", f"S{i // 2}", f"S{i // 2}R{i % 2}.edf", i % 2, (0, 1), 1) for i in range(8)
    ]
    data = TrainData(None, items, {"t": ["rest", "task"]}, [])
    result = CVResult(grouping={"t": "by subject"}, units={"t": "subject"})
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    for fold, test in ((0, np.array([0, 1, 4, 5])), (1, np.array([2, 3, 6, 7]))):
        _record(result, fold, "single", "t", data, test, probs)
    write_outputs(result, data, tmp_path, title="t")
    with np.load(tmp_path / "predictions.npz") as saved:  # plain arrays: no pickle needed
        assert saved["single_t_fold1_subject"].tolist() == ["S1", "S1", "S3", "S3"]
        assert saved["single_t_fold1_recording"].tolist() == [
            "S1R0.edf",
            "S1R1.edf",
            "S3R0.edf",
            "S3R1.edf",
        ]
        assert saved["single_t_fold1_y"].tolist() == [0, 1, 0, 1]
        np.testing.assert_array_equal(saved["single_t_fold0_probs"], probs)
