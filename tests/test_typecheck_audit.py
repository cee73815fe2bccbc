"""A hint a static type check (mypy) found contradicted by eegfast's own calls:
``write_atomic``'s callback was hinted to return None, and ``write_text``/``write_bytes``/
``savefig`` callbacks return a count or a value, which it ignores."""

from __future__ import annotations

import typing
from pathlib import Path

from eegfast.fileio import write_atomic


def test_write_atomic_callback_hint_admits_any_return(tmp_path: Path):
    hint = typing.get_type_hints(write_atomic)["write"]
    params, returns = typing.get_args(hint)
    assert params == [Path]
    assert returns is object  # not None: the value a write returns is ignored
    path = write_atomic(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    assert path.read_text() == "x"
