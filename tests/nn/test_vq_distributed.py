"""NormEMAVectorQuantizer under FSDP2 and DDP (two gloo processes): the EMA codebook is kept,
and the k-means init and dead-code restarts match one process on the concatenated batches."""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eegfast.nn import NormEMAVectorQuantizer
from eegfast.nn import vq as vq_module
from eegfast.ops import vq_ema_update
from tests._gloo import free_port

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
    port = free_port()
    out = torch.zeros(2, CODES * DIM + CODES).share_memory_()
    mp.spawn(_fsdp_worker, args=(2, port, out), nprocs=2)
    single = _Quantized().train()
    _train(single, [torch.cat([_rows(step, 0), _rows(step, 1)]) for step in range(STEPS)])
    expected = torch.cat([single.quantize.codebook.flatten(), single.quantize.cluster_size])
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


# Rows per rank and which of them are padding: the ranks hold different numbers of rows, and
# different numbers of them count, as when they pad their batches to different electrode counts.
_UNEVEN = ((20, 5), (36, 3))  # (rows, every how many-th row is padding)
_DDP_STEPS = 6


def _uneven(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, every = _UNEVEN[rank]
    x = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(1000 * step + rank))
    return x, torch.arange(rows) % every != 0


class _Restarting(nn.Module):
    """A projection and a quantizer with k-means init and dead-code restarts that fire within
    a few steps (fast decay, high threshold)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(DIM, DIM)
        self.quantize = NormEMAVectorQuantizer(
            CODES, DIM, decay=0.5, dead_code_threshold=0.3, kmeans_iters=3
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
        # the commitment loss is a mean over this rank's valid rows: scaled so that the mean
        # of the ranks' gradients (DDP's) is that of the mean over all ranks' valid rows
        return self.quantize(self.proj(x), valid).loss * scale


def _train_recording(model: nn.Module, quantizer: NormEMAVectorQuantizer, batches, world: int):
    """Trains on ``batches`` of (x, valid, valid rows of all ranks); returns the codebook right
    after the k-means init, then the codebook and EMA counts after every step, flattened."""
    snapshots = []
    initialise = quantizer._initialise

    def recording(flat: torch.Tensor) -> None:
        initialise(flat)
        snapshots.append(quantizer.codebook.flatten().clone())

    quantizer._initialise = recording  # type: ignore[method-assign]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, valid, total in batches:
        model(x, valid, float(valid.sum()) * world / total).backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshots += [quantizer.codebook.flatten().clone(), quantizer.cluster_size.clone()]
    return torch.cat(snapshots)


def _global_valid(step: int) -> int:
    return sum(int(_uneven(step, rank)[1].sum()) for rank in range(len(_UNEVEN)))


def _ddp_worker(rank: int, world: int, port: int, out: torch.Tensor) -> None:
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _Restarting().train()
        ddp = DistributedDataParallel(model)
        batches = [(*_uneven(step, rank), _global_valid(step)) for step in range(_DDP_STEPS)]
        out[rank] = _train_recording(ddp, model.quantize, batches, world)
        del ddp, model  # freed before the group is destroyed, as in _fsdp_worker
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_ddp_matches_one_process_on_the_concatenated_batches(monkeypatch):
    """k-means init and dead-code restarts under DDP with uneven, padded rows per rank: both
    ranks hold the codebook (after the k-means init, and after every EMA step with its
    restarts) that one process reaches on the two ranks' batches concatenated. k-means on rank
    0's rows alone, or restart seeds drawn from them alone, gave another codebook."""
    port = free_port()
    single = _Restarting().train()
    batches = []
    for step in range(_DDP_STEPS):
        parts = [_uneven(step, rank) for rank in range(len(_UNEVEN))]
        x, valid = (torch.cat(part) for part in zip(*parts, strict=True))
        batches.append((x, valid, int(valid.sum())))
    restarted = []

    def update(*args, **kwargs):
        stats = vq_ema_update(*args, **kwargs)
        restarted.append(int(stats["dead"].sum()))
        return stats

    monkeypatch.setattr(vq_module, "vq_ema_update", update)
    threads = torch.get_num_threads()  # (restored: the tests after this one keep theirs)
    torch.set_num_threads(1)
    try:
        expected = _train_recording(single, single.quantize, batches, 1)
    finally:
        torch.set_num_threads(threads)
    assert sum(restarted) > 0  # the comparison covers restarts
    out = torch.zeros(2, expected.numel()).share_memory_()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def _padding_only_worker(rank: int, world: int, port: int, out: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        quantizer = NormEMAVectorQuantizer(CODES, DIM, kmeans_iters=3).train()
        x, valid = _padding_only_batch()
        part = slice(0, 20) if rank == 0 else slice(20, None)
        quantizer(x[part], valid[part])
        out[rank] = quantizer.codebook.flatten()
    finally:
        dist.destroy_process_group()


def _padding_only_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """40 rows: rank 0's 20 all count, rank 1's 20 are all padding."""
    x = torch.randn(40, DIM, generator=torch.Generator().manual_seed(7))
    return x, torch.arange(40) < 20


def test_kmeans_init_when_a_rank_holds_only_padding():
    """A rank whose first batch is all padding has no row for k-means: it raised there while
    the other rank waited for its codebook. The rows of all ranks together initialise it."""
    port = free_port()
    out = torch.zeros(2, CODES * DIM).share_memory_()
    mp.spawn(_padding_only_worker, args=(2, port, out), nprocs=2)
    torch.manual_seed(0)
    single = NormEMAVectorQuantizer(CODES, DIM, kmeans_iters=3).train()
    single(*_padding_only_batch())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], single.codebook.flatten(), rtol=1e-6, atol=1e-6)
