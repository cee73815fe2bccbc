"""Gaps a mutation audit of the command layer (cross-validation, its report, evaluate,
predict, generate) found in the tests: each test here fails on a one-line slip that the other
tests let through (a fold's test part trained on, a std printed as the mean, a file written in
place). No model training: the cross-validation's training and prediction are stand-ins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eegfast.train import finetune
from eegfast.train.config import RunConfig
from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.finetune import (
    BEATS,
    DOES_NOT_BEAT,
    NO_CLEAR_DIFFERENCE,
    Backbone,
    CVResult,
    _record,
    comparisons,
    cross_validate,
    plan_folds,
    write_outputs,
)

TINY = {"kind": "classifier", "name": "labram_tiny"}


def _two_tasks() -> TrainData:
    """Tasks A and B of 4 subjects each (other subjects: split apart), 4 windows per
    subject, classes alternating; no signals (training and prediction are stand-ins)."""
    items = [
        ItemInfo(0, task, f"{task}{s}", f"{task}{s}.edf", w % 2, (0, 1, 2), 4)
        for task in "AB"
        for s in range(4)
        for w in range(4)
    ]
    return TrainData(None, items, {"A": ["a0", "a1"], "B": ["b0", "b1"]}, [])


class _Stand:
    """A stand-in for a trained model: the tasks it was trained for."""

    def __init__(self, tasks):
        self.tasks = list(tasks)


def test_cross_validate_trains_on_each_folds_training_part_and_routes_the_test(
    tmp_path, monkeypatch
):
    """Each variant trains on its tasks' training part of the fold (never the test part), is
    tested with the router ids its training returned, the multi-task model beside one model
    per task (finetune.single_task_baseline), and only the multi-task model's expert load is
    kept for the report."""
    data = _two_tasks()
    trained: list[tuple[list[str], set[int]]] = []
    tested: list[tuple[list[str], str, set[int], int | None]] = []

    def train_classifier(backbone, tasks, data, train_idx, config, run_dir, runtime, *, resume):
        trained.append((list(tasks), {int(i) for i in train_idx}))
        return _Stand(tasks), {t: 7 for t in tasks}

    def predict(model, data, indices, task, device, *, task_id):
        tested.append((model.tasks, task, {int(i) for i in indices}, task_id))
        return np.full((len(indices), 2), 0.5), np.array([len(model.tasks), 0.0])

    monkeypatch.setattr(finetune, "train_classifier", train_classifier)
    monkeypatch.setattr(finetune, "predict", predict)
    config = RunConfig().with_overrides(
        {"finetune.folds": 2, "finetune.band_power_baseline": False}
    )
    runtime = type("Runtime", (), {"device": torch.device("cpu")})()
    result = cross_validate(data, config, tmp_path, runtime, Backbone(TINY, None, ["A", "B"]))
    plans, _ = plan_folds(data, ["A", "B"], 2, "subject", config.train.seed)
    expected = []
    for plan in plans:
        for tasks in (["A", "B"], ["A"], ["B"]):
            expected.append((tasks, {int(i) for t in tasks for i in plan.train[t]}))
    assert trained == expected
    assert len(tested) == 2 * 4  # per fold: the multi-task model on A and B, each single one
    for _tasks, task, indices, task_id in tested:
        fold = next(p for p in plans if indices == {int(i) for i in p.test[task]})
        assert not indices & {int(i) for i in fold.train[task]}
        assert task_id == 7
    assert {(r["variant"], r["task"]) for r in result.rows} == {
        ("multitask", "A"),
        ("multitask", "B"),
        ("single", "A"),
        ("single", "B"),
    }
    for task in "AB":  # two folds of the two-task model's load, none of a single-task one
        assert [load[0] for load in result.expert_load[task]] == [2.0, 2.0]


def test_linear_probe_fits_on_the_training_windows_and_scores_the_test_windows_in_order(
    tmp_path, monkeypatch
):
    """finetune.mode=linear: logistic regression on each window's own frozen features, the
    training part's with their labels, the test part's in the order their labels are scored."""
    data = _two_tasks()
    fits: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    class Frozen(nn.Module):
        pass

    def predict(model, data, indices, task, device, *, features, task_id):
        assert features
        # a window's feature is its own index (and its label): the fit must see the right rows
        return np.array([[float(i), data.items[int(i)].label] for i in indices]), None

    def fit_predict_logistic(x_train, y_train, x_test, n_classes, *, seed):
        task = data.items[int(x_train[0, 0])].task
        fits.append((task, x_train, y_train, x_test))
        return np.eye(n_classes)[x_test[:, 1].astype(int)]  # right wherever the row is right

    monkeypatch.setattr(finetune, "build_model", lambda arch: Frozen())
    monkeypatch.setattr(finetune, "predict", predict)
    monkeypatch.setattr(finetune, "fit_predict_logistic", fit_predict_logistic)
    config = RunConfig().with_overrides(
        {"finetune.mode": "linear", "finetune.folds": 2, "finetune.band_power_baseline": False}
    )
    runtime = type("Runtime", (), {"device": torch.device("cpu")})()
    result = cross_validate(data, config, tmp_path, runtime, Backbone(TINY, None, []))
    plans, _ = plan_folds(data, ["A", "B"], 2, "subject", config.train.seed)
    assert len(fits) == 4
    for (task, x_train, y_train, x_test), (plan, task_) in zip(
        fits, [(p, t) for p in plans for t in "AB"], strict=True
    ):
        assert task == task_
        np.testing.assert_array_equal(x_train[:, 0], plan.train[task])
        np.testing.assert_array_equal(y_train, [data.items[int(i)].label for i in plan.train[task]])
        np.testing.assert_array_equal(x_test[:, 0], plan.test[task])
    bacc = [r["value"] for r in result.rows if r["metric"] == "balanced_accuracy"]
    assert bacc == [1.0] * 4


def test_joint_folds_try_another_shuffle_until_every_task_is_tested_in_every_fold(monkeypatch):
    """Tasks sharing subjects are split by one StratifiedGroupKFold over both; a shuffle that
    leaves a task out of some fold's test part is drawn again (it was taken when any fold
    tested every task, and that fold's scores for the task were of no window)."""
    import sklearn.model_selection

    items = [
        ItemInfo(0, task, f"s{s}", f"{task}{s}.edf", w % 2, (0, 1), 4)
        for task in "AB"
        for s in range(4)
        for w in range(2)
    ]
    data = TrainData(None, items, {"A": ["x", "y"], "B": ["x", "y"]}, [])
    seen_seeds: list[int] = []

    class Splitter:
        def __init__(self, n_splits, shuffle, random_state):
            self.seed = random_state
            seen_seeds.append(random_state)

        def split(self, labels, strata, groups):
            n = len(labels)
            everything = np.arange(n)
            if self.seed == 0:  # fold 0 tests A's windows only, fold 1 the rest
                parts = [everything[: n // 4], everything[n // 4 :]]
            else:  # subjects s0, s1 in fold 0; s2, s3 in fold 1 (both tasks)
                parts = [
                    everything[np.isin(groups, [f"subject:s{s}" for s in f])]
                    for f in ((0, 1), (2, 3))
                ]
            for test in parts:
                yield np.setdiff1d(everything, test), test

    monkeypatch.setattr(sklearn.model_selection, "StratifiedGroupKFold", Splitter)
    plans, _ = plan_folds(data, ["A", "B"], 2, "subject", 0)
    assert seen_seeds == [0, 1]
    for plan in plans:
        for task in "AB":
            assert len(plan.test[task]) and len(plan.train[task])


def test_class_weights_are_inverse_frequencies_of_mean_one():
    """Balanced cross-entropy: weight n / (classes * count) per class, so that the loss keeps
    its scale (1 / count made the loss, and the learning rate's effect, shrink with the data)."""
    weights = finetune.class_weights(np.array([0, 0, 0, 1]), 2)
    np.testing.assert_allclose(weights.numpy(), [4 / 6, 4 / 2], rtol=1e-6)
    np.testing.assert_allclose(finetune.class_weights(np.array([0, 1, 2]), 3).numpy(), 1.0)


def test_train_classifier_weighs_each_task_by_its_own_labels_and_records_its_windows(
    tmp_path, monkeypatch
):
    """A multi-task model's class weights are per task, of that task's training labels (not
    of every task's labels pooled); its checkpoint records the window lengths of its training
    part (what predict checks new data against), not of every window."""
    items = [ItemInfo(0, "A", f"s{i}", f"a{i}", int(i == 0), (0, 1, 2), 4) for i in range(4)]
    items += [ItemInfo(0, "B", f"s{i}", f"b{i}", int(i > 0), (0, 1, 2), 4) for i in range(4)]
    items += [ItemInfo(0, "A", "s9", "long", 1, (0, 1, 2), 8)]  # a test window, 8 s
    data = TrainData([None] * len(items), items, {"A": ["n", "y"], "B": ["n", "y"]}, [])
    captured = {}

    def fit(model, step, dataset, config, run_dir, *, ctx, meta, **kwargs):
        captured.update(ctx=ctx, meta=meta)

    monkeypatch.setattr(finetune, "fit", fit)
    config = RunConfig().with_overrides({"train.batch_size": 2})
    runtime = type("Runtime", (), {"device": torch.device("cpu"), "dist": None})()
    backbone = Backbone(TINY, None, ["A", "B"])
    finetune.train_classifier(
        backbone, ["A", "B"], data, np.arange(8), config, tmp_path, runtime, resume=None
    )
    weights = captured["ctx"].class_weights
    np.testing.assert_allclose(weights["A"].numpy(), [4 / 6, 2.0], rtol=1e-6)  # 3 n, 1 y
    np.testing.assert_allclose(weights["B"].numpy(), [2.0, 4 / 6], rtol=1e-6)  # 1 n, 3 y
    assert captured["meta"]["window_seconds"] == [4]


def test_resuming_a_fold_from_a_checkpoint_of_fewer_recordings_is_refused(tmp_path):
    """Any change of a fold's training recordings is refused, also a checkpoint trained on a
    part of them (the folds were planned again: the data or train.seed changed)."""
    from eegfast.train import checkpoint as ckpt
    from eegfast.train.finetune import check_resumed_fold

    saved = tmp_path / "checkpoints" / "step-00000002"
    saved.mkdir(parents=True)
    (saved / ckpt.WEIGHTS).write_bytes(b"")
    (saved / ckpt.META).write_text(json.dumps({"step": 2, "train_recordings": ["r0"]}))
    with pytest.raises(ValueError, match="no longer in its training part: none; new in it: r1"):
        check_resumed_fold(tmp_path, "auto", ["r0", "r1"])


def test_the_bootstrap_resamples_the_unit_the_task_is_split_by():
    """_record keeps each test window's resampling unit: its subject for a task split by
    subject, its recording otherwise (windows of one subject are correlated too)."""
    items = [
        ItemInfo(0, "t", f"S{i // 2}", f"S{i // 2}_{i}.edf", i % 2, (0, 1), 4) for i in range(4)
    ]
    data = TrainData(None, items, {"t": ["a", "b"]}, [])
    probs = np.full((4, 2), 0.5)
    by_subject = CVResult(units={"t": "subject"})
    _record(by_subject, 0, "single", "t", data, np.arange(4), probs)
    assert by_subject.predictions[0]["clusters"] == ["S0", "S0", "S1", "S1"]
    by_recording = CVResult()
    _record(by_recording, 0, "single", "t", data, np.arange(4), probs)
    assert by_recording.predictions[0]["clusters"] == [it.recording for it in items]


def _summary(model: tuple, other: tuple, other_variant: str = "band_power") -> dict:
    return {
        ("single", "t", "balanced_accuracy"): model,
        (other_variant, "t", "balanced_accuracy"): other,
    }


def test_without_test_predictions_the_means_decide_against_the_baseline():
    better = comparisons(_summary((0.8, 0.05, 5), (0.6, 0.05, 5)), ["t"])["t"]
    assert better["baseline_verdict"] == BEATS and better["beats_baseline"] is True
    worse = comparisons(_summary((0.6, 0.05, 5), (0.8, 0.05, 5)), ["t"])["t"]
    assert worse["baseline_verdict"] == DOES_NOT_BEAT and worse["beats_baseline"] is False


def test_without_test_predictions_a_transfer_within_the_larger_fold_std_is_none():
    summary = {
        ("multitask", "t", "balanced_accuracy"): (0.70, 0.05, 5),
        ("single", "t", "balanced_accuracy"): (0.60, 0.20, 5),
    }
    entry = comparisons(summary, ["t"])["t"]
    assert entry["transfer_noise"] == pytest.approx(0.20)
    assert entry["transfer_verdict"] == "no clear difference (within fold std)"


def _pooled_predictions(recordings: int, baseline_windows: slice = slice(None)) -> tuple:
    """A model right on every window of ``recordings`` recordings (2 windows each, one per
    class), the band-power baseline wrong on every one (on the windows ``baseline_windows``)."""
    items = [
        ItemInfo(0, "t", f"S{r}", f"r{r}", c, (0, 1), 4) for r in range(recordings) for c in (0, 1)
    ]
    data = TrainData(None, items, {"t": ["a", "b"]}, [])
    result = CVResult()
    test = np.arange(len(items))
    labels = np.array([it.label for it in items])
    _record(result, 0, "single", "t", data, test, np.eye(2)[labels])
    wrong = test[baseline_windows]
    _record(result, 0, "band_power", "t", data, wrong, np.eye(2)[1 - labels[wrong]])
    return finetune.summarise(result.rows), result.predictions


def test_a_verdict_needs_six_units_and_the_same_test_windows():
    summary, predictions = _pooled_predictions(5)
    entry = comparisons(summary, ["t"], predictions)["t"]
    assert entry["units"] == 5 and entry["baseline_interval"] == [1.0, 1.0]
    assert entry["baseline_verdict"] == NO_CLEAR_DIFFERENCE  # too few recordings
    summary, predictions = _pooled_predictions(6)
    assert comparisons(summary, ["t"], predictions)["t"]["baseline_verdict"] == BEATS
    # the baseline tested on other windows: no paired interval, the means decide
    summary, predictions = _pooled_predictions(6, slice(0, 8))
    entry = comparisons(summary, ["t"], predictions)["t"]
    assert "baseline_interval" not in entry and entry["baseline_verdict"] == BEATS


def _two_fold_result() -> tuple[TrainData, CVResult]:
    """Folds 0 and 1 of 4 windows each (classes 0, 1, 0, 1), a balanced accuracy of 0.5 in
    fold 0 and 1.0 in fold 1 (mean 0.75, std 0.25), an expert load per fold."""
    items = [ItemInfo(0, "t", f"S{i // 2}", f"r{i // 2}", i % 2, (0, 1), 4) for i in range(8)]
    data = TrainData(None, items, {"t": ["rest", "task"]}, [])
    result = CVResult(grouping={"t": "by subject (4 subjects)"}, units={"t": "subject"})
    fold0 = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])  # all say rest
    fold1 = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])  # all right
    _record(result, 0, "single", "t", data, np.arange(4), fold0)
    _record(result, 1, "single", "t", data, np.arange(4, 8), fold1)
    result.expert_load["t"] = [np.array([0.2, 0.8]), np.array([0.6, 0.4])]
    return data, result


