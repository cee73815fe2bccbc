"""NormEMAVectorQuantizer under FSDP2 (two gloo processes): the EMA codebook is kept."""

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eegfast.nn import NormEMAVectorQuantizer

STEPS, ROWS, DIM, CODES = 2, 24, 8, 16


class _Quantized(nn.Module):
    """A trainable projection in front of the quantizer, as the tokenizer's encoder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(DIM, DIM)
        self.quantize = NormEMAVectorQuantizer(CODES, DIM, kmeans_init=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize(self.proj(x))
        return q.loss + q.quantized.square().mean()


def _rows(step: int, rank: int) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(100 * step + rank))


def _train(model: nn.Module, batches) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for x in batches:
        model(x).backward()
        optimizer.step()
        optimizer.zero_grad()


def _codebook(model: _Quantized) -> torch.Tensor:
    weight = model.quantize.embedding.weight
    # a DTensor shard where FSDP made the codebook a sharded parameter
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight.detach()


def _fsdp_worker(rank: int, world: int, port: int, out: torch.Tensor) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _Quantized().train()
        fully_shard(model)
        _train(model, [_rows(step, rank) for step in range(STEPS)])
        out[rank] = torch.cat([_codebook(model).flatten(), model.quantize.cluster_size])
        del model
    finally:
        # The FSDP model holds the group and sits in reference cycles: freed later, during the
        # interpreter's shutdown, it aborted a worker now and then (seen in CI)
        gc.collect()
        dist.destroy_process_group()


def test_ema_codebook_is_kept_under_fsdp():
    """FSDP shards parameters and gathers a temporary full copy for the forward: a codebook
    held as a parameter lost every EMA write (it stayed the random initial one while the EMA
    counts moved on). Both ranks must hold the codebook that one process training on their
    two batches together reaches."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = torch.zeros(2, CODES * DIM + CODES).share_memory_()
    mp.spawn(_fsdp_worker, args=(2, port, out), nprocs=2)
    single = _Quantized().train()
    _train(single, [torch.cat([_rows(step, 0), _rows(step, 1)]) for step in range(STEPS)])
    expected = torch.cat([single.quantize.codebook.flatten(), single.quantize.cluster_size])
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
