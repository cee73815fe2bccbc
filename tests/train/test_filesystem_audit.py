"""A checkpoint write that fails (a full disk) leaves the old checkpoint, no temporary, and is
one line naming the checkpoint from the training commands, not a traceback."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import SafetensorError

from eegfast.train import checkpoint as ckpt
from eegfast.train.commands.common import run_command


def _full_torch_save(*args, **kwargs):
    # what torch's zip writer raises when the disk fills up under it
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _full_save_file(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device")


def _full_write_text(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "target, fake, reason",
    [
        ("save_file", _full_save_file, "No space left on device"),
        ("torch_save", _full_torch_save, "unexpected pos 704 vs 598"),
        ("meta", _full_write_text, "No space left on device"),
    ],
)
def test_a_full_disk_keeps_the_old_checkpoint_and_names_the_new_one(
    tmp_path, monkeypatch, target, fake, reason
):
    """Saving step 3 again (the final save after a periodic one) on a full disk: safetensors
    and torch.save raised their own errors (SafetensorError, RuntimeError "unexpected pos"),
    naming no file, and no OSError, so the commands showed a traceback."""
    folder = tmp_path / "run" / "checkpoints"
    weights = {"w": torch.arange(10, dtype=torch.float32)}
    old = ckpt.save_checkpoint(folder, 3, weights, {"step": 3}, {"metric": 1.0})
    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", fake)
    elif target == "torch_save":
        monkeypatch.setattr(ckpt.torch, "save", fake)
    else:
        monkeypatch.setattr(ckpt.Path, "write_text", fake)
    with pytest.raises(OSError, match=reason) as raised:
        ckpt.save_checkpoint(folder, 3, {"w": torch.zeros(10)}, {"step": 3}, {"metric": 0.5})
    assert f"cannot write the checkpoint {folder / 'step-00000003'}" in str(raised.value)
    assert "bytes free on its disk" in str(raised.value)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["step-00000003"]  # no temporary left
    assert ckpt.latest_checkpoint(folder).meta["metric"] == 1.0
    assert torch.equal(ckpt.load_weights(old)["w"], weights["w"])


def test_a_failed_write_is_one_line_from_a_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt, "save_file", _full_save_file)
    folder = tmp_path / "checkpoints"
    status = run_command(
        "pretrain", lambda: ckpt.save_checkpoint(folder, 1, {"w": torch.zeros(2)}, {}, {})
    )
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        f"eegfast pretrain: cannot write the checkpoint {folder / 'step-00000001'} "
    )
    assert "No space left on device" in err[0]


def test_generate_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    """``eegfast generate`` writes its output after the whole generation: a full disk then
    ended it with a traceback."""
    import numpy as np
    from safetensors.torch import save_file

    import eegfast.fileio as fileio
    from eegfast.cli import main as cli
    from eegfast.models.hybrid import create_hybrid_model

    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    np.save(tmp_path / "prompt.npy", np.ones((1, 400), np.float32))
    real = fileio.write_atomic

    def full_disk(path, write):
        def fail(tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, fail)

    monkeypatch.setattr(fileio, "write_atomic", full_disk)
    out = tmp_path / "out.npy"
    argv = ["generate", "--model", str(weights), "--prompt", str(tmp_path / "prompt.npy")]
    argv += ["--channels", "Cz", "--seconds", "1", "--out", str(out), "--no-progress"]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"eegfast generate: error: [Errno 28] No space left on device: '{out}'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "prompt.npy"]