def test_report_and_summary_give_mean_and_std_over_folds(tmp_path):
    data, result = _two_fold_result()
    payload = write_outputs(result, data, tmp_path, title="t")
    report = (tmp_path / "report.md").read_text()
    assert "| t | single-task fine-tune | 2 | 0.750 ± 0.250 |" in report
    saved = json.loads((tmp_path / "summary.json").read_text())
    (row,) = [r for r in saved["summary"] if r["metric"] == "balanced_accuracy"]
    assert (row["mean"], row["std"], row["folds"]) == (0.75, 0.25, 2)
    assert payload["summary"] == saved["summary"]


def test_report_plots_pool_every_fold_and_score_the_positive_class(tmp_path, monkeypatch):
    """The confusion matrix counts every fold's test windows, the ROC curve scores class 1
    (the report names it the positive class), the expert load is the mean over folds."""
    from eegfast.train import plots

    drawn = {}

    def spy(name):
        def draw(*args, **kwargs):
            drawn[name] = (args, kwargs)
            path = next(a for a in args if isinstance(a, Path))
            path.write_bytes(b"png")
            return path

        return draw

    for name in ("confusion_matrices", "roc_curves", "expert_load"):
        monkeypatch.setattr(plots, name, spy(name))
    data, result = _two_fold_result()
    write_outputs(result, data, tmp_path, title="t")
    matrices = drawn["confusion_matrices"][0][0]
    np.testing.assert_array_equal(matrices["t"], [[4, 0], [2, 2]])  # rows: truth
    roc, _, positive = drawn["roc_curves"][0]
    y, scores = roc["t"]["single"]
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(scores, [0.4, 0.3, 0.2, 0.1, 0.1, 0.7, 0.2, 0.9])
    assert positive == {"t": "task"}
    np.testing.assert_allclose(drawn["expert_load"][0][0]["t"], [0.4, 0.6])


