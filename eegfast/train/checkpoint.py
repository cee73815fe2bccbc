"""Checkpoints: one folder per optimiser step, written atomically, with retention and resume.

Layout of ``<run>/checkpoints/step-00000120/``:

- ``model.safetensors``: the weights (full, unsharded state dict).
- ``state.pt``: optimiser, scheduler, grad scaler, RNG states, sampler position and the step
  scalars not logged yet (since the last log point), written with ``torch.save`` and read back
  with ``weights_only=True`` (only tensors and plain containers).
- ``meta.json``: step, epoch, the tracked metric and the model's name/arguments.

The folder is assembled under a hidden temporary name, every file and the folder are fsynced,
and it is renamed into place with ``os.replace``; the parent folder is fsynced last. A process
killed at any moment therefore leaves only complete ``step-*`` folders (plus, at worst, one
``.tmp-step-<step>-<pid>`` folder that the next save removes once that process is gone).
``latest_checkpoint`` picks the newest complete one.

Saving a step that is already there (the final save after a periodic one) first renames the old
folder aside to ``.old-step-<step>-<pid>``, then the new one into place, then deletes the old:
a kill between the two renames leaves the old folder complete under its aside name, which
``list_checkpoints`` reports as that step while no ``step-<step>`` exists, and which the next
save puts back (or deletes, once ``step-<step>`` is there again).

A run resumed from an older checkpoint (step S) abandons the checkpoints after S that the run it
continues went on to write: :func:`set_aside_after` moves them to
``abandoned-after-step-<S>/``, where neither ``--resume auto``, the best-checkpoint choice nor
retention sees them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eegfast.fileio import free_space_note, fsync_dir, fsync_file

STEP_DIR = re.compile(r"^step-(\d{8})$")
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    meta: dict[str, Any]


def _plain_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors sharing storage are cloned (safetensors refuses aliases)."""
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


TMP_DIR = re.compile(r"^\.tmp-step-\d{8}-(\d+)$")
# A step's previous folder, renamed aside while a save replaces it (``.old-step-<step>-<pid>``).
OLD_DIR = re.compile(r"^\.old-step-(\d{8})-(\d+)$")


def _is_stale(tmp: Path) -> bool:
    """A temporary folder left by this process or by one that no longer runs; never one that
    another live process is writing (``.tmp-step-<step>-<pid>``; other names are left alone)."""
    match = TMP_DIR.match(tmp.name)
    if match is None:
        return False
    return _writer_gone(int(match.group(1)))


def _writer_gone(pid: int) -> bool:
    """Whether the process ``pid`` (a folder's writer) is this one or no longer runs."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive (another user's), or unknown: keep it
    return False


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write ``checkpoint_dir/step-<step>/`` atomically and return its path."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoint_dir.glob(".tmp-*"):
        if _is_stale(stale):
            shutil.rmtree(stale, ignore_errors=True)
    _settle_replaced(checkpoint_dir)
    final = checkpoint_dir / f"step-{step:08d}"
    tmp = checkpoint_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        try:
            save_file(_plain_weights(weights), str(tmp / WEIGHTS), metadata={"step": str(step)})
            torch.save(state, tmp / STATE)
            (tmp / META).write_text(
                json.dumps({"step": step, **meta}, indent=2, default=str), encoding="utf-8"
            )
            for name in (WEIGHTS, STATE, META):
                fsync_file(tmp / name)
            fsync_dir(tmp)
        except (OSError, RuntimeError, SafetensorError) as error:
            raise _write_error(final, error) from error
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            # Never a moment without a complete copy of the step: the old folder goes aside
            # (where list_checkpoints still finds it) and is deleted once the new one is in.
            aside = checkpoint_dir / f".old-step-{step:08d}-{os.getpid()}"
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(aside, final)
                raise
            fsync_dir(checkpoint_dir)
            shutil.rmtree(aside, ignore_errors=True)  # a leftover: removed by the next save
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(checkpoint_dir)
    return final


def _write_error(final: Path, error: Exception) -> OSError:
    """A failed checkpoint write (a full disk, a quota) as an OSError naming the checkpoint:
    safetensors' and torch.save's own errors name no file, and torch's zip writer says only
    "unexpected pos 704 vs 598"; the space left on the disk tells the likely cause."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    reason = reason.splitlines()[0] if reason else type(error).__name__
    message = f"cannot write the checkpoint {final} ({reason}{free_space_note(final.parent)})"
    code = getattr(error, "errno", None)
    return OSError(code, message) if code is not None else OSError(message)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (WEIGHTS, STATE, META))


