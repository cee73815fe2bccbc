"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest

from eegfast.train import engine


@pytest.fixture
def optimizers(monkeypatch):
    """The optimisers fit builds, newest last."""
    built = []
    original = engine.build_optimizer

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(engine, "build_optimizer", build)
    return built