def test_report_files_are_replaced_not_rewritten_in_place(tmp_path):
    """Every file write_outputs writes goes to a temporary and is renamed over the old one:
    a reader (or a kill) mid-write sees the whole old file or the whole new one. Written in
    place, a hard link to the old file shows the new content."""
    data, result = _two_fold_result()
    names = ("results.csv", "summary.json", "report.md", "predictions.npz")
    for name in names:
        (tmp_path / name).write_text("old")
        os.link(tmp_path / name, tmp_path / f"{name}.kept")
    write_outputs(result, data, tmp_path, title="t")
    for name in names:
        assert (tmp_path / f"{name}.kept").read_text() == "old", name
        assert (tmp_path / name).read_bytes() != b"old"


# --- eegfast generate: prompt window, continuation context, output files -----------------------


def _npy_prompt(tmp_path: Path, seconds: float) -> Path:
    """A .npy prompt of electrodes Cz and Pz at 200 Hz whose every sample is its time in
    seconds (µV), so that a window's first sample says where it starts."""
    t = np.arange(int(seconds * 200), dtype=np.float32) / 200
    path = tmp_path / "prompt.npy"
    np.save(path, np.stack([t, t]))
    return path


def test_a_prompt_window_from_start_holds_whole_patches_only(tmp_path):
    """--start 3.5 in a 5-s prompt leaves 1.5 s: the window is the one whole patch (1 s),
    not 1.5 s that the model cannot cut into patches; less than a patch left is refused."""
    from eegfast.train.commands.generate import GenerateError, load_prompt

    path = _npy_prompt(tmp_path, 5.0)
    prompt = load_prompt(path, channels=["Cz", "Pz"], start=3.5, prompt_seconds=4)
    assert prompt.x.shape == (2, 200) and prompt.start_s == 3.5
    np.testing.assert_allclose(prompt.x[0, [0, -1]] * 100, [3.5, 4.495], rtol=1e-6)
    for start in (4.5, 5.0, 9.0):
        with pytest.raises(GenerateError, match=f"--start {start:g}: less than one patch"):
            load_prompt(path, channels=["Cz", "Pz"], start=start, prompt_seconds=4)


