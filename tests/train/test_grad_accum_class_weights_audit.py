"""Gradient accumulation reproduces the full batch for fine-tuning's class-weighted loss: the
engine computes each optimiser step's normaliser (the class-weight sum of the labelled windows
of all its micro-batches, and their count) on the host before the step's first forward, and
``classification_step`` divides each micro-batch's weighted sum by the step's share of it, so
``train.grad_accum`` = 2 or 4 trains to the weights of 1 and logs its loss and accuracy (each
micro-batch normalised by its own weight sum had not: unequal class weights and unlabelled
windows make the micro-batches' sums differ)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eegfast.train.config import RunConfig
from eegfast.train.distributed import DistInfo, init_distributed, shutdown
from eegfast.train.engine import fit
from eegfast.train.objectives import (
    StepContext,
    StepOutput,
    classification_normaliser,
    classification_step,
)
from tests._gloo import free_port
from tests.train import worker
from tests.train.fakes import HostReads, SyntheticEEG, TinyClassifier, collate

CLASS_WEIGHTS = torch.tensor([0.25, 1.0, 4.0])
# 48 windows of one electrode set: three classes, rare ones heavily weighted, some unlabelled
LABELS = [0, 0, 1, -1, 0, 2, 0, 0, 1, 0, -1, -1, 2, 0, 0, 0, 1, 0, 0, 2, -1, 0, 0, 1] * 2


def _data() -> SyntheticEEG:
    data = SyntheticEEG(len(LABELS), channels=(3,), patches=1)
    for item, label in zip(data.items, LABELS, strict=True):
        item["label"] = label
    return data


def _train(
    tmp_path, accum: int, info: DistInfo | None = None
) -> tuple[dict, list[dict], StepContext]:
    """Final weights, each step's logged scalars (rank 0's) and the context of 4 steps of 8
    windows."""
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=3)
    data = _data()
    ctx = StepContext(torch.device("cpu"), class_weights={"mi": CLASS_WEIGHTS})
    config = RunConfig().with_overrides(
        {
            "train.batch_size": 8,
            "train.grad_accum": accum,
            "train.max_steps": 4,
            "train.log_every": 1,
            "train.progress": False,
            "optim.lr": 1e-2,
            "optim.warmup_steps": 1,
            # AdamW divides by sqrt(v) + eps: a near-zero gradient entry's rounding (the sum
            # order of micro-batches) would be magnified to ~1e-5 with the default 1e-8
            "optim.eps": 1e-4,
        }
    )
    logged: list[dict] = []
    fit(
        model,
        classification_step,
        data,
        config,
        tmp_path / f"accum{accum}",
        group_keys=data.group_keys(),
        collate_fn=collate,
        ctx=ctx,
        dist_info=info,
        on_log=lambda step, scalars: logged.append(scalars),
    )
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, logged, ctx


def test_grad_accum_trains_the_class_weighted_loss_of_the_whole_batch(tmp_path):
    full_weights, full_logged, _ = _train(tmp_path, 1)
    assert len(full_logged) == 4
    torch.manual_seed(0)
    start = TinyClassifier(num_classes=3).state_dict()
    assert max(float((full_weights[k] - start[k]).abs().max()) for k in start) > 1e-3
    for accum in (2, 4):
        weights, logged, ctx = _train(tmp_path, accum)
        assert ctx.normaliser is None  # not left for an evaluation with the same context
        for key, value in full_weights.items():
            torch.testing.assert_close(
                weights[key], value, rtol=1e-6, atol=1e-6, msg=f"accum {accum}: {key}"
            )
        for name in ("train/loss", "train/accuracy"):
            got = torch.tensor([scalars[name] for scalars in logged], dtype=torch.float64)
            want = torch.tensor([scalars[name] for scalars in full_logged], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{accum}: {name}")


def _spawned(rank: int, world_size: int, port: int, run_dir: str) -> None:
    worker.set_rendezvous(rank, world_size, port)
    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    try:
        weights, logged, _ = _train(Path(run_dir), 2, info)
        if rank == 0:
            torch.save((weights, logged), Path(run_dir) / "results.pt")
    finally:
        shutdown(info)


@pytest.mark.slow
def test_two_processes_with_grad_accum_give_the_one_process_full_batch(tmp_path):
    """Two processes, each on half of each of a step's two micro-batches: one all-reduced
    normaliser a step, the weights and logged means of one process without accumulation."""
    full_weights, full_logged, _ = _train(tmp_path, 1)
    mp.spawn(_spawned, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    weights, logged = torch.load(tmp_path / "results.pt", weights_only=True)
    for key, value in full_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-6, atol=1e-6, msg=key)
    for name in ("train/loss", "train/accuracy"):
        got = torch.tensor([scalars[name] for scalars in logged], dtype=torch.float64)
        want = torch.tensor([scalars[name] for scalars in full_logged], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


def test_the_normaliser_is_of_the_host_batch_and_names_a_label_past_the_weights():
    ctx = StepContext(torch.device("cpu"), class_weights={"mi": CLASS_WEIGHTS})
    batch = {"label": torch.tensor([2, -1, 0, 1, 2]), "task": ["mi"] * 5}
    with HostReads() as reads:  # host labels: nothing to wait for on a GPU
        total = classification_normaliser(batch, ctx)
    assert reads.count == 0
    assert total.device.type == "cpu"
    torch.testing.assert_close(total, torch.tensor([9.25, 4.0], dtype=torch.float64))
    plain = classification_normaliser(batch, StepContext(torch.device("cpu")))
    torch.testing.assert_close(plain, torch.tensor([4.0, 4.0], dtype=torch.float64))
    batch["label"] = torch.tensor([3, 0])
    batch["task"] = ["mi"] * 2
    with pytest.raises(ValueError, match=r"label 3 .*task 'mi'.* 3 class weights"):
        classification_normaliser(batch, ctx)


def test_a_step_function_without_the_hook_gets_no_normaliser(tmp_path):
    """Objectives without ``normaliser`` run as before: no step normaliser in their context."""
    seen = []

    def step(model, batch, ctx):
        seen.append(ctx.normaliser)
        return StepOutput(model(batch["x"]).logsumexp(-1).mean())

    data = _data()
    config = RunConfig().with_overrides(
        {
            "train.batch_size": 8,
            "train.grad_accum": 2,
            "train.max_steps": 2,
            "train.progress": False,
        }
    )
    fit(
        TinyClassifier(num_classes=3),
        step,
        data,
        config,
        tmp_path,
        group_keys=data.group_keys(),
        collate_fn=collate,
        ctx=StepContext(torch.device("cpu")),
    )
    assert seen == [None] * 4
