"""Hints a static type check (mypy) and a runtime one (typeguard over the tests) found
narrower than what the functions take and what eegfast's own callers pass: index and label
arrays are numpy arrays throughout fine-tuning, evaluation and prediction, which a
``Sequence[int]`` hint refuses (numpy arrays are no ``collections.abc.Sequence``)."""

from __future__ import annotations

import types
import typing

import numpy as np
import pytest

from eegfast.train import finetune, metrics
from eegfast.train.data import TrainData


def _admits(hint: object, value: object) -> bool:
    """Whether ``value``'s type is one of ``hint``'s (a union's members, generics by origin)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    return any(isinstance(value, typing.get_origin(m) or m) for m in members)


@pytest.mark.parametrize(
    ("function", "names"),
    [
        (finetune.predict, ("indices",)),
        (finetune.predict_heads, ("indices",)),
        (finetune.iterate_batches, ("indices",)),
        (metrics.group_folds, ("labels", "groups")),
        (metrics.classification_metrics, ("y_true",)),
        (metrics.confusion, ("y_true",)),
        (TrainData.subset, ("indices",)),
    ],
    ids=lambda v: getattr(v, "__qualname__", None) or "-".join(v),
)
def test_index_and_label_hints_admit_numpy_arrays(function, names):
    hints = typing.get_type_hints(function)
    for name in names:
        assert _admits(hints[name], np.arange(3)), f"{function.__qualname__}({name}=ndarray)"
        assert _admits(hints[name], [0, 1, 2])


def test_metrics_take_the_numpy_arrays_their_hints_admit():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    assert metrics.classification_metrics(y, probs, 2)["balanced_accuracy"] == 1.0
    assert metrics.confusion(y, probs, 2).tolist() == [[2, 0], [0, 2]]
    folds = metrics.group_folds(y, np.array(["a", "b", "c", "d"]), 2)
    assert len(folds) == 2
