"""A hint a static type check (mypy) found narrower than the input it documents: the item
indices of ``ShardDataset.get_batch``, which eegfast's own loaders pass as numpy arrays."""

from __future__ import annotations

import types
import typing

import numpy as np

from eegfast.data import ShardDataset


def test_get_batch_indices_hint_admits_numpy_arrays():
    hint = typing.get_type_hints(ShardDataset.get_batch)["indices"]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    origins = [typing.get_origin(m) or m for m in members]
    assert any(isinstance(np.arange(2), o) for o in origins)
    assert any(isinstance([0, 1], o) for o in origins)
