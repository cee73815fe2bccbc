"""Acceptance checks of issue 9 (LaBraM models, tokenizer, masked pretraining) not covered by
the per-module tests."""

import os

import pytest
import torch

from eegfast.models import create_model, read_state_dict
from tests.models._spec import random_reference_state

NAMES = ["Fp1", "Fp2", "Cz"]


@pytest.mark.parametrize("name", ["labram_tiny", "vqnsp_tiny", "labram_tiny_pretrain"])
def test_flat_signal_without_samples_is_refused_by_name(name):
    # (B, C, n_times) with n_times = 0 passed the divisibility check and failed inside the
    # convolution ("Kernel size can't be greater than actual input size")
    model = create_model(name, ch_names=NAMES)
    x = torch.randn(2, len(NAMES), 0)
    with pytest.raises(ValueError, match=r"at least one electrode and one patch.*\(2, 3, 0\)"):
        if name.endswith("_pretrain"):
            model(x, None, torch.zeros(2, 0, dtype=torch.long))
        elif name.startswith("vqnsp"):
            model.get_codebook_indices(x)
        else:
            model(x)


class _RunsCode:
    """Unpickling this would call os.mkdir: a stand-in for a checkpoint carrying code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_checkpoint_calling_a_blocked_function_is_refused_with_torch_reason(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "ckpt.pth"
    torch.save({"model": random_reference_state("labram_base"), "x": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="refused to unpickle") as info:
        read_state_dict(path)
    assert not marker.exists()
    message = str(info.value)
    # torch's own reason names the global; its generic preamble (which advises that
    # weights_only=False "will likely succeed") is not the reason
    assert "mkdir" in message
    assert "likely succeed" not in message


def test_symmetric_objective_runs_the_blocks_once_on_both_views():
    model = create_model("labram_tiny_pretrain")
    B, C, A = 3, 2, 2
    x, chans = torch.randn(B, C, A, 200), torch.tensor([0, 1, 2])
    batches = []
    for block in model.student.blocks:
        block.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    embeds = []
    model.student.patch_embed.register_forward_pre_hook(lambda *_: embeds.append(1))
    out = model(x, chans, torch.randint(0, 256, (B, C * A)))
    assert batches == [2 * B] * len(model.student.blocks)  # both views, one pass
    assert len(embeds) == 1
    assert out.mask.sum(1).tolist() == [C * A // 2] * B


def test_old_10_20_names_take_the_reference_rows_with_modern_names_false():
    """T3..T6 take their 10-10 rows by default; ``modern_names=False`` keeps the table's old-name
    rows, which the reference code uses for TUH recordings."""
    from eegfast.electrodes import labram_input_chans

    names = ["EEG T3-REF", "EEG T4-REF", "EEG CZ-REF"]
    modern = create_model("labram_tiny", ch_names=names).config.input_chans
    old = create_model("labram_tiny", ch_names=names, modern_names=False).config.input_chans
    assert modern == tuple(labram_input_chans(["T7", "T8", "Cz"]))
    assert old == tuple(labram_input_chans(names, modern_names=False)) and old != modern
    assert old[1:] != modern[1:] and old[-1] == modern[-1]  # Cz has one spelling
    with pytest.raises(ValueError, match="modern_names applies to ch_names / chs_info"):
        create_model("labram_tiny", modern_names=False)
