"""Multi-process training: what every rank reports, and torchrun's environment (audit cases)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eegfast.train import checkpoint as ckpt
from eegfast.train.commands.common import run_command
from eegfast.train.config import RunConfig
from eegfast.train.distributed import DistInfo, init_distributed, shutdown
from eegfast.train.engine import NonFiniteLossError, fit, seed_everything
from eegfast.train.objectives import StepContext, StepOutput
from tests._gloo import free_port
from tests.train import worker
from tests.train.fakes import SyntheticEEG, TinyClassifier, collate


def spawned_nan_on_rank_0(rank: int, world_size: int, port: int, run_dir: str) -> None:
    """A 2-process run whose rank 0 gets a NaN loss at its 5th step (checkpoints at steps 2
    and 4): writes each rank's NonFiniteLossError message to ``run_dir/error-<rank>``."""
    worker.set_rendezvous(rank, world_size, port)
    torch.set_num_threads(1)
    calls = {"n": 0}

    def step(model, batch, ctx):
        calls["n"] += 1
        loss = model(batch["x"]).logsumexp(-1).mean()
        if rank == 0 and calls["n"] == 5:
            loss = loss * float("nan")
        return StepOutput(loss)

    overrides = {"train.batch_size": 4, "train.checkpoint_every": 2, "train.progress": False}
    config = RunConfig().with_overrides(overrides)
    info = init_distributed(torch.device("cpu"))
    seed_everything(config.train.seed)
    data = SyntheticEEG(24)
    model = TinyClassifier()
    try:
        fit(
            model, step, data, config, run_dir, group_keys=data.group_keys(), collate_fn=collate,
            ctx=StepContext(torch.device("cpu")), dist_info=info,
        )  # fmt: skip
    except NonFiniteLossError as error:
        (Path(run_dir) / f"error-{rank}").write_text(str(error))
    finally:
        del model
        shutdown(info)


@pytest.mark.slow
def test_every_rank_names_the_last_checkpoint_when_the_loss_turns_non_finite(tmp_path):
    """Under torchrun every rank stops at the same step and each prints the error (the
    commands print it on every rank): rank 1 said "no checkpoint of this run was written
    yet" while rank 0 had written step-00000004, the checkpoint to resume from."""
    mp.spawn(spawned_nan_on_rank_0, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    rank0, rank1 = ((tmp_path / f"error-{r}").read_text() for r in (0, 1))
    assert "non-finite loss" in rank0  # (rank 1: its gradient norm, averaged with rank 0's)
    for message in (rank0, rank1):
        assert "step 5, epoch 0" in message
        assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-00000004'}" in (
            message
        )


@pytest.mark.parametrize(
    "env, named",
    [
        ({"WORLD_SIZE": "2"}, "RANK"),  # a launcher that sets the size only
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ],
)
def test_a_torchrun_environment_that_does_not_read_is_a_one_line_error(
    monkeypatch, capsys, env, named
):
    """WORLD_SIZE > 1 without RANK was a KeyError traceback ('RANK'), a number that does not
    read a ValueError naming no variable, and a RANK past the world size went on to torch's
    rendezvous: a one-line error naming the variable, before any process group."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"\b{named}\b.*torchrun"):
        init_distributed(torch.device("cpu"))
    assert run_command("pretrain", lambda: init_distributed(torch.device("cpu"))) == 2
    assert capsys.readouterr().err.startswith(f"eegfast pretrain: {named}=")
    assert not torch.distributed.is_initialized()
    monkeypatch.delenv("WORLD_SIZE")
    assert init_distributed(torch.device("cpu")) == DistInfo()
