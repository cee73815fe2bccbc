"""torchrun integration: process group from ``env://``, rank helpers, DDP / FSDP2 wrapping.

``torchrun --nproc_per_node N`` (and ``--nnodes``/``--rdzv-endpoint`` for several machines) sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them.
Without them everything runs in one process and the helpers are no-ops.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA).

    A ValueError naming the variable (a command's one-line error) when WORLD_SIZE, RANK or
    LOCAL_RANK is no whole number, or RANK is missing (a launcher that set WORLD_SIZE only:
    a KeyError traceback before) or not below WORLD_SIZE."""
    world_size = _env_int("WORLD_SIZE", "1")
    if world_size <= 1:
        return DistInfo()
    rank = _env_int("RANK", None)
    local_rank = _env_int("LOCAL_RANK", "0")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"RANK={rank}: must be from 0 to WORLD_SIZE - 1 = {world_size - 1}; start the "
            "processes with torchrun (--nproc_per_node N), which sets both"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    _collect_garbage_at_exit()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def _env_int(name: str, default: str | None) -> int:
    """The environment variable ``name`` (torchrun's) as an int; ``default`` when unset (None:
    it must be set). ValueError naming the variable otherwise."""
    value = os.environ.get(name, default)
    if value is None:
        raise ValueError(
            f"{name}=(unset): WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for several "
            f"processes, but {name} is not set; start them with torchrun (--nproc_per_node N), "
            "or unset WORLD_SIZE for one process"
        )
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{name}={value!r}: not a whole number; start the processes with torchrun "
            "(--nproc_per_node N), which sets it"
        ) from None


_collecting_at_exit = False


def _collect_garbage_at_exit() -> None:
    """Free unreachable objects at exit, before the interpreter's own shutdown.

    An FSDP-wrapped model (or a DDP wrapper) holds the process group, and sits in reference
    cycles, so once its last name is gone only the cyclic collector frees it: left to the
    interpreter's shutdown, its group (destroyed by :func:`shutdown` but kept alive by it) is
    freed while Python tears itself down, which now and then aborted a worker ("terminate
    called without an active exception"). An exit handler frees it while Python still runs."""
    global _collecting_at_exit
    if not _collecting_at_exit:
        atexit.register(gc.collect)
        _collecting_at_exit = True


def choose_device(requested: str) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK) if CUDA works, else the CPU.

    A ValueError naming ``train.device`` (a command's one-line error, not a traceback) when
    CUDA is asked for but unusable, or when this process has no GPU of its own (more processes
    per machine than GPUs: CUDA's "invalid device ordinal" otherwise)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "train.device=cuda but torch.cuda.is_available() is False (no GPU, or torch built "
            "without CUDA); set train.device=cpu or auto"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"train.device={requested}: this process is LOCAL_RANK {local_rank}, but this machine "
            f"has {count} visible GPU(s); start at most {count} processes per machine (torchrun "
            f"--nproc_per_node {count}) or set train.device=cpu"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def min_across_ranks(value: int, device: torch.device, info: DistInfo) -> int:
    """The smallest of every rank's ``value``."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def wrap_model(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    *,
    strategy: str = "ddp",
    find_unused_parameters: bool = False,
) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` on every transformer block, see :func:`transformer_blocks`,
    then the root) when distributed."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        units = [*transformer_blocks(model), model]
        for unit in units:
            fully_shard(unit, mesh=mesh)
        if device.type == "cpu":
            # FSDP2 averages gradients with a ReduceOp.AVG reduce-scatter, which gloo (the CPU
            # backend) summed on torch 2.8 (pytorch#162338): gradients world_size times too
            # large, silently. A sum then FSDP2's own division is the mean on every version.
            for unit in units:
                unit.set_force_sum_reduction_for_comms(True)
        return model
    raise ValueError(f"train.strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The items of every ``nn.ModuleList`` named ``blocks`` in ``model``, at any depth: the
    classifier's ``blocks``, the pretraining model's ``student.blocks``, the tokenizer's
    ``encoder.blocks`` and ``decoder.blocks``. Inner lists come first, so that nested blocks
    are sharded before the blocks holding them (FSDP2 shards bottom up).

    Each becomes its own FSDP2 unit: with the root as the only one, every step would gather
    the whole model's parameters at once and keep them (and their gradients) unsharded until
    the backward pass ends, and no gather would overlap compute."""
    found = [
        module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList)
    ]
    return [block for blocks in reversed(found) for block in blocks]


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Backward passes inside accumulate gradients on each rank without reducing them across
    ranks (gradient accumulation's non-final micro-batches): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)`` (FSDP2 then keeps the unsharded gradients until the
    next synced backward reduce-scatters them). A plain module: no effect."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    )


def shutdown(info: DistInfo) -> None:
    """Tear the process group down, after freeing what still uses it.

    A DDP wrapper sits in reference cycles (closures torch's own ``__init__`` leaves), so only
    the cyclic garbage collector frees it, whenever it next runs: possibly during interpreter
    shutdown, where freeing its reducer (which holds the group and its last gloo work) after
    the group was destroyed aborted a worker now and then ("terminate called without an active
    exception", exit code -6 under torchrun). Collecting first frees the reducer while the
    group is still alive."""
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
