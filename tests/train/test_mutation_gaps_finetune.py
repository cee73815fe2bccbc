"""Gaps a mutation audit of fine-tuning (fold planning, training set-up, task routing, the
baseline and the report) found in the tests: each test here fails on a one-line slip that the
other tests let through (a task left out of the joint split, a task's head trained on nothing,
router ids given to a model trained without them). No model training: fit and the models'
predictions are stand-ins where a run would be needed."""

from __future__ import annotations

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
    Backbone,
    comparisons,
    cross_validate,
    plan_folds,
)

TINY = {"kind": "classifier", "name": "labram_tiny"}
CPU = type("Runtime", (), {"device": torch.device("cpu"), "dist": None})()


def _data(spec, electrodes=(0, 1, 2)) -> TrainData:
    """spec: (task, subject, recording, label) per window; two classes per task; no signals."""
    items = [ItemInfo(0, t, s, r, lab, electrodes, 4) for t, s, r, lab in spec]
    names = {t: ["a", "b"] for t, *_ in spec}
    return TrainData([None] * len(items), items, names, [])


# --- fold planning --------------------------------------------------------------------------


def test_a_task_sharing_subjects_with_two_unconnected_tasks_joins_them_in_one_split():
    """A and B share no subject, C shares one with each: the three are one connected set and
    must be split together (else C's subject S1 is tested in C while A trains on it). Linking
    C to its last owner only (not the roots of both sets) left one of A and B out."""
    spec = [("A", s, f"A{s}", lab) for s in ("S1", "S2") for lab in (0, 1, 0, 1)]
    spec += [("B", s, f"B{s}", lab) for s in ("S3", "S4") for lab in (0, 1, 0, 1)]
    spec += [("C", s, f"C{s}", lab) for s in ("S1", "S3") for lab in (0, 1, 0, 1)]
    data = _data(spec)
    plans, grouping = plan_folds(data, ["A", "B", "C"], k=2, group_by="subject", seed=0)
    for task in "ABC":
        assert "split together with" in grouping[task], grouping[task]
    for plan in plans:
        tested = {data.items[i].subject for t in "ABC" for i in plan.test[t]}
        trained = {data.items[i].subject for t in "ABC" for i in plan.train[t]}
        assert not tested & trained


def test_tasks_split_together_are_stratified_by_task_and_class():
    """A diagnosis-like task A (one class per subject: two of class a, four of class b) shares
    its subjects with task B (both classes per subject): stratified by class alone, the joint
    split tested both class-a subjects of A in one fold, so the other fold tested A on one
    class only (no AUROC there, a balanced accuracy of one class)."""
    counts = {  # (task, subject, label): windows
        ("A", "S0", 1): 7, ("A", "S1", 0): 3, ("A", "S2", 1): 6,
        ("A", "S3", 1): 2, ("A", "S4", 1): 5, ("A", "S5", 0): 2,
        ("B", "S0", 0): 3, ("B", "S0", 1): 5, ("B", "S1", 0): 3, ("B", "S1", 1): 6,
        ("B", "S2", 0): 1, ("B", "S2", 1): 3, ("B", "S3", 0): 4, ("B", "S3", 1): 7,
        ("B", "S4", 0): 2, ("B", "S4", 1): 6, ("B", "S5", 0): 1, ("B", "S5", 1): 3,
    }  # fmt: skip
    spec = [(t, s, f"{s}{t}", lab) for (t, s, lab), n in counts.items() for _ in range(n)]
    data = _data(spec)
    plans, grouping = plan_folds(data, ["A", "B"], k=2, group_by="subject", seed=0)
    assert "split together" in grouping["A"]
    for plan in plans:
        for task in "AB":
            assert {data.items[int(i)].label for i in plan.test[task]} == {0, 1}, (plan.fold, task)


# --- cross_validate: which tasks and variants run ---------------------------------------------