def test_a_prompt_longer_than_the_context_is_continued_from_its_last_patches(monkeypatch):
    from eegfast.models import hybrid
    from eegfast.models.hybrid import create_hybrid_model
    from eegfast.train.commands.generate import Prompt, generate_signal

    seen = {}

    def generate(model, x, chans, num_patches, **kwargs):
        seen["x"] = x
        return torch.zeros(1, x.shape[1], num_patches, 200)

    monkeypatch.setattr(hybrid, "generate", generate)
    x = np.repeat(np.arange(6, dtype=np.float32), 200)[None]  # patch p holds p
    prompt = Prompt(x, ("CZ",), "prompt", 0.0)
    model = create_hybrid_model("labram_tiny_pretrain")
    out = generate_signal(model, prompt, 1.5, mode="regression", context=2)
    assert out.shape == (1, 300)
    assert seen["x"].shape == (1, 1, 2, 200)
    np.testing.assert_array_equal(seen["x"][0, 0, :, 0].numpy(), [4, 5])


def test_an_overwrite_stopped_before_the_npy_leaves_no_old_sidecar_beside_it(tmp_path, monkeypatch):
    """The .npy and its sidecar are replaced one after the other: the old sidecar goes first,
    so that a stopped run never leaves an old channel list naming another signal's rows."""
    import eegfast.fileio
    from eegfast.train.commands.generate import write_output

    out = tmp_path / "out.npy"
    write_output(out, np.ones((2, 200), np.float32), ("CZ", "PZ"))

    def stopped(path, write):
        raise KeyboardInterrupt

    monkeypatch.setattr(eegfast.fileio, "write_atomic", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_output(out, np.ones((1, 200), np.float32), ("O1",), overwrite=True)
    assert not out.with_suffix(".json").exists()
    assert np.load(out).shape == (2, 200)  # the old signal, whole


def test_edf_label_spans_the_generated_part_and_the_file_is_replaced_whole(tmp_path):
    """--label with --include-prompt: the annotation spans the generated part, from where it
    starts to the end of the file; --overwrite replaces the EDF by a rename (written in place,
    a reader could see it half written)."""
    import mne

    from eegfast.train.commands.generate import write_output

    out = tmp_path / "out.edf"
    out.write_text("old")
    os.link(out, tmp_path / "kept.edf")
    signal = np.random.default_rng(0).normal(size=(2, 1000)).astype(np.float32)
    write_output(out, signal, ("CZ", "PZ"), generated_from_s=2.0, label="gen", overwrite=True)
    assert (tmp_path / "kept.edf").read_text() == "old"
    raw = mne.io.read_raw_edf(out, verbose="error")
    assert [(a["onset"], a["duration"], a["description"]) for a in raw.annotations] == [
        (2.0, 3.0, "gen")
    ]


def test_empty_channels_are_refused_not_ignored():
    from eegfast.train.commands.generate import GenerateError, _split_channels

    for text in ("", " , "):
        with pytest.raises(GenerateError, match="--channels: no electrode names given"):
            _split_channels(text)


def test_tokens_mode_samples_at_temperature_one_by_default(tmp_path, monkeypatch):
    import argparse

    from eegfast.models.hybrid import create_hybrid_model
    from eegfast.train.commands import generate as gen

    seen = {}

    def generate_signal(model, prompt, seconds, **kwargs):
        seen.update(kwargs)
        return np.zeros((1, int(seconds * 200)), np.float32)

    prompt = gen.Prompt(np.zeros((1, 200), np.float32), ("CZ",), "p.npy", 0.0)
    monkeypatch.setattr(
        gen, "load_model", lambda path, device: create_hybrid_model("labram_tiny_pretrain")
    )
    monkeypatch.setattr(gen, "trained_window", lambda path: None)
    monkeypatch.setattr(gen, "load_prompt", lambda *args, **kwargs: prompt)
    monkeypatch.setattr(gen, "generate_signal", generate_signal)
    parser = argparse.ArgumentParser()
    gen.configure_parser(parser)
    out = tmp_path / "out.npy"
    argv = ["--model", "m", "--prompt", "p.npy", "--seconds", "1", "--out", str(out)]
    gen.run(parser.parse_args([*argv, "--device", "cpu"]))
    assert seen["temperature"] == 1.0 and seen["mode"] == "tokens"
    assert json.loads(out.with_suffix(".json").read_text())["temperature"] == 1.0


# --- predict and evaluate: rows in the order asked for, class names in label order ----------


class _Scorer(nn.Module):
    """Logits (v, -v) per window (head ``B``: (-v, v)), v the window's first electrode's
    mean: windows filled with their own index give each row a known softmax."""

    head_keys = {"A": "A", "B": "B"}

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"A": nn.Identity(), "B": _Flip()})

    def forward_features(self, x, input_chans, channel_padding_mask=None, **kwargs):
        v = x[:, 0].mean(dim=(1, 2))
        return torch.stack([v, -v], 1)

    def forward(self, x, input_chans, *, task=None, channel_padding_mask=None, **kwargs):
        return self.heads[task](self.forward_features(x, input_chans))


