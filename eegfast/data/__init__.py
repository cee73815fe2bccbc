"""EEG recordings -> LaBraM inputs: reading, electrode mapping, preprocessing, shards, loading.

``read_index`` and the preprocessing functions need no torch; ``ShardDataset``, ``collate_padded``
and ``make_loader`` import torch on first use.
"""

from __future__ import annotations

from eegfast.data.index import load_index, read_index
from eegfast.data.preprocess import PreprocessConfig

__all__ = [
    "ElectrodeSetBatchSampler",
    "PreprocessConfig",
    "ShardDataset",
    "collate_padded",
    "load_index",
    "make_loader",
    "read_index",
]

_TORCH_NAMES = {"ElectrodeSetBatchSampler", "ShardDataset", "collate_padded", "make_loader"}


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from eegfast.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'eegfast.data' has no attribute {name!r}")
