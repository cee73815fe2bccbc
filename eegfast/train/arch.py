"""Rebuilding a model from the architecture record stored with every checkpoint.

``arch`` (in ``meta.json``) is a plain dict::

    {"kind": "classifier" | "pretrain" | "hybrid" | "tokenizer",
     "name": "labram_tiny",              # eegfast.models.create_model name
     "kwargs": {...},                      # its keyword arguments
     "upcycle": {...} | None,              # eegfast.models.upcycle arguments, if MoE
     "heads": {"task": num_classes} | None # fine-tuned task heads}

so that ``eegfast finetune --set model.init=RUN`` can rebuild an upcycled MoE backbone before
loading its weights. A checkpoint file without that record (the reference's ``labram-base.pth``
or ``vqnsp.pth``, a classifier state dict, braindecode ``Labram`` weights) gets one inferred
from its tensor shapes (:func:`reference_checkpoint`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

CreateFn = Callable[..., nn.Module]


def _create(name: str, **kwargs: Any) -> nn.Module:
    from eegfast.models import create_model

    return create_model(name, **kwargs)


def head_key(task: str) -> str:
    """The key of ``task``'s head in :class:`MultiTaskClassifier`'s ``heads`` (and so in its
    state dict): the task name itself where a module name can be it; otherwise (torch refuses
    "." and "" and the names of ModuleDict's own attributes, such as ``train`` or ``keys``; a
    task named after a folder like ``eegmmidb-1.0.0`` has dots) the name with every other
    character than a letter, digit or ``_`` replaced, and a digest of the name."""
    # an instance, not the class: the attributes torch sets in Module.__init__ (``training``,
    # ``_modules``, ``_parameters``...) are refused as module names too
    if task and "." not in task and not hasattr(nn.ModuleDict(), task):
        return task
    readable = re.sub(r"\W", "_", task, flags=re.ASCII) or "task"
    return f"{readable}_{hashlib.sha1(task.encode()).hexdigest()[:8]}"


class MultiTaskClassifier(nn.Module):
    """A feature backbone with one linear head per task.

    forward(x (B, C, A, 200), input_chans, *, channel_padding_mask=None, task=name,
    task_id=(B,) long or None) -> logits (B, classes of that task). ``task_id`` goes to the
    backbone (the MoE router); ``task`` picks the head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Mapping[str, int],
        embed_dim: int,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not num_classes:
            raise ValueError("num_classes must name at least one task")
        self.backbone = backbone
        self.head_keys = {task: head_key(task) for task in num_classes}
        self.heads = nn.ModuleDict(
            {
                self.head_keys[task]: nn.Linear(embed_dim, n, device=device, dtype=dtype)
                for task, n in num_classes.items()
            }
        )
        for head in self.heads.values():
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    @property
    def blocks(self) -> nn.ModuleList:  # for layer-wise lr decay
        return self.backbone.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x, input_chans=None, *, channel_padding_mask=None, task_id=None):
        return self.backbone.forward_features(
            x, input_chans, channel_padding_mask=channel_padding_mask, task_id=task_id
        )

    def forward(
        self,
        x: torch.Tensor,
        input_chans: torch.Tensor | None = None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task: str | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if task is None:
            if len(self.head_keys) != 1:
                raise ValueError(f"task= is required: this model has heads {list(self.head_keys)}")
            task = next(iter(self.head_keys))
        if task not in self.head_keys:
            raise ValueError(f"no head for task {task!r}; heads: {list(self.head_keys)}")
        features = self.forward_features(
            x, input_chans, channel_padding_mask=channel_padding_mask, task_id=task_id
        )
        return self.heads[self.head_keys[task]](features)


def routes_by_task(meta: Mapping[str, Any]) -> bool:
    """Whether the model of a checkpoint's ``meta`` gives its MoE routers task ids: as it was
    fine-tuned (``route_by_task``, recorded since fine-tuning with ``upcycle.task_routing=false``
    trained without them), else whenever it was upcycled with tasks."""
    recorded = meta.get("route_by_task")
    if recorded is not None:
        return bool(recorded)
    return bool(((meta.get("arch") or {}).get("upcycle") or {}).get("num_tasks"))


def embed_dim_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "embed_dim"):
        return int(config.embed_dim)
    norm = getattr(model, "fc_norm", None)
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[0])
    raise ValueError(f"cannot tell the feature size of {type(model).__name__}")


