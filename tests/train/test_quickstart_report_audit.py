"""The quickstart's report as a reader takes it: what its numbers are of, and plots that can be
read (eegfast/train/commands/quickstart.py, the report writer of finetune.py, plots.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eegfast.train import plots
from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.finetune import CVResult, _record, write_outputs


@pytest.fixture
def drawn(monkeypatch):
    """{file name: figure} of every plot saved (the figure is closed, not gone)."""
    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _arithmetic_like(tmp_path, *, fixed_model=False):
    """The quickstart's arithmetic task in miniature: rest 3:1 against arithmetic (class 1),
    two subjects, each tested in one fold; ``fixed_model``: its report as `evaluate`'s."""
    labels = [0, 0, 0, 1] * 4
    subjects = ["s0"] * 8 + ["s1"] * 8
    items = [
        ItemInfo(0, "arithmetic", s, f"{s}_{y + 1}", y, (0, 1, 2), 4)
        for s, y in zip(subjects, labels, strict=True)
    ]
    data = TrainData(
        dataset=None, items=items, label_names={"arithmetic": ["rest", "arithmetic"]}, roots=[]
    )
    result = CVResult(grouping={"arithmetic": "by subject (2 subjects)"}, units={})
    rng = np.random.default_rng(0)
    for fold, test in enumerate((np.arange(8), np.arange(8, 16))):
        for variant in ("multitask", "single", "band_power"):
            p = rng.random(len(test))
            _record(result, fold, variant, "arithmetic", data, test, np.stack([1 - p, p], 1))
    return write_outputs(result, data, tmp_path, title="t", fixed_model=fixed_model), data


