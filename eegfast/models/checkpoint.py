"""Loading reference and eegfast checkpoints with strict, readable key checking.

Only safe formats are read: safetensors files (recognised by their suffix, in any case, or by
their content), and ``torch.load(weights_only=True)`` for any other file (tensors and plain
containers, and the argparse ``Namespace`` the reference training scripts save as ``args``;
arbitrary pickled objects are refused). Reference checkpoints wrap the state dict in
``{"model": ...}`` or ``{"module": ...}``, DistributedDataParallel adds ``module.`` to every key
and ``torch.compile`` ``_orig_mod.``, nested in either order; all of these are unwrapped. A
pretraining checkpoint (``student.*`` keys) loads into a classifier through
:func:`eegfast.models.pretrain.pretrain_to_classifier_state_dict`, and a braindecode ``Labram``
state dict (``position_embedding``, ``temporal_embedding``, ...) through
:func:`braindecode_to_eegfast_state_dict`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eegfast.models.labram import LaBraM, LaBraMConfig
from eegfast.models.pretrain import pretrain_to_classifier_state_dict

WRAPPER_KEYS = ("model", "module", "state_dict", "model_state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model (message lists them)."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did: keys missing from the checkpoint, unexpected keys,
    shape mismatches, and keys deliberately left at their initialisation (e.g. a classifier
    head when loading a pretrained backbone)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        return "\n".join([f"loaded {len(self.loaded)} tensors", *self.difference_lines()])

    def difference_lines(self, source: str = "checkpoint", shown: int | None = None) -> list[str]:
        """The keys that differ, by kind (layer numbers collapsed); at most ``shown`` lines of
        shapes (a huge model differs in hundreds of keys at once)."""
        lines = []
        for title, keys in (
            (f"missing from the {source}", self.missing),
            (f"unexpected in the {source}", self.unexpected),
            ("left at initialisation", self.initialised),
        ):
            if keys:
                lines.append(f"{len(keys)} keys {title}:")
                lines.extend(f"  {line}" for line in summarise_keys(keys))
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} keys with a different shape (model vs file):")
            lines.extend(
                f"  {key}: {list(want)} vs {list(got)}"
                for key, want, got in self.mismatched[:shown]
            )
            if shown is not None and len(self.mismatched) > shown:
                lines.append(f"  ... and {len(self.mismatched) - shown} more")
        return lines


def summarise_keys(keys: Sequence[str]) -> list[str]:
    """Collapse layer numbers: ``blocks.{0..11}.attn.q_bias`` instead of twelve lines."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for key in keys:
        numbers = re.findall(r"\.(\d+)\.", key)
        pattern = re.sub(r"\.(\d+)\.", ".{}.", key, count=1) if numbers else key
        if pattern not in groups:
            groups[pattern] = []
            order.append(pattern)
        if numbers:
            groups[pattern].append(int(numbers[0]))
    out = []
    for pattern in order:
        layers = sorted(set(groups[pattern]))
        if not layers:
            out.append(pattern)
        elif len(layers) == 1:
            out.append(pattern.replace("{}", str(layers[0])))
        else:
            span = (
                f"{layers[0]}..{layers[-1]}"
                if layers == list(range(layers[0], layers[-1] + 1))
                else ",".join(map(str, layers))
            )
            out.append(pattern.replace("{}", "{" + span + "}"))
    return out


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a safetensors file, whatever its name: the format starts with an
    8-byte little-endian header length followed by the JSON header's ``{``."""
    path = Path(path)
    with path.open("rb") as file:
        start = file.read(9)
    if len(start) < 9 or start[8:9] != b"{":
        return False
    (header_length,) = struct.unpack("<Q", start[:8])
    return 0 < header_length <= path.stat().st_size - 8