def _stand_ins(monkeypatch) -> list[list[str]]:
    """Training and prediction replaced: returns the task lists of the models trained."""
    trained: list[list[str]] = []

    def train_classifier(backbone, tasks, data, train_idx, config, run_dir, runtime, *, resume):
        trained.append(list(tasks))
        return None, {}

    def predict(model, data, indices, task, device, *, task_id):
        return np.full((len(indices), 2), 0.5), None

    monkeypatch.setattr(finetune, "train_classifier", train_classifier)
    monkeypatch.setattr(finetune, "predict", predict)
    return trained


def test_one_task_with_the_single_task_baseline_off_still_trains_its_model(tmp_path, monkeypatch):
    """finetune.single_task_baseline=false asks for no extra single-task models beside the
    multi-task one; with one task there is no multi-task model, so its single-task model is the
    model: without it nothing trained and the report held the baseline only."""
    trained = _stand_ins(monkeypatch)
    data = _data([("A", f"S{s}", f"S{s}", lab) for s in range(4) for lab in (0, 1)])
    config = RunConfig().with_overrides(
        {
            "finetune.folds": 2,
            "finetune.single_task_baseline": False,
            "finetune.band_power_baseline": False,
        }
    )
    result = cross_validate(data, config, tmp_path, CPU, Backbone(TINY, None, []))
    assert trained == [["A"], ["A"]]
    assert {r["variant"] for r in result.rows} == {"single"}


def test_a_task_without_labelled_windows_is_left_out_when_no_tasks_are_named(tmp_path):
    """Data holding an unlabelled task (windows prepared for pretraining) beside a labelled
    one: without data.tasks, fine-tuning takes the labelled tasks, not every task (plan_folds
    refused the unlabelled one: "task 'rest' has no labelled windows")."""
    spec = [("mi", f"S{s}", f"S{s}", lab) for s in range(4) for lab in (0, 1)]
    spec += [("rest", f"S{s}", f"R{s}", -1) for s in range(4)]
    config = RunConfig().with_overrides(
        {"finetune.folds": 2, "finetune.band_power_baseline": False}
    )
    result = cross_validate(_data(spec), config, tmp_path, CPU, None)
    assert set(result.grouping) == {"mi"}


def test_a_task_without_common_electrodes_skips_only_its_own_baseline(tmp_path):
    """Task ``u``'s recordings share no electrode (no band-power baseline for it) beside task
    ``t``, which has one: ``t`` keeps its baseline and ``u`` is skipped (looking up ``u``'s
    missing features raised KeyError after every fold's models had trained)."""
    rng = np.random.default_rng(0)
    items, windows = [], []
    for task, sets in (("t", ((1, 2), (1, 2))), ("u", ((1, 2), (3, 4)))):
        for s in range(4):
            electrodes = sets[s % 2]
            for label in (0, 1):
                items.append(
                    ItemInfo(0, task, f"{task}{s}", f"{task}{s}", label, (0, *electrodes), 1)
                )
                windows.append(
                    {"x": torch.tensor(rng.normal(size=(2, 1, 200)), dtype=torch.float32)}
                )
    data = TrainData(windows, items, {"t": ["a", "b"], "u": ["a", "b"]}, [])
    config = RunConfig().with_overrides({"finetune.folds": 2})
    result = cross_validate(data, config, tmp_path, None, None)
    assert {(p["task"], p["variant"]) for p in result.predictions} == {("t", "band_power")}
    assert "no band-power baseline" in result.grouping["u"]


# --- train_classifier: batches, router losses and router ids ----------------------------------


def _captured_fit(monkeypatch) -> dict:
    captured: dict = {}

    def fit(model, step, dataset, config, run_dir, *, ctx, meta, **kwargs):
        captured.update(ctx=ctx, meta=meta, **kwargs)

    monkeypatch.setattr(finetune, "fit", fit)
    return captured


