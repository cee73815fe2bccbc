"""Loading prepared shards: ``ShardDataset``, ``collate_padded``, ``make_loader``.

Speed comes from reading whole batches, not items: ``make_loader`` hands each worker a list of
window indices (grouped by electrode set by default), and ``ShardDataset.get_batch`` sorts them by
shard and row, opens each shard once and reads its rows straight into the batch tensor (float16
shards: into a float16 batch, cast in one call). There is no per-item tensor or dict.

Shards are read with plain ``readinto`` calls, not kept open as memory maps: a map holds a file
descriptor, and a folder of more recordings than the open-file limit (1024 by default on Linux,
per process) would fail with "Too many open files" part-way through an epoch. Each shard's
``.npy`` header is parsed and checked against ``index.json`` once per process.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
import stat
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset

from eegfast.cpus import usable_cpu_count
from eegfast.data.index import load_index, preprocess_settings

__all__ = ["ElectrodeSetBatchSampler", "ShardDataset", "collate_padded", "make_loader"]


class _BatchMemory:
    """Reusable memory for batch tensors built in this process.

    Fresh memory for every batch costs a page fault per 4 KiB page (for a 52 MB batch of 256
    windows that is slower than copying the windows themselves), so buffers are recycled. A
    buffer is handed out again only when nothing references it any more: every tensor made from
    it holds a reference to the numpy array that owns it (``torch.from_numpy`` keeps its source
    alive), so its reference count says whether any batch, view or copy-free conversion of it is
    still alive. New buffers are anonymous memory maps with transparent huge pages requested.
    """

    def __init__(self, max_buffers: int = 6) -> None:
        self.max_buffers = max_buffers
        self._buffers: list[np.ndarray] = []

    def __getstate__(self):
        return {"max_buffers": self.max_buffers, "_buffers": []}

    def _is_free(self, i: int) -> bool:
        # Evaluated without binding the buffer to a name: the only references left when no
        # tensor uses it are the pool list's and getrefcount's argument.
        return sys.getrefcount(self._buffers[i]) <= 2

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of exactly ``nbytes`` that no live tensor uses."""
        for i in range(len(self._buffers)):
            if self._buffers[i].nbytes == nbytes and self._is_free(i):
                return self._buffers[i]
        if len(self._buffers) >= self.max_buffers:
            free = [i for i in range(len(self._buffers)) if self._is_free(i)]
            if not free:
                return _fresh_memory(nbytes)  # all in use: this batch gets unpooled memory
            del self._buffers[free[0]]
        self._buffers.append(_fresh_memory(nbytes))
        return self._buffers[-1]