def test_report_names_the_positive_class_and_the_chance_auc_pr(tmp_path, drawn):
    """AUROC and AUC-PR score class 1, but the report named neither that class nor AUC-PR's
    chance level (its share: 0.25 for the quickstart's 3:1 arithmetic task), so an AUC-PR of
    0.24 (chance) read like a poor model and the ROC curves' true positive rate had no class."""
    _arithmetic_like(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "`arithmetic` as the positive class" in report
    assert "share of the test windows, 0.250" in report


def test_roc_panel_names_its_positive_class(tmp_path, drawn):
    """A true positive rate of an unnamed class: the panel's title named the task only."""
    _arithmetic_like(tmp_path)
    (panel,) = drawn["roc_curves.png"].axes
    assert "positive class: arithmetic" in panel.get_title()


def test_confusion_counts_are_white_on_the_dark_cells(tmp_path, drawn):
    """The counts were black on every cell, also on the colour map's darkest blue: the largest
    count (76 of the quickstart's rest windows) could hardly be read."""
    matrix = np.array([[76, 14], [28, 2]])
    plots.confusion_matrices(
        {"arithmetic": matrix, "motor_imagery": matrix},
        {"arithmetic": ["rest", "arithmetic"], "motor_imagery": ["left", "right"]},
        tmp_path / "confusion_matrices.png",
    )
    colours = {t.get_text(): t.get_color() for t in drawn["confusion_matrices.png"].axes[0].texts}
    assert colours["76"] == "white" and colours["2"] == "black" and colours["14"] == "black"


def test_expert_load_axis_is_a_share_of_slots(tmp_path, drawn):
    """The bars are shares of top-k routing slots (they sum to 1 over experts, the dotted line
    at 1/E); the axis said "fraction of routed tokens", which for top-2 is twice that."""
    plots.expert_load({"a": np.full(4, 0.25), "b": np.full(4, 0.25)}, tmp_path / "load.png")
    (ax,) = drawn["load.png"].axes
    assert "slot" in ax.get_ylabel() and "routed tokens" not in ax.get_ylabel()


def _quickstart_runs(tmp_path):
    runs = tmp_path / "runs"
    for run in ("tokenizer", "pretrain"):
        (runs / run).mkdir(parents=True)
    (runs / "tokenizer" / "metrics.csv").write_text("step,tag,value\n10,train/loss,1.05\n")
    (runs / "pretrain" / "metrics.csv").write_text(
        "step,tag,value\n10,train/loss,7.778\n10,train/loss_masked,3.890\n"
        "10,train/loss_complement,3.888\n10,train/accuracy_masked,0.155\n"
    )
    (runs / "moe").mkdir()
    (runs / "moe" / "upcycle.json").write_text(
        json.dumps(
            {
                "arch": {"upcycle": {"num_experts": 4, "top_k": 2}},
                "task_names": ["arithmetic"],
                "dense_parameters": 10,
                "moe_parameters": 30,
                "probe_max_abs_diff": 1e-7,
            }
        )
    )
    (runs / "finetune").mkdir()
    (runs / "finetune" / "summary.json").write_text(json.dumps({"comparisons": {}}))
    (runs / "finetune" / "report.md").write_text(
        "# eegfast fine-tuning report\n\n- initialised from `runs/moe`\n"
        "- cross-validation for `arithmetic`: grouped by subject (2 subjects)\n\n## Metrics\n"
    )
    return runs


def _quickstart_report(tmp_path) -> list[str]:
    from eegfast.train.commands.quickstart import write_report

    runs = _quickstart_runs(tmp_path)
    timings = {"tokenizer": 1.0, "pretrain": 1.0, "finetune": 1.0}
    report = write_report(tmp_path, runs, timings, 3.0, "ATTRIBUTION", fast=False)
    return report.read_text().splitlines()


def test_quickstart_report_gives_fine_tuning_its_own_heading(tmp_path):
    """The fine-tuning report's design notes (initialisation, fold grouping, transductive
    pretraining) had no heading: they went on as items of the steps' list above them."""
    lines = _quickstart_report(tmp_path)
    upcycle = next(i for i, line in enumerate(lines) if line.startswith("- upcycle:"))
    notes = lines.index("- initialised from `runs/moe`")
    assert any(line.startswith("## ") for line in lines[upcycle:notes])


def test_quickstart_report_splits_the_symmetric_pretraining_loss(tmp_path):
    """The symmetric objective's final loss (7.8) is two cross-entropies summed; alone, it
    read as worse than a uniform guess over the 256 codes (ln 256 = 5.5)."""
    (line,) = [x for x in _quickstart_report(tmp_path) if x.startswith("- masked pretraining:")]
    assert "masked patches, 3.890" in line and "complementary ones, 3.888" in line
    assert "ln 256 = 5.545 each" in line and "1/256 = 0.004" in line


def test_pretraining_loss_plot_gives_each_loss_its_own_axis(tmp_path, drawn):
    """pretraining_loss.png drew the tokenizer's loss (~1) on the axis of the masked model's
    summed cross-entropies (~8-11), where it was a flat line near the bottom."""
    _quickstart_report(tmp_path)
    titles = [ax.get_title() for ax in drawn["pretraining_loss.png"].axes]
    assert titles == ["tokenizer", "masked pretraining"]


def test_roc_panel_says_pooled_over_folds_only_for_cross_validation(tmp_path, drawn):
    """`eegfast evaluate` scores one trained model: its ROC panel said "(pooled over folds)"."""
    _arithmetic_like(tmp_path / "cv")
    (panel,) = drawn["roc_curves.png"].axes
    assert "pooled over folds" in panel.get_title()
    _arithmetic_like(tmp_path / "one", fixed_model=True)
    (panel,) = drawn["roc_curves.png"].axes
    assert "pooled" not in panel.get_title() and "positive class: arithmetic" in panel.get_title()


def test_a_task_name_with_a_bar_keeps_the_metrics_table_rows_whole(tmp_path):
    """A task takes its folder's name: a ``|`` in it ended the Markdown cell and shifted the
    row's columns."""
    labels = [0, 1] * 4
    items = [ItemInfo(0, "a|b", f"s{i % 2}", f"r{i}", y, (0, 1), 4) for i, y in enumerate(labels)]
    data = TrainData(dataset=None, items=items, label_names={"a|b": ["x", "y"]}, roots=[])
    result = CVResult(grouping={"a|b": "by subject"}, units={})
    p = np.linspace(0.1, 0.9, 4)
    for fold, test in enumerate((np.arange(4), np.arange(4, 8))):
        _record(result, fold, "single", "a|b", data, test, np.stack([1 - p, p], 1))
    write_outputs(result, data, tmp_path, title="t")
    rows = [r for r in (tmp_path / "report.md").read_text().splitlines() if "a\\|b" in r]
    header = next(r for r in (tmp_path / "report.md").read_text().splitlines() if "| task |" in r)
    assert rows and all(r.replace("\\|", "").count("|") == header.count("|") for r in rows)