def test_a_task_whose_electrode_sets_each_hold_less_than_a_batch_is_refused(tmp_path, monkeypatch):
    """Batches hold one electrode set: 5 + 5 windows of two sets make no full batch of 8 (10
    windows in all would), so the task would not train; refused, naming it."""
    _captured_fit(monkeypatch)
    items = [
        ItemInfo(0, "mi", f"S{i}", f"r{i}", i % 2, (0, 1, 2) if i < 5 else (0, 3, 4), 4)
        for i in range(10)
    ]
    data = TrainData([None] * 10, items, {"mi": ["a", "b"]}, [])
    config = RunConfig().with_overrides({"train.batch_size": 8})
    with pytest.raises(ValueError, match=r"task 'mi': its 10 training windows .*\[5, 5\]"):
        finetune.train_classifier(
            Backbone(TINY, None, []),
            ["mi"],
            data,
            np.arange(10),
            config,
            tmp_path,
            CPU,
            resume=None,
        )


def _upcycled(num_tasks: int) -> dict:
    return {**TINY, "upcycle": {"num_experts": 2, "top_k": 1, "num_tasks": num_tasks}}


def test_a_backbone_upcycled_without_tasks_still_weighs_its_router_losses(tmp_path, monkeypatch):
    """An MoE backbone upcycled without task ids does not route by task, but its routers still
    have load-balance and z losses: their weights (upcycle.router_aux_weight / z_weight) must
    reach the training step, or the experts train unbalanced, silently. Under DDP an expert
    that no token of a step chose has no gradient: find_unused_parameters, even for one task."""
    captured = _captured_fit(monkeypatch)
    data = _data([("mi", f"S{i}", f"r{i}", i % 2) for i in range(8)])
    config = RunConfig().with_overrides({"train.batch_size": 4})
    backbone = Backbone(_upcycled(0), None, [])
    finetune.train_classifier(
        backbone, ["mi"], data, np.arange(8), config, tmp_path, CPU, resume=None
    )
    assert captured["ctx"].aux_weights == {
        "load_balance_loss": config.upcycle.router_aux_weight,
        "z_loss": config.upcycle.router_z_weight,
    }
    assert captured["ctx"].route_by_task is False
    assert captured["find_unused_parameters"] is True


@pytest.mark.parametrize("routing", [True, False])
def test_router_ids_go_to_prediction_only_where_the_model_trained_with_them(
    tmp_path, monkeypatch, routing
):
    """A backbone upcycled with tasks, fine-tuned with upcycle.task_routing=false, trained
    without task ids: predicting its test part with them shifts every routing decision away
    from the trained one. train_classifier's router ids are those it trained with, or none."""
    captured = _captured_fit(monkeypatch)
    data = _data([("mi", f"S{i}", f"r{i}", i % 2) for i in range(8)])
    config = RunConfig().with_overrides({"train.batch_size": 4, "upcycle.task_routing": routing})
    backbone = Backbone(_upcycled(2), None, ["other", "mi"])
    _, routed = finetune.train_classifier(
        backbone, ["mi"], data, np.arange(8), config, tmp_path, CPU, resume=None
    )
    assert routed == ({"mi": 1} if routing else {})
    assert captured["ctx"].route_by_task is routing
    assert captured["meta"]["route_by_task"] is routing


# --- predict_heads: heads of tasks whose names are no module names ---------------------------


class _Mean(nn.Module):
    """Features (v, -v), v the mean of a window's signal."""

    def forward_features(self, x, input_chans=None, *, channel_padding_mask=None, task_id=None):
        v = x.mean(dim=(1, 2, 3))
        return torch.stack([v, -v], 1)


