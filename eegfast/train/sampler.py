"""A resumable, distributed batch sampler that keeps batches to one electrode set.

Why not ``torch.utils.data.DistributedSampler``: that shards the *dataset* across ranks, so a
2-process run sees different batches than a 1-process run and the results cannot be compared.
Here every epoch is first cut into *global* micro-batches (same for any world size), each
global batch is then split between the ranks, so DDP's gradient average over ranks equals the
single-process gradient of the whole batch. Batches never mix electrode sets (or tasks), so
they need no channel padding; the position inside an epoch is part of the state, so a resumed
run continues with the very next batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch


class EpochBatchSampler:
    """Yields this rank's share of each micro-batch of each global batch.

    Args:
        group_keys: one hashable per dataset item (e.g. (task, electrode set)); a batch holds
            items of one key only.
        global_batch: items per optimiser step (all ranks, all micro-batches).
        micro_batches: gradient-accumulation steps; each global batch is cut into this many
            consecutive micro-batches, each split over ``world_size`` ranks. The global batches
            do not depend on ``micro_batches`` or ``world_size``, so more processes reproduce
            the plain single-process run, and so does accumulation for losses that are means
            over equal micro-batches, and for fine-tuning's class-weighted loss (the engine
            normalises every micro-batch by the whole step's weight sum); the MoE routers'
            losses are normalised per micro-batch under accumulation (see the README).
        shuffle: reshuffle every epoch with ``seed + epoch``.
        drop_last: drop each group's last incomplete batch (needed for exact DDP equivalence).
            Without it that batch is kept, padded by repeating its first items to a multiple
            of ``micro_batches * world_size``: every item is seen at least once, and every
            micro-batch has the same number of items (at least one) on every rank.
    """

    def __init__(
        self,
        group_keys: Sequence[Hashable],
        global_batch: int,
        *,
        micro_batches: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if micro_batches < 1 or global_batch % micro_batches:
            raise ValueError(
                f"train.batch_size={global_batch} must be a multiple of "
                f"train.grad_accum={micro_batches}"
            )
        micro = global_batch // micro_batches
        if micro % world_size:
            raise ValueError(
                f"micro-batch {micro} (train.batch_size / train.grad_accum) must be divisible "
                f"by the world size {world_size}"
            )
        self.micro_batches = micro_batches
        self.group_keys = list(group_keys)
        self.global_batch = global_batch
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        self._groups: tuple[list, list[np.ndarray]] | None = None  # see _grouped

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` at micro-batch ``start_batch`` (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _grouped(self) -> list[np.ndarray]:
        """The item indices of each group (ascending), groups in the order of their keys'
        ``repr``. Made once, not at every epoch and digest: a pass over every item's key into
        lists of Python ints (3M windows: 2 s and 120 MB at every epoch's start)."""
        if self._groups is None or self._groups[0] is not self.group_keys:
            ids: dict[Hashable, int] = {}  # key -> group id, in order of first appearance
            of_item = np.fromiter(
                (ids.setdefault(key, len(ids)) for key in self.group_keys),
                dtype=np.int64,
                count=len(self.group_keys),
            )
            members = np.split(
                np.argsort(of_item, kind="stable"), np.cumsum(np.bincount(of_item))[:-1]
            )
            ordered = [members[ids[key]] for key in sorted(ids, key=repr)]
            self._groups = (self.group_keys, ordered)
        return self._groups[1]

    def _epoch(self) -> list[np.ndarray]:
        """This epoch's global micro-batches as (B,) int64 arrays (see ``global_batches``)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        size = self.global_batch
        batches: list[np.ndarray] = []
        for members in self._grouped():
            if self.shuffle:
                members = members[torch.randperm(len(members), generator=generator).numpy()]
            full = len(members) // size * size
            batches += list(members[:full].reshape(-1, size))
            rest = members[full:]
            if len(rest) and not self.drop_last:
                # Cut evenly below (no empty micro-batch or rank share, none left out).
                unit = self.micro_batches * self.world_size
                padded = -(-len(rest) // unit) * unit
                batches.append(rest[np.arange(padded) % len(rest)])
        if self.shuffle:
            order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in order]
        return batches

    def global_batches(self) -> list[list[int]]:
        """This epoch's global micro-batches (identical on every rank)."""
        return [batch.tolist() for batch in self._epoch()]

    def epoch_digest(self) -> str:
        """A digest of this epoch's global batches: which items, cut how, in which order. Two
        samplers' positions in an epoch mean the same batches only where their digests match
        (not so after a change of ``global_batch``, ``seed`` or the items and their groups;
        ``micro_batches`` and ``world_size`` do not change it)."""
        batches = self._epoch()
        digest = hashlib.sha256(np.array([len(b) for b in batches], dtype=np.int64).tobytes())
        for batch in batches:
            digest.update(np.asarray(batch, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def micro_batches_of_epoch(self) -> list[list[int]]:
        """Every micro-batch of the epoch, whole (before the split over ranks)."""
        out = []
        for batch in self.global_batches():
            size = len(batch) // self.micro_batches
            out += [batch[m * size : (m + 1) * size] for m in range(self.micro_batches)]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for micro in self.micro_batches_of_epoch()[self.start_batch :]:
            share = len(micro) // self.world_size
            yield micro[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        # the number of global batches needs no shuffle (nor the batches themselves)
        sizes = np.array([len(members) for members in self._grouped()], dtype=np.int64)
        per_group = sizes // self.global_batch if self.drop_last else -(-sizes // self.global_batch)
        return max(int(per_group.sum()) * self.micro_batches - self.start_batch, 0)
