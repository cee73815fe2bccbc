"""The README followed as a user manual, end to end: its contents list reaches every section,
its Python snippets and the Data section's `eegfast prepare` run as written (on the bundled
sample), the defaults and measurements it quotes are the code's and the record's, and it says
how a labels table names recordings and where the `eegfast` command is after `make demo`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import mne
import pytest

from eegfast.cli import main as cli
from eegfast.datasets import SampleDataError, sample
from eegfast.train.commands import finetune, pretrain, tokenizer
from eegfast.train.config import RunConfig, config_to_yaml, resolve_config
from tests.train.test_readme_audit2 import _recording

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
HISTORY = ROOT / "benchmarks" / "results" / "HISTORY.md"


def _flat(text: str) -> str:
    """``text`` with its line breaks as spaces, so that a phrase can span two lines."""
    return " ".join(text.split())


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to
    hyphens (``Measured so far (CPU)`` -> ``measured-so-far-cpu``)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _indented_blocks(text: str) -> list[str]:
    """The README's indented code blocks, dedented."""
    blocks = re.findall(r"\n\n((?: {4}.*\n)+)", text)
    return ["\n".join(line[4:] for line in block.splitlines()) for block in blocks]


def test_the_contents_list_reaches_every_section_and_every_link_resolves():
    text = README.read_text()
    headings = re.findall(r"^(#{2,3}) (.+)$", text, flags=re.M)
    anchors = {_slug(title) for _, title in headings}
    # every in-page link names a heading that is there
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert sorted(set(links) - anchors) == []
    # and the contents list, before the first section, names every section and subsection
    contents = text[text.index("Contents:") : text.index("\n## ")]
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    assert sorted(anchors - listed) == [], "sections missing from the README's contents"


