"""eegfast's environment switches (EEGFAST_REQUIRE_EXT, EEGFAST_TRITON_PRENORM, ...)."""

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
