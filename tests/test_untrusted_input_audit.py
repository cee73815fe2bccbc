"""Audit of files a user loads without having made them (session 31): checkpoints, prepared
folders, config files, labels tables, BIDS datasets and prompts crafted or damaged so that
they loop, blow up or stop on an error naming nothing. Each is refused at once (or its bad
part left out, said), naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eegfast.data import ShardDataset, read_index
from eegfast.data import prepare as prepare_module
from eegfast.data.labels import read_label_table
from eegfast.data.prepare import Job, discover
from eegfast.models.checkpoint import read_state_dict, unwrap_state_dict
from eegfast.train.checkpoint import checkpoint_meta
from eegfast.train.commands.generate import GenerateError, load_prompt
from eegfast.train.config import ConfigError, RunConfig, read_config_file, resolve_config
from tests.data.test_hostile_inputs_audit import _edit, _folder

NESTED = "[" * 100_000 + "]" * 100_000  # past json's recursion: RecursionError, no file named


# --- config files ----------------------------------------------------------------------------


def _alias_bomb(path: Path, levels: int) -> Path:
    """A YAML file of 70 bytes a level whose aliases repeat a mapping eight times a level:
    8**levels values once they are followed."""
    lines = ["l0: &l0 {a: x, b: x, c: x, d: x, e: x, f: x, g: x, h: x}"]
    for i in range(1, levels):
        refs = ", ".join(f"{k}: *l{i - 1}" for k in "abcdefgh")
        lines.append(f"l{i}: &l{i} {{{refs}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_yaml_config_whose_aliases_repeat_mappings_is_refused_before_it_is_walked(tmp_path):
    """Reading the file walked every value the aliases stand for (_keep_text_as_written, then
    _flatten): five levels (349 bytes) took 3 s, nine (641 bytes) hours, then all the
    memory. (Five first: before the fix, nine would never end.)"""
    for levels in (5, 9):
        config = _alias_bomb(tmp_path / f"bomb{levels}.yaml", levels)
        with pytest.raises(ConfigError, match=rf"config file {config}: holds more values"):
            read_config_file(config)
        with pytest.raises(ConfigError, match="aliases"):
            resolve_config(RunConfig(), config)


def test_a_yaml_config_with_a_few_aliases_still_reads(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("optim: {lr: &lr 0.002, min_lr: *lr}\ndata: {roots: &r [a, b], tasks: []}\n")
    resolved = resolve_config(RunConfig(), config)
    assert resolved.optim.lr == resolved.optim.min_lr == 0.002
    assert resolved.data.roots == ("a", "b")


# --- prepared folders ------------------------------------------------------------------------


def test_an_index_json_nested_past_jsons_recursion_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path / "p")
    (root / "index.json").write_text(NESTED)
    for read in (ShardDataset, read_index):
        with pytest.raises(ValueError, match=rf"{root / 'index.json'} is not valid JSON"):
            read(root)


def test_a_window_length_of_terabytes_is_refused_by_the_shard_before_any_memory(tmp_path):
    """An index.json whose window_seconds is 10**9 (the shard holds 2-s windows): ds[0] asked
    numpy for 2.9 TiB ("MemoryError: Unable to allocate ..."), get_batch the system ("OSError:
    [Errno 12] Cannot allocate memory"), before the shard that disagrees was looked at."""
    root = _folder(tmp_path / "p")
    _edit(root, lambda index, recording: index.update(window_seconds=10**9))
    ds = ShardDataset(root)
    said = rf"{root / 'shards' / 'a.npy'}: shard holds float32 \(3, 4, 2, 200\), index.json says"
    with pytest.raises(ValueError, match=said):
        ds[0]
    with pytest.raises(ValueError, match=said):
        ShardDataset(root).get_batch([0, 1])


def _job(tmp_path: Path) -> Job:
    recording = tmp_path / "a.edf"
    recording.write_bytes(b"x")
    return Job(str(recording), "task", None, prepare_module._key(recording))


def _record(job: Job, **changes) -> dict:
    """A record of ``job`` as prepare writes it (the fields _reusable compares)."""
    settings = prepare_module.Settings()
    record = prepare_module._bad_record(job, settings)
    record.update(prepare_module._fingerprint(Path(job.path)))
    record.update({"status": "ok", "shard": f"shards/{job.key}.npy", **changes})
    return record


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[]", "a list: AttributeError 'list' object has no attribute 'get'"),
        (NESTED, "RecursionError"),
        ("shard", "a record whose shard is `../x`: reused, it went into index.json as it was"),
        ("no shard", "KeyError 'shard'"),
    ],
    ids=["list", "nested", "shard outside", "no shard"],
)
def test_a_damaged_record_is_prepared_again_not_reused(tmp_path, text, why):
    """The record of a recording in shards/<key>.json (a folder copied, or edited by hand): a
    damaged one stopped `eegfast prepare` with an error naming no file."""
    out, job = tmp_path / "out", _job(tmp_path)
    (out / "shards").mkdir(parents=True)
    (out / "shards" / f"{job.key}.npy").write_bytes(b"")
    (out / "x.npy").write_bytes(b"")
    path = prepare_module._record_path(out, job)
    digest = prepare_module.Settings().digest()
    path.write_text(json.dumps(_record(job)))
    assert prepare_module._reusable(path, job, digest)[0] is not None  # as prepare writes it
    if text == "shard":
        text = json.dumps(_record(job, shard="shards/../x.npy"))
    elif text == "no shard":
        record = _record(job)
        del record["shard"]
        text = json.dumps(record)
    path.write_text(text)
    assert prepare_module._reusable(path, job, digest) == (None, False), why


