"""Fine-tuning audit: the band-power baseline over recordings of other electrode sets, fold
planning errors, the report's fold counts (no model training unless said)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eegfast.train.config import RunConfig
from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.finetune import CVResult, _record, cross_validate, plan_folds, write_outputs

SFREQ_T = np.arange(200) / 200.0


def _windows(electrodes_of, seed: int = 0) -> TrainData:
    """A task ``t`` of 8 subjects, 3 windows per class each; class 1 has a strong 10 Hz
    rhythm on electrode 3 only. ``electrodes_of(subject)``: the subject's electrode ids (its
    recording's channel order); the rows of x follow that order."""
    rng = np.random.default_rng(seed)
    items, windows = [], []
    for s in range(8):
        electrodes = tuple(electrodes_of(s))
        for label in (0, 1):
            for _ in range(3):
                signal = {e: rng.normal(size=200) for e in range(1, 6)}
                signal[3] = signal[3] + 3.0 * label * np.sin(2 * np.pi * 10 * SFREQ_T)
                x = np.stack([signal[e] for e in electrodes])[:, None, :]
                items.append(ItemInfo(0, "t", f"S{s}", f"S{s}.edf", label, (0, *electrodes), 1))
                windows.append({"x": torch.tensor(x, dtype=torch.float32)})
    return TrainData(windows, items, {"t": ["rest", "task"]}, [])


def _baseline(data: TrainData, tmp_path: Path, log=None):
    config = RunConfig().with_overrides({"finetune.folds": 2})
    kwargs = {} if log is None else {"log": log}
    result = cross_validate(data, config, tmp_path, None, None, **kwargs)
    preds = sorted(
        (p for p in result.predictions if p["variant"] == "band_power"), key=lambda p: p["fold"]
    )
    return result, preds


def test_band_power_columns_are_electrodes_whatever_each_recordings_channel_order(tmp_path):
    """Half of the subjects' recordings list the same electrodes in another order (e.g. a
    second folder): the baseline's column for (electrode, band) must hold that electrode's band
    power in every window; it stacked each window's channels in its own order, so a column
    mixed electrodes, silently, and the baseline's scores changed with the channel order."""
    canonical = _windows(lambda s: (1, 2, 3, 4))
    shuffled = _windows(lambda s: (1, 2, 3, 4) if s % 2 else (4, 3, 2, 1))
    _, expected = _baseline(canonical, tmp_path / "a")
    _, got = _baseline(shuffled, tmp_path / "b")
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g["y"], e["y"])
        np.testing.assert_allclose(g["probs"], e["probs"], atol=1e-6)


def test_band_power_baseline_runs_on_a_task_of_several_electrode_sets(tmp_path):
    """Recordings of 4 and of 5 electrodes in one task: the baseline raised numpy's 'all input
    arrays must have the same shape' after the fold's models had trained; it now uses the
    electrodes every window has, and the report says so."""
    data = _windows(lambda s: (1, 2, 3, 4) if s % 2 else (5, 3, 2, 1, 4))
    said: list[str] = []
    result, preds = _baseline(data, tmp_path, log=said.append)
    assert len(preds) == 2
    bacc = [r["value"] for r in result.rows if r["metric"] == "balanced_accuracy"]
    assert np.mean(bacc) > 0.75  # electrode 3's rhythm is found among the common electrodes
    assert "the 4 electrodes all of them have" in result.grouping["t"]
    assert any("electrode sets" in s for s in said)


def test_no_band_power_baseline_for_a_task_whose_recordings_share_no_electrode(tmp_path):
    data = _windows(lambda s: (1, 2) if s % 2 else (3, 4))
    result, preds = _baseline(data, tmp_path)
    assert preds == [] and "no band-power baseline" in result.grouping["t"]


@pytest.mark.parametrize("group_by", ["subject", "recording"])
def test_a_task_of_one_recording_is_refused_naming_the_task(group_by):
    """It was group_folds' 'needs at least 2 groups, found 1 (['recording:run4.edf']); use
    finetune.group_by=recording': no task named, and advice the fold plan already followed."""
    items = [ItemInfo(0, "mi", "S1", "run4.edf", label, (0, 1), 1) for label in (0, 1, 0, 1)]
    items += [ItemInfo(0, "arith", f"P{s}", f"P{s}.edf", s % 2, (0, 1), 1) for s in range(4)]
    data = TrainData(None, items, {"mi": ["l", "r"], "arith": ["rest", "task"]}, [])
    with pytest.raises(ValueError, match=r"task 'mi'.* one recording \(run4\.edf\)") as err:
        plan_folds(data, ["arith", "mi"], 5, group_by, 0)
    assert "group_by=recording" not in str(err.value)


def test_a_metric_undefined_in_a_fold_says_over_how_many_folds_it_is(tmp_path):
    """Fold 2 tests one class only, so its AUROC and AUC-PR are undefined (NaN): their means
    are fold 1's alone. The report printed '0.xxx ± 0.000' in a row of 2 folds (two folds
    agreeing, it read) and summary.json said folds 2."""
    labels = [0, 1, 0, 1, 1, 1, 1, 1]
    items = [ItemInfo(0, "t", f"S{i}", f"r{i}", lab, (0, 1), 1) for i, lab in enumerate(labels)]
    data = TrainData(None, items, {"t": ["rest", "task"]}, [])
    result = CVResult(grouping={"t": "by subject"}, units={"t": "subject"})
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    for fold, test in ((0, np.arange(4)), (1, np.arange(4, 8))):
        _record(result, fold, "single", "t", data, test, probs)
    payload = write_outputs(result, data, tmp_path, title="t")
    folds = {s["metric"]: s["folds"] for s in payload["summary"]}
    assert folds == {"balanced_accuracy": 2, "auroc": 1, "auc_pr": 1}
    row = next(
        line for line in (tmp_path / "report.md").read_text().splitlines() if "single" in line
    )
    assert row.count("(1 of 2 folds)") == 2 and "1.000 ± 0.000" not in row