def test_predict_heads_finds_the_head_of_a_task_named_after_a_folder():
    """A task named ``eegmmidb-1.0.0`` (dots: no module name) has its head under another key
    (arch.head_key): predict_heads must look it up through ``head_keys`` as forward does."""
    from eegfast.train.arch import MultiTaskClassifier, head_key

    model = MultiTaskClassifier(_Mean(), {"eegmmidb-1.0.0": 2, "arith": 2}, 2)
    assert head_key("eegmmidb-1.0.0") != "eegmmidb-1.0.0"
    items = [ItemInfo(0, "arith", f"s{i}", f"r{i}", 0, (0, 1), 1) for i in range(3)]
    windows = [
        {"x": torch.full((1, 1, 200), float(i)), "input_chans": torch.tensor([0, 1])}
        for i in range(3)
    ]
    data = TrainData(windows, items, {"arith": ["a", "b"]}, [])
    tasks = ["eegmmidb-1.0.0", "arith"]
    heads = finetune.predict_heads(model, data, [2, 0, 1], tasks, torch.device("cpu"))
    for task in tasks:
        alone, _ = finetune.predict(model, data, [2, 0, 1], task, torch.device("cpu"), task_id=None)
        np.testing.assert_allclose(heads[task], alone, rtol=1e-6)


# --- comparisons ------------------------------------------------------------------------------


def test_without_test_predictions_a_tie_with_the_baseline_does_not_beat_it():
    summary = {
        ("single", "t", "balanced_accuracy"): (0.7, 0.05, 5),
        ("band_power", "t", "balanced_accuracy"): (0.7, 0.05, 5),
    }
    entry = comparisons(summary, ["t"])["t"]
    assert entry["baseline_verdict"] == DOES_NOT_BEAT != BEATS
    assert entry["beats_baseline"] is False


def test_a_checkpoints_preprocessing_record_follows_a_change_of_the_datas_folders(monkeypatch):
    """prepared_like reads the folders' settings once per ``data`` and keeps them on it: once
    ``data.roots`` changes (the data re-pointed at the same task prepared elsewhere), the kept
    record is stale and the new folders' settings must be read."""
    import eegfast.data

    indexes = {
        "old": {"tasks": {"A": {}}, "settings": {"preprocess": {"scale": 1e4}}},
        "new": {"tasks": {"A": {}}, "settings": {"preprocess": {"scale": 1e6}}},
    }
    monkeypatch.setattr(eegfast.data, "load_index", lambda root: indexes[root])
    data = _data([("A", f"S{i}", f"r{i}", i % 2) for i in range(4)])
    data.roots = ["old"]
    first = finetune.prepared_like(data, ["A"], np.arange(4))
    assert first["preprocess"] == [{"root": "old", "settings": {"scale": 1e4}}]
    data.roots = ["new"]
    again = finetune.prepared_like(data, ["A"], np.arange(4))
    assert again["preprocess"] == [{"root": "new", "settings": {"scale": 1e6}}]


@pytest.mark.parametrize("recordings", [5, 6])
def test_a_transfer_verdict_needs_six_units_and_six_are_enough(recordings):
    """The multi-task model right on every window of ``recordings`` recordings, the
    single-task one wrong on every one: with 6 (MIN_VERDICT_UNITS) the interval [1, 1] is a
    verdict of positive transfer, with 5 too few recordings for one."""
    from eegfast.train.finetune import MIN_VERDICT_UNITS, POSITIVE_TRANSFER, CVResult, _record

    assert MIN_VERDICT_UNITS == 6
    items = [
        ItemInfo(0, "t", f"S{r}", f"r{r}", c, (0, 1), 4) for r in range(recordings) for c in (0, 1)
    ]
    data = TrainData(None, items, {"t": ["a", "b"]}, [])
    result = CVResult()
    test = np.arange(len(items))
    labels = np.array([it.label for it in items])
    _record(result, 0, "multitask", "t", data, test, np.eye(2)[labels])
    _record(result, 0, "single", "t", data, test, np.eye(2)[1 - labels])
    entry = comparisons(finetune.summarise(result.rows), ["t"], result.predictions)["t"]
    assert entry["units"] == recordings and entry["transfer_interval"] == [1.0, 1.0]
    if recordings >= MIN_VERDICT_UNITS:
        assert entry["transfer_verdict"] == POSITIVE_TRANSFER
    else:
        assert entry["transfer_verdict"] == "no clear difference (only 5 subjects/recordings)"