def test_an_old_index_json_nested_past_jsons_recursion_is_replaced(tmp_path):
    """prepare reads the folder's old index.json twice (is it of shards about to be rewritten;
    is the new one the same): `[[[[...` stopped the run with a RecursionError, at its start or
    after every recording was prepared."""
    out, job = tmp_path / "out", _job(tmp_path)
    out.mkdir()
    (out / "index.json").write_text(NESTED)
    prepare_module._drop_index_of_replaced_shards(out, [job])
    assert not (out / "index.json").exists()  # (it cannot be trusted)
    (out / "index.json").write_text(NESTED)
    prepare_module._write_index(out / "index.json", {"format_version": 1})
    assert json.loads((out / "index.json").read_text()) == {"format_version": 1}


# --- labels tables and BIDS datasets ---------------------------------------------------------


def test_a_labels_table_naming_a_file_with_a_nul_says_the_table_and_line(tmp_path):
    """Path.resolve's own "ValueError: embedded null byte" named neither."""
    table = tmp_path / "labels.csv"
    table.write_text("file,label\na.edf,x\nb\x00.edf,y\n")
    with pytest.raises(ValueError, match=rf"labels table {table}, line 3: 'file' .* NUL"):
        read_label_table(table)


@pytest.mark.parametrize("pattern", ["!", "[z-a]", "a\\"])
def test_a_bidsignore_line_that_is_no_git_pattern_is_left_out_and_said(tmp_path, pattern):
    """pathspec raised for it (GitIgnorePatternError, re.error "bad character range"): the
    search of the dataset stopped on an error naming neither the .bidsignore nor its line. git
    passes over such a line; the others still apply."""
    pytest.importorskip("mne_bids")
    root = tmp_path / "ds"
    (root / "sub-01" / "eeg").mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    kept = root / "sub-01" / "eeg" / "sub-01_task-mi_eeg.edf"
    kept.write_bytes(b"x")
    (root / "sub-01" / "eeg" / "sub-01_task-mi_eeg_old.edf").write_bytes(b"x")
    (root / ".bidsignore").write_text(f"*_old.edf\n{pattern}\n")
    skipped: list[str] = []
    jobs = discover([str(root)], skipped=skipped)
    assert [Path(j.path).name for j in jobs] == [kept.name]
    assert any(
        s.startswith(f"{root / '.bidsignore'}, line 2: {pattern!r} is not a git pattern")
        for s in skipped
    ), skipped


# --- checkpoints -----------------------------------------------------------------------------


class _CountingDict(dict):
    """A dict that fails loudly once looked into 1000 times: a descent that never ends."""

    looks = 0

    def get(self, key, default=None):
        _CountingDict.looks += 1
        if _CountingDict.looks > 1000:
            raise RuntimeError("unwrap_state_dict looped")
        return super().get(key, default)