class _Flip(nn.Module):
    def forward(self, features):
        return features.flip(1)


def _interleaved() -> TrainData:
    """6 windows of 3 and 2 electrodes in turn (two electrode sets: batches are grouped by
    set, so a batch's rows are not consecutive windows); window i filled with i / 4."""
    items, windows = [], []
    for i in range(6):
        electrodes = (0, 1, 2, 3) if i % 2 else (0, 4, 5)
        items.append(ItemInfo(0, "A", f"s{i}", f"r{i}", i % 2, electrodes, 1))
        windows.append(
            {
                "x": torch.full((len(electrodes) - 1, 1, 200), i / 4),
                "input_chans": torch.tensor(electrodes),
            }
        )
    return TrainData(windows, items, {"A": ["a", "b"]}, [])


def test_predict_gives_each_windows_softmax_in_the_order_asked_for():
    data = _interleaved()
    indices = np.array([5, 0, 3, 2, 1, 4])
    v = torch.tensor(indices / 4, dtype=torch.float32)
    expected = torch.stack([v, -v], 1).softmax(-1).numpy()
    probs, load = finetune.predict(
        _Scorer(), data, indices, "A", torch.device("cpu"), task_id=None, batch_size=2
    )
    assert load is None
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    heads = finetune.predict_heads(
        _Scorer(), data, indices, ["A", "B"], torch.device("cpu"), batch_size=2
    )
    np.testing.assert_allclose(heads["A"], expected, rtol=1e-6)
    np.testing.assert_allclose(heads["B"], expected[:, ::-1], rtol=1e-6)


