"""Damaged checkpoint files are one-line errors naming the file; predict's window starts are
written in full."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eegfast.models.checkpoint import read_state_dict
from eegfast.train import checkpoint as ckpt
from eegfast.train.commands.predict import write_predictions
from eegfast.train.data import ItemInfo, TrainData


def _state_dict() -> dict[str, torch.Tensor]:
    return {"model": {"w": torch.arange(4000, dtype=torch.float32), "b": torch.zeros(3)}}


def test_a_zip_checkpoint_cut_short_names_the_file(tmp_path):
    """A .pth download cut short in the middle: torch's zip reader raised a bare
    ``OSError: [Errno 22] Invalid argument`` (no file; not a ValueError, so the commands
    showed a traceback)."""
    whole = tmp_path / "whole.pth"
    torch.save(_state_dict(), whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pth: not a readable checkpoint"):
        read_state_dict(cut)


def test_a_text_file_instead_of_a_checkpoint_names_the_file(tmp_path):
    """A text file (an error page saved under the checkpoint's name) whose first byte is a
    pickle memo opcode ('h'): KeyError 101 from the unpickler, naming nothing."""
    text = tmp_path / "labram-base.pth"
    text.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(ValueError, match=r"labram-base\.pth: not a readable checkpoint"):
        read_state_dict(text)


def _run_with_checkpoint(tmp_path: Path) -> Path:
    weights = {"w": torch.arange(4000, dtype=torch.float32)}
    state = {"optimizer": {"m": torch.ones(4000)}, "step": 3}
    return ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 3, weights, state, {})


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_weights_file_of_a_run_names_the_file(tmp_path):
    """safetensors' own error (no file name, no ValueError: a traceback from predict)."""
    checkpoint = _run_with_checkpoint(tmp_path)
    _cut(checkpoint / ckpt.WEIGHTS)
    with pytest.raises(ValueError, match="model.safetensors: cannot read this safetensors file"):
        ckpt.load_weights(tmp_path / "run")
    with pytest.raises(ValueError, match=str(checkpoint / ckpt.WEIGHTS)):
        ckpt.load_weights(checkpoint)


def test_a_truncated_training_state_names_the_file(tmp_path):
    checkpoint = _run_with_checkpoint(tmp_path)
    assert ckpt.load_training_state(checkpoint)["step"] == 3
    _cut(checkpoint / ckpt.STATE)
    with pytest.raises(ValueError, match=r"state\.pt: cannot read this training state"):
        ckpt.load_training_state(checkpoint)
    (checkpoint / ckpt.STATE).unlink()
    with pytest.raises(FileNotFoundError):  # missing: still the error naming it
        ckpt.load_training_state(checkpoint)


def test_a_damaged_meta_json_names_the_file(tmp_path):
    """A meta.json edited by hand into invalid JSON: json's error named no file."""
    checkpoint = _run_with_checkpoint(tmp_path)
    (checkpoint / ckpt.META).write_text('{"step": 3,}')
    meta = str(checkpoint / ckpt.META)
    for call in (
        lambda: ckpt.list_checkpoints(checkpoint.parent),
        lambda: ckpt.latest_checkpoint(checkpoint.parent),
        lambda: ckpt.checkpoint_meta(checkpoint),
        lambda: ckpt.read_meta(tmp_path / "run"),
    ):
        with pytest.raises(ValueError, match=f"{meta}: not a readable checkpoint meta.json"):
            call()
    (checkpoint / ckpt.META).write_text("[3]")
    with pytest.raises(ValueError, match=f"{meta}: expected a JSON object, got list"):
        ckpt.checkpoint_meta(checkpoint)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_predictions_write_window_starts_in_full(tmp_path, command):
    """Starts past 10000 s (a long recording; event windows start at any sample): ``:g``
    kept six digits, 12345.675 s became 12345.7 and 100000.5 s became 100000 (in both
    commands' predictions.csv)."""
    starts = [800, 2_469_135, 20_000_000, 20_000_100, 123_456_789]  # samples at 200 Hz
    recordings = [{"starts": starts}]
    # unlabelled windows of one recording
    items = [ItemInfo(0, "t", "S1", "rec.edf", -1, (0, 1), 4) for _ in starts]
    data = TrainData(SimpleNamespace(recordings=recordings), items, {"t": ["a", "b"]}, [])
    probs = np.tile([[0.25, 0.75]], (len(starts), 1))
    if command == "predict":
        path = write_predictions(
            tmp_path / "predictions.csv", data, {"t": ["a", "b"]}, [("t", probs)]
        )
    else:
        from eegfast.train.commands import evaluate

        scored = [("t", np.arange(len(starts)), probs)]
        path = evaluate.write_predictions(tmp_path / "predictions.csv", data, scored)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["start_s"] for r in rows] == ["4", "12345.675", "100000", "100000.5", "617283.945"]
    assert [round(float(r["start_s"]) * 200) for r in rows] == starts
    assert [r["window"] for r in rows] == [str(w) for w in range(len(starts))]
    assert {r["predicted"] for r in rows} == {"b"}


def test_another_table_size_names_the_config_field_that_sizes_it():
    """A file with an extended electrode table (137 rows) or another time table loaded into
    the reference's 129 x 16 model: the shapes were listed, but not the fields to set."""
    from eegfast.models import create_model
    from eegfast.models.checkpoint import CheckpointMismatchError, load_checkpoint

    extended = create_model("labram_tiny", pos_rows=137, max_patches=8).state_dict()
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(create_model("labram_tiny"), extended)
    message = str(error.value)
    assert "pos_embed: [1, 129, 100] vs [1, 137, 100]" in message
    assert "electrode table has 137 rows, the model's 129" in message
    assert "create_model(name, pos_rows=137)" in message
    assert "create_model(name, max_patches=8)" in message
    report = load_checkpoint(create_model("labram_tiny", pos_rows=137, max_patches=8), extended)
    assert report.ok


def test_resume_from_a_truncated_weights_file_names_the_file(tmp_path):
    """The engine reads a resumed checkpoint's header (shapes) before its weights: a truncated
    model.safetensors gave safetensors' own error there, naming no file."""
    checkpoint = _run_with_checkpoint(tmp_path)
    assert ckpt.weight_shapes(checkpoint)
    _cut(checkpoint / ckpt.WEIGHTS)
    with pytest.raises(ValueError, match=str(checkpoint / ckpt.WEIGHTS)):
        ckpt.weight_shapes(checkpoint)


@pytest.mark.parametrize("damaged", [ckpt.STATE, ckpt.WEIGHTS])
def test_resume_auto_from_a_damaged_checkpoint_names_the_one_before_it(tmp_path, damaged):
    """``--resume auto`` picks the newest checkpoint; when it is damaged the error names it
    and the checkpoint before it, which ``--resume`` can continue from."""
    from tests.train import worker

    run = tmp_path / "run"
    worker.run("finetune", str(run), {"train.checkpoint_every": 4, "train.max_steps": 8})
    newest = ckpt.latest_checkpoint(run / "checkpoints").path
    _cut(newest / damaged)
    with pytest.raises(ValueError) as error:
        worker.run(
            "finetune", str(run), {"train.checkpoint_every": 4, "train.max_steps": 12},
            resume="auto",
        )  # fmt: skip
    message = str(error.value)
    assert str(newest / damaged) in message
    assert f"--resume {run / 'checkpoints' / 'step-00000004'}" in message
    resumed = worker.run(
        "finetune", str(run), {"train.checkpoint_every": 4, "train.max_steps": 12},
        resume=str(run / "checkpoints" / "step-00000004"),
    )  # fmt: skip
    assert resumed.step == 12