def _settle_replaced(checkpoint_dir: Path) -> None:
    """Old step folders set aside by a save that did not finish (its process is gone): put one
    back where no ``step-<step>`` replaced it, delete it otherwise."""
    for old in checkpoint_dir.glob(".old-step-*"):
        match = OLD_DIR.match(old.name)
        if match is None or not _writer_gone(int(match.group(2))):
            continue
        final = checkpoint_dir / f"step-{match.group(1)}"
        if not _complete(final) and _complete(old):
            if final.exists():  # not one of ours: a save leaves no incomplete step-* folder
                shutil.rmtree(final)
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(checkpoint_dir)


def list_checkpoints(checkpoint_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first.

    A step whose ``step-<step>`` folder is missing but whose old folder a save had set aside
    (``.old-step-<step>-<pid>``, complete: the save was killed between its two renames) is
    listed with that folder's path."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found: dict[int, CheckpointInfo] = {}
    aside: dict[int, Path] = {}
    for path in checkpoint_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / META).is_file() and (path / WEIGHTS).is_file():
            step = int(match.group(1))
            found[step] = CheckpointInfo(path, step, _read_meta_file(path / META))
        old = OLD_DIR.match(path.name)
        if old and _complete(path):
            aside[int(old.group(1))] = path
    for step, path in aside.items():
        if step not in found:
            found[step] = CheckpointInfo(path, step, _read_meta_file(path / META))
    return [found[step] for step in sorted(found)]