def _read_at(fd: int, buffer: memoryview, position: int) -> int:
    """Read ``len(buffer)`` bytes at ``position`` of ``fd`` into ``buffer``; bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], position)
    os.lseek(fd, position, os.SEEK_SET)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        return f.readinto(buffer) or 0


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced (a rename over it) or rewritten in place."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# How shards are opened. O_NONBLOCK: a FIFO under a shard's name (no regular file) would block
# the open until something writes to it, a hang without a word; opened at once, it is refused
# by ``_check_shard``. (Reads of a regular file are the same with it.)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)


def _fresh_memory(nbytes: int) -> np.ndarray:
    if nbytes >= 1 << 21 and hasattr(mmap, "MADV_HUGEPAGE"):
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(region, dtype=np.uint8)
    return np.empty(nbytes, dtype=np.uint8)


class ShardDataset(Dataset):
    """Windows of a folder written by ``eegfast prepare``.

    root : the prepared folder. subjects / tasks : keep only these (e.g. one fold of a
    subject-wise cross-validation).

    ``ds[i]`` is a dict: ``x`` (C, A, 200) float32 tensor in units of 100 µV; ``input_chans``
    (C+1,) long (row 0 = cls); ``label`` int (-1 = none); ``subject``, ``session``, ``task``,
    ``file`` str; ``window`` (index in its recording) int; ``start_s`` float.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        subjects: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
        _index: dict | None = None,
    ) -> None:
        self.root = Path(root)
        # _index: load_index(root) as its caller read it (load_data), not parsed and checked
        # a second time (3M windows: 1.4 s and a second copy of the index in memory)
        index = load_index(self.root) if _index is None else _index
        self.window_seconds = int(index["window_seconds"])
        # what prepare recorded (filters, notch, scale ...): {} for an index without it
        self.preprocess_settings = preprocess_settings(index)
        self.label_names = {t: v["labels"] for t, v in index["tasks"].items()}
        for arg, value in (("subjects", subjects), ("tasks", tasks)):
            if isinstance(value, str):
                raise TypeError(f"{arg}: expected a sequence of str, got a single str")
        keep_subjects = set(subjects) if subjects is not None else None
        keep_tasks = set(tasks) if tasks is not None else None
        if keep_tasks is not None and not keep_tasks <= set(self.label_names):
            unknown = sorted(keep_tasks - set(self.label_names))
            raise ValueError(
                f"tasks: {unknown} not in {self.root} (has {sorted(self.label_names)})"
            )
        recordings = [
            r
            for r in index["recordings"]
            if (keep_subjects is None or r["subject"] in keep_subjects)
            and (keep_tasks is None or r["task"] in keep_tasks)
        ]
        if keep_subjects and not any(r["subject"] in keep_subjects for r in index["recordings"]):
            # not an error: one subject list may be applied to several folders; but a typo or
            # ints for string ids gave an empty data set without a word
            have = sorted({str(r["subject"]) for r in index["recordings"]})
            warnings.warn(
                f"subjects: none of {sorted(keep_subjects, key=repr)[:5]} is in {self.root} "
                f"(its subjects: {have[:10]}{' …' if len(have) > 10 else ''})",
                stacklevel=2,
            )
        self.recordings = recordings
        sets: dict[tuple[int, ...], int] = {}
        self._input_chans = []  # per recording: (C+1,) long tensor
        self._n_channels = np.zeros(len(recordings), np.int64)
        rec_group = np.zeros(len(recordings), np.int64)
        for i, r in enumerate(recordings):
            key = tuple(r["input_chans"])
            rec_group[i] = sets.setdefault(key, len(sets))
            self._input_chans.append(torch.tensor(key, dtype=torch.long))
            self._n_channels[i] = len(key) - 1
        self.electrode_sets = [list(k) for k in sets]  # input_chans of each group id
        counts = np.array([r["n_windows"] for r in recordings], np.int64)
        self._rec = np.repeat(np.arange(len(recordings)), counts)  # item -> recording
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        self._row = np.arange(int(counts.sum())) - np.repeat(offsets, counts)  # item -> row
        labels = [r["labels"] for r in recordings]
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, int)
        self.groups = rec_group[self._rec]  # item -> electrode-set id
        self._shards: dict[int, tuple[str, int, np.dtype, tuple]] = {}  # see _shard
        self._memory = _BatchMemory()

    def __getstate__(self) -> dict:
        # Pickled to each DataLoader worker under spawn (macOS, Windows) and forkserver (Python
        # 3.14's Linux default): torch's pickler shares every tensor through a file descriptor
        # of its own, so one input_chans tensor per recording failed with "Too many open
        # files" past ~1000 recordings. Sent as lists, made tensors again in the worker.
        state = self.__dict__.copy()
        state["_input_chans"] = [chans.tolist() for chans in self._input_chans]
        return state

    def __setstate__(self, state: dict) -> None:
        state["_input_chans"] = [
            torch.as_tensor(chans, dtype=torch.long) for chans in state["_input_chans"]
        ]
        self.__dict__.update(state)

    def _shard(self, rec: int) -> tuple[str, int, np.dtype, tuple]:
        """(path, byte offset of row 0, dtype, file identity) of recording ``rec``'s shard, its
        header checked on first use in this process (and again when the file changed)."""
        info = self._shards.get(rec)
        if info is None:
            info = self._shards[rec] = self._check_shard(rec)
        return info

    def _check_shard(self, rec: int, fd: int | None = None) -> tuple[str, int, np.dtype, tuple]:
        """A shard must hold what ``index.json`` says: a later ``prepare`` into the same folder
        that did not finish replaces shards but not the index, and its rows would otherwise be
        read as windows of another length (or other rows) without a word; a shard cut short
        (a copy or a download that stopped) must not be read past its end. ``fd``: check this
        open file of the shard (from its start) instead of opening ``path``."""
        r = self.recordings[rec]
        path = self.root / r["shard"]
        expected = (int(r["n_windows"]), len(r["input_chans"]) - 1, self.window_seconds, 200)
        with open(os.open(path, _OPEN_FLAGS) if fd is None else fd, "rb", closefd=fd is None) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                # a FIFO (reading it waits for a writer forever), a device, a folder
                raise ValueError(
                    f"{path}: not a regular file, so not a shard; delete it and run "
                    "`eegfast prepare` on the folder again"
                )
            f.seek(0)
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version} is not one prepare writes")
            except ValueError as err:
                raise ValueError(
                    f"{path}: not a readable shard ({err}); delete it and run "
                    "`eegfast prepare` on the folder again"
                ) from err
            offset = f.tell()
            st = os.fstat(f.fileno())
            size = st.st_size
        # an index.json without a dtype (written before it was recorded) still takes only what
        # prepare writes: the rows of an int64 (or object) .npy were read as float32 bits
        want = r.get("dtype")
        if (
            shape != expected
            or fortran
            or dtype != np.dtype(want or dtype)
            or dtype not in (np.float32, np.float16)
        ):
            raise ValueError(
                f"{path}: shard holds {dtype} {shape}, index.json says "
                f"{want or 'float32 or float16'} {expected}; the folder was changed by a "
                "`prepare` that did not finish: run `eegfast prepare` on it again"
            )
        need = offset + math.prod(shape) * dtype.itemsize
        if size < need:
            raise ValueError(
                f"{path}: shard is truncated ({size} bytes, its {dtype} {shape} need {need}); "
                "delete it and run `eegfast prepare` on the folder again"
            )
        return str(path), offset, dtype, _identity(st)

    def _read_rows(
        self,
        rec: int,
        rows: Sequence[int],
        out: Sequence[np.ndarray],
        half: Sequence[np.ndarray] | None = None,
    ) -> bool:
        """Read rows ``rows`` (at least one) of recording ``rec``'s shard into the float32
        arrays ``out`` (each (C, A, 200), C-contiguous): one open, one read per row.

        ``half``: float16 arrays of the same shapes, one per row: a float16 shard's rows are
        read into them as they are (``out`` untouched), for the caller to cast a whole batch
        in one call. Returns whether the rows went to ``half``."""
        path, offset, dtype, identity = self._shard(rec)
        fd = os.open(path, _OPEN_FLAGS)
        try:
            if _identity(os.fstat(fd)) != identity:
                # Replaced or rewritten since its header was checked (a `prepare` into the
                # folder while a run reads it): the old header's dtype and offset would read
                # garbage rows, so the file now open is checked against index.json again.
                try:
                    _, offset, dtype, _ = self._shards[rec] = self._check_shard(rec, fd)
                except ValueError as err:
                    raise ValueError(
                        f"{err} (it changed on disk while this data set was in use; if a "
                        f"`prepare` into {self.root} has finished since, open it again)"
                    ) from None
            n_bytes = out[0].size * dtype.itemsize
            to_half = half is not None and dtype == np.float16
            scratch = None if dtype == np.float32 or to_half else np.empty(out[0].shape, dtype)
            for k, (w, dst) in enumerate(zip(rows, out, strict=True)):
                target = half[k] if to_half else dst if scratch is None else scratch
                if _read_at(fd, memoryview(target).cast("B"), offset + w * n_bytes) != n_bytes:
                    raise ValueError(
                        f"{path}: shard is shorter than its header says (row {w}); delete it "
                        "and run `eegfast prepare` on the folder again"
                    )
                if scratch is not None:
                    # torch's half -> float cast is vectorised; numpy's is many times slower
                    torch.from_numpy(dst).copy_(torch.from_numpy(scratch))
        finally:
            os.close(fd)
        return to_half

    @property
    def subjects(self) -> list[str]:
        """Subject id of every item (for subject-wise splits)."""
        return [self.recordings[r]["subject"] for r in self._rec]

    def __len__(self) -> int:
        return len(self._rec)

    def __getitem__(self, i: int) -> dict:
        try:
            # operator.index: ints, numpy and 0-d torch integers; a float such as 2.7 was
            # truncated to another item without a word
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"index: expected an int, got {type(i).__name__} {i!r}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        i %= len(self)
        rec = int(self._rec[i])
        r = self.recordings[rec]
        row = int(self._row[i])
        # the shard checked before the window's memory is taken: an index.json whose
        # window_seconds is 10**9 asked numpy for TiBs (MemoryError naming nothing)
        self._shard(rec)
        x = np.empty((int(self._n_channels[rec]), self.window_seconds, 200), np.float32)
        self._read_rows(rec, [row], [x])
        x = torch.from_numpy(x)
        return {
            "x": x,
            "input_chans": self._input_chans[rec],
            "label": int(self.labels[i]),
            "subject": r["subject"],
            "session": r["session"],
            "task": r["task"],
            "file": r["file"],
            "window": row,
            "start_s": r["starts"][row] / 200.0,
        }

    def get_batch(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        pin_memory: bool = False,
        keep_order: bool = False,
    ) -> dict:
        """A collated batch for item ``indices`` (integers; negative ones count from the end, as
        for ``ds[i]``), reordered by shard and row for sequential reads: ``batch["index"]``
        gives the item index (in ``[0, len(self))``) of each row. Same fields as
        ``collate_padded``. ``pin_memory``: allocate ``x`` in pinned memory (CUDA only), so
        the DataLoader's pinning step has nothing left to copy. ``keep_order``: rows in the
        order of ``indices`` (still read shard by shard), i.e. the very batch that
        ``collate_padded([ds[i] for i in indices])`` gives, plus ``index``."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or len(idx) == 0:
            raise ValueError("indices: expected a non-empty 1-D sequence of item indices")
        if idx.dtype.kind not in "iu":
            # a cast would truncate 1.5 to item 1 (and read True/False as items 1/0)
            raise TypeError(f"indices: expected integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        bad = (idx < -len(self)) | (idx >= len(self))
        if bad.any():
            raise IndexError(
                f"indices: {idx[bad][:5].tolist()} out of range for {len(self)} windows"
            )
        idx %= max(len(self), 1)  # negative -> from the end; batch["index"] is then in [0, N)
        rec = self._rec[idx]
        row = self._row[idx]
        order = np.lexsort((row, rec))  # reading order: shard by shard, rows ascending
        if not keep_order:
            idx, rec, row = idx[order], rec[order], row[order]
            order = np.arange(len(idx))
        # the k-th window read goes to batch row order[k]
        n_ch = self._n_channels[rec]
        c_max = int(n_ch.max())
        shape = (len(idx), c_max, self.window_seconds, 200)
        # every shard's header checked against index.json before the batch's memory is taken
        # (an index.json whose window_seconds is 10**9 asked for TiBs: an error naming nothing)
        any_half = any(self._shard(int(r))[2] == np.float16 for r in np.unique(rec))
        if pin_memory:
            x = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        else:
            buffer = self._memory.take(4 * math.prod(shape))
            x = torch.from_numpy(buffer.view(np.float32).reshape(shape))
        padded = bool((n_ch != c_max).any())
        if padded:
            x.zero_()
        x_np = x.numpy()
        # float16 shards: their rows are read as they are into a float16 batch, cast into x in
        # one call at the end. A cast per window (as ds[i] does) is a parallel region of
        # torch's thread pool each: 50-400 us a window on a loaded 2-core machine, several
        # times the read itself, where one call for the batch costs a few us a window.
        half = None
        if any_half:
            half = self._memory.take(2 * math.prod(shape)).view(np.float16).reshape(shape)
            if padded:
                half.fill(0)
        from_half = np.zeros(len(idx), dtype=bool)  # batch rows read into ``half``
        input_chans = torch.zeros((len(idx), c_max + 1), dtype=torch.long)
        rec_read, row_read = rec[order], row[order]
        cuts = np.flatnonzero(np.diff(rec_read)) + 1
        bounds = np.concatenate([[0], cuts, [len(idx)]]).tolist()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            r = int(rec_read[start])
            c = int(self._n_channels[r])
            rows_to = order[start:stop]
            # Each window is read straight into its batch row (of ``half`` for float16).
            halves = None if half is None else [half[j, :c] for j in rows_to]
            if self._read_rows(
                r, row_read[start:stop].tolist(), [x_np[j, :c] for j in rows_to], halves
            ):
                from_half[rows_to] = True
            input_chans[torch.from_numpy(rows_to), : c + 1] = self._input_chans[r]
        if from_half.all():
            x.copy_(torch.from_numpy(half))
        elif from_half.any():  # float16 and float32 shards in one batch
            cast = torch.from_numpy(np.flatnonzero(from_half))
            x[cast] = torch.from_numpy(half)[cast].float()
        mask = torch.from_numpy(
            np.arange(c_max)[None, :] >= n_ch[:, None]
        )  # True = padded electrode
        recs = [self.recordings[int(r)] for r in rec]
        return {
            "x": x,
            "input_chans": input_chans,
            "channel_padding_mask": mask,
            "label": torch.from_numpy(self.labels[idx]),
            "subject": [r["subject"] for r in recs],
            "task": [r["task"] for r in recs],
            "index": torch.from_numpy(idx),
        }


def collate_padded(items: Sequence[dict]) -> dict:
    """Stack items with different electrode counts, zero-padding electrodes.

    Returns x (B, Cmax, A, 200) float32; input_chans (B, Cmax+1) long (padded with 0);
    channel_padding_mask (B, Cmax) bool, True = padded electrode; label (B,) long;
    subject, task: list[str].
    """
    if not items:
        raise ValueError("items: empty batch")
    b = len(items)
    c_max = max(it["x"].shape[0] for it in items)
    shape = items[0]["x"].shape[1:]
    x = torch.zeros((b, c_max, *shape), dtype=torch.float32)
    input_chans = torch.zeros((b, c_max + 1), dtype=torch.long)
    mask = torch.ones((b, c_max), dtype=torch.bool)
    for i, it in enumerate(items):
        c = it["x"].shape[0]
        if it["x"].shape[1:] != shape:
            raise ValueError(f"items: window shapes differ ({tuple(it['x'].shape)} vs {shape})")
        if len(it["input_chans"]) != c + 1:
            raise ValueError(f"items[{i}]: input_chans must have C+1 = {c + 1} entries")
        x[i, :c] = it["x"]
        input_chans[i, : c + 1] = torch.as_tensor(it["input_chans"])
        mask[i, :c] = False
    return {
        "x": x,
        "input_chans": input_chans,
        "channel_padding_mask": mask,
        "label": torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.long),
        "subject": [it.get("subject", "") for it in items],
        "task": [it.get("task", "") for it in items],
    }


class ElectrodeSetBatchSampler(Sampler[list[int]]):
    """Batches of item indices; with ``groups`` every batch holds one electrode set.

    Items are taken in ``sampler`` order (default: a fresh permutation each epoch when
    ``shuffle``, else 0..N-1) and dropped into a bucket per group; a full bucket is a batch.
    Leftover partial buckets come last (dropped with ``drop_last``).
    """

    def __init__(
        self,
        groups: np.ndarray | None,
        batch_size: int,
        *,
        num_items: int | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler[int] | Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
        if groups is None and num_items is None:
            raise ValueError("num_items: required when groups is None")
        self.groups = None if groups is None else np.asarray(groups)
        self.num_items = len(self.groups) if self.groups is not None else int(num_items)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0
        # The next epoch's order, drawn early by __len__: with a random ``sampler`` (and
        # groups) the number of batches depends on the draw, so len() and the epoch that
        # follows it must share one. Kept with the sampler's own epoch (None if it has none).
        self._next_order: tuple[object, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (its shuffled order); passed on to a ``sampler`` that has
        ``set_epoch`` (a ``DistributedSampler``), as frameworks call it on ``loader.sampler``."""
        self.epoch = epoch
        self._next_order = None
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _order(self) -> np.ndarray:
        if self.sampler is not None:
            # A draw is reused only for the epoch it was made in: a DistributedSampler's order
            # follows its own epoch, which set_epoch may have moved on since len() drew.
            key = getattr(self.sampler, "epoch", None)
            if self._next_order is None or self._next_order[0] != key:
                order = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
                self._next_order = (key, order)
            return self._next_order[1]
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch))
            return rng.permutation(self.num_items)
        return np.arange(self.num_items)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        self._next_order = None
        self.epoch += 1  # the next epoch gets a new permutation without set_epoch
        bs = self.batch_size
        if self.groups is None:
            for s in range(0, len(order), bs):
                batch = order[s : s + bs]
                if len(batch) == bs or not self.drop_last:
                    yield batch.tolist()
            return
        buckets: dict[int, list[int]] = {}
        for i in order.tolist():
            bucket = buckets.setdefault(int(self.groups[i]), [])
            bucket.append(i)
            if len(bucket) == bs:
                yield bucket
                buckets[int(self.groups[i])] = []
        if not self.drop_last:
            for bucket in buckets.values():
                if bucket:
                    yield bucket

    def __len__(self) -> int:
        bs = self.batch_size
        order = self._order() if self.sampler is not None else None
        if self.groups is None:
            n = len(order) if order is not None else self.num_items
            return n // bs if self.drop_last else math.ceil(n / bs)
        groups = self.groups if order is None else self.groups[order]
        counts = np.bincount(groups) if len(groups) else np.zeros(0, int)
        per = counts // bs if self.drop_last else -(-counts // bs)
        return int(per.sum())


