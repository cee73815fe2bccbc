"""MoEFFN (C++ dispatch/expert/combine custom ops) under DDP and FSDP2: two gloo processes, each
on half of the batch, give the single-process full-batch gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eegfast.nn import MoEFFN
from tests._gloo import free_port, gloo_worker_leaving_without_teardown

DIM, HIDDEN, EXPERTS, TOP_K, TASKS = 12, 24, 4, 2, 3


class TwoMoEBlocks(nn.Module):
    """Residual MoE FFN blocks with task routing; ``blocks`` so FSDP2 can shard each."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MoEFFN(DIM, HIDDEN, EXPERTS, TOP_K, num_tasks=TASKS) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x, task_id=task_id)
        return x


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, DIM, generator=gen)  # (B, N, D): 4 samples per process
    task = torch.randint(0, TASKS, (8,), generator=gen)
    target = torch.randn(8, 5, DIM, generator=gen)
    return x, task, target


def _model() -> TwoMoEBlocks:
    torch.manual_seed(0)
    model = TwoMoEBlocks()
    with torch.no_grad():  # routing that depends on the task, so the task bias gets gradients
        for block in model.blocks:
            block.task_bias.normal_(0, 0.5)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = grad.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, strategy: str, out_file: str) -> None:
    with gloo_worker_leaving_without_teardown(rank, world, port):
        model = _model()
        if strategy == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            # fully_shard on each block, then the root, as the engine wraps: with its gloo
            # setting (torch 2.8's gloo summed FSDP2's averaging reduce-scatter)
            from eegfast.train.distributed import DistInfo, transformer_blocks, wrap_model

            assert [*model.blocks] == transformer_blocks(model)
            info, cpu = DistInfo(rank, world, rank), torch.device("cpu")
            wrapped = wrap_model(model, info, cpu, strategy="fsdp")
        x, task, target = (t.chunk(world)[rank] for t in _data())
        loss = (wrapped(x, task) - target).pow(2).mean()
        loss.backward()
        grads = _grads(model)
        if rank == 0:
            torch.save(grads, out_file)
        dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_moe_gradients_match_single_process(strategy, tmp_path):
    model = _model()
    x, task, target = _data()
    (model(x, task) - target).pow(2).mean().backward()
    single = _grads(model)
    assert all(g.abs().sum() > 0 for g in single.values()), "every parameter should get gradient"

    out_file = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, free_port(), strategy, str(out_file)), nprocs=2)
    distributed = torch.load(out_file, weights_only=True)
    assert distributed.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
