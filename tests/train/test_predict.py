"""``eegfast predict``: a fine-tuned model on prepared windows, labelled or not, on the real
sample (cuts of it), and its refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eegfast.cli import main as cli
from tests.train._sample import prepare_windows, sample_recording_cut

FIXED = ["recording", "subject", "window", "start_s", "task", "predicted", "label"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two labelled folders (task ``arith``: rest/task of Subject00; task ``other``: calm/busy
    of Subject01; 24-s cuts, 4-s windows), an unlabelled folder (task ``new``: Subject00's first
    cut again), and a two-head model fine-tuned on the labelled ones for 2 steps."""
    root = tmp_path_factory.mktemp("predict")
    cuts = {
        (s, i): sample_recording_cut(f"Subject0{s}_{i}.edf", 24.0, root)
        for s in (0, 1)
        for i in (1, 2)
    }
    arith = prepare_windows(
        root / "arith",
        [f"arith={cuts[0, 1]}", f"arith={cuts[0, 2]}"],
        *("--filename-rule", "_1_cut$=rest", "--filename-rule", "_2_cut$=task"),
    )
    other = prepare_windows(
        root / "other",
        [f"other={cuts[1, 1]}", f"other={cuts[1, 2]}"],
        *("--filename-rule", "_1_cut$=calm", "--filename-rule", "_2_cut$=busy"),
    )
    new = prepare_windows(root / "new", [f"new={cuts[0, 1]}"])
    ft = root / "ft"
    argv = ["finetune", "--data", str(arith), str(other), "--out", str(ft), "--folds", "2"]
    for item in (
        "model.name=labram_tiny",
        "train.max_steps=2",
        "train.batch_size=4",
        "finetune.band_power_baseline=false",
        "finetune.single_task_baseline=false",
    ):
        argv += ["--set", item]
    assert cli([*argv, "--no-progress"]) == 0
    return {
        "arith": arith,
        "other": other,
        "new": new,
        "ft": ft,
        "model": ft / "fold0" / "multitask",
    }


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _predict(runs, out: Path, *extra: str, data=("arith", "other", "new"), model=None) -> int:
    argv = ["predict", "--model", str(model or runs["model"]), "--data"]
    argv += [str(runs[d]) if d in runs else str(d) for d in data]
    return cli([*argv, "--out", str(out), *extra, "--no-progress"])


def test_predict_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["predict", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "eegfast predict" in out and "--model" in out and "--batch-size" in out


def test_every_window_gets_the_probabilities_evaluate_gives(runs, tmp_path, capsys):
    """Labelled and unlabelled windows, every head; the labelled ones with the same
    probabilities as ``eegfast evaluate`` gives them; columns, window positions, labels."""
    out = tmp_path / "pred"
    assert _predict(runs, out, "--batch-size", "5") == 0
    printed = capsys.readouterr().out
    assert (
        "predicted 30 windows of 5 recording(s) with 2 head(s) (arith, other): 60 rows" in printed
    )
    columns, rows = _rows(out / "predictions.csv")
    assert columns == FIXED + ["p_rest", "p_task", "p_busy", "p_calm"]
    assert len(rows) == 60
    for row in rows:
        own = ["p_rest", "p_task"] if row["task"] == "arith" else ["p_busy", "p_calm"]
        others = [c for c in columns[len(FIXED) :] if c not in own]
        probs = np.array([float(row[c]) for c in own])
        assert abs(probs.sum() - 1) < 1e-4 and all(row[c] == "" for c in others)
        assert row["predicted"] == own[int(np.argmax(probs))].removeprefix("p_")
        assert float(row["start_s"]) == 4 * int(row["window"])
    # the unlabelled folder: every window, no label, predictions for both heads
    # (and each head on the other task's windows: no label of its task there)
    assert sum(1 for r in rows if not r["label"]) == 60 - 24
    new_rows = {(r["task"], r["window"]): r for r in rows[24:30] + rows[54:60]}
    assert {r["subject"] for r in new_rows.values()} == {"Subject00"}
    assert sorted(int(w) for t, w in new_rows if t == "arith") == list(range(6))
    # new's windows are arith's first recording again: the same probabilities, row for row
    for r in rows[:6]:
        assert r["label"] == "rest"
        twin = new_rows[("arith", r["window"])]
        assert r["recording"] == twin["recording"]
        assert np.allclose(float(r["p_rest"]), float(twin["p_rest"]), atol=1e-5)
    # labels only for the windows of the head's own task
    assert {
        r["label"] for r in rows if r["task"] == "other" and r["recording"].endswith("00_2_cut.fif")
    } == {""}
    assert {r["label"] for r in rows[30:54] if "Subject01" in r["recording"]} == {"calm", "busy"}

    evaluation = tmp_path / "eval"
    argv = ["evaluate", "--model", str(runs["model"]), "--data", str(runs["arith"])]
    argv += [str(runs["other"]), "--out", str(evaluation), "--include-training-windows"]
    assert cli([*argv, "--no-progress"]) == 0
    _, scored = _rows(evaluation / "predictions.csv")
    assert len(scored) == 24
    expected: dict[tuple[str, str], list[np.ndarray]] = {}
    for r in scored:
        expected.setdefault((r["task"], r["recording"]), []).append(
            np.array(r["probabilities"].split(), dtype=float)
        )
    got: dict[tuple[str, str], list[np.ndarray]] = {}
    for r in rows:
        if r["label"]:
            own = ["p_rest", "p_task"] if r["task"] == "arith" else ["p_busy", "p_calm"]
            got.setdefault((r["task"], r["recording"]), []).append(
                np.array([float(r[c]) for c in own])
            )
    assert got.keys() == expected.keys()
    for key, probs in expected.items():
        np.testing.assert_allclose(np.stack(got[key]), np.stack(probs), atol=2e-5)


def test_tasks_picks_heads_and_an_unknown_one_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "pred"
    assert _predict(runs, out, "--tasks", "other", data=("new",)) == 0
    columns, rows = _rows(out / "predictions.csv")
    assert columns == FIXED + ["p_busy", "p_calm"]
    assert [r["task"] for r in rows] == ["other"] * 6 and {r["label"] for r in rows} == {""}
    capsys.readouterr()
    assert _predict(runs, tmp_path / "none", "--tasks", "other,nope", data=("new",)) == 2
    err = capsys.readouterr().err
    assert "--tasks: nope" in err and "its heads are arith, other" in err
    assert not (tmp_path / "none").exists()


def _fake_checkpoint(folder: Path, arch: dict) -> Path:
    checkpoint = folder / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(checkpoint / "model.safetensors"))
    (checkpoint / "meta.json").write_text(json.dumps({"arch": arch, "command": arch["kind"]}))
    return folder