def test_exported_features_and_class_names_are_each_windows_own(tmp_path, monkeypatch):
    """--export-features: row i holds window i's features whatever task it is of (each task's
    windows are predicted apart), and ``label_names/<task>``, which ``label`` indexes, lists
    the class names in the data's label order (which need not be sorted)."""
    from eegfast.train.commands import evaluate

    data = _interleaved()
    data.items = [  # windows of task A and B in turn
        ItemInfo(0, "AB"[i % 2], it.subject, it.recording, it.label, it.electrodes, 1)
        for i, it in enumerate(data.items)
    ]
    data.label_names = {"A": ["task", "rest"], "B": ["x", "y"]}  # A's label 0 is "task"

    def predict(model, data, indices, task, device, *, features, task_id):
        return np.array([[float(i), 0.0, 0.0] for i in indices], np.float32), None

    monkeypatch.setattr(evaluate, "predict", predict)
    path = evaluate.export_features(
        _Scorer(), data, tmp_path / "f.npz", torch.device("cpu"), ["A", "B"], False
    )
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["features"][:, 0], np.arange(6))
        assert saved["task"].tolist() == ["A", "B"] * 3
        names = saved["label_names/A"]
        assert names.tolist() == ["task", "rest"]
        assert [names[i] for i in saved["label"][::2]] == ["task"] * 3


