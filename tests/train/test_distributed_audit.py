"""Device choice under torchrun: cases found in an audit."""

from __future__ import annotations

import pytest
import torch

from eegfast.train.commands.common import run_command
from eegfast.train.distributed import choose_device


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device=cuda"):
        choose_device("cuda")
    # a command's one line and status 2, not a RuntimeError's traceback
    assert run_command("tokenizer", lambda: choose_device("cuda")) == 2
    assert capsys.readouterr().err.startswith("eegfast tokenizer: train.device=cuda")
    assert choose_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_more_processes_than_gpus_names_local_rank(monkeypatch, requested):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert choose_device(requested) == torch.device("cuda", 1) and chosen == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun --nproc_per_node 3 on 2 GPUs
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2.*2 visible GPU\(s\).*--nproc_per_node 2"):
        choose_device(requested)
    assert chosen == [1]