@pytest.mark.parametrize(
    "arch",
    [
        {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {}},
        {"kind": "classifier", "name": "labram_tiny", "kwargs": {}, "upcycle": {"num_experts": 2}},
    ],
)
def test_a_backbone_without_heads_is_refused(arch, runs, tmp_path, capsys):
    model = _fake_checkpoint(tmp_path / "backbone", arch)
    assert _predict(runs, tmp_path / "out", data=("new",), model=model) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eegfast predict: --model {model}: a '{arch['kind']}' checkpoint")
    assert "fine-tune it first" in err and "eegfast evaluate" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_fine_tuning_folder_names_its_models(runs, tmp_path, capsys):
    assert _predict(runs, tmp_path / "out", data=("new",), model=runs["ft"]) == 2
    err = capsys.readouterr().err
    assert "a fine-tuning folder" in err and str(runs["ft"] / "fold0" / "multitask") in err


def test_out_checks(runs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert _predict(runs, afile, data=("new",)) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"eegfast predict: --out {afile}: exists and is not a folder"
    )
    assert _predict(runs, afile / "sub", data=("new",)) == 2
    assert f"eegfast predict: --out {afile / 'sub'}:" in capsys.readouterr().err
    assert afile.read_text() == "keep me"
    out = tmp_path / "pred"
    out.mkdir()
    (out / "predictions.csv").write_text("earlier\n")
    assert _predict(runs, out, data=("new",)) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: holds an earlier predictions.csv" in err and "--overwrite" in err
    assert (out / "predictions.csv").read_text() == "earlier\n"
    assert _predict(runs, out, "--batch-size", "0", "--overwrite", data=("new",)) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert _predict(runs, out, "--overwrite", data=("new",)) == 0
    assert len(_rows(out / "predictions.csv")[1]) == 12
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def _edited_copy(folder: Path, to: Path, edit) -> Path:
    shutil.copytree(folder, to)
    index = json.loads((to / "index.json").read_text())
    edit(index)
    (to / "index.json").write_text(json.dumps(index))
    return to


def _far_electrode(index: dict) -> None:
    index["recordings"][0]["input_chans"][-1] = 131
    index["recordings"][0]["electrodes"][-1] = "FAR"


