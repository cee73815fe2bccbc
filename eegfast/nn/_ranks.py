"""Batch statistics over the processes of a torch.distributed run, for losses whose value must
not depend on how a batch is split across ranks (the MoE router's auxiliary losses, the
class-weighted classification loss)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from eegfast.ops._backend import compiler_disable


def world_size() -> int:
    """The number of processes of torch.distributed's default group (1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


# A graph break under torch.compile: a collective on a tensor without gradient, run as it is
# (every rank gets here together, in the same training forward).
@compiler_disable
@torch.no_grad()
def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` (no gradient) summed over every rank of the default group."""
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total