@contextlib.contextmanager
def safetensors_file_errors(path: str | os.PathLike) -> Iterator[None]:
    """Reading the safetensors file ``path`` inside: safetensors' own error (no file name, and
    no ValueError: the commands showed a traceback) becomes a ValueError naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise ValueError(
            f"{path}: cannot read this safetensors file (corrupt or truncated?): {error}"
        ) from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (``.safetensors`` in any case, or any name with
    safetensors content), or of a torch file read with ``weights_only=True`` (wrappers and
    prefixes removed, see :func:`unwrap_state_dict`).

    Raises FileNotFoundError for a missing file and ValueError naming the file, with the
    reader's own reason, for a corrupt or truncated file and for pickled non-tensor objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix.lower() == ".safetensors" or is_safetensors_file(path):
        from safetensors.torch import load_file

        with safetensors_file_errors(path):
            return unwrap_state_dict(load_file(str(path)), source=str(path))
    try:
        # The reference LaBraM's training scripts save their argparse options beside the
        # weights ({"model": ..., "optimizer": ..., "args": Namespace(...)}): a Namespace only
        # carries attributes, built from what weights_only allows, so it is let through.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _weights_only_reason(error)
        if not reason.startswith("Unsupported operand"):
            raise ValueError(
                f"{path}: refused to unpickle non-tensor objects (eegfast loads checkpoints "
                "with weights_only=True). Re-save only the state dict, e.g. "
                "torch.save({'model': state_dict}, ...), or convert it to safetensors. "
                f"torch said: {reason}"
            ) from error
        # an opcode that no pickle of tensors holds: the bytes are not a pickle at all
        raise _unreadable(path, reason) from error
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as error:
        # Corrupt or truncated: the zip reader raises RuntimeError, or OSError (EINVAL, no
        # file name) for a zip cut short mid-way; the legacy and pickle readers EOFError, and
        # KeyError / IndexError / UnicodeDecodeError for bytes that are no pickle (a text file).
        text = str(error).splitlines()[0] if str(error) else ""
        reason = f"{type(error).__name__}: {text}" if isinstance(error, LookupError) else text
        raise _unreadable(path, reason) from error
    state = unwrap_state_dict(obj, source=str(path))
    # A pickled tensor may be a view that repeats its data (strides of 0, as expand() makes):
    # a (2e6, 100) lm_head from one stored float. The model built from such shapes (a hybrid
    # model's sizes are read from them) took 4.8 GB from a 1.2 MB file, and any size more;
    # no model's state dict holds such views (safetensors cannot: its data cover each tensor).
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # (sparse and other layouts have no storage to compare: NotImplementedError naming no file)
    other_layout = [f"{k} ({v.layout})" for k, v in tensors.items() if v.layout != torch.strided]
    if other_layout:
        raise ValueError(
            f"{path}: not weights as a model saves them: {_first(other_layout)} are not dense "
            "tensors; save .to_dense() copies"
        )
    repeated = [
        f"{key} {tuple(value.shape)}"
        for key, value in tensors.items()
        if value.numel() * value.element_size() > value.untyped_storage().nbytes()
    ]
    if repeated:
        raise ValueError(
            f"{path}: not weights as a model saves them: {_first(repeated)} repeat their "
            "stored values (a view of fewer numbers than its shape holds, as expand() makes); "
            "save .contiguous() copies"
        )
    return state


def check_weight_values(
    state: Mapping[str, torch.Tensor],
    source: str,
    expected: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse weights that load without an error into a model that cannot work: a tensor that
    is not floating point (int64 or bool weights: ``load_state_dict`` casts them without a
    word, and whole numbers are no trained weights), or one holding NaN or infinity (every
    output would be NaN, and predictions the first class: a run that diverged, or a damaged
    file). Other floating dtypes (float64, float16, bfloat16) are fine: they are cast on load.

    ``expected``: the model's state dict; only its keys whose tensor is floating point are
    checked (None: every tensor of ``state``). ValueError naming ``source`` and the first keys.
    """
    wrong_type, non_finite = [], []
    for key, value in state.items():
        if expected is not None and not (key in expected and expected[key].is_floating_point()):
            continue
        if not value.is_floating_point():
            wrong_type.append(f"{key} ({str(value.dtype).removeprefix('torch.')})")
        elif not value.is_meta and not bool(torch.isfinite(value).all()):  # (meta: no values)
            non_finite.append(key)
    problems = []
    if wrong_type:
        problems.append(f"{len(wrong_type)} tensors are not floating point: {_first(wrong_type)}")
    if non_finite:
        problems.append(f"{len(non_finite)} tensors hold NaN or inf: {_first(non_finite)}")
    if problems:
        raise ValueError(
            f"{source}: not usable weights ({'; '.join(problems)}); a model loaded from them "
            "gives no meaningful output: use another checkpoint (an earlier one of its run, "
            "checkpoints/step-*), or download the file again"
        )