def _other_scale(index: dict) -> None:
    index["settings"]["preprocess"]["scale"] = 1e6


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _far_electrode,
            "electrodes ['FAR'] have no embedding row in the model (its table has 129 rows: "
            "the cls token and 128 electrodes); prepare the data again without",
        ),
        (_other_scale, "amplitudes scaled by 1e+06 (volts to stored units), the model was"),
    ],
)
def test_data_the_model_cannot_take_is_refused(edit, message, runs, tmp_path, capsys):
    bad = _edited_copy(runs["new"], tmp_path / "bad", edit)
    assert _predict(runs, tmp_path / "out", data=("new", bad)) == 2
    err = capsys.readouterr().err
    assert f"eegfast predict: --data {bad}: {message}" in err
    assert not (tmp_path / "out").exists()


def test_other_window_length_is_refused_other_filters_warn(runs, tmp_path, capsys):
    cut = json.loads((runs["new"] / "index.json").read_text())["recordings"][0]["file"]
    short = tmp_path / "short"
    assert (
        cli(["prepare", f"new={cut}", "--out", str(short), "--window", "2", "--no-progress"]) == 0
    )
    capsys.readouterr()
    assert _predict(runs, tmp_path / "out", data=(short,)) == 2
    err = capsys.readouterr().err
    assert f"--data {short}: 2-s windows, the model was fine-tuned on 4-s windows" in err

    def band(index: dict) -> None:
        index["settings"]["preprocess"]["h_freq"] = 40.0

    narrow = _edited_copy(runs["new"], tmp_path / "narrow", band)
    assert _predict(runs, tmp_path / "out", data=(narrow,)) == 0
    printed = capsys.readouterr().out
    assert f"warning: --data {narrow} was prepared with other settings" in printed
    assert "h_freq 40.0 (fine-tuned with 75.0)" in printed


def _moved_model(runs, to: Path, *, recorded: bool) -> Path:
    """A copy of the model whose training folders are gone; ``recorded=False``: a checkpoint
    of an eegfast that did not record its classes and data settings either."""
    shutil.copytree(runs["model"], to)
    for meta_path in to.glob("checkpoints/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["config"]["data"]["roots"] = [str(to.parent / "moved")]
        if not recorded:
            for key in ("label_names", "window_seconds", "preprocess"):
                del meta[key]
        meta_path.write_text(json.dumps(meta))
    return to


def test_class_names_and_settings_come_from_the_checkpoint(runs, tmp_path, capsys):
    """With the training folders gone, the checkpoint still names the heads' classes (in
    their order) and keeps the data settings the model was fine-tuned with."""
    from eegfast.train.checkpoint import read_meta

    assert read_meta(runs["model"])["route_by_task"] is False  # not upcycled: no task ids
    model = _moved_model(runs, tmp_path / "model", recorded=True)
    out = tmp_path / "pred"
    assert _predict(runs, out, data=("new",), model=model) == 0
    assert "note:" not in capsys.readouterr().out
    columns, _ = _rows(out / "predictions.csv")
    assert columns == FIXED + ["p_rest", "p_task", "p_busy", "p_calm"]
    bad = _edited_copy(runs["new"], tmp_path / "bad", _other_scale)
    assert _predict(runs, tmp_path / "out", data=(bad,), model=model) == 2
    assert "amplitudes scaled by 1e+06 (volts to stored units)" in capsys.readouterr().err


def test_class_names_when_the_training_folders_are_gone(runs, tmp_path, capsys):
    """Older checkpoints: class names come from the folders the model was fine-tuned on;
    without them from --data where it has the task with as many classes, else class0, class1."""
    model = _moved_model(runs, tmp_path / "model", recorded=False)
    out = tmp_path / "pred"
    assert _predict(runs, out, data=("arith", "new"), model=model) == 0
    printed = capsys.readouterr().out
    assert "note: task 'arith': the folders the model was fine-tuned on cannot be read" in printed
    assert "note: task 'other': class names unknown" in printed
    columns, rows = _rows(out / "predictions.csv")
    assert columns == FIXED + ["p_rest", "p_task", "p_class0", "p_class1"]
    assert {r["predicted"] for r in rows if r["task"] == "other"} <= {"class0", "class1"}


def test_data_tasks_picks_the_windows_predicted(runs, tmp_path):
    """--set data.tasks was dropped without a word: every folder's windows were predicted."""
    out = tmp_path / "pred"
    assert _predict(runs, out, "--set", "data.tasks=[arith]", data=("arith", "new")) == 0
    _, rows = _rows(out / "predictions.csv")
    only_arith = _rows_of(runs, tmp_path / "arith", "arith")
    assert rows and len(rows) == len(only_arith)  # (the new folder's windows left out)


def _rows_of(runs, out: Path, folder: str) -> list[dict[str, str]]:
    assert _predict(runs, out, data=(folder,)) == 0
    return _rows(out / "predictions.csv")[1]


def test_evaluate_writes_no_features_for_data_the_model_cannot_take(runs, tmp_path, capsys):
    """--export-features wrote its .npz before the data was refused (another amplitude
    scale): a features file of windows the model was then not evaluated on."""
    bad = _edited_copy(runs["arith"], tmp_path / "bad", _other_scale)
    features = tmp_path / "features.npz"
    argv = ["evaluate", "--model", str(runs["model"]), "--data", str(bad)]
    argv += ["--out", str(tmp_path / "ev"), "--export-features", str(features), "--no-progress"]
    assert cli(argv) == 2
    assert "amplitudes scaled by 1e+06" in capsys.readouterr().err
    assert not features.exists()


def _count_backbone_passes(monkeypatch) -> list[int]:
    """Count the backbone's forward passes (LaBraM.forward_features calls), one per batch."""
    from eegfast.models.labram import LaBraM

    calls = [0]
    real = LaBraM.forward_features

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LaBraM, "forward_features", counted)
    return calls