def test_summary_json_has_null_for_infinite_numbers_too():
    """Strict JSON has no Infinity either: _json_numbers turns every non-finite float into
    None, at any depth."""
    got = finetune._json_numbers({"a": [float("inf"), -float("inf")], "b": (float("nan"), 1.5)})
    assert got == {"a": [None, None], "b": [None, 1.5]}


def test_no_roc_curve_for_a_task_of_three_classes_tested_on_two(tmp_path):
    """ROC curves are of binary tasks (class 1 against class 0): a three-class task whose test
    windows hold two of its classes gets none (its column 1 is no positive-class score)."""
    from eegfast.train.finetune import CVResult, _record, write_outputs

    items = [ItemInfo(0, "t", f"S{i}", f"r{i}", i % 2, (0, 1), 4) for i in range(6)]
    data = TrainData(None, items, {"t": ["a", "b", "c"]}, [])
    result = CVResult(grouping={"t": "none"})
    probs = np.tile([0.5, 0.3, 0.2], (6, 1))
    _record(result, 0, "single", "t", data, np.arange(6), probs)
    payload = write_outputs(result, data, tmp_path, title="t", fixed_model=True)
    assert "ROC curves" not in payload["figures"]
    assert not (tmp_path / "roc_curves.png").exists()


def test_paired_difference_refuses_groups_of_another_length():
    from eegfast.train.finetune import paired_bacc_difference

    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"groups must be \(N,\) like y \(4,\), got \(3,\)"):
        paired_bacc_difference(y, y, y, groups=["r0", "r0", "r1"])


def test_six_recordings_are_enough_for_a_verdict_and_the_report_says_no_more(tmp_path):
    """With exactly MIN_VERDICT_UNITS recordings the report gives the verdict and the interval,
    without the "too few for a verdict" remark that it makes below that."""
    from eegfast.train.finetune import CVResult, _record, write_outputs

    items = [ItemInfo(0, "t", f"S{r}", f"r{r}", c, (0, 1), 4) for r in range(6) for c in (0, 1)]
    data = TrainData(None, items, {"t": ["a", "b"]}, [])
    result = CVResult(grouping={"t": "by recording (6 recordings)"}, units={"t": "recording"})
    test = np.arange(len(items))
    labels = np.array([it.label for it in items])
    _record(result, 0, "single", "t", data, test, np.eye(2)[labels])
    _record(result, 0, "band_power", "t", data, test, np.eye(2)[1 - labels])
    payload = write_outputs(result, data, tmp_path, title="t")
    assert payload["comparisons"]["t"]["baseline_verdict"] == BEATS
    report = (tmp_path / "report.md").read_text()
    assert "beats the band-power baseline" in report and "[+1.000, +1.000]" in report
    assert "too few for a verdict" not in report


# --- train/data.py ----------------------------------------------------------------------------


def test_load_data_refuses_a_task_no_folder_has(tmp_path):
    """data.tasks naming a task that is not there (a typo) is refused, naming it, not dropped:
    the run went on with the other tasks."""
    from eegfast.train.data import load_data
    from tests.train.test_boundary_sizes_audit import _folder

    root = _folder(tmp_path / "x", ["C3", "C4"], [40, 42])
    assert load_data([root], tasks=["mi"]).tasks == ["mi"]
    with pytest.raises(ValueError, match=r"data\.tasks: \['nope'\] not found in"):
        load_data([root], tasks=["mi", "nope"])


