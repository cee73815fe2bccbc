"""The public API's documentation: what ``__all__`` lists is importable, and every exported
class and function has a docstring of its own (``help()`` is what a user reads)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC = ["eegfast.ops", "eegfast.nn", "eegfast.models"]


def _exported(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    assert len(set(module.__all__)) == len(module.__all__), module_name
    return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize("module_name", PUBLIC)
def test_all_lists_exactly_the_public_names(module_name):
    module = importlib.import_module(module_name)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert set(module.__all__) == public


@pytest.mark.parametrize(
    ("module_name", "name"),
    [
        (m, name)
        for m in PUBLIC
        for name, value in _exported(m)
        if inspect.isclass(value) or inspect.isfunction(value)
    ],
)
def test_every_exported_class_and_function_has_its_own_docstring(module_name, name):
    """QuantizerOutput, LinearCrossEntropy, PretrainOutput, TokenizerOutput (NamedTuples) and
    BackendStatus (a dataclass) had only the generated ``Name(field, ...)`` line: no shapes,
    no dtypes, nothing of what the fields mean (that was in source comments)."""
    value = getattr(importlib.import_module(module_name), name)
    doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    assert doc and not doc.startswith(f"{name}("), f"{module_name}.{name}: no docstring"
    if hasattr(value, "_fields"):  # a NamedTuple: each field is described
        assert all(field in doc for field in value._fields), (name, value._fields)