def _first(keys: Sequence[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _unreadable(path: Path, reason: str) -> ValueError:
    detail = f"torch said: {reason}" if reason else "the file ends too early"
    return ValueError(
        f"{path}: not a readable checkpoint (corrupt or truncated file, or neither a torch.save "
        f"nor a safetensors file); {detail}"
    )


# The first lines of torch's weights_only refusal, before its reason.
_TORCH_PREAMBLE = ("Weights only load failed", "Check the documentation of torch.load")


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    """torch's own reason for refusing a file (the first line after "WeightsUnpickler error:");
    the message's first line is only torch's generic preamble."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A global from a blocked module (os.system, ...) comes without the marker: its reason
    # ("Trying to load unsupported GLOBAL posix.system ...") follows the preamble, which itself
    # says that loading with weights_only=False "will likely succeed".
    reason = next((line for line in lines if not line.startswith(_TORCH_PREAMBLE)), None)
    return reason if reason is not None else (lines[0] if lines else "")


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside ``obj``: descends through ``model``/``module``/``state_dict``
    wrappers and strips ``module.`` / ``_orig_mod.`` key prefixes, nested in any order
    (``torch.compile(DDP(model))`` saves ``_orig_mod.module.*``, ``DDP(torch.compile(model))``
    ``module._orig_mod.*``)."""
    seen: set[int] = set()  # ids of the wrappers descended through
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        seen.add(id(obj))
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is not None and id(inner) in seen:
            # a pickle can hold a dict inside itself (d["model"] = d): the descent never ended
            raise ValueError(
                f"{source}: not a state dict: its {WRAPPER_KEYS} wrappers hold each other in a loop"
            )
        if inner is None:
            # (sorted by text: keys of mixed types, 1 and 'a', made sorted() a TypeError)
            raise ValueError(
                f"{source}: no state dict found (top-level keys {sorted(obj, key=repr)[:8]}; "
                f"expected tensors or one of the wrappers {WRAPPER_KEYS})"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    odd = [key for key in obj if not isinstance(key, str)]
    if odd:  # (key.startswith below: an AttributeError naming nothing)
        raise ValueError(
            f"{source}: not a state dict: its tensors must be named by strings, got keys "
            f"{odd[:5]!r}"
        )
    out = {}
    for key, value in obj.items():
        while key.startswith(KEY_PREFIXES):
            prefix = next(p for p in KEY_PREFIXES if key.startswith(p))
            key = key[len(prefix) :]
        out[key] = value
    return out


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the weights inside ``torch.compile`` / DistributedDataParallel /
    DataParallel wrappers (nested in any order); ``model`` itself if it is none of them.

    Their state dicts prefix every key with ``_orig_mod.`` or ``module.``, which a checkpoint's
    keys have stripped (see :func:`unwrap_state_dict`): loading into the wrapper would find
    every key missing.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    exclude: Sequence[str] = (),
) -> LoadReport:
    """Load ``source`` (a file or a state dict) into ``model`` with key and shape checks.

    A state dict may be wrapped as a training script saves it (``{"model": state_dict}``,
    ``module``/``state_dict`` wrappers, ``module.``/``_orig_mod.`` key prefixes:
    :func:`unwrap_state_dict`), in memory as in a file.

    ``model`` may be wrapped by ``torch.compile`` or (Distributed)DataParallel: the weights
    load into the wrapped module (:func:`unwrap_model`).

    A pretraining checkpoint (``student.*``) loaded into a :class:`LaBraM` classifier keeps
    the backbone and leaves ``fc_norm``/``head`` at their initialisation (reported as such).
    ``exclude``: key prefixes to skip on both sides (e.g. ``("head.",)`` to re-initialise a
    head with another number of classes). With ``strict`` any missing, unexpected or
    mismatched key raises :class:`CheckpointMismatchError` with a readable report and nothing
    is loaded; otherwise the matching tensors are loaded and the report returned. Weights that
    are not floating point, or hold NaN or inf, raise ValueError either way (nothing loaded;
    :func:`check_weight_values`); other float dtypes are cast to the model's.
    """
    model = unwrap_model(model)
    if isinstance(source, Mapping):
        state = unwrap_state_dict(source)
        name = "state dict"
    else:
        state = read_state_dict(source)
        name = str(source)
    expected = model.state_dict()
    initialised: list[str] = []
    hints: list[str] = []
    if isinstance(model, LaBraM) and any(k.startswith("student.") for k in state):
        state = pretrain_to_classifier_state_dict(state)
        initialised = [k for k in expected if k.startswith(("fc_norm.", "head."))]
    elif isinstance(model, LaBraM) and is_braindecode_labram_state_dict(state):
        hints = _braindecode_hints(state, expected)
        state = braindecode_to_eegfast_state_dict(state)
    skip = tuple(exclude) + tuple(initialised)
    report = _compare_shapes(
        {k: v for k, v in state.items() if not k.startswith(skip)},
        {k: v for k, v in expected.items() if not k.startswith(skip)},
    )
    report.initialised = list(initialised)
    if strict and not report.ok:
        hints += _table_size_hints(report.mismatched, said=" ".join(hints))
        hint = "".join(f"\n{line}" for line in hints)
        raise CheckpointMismatchError(
            f"{name} does not match {type(model).__name__}:\n{report}{hint}"
        )
    loaded = {k: state[k] for k in report.loaded}
    check_weight_values(loaded, name, expected)  # (strict or not: NaN weights are never meant)
    model.load_state_dict(loaded, strict=False)
    return report


# The embedding tables whose rows are a config field: (key suffix, field, what a row is).
_TABLES = (
    ("pos_embed", "pos_rows", "electrode"),
    ("time_embed", "max_patches", "patch (time)"),
)


def _table_size_hints(
    mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]], *, said: str = ""
) -> list[str]:
    """For an electrode or time embedding table with another number of rows than the model's
    (a checkpoint with an extended electrode table, 129 vs e.g. 137 rows, or another window
    length), the config field that sizes it: eegfast does not resize tables on load.
    ``said``: the hints given already (braindecode's names ``max_patches``); a field they
    name is not named again."""
    hints = []
    for key, want, got in mismatched:
        for suffix, field_name, row in _TABLES:
            same_width = len(want) == len(got) == 3 and want[2] == got[2]
            if key.rsplit(".", 1)[-1] != suffix or not same_width or want[1] == got[1]:
                continue
            if f"{field_name}=" not in said:
                hints.append(
                    f"{key}: the file's {row} table has {got[1]} rows, the model's {want[1]}; "
                    f"build the model with create_model(name, {field_name}={got[1]}) "
                    "(tables are not resized on load)"
                )
    return hints


