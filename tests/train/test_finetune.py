"""Fold planning, metrics, the band-power baseline and the report writer (no model training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def stub_training(monkeypatch) -> list[Path]:
    """cross_validate's training and prediction replaced by stand-ins (a Linear; probabilities
    0.5): returns the list of the run folders it trains in, filled as it runs."""
    from torch import nn

    from eegfast.train import finetune

    trained: list[Path] = []

    def train_classifier(backbone, tasks, data, train_idx, config, run_dir, runtime, *, resume):
        trained.append(run_dir)
        return nn.Linear(4, 2), {}

    def predict(model, data, indices, task, device, *, task_id):
        return np.full((len(indices), 2), 0.5), None

    monkeypatch.setattr(finetune, "train_classifier", train_classifier)
    monkeypatch.setattr(finetune, "predict", predict)
    return trained


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
    # one recording per window: the bootstrap resamples recordings, and needs 2 per class
    data = make_data([("mi", "only", f"r{i}", i % 2) for i in range(8)])
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


def test_no_roc_curve_for_a_task_tested_on_one_class(tmp_path, recwarn):
    """A fixed model on a folder with one of its two classes (eegfast evaluate): no empty ROC
    panel (nor matplotlib's warning about it); the confusion matrix keeps both classes."""
    data = make_data([("mi", "s", f"r{i}", 1) for i in range(4)])
    result = CVResult(grouping={"mi": "none"})
    _record(result, 0, "single", "mi", data, np.arange(4), np.full((4, 2), 0.5))
    payload = write_outputs(result, data, tmp_path, title="t", fixed_model=True)
    assert "ROC curves" not in payload["figures"] and not (tmp_path / "roc_curves.png").exists()
    # AUROC is undefined there: null in summary.json, which strict JSON readers take (NaN is no
    # JSON: jq and JavaScript refused the file)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    (auroc,) = [row for row in summary["summary"] if row["metric"] == "auroc"]
    assert auroc["mean"] is None
    assert (tmp_path / "confusion_matrices.png").is_file()
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_a_plot_of_an_earlier_report_is_not_left_beside_a_report_without_it(tmp_path):
    """Re-evaluating into a folder whose earlier report drew ROC curves, now on one class: the
    old roc_curves.png went on sitting beside a report that does not show it."""
    for name in ("roc_curves.png", "expert_load.png"):
        (tmp_path / name).write_bytes(b"an earlier report's plot")
    data = make_data([("mi", "s", f"r{i}", 1) for i in range(4)])
    result = CVResult(grouping={"mi": "none"})
    _record(result, 0, "single", "mi", data, np.arange(4), np.full((4, 2), 0.5))
    write_outputs(result, data, tmp_path, title="t", fixed_model=True)
    assert not (tmp_path / "roc_curves.png").exists()
    assert not (tmp_path / "expert_load.png").exists()
    assert (tmp_path / "confusion_matrices.png").is_file()


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
    # one recording per window: the bootstrap resamples recordings, and needs 2 per class
    data = make_data([("mi", "only", f"r{i}", i % 2) for i in range(12)])
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


def test_tasks_sharing_subjects_are_split_together():
    """Two tasks of the same subjects (e.g. motor execution and imagery runs of eegmmidb): the
    multi-task model trains on both tasks' training parts, so a subject tested in a fold must
    be out of every task's training part, not only its own task's."""
    rng = np.random.default_rng(0)
    spec = []
    for task in ("execution", "imagery"):
        for s in range(6):
            for run in range(2):
                for label in (0, 1):
                    count = int(rng.integers(2, 6))  # the tasks differ in their window counts
                    spec += [(task, f"S{s}", f"S{s}{task}R{run}", label)] * count
    spec += [("other", f"P{s}", f"P{s}", s % 2) for s in range(8)]  # shares no subject
    data = make_data(spec)
    tasks = ["execution", "imagery", "other"]
    plans, grouping = plan_folds(data, tasks, k=3, group_by="subject", seed=0)
    assert len(plans) == 3
    for plan in plans:
        tested = {data.items[i].subject for t in tasks for i in plan.test[t]}
        trained = {data.items[i].subject for t in tasks for i in plan.train[t]}
        assert not tested & trained
        assert all(len(plan.test[t]) and len(plan.train[t]) for t in tasks)
    assert "split together with imagery" in grouping["execution"]
    assert "split together" not in grouping["other"]
    for task in tasks:  # every window is still tested exactly once
        tested = sorted(int(i) for plan in plans for i in plan.test[task])
        assert tested == sorted(data.labelled(task).tolist())


def test_a_fold_that_trains_on_one_class_is_flagged_and_the_baseline_runs():
    """One subject whose two recordings are the two classes (eegmat Subject00: _1 rest, _2
    arithmetic): grouped by recording, each fold trains on one class only. The grouping note
    (printed in report.md) says that these numbers mean nothing, and the band-power baseline
    predicts the one class it saw instead of raising sklearn's error after the folds trained."""
    spec = [("arith", "Subject00", "Subject00_1.edf", 0)] * 5
    spec += [("arith", "Subject00", "Subject00_2.edf", 1)] * 3
    data = make_data(spec)
    plans, grouping = plan_folds(data, ["arith"], k=2, group_by="subject", seed=0)
    assert "WARNING: fold 1 trains on" in grouping["arith"]
    assert "fold 2 trains on" in grouping["arith"] and "numbers mean nothing" in grouping["arith"]
    rng = np.random.default_rng(0)
    probs = fit_predict_band_power(
        rng.normal(size=(5, 4)), np.ones(5, int), rng.normal(size=(3, 4)), 2
    )
    np.testing.assert_array_equal(probs, [[0.0, 1.0]] * 3)


def test_band_power_baseline_weights_its_classes():
    """Scored by balanced accuracy against class-weighted models, the baseline must weigh its
    classes too; unweighted, a 9:1 training set makes it predict the majority class."""
    rng = np.random.default_rng(0)

    def windows(n0, n1):
        x = np.concatenate([rng.normal(0.0, 1.0, (n0, 5)), rng.normal(0.6, 1.0, (n1, 5))])
        return x, np.array([0] * n0 + [1] * n1)

    train_x, train_y = windows(180, 20)
    test_x, test_y = windows(200, 200)
    probs = fit_predict_band_power(train_x, train_y, test_x, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    recall = [(probs.argmax(1)[test_y == c] == c).mean() for c in (0, 1)]
    assert min(recall) > 0.4 and np.mean(recall) > 0.65


def test_paired_interval_resamples_recordings_not_windows(tmp_path):
    """Six recordings of 40 windows: model A is right where B is wrong on every window of four
    recordings, and the reverse on two. Resampling windows calls that a clear win; the
    recordings are the independent units, and with 4 against 2 the interval holds 0."""
    recordings = [f"S001R{r:02d}" for r in range(6)]
    spec = [("mi", "S001", rec, i % 2) for rec in recordings for i in range(40)]
    data = make_data(spec)
    y = np.array([lab for *_, lab in spec])
    groups = np.array([rec for _, _, rec, _ in spec])
    a_right = np.isin(groups, recordings[:4])
    pred_a = np.where(a_right, y, 1 - y)
    pred_b = np.where(a_right, 1 - y, y)

    diff, low, high = paired_bacc_difference(y, pred_a, pred_b)  # windows: too narrow
    assert diff == pytest.approx(1 / 3) and low > 0
    diff, low, high = paired_bacc_difference(y, pred_a, pred_b, groups=groups)
    assert diff == pytest.approx(1 / 3)
    assert low <= 0 < high
    # a class tested on one recording only: no interval at all
    one = np.where(y == 1, "single", groups)
    assert all(math.isnan(v) for v in paired_bacc_difference(y, pred_a, pred_b, groups=one)[1:])

    result = CVResult(grouping={"mi": "by recording (6 recordings)"}, units={"mi": "recording"})
    test = np.arange(len(spec))
    for fold, part in enumerate((test[:120], test[120:])):
        _record(result, fold, "single", "mi", data, part, np.eye(2)[pred_a[part]])
        _record(result, fold, "band_power", "mi", data, part, np.eye(2)[pred_b[part]])
    payload = write_outputs(result, data, tmp_path, title="t")
    entry = payload["comparisons"]["mi"]
    assert entry["baseline_verdict"] == "shows no clear difference from"
    assert entry["baseline_interval"][0] <= 0 < entry["baseline_interval"][1]
    report = (tmp_path / "report.md").read_text()
    assert "resamples whole recordings" in report


def test_a_task_without_a_full_batch_is_refused_not_left_untrained(tmp_path):
    """Only full batches of one task train: a multi-task model whose small task has fewer
    windows than a batch would train that task's head on nothing and report it as measured."""
    from eegfast.train.config import RunConfig
    from eegfast.train.finetune import Backbone, train_classifier

    spec = [("big", f"s{i % 4}", f"r{i % 4}", i % 2) for i in range(40)]
    spec += [("small", f"t{i % 2}", f"q{i % 2}", i % 2) for i in range(6)]
    data = make_data(spec)
    config = RunConfig().with_overrides({"train.batch_size": 8})
    backbone = Backbone({"kind": "classifier", "name": "labram_tiny"}, None, [])
    with pytest.raises(
        ValueError, match=r"task 'small': its 6 training windows .*train\.batch_size=8"
    ):
        train_classifier(
            backbone,
            ["big", "small"],
            data,
            np.arange(len(spec)),
            config,
            tmp_path,
            None,
            resume=None,
        )


def test_two_recordings_are_too_few_for_a_verdict(tmp_path):
    """Two recordings (the quickstart's motor imagery) where the model wins on both: the
    cluster bootstrap's interval then spans the two recordings' differences and excludes 0, but
    two of two agreeing is no evidence (sign test p = 0.5), so no win or transfer is claimed."""
    spec = [("mi", "S001", rec, i % 2) for rec in ("S001R04", "S001R08") for i in range(30)]
    data = make_data(spec)
    y = np.array([lab for *_, lab in spec])
    wrong_a = np.arange(len(y)) % 10 == 0  # model: 3 of 30 wrong per recording
    wrong_b = np.arange(len(y)) % 3 == 0  # baseline: 10 of 30
    result = CVResult(grouping={"mi": "by recording (2 recordings)"}, units={"mi": "recording"})
    for fold, part in enumerate((np.arange(30), np.arange(30, 60))):
        probs_a = np.eye(2)[np.where(wrong_a, 1 - y, y)[part]]
        probs_b = np.eye(2)[np.where(wrong_b, 1 - y, y)[part]]
        _record(result, fold, "multitask", "mi", data, part, probs_a)
        _record(result, fold, "single", "mi", data, part, probs_b)
        _record(result, fold, "band_power", "mi", data, part, probs_b)
    payload = write_outputs(result, data, tmp_path, title="t")
    entry = payload["comparisons"]["mi"]
    assert entry["baseline_interval"][0] > 0 and entry["units"] == 2  # both recordings agree
    assert entry["baseline_verdict"] == "shows no clear difference from"
    assert entry["beats_baseline"] is False
    assert entry["transfer_verdict"] == "no clear difference (only 2 subjects/recordings)"
    report = (tmp_path / "report.md").read_text()
    assert "over only 2 recordings: too few for a verdict (it needs 6)" in report


def test_backbone_weights_that_do_not_fit_are_refused():
    """The linear probe loaded its backbone with strict=False and no check: weights of another
    model left random layers and gave random features silently."""
    import torch

    from eegfast.models import create_model
    from eegfast.train.finetune import load_backbone_weights

    model = create_model("labram_tiny", num_classes=2)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    load_backbone_weights(model, weights)  # only the classifier's own head missing: fine
    partial = {k: v for k, v in weights.items() if not k.startswith("blocks.0.")}
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\."):
        load_backbone_weights(model, partial)
    with pytest.raises(ValueError, match=r"unexpected \['student\.x'\]"):
        load_backbone_weights(model, {**weights, "student.x": torch.zeros(1)})


def test_tasks_without_a_router_id_are_refused_only_when_routing_by_task(tmp_path):
    """A backbone upcycled for other tasks: with task routing (the default) cross_validate
    refuses before any fold trains, in full and linear mode alike; with
    upcycle.task_routing=false the tasks have no router ids to need."""
    from eegfast.train.config import RunConfig
    from eegfast.train.finetune import Backbone, cross_validate

    arch = {"kind": "classifier", "name": "labram_tiny"}
    routed = Backbone(
        {**arch, "upcycle": {"num_experts": 2, "top_k": 1, "num_tasks": 1}}, None, ["other"]
    )
    assert routed.router_ids(["other"], True) == {"other": 0}
    assert routed.router_ids(["big"], False) is None
    assert Backbone(arch, None, []).router_ids(["big"], True) is None  # not upcycled
    spec = [("big", f"s{i % 4}", f"r{i % 4}", i % 2) for i in range(16)]
    for mode in ("full", "linear"):
        config = RunConfig().with_overrides({"finetune.mode": mode, "finetune.folds": 2})
        with pytest.raises(ValueError, match=r"tasks \['big'\] have no router id.*\['other'\]"):
            cross_validate(make_data(spec), config, tmp_path, None, routed)


def test_resuming_a_fold_trained_on_other_recordings_is_refused(tmp_path):
    """--resume auto after a change of train.seed (or folds, or data) re-plans the folds: the
    checkpoint in fold0/<variant> was trained on recordings fold 0 now tests, and was scored
    on them as if held out (only a warning about the changed seed)."""
    import json

    from eegfast.train import checkpoint as ckpt
    from eegfast.train.config import RunConfig
    from eegfast.train.finetune import Backbone, check_resumed_fold, train_classifier

    spec = [("big", f"s{i % 4}", f"r{i % 4}", i % 2) for i in range(32)]
    data = make_data(spec)
    config = RunConfig().with_overrides({"train.batch_size": 4})
    backbone = Backbone({"kind": "classifier", "name": "labram_tiny"}, None, [])
    saved = tmp_path / "checkpoints" / "step-00000002"
    saved.mkdir(parents=True)
    (saved / ckpt.WEIGHTS).write_bytes(b"")
    (saved / ckpt.META).write_text(json.dumps({"step": 2, "train_recordings": ["r0", "r1"]}))
    train_now = np.flatnonzero([rec in ("r2", "r3") for _, _, rec, _ in spec])
    with pytest.raises(ValueError, match=r"no longer in its training part: r0, r1; new in it"):
        train_classifier(backbone, ["big"], data, train_now, config, tmp_path, None, resume="auto")
    check_resumed_fold(tmp_path, "auto", ["r1", "r0"])  # the same fold resumes
    check_resumed_fold(tmp_path / "fresh", "auto", ["r2"])  # nothing to resume
    with pytest.raises(ValueError, match="was trained on other recordings"):
        check_resumed_fold(tmp_path, str(saved), ["r0"])


def test_a_subject_tested_for_one_task_and_trained_on_for_another_is_flagged(tmp_path):
    """Task B has one subject (s1), so it is split by recording, and task A by subject: the
    two are not split together, and in the fold that tests s1 for A the multi-task model
    trains on B's windows of s1, which the report did not say."""
    from eegfast.train.config import RunConfig
    from eegfast.train.finetune import Backbone, cross_validate, seen_by_other_tasks

    spec = []
    for subject in ("s1", "s2", "s3", "s4"):
        spec += [("A", subject, f"{subject}rA", lab) for lab in (0, 1, 0, 1)]
    spec += [("B", "s1", rec, lab) for rec in ("s1r1", "s1r2") for lab in (0, 1, 0, 1)]
    data = make_data(spec)
    plans, _ = plan_folds(data, ["A", "B"], k=2, group_by="subject", seed=0)
    notes = seen_by_other_tasks(data, ["A", "B"], plans)
    fold = next(p.fold for p in plans if "s1" in {data.items[i].subject for i in p.test["A"]})
    assert set(notes) == {"A"}  # B's recordings are in no other task
    assert f"fold {fold + 1} tests s1, which other tasks train on" in notes["A"]
    assert "not subject-independent" in notes["A"]
    # tasks split together by subject never share one across a fold
    joint = make_data([(t, s, f"{t}{s}", lab) for t in "CD" for s in "wxyz" for lab in (0, 1)])
    joint_plans, _ = plan_folds(joint, ["C", "D"], k=2, group_by="subject", seed=0)
    assert seen_by_other_tasks(joint, ["C", "D"], joint_plans) == {}
    # cross_validate says it before training (which this batch size refuses) when a
    # multi-task model trains, and not for single-task runs
    backbone = Backbone({"kind": "classifier", "name": "labram_tiny"}, None, ["A", "B"])
    for multitask, expected in ((True, 1), (False, 0)):
        logged: list[str] = []
        config = RunConfig().with_overrides(
            {
                "finetune.folds": 2,
                "train.batch_size": 64,
                "finetune.multitask": multitask,
                "finetune.band_power_baseline": False,
            }
        )
        with pytest.raises(ValueError, match="form no full batch"):
            cross_validate(data, config, tmp_path, None, backbone, log=logged.append)
        warned = [line for line in logged if "not subject-independent" in line]
        assert len(warned) == expected


def test_the_report_says_when_the_backbone_was_pretrained_on_the_tested_subjects():
    """`eegfast pretrain` records which subjects and recordings it saw; finetune notes, per
    task, how many tested subjects (recordings, for a task split by recording) that includes:
    transductive pretraining was only said by the quickstart, for its own run."""
    from eegfast.train.finetune import Backbone, pretraining_overlap

    spec = []
    for subject in ("s1", "s2", "s3", "s4"):
        spec += [("A", subject, f"/data/{subject}rA.edf", lab) for lab in (0, 1, 0, 1)]
    spec += [("B", "s9", f"/data/s9r{i}.edf", lab) for i in (1, 2) for lab in (0, 1, 0, 1)]
    data = make_data(spec)
    plans, _ = plan_folds(data, ["A", "B"], k=2, group_by="subject", seed=0)
    arch = {"kind": "classifier", "name": "labram_tiny"}
    seen = {"subjects": ["s1", "s2", "x"], "recordings": ["/elsewhere/s9r2.edf"]}
    notes = pretraining_overlap(data, ["A", "B"], plans, Backbone(arch, None, [], seen))
    assert (
        "pretrained (self-supervised, without labels) on 2 of the 4 tested subjects" in (notes["A"])
    )
    assert "on 1 of the 2 tested recordings" in notes["B"]  # matched by file name
    unseen = {"subjects": ["x"], "recordings": []}
    assert pretraining_overlap(data, ["A", "B"], plans, Backbone(arch, None, [], unseen)) == {}
    assert pretraining_overlap(data, ["A", "B"], plans, Backbone(arch, None, [])) == {}
    assert pretraining_overlap(data, ["A", "B"], plans, None) == {}


def test_evaluate_knows_training_windows_of_a_recording_prepared_from_another_path():
    """A recording's id is the path prepare was given: the same file prepared again from
    another working directory (``Subject00_1.edf`` against ``/data/Subject00_1.edf``) was not
    recognised as one the fold model was fine-tuned on, and its training windows were scored
    as held-out ones without a note."""
    from eegfast.train.commands.evaluate import training_windows

    spec = [
        ("arith", "Subject00", "Subject00_1.edf", 0),
        ("arith", "Subject01", "Subject01_1.edf", 0),
    ]
    spec += [("arith", "Subject09", "other/Subject00_1.edf", 0)]  # another subject's file
    data = make_data(spec)
    indices = np.arange(len(spec))
    meta = {"train_recordings": ["/data/Subject00_1.edf"], "train_subjects": ["Subject00"]}
    assert training_windows(meta, data, indices).tolist() == [0]
    # checkpoints without train_subjects: the file name alone (conservative)
    old = {"train_recordings": ["/data/Subject00_1.edf"]}
    assert training_windows(old, data, indices).tolist() == [0, 2]
    assert training_windows({}, data, indices).tolist() == []


def test_metrics_of_a_fold_testing_some_classes_only_raise_no_warning():
    """A fold that tests one class (or predicts classes it does not test) is common in
    subject-wise folds; the reports say what that means, and scikit-learn's warnings at every
    such fold were noise in the command's output."""
    import warnings

    cases = [
        ([0, 0, 0], [[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1]], 3),
        ([0, 0, 0], [[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]], 2),
        ([0, 0, 1], [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]], 3),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [classification_metrics(y, np.array(p), k) for y, p, k in cases]
    assert got[0]["balanced_accuracy"] == 1.0 and math.isnan(got[0]["cohen_kappa"])
    assert got[1]["balanced_accuracy"] == pytest.approx(2 / 3) and math.isnan(got[1]["auroc"])
    assert got[2]["balanced_accuracy"] == pytest.approx(0.25)