def test_an_electrode_whose_row_is_the_tables_size_is_past_the_table(tmp_path):
    """A table of ``rows`` rows has rows 0 .. rows - 1: row 129 is past the reference's
    129-row table (the model's own check failed at the first batch holding it)."""
    from eegfast.train.data import check_table_rows, load_data
    from tests.train.test_boundary_sizes_audit import _folder

    data = load_data([_folder(tmp_path / "x", ["C3", "Fp2-F4 bip"], [40, 129])])
    with pytest.raises(ValueError, match=r"electrodes \['Fp2-F4 bip'\] have no embedding row"):
        check_table_rows(data, 129, "the model")
    check_table_rows(data, 130, "the model")  # rows 0 .. 129: it fits


def test_table_rows_is_the_smallest_table_of_the_model():
    """A tokenizer's encoder and decoder (or a student and its teacher) each index their own
    table with the same input_chans: every row must be in the smallest."""
    from types import SimpleNamespace

    from eegfast.train.data import table_rows

    class Table(nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            self.config = SimpleNamespace(pos_rows=rows)

    model = nn.ModuleDict({"encoder": Table(137), "decoder": Table(129)})
    assert table_rows(model) == 129
    assert table_rows(nn.Linear(2, 2)) is None


def test_embedding_coverage_keeps_a_resumed_runs_longer_windows():
    """A run resumed on data of shorter windows: the time embeddings past them were trained by
    the earlier part of the run, and the record keeps the longer window."""
    from eegfast.train.data import embedding_coverage

    data = _data([("A", "S0", "r0", 0)], electrodes=(0, 3, 4))
    earlier = {"electrode_rows": [7], "window_seconds": 8}
    assert embedding_coverage(data, earlier) == {"electrode_rows": [3, 4, 7], "window_seconds": 8}
    assert embedding_coverage(data) == {"electrode_rows": [3, 4], "window_seconds": 4}


def test_electrodes_past_the_table_in_two_folders_name_the_first(tmp_path):
    from eegfast.train.data import check_table_rows, load_data
    from tests.train.test_boundary_sizes_audit import _folder

    first = _folder(tmp_path / "first", ["C3", "Fp2-F4 bip"], [40, 133])
    second = _folder(tmp_path / "second", ["C3", "F8-T4 bip"], [40, 134])
    with pytest.raises(ValueError, match=r"first: electrodes \['Fp2-F4 bip'\] have no"):
        check_table_rows(load_data([first, second]), 129, "the model")


# --- train/runlog.py ----------------------------------------------------------------------------


def test_an_empty_metrics_file_gets_its_header(tmp_path):
    """A run killed before its first log point left metrics.csv empty: the next run writes the
    header first (rows without it are a file read_metrics only tolerates as unclean)."""
    from eegfast.train.runlog import HEADER, RunLogger

    (tmp_path / "metrics.csv").write_text("")
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"train/loss": 0.5})
    logger.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == [",".join(HEADER), "1,train/loss,0.5"]


def test_a_resume_purges_tensorboard_after_the_checkpoints_step_only(tmp_path, monkeypatch):
    """purge_step hides the events from that step on: the resumed run continues after the
    checkpoint's step ``resume_step``, whose own scalars stay."""
    import torch.utils.tensorboard

    opened: list[dict] = []

    class Writer:
        def __init__(self, **kwargs) -> None:
            opened.append(kwargs)

        def close(self) -> None:
            pass

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Writer)
    from eegfast.train.runlog import RunLogger

    RunLogger(tmp_path, resume_step=4).close()
    RunLogger(tmp_path).close()
    assert [o["purge_step"] for o in opened] == [5, None]


def test_read_metrics_keeps_the_later_row_of_a_step(tmp_path):
    """A step logged twice (by a run and its resumption): the later value is the run's."""
    from eegfast.train.runlog import read_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("step,tag,value\n1,train/loss,0.5\n2,train/loss,0.4\n1,train/loss,0.3\n")
    assert read_metrics(path) == {"train/loss": [(1, 0.3), (2, 0.4)]}


