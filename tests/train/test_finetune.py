"""Fold planning, metrics, the band-power baseline and the report writer (no model training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eegfast.train.baseline import band_power_features, fit_predict_band_power
from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.finetune import (
    CVResult,
    _record,
    paired_bacc_difference,
    plan_folds,
    write_outputs,
)
from eegfast.train.metrics import classification_metrics, group_folds


def make_data(spec):
    """spec: (task, subject, recording, label) per item."""
    items = [ItemInfo(0, t, s, r, lab, (0, 1, 2), 4) for t, s, r, lab in spec]
    names = {t: ["a", "b"] for t, *_ in spec}
    return TrainData(dataset=None, items=items, label_names=names, roots=[])


def test_folds_never_share_a_group_and_fall_back_to_recordings():
    spec = []
    for subject in ("s1", "s2", "s3"):
        for rec in ("r1", "r2"):
            spec += [("arith", subject, f"{subject}{rec}", lab) for lab in (0, 1, 1)]
    spec += [("mi", "only", rec, lab) for rec in ("run4", "run8") for lab in (0, 1, 0, 1)]
    spec += [("mi", "only", "run4", -1)]  # unlabelled windows are never used
    data = make_data(spec)
    plans, grouping = plan_folds(data, ["arith", "mi"], k=5, group_by="subject", seed=0)
    assert len(plans) == 2  # limited by mi's two recordings
    assert "by recording" in grouping["mi"] and "only 1 subject" in grouping["mi"]
    assert grouping["arith"].startswith("by subject (3 subjects")
    for task, key in (("arith", "subject"), ("mi", "recording")):
        covered = []
        for plan in plans:
            train = {getattr(data.items[i], key) for i in plan.train[task]}
            test = {getattr(data.items[i], key) for i in plan.test[task]}
            assert not train & test
            covered += list(plan.test[task])
            assert all(data.items[i].label >= 0 for i in plan.test[task])
        assert sorted(covered) == sorted(data.labelled(task).tolist())  # each window tested once


def test_group_folds_needs_two_groups():
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_folds([0, 1, 0, 1], ["a"] * 4, 2)


def test_binary_and_multiclass_metrics():
    y = np.array([0, 0, 1, 1])
    perfect = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    m = classification_metrics(y, perfect, 2)
    assert m == {"balanced_accuracy": 1.0, "auroc": 1.0, "auc_pr": 1.0}
    flipped = classification_metrics(y, perfect[:, ::-1], 2)
    assert flipped["balanced_accuracy"] == 0.0 and flipped["auroc"] == 0.0
    one_class = classification_metrics(np.zeros(3, int), perfect[:3], 2)
    assert math.isnan(one_class["auroc"]) and one_class["balanced_accuracy"] == pytest.approx(2 / 3)
    y3 = np.array([0, 1, 2, 2])
    probs3 = np.eye(3)[[0, 1, 2, 1]]
    m3 = classification_metrics(y3, probs3, 3)
    assert set(m3) == {"balanced_accuracy", "cohen_kappa", "f1_weighted"}
    assert m3["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_band_power_baseline_separates_rhythms():
    rng = np.random.default_rng(0)
    t = np.arange(800) / 200.0

    def window(freq):
        x = np.sin(2 * np.pi * freq * t) + 0.3 * rng.standard_normal((3, 800))
        return x.reshape(3, 4, 200)

    features = band_power_features(window(10.0))
    assert features.shape == (15,) and features.reshape(3, 5).argmax(1).tolist() == [2, 2, 2]
    xs = np.stack([band_power_features(window(f)) for f in [10.0] * 10 + [20.0] * 10])
    ys = np.array([0] * 10 + [1] * 10)
    probs = fit_predict_band_power(xs[::2], ys[::2], xs[1::2], 2)
    assert (probs.argmax(1) == ys[1::2]).all()


def test_report_states_grouping_baseline_verdict_and_transfer(tmp_path):
    data = make_data([("mi", "only", f"r{i % 2}", i % 2) for i in range(8)])
    result = CVResult(grouping={"mi": "by recording (2 recordings)"})
    test = np.arange(8)
    good = np.eye(2)[[i % 2 for i in range(8)]] * 0.8 + 0.1
    bad = np.full((8, 2), 0.5)
    for fold in (0, 1):
        _record(result, fold, "multitask", "mi", data, test, bad)
        _record(result, fold, "single", "mi", data, test, good)
        _record(result, fold, "band_power", "mi", data, test, good)
    payload = write_outputs(result, data, tmp_path, title="t")
    report = (tmp_path / "report.md").read_text()
    assert "does NOT beat the band-power baseline" in report
    row = "| mi | 0.500 | 1.000 | -0.500 | 0.000 | [-0.500, -0.500] | negative transfer |"
    assert row in report
    assert "grouped by recording" in report
    assert payload["comparisons"]["mi"]["negative_transfer"] is True
    assert (tmp_path / "roc_curves.png").is_file() and (tmp_path / "results.csv").is_file()


def test_paired_bacc_difference_and_its_interval():
    y = np.array([0] * 30 + [1] * 10)
    truth = y.copy()
    diff, low, high = paired_bacc_difference(y, truth, truth)
    assert (diff, low, high) == (0.0, 0.0, 0.0)
    always_zero = np.zeros(40, dtype=int)  # BAcc 0.5 against 1.0
    diff, low, high = paired_bacc_difference(y, always_zero, truth)
    assert (
        diff == pytest.approx(-0.5) and low == pytest.approx(-0.5) and high == pytest.approx(-0.5)
    )
    rng = np.random.default_rng(1)
    noisy = np.where(rng.random(40) < 0.3, 1 - y, y)  # a few more errors than `other`
    other = np.where(rng.random(40) < 0.25, 1 - y, y)
    diff, low, high = paired_bacc_difference(y, noisy, other, seed=3)
    assert low < diff < high and low < 0 < high
    # the same inputs and seed give the same interval
    assert paired_bacc_difference(y, noisy, other, seed=3) == (diff, low, high)
    # the multinomial draw is the same distribution as resampling windows within classes
    _, low, high = paired_bacc_difference(y, noisy, other, resamples=20000, seed=4)
    gain = (noisy == y).astype(float) - (other == y)
    by_class = [gain[y == c] for c in (0, 1)]
    draws = [np.mean([rng.choice(g, len(g)).mean() for g in by_class]) for _ in range(20000)]
    expected = np.percentile(draws, [2.5, 97.5])
    assert np.allclose([low, high], expected, atol=0.02)
    with pytest.raises(ValueError, match=r"\(N,\) each"):
        paired_bacc_difference(y, truth[:-1], truth)


def test_report_calls_a_difference_inside_the_interval_no_clear_difference(tmp_path):
    data = make_data([("mi", "only", f"r{i % 2}", i % 2) for i in range(12)])
    result = CVResult(grouping={"mi": "by recording (2 recordings)"})
    test = np.arange(12)
    labels = np.array([i % 2 for i in range(12)])
    model = np.eye(2)[np.where(test < 3, 1 - labels, labels)]  # windows 0-2 wrong
    baseline = np.eye(2)[np.where((test >= 3) & (test < 7), 1 - labels, labels)]  # 3-6 wrong
    for fold in (0, 1):
        _record(result, fold, "multitask", "mi", data, test, model)
        _record(result, fold, "single", "mi", data, test, baseline)
        _record(result, fold, "band_power", "mi", data, test, baseline)
    payload = write_outputs(result, data, tmp_path, title="t")
    entry = payload["comparisons"]["mi"]
    assert entry["model"] > entry["baseline"] and entry["beats_baseline"] is False
    # the fold std is 0 (the same windows twice), so the old rule called it positive transfer
    assert entry["transfer_noise"] == 0 and entry["negative_transfer"] is False
    assert entry["transfer_verdict"] == "no clear difference (interval holds 0)"
    assert entry["baseline_verdict"] == "shows no clear difference from"
    low, high = entry["baseline_interval"]
    assert low < 0 < high and entry["baseline_difference"] == pytest.approx(1 / 12)
    report = (tmp_path / "report.md").read_text()
    assert "shows no clear difference from the band-power baseline" in report
    assert "95% paired bootstrap interval" in report
    assert "| no clear difference (interval holds 0) |" in report


def test_predict_expert_load_weighs_batches_by_their_tokens():
    """Windows of a 6-electrode set give three times the tokens of a 2-electrode set's: the
    reported expert load is the share over all tokens, not an average of batch shares."""
    import torch
    from torch import nn

    from eegfast.nn import MoEFFN
    from eegfast.train.finetune import predict

    dim, A = 8, 2

    class TokensThroughMoE(nn.Module):
        """Each (electrode, patch) of x (B, C, A, dim) is a token of one MoE layer."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.moe = MoEFFN(dim=dim, hidden=16, num_experts=4, top_k=1)
            with torch.no_grad():
                self.moe.router.weight.normal_(0, 2.0)

        def forward(self, x, input_chans, *, task, channel_padding_mask):
            tokens = x.flatten(1, 2)  # (B, C·A, dim)
            padding = channel_padding_mask.repeat_interleave(A, dim=1)
            out = self.moe(tokens, padding_mask=padding)
            return out.mean(1)[:, :2]

    gen = torch.Generator().manual_seed(1)
    windows = []
    for n_chans, count in ((2, 5), (6, 3)):
        for _ in range(count):
            x = torch.randn(n_chans, A, dim, generator=gen)
            windows.append({"x": x, "input_chans": list(range(n_chans + 1)), "label": 0})
    items = [
        ItemInfo(0, "t", "s", f"r{i}", 0, tuple(range(len(w["input_chans"]) - 1)), 4)
        for i, w in enumerate(windows)
    ]
    data = TrainData(dataset=windows, items=items, label_names={"t": ["a", "b"]}, roots=[])
    model = TokensThroughMoE()
    _, load = predict(model, data, range(len(windows)), "t", torch.device("cpu"), task_id=None)

    every_token = torch.cat([w["x"].reshape(-1, dim) for w in windows])  # (2·2·5 + 6·2·3, dim)
    chosen = model.moe.router_logits(every_token, None).argmax(-1)
    expected = torch.bincount(chosen, minlength=4).double() / len(every_token)
    np.testing.assert_allclose(load, expected.numpy(), rtol=1e-6)
