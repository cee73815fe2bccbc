"""braindecode's real ``Labram`` for the interop tests, or a skip that says where they run."""

from __future__ import annotations

import os

import pytest


def braindecode_labram() -> type:
    """``braindecode.models.Labram``, or a skip naming why it does not import. ``make
    timm-check`` installs braindecode in build/venv-timm and sets EEGFAST_REQUIRE_BRAINDECODE=1,
    where a missing braindecode fails instead of skipping."""
    try:
        from braindecode.models import Labram
    except Exception as error:  # noqa: BLE001 - its import chain (mne, skorch, torchaudio) is long
        if os.environ.get("EEGFAST_REQUIRE_BRAINDECODE", "").strip() == "1":
            pytest.fail(
                "EEGFAST_REQUIRE_BRAINDECODE=1 but braindecode.models.Labram does not import: "
                f"{type(error).__name__}: {error}"
            )
        pytest.skip(
            f"braindecode.models.Labram does not import ({type(error).__name__}: {error}); "
            "`make timm-check` (part of `make test`) runs these tests in build/venv-timm with "
            "braindecode installed"
        )
    return Labram