def build_model(arch: Mapping[str, Any], *, create: CreateFn | None = None) -> nn.Module:
    """A freshly initialised model with the architecture ``arch`` (weights not loaded)."""
    if create is None and arch.get("kind") == "hybrid":
        from eegfast.train.hybrid import create_hybrid_pretrain_model

        create = create_hybrid_pretrain_model
    create = create or _create
    model = create(arch["name"], **dict(arch.get("kwargs") or {}))
    upcycle_args = arch.get("upcycle")
    if upcycle_args:
        from eegfast.models import upcycle

        model = upcycle(model, **dict(upcycle_args))
    heads = arch.get("heads")
    if heads:
        model = MultiTaskClassifier(model, dict(heads), embed_dim_of(model))
    return model


# meta["command"] of a checkpoint file without an eegfast record (see reference_checkpoint)
REFERENCE = "reference"


def reference_checkpoint(
    path: str | Path, *, name: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(arch, weights, meta) of a checkpoint file without an eegfast ``meta.json``: the
    reference's pretraining (``student.*``) or tokenizer file, a classifier state dict, or
    braindecode ``Labram`` weights (renamed to eegfast's keys).

    Read safely (:func:`eegfast.models.read_state_dict`); the architecture is the registered
    model whose keys and shapes the file has (:func:`eegfast.models.infer_architecture`), or
    ``name`` when given, which must then fit (ValueError listing what differs). ``meta``:
    ``{"arch": ..., "source": path, "command": "reference"}``.
    """
    from eegfast.models import read_reference_checkpoint

    found, weights = read_reference_checkpoint(path, name=name)
    arch = {"kind": found.kind, "name": found.name, "kwargs": dict(found.kwargs)}
    return arch, weights, {"arch": arch, "source": str(path), "command": REFERENCE}


def check_arch_record(arch: object, source: str | Path) -> None:
    """ValueError naming ``source`` (the checkpoint's meta.json) unless ``arch`` has the form
    every eegfast checkpoint records (the module's docstring): a meta.json edited by hand, or
    from elsewhere, gave AttributeError, KeyError or TypeError tracebacks from the commands."""
    problem = None
    if not isinstance(arch, Mapping):
        problem = f"an object expected, got {type(arch).__name__}"
    elif not isinstance(arch.get("name"), str):
        problem = f"its name must be a model name, got {arch.get('name')!r}"
    elif not isinstance(arch.get("kwargs") or {}, Mapping):
        problem = f"its kwargs must be an object, got {arch['kwargs']!r}"
    elif not isinstance(arch.get("upcycle") or {}, Mapping):
        problem = f"its upcycle must be an object or null, got {arch['upcycle']!r}"
    elif not isinstance(arch.get("heads") or {}, Mapping) or not all(
        isinstance(task, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 1
        for task, n in (arch.get("heads") or {}).items()
    ):
        problem = f"its heads must map task names to class counts, got {arch['heads']!r}"
    if problem is not None:
        raise ValueError(f"{source}: not an architecture record (arch) eegfast writes: {problem}")


def check_fits(
    arch: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    create: CreateFn | None = None,
) -> None:
    """ValueError naming the weights file ``source`` unless ``weights`` are exactly the
    tensors of :func:`build_model` ``(arch)`` (keys and shapes, compared on the meta device:
    nothing is allocated, so a record of absurd sizes asks for no memory its file does not
    hold) and usable (:func:`eegfast.models.checkpoint.check_weight_values`). Before, a
    meta.json whose arch did not describe its weights gave torch's RuntimeError from
    ``load_state_dict``, a traceback from every command."""
    from eegfast.models.checkpoint import (
        CheckpointMismatchError,
        _compare_shapes,
        _say_differences,
        check_weight_values,
    )

    record = Path(source).parent / "meta.json"
    check_arch_record(arch, record)
    try:
        with torch.device("meta"):
            expected = build_model(arch, create=create).state_dict()
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"{record}: its architecture record (arch) cannot be built: {error}"
        ) from None
    report = _compare_shapes(weights, expected)
    if not report.ok:
        raise CheckpointMismatchError(
            f"{source} does not hold the weights of the model its {record.name} describes "
            f"({arch['name']}): {_say_differences(report)}"
        )
    check_weight_values(weights, str(source), expected)


def _no_record(path: str | Path) -> ValueError:
    return ValueError(
        f"{path}: no architecture record (meta.json 'arch'); not an eegfast run (a checkpoint "
        "file without one is read by its tensor shapes)"
    )


def load_trained(
    path: str | Path,
    *,
    prefer: str = "best",
    create: CreateFn | None = None,
    name: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model saved at ``path`` (weights file, checkpoint folder or run folder) and its
    ``meta.json``; rebuilt from ``meta["arch"]`` and loaded strictly. A file without an
    eegfast record is read as :func:`reference_checkpoint` (``name``: the model it must be)."""
    from eegfast.models.checkpoint import check_weight_values
    from eegfast.train.checkpoint import load_weights, read_meta, resolve_weights_path

    meta = read_meta(path, prefer=prefer)
    if "arch" not in meta:
        if not Path(path).is_file():
            raise _no_record(path)
        arch, weights, meta = reference_checkpoint(path, name=name)
        check_weight_values(weights, str(path))  # (its keys and shapes are the model's)
        model = build_model(arch, create=create)
        model.load_state_dict(weights, strict=True)
        return model, meta
    weights = load_weights(path, prefer=prefer)
    source = resolve_weights_path(path, prefer=prefer)
    check_fits(meta["arch"], weights, source, create=create)
    model = build_model(meta["arch"], create=create)
    model.load_state_dict(weights, strict=True)
    return model, meta


def backbone_from_checkpoint(
    path: str | Path, *, drop_path: float | None = None, name: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone arch, backbone weights, meta) from a pretraining, upcycled or fine-tuned run,
    or from a checkpoint file without an eegfast record (:func:`reference_checkpoint`: the
    reference's ``labram-base.pth``, a classifier state dict, whose head is left behind, or
    braindecode ``Labram`` weights; ``name``: the model it must be).

    Pretraining checkpoints (masked or hybrid) are mapped to the classifier's keys with
    :func:`eegfast.models.pretrain_to_classifier_state_dict` (the pretraining-only settings,
    its drop path included, left behind); fine-tuned multi-task models give their
    ``backbone``. ``drop_path``: the backbone's stochastic depth (None keeps the checkpoint's).
    """
    from eegfast.models.checkpoint import check_weight_values
    from eegfast.train.checkpoint import load_weights, read_meta, resolve_weights_path

    meta = read_meta(path)
    arch = meta.get("arch")
    if arch is None:
        if not Path(path).is_file():
            raise _no_record(path)
        arch, weights, meta = reference_checkpoint(path, name=name)
        check_weight_values(weights, str(path))  # (its keys and shapes are the model's)
        if arch["kind"] == "classifier":  # its head was trained for the file's own classes
            arch = {**arch, "kwargs": {**arch["kwargs"], "num_classes": 0}}
            weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    else:
        weights = load_weights(path)
        check_fits(arch, weights, resolve_weights_path(path))
    kind = arch.get("kind")
    if kind in ("pretrain", "hybrid"):
        from eegfast.models import pretrain_to_classifier_state_dict

        name = arch["name"].removesuffix("_pretrain")
        kwargs = {
            k: v
            for k, v in dict(arch.get("kwargs") or {}).items()
            if k not in ("vocab_size", "hybrid", "mask_ratio", "drop_path_rate")
        }
        backbone = {"kind": "classifier", "name": name, "kwargs": {**kwargs, "num_classes": 0}}
        weights = pretrain_to_classifier_state_dict(weights)
    elif kind == "classifier":
        backbone = {k: v for k, v in arch.items() if k != "heads"}
        if arch.get("heads"):
            weights = {
                k.removeprefix("backbone."): v
                for k, v in weights.items()
                if k.startswith("backbone.")
            }
    else:
        raise ValueError(f"{path}: a {kind!r} checkpoint cannot initialise a classifier")
    if drop_path is not None:
        backbone = {**backbone, "kwargs": {**backbone["kwargs"], "drop_path_rate": drop_path}}
    return backbone, weights, meta