def _read_meta_file(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; ValueError naming it when it is no JSON object (edited
    by hand, or damaged: saves write it atomically), which json's own error does not."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        # (RecursionError: `[[[[...` nested past json's recursion, a traceback naming nothing)
        raise ValueError(f"{path}: not a readable checkpoint meta.json ({error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def set_aside_after(checkpoint_dir: str | Path, step: int) -> tuple[Path | None, list[Path]]:
    """Move the checkpoints after ``step`` (those of a run that a resume from ``step`` abandons)
    into ``checkpoint_dir/abandoned-after-step-<step>/`` (``-2``, ``-3``... when taken).

    Returns the folder and the moved checkpoints' former paths ((None, []) when none)."""
    checkpoint_dir = Path(checkpoint_dir)
    newer = [c for c in list_checkpoints(checkpoint_dir) if c.step > step]
    if not newer:
        return None, []
    base = checkpoint_dir / f"abandoned-after-step-{step:08d}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    target.mkdir()
    for info in newer:
        os.replace(info.path, target / f"step-{info.step:08d}")
    fsync_dir(target)
    fsync_dir(checkpoint_dir)
    return target, [c.path for c in newer]


def latest_checkpoint(checkpoint_dir: str | Path) -> CheckpointInfo | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _ranked_by(meta: dict[str, Any]) -> float | None:
    """The finite metric that ranks a checkpoint, or None. A checkpoint the training engine
    wrote (its meta holds the run's ``config``) ranks only by a held-out loss: it names it
    (``metric_name``), or, written before the name was recorded, its run held data out
    (``validation``); before then the engine gave the training loss since the checkpoint before
    as the metric of runs without held-out data, which does not rank models."""
    metric = meta.get("metric")
    if not isinstance(metric, int | float) or not math.isfinite(metric):
        return None
    if "config" in meta and meta.get("metric_name") is None and "validation" not in meta:
        return None
    return float(metric)


def best_checkpoint(checkpoint_dir: str | Path) -> CheckpointInfo | None:
    """The checkpoint with the lowest ``meta["metric"]`` (ties: the later one), None when no
    checkpoint has one (a run without held-out data); a NaN or infinite metric (an evaluation
    that failed) never makes a checkpoint the best."""
    scored = [c for c in list_checkpoints(checkpoint_dir) if _ranked_by(c.meta) is not None]
    if not scored:
        return None
    return min(reversed(scored), key=lambda c: _ranked_by(c.meta))


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints and the best one; return deleted."""
    found = list_checkpoints(checkpoint_dir)
    best = best_checkpoint(checkpoint_dir)
    keep = {c.path for c in found[-max(keep_last, 1) :]}
    if best is not None:
        keep.add(best.path)
    deleted = []
    for info in found:
        if info.path not in keep:
            _remove(Path(checkpoint_dir), info)
            deleted.append(info.path)
    if deleted:
        fsync_dir(checkpoint_dir)
    return deleted


def _remove(checkpoint_dir: Path, info: CheckpointInfo) -> None:
    """Delete a checkpoint folder: first renamed to a temporary name, so that a process killed
    half way leaves a folder the next save removes (a stale ``.tmp-step-*``), not a
    ``step-*`` folder without its meta.json that nothing lists or deletes again."""
    doomed = checkpoint_dir / f".tmp-step-{info.step:08d}-{os.getpid()}"
    if doomed.exists():  # this process's own leftover
        shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(info.path, doomed)
    except OSError:  # could not rename (gone, or a file system that refuses): delete in place
        doomed = info.path
    shutil.rmtree(doomed, ignore_errors=True)


def fine_tuning_folder_hint(path: str | Path) -> str | None:
    """For the top folder of `eegfast finetune` (its models are one level down, per fold and
    variant), the words that name them; None for any other path."""
    folds = sorted(p for p in Path(path).glob("fold*/*") if (p / "checkpoints").is_dir())
    if not folds:
        return None
    shown = ", ".join(str(p) for p in folds[:3]) + (" ..." if len(folds) > 3 else "")
    return f"a fine-tuning folder, with one model per fold and variant; give one of them ({shown})"


def resolve_weights_path(path: str | Path, *, prefer: str = "best") -> Path:
    """A ``.safetensors`` file, a checkpoint folder, or a run folder -> the weights file.

    For a run folder (holding ``checkpoints/``) ``prefer`` picks ``best`` (the lowest
    validation loss; the newest when the run held no data out) or ``latest``.
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    for folder in (path / "checkpoints", path):
        chosen = best_checkpoint(folder) if prefer == "best" else None
        chosen = chosen or latest_checkpoint(folder)
        if chosen is not None:
            return chosen.path / WEIGHTS
    hint = fine_tuning_folder_hint(path)
    if hint is not None:
        raise FileNotFoundError(f"no weights at {path}: {hint}")
    raise FileNotFoundError(
        f"no weights at {path}: expected a .safetensors file, a checkpoint folder holding "
        f"{WEIGHTS}, or a run folder with checkpoints/step-*"
    )


def load_weights(path: str | Path, *, prefer: str = "best") -> dict[str, torch.Tensor]:
    """The tensors of the weights file ``path`` resolves to (:func:`resolve_weights_path`);
    ValueError naming the file when it is corrupt or truncated (safetensors' own error names
    no file, and is no ValueError: the commands showed a traceback)."""
    # (imported here: importing eegfast.models loads the ops, which this module must not
    # need at import time: `eegfast doctor` reports a missing extension)
    from eegfast.models.checkpoint import safetensors_file_errors

    weights = resolve_weights_path(path, prefer=prefer)
    with safetensors_file_errors(weights):
        return load_file(str(weights))


def weight_shapes(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each tensor in a checkpoint folder's weights file, read from its
    header only; ValueError naming the file when it is corrupt or truncated."""
    from safetensors import safe_open

    from eegfast.models.checkpoint import safetensors_file_errors

    path = Path(checkpoint) / WEIGHTS
    with safetensors_file_errors(path), safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def read_meta(path: str | Path, *, prefer: str = "best") -> dict[str, Any]:
    return checkpoint_meta(resolve_weights_path(path, prefer=prefer).parent)


def checkpoint_meta(checkpoint: str | Path) -> dict[str, Any]:
    """``meta.json`` of the checkpoint folder ``checkpoint`` ({} if it has none)."""
    meta = Path(checkpoint) / META
    return _read_meta_file(meta) if meta.is_file() else {}


def resumed_meta(resume: str | None, out: str | Path) -> dict[str, Any]:
    """meta.json of the checkpoint a run with ``--resume`` value ``resume`` and run folder
    ``out`` continues from ({} for a new run, or ``auto`` without a checkpoint yet)."""
    if not resume:
        return {}
    if resume == "auto":
        latest = latest_checkpoint(Path(out) / "checkpoints")
        return latest.meta if latest is not None else {}
    return checkpoint_meta(resume)


# index.json digests by (path, size, mtime, inode): hashed once per process, not at every fit
# (finetune fits each fold and variant over the same folders)
_INDEX_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def data_identity(dataset: Any) -> dict[str, str]:
    """What a checkpoint records of its training data's content: folder -> SHA-256 of its
    ``index.json`` for each prepared folder under ``dataset`` (a ``ShardDataset``, ``Subset``
    s and ``ConcatDataset`` s of them, as ``load_data`` / ``TrainData.subset`` give); {} for
    other datasets. The index holds the folder's preprocessing settings and each recording's
    windows and labels: a folder prepared again with other options or recordings has another
    one, where the number of windows (and so the epoch's batches) may be the same. The shards
    are not read."""
    from torch.utils.data import ConcatDataset, Subset

    from eegfast.data import ShardDataset
    from eegfast.data.index import INDEX_NAME

    found: dict[str, str] = {}
    todo = [dataset]
    while todo:
        part = todo.pop()
        if isinstance(part, ShardDataset):
            found.setdefault(str(part.root), _index_digest(part.root / INDEX_NAME))
        elif isinstance(part, Subset):
            todo.append(part.dataset)
        elif isinstance(part, ConcatDataset):
            todo += reversed(part.datasets)
    return found


def _index_digest(path: Path) -> str:
    """SHA-256 of the file ``path`` (an ``index.json``), read in blocks; "" when it cannot be
    read (a folder whose index is gone: nothing to compare, and the run may not need it)."""
    import hashlib

    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _INDEX_DIGESTS:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            _INDEX_DIGESTS[key] = digest.hexdigest()
        return _INDEX_DIGESTS[key]
    except OSError:
        return ""


def changed_data(saved: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """The folders of ``now`` (:func:`data_identity`) that ``saved`` (a checkpoint's record,
    None for checkpoints from before it) holds with another ``index.json``. A folder only one
    of them has (data.roots changed, a warning of its own) or of an unreadable index is left
    out."""
    if not saved:
        return []
    return [
        root for root, digest in now.items() if digest and saved.get(root) not in (None, "", digest)
    ]


def load_training_state(checkpoint: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's optimiser, scheduler, scaler, RNG and position state.

    ``mmap=True`` maps the file instead of reading it: tensors are read from disk only when
    touched, so a process that needs only the small entries (a rank that receives the
    optimiser state by broadcast) costs page cache, not a copy of the optimiser state.

    Raises FileNotFoundError for a missing ``state.pt``, ValueError naming it when it is
    corrupt or truncated (torch's errors name no file)."""
    path = Path(checkpoint) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (FileNotFoundError, PermissionError):
        raise  # their messages name the file
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        # the zip reader: RuntimeError, or OSError (EINVAL) for a file cut short mid-way
        reason = str(error).splitlines()[0] if str(error) else "the file ends too early"
        raise ValueError(
            f"{path}: cannot read this training state (corrupt or truncated?): {reason}"
        ) from error


# --- RNG states (kept as tensors and plain Python values so weights_only loading works) ---


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(_tuple_to_lists(random.getstate())),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tuple_to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_tuple_to_lists(v) for v in value]
    return value


def _lists_to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_lists_to_tuple(v) for v in value)
    return value


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_lists_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process saw. A resume on a machine that shows fewer
        # (another node, CUDA_VISIBLE_DEVICES) restores the ones there are: set_rng_state_all
        # failed with "tuple index out of range" at the first missing device.
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
