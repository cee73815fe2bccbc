"""Prepared folders written by an older eegfast, prepared into again: index.json in the layout
of eegfast before 2026-12-07 (``json.dumps(indent=1)``: every window start on a line)."""

import json

from eegfast.data.prepare import prepare
from tests.data.test_data_path_audit import _fif


def test_prepare_reusing_every_recording_leaves_an_older_layout_index_as_it_is(tmp_path):
    """A run that reused every recording of a folder prepared by an older eegfast rewrote its
    index.json, of the same content, in the new layout: another SHA-256, so a run checkpointed
    on the folder before (checkpoints record it: data_indexes) warned on resume that the folder
    was prepared again. The index is left as it is; one of other content is written anew."""
    sources = [str(_fif(tmp_path / f"rec{i}_raw.fif", 12.0)) for i in (1, 2, 3)]
    out = tmp_path / "out"
    prepare(sources[:2], out, progress=False)
    index = out / "index.json"
    older = json.dumps(json.loads(index.read_text()), indent=1) + "\n"
    assert older != index.read_text()  # (the layouts differ)
    index.write_text(older)

    report = prepare(sources[:2], out, progress=False)
    assert report["reused"] == 2
    assert index.read_text() == older

    report = prepare(sources, out, progress=False)  # a recording more: another index
    assert report["reused"] == 2
    written = json.loads(index.read_text())
    assert len(written["recordings"]) == 3 and index.read_text() != older
    assert written["recordings"][:2] == json.loads(older)["recordings"]
