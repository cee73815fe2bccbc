"""Names eegfast derives from task names are file names on every system: macOS and Windows
compare file names without case (and macOS without Unicode form), and Windows refuses
``<>:"/\\|?*`` in them."""

from __future__ import annotations

import re
import unicodedata

import torch

from eegfast.train import finetune
from eegfast.train.config import RunConfig
from tests.train.test_finetune import make_data, stub_training


def _trained_folders(tmp_path, monkeypatch, tasks: list[str]) -> list[str]:
    """The run folders (relative to the output) that cross_validate trains single-task
    variants in, for a data set of ``tasks``."""
    spec = [(t, f"s{i % 4}", f"{t}-r{i % 4}", (i // 4) % 2) for t in tasks for i in range(16)]
    trained = stub_training(monkeypatch)
    config = RunConfig().with_overrides(
        {"finetune.folds": 2, "finetune.band_power_baseline": False, "finetune.multitask": False}
    )
    arch = {"kind": "classifier", "name": "labram_tiny", "kwargs": {"num_classes": 0}}
    runtime = type("Runtime", (), {"device": torch.device("cpu")})()
    finetune.cross_validate(
        make_data(spec), config, tmp_path, runtime, finetune.Backbone(arch, None, [])
    )
    return [run_dir.relative_to(tmp_path).as_posix() for run_dir in trained]


def test_single_task_run_folders_differ_on_case_insensitive_disks(tmp_path, monkeypatch):
    # "Rest" and "rest" trained in one folder on macOS/Windows: the second's checkpoints
    # replaced the first's and metrics.csv held both; "eyes: closed/open" was no folder name
    # on Windows (":") and two nested ones elsewhere ("/")
    nfd = unicodedata.normalize("NFD", "M\u00fcller")
    tasks = ["Rest", "rest", "eyes: closed/open", "M\u00fcller", nfd, "eegmmidb-1.0.0", "x" * 200]
    trained = _trained_folders(tmp_path, monkeypatch, tasks)
    assert len(trained) == 2 * len(tasks)
    for fold in ("fold0", "fold1"):
        names = [t.split("/", 1)[1] for t in trained if t.startswith(f"{fold}/")]
        folded = {unicodedata.normalize("NFC", n).casefold() for n in names}
        assert len(folded) == len(tasks), names
        for name in names:
            assert re.fullmatch(r"single-[\w.-]+", name) and len(name.encode()) <= 255, name
    # portable names unique whatever the case keep their folder (runs made before resume)
    assert "fold0/single-eegmmidb-1.0.0" in trained


def test_a_portable_task_name_keeps_its_folder():
    assert finetune.single_folder("arith", ["arith", "mi"]) == "single-arith"
    # spaces, brackets, commas are file names everywhere (a task named after its folder)
    assert finetune.single_folder("Sleep Study (2)", ["Sleep Study (2)"]) == (
        "single-Sleep Study (2)"
    )
    for task in ("a.", "a ", "a?", "a|b", "tab\tname"):
        assert finetune.single_folder(task, [task]) != f"single-{task}", task
    assert finetune.single_folder("M\u00fcller", ["M\u00fcller"]) == "single-M\u00fcller"
    assert finetune.single_folder("Rest", ["Rest", "rest"]) != finetune.single_folder(
        "rest", ["Rest", "rest"]
    )


def test_a_run_begun_before_portable_names_resumes_in_its_folder(tmp_path, monkeypatch):
    # A task named after its folder ("Study: sleep", `eegfast prepare`'s default task) trained
    # in fold<i>/single-Study: sleep before the portable names: with the new name, a --resume
    # auto of that run found no checkpoint and trained every such variant again from step 0
    for fold in ("fold0", "fold1"):
        (tmp_path / fold / "single-Study: sleep" / "checkpoints").mkdir(parents=True)
    trained = _trained_folders(tmp_path, monkeypatch, ["Study: sleep", "arith"])
    assert "fold0/single-Study: sleep" in trained and "fold1/single-Study: sleep" in trained
    assert "fold0/single-arith" in trained
    # a new run (no such folder) gets the portable name
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert finetune.single_folder("Study: sleep", ["Study: sleep"], fold_dir=fresh) != (
        "single-Study: sleep"
    )
    # case twins shared one folder on macOS/Windows, and "/" made nested folders: not continued
    for task in ("Rest", "a/b"):
        (fresh / f"single-{task}").mkdir(parents=True)
    assert finetune.single_folder("Rest", ["Rest", "rest"], fold_dir=fresh) != "single-Rest"
    assert finetune.single_folder("a/b", ["a/b"], fold_dir=fresh) != "single-a/b"
    # a name past the file-name limit is no folder (stat's ENAMETOOLONG is not an error here)
    assert finetune.single_folder("x" * 300, ["x" * 300], fold_dir=fresh).startswith("single-x")
