"""The fine-tuning loss of an upcycled MoE classifier is the same under torchrun with two
processes as in one: the class-weighted cross-entropy (normalised by the weight sum of the whole
batch, not each rank's) and the routers' load-balance and z losses (batch statistics of every
rank's tokens, not each rank's own).

Two gloo processes, each on its half of every batch, with unequal class weights, an unlabelled
window and unequal electrode padding per rank (so each rank holds another number of real
tokens and another class-weight sum), train a few SGD steps under DDP and FSDP2; the mean over
ranks of each logged scalar and the final weights are those of one process on the whole batch
(also with activation checkpointing, which runs the MoE layers' all-reduces again in the
backward pass).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eegfast.data import collate_padded
from eegfast.train.arch import build_model
from eegfast.train.distributed import DistInfo, unwrap, wrap_model
from eegfast.train.engine import enable_activation_checkpointing
from eegfast.train.objectives import StepContext, classification_step
from tests._gloo import free_port, gloo_worker_leaving_without_teardown
from tests.train.fakes import SyntheticEEG

STEPS, LR = 3, 0.1
ARCH = {
    "kind": "classifier",
    "name": "labram_tiny",
    "kwargs": {"num_classes": 0},
    "upcycle": {"num_experts": 4, "top_k": 2, "num_tasks": 2},
    "heads": {"a": 3},
}
# Each step's 8 windows: electrodes and label of each; the first 4 go to rank 0 (no padding),
# the last 4 to rank 1 (padded to 3 electrodes where it has 2; to 4 in the one-process batch).
WINDOWS = [
    [(4, 0), (4, 2), (4, 0), (4, 1), (3, 2), (2, 2), (2, -1), (3, 2)],
    [(4, 1), (4, 0), (4, 0), (4, 0), (2, 2), (3, 1), (2, 2), (2, 2)],
    [(4, 2), (4, 0), (4, 1), (4, 0), (3, 2), (2, 2), (2, 0), (2, 2)],
]
CLASS_WEIGHTS = torch.tensor([0.25, 1.0, 4.0])
METRICS = ("loss", "accuracy", "load_balance_loss", "z_loss")


def _batch(step: int, windows: slice) -> dict:
    data = SyntheticEEG(4, channels=(4,), tasks=("a",), seed=step)
    items = []
    for i in range(8)[windows]:  # a window is the same wherever it goes
        channels, label = WINDOWS[step][i]
        item = dict(data[i % 4])
        item["x"] = item["x"][:channels] * (1 + 0.1 * i)
        item["input_chans"] = item["input_chans"][: channels + 1]
        item["label"] = label
        items.append(item)
    return collate_padded(items)


def _ctx() -> StepContext:
    return StepContext(
        torch.device("cpu"),
        task_ids={"a": 0},
        route_by_task=True,
        aux_weights={"load_balance_loss": 0.01, "z_loss": 0.001},
        class_weights={"a": CLASS_WEIGHTS},
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH).train()


def _train(model: torch.nn.Module, windows: slice) -> tuple[torch.Tensor, dict]:
    """(STEPS, len(METRICS)) logged scalars, and the final weights."""
    ctx, logged = _ctx(), []
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        out = classification_step(model, _batch(step, windows), ctx)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scalars = {"loss": out.loss.detach(), **out.metrics}
        logged.append(torch.stack([torch.as_tensor(scalars[k]).float() for k in METRICS]))
    weights = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in unwrap(model).state_dict().items()
    }
    return torch.stack(logged), weights


def _worker(rank: int, world: int, port: int, out_file: str) -> None:
    torch.set_num_threads(1)
    with gloo_worker_leaving_without_teardown(rank, world, port):
        info = DistInfo(rank, world, rank)
        half = slice(4 * rank, 4 * rank + 4)
        results = {}
        for strategy in ("ddp", "fsdp", "ddp-checkpointing"):
            model = _model()
            if strategy == "ddp-checkpointing":
                # each block's forward (its MoE layer's all-reduce with it) runs again in the
                # backward pass, among DDP's gradient all-reduces
                assert enable_activation_checkpointing(model) > 0
            model = wrap_model(model, info, torch.device("cpu"), strategy=strategy.split("-")[0])
            logged, weights = _train(model, half)
            dist.all_reduce(logged)  # the engine logs each scalar's mean over the ranks
            results[strategy] = (logged / world, weights)
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses_and_weights(tmp_path):
    single_logged, single_weights = _train(_model(), slice(0, 8))
    out_file = tmp_path / "results.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out_file)), nprocs=2)
    results = torch.load(out_file, weights_only=True)
    start = _model().state_dict()
    assert max(float((single_weights[k] - start[k]).abs().max()) for k in start) > 1e-3
    for strategy, (logged, weights) in results.items():
        for j, name in enumerate(METRICS):
            torch.testing.assert_close(
                logged[:, j], single_logged[:, j], rtol=1e-6, atol=1e-6, msg=f"{strategy} {name}"
            )
        assert weights.keys() == single_weights.keys()
        for key, value in single_weights.items():
            torch.testing.assert_close(
                weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{strategy} {key}"
            )