def test_prediction_csvs_are_replaced_not_rewritten_in_place(tmp_path):
    """predict's and evaluate's predictions.csv go to a temporary renamed over the old file
    (written in place, a reader or a kill mid-write saw a part of the rows)."""
    from eegfast.train.commands import evaluate, predict

    data = _interleaved()
    data.dataset = type("Folder", (), {"recordings": [{"starts": [0, 200, 400, 600, 800, 1000]}]})()
    probs = np.full((6, 2), 0.5)
    writers = {
        "predict.csv": lambda path: predict.write_predictions(
            path, data, {"A": ["a", "b"]}, [("A", probs)]
        ),
        "evaluate.csv": lambda path: evaluate.write_predictions(
            path, data, [("A", np.arange(6), probs)]
        ),
    }
    for name, write in writers.items():
        path = tmp_path / name
        path.write_text("old")
        os.link(path, tmp_path / f"{name}.kept")
        write(path)
        assert (tmp_path / f"{name}.kept").read_text() == "old", name
        assert path.read_text().count("\n") == 7, name  # the header and 6 windows


def test_class_names_of_an_older_checkpoint_keep_its_folders_label_order(monkeypatch):
    """A checkpoint without ``label_names`` (from before they were recorded) takes its class
    names from the folders it was fine-tuned on, in their label order (prepare --classes
    orders them as given), merged folder by folder as load_data numbers them: sorted, a
    head's outputs got another class's name."""
    from eegfast.train.commands import predict

    indexes = {
        "one": {"tasks": {"t": {"labels": ["task", "rest"]}}},
        "two": {"tasks": {"t": {"labels": ["rest", "other"]}}},
    }

    def load_index(root):
        return {**indexes[root], "window_seconds": 4, "settings": {"preprocess": {}}}

    monkeypatch.setattr(predict, "load_index", load_index)
    known = predict.trained_on({"config": {"data": {"roots": ["one", "two"]}}})
    assert known.label_names == {"t": ["task", "rest", "other"]}
    assert known.window_seconds == {4}


def test_a_checkpoint_records_the_preprocessing_of_its_tasks_folders_only(monkeypatch):
    """A single-task model of a run over two folders records the preprocessing of the folder
    holding its task, which predict compares new data with (the other folder's settings would
    warn about, or refuse, data prepared as its own task's was)."""
    import eegfast.data

    indexes = {
        "eeg": {"tasks": {"A": {}}, "settings": {"preprocess": {"scale": 1e4}}},
        "other": {"tasks": {"B": {}}, "settings": {"preprocess": {"scale": 1e6}}},
    }
    monkeypatch.setattr(eegfast.data, "load_index", lambda root: indexes[root])
    data = _two_tasks()
    data.roots = ["eeg", "other"]
    record = finetune.prepared_like(data, ["A"], data.labelled("A"))
    assert record["preprocess"] == [{"root": "eeg", "settings": {"scale": 1e4}}]
    assert record["label_names"] == {"A": ["a0", "a1"]} and record["window_seconds"] == [4]