@pytest.mark.parametrize("row", ["1,train/loss,0.5,extra", "1,train/loss,abc"])
def test_read_metrics_refuses_a_row_that_is_not_step_tag_value_naming_the_file(tmp_path, row):
    from eegfast.train.runlog import read_metrics

    path = tmp_path / "metrics.csv"
    path.write_text(f"step,tag,value\n{row}\n2,train/loss,0.4\n")
    with pytest.raises(ValueError, match=r"metrics\.csv: 1 row\(s\) are not step,tag,value"):
        read_metrics(path)


# --- train/arch.py ------------------------------------------------------------------------------


def test_a_model_of_two_heads_needs_its_task_named():
    from eegfast.train.arch import MultiTaskClassifier

    model = MultiTaskClassifier(_Mean(), {"A": 2, "B": 3}, 2)
    x = torch.ones(1, 1, 1, 200)
    with pytest.raises(ValueError, match=r"task= is required: this model has heads \['A', 'B'\]"):
        model(x, torch.tensor([[0, 1]]))
    assert model(x, torch.tensor([[0, 1]]), task="B").shape == (1, 3)
    single = MultiTaskClassifier(_Mean(), {"A": 2}, 2)
    assert single(x, torch.tensor([[0, 1]])).shape == (1, 2)


def test_heads_start_from_zero_bias_and_small_weights():
    """A fresh head: weights of std 0.02 and zero biases (nn.Linear's default init gave each
    head random biases, a class preference before any training, and weights of std ~0.036)."""
    from eegfast.train.arch import MultiTaskClassifier

    torch.manual_seed(0)
    model = MultiTaskClassifier(_Mean(), {"A": 64}, 256)
    head = model.heads["A"]
    assert torch.equal(head.bias, torch.zeros(64))
    assert 0.018 < head.weight.std() < 0.022


def _saved_classifier(root, drop_path_rate: float, heads: dict | None):
    from eegfast.train import checkpoint as ckpt
    from eegfast.train.arch import build_model

    arch = {**TINY, "kwargs": {"num_classes": 0, "drop_path_rate": drop_path_rate}}
    if heads:
        arch["heads"] = heads
    weights = build_model(arch).state_dict()
    ckpt.save_checkpoint(root / "checkpoints", 1, weights, {}, {"arch": arch})
    return root


def test_a_drop_path_of_zero_replaces_the_checkpoints_stochastic_depth(tmp_path):
    """model.drop_path=0 (no stochastic depth) on a backbone saved with 0.1: zero is a value to
    set, not "keep the checkpoint's" (None is that)."""
    from eegfast.train.arch import backbone_from_checkpoint

    run = _saved_classifier(tmp_path, 0.1, None)
    arch, _, _ = backbone_from_checkpoint(run, drop_path=0.0)
    assert arch["kwargs"]["drop_path_rate"] == 0.0
    arch, _, _ = backbone_from_checkpoint(run)
    assert arch["kwargs"]["drop_path_rate"] == 0.1


def test_a_fine_tuned_models_backbone_leaves_its_heads_behind(tmp_path):
    """A fine-tuned multi-task model as the backbone of another fine-tuning (or a linear
    probe): its arch without the old heads, its weights the backbone's, which a model built
    from that arch loads exactly."""
    from eegfast.train.arch import backbone_from_checkpoint, build_model

    run = _saved_classifier(tmp_path, 0.0, {"old": 3})
    arch, weights, _ = backbone_from_checkpoint(run)
    assert "heads" not in arch
    build_model(arch).load_state_dict(weights, strict=True)


# --- train/distributed.py -----------------------------------------------------------------------


def test_transformer_blocks_finds_nested_block_lists_inner_first():
    """A tokenizer's ``encoder.blocks`` and ``decoder.blocks`` are found at any depth, and a
    block list inside a block comes before the block holding it (FSDP2 shards bottom up)."""
    from eegfast.train.distributed import transformer_blocks

    inner = nn.Linear(1, 1)
    holder = nn.Module()
    holder.blocks = nn.ModuleList([inner])
    model = nn.Module()
    model.encoder, model.decoder = nn.Module(), nn.Module()
    model.encoder.blocks = nn.ModuleList([holder])
    model.decoder.blocks = nn.ModuleList([nn.Linear(2, 2)])
    found = transformer_blocks(model)
    assert len(found) == 3 and found.index(inner) < found.index(holder)
    assert model.decoder.blocks[0] in found