def _scored(monkeypatch) -> dict[str, np.ndarray]:
    """The probabilities predict writes, per task, as computed (before formatting)."""
    from eegfast.train.commands import predict as predict_cmd

    scored: dict[str, np.ndarray] = {}
    real = predict_cmd.write_predictions

    def spied(path, data, names, rows):
        scored.update({task: probs for task, probs in rows})
        return real(path, data, names, rows)

    monkeypatch.setattr(predict_cmd, "write_predictions", spied)
    return scored


def test_a_model_without_task_routing_runs_its_backbone_once_per_batch(runs, tmp_path, monkeypatch):
    """Two heads over features that do not depend on the task: one backbone pass per batch
    (it was one per head), and the same probabilities, to the bit, as each head's own full
    forward (finetune's predict, as evaluate takes it)."""
    from eegfast.train.arch import load_trained
    from eegfast.train.data import load_data
    from eegfast.train.finetune import predict

    calls = _count_backbone_passes(monkeypatch)
    scored = _scored(monkeypatch)
    assert _predict(runs, tmp_path / "one", "--batch-size", "5", "--tasks", "arith") == 0
    one_head = calls[0]
    calls[0] = 0
    assert _predict(runs, tmp_path / "two", "--batch-size", "5") == 0
    assert one_head > 0 and calls[0] == one_head  # one pass per batch for both heads
    assert list(scored) == ["arith", "other"]
    model, _ = load_trained(runs["model"])
    data = load_data([runs[d] for d in ("arith", "other", "new")])
    for task, probs in scored.items():  # (the command's chunks of --batch-size windows)
        alone = [
            predict(model, data, chunk, task, torch.device("cpu"), task_id=None, batch_size=5)[0]
            for chunk in np.array_split(np.arange(len(data)), range(5, len(data), 5))
        ]
        assert np.array_equal(probs, np.concatenate(alone)), task
    _, rows = _rows(tmp_path / "two" / "predictions.csv")
    _, first = _rows(tmp_path / "one" / "predictions.csv")
    # arith's rows as when predicted alone (which has no columns for other's classes)
    assert [{k: r[k] for k in first[0]} for r in rows[: len(first)]] == first


def test_a_task_routed_model_runs_its_backbone_once_per_task(runs, tmp_path, monkeypatch):
    """Routed by task id, the features differ per task: one pass per task and batch, each
    with its task's id."""
    routed = tmp_path / "routed"
    shutil.copytree(runs["model"], routed)
    for meta_path in routed.glob("checkpoints/step-*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["route_by_task"] = True  # (its dense blocks take task ids and ignore them)
        meta_path.write_text(json.dumps(meta))
    task_names = json.loads(next(routed.glob("checkpoints/step-*/meta.json")).read_text())[
        "task_names"
    ]
    calls = _count_backbone_passes(monkeypatch)
    from eegfast.models.labram import LaBraM

    counted = LaBraM.forward_features
    ids: list[int] = []

    def with_ids(self, *args, task_id=None, **kwargs):
        ids.append(None if task_id is None else int(task_id[0]))
        return counted(self, *args, task_id=task_id, **kwargs)

    monkeypatch.setattr(LaBraM, "forward_features", with_ids)
    assert _predict(runs, tmp_path / "one", "--batch-size", "5", "--tasks", "arith") == 0
    one_head = calls[0]
    calls[0] = 0
    ids.clear()
    assert _predict(runs, tmp_path / "two", "--batch-size", "5", model=routed) == 0
    assert calls[0] == 2 * one_head
    expected = [task_names.index(t) for t in ("arith", "other")]
    assert ids == [expected[0]] * one_head + [expected[1]] * one_head
