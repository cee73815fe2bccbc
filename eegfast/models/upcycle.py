"""Sparse upcycling: turn the dense FFNs of a trained transformer into Mixture-of-Experts FFNs.

Every chosen ``model.blocks[i].mlp`` (any module with ``fc1`` / ``fc2`` ``nn.Linear`` layers and
an exact GELU between them: :class:`eegfast.nn.Mlp`, timm's / the reference LaBraM's ``Mlp``)
becomes an :class:`eegfast.nn.MoEFFN` whose experts are copies of the dense weights and whose
router is freshly initialised. Without noise every expert computes the dense MLP and the
renormalised top-k gates sum to 1, so the upcycled model gives the dense model's outputs (up to
floating-point rounding of the gate-weighted sum) whatever the router does.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
from torch import nn

from eegfast.nn.moe import MoEFFN, TaskRouting


def _check_dense_mlp(mlp: nn.Module, where: str) -> float:
    """Raise unless ``mlp`` is fc1 → exact GELU → fc2; return its dropout probability."""
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise TypeError(f"{where} must have fc1 and fc2 nn.Linear layers, got {type(mlp).__name__}")
    # Without an .act module the activation is hidden in forward() (F.relu, say): the experts
    # would compute GELU instead, silently. Such an MLP is refused, not guessed.
    act = getattr(mlp, "act", None)
    if not (isinstance(act, nn.GELU) and act.approximate == "none"):
        raise TypeError(f"{where}.act must be nn.GELU() (exact), got {act!r}")
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise TypeError(f"{where}.norm must be absent or Identity to upcycle, got {norm!r}")
    drops = [m.p for m in mlp.children() if isinstance(m, nn.Dropout)]
    return max(drops, default=0.0)


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    layers: Iterable[int] | None = None,
    noise_std: float = 0.0,
    num_tasks: int = 0,
    *,
    task_routing: TaskRouting = "bias",
    capacity_factor: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace ``model.blocks[i].mlp`` by upcycled :class:`~eegfast.nn.MoEFFN` layers, in place.

    Args:
        model: any module with ``.blocks`` (a sequence of blocks with ``.mlp``).
        num_experts, top_k: as :class:`~eegfast.nn.MoEFFN`.
        layers: block indices to upcycle (negative counts from the end); None = all blocks.
        noise_std: Gaussian noise added to each expert copy, relative to the std of the dense
            weight tensor (0: exact copies, so the model's outputs do not change).
        num_tasks, task_routing, capacity_factor: task-aware routing and capacity (MoEFFN).
            Slots dropped by a capacity factor contribute nothing, so with one the outputs
            equal the dense model's only where no slot is dropped, and a sample's outputs
            depend on the rest of its batch (in eval too; see MoEFFN).
        generator: for the noise.
    Returns:
        ``model`` (modified in place).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"upcycle: {type(model).__name__} has no .blocks")
    count = len(blocks)
    if layers is not None and not isinstance(layers, Iterable):
        raise TypeError(f"upcycle: layers must be a list of block indices, got {layers!r}")
    chosen = range(count) if layers is None else list(layers)
    indices = []
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"upcycle: layers must hold ints, got {i!r}")
        if not -count <= i < count:
            raise IndexError(f"upcycle: layer {i} out of range for {count} blocks")
        indices.append(i % count)
    if len(set(indices)) != len(indices):
        raise ValueError(f"upcycle: layers lists a block twice: {list(chosen)}")
    if noise_std < 0:
        raise ValueError(f"upcycle: noise_std must be >= 0, got {noise_std}")
    # Every layer is checked and built before any is replaced: an error in a later block
    # leaves the model as it was, not half upcycled.
    replacements = []
    for i in indices:
        mlp = blocks[i].mlp
        if isinstance(mlp, MoEFFN):
            raise ValueError(f"upcycle: blocks[{i}].mlp is already a MoEFFN")
        drop = _check_dense_mlp(mlp, f"blocks[{i}].mlp")
        moe = MoEFFN.from_dense(
            mlp.fc1,
            mlp.fc2,
            num_experts,
            top_k,
            noise_std=noise_std,
            generator=generator,
            num_tasks=num_tasks,
            task_routing=task_routing,
            capacity_factor=capacity_factor,
            drop=drop,
        )
        # A new module starts in training mode: take the dense MLP's mode, so an upcycled
        # model in eval mode applies no output dropout (the dense model's eval outputs).
        replacements.append((i, moe.train(mlp.training)))
    for i, moe in replacements:
        blocks[i].mlp = moe
    return model