def test_the_data_sections_prepare_command_and_loader_snippet_run_as_written(tmp_path, monkeypatch):
    try:
        folder = sample(download=False)[0].parent
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")
    blocks = _indented_blocks(README.read_text())
    (command,) = [b for b in blocks if b.startswith("eegfast prepare mi=")]
    argv = shlex.split(command.replace("\\\n", " ").replace("../shared/data/", f"{folder}/"))
    monkeypatch.chdir(tmp_path)  # its --out prepared/ is relative
    assert cli([*argv[1:], "--workers", "1", "--no-progress"]) == 0
    report = (tmp_path / "prepared" / "report.md").read_text()
    # "the `mi` recordings are labelled by their T0/T1/T2 annotations, the `arith` ones by the
    # file-name rules"
    assert re.search(r"- mi: T0: \d+, T\d: \d+, T\d: \d+", report), report
    assert re.search(r"- arith: rest: \d+, task: \d+", report), report

    (snippet,) = [b for b in blocks if b.startswith("from eegfast.data import ShardDataset")]
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 (the README's own snippet)
    batch = next(iter(scope["loader"]))
    comment = re.sub(r"\([^)]*\)", "", snippet.split("# batch:", 1)[1])  # shapes dropped
    named = [field.strip() for field in comment.split(",")]
    assert sorted(named) == sorted(batch), "the README's batch fields are not the loader's"
    assert batch["x"].shape[-1] == 200 and batch["input_chans"].shape[1] == batch["x"].shape[1] + 1


def test_the_readmes_python_blocks_run():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python block: the pattern no longer matches"
    for block in blocks:
        exec(block, {})  # noqa: S102 (the README's own snippets)


@pytest.mark.parametrize(
    ("module", "command", "model"),
    [
        (tokenizer, "`tokenizer` trains", "vqnsp_base"),
        (pretrain, "`pretrain`", "labram_base_pretrain"),
        (finetune, "trains", "labram_base"),
    ],
)
def test_the_defaults_the_readme_quotes_are_each_commands(module, command, model):
    text = _flat(README.read_text())
    sentence = text[text.index("The commands default to the reference recipe") :]
    found = re.search(rf"{command} `{model}`[^(]*\(([^)]*)\)", sentence)
    assert found, (command, model)
    quoted = found.group(1)
    defaults = module.DEFAULTS
    assert defaults.model.name == model
    assert float(re.search(r"lr ([\d.e+-]+),", quoted).group(1)) == defaults.optim.lr, quoted
    assert f"batch {defaults.train.batch_size}," in quoted, quoted
    epochs = defaults.train.epochs
    assert f"{epochs} epoch{'s' if epochs > 1 else ''}" in quoted, quoted


def test_the_pipeline_example_sets_the_epochs_of_the_commands_that_default_to_one():
    # a user running the README's example as written must not pretrain for one epoch
    text = README.read_text()
    block = text[text.index("## Training on your own data") :]
    block = block[block.index("```bash") : block.index("```", block.index("```bash") + 3)]
    for module, name in ((tokenizer, "tokenizer"), (pretrain, "pretrain")):
        assert module.DEFAULTS.train.epochs == 1
        (line,) = [line for line in block.splitlines() if line.startswith(f"eegfast {name} ")]
        assert "train.epochs=" in line or "train.max_steps=" in line, line


def test_the_prepare_memory_peak_is_the_one_measured():
    measured = re.search(r"peaks at\s+(\d+) MiB instead of", HISTORY.read_text())
    assert measured, "HISTORY.md no longer records the prepare peak"
    assert f"peak at {measured.group(1)} MiB" in _flat(README.read_text())


def test_a_labels_table_row_names_a_recording_by_file_name_or_relative_path(tmp_path):
    # the README listed the table's columns but not what `file` must hold, nor that a row
    # labels the whole recording before its annotations are looked at
    annotated = []
    for path in (tmp_path / "a_raw.fif", tmp_path / "sub" / "b_raw.fif"):
        path.parent.mkdir(exist_ok=True)
        raw = mne.io.read_raw_fif(_recording(path), preload=True, verbose="error")
        raw.set_annotations(mne.Annotations([0.0], [8.0], ["T1"]))
        raw.save(path, overwrite=True, verbose="error")
        annotated.append(path)
    table = tmp_path / "labels.csv"
    table.write_text("file,label,subject,session\na_raw.fif,rest,s1,1\nsub/b_raw.fif,task,s2,1\n")
    out = tmp_path / "out"
    sources = [f"t={path}" for path in annotated]
    argv = ["prepare", *sources, "--labels", str(table), "--out", str(out)]
    assert cli([*argv, "--workers", "1", "--strict", "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "rest: 3, task: 3" in report and "T1" not in report, report
    text = _flat(README.read_text())
    assert "labels come from the first of these that gives any: a row of a `--labels` CSV" in text
    assert "`file` is the recording's path, its path relative to the table, or its file name" in (
        text
    )


def test_the_readme_says_where_make_demo_puts_the_eegfast_command():
    venv = re.search(r"^VENV \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    text = _flat(README.read_text())
    assert f"`source {venv}/bin/activate`" in text and f"`{venv}/bin/eegfast`" in text


def test_a_config_file_as_the_readme_writes_one_and_a_runs_config_yaml_are_valid(tmp_path):
    text = _flat(README.read_text())
    assert "in TOML `[train]` then `epochs = 50`, in YAML `train:` then ` epochs: 50`" in text
    toml, yaml = tmp_path / "run.toml", tmp_path / "run.yaml"
    toml.write_text("[train]\nepochs = 50\n")
    yaml.write_text("train:\n  epochs: 50\n")
    for path in (toml, yaml):
        assert resolve_config(RunConfig(), path).train.epochs == 50
    # "a run's `config.yaml`, which can itself be given"
    saved = tmp_path / "config.yaml"
    config = RunConfig().with_overrides({"optim.lr": 3e-4, "train.batch_size": 7})
    saved.write_text(config_to_yaml(config))
    assert resolve_config(RunConfig(), saved) == config
