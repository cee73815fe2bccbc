"""eegfast.ops._backend: environment switches (EEGFAST_REQUIRE_EXT, EEGFAST_TRITON_PRENORM, ...)
and the device guard of the Triton launches."""

import pytest

from eegfast.ops._backend import env_switch


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), (" On ", True), ("YES", True), ("0", False), ("off", False),
     ("False", False), ("no", False), ("", None), (None, None)],
)  # fmt: skip
def test_env_switch_reads_on_and_off_words(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("EEGFAST_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("EEGFAST_TEST_SWITCH", value)
    for default in (False, True):
        want = default if expected is None else expected
        assert env_switch("EEGFAST_TEST_SWITCH", default) is want


def test_env_switch_rejects_other_values_by_name(monkeypatch):
    monkeypatch.setenv("EEGFAST_TEST_SWITCH", "enabled")
    with pytest.raises(ValueError, match="EEGFAST_TEST_SWITCH='enabled' is not a switch"):
        env_switch("EEGFAST_TEST_SWITCH", True)


def test_launch_device_makes_the_tensors_gpu_current():
    """Triton launches on the current device: the ops enter launch_device(input) around their
    launches, which selects the input's GPU (a no-op on CPU). Constructing the context does not
    touch CUDA, so this runs without a GPU."""
    import contextlib
    from types import SimpleNamespace

    import torch

    from eegfast.ops._backend import launch_device

    assert isinstance(launch_device(torch.zeros(1)), contextlib.nullcontext)
    guard = launch_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
