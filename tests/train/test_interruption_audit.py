"""Commands stopped at awkward moments (an exception injected at a known write, standing for
Ctrl-C or a kill there) leave nothing half-replaced that a later command takes for complete,
and bad input with --overwrite does not lose what an earlier run wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eegfast.fileio
from eegfast.cli import main as cli
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model
from eegfast.train.commands.generate import GenerateError, load_prompt, write_output
from tests.train._sample import prepare_windows, sample_recording_cut

# --- generate: a .npy and its .json sidecar ------------------------------------------------


def test_generate_stopped_between_npy_and_sidecar_leaves_no_mismatched_pair(tmp_path, monkeypatch):
    """--overwrite stopped after the new .npy and before its sidecar left the new signal
    beside the old sidecar: a prompt read of the file took the old channel names (Fz, Cz) for
    the new rows (C3, C4) without a word."""
    path = tmp_path / "out.npy"
    write_output(path, np.zeros((2, 400), np.float32), ["Fz", "Cz"])

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eegfast.fileio, "write_json_atomic", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_output(path, np.ones((2, 400), np.float32), ["C3", "C4"], overwrite=True)
    monkeypatch.undo()
    assert np.load(path)[0, 0] == 100.0  # the new signal (µV) is in place
    with pytest.raises(GenerateError, match="needs --channels"):
        load_prompt(path, prompt_seconds=2)
    # and the pair is whole again once a rerun finishes
    write_output(path, np.ones((2, 400), np.float32), ["C3", "C4"], overwrite=True)
    assert load_prompt(path, prompt_seconds=2).names == ("C3", "C4")


# --- upcycle: --overwrite replaces the earlier model only with a good one ---------------------


@pytest.fixture
def pretrained(tmp_path):
    """A (random) masked-pretraining checkpoint of labram_tiny."""
    arch = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}
    torch.manual_seed(0)
    weights = build_model(arch).state_dict()
    ckpt.save_checkpoint(
        tmp_path / "pre" / "checkpoints", 10, weights, {"step": 10}, {"arch": arch}
    )
    return tmp_path / "pre"


def _upcycle(model, out, *extra) -> int:
    return cli(["upcycle", "--model", str(model), "--out", str(out), *extra])


def _experts(out) -> tuple[int, int]:
    """num_experts of the checkpoint and of upcycle.json in ``out``."""
    from_json = json.loads((out / "upcycle.json").read_text())["arch"]["upcycle"]["num_experts"]
    return ckpt.read_meta(out)["arch"]["upcycle"]["num_experts"], from_json


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--set", "upcycle.layers=[5]"], "upcycle.layers: [5] out of range"),
        (["--model", "no-such-run"], "no-such-run"),
    ],
)
def test_upcycle_overwrite_with_bad_input_keeps_the_earlier_model(
    pretrained, tmp_path, capsys, bad, message
):
    """--overwrite cleared --out when it was claimed, before the model was read and checked: a
    typo in --model or upcycle.layers deleted the earlier upcycled checkpoint, then failed."""
    out = tmp_path / "moe"
    assert _upcycle(pretrained, out, "--experts", "2") == 0
    capsys.readouterr()
    model = bad[1] if bad[0] == "--model" else pretrained
    extra = bad[2:] if bad[0] == "--model" else bad
    assert _upcycle(model, out, "--experts", "3", "--overwrite", *extra) == 2
    assert message in capsys.readouterr().err
    assert _experts(out) == (2, 2)
    assert _upcycle(pretrained, out, "--experts", "3") == 2  # still refused without --overwrite
    assert "holds an earlier run" in capsys.readouterr().err


def test_upcycle_stopped_after_its_checkpoint_leaves_no_summary_of_the_earlier_model(
    pretrained, tmp_path, monkeypatch
):
    """upcycle.json is not one of the artefacts --overwrite removes: a run stopped between the
    new checkpoint and the new upcycle.json left the earlier model's summary (its experts,
    parameters) beside the new checkpoint."""
    out = tmp_path / "moe"
    assert _upcycle(pretrained, out, "--experts", "2") == 0
    real_save = ckpt.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    assert _upcycle(pretrained, out, "--experts", "3", "--overwrite") == 130
    monkeypatch.undo()
    assert ckpt.read_meta(out)["arch"]["upcycle"]["num_experts"] == 3
    assert not (out / "upcycle.json").exists()
    assert _upcycle(pretrained, out, "--experts", "3", "--overwrite") == 0
    assert _experts(out) == (3, 3)


# --- quickstart: its report describes the runs beside it ------------------------------------


def test_a_stopped_quickstart_leaves_no_report_of_the_runs_it_replaced(tmp_path, monkeypatch):
    """A second quickstart into the same --out stopped in a training step (Ctrl-C: "run the
    same command again") kept the first one's report.md and plot beside runs that the steps
    had already replaced with --overwrite: the folder read as a finished quickstart."""
    from eegfast.datasets import SampleDataError, sample
    from tests.train.test_cli import _fake_steps

    try:  # wherever the sample is (EEGFAST_DATA, the cache, ../shared/data): a folder of all six
        data = sample(download=False)[0].parent
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")
    out = tmp_path / "qs"
    out.mkdir()
    for name in ("report.md", "pretraining_loss.png"):
        (out / name).write_text("the earlier quickstart's")
    calls = _fake_steps(monkeypatch, lambda argv: 130 if argv[0] == "pretrain" else 0)
    assert cli(["quickstart", "--data", str(data), "--out", str(out)]) == 130
    assert [argv[0] for argv in calls][-2:] == ["tokenizer", "pretrain"]
    assert not (out / "report.md").exists() and not (out / "pretraining_loss.png").exists()


# --- evaluate: the report files of one evaluation ----------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """Subject00's two 24-s cuts as rest/task (4-s windows) and a model fine-tuned on them for
    2 steps (2 folds, by recording)."""
    root = tmp_path_factory.mktemp("interrupted_evaluate")
    cuts = [sample_recording_cut(f"Subject00_{i}.edf", 24.0, root) for i in (1, 2)]
    rules = ("--filename-rule", "_1_cut$=rest", "--filename-rule", "_2_cut$=task")
    data = prepare_windows(root / "arith", [f"arith={c}" for c in cuts], *rules)
    ft = root / "ft"
    argv = ["finetune", "--data", str(data), "--out", str(ft), "--folds", "2", "--no-progress"]
    for item in ("model.name=labram_tiny", "train.max_steps=2", "train.batch_size=4"):
        argv += ["--set", item]
    assert cli(argv) == 0
    return data, ft / "fold0" / "single-arith"


def test_evaluate_stopped_while_writing_leaves_no_file_of_an_earlier_evaluation(
    fine_tuned, tmp_path, monkeypatch
):
    """The report files are written one by one over those of an earlier evaluation in --out:
    stopped half way, the folder held this evaluation's results.csv and report.md beside the
    earlier one's summary.json, predictions.npz and predictions.csv (another model's, say)."""
    import eegfast.train.finetune as finetune

    data, model = fine_tuned
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--include-training-windows", "--no-progress"]
    assert cli(argv) == 0
    written = [p for p in out.iterdir() if p.is_file()]
    assert {"report.md", "summary.json", "predictions.csv"} <= {p.name for p in written}
    for path in written:  # marked as the earlier evaluation's
        path.write_text("earlier evaluation")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "write_json_atomic", stopped)  # summary.json
    assert cli(argv) == 130
    left = {p.name for p in out.iterdir() if p.is_file() and "earlier" in p.read_text("latin-1")}
    assert not left
    assert (out / "report.md").is_file()  # written before summary.json: this evaluation's