def test_a_checkpoint_whose_wrapper_holds_itself_is_refused_not_looped(tmp_path):
    """A pickle can hold a dict inside itself (``d["model"] = d``; torch.load's weights_only
    reader builds it): unwrap_state_dict descended into it for ever, `eegfast` hung on a
    1-kB file."""
    looped = _CountingDict()
    looped["model"] = looped
    with pytest.raises(ValueError, match="wrappers hold each other in a loop"):
        unwrap_state_dict(looped, source="looped.pt")
    inner = {"module": None}
    outer = {"model": inner}
    inner["module"] = outer
    path = tmp_path / "looped.pt"
    torch.save(outer, path)
    with pytest.raises(ValueError, match=rf"{path}: not a state dict: .* in a loop"):
        read_state_dict(path)


@pytest.mark.parametrize("keys", [[1], [("a",)]])
def test_a_checkpoint_of_tensors_named_by_no_string_is_refused_naming_it(tmp_path, keys):
    """``{1: tensor}``: AttributeError "'int' object has no attribute 'startswith'"."""
    path = tmp_path / "odd.pt"
    torch.save({"model": {key: torch.zeros(2) for key in keys}}, path)
    with pytest.raises(ValueError, match=rf"{path}: not a state dict: .* named by strings"):
        read_state_dict(path)


def test_a_checkpoint_without_a_state_dict_lists_keys_of_mixed_types(tmp_path):
    """The message sorted the top-level keys: 1 and 'a' made it a TypeError."""
    path = tmp_path / "mixed.pt"
    torch.save({1: "x", "a": "y"}, path)
    with pytest.raises(ValueError, match=rf"{path}: no state dict found"):
        read_state_dict(path)


def test_a_meta_json_nested_past_jsons_recursion_is_refused_naming_it(tmp_path):
    (tmp_path / "meta.json").write_text(NESTED)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'meta.json'}: not a readable"):
        checkpoint_meta(tmp_path)


# --- prompts ---------------------------------------------------------------------------------


def test_a_prompt_sidecar_nested_past_jsons_recursion_is_a_generate_error(tmp_path):
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, np.zeros((2, 400), np.float32))
    (tmp_path / "prompt.json").write_text(NESTED)
    with pytest.raises(GenerateError, match=r"--prompt prompt\.npy: sidecar .* no channel list"):
        load_prompt(prompt)


def test_a_pickled_tensor_repeating_its_data_is_refused_before_a_model_is_built(tmp_path):
    """A view of one stored float as a (2e6, 100) lm_head (``expand``): generate built the
    hybrid model such shapes describe, 4.8 GB from a 1.2 MB file (any size more for larger
    shapes). Tied weights, slices and transposes share storage and still read."""
    path = tmp_path / "repeated.pt"
    torch.save({"lm_head.weight": torch.zeros(1).expand(2_000_000, 100)}, path)
    with pytest.raises(ValueError, match=rf"{path}: .*lm_head.weight \(2000000, 100\) repeat"):
        read_state_dict(path)
    w = torch.randn(4, 3)
    torch.save({"a": w, "b": w, "c": w[1:], "d": w.t(), "e": w[:1].expand(1, 3)}, path)
    assert sorted(read_state_dict(path)) == ["a", "b", "c", "d", "e"]


def test_a_hybrid_checkpoint_with_a_far_block_number_is_refused_before_it_is_built(tmp_path):
    """The depth is the highest block number plus one: one extra tensor named
    ``student.blocks.100000.x`` made generate build 100 001 blocks (50 s, then out of
    memory, a traceback). Block 40 here: before the fix, 41 blocks built, then the strict
    load's list of what is missing."""
    from safetensors.torch import save_file

    from eegfast.models.hybrid import create_hybrid_model
    from eegfast.train.commands.generate import load_model

    state = {
        k: v.contiguous()
        for k, v in create_hybrid_model("labram_tiny_pretrain").state_dict().items()
    }
    state["student.blocks.40.x"] = torch.zeros(1)
    path = tmp_path / "far.safetensors"
    save_file(state, str(path))
    said = r"blocks \(student.blocks.<i>\) are numbered 0, 1, 40, not 0 to 2"
    with pytest.raises(GenerateError, match=said):
        load_model(path)


def test_a_pickled_sparse_tensor_is_refused_naming_the_file(tmp_path):
    """The expand()-view check asked a sparse tensor for its storage: NotImplementedError
    ("Cannot access storage of SparseTensorImpl") naming no file."""
    from eegfast.models.checkpoint import read_state_dict

    path = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse(), "b": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"sparse\.pt: not weights .* w \(torch\.sparse_coo\)"):
        read_state_dict(path)