class _Batches(Dataset):
    """Maps a list of item indices to a collated batch (DataLoader with batch_size=None)."""

    def __init__(
        self, dataset: ShardDataset, index_map: np.ndarray | None, pin_memory: bool
    ) -> None:
        self.dataset = dataset
        self.index_map = index_map
        self.pin_memory = pin_memory

    def __getitem__(self, indices: list[int]) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        if self.index_map is not None:
            idx = self.index_map[idx]
        return self.dataset.get_batch(idx, pin_memory=self.pin_memory)

    def __len__(self) -> int:  # pragma: no cover - not used by the DataLoader here
        return len(self.dataset)


def _passthrough(batch: dict) -> dict:
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    group_by_electrode_set: bool = True,
    sampler: Sampler[int] | Sequence[int] | None = None,
    drop_last: bool = False,
    seed: int = 0,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader of collated batches (see ``collate_padded`` for the fields).

    dataset : a ``ShardDataset`` or a ``torch.utils.data.Subset`` of one (fast batch reads), or
        any dataset of items as ``ShardDataset`` yields them (collated with ``collate_padded``).
    group_by_electrode_set : every batch holds one electrode set (no padding); else batches mix
        sets and pad (``channel_padding_mask``).
    sampler : order of item indices (overrides ``shuffle``), e.g. a weighted sampler (not a
        ``DistributedSampler`` with grouping: ranks would get different numbers of batches).
    seed : the shuffled order (a new permutation each epoch; the same seed, the same epochs,
        whatever ``num_workers``). Iterating the loader draws nothing from torch's global RNG.
    num_workers : default 0 for a ``ShardDataset`` (its batches are memory copies, fastest in
        this process), else ``min(2, cpu count)``. pin_memory : default when CUDA is available
        (in-process ``ShardDataset`` batches are then built directly in pinned memory).
    Batch rows of a ``ShardDataset`` come sorted by shard inside each batch (the set of rows is
    what the sampler chose); ``batch["index"]`` says which items they are.
    """
    if group_by_electrode_set and isinstance(sampler, DistributedSampler):
        # Each rank's share of the items splits into its own number of one-set batches, so the
        # ranks' loops end at different steps and DDP waits forever for the missing ones.
        raise ValueError(
            "sampler: a DistributedSampler with group_by_electrode_set=True gives the ranks "
            "different numbers of batches (DDP would hang); use "
            "eegfast.train.sampler.EpochBatchSampler (equal batches per rank, one electrode set "
            "each, as the training commands do), or group_by_electrode_set=False"
        )
    fast = isinstance(dataset, ShardDataset) or (
        isinstance(dataset, Subset) and isinstance(dataset.dataset, ShardDataset)
    )
    if num_workers is None:
        # A ShardDataset batch is one read per window from the page cache into recycled
        # memory; a worker process would add a copy into fresh shared memory per batch, which
        # costs more than the read itself (see bench-results/cpu_data.md).
        num_workers = 0 if fast else min(2, usable_cpu_count())
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    base, index_map = dataset, None
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, ShardDataset):
        base, index_map = dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)
    worker_args = {}
    if num_workers > 0:
        worker_args = {"persistent_workers": persistent_workers}
        if prefetch_factor is not None:
            worker_args["prefetch_factor"] = prefetch_factor
    if isinstance(base, ShardDataset):
        groups = base.groups if index_map is None else base.groups[index_map]
        batches = ElectrodeSetBatchSampler(
            groups if group_by_electrode_set else None,
            batch_size,
            num_items=len(dataset),
            shuffle=shuffle,
            drop_last=drop_last,
            sampler=sampler,
            seed=seed,
        )
        # In-process batches are allocated pinned; worker batches go through shared memory
        # and are pinned by the DataLoader's pin thread. Without CUDA there is no pinned
        # memory: the DataLoader warns and ignores pin_memory, where allocating it here raised.
        pin_here = pin_memory and num_workers == 0 and torch.cuda.is_available()
        return DataLoader(
            _Batches(base, index_map, pin_here),
            batch_size=None,
            sampler=batches,
            num_workers=num_workers,
            pin_memory=pin_memory,
            collate_fn=_passthrough,
            # each new iterator draws its workers' base seed: from ``seed``, not from torch's
            # global generator (which dropout draws from)
            generator=torch.Generator().manual_seed(seed),
            **worker_args,
        )
    if sampler is None and shuffle:
        # The order's own generator: the DataLoader's also draws the base seed at each new
        # iterator (once in all with persistent workers, once an epoch without), so sharing
        # it made the orders from the second epoch on depend on the number of workers.
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_padded,
        # the workers' base seeds from ``seed`` too, not from torch's global generator
        generator=torch.Generator().manual_seed(seed),
        **worker_args,
    )
