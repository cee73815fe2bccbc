"""Task heads of the multi-task classifier under task names a module name cannot be."""

from __future__ import annotations

import torch

from eegfast.cli import main as cli
from eegfast.train.arch import MultiTaskClassifier, build_model, head_key
from tests.train._sample import sample_recording_cut
from tests.train.fakes import TinyClassifier


def test_task_names_that_module_names_cannot_be_get_heads_of_their_own():
    """A task named after its folder (``eegmmidb-1.0.0``) or ``train`` crashed the model's
    construction (torch refuses "." and ModuleDict's own attribute names); plain names keep
    their state-dict keys."""
    tasks = {"eegmmidb-1.0.0": 2, "ds.v2": 3, "train": 2, "keys": 2, "arith": 4}
    torch.manual_seed(0)
    model = MultiTaskClassifier(TinyClassifier(num_classes=0), tasks, 16)
    keys = {head_key(t) for t in tasks}
    assert len(keys) == len(tasks) and head_key("arith") == "arith"
    assert "heads.arith.weight" in model.state_dict()
    assert all("." not in key for key in keys)
    x = torch.randn(2, 3, 2, 200)
    for task, classes in tasks.items():
        assert model(x, task=task).shape == (2, classes)
    rebuilt = MultiTaskClassifier(TinyClassifier(num_classes=0), tasks, 16)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x, task="ds.v2"), model(x, task="ds.v2"))
    assert head_key("ds.v2") != head_key("ds_v2")  # the digest keeps such names apart


def test_task_names_of_attributes_torch_sets_on_every_module_get_heads_of_their_own():
    """``training`` (a plausible folder name, and so task name), ``_modules`` or
    ``_parameters`` are set on each module instance, not on the ModuleDict class: such a task
    crashed the model's construction with torch's KeyError "attribute already exists"."""
    tasks = {"training": 2, "_modules": 3, "_parameters": 2, "_buffers": 2}
    torch.manual_seed(0)
    model = MultiTaskClassifier(TinyClassifier(num_classes=0), tasks, 16)
    x = torch.randn(2, 3, 2, 200)
    for task, classes in tasks.items():
        assert head_key(task) != task
        assert model(x, task=task).shape == (2, classes)
    assert model.training and len(model.heads) == len(tasks)


def test_finetune_on_a_task_named_with_dots(tmp_path):
    """``eegfast prepare`` takes the task name from the folder, and downloads are named like
    ``eegmmidb-1.0.0``: fine-tuning on it ended in a KeyError traceback."""
    cuts = [sample_recording_cut(f"Subject00_{i}.edf", 24.0, tmp_path) for i in (1, 2)]
    data = tmp_path / "prepared"
    argv = ["prepare", *[f"eegmmidb-1.0.0={c}" for c in cuts], "--out", str(data)]
    argv += ["--window", "4", "--filename-rule", "_1_cut$=rest", "--filename-rule", "_2_cut$=task"]
    assert cli([*argv, "--no-progress"]) == 0
    out = tmp_path / "ft"
    argv = ["finetune", "--data", str(data), "--out", str(out), "--folds", "2"]
    for item in ("model.name=labram_tiny", "train.max_steps=1", "train.batch_size=4",
                 "finetune.band_power_baseline=false"):  # fmt: skip
        argv += ["--set", item]
    assert cli([*argv, "--no-progress"]) == 0
    model = build_model(
        {"kind": "classifier", "name": "labram_tiny", "kwargs": {"num_classes": 0},
         "heads": {"eegmmidb-1.0.0": 2}}
    )  # fmt: skip
    assert list(model.head_keys) == ["eegmmidb-1.0.0"]
    assert (out / "fold0" / "single-eegmmidb-1.0.0" / "checkpoints").is_dir()


def test_routing_by_task_follows_what_fine_tuning_recorded():
    """A task-routed MoE fine-tuned with upcycle.task_routing=false trained without task ids;
    evaluate and predict gave them anyway (they looked at the architecture only)."""
    from eegfast.train.arch import routes_by_task

    upcycled = {"arch": {"upcycle": {"num_experts": 2, "num_tasks": 2}}}
    assert routes_by_task(upcycled)  # checkpoints from before the record: as before
    assert not routes_by_task({**upcycled, "route_by_task": False})
    assert routes_by_task({**upcycled, "route_by_task": True})
    assert not routes_by_task({"arch": {"upcycle": {"num_experts": 2}}})
    assert not routes_by_task({"arch": {}})
