"""Audit of the commands on boundary data: electrodes past the model's embedding table and
one-patch windows, refused up front with one line naming the folder, what is wrong and the fix
(they failed at the first batch holding them, with the model's message naming neither the
folder nor the electrodes, for hybrid pretraining possibly steps and checkpoints into a run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eegfast.cli import main as cli
from eegfast.train.data import check_table_rows, load_data

FAST = ["--set", "train.max_steps=1", "--set", "train.batch_size=2", "--no-progress"]


def _folder(
    root: Path, electrodes: list[str], rows: list[int], *, seconds: int = 2, recordings: int = 2
) -> Path:
    """A prepared folder as ``eegfast prepare`` writes it, built by hand: ``recordings``
    recordings (subject ``S<k>``, class ``k % 2`` of task ``mi``) of two random windows of
    ``seconds`` s each, of the ``electrodes`` whose embedding ``rows`` are given (as prepare
    with ``--allow-extended`` writes rows past the 129-row table)."""
    (root / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k in range(recordings):
        shape = (2, len(electrodes), seconds, 200)
        np.save(root / "shards" / f"r{k}.npy", rng.standard_normal(shape).astype(np.float32))
        entries.append(
            {
                "file": f"r{k}.edf",
                "subject": f"S{k}",
                "session": "",
                "task": "mi",
                "electrodes": electrodes,
                "input_chans": [0, *rows],
                "shard": f"shards/r{k}.npy",
                "dtype": "float32",
                "window_seconds": seconds,
                "starts": [0, 200 * seconds],
                "n_windows": 2,
                "sfreq_in": 200.0,
                "labels": [k % 2] * 2,
            }
        )
    index = {
        "format_version": 1,
        "window_seconds": seconds,
        "tasks": {"mi": {"labels": ["left", "right"]}},
        "recordings": entries,
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``ok``: C3, C4 in 2-s windows; ``extended``: C3 and the bipolar FP2-F4 (row 133, past
    the reference's 129 rows); ``one_patch``: C3, C4 in 1-s windows; ``tok``: a one-step
    tokenizer run on ``ok``."""
    root = tmp_path_factory.mktemp("boundary")
    found = {
        "ok": _folder(root / "ok", ["C3", "C4"], [40, 44]),
        "extended": _folder(root / "extended", ["C3", "FP2-F4"], [40, 133]),
        "one_patch": _folder(root / "one_patch", ["C3", "C4"], [40, 44], seconds=1),
    }
    tok = root / "tok"
    argv = ["tokenizer", "--data", str(found["ok"]), "--out", str(tok), "--model", "vqnsp_tiny"]
    assert cli([*argv, *FAST]) == 0
    found["tok"] = tok
    return found


def _refused_for_fp2_f4(capsys, folder: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--data {folder}:" in err and "'FP2-F4'" in err, err
    assert "129 rows" in err and "--allow-extended" in err, err
    return err


def test_tokenizer_refuses_electrodes_past_its_table(folders, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "--data", str(folders["extended"]), "--out", str(out)]
    assert cli([*argv, "--model", "vqnsp_tiny", *FAST]) == 2
    assert "vqnsp_tiny" in _refused_for_fp2_f4(capsys, folders["extended"])
    assert not (out / "checkpoints").exists()


def test_pretrain_refuses_electrodes_past_its_table(folders, tmp_path, capsys):
    argv = ["pretrain", "--data", str(folders["extended"]), "--out", str(tmp_path / "pre")]
    argv += ["--tokenizer", str(folders["tok"]), "--model", "labram_tiny_pretrain"]
    assert cli([*argv, *FAST]) == 2
    assert "labram_tiny_pretrain" in _refused_for_fp2_f4(capsys, folders["extended"])


def test_finetune_refuses_electrodes_past_its_table_before_any_fold(folders, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "--data", str(folders["extended"]), "--out", str(out)]
    argv += ["--set", "model.name=labram_tiny", "--set", "finetune.folds=2"]
    assert cli([*argv, *FAST]) == 2
    assert "labram_tiny" in _refused_for_fp2_f4(capsys, folders["extended"])
    assert not (out / "fold0").exists()


def test_linear_probe_refuses_electrodes_past_the_backbones_table(folders, tmp_path, capsys):
    pre = tmp_path / "pre"
    argv = ["pretrain", "--data", str(folders["ok"]), "--out", str(pre)]
    argv += ["--tokenizer", str(folders["tok"]), "--model", "labram_tiny_pretrain"]
    assert cli([*argv, *FAST]) == 0
    capsys.readouterr()
    argv = ["evaluate", "--model", str(pre), "--data", str(folders["extended"])]
    assert cli([*argv, "--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--data {folders['extended']}:" in err[0] and "FP2-F4" in err[0]


def test_check_table_rows_names_the_folder_and_passes_a_table_that_holds_them(folders):
    data = load_data([folders["ok"], folders["extended"]])
    check_table_rows(data, 137, "an extended model")  # every row fits
    check_table_rows(data, None, "a model without a table")
    with pytest.raises(ValueError, match=r"extended: electrodes \['FP2-F4'\] have no embedding"):
        check_table_rows(data, 129, "the model")


def test_hybrid_pretraining_refuses_one_patch_windows_before_training(folders, tmp_path, capsys):
    """With a folder of 2-s windows beside one of 1-s windows, the run failed at the first
    batch of 1-s windows: with seed 1 in one trial, after writing step 1's checkpoint."""
    out = tmp_path / "pre"
    argv = ["pretrain", "--data", str(folders["ok"]), str(folders["one_patch"])]
    argv += ["--out", str(out), "--tokenizer", str(folders["tok"])]
    argv += ["--model", "labram_tiny_pretrain", "--objective", "hybrid"]
    assert cli([*argv, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--data {folders['one_patch']}: 1-s windows" in err
    assert "--window 2" in err and "--objective masked" in err
    assert not (out / "checkpoints").exists()


def test_check_table_rows_names_the_electrodes_as_the_recordings_do(tmp_path):
    """Rows past the table were named by LaBraM's list (FP2-F4 for row 133, "row 300" past
    it), not as the recordings name them, which is what --channels takes: a recording whose
    channel ``Fp2-F4 bip`` got row 133 was told about ``FP2-F4``. `predict` named them as
    recorded; it shares this check now."""
    data = load_data([_folder(tmp_path / "x", ["C3", "Fp2-F4 bip", "X9"], [40, 133, 300])])
    with pytest.raises(ValueError, match=r"x: electrodes \['Fp2-F4 bip', 'X9'\] have no embed"):
        check_table_rows(data, 129, "the model")
    with pytest.raises(ValueError, match=r"electrodes \['X9'\] have no embedding row in the mod"):
        check_table_rows(data, 137, "the model")