def test_each_fold_model_starts_from_the_backbone_weights_and_the_seed(tmp_path, monkeypatch):
    """train_classifier builds each fold's model from the backbone's weights (not a random
    backbone) and seeds first, so that its fresh heads are train.seed's whatever ran before."""
    from eegfast.train.arch import build_model

    models: list[nn.Module] = []
    monkeypatch.setattr(finetune, "fit", lambda model, *args, **kwargs: models.append(model))
    torch.manual_seed(123)
    weights = build_model({**TINY, "kwargs": {"num_classes": 0}}).state_dict()
    backbone = Backbone({**TINY, "kwargs": {"num_classes": 0}}, weights, [])
    data = _data([("mi", f"S{i}", f"r{i}", i % 2) for i in range(8)])
    config = RunConfig().with_overrides({"train.batch_size": 4})
    for state in (1, 2):
        torch.manual_seed(state)  # whatever ran before the fold
        finetune.train_classifier(
            backbone, ["mi"], data, np.arange(8), config, tmp_path, CPU, resume=None
        )
    for model in models:
        got = model.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in weights.items())
    first, second = (m.heads["mi"].weight for m in models)
    assert torch.equal(first, second)


def _reduce_on_two_ranks(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: its mean and minimum across the ranks, to ``out/<rank>.json``."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from eegfast.train.distributed import DistInfo, all_reduce_mean, min_across_ranks
    from tests._gloo import gloo_worker_leaving_without_teardown

    with gloo_worker_leaving_without_teardown(rank, 2, port):
        info = DistInfo(rank=rank, world_size=2)
        mine = torch.tensor([1.0, 10.0]) * (rank + 1)  # rank 0: (1, 10), rank 1: (2, 20)
        mean = all_reduce_mean(mine, info)
        low = min_across_ranks(5 - 3 * rank, torch.device("cpu"), info)  # 5 and 2
        result = {"mean": mean.tolist(), "mine": mine.tolist(), "min": low}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
        dist.barrier()


def test_metrics_reduced_across_ranks_are_the_mean_and_the_minimum(tmp_path):
    """all_reduce_mean gives every rank the mean (its own tensor left as it was);
    min_across_ranks the smallest value (the engine's first bad step on any rank)."""
    import json

    import torch.multiprocessing as mp

    from tests._gloo import free_port

    mp.spawn(_reduce_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["mean"] == [1.5, 15.0] and got["min"] == 2
        assert got["mine"] == [rank + 1.0, 10.0 * (rank + 1)]


def test_the_linear_probe_takes_features_of_the_backbone_weights(tmp_path, monkeypatch):
    """finetune.mode=linear: the frozen features come from the backbone's weights, not from a
    randomly initialised model of its architecture (whose probe scores look like a poor
    backbone's, silently)."""
    from eegfast.train.arch import build_model

    arch = {**TINY, "kwargs": {"num_classes": 0}}
    torch.manual_seed(123)
    weights = build_model(arch).state_dict()
    seen: list[nn.Module] = []

    def predict(model, data, indices, task, device, *, features, task_id):
        seen.append(model)
        return np.zeros((len(indices), 2)), None

    monkeypatch.setattr(finetune, "predict", predict)
    data = _data([("mi", f"S{s}", f"S{s}", lab) for s in range(4) for lab in (0, 1)])
    config = RunConfig().with_overrides(
        {"finetune.mode": "linear", "finetune.folds": 2, "finetune.band_power_baseline": False}
    )
    cross_validate(data, config, tmp_path, CPU, Backbone(arch, weights, []))
    got = seen[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items())