# braindecode's ``Labram`` (``braindecode.models.Labram``, braindecode 1.8) in its default
# neural-tokenizer mode computes the reference's classifier (same patch embedding, embeddings,
# blocks, electrode table and token order) under other names; with ``use_mean_pooling=True``
# it also pools as the reference (mean patch token -> ``fc_norm`` -> head).
_BRAINDECODE_RENAMES = (
    (re.compile(r"^position_embedding$"), "pos_embed"),
    (re.compile(r"^temporal_embedding$"), "time_embed"),
    (re.compile(r"^patch_embed\.temporal_conv\."), "patch_embed."),
    (re.compile(r"^(blocks\.\d+\.mlp)\.0\."), r"\1.fc1."),  # MLP: Linear, GELU, Linear, Dropout
    (re.compile(r"^(blocks\.\d+\.mlp)\.2\."), r"\1.fc2."),
    (re.compile(r"^final_layer\."), "head."),
)


def is_braindecode_labram_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has braindecode ``Labram`` key names (its embeddings or its patch
    embedding's submodule names), which no reference or eegfast state dict has."""
    return any(
        key in ("position_embedding", "temporal_embedding")
        or key.startswith(("patch_embed.temporal_conv.", "patch_embed.segment_patch."))
        for key in state
    )


def braindecode_to_eegfast_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A braindecode ``Labram`` state dict under the reference's (and eegfast's) key names.

    ``position_embedding`` -> ``pos_embed`` (the same 129 rows: cls, then braindecode's
    ``LABRAM_CHANNEL_ORDER``, which is the reference's electrode list), ``temporal_embedding``
    -> ``time_embed`` (braindecode sizes it ``n_times // patch_size + 1`` rows and uses the
    first ``n_times // patch_size``, as eegfast does: build the eegfast model with that
    ``max_patches``), ``patch_embed.temporal_conv.*`` -> ``patch_embed.*``,
    ``blocks.N.mlp.{0,2}.*`` -> ``blocks.N.mlp.{fc1,fc2}.*``, ``final_layer.*`` -> ``head.*``;
    every other key (``cls_token``, ``blocks.N.attn.*``, norms, ``gamma_*``, ``fc_norm.*``) is
    kept. Keys with no eegfast counterpart (braindecode's ``norm.*`` of cls-token pooling,
    its decoder mode, ``learned_patcher``) are kept too, and :func:`load_checkpoint` reports
    them. Tensors are not copied.

    braindecode looks electrode names up as written (``T3`` takes the table's ``T3`` row):
    give ``create_model`` the same ``ch_names`` with ``modern_names=False`` for the same rows.
    """
    out = {}
    for key, value in state.items():
        for pattern, replacement in _BRAINDECODE_RENAMES:
            key, count = pattern.subn(replacement, key)
            if count:
                break
        out[key] = value
    return out


def _braindecode_hints(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> list[str]:
    """Why a braindecode ``Labram`` state dict may not fit eegfast's LaBraM: one line per
    braindecode option that has no eegfast counterpart or needs another eegfast config."""
    hints = []
    if "norm.weight" in state and "fc_norm.weight" not in state:
        hints.append(
            "braindecode's Labram was built with use_mean_pooling=False (its default): it "
            "classifies the cls token after a final `norm`, eegfast's LaBraM (as the reference "
            "classifier) the mean patch token after `fc_norm`. Build it with "
            "use_mean_pooling=True, or load the backbone only (strict=False, "
            "exclude=('fc_norm.', 'head.'))."
        )
    if any(k.startswith("patch_embed.segment_patch.proj.") or "relative_position" in k
           for k in state):  # fmt: skip
        hints.append(
            "braindecode's Labram was built with neural_tokenizer=False (its decoder mode: a "
            "channel-averaged Conv2d patch projection and relative position bias), which is not "
            "the LaBraM classifier; eegfast has no equivalent."
        )
    if any(k.startswith("patch_embed.segment_patch.patcher.") for k in state):
        hints.append(
            "braindecode's Labram was built with learned_patcher=True (a learned convolution "
            "before the temporal conv), which the reference LaBraM does not have."
        )
    if "position_embedding" not in state and "pos_embed" in expected:
        hints.append(
            "braindecode's Labram was built with use_abs_pos_emb=False (no electrode "
            "embedding); eegfast's LaBraM always adds one."
        )
    rows = state.get("temporal_embedding")
    want = expected.get("time_embed")
    if rows is not None and want is not None and rows.dim() == 3 and rows.shape != want.shape:
        hints.append(
            f"braindecode's temporal_embedding has {rows.shape[1]} rows (n_times // patch_size "
            f"+ 1): create the eegfast model with max_patches={rows.shape[1]}."
        )
    return hints


# --- Checkpoint files without an eegfast architecture record --------------------------------
# The reference's released files (``labram-base.pth``: the pretraining wrapper, ``student.*``;
# ``vqnsp.pth``: the tokenizer), a plain classifier state dict, or braindecode ``Labram``
# weights carry no config: which registered model they are is read from their tensor shapes.

# Where each kind keeps its backbone transformer (embed dim, blocks, embeddings).
_BACKBONE_PREFIX = {"classifier": "", "pretrain": "student.", "tokenizer": "encoder."}


@dataclass(frozen=True)
class InferredArchitecture:
    """The registered model a state dict fits: ``create_model(name, **kwargs)`` has exactly
    its keys and shapes.

    ``kind``: ``"classifier"`` (:class:`LaBraM`), ``"pretrain"``
    (:class:`~eegfast.models.pretrain.LaBraMPretrain`) or ``"tokenizer"``
    (:class:`~eegfast.models.vqnsp.VQNSP`); ``kwargs``: only the config fields read from the
    file that differ from ``name``'s (classes, vocabulary or codebook size, electrode-table
    rows, time-embedding length).
    """

    kind: str
    name: str
    kwargs: dict[str, Any]


def checkpoint_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"pretrain"`` (``student.*``), ``"tokenizer"`` (``quantize.*``, or ``encoder.*`` with
    ``decoder.*``), ``"classifier"`` (a LaBraM backbone's own keys, under the reference's or
    braindecode's names) or None for anything else."""
    if any(k.startswith("student.") for k in state):
        return "pretrain"
    if any(k.startswith("quantize.") for k in state) or (
        any(k.startswith("encoder.") for k in state)
        and any(k.startswith("decoder.") for k in state)
    ):
        return "tokenizer"
    if is_braindecode_labram_state_dict(state) or any(
        k in ("cls_token", "pos_embed", "time_embed") or k.startswith("blocks.") for k in state
    ):
        return "classifier"
    return None


def infer_architecture(
    state: Mapping[str, torch.Tensor], *, name: str | None = None, source: str = "checkpoint"
) -> InferredArchitecture:
    """Which registered model (:func:`eegfast.models.list_models`) ``state`` is, from its
    tensor shapes alone (candidates are built on the meta device: nothing is allocated).

    ``state``: an unwrapped state dict (:func:`read_state_dict`; braindecode ``Labram`` names
    are read as their eegfast counterparts). The kind comes from the keys
    (:func:`checkpoint_kind`), the candidates from the backbone's embed dim and number of
    blocks (and the tokenizer's decoder blocks), the kwargs from the head (classes),
    ``lm_head`` (vocabulary), the codebook (codes, code dim), the ``pos_embed`` rows and the
    ``time_embed`` length; then every key and shape must match the candidate.
    ``name``: the model the caller expects instead of the candidates (a classifier name also
    stands for its pretraining model and the reverse: ``labram_base`` for ``student.*`` weights
    of ``labram_base_pretrain``).

    Raises ValueError naming ``source`` and what was found when the kind is unknown or no model
    (or more than one) fits, and :class:`CheckpointMismatchError` listing the keys and shapes
    that differ when the expected model does not fit.
    """
    from eegfast.models.registry import MODEL_CONFIGS, create_model, list_models

    kind = checkpoint_kind(state)
    if kind is None:
        raise ValueError(
            f"{source}: not a LaBraM checkpoint eegfast knows (no 'student.', 'quantize.', "
            f"'blocks.' or embedding keys; found e.g. {sorted(state)[:4]}); give an eegfast run, "
            "a reference LaBraM or VQ-NSP checkpoint, or braindecode Labram weights"
        )
    braindecode = kind == "classifier" and is_braindecode_labram_state_dict(state)
    original = state
    if braindecode:
        state = braindecode_to_eegfast_state_dict(state)
    found = _size_in_file(state, kind)
    described = f"{source}: a {kind} checkpoint ({_say_size(found)})"
    same_kind = [n for n in list_models() if _kind_of(MODEL_CONFIGS[n]) == kind]
    if name is not None:
        candidates = [_named_for_kind(name, kind, MODEL_CONFIGS, described)]
    else:
        candidates = [n for n in same_kind if _size_of(MODEL_CONFIGS[n]) == found]
        if not candidates:
            known = "; ".join(f"{n}: {_say_size(_size_of(MODEL_CONFIGS[n]))}" for n in same_kind)
            raise ValueError(f"{described}, which no registered model has ({known})")
    fits: list[InferredArchitecture] = []
    problems: list[str] = []
    for candidate in candidates:
        kwargs = _kwargs_in_file(state, kind, MODEL_CONFIGS[candidate])
        try:
            expected = create_model(candidate, device="meta", **kwargs).state_dict()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{described} cannot be built as {candidate}: {error}") from None
        report = _compare_shapes(state, expected)
        if report.ok:
            fits.append(InferredArchitecture(kind, candidate, kwargs))
            continue
        hints = _braindecode_hints(original, expected) if braindecode else []
        size = _size_of(MODEL_CONFIGS[candidate])
        title = f"{candidate} ({_say_size(size)})" if size != found else candidate
        problems.append("\n".join([f"{title}: {_say_differences(report)}", *hints]))
    if len(fits) == 1:
        return fits[0]
    if fits:
        names = ", ".join(f.name for f in fits)
        raise ValueError(
            f"{described} fits several models ({names}): name the one it is (model.name)"
        )
    raise CheckpointMismatchError(f"{described} does not fit " + "\n".join(problems))


def _say_differences(report: LoadReport, shown: int = 10) -> str:
    """The keys of ``report`` that differ, at most ``shown`` shape lines."""
    lines = [f"{len(report.loaded)} keys fit", *report.difference_lines("file", shown)]
    return "\n".join(lines)


def read_reference_checkpoint(
    path: str | os.PathLike, *, name: str | None = None
) -> tuple[InferredArchitecture, dict[str, torch.Tensor]]:
    """The architecture (:func:`infer_architecture`) and the tensors of a checkpoint file
    without an eegfast architecture record, read safely (:func:`read_state_dict`); braindecode
    ``Labram`` keys come back under the eegfast names, so that
    ``create_model(found.name, **found.kwargs).load_state_dict(state)`` loads every key."""
    state = read_state_dict(path)
    found = infer_architecture(state, name=name, source=str(path))
    if found.kind == "classifier" and is_braindecode_labram_state_dict(state):
        state = braindecode_to_eegfast_state_dict(state)
    return found, state


def _kind_of(config) -> str:
    from eegfast.models.vqnsp import VQNSPConfig

    if isinstance(config, VQNSPConfig):
        return "tokenizer"
    return "classifier" if isinstance(config, LaBraMConfig) else "pretrain"


def _backbone_config(config) -> LaBraMConfig:
    """The config of the transformer whose embeddings and blocks tell models apart."""
    kind = _kind_of(config)
    if kind == "classifier":
        return config
    return config.backbone if kind == "pretrain" else config.encoder


def _size_of(config) -> dict[str, int]:
    """The sizes that tell registered models apart without building them."""
    backbone = _backbone_config(config)
    size = {"embed dim": backbone.embed_dim, "blocks": backbone.depth}
    if _kind_of(config) == "tokenizer":
        size["decoder blocks"] = config.decoder.depth
    return size


def _size_in_file(state: Mapping[str, torch.Tensor], kind: str) -> dict[str, int | None]:
    """The same sizes read from a state dict (None where its keys do not tell)."""

    def sizes(prefix: str) -> tuple[int | None, int]:
        embed = None
        for key in ("cls_token", "pos_embed", "blocks.0.norm1.weight"):
            tensor = state.get(prefix + key)
            if tensor is not None and tensor.dim() >= 1:
                embed = int(tensor.shape[-1])
                break
        pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
        blocks = {match.group(1) for key in state if (match := pattern.match(key))}
        return embed, len(blocks)

    embed, depth = sizes(_BACKBONE_PREFIX[kind])
    size: dict[str, int | None] = {"embed dim": embed, "blocks": depth}
    if kind == "tokenizer":
        size["decoder blocks"] = sizes("decoder.")[1]
    return size


def _say_size(size: Mapping[str, int | None]) -> str:
    return ", ".join(f"{key} {'?' if value is None else value}" for key, value in size.items())


def _named_for_kind(name: str, kind: str, configs: Mapping[str, Any], described: str) -> str:
    """The registered model of ``kind`` that ``name`` stands for (``labram_base`` and
    ``labram_base_pretrain`` for each other)."""
    if name not in configs:
        raise ValueError(
            f"{described}; the model named for it, {name!r}, is not registered; available: "
            f"{', '.join(sorted(configs))}"
        )
    if _kind_of(configs[name]) == kind:
        return name
    # a classifier name stands for its pretraining model and the reverse
    swapped = f"{name}_pretrain" if kind == "pretrain" else name.removesuffix("_pretrain")
    if kind != "tokenizer" and swapped in configs and _kind_of(configs[swapped]) == kind:
        return swapped
    raise ValueError(
        f"{described}, but the model named for it, {name}, is a {_kind_of(configs[name])} model"
    )


def _kwargs_in_file(state: Mapping[str, torch.Tensor], kind: str, config) -> dict[str, Any]:
    """Config fields the file sets differently from ``config``: classes (``head``, 0 without
    one), vocabulary (``lm_head``), codebook size and code dim, q/v biases, q/k norms and layer
    scale (their keys), ``pos_embed`` rows and ``time_embed`` length (the tokenizer's two
    transformers keep their configs' own: a file with others does not fit)."""
    kwargs: dict[str, Any] = {}
    if kind == "tokenizer":
        codebook = state.get("quantize.embedding.weight")
        if codebook is not None and codebook.dim() == 2:
            for field_name, value in (
                ("num_codes", codebook.shape[0]),
                ("code_dim", codebook.shape[1]),
            ):
                if int(value) != getattr(config, field_name):
                    kwargs[field_name] = int(value)
        return kwargs
    if kind == "classifier":
        head = state.get("head.weight")
        classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 0
        if classes != config.num_classes:
            kwargs["num_classes"] = classes
    else:
        head = state.get("lm_head.weight", state.get("student.lm_head.weight"))
        if head is not None and head.dim() == 2 and int(head.shape[0]) != config.vocab_size:
            kwargs["vocab_size"] = int(head.shape[0])
    backbone = _backbone_config(config)
    prefix = _BACKBONE_PREFIX[kind]
    if any(k.startswith(f"{prefix}blocks.0.") for k in state):
        # attention options that add or remove keys (braindecode's Labram takes qkv_bias=True)
        block = {k.removeprefix(f"{prefix}blocks.0.") for k in state}
        options = {"qkv_bias": "attn.q_bias" in block, "qk_norm": "attn.q_norm.weight" in block}
        for field_name, value in options.items():
            if value != getattr(backbone, field_name):
                kwargs[field_name] = value
        if "gamma_1" not in block and backbone.init_values:
            kwargs["init_values"] = 0.0  # no layer scale
    for key, field_name in (("pos_embed", "pos_rows"), ("time_embed", "max_patches")):
        tensor = state.get(prefix + key)
        if (
            tensor is not None
            and tensor.dim() == 3
            and tensor.shape[1] != getattr(backbone, field_name)
        ):
            kwargs[field_name] = int(tensor.shape[1])
    return kwargs


def _compare_shapes(
    state: Mapping[str, torch.Tensor | Sequence[int]],
    expected: Mapping[str, torch.Tensor | Sequence[int]],
) -> LoadReport:
    """Keys and shapes of the file's ``state`` against the model's ``expected`` (tensors, or
    their shapes: a resume compares a weights file's header, read without its tensors), as a
    :class:`LoadReport` (``mismatched``: key, model's shape, file's shape)."""
    report = LoadReport()
    for key, value in state.items():
        if key not in expected:
            report.unexpected.append(key)
            continue
        got, want = _shape_of(value), _shape_of(expected[key])
        if got != want:
            report.mismatched.append((key, want, got))
        else:
            report.loaded.append(key)
    report.missing = [k for k in expected if k not in state]
    return report


def _shape_of(value: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
