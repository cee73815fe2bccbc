"""``eegfast tokenizer``: the ``vq`` settings, feature-spread logging and the collapse warning."""

from __future__ import annotations

import json
import re

import mne
import pytest

from eegfast.cli import main as cli
from eegfast.datasets import SampleDataError, sample
from eegfast.train.arch import load_trained
from eegfast.train.commands import tokenizer as command
from eegfast.train.commands.common import CommandError
from eegfast.train.config import RunConfig
from eegfast.train.runlog import read_metrics


def test_collapse_warnings_read_the_last_values():
    healthy = {"train/feature_spread": [(10, 0.01), (20, 0.8)], "train/perplexity": [(20, 40.0)]}
    assert command.collapse_warnings(healthy) == {}
    assert command.collapse_warnings({"train/loss": [(10, 1.0)]}) == {}  # nothing to judge
    collapsed = {
        "train/feature_spread": [(10, 0.6), (300, 2e-4)],
        "train/perplexity": [(300, 90.0)],
    }
    warnings = command.collapse_warnings(collapsed)
    assert list(warnings) == ["encoder"]
    assert "step 300" in warnings["encoder"] and "0.0002" in warnings["encoder"]
    assert "perplexity 90.0" in warnings["encoder"] and "vq.beta" in warnings["encoder"]
    few_codes = {"train/feature_spread": [(40, 0.9)], "train/perplexity": [(40, 1.3)]}
    warnings = command.collapse_warnings(few_codes)
    assert list(warnings) == ["codebook"]
    assert "codebook collapse: at step 40" in warnings["codebook"]
    assert "1.30" in warnings["codebook"] and "vq.dead_code_threshold" in warnings["codebook"]
    both = {"train/feature_spread": [(50, 0.009)], "train/perplexity": [(50, 1.0)]}
    assert set(command.collapse_warnings(both)) == {"encoder", "codebook"}


def test_quantizer_kwargs_from_the_vq_section():
    assert command.quantizer_kwargs(RunConfig()) == {}  # the model config decides
    config = RunConfig().with_overrides({"vq.beta": 0.0, "vq.dead_code_threshold": 0.0})
    assert command.quantizer_kwargs(config) == {"beta": 0.0, "dead_code_threshold": None}
    config = RunConfig().with_overrides({"vq.dead_code_threshold": 0.5})
    assert command.quantizer_kwargs(config) == {"dead_code_threshold": 0.5}
    for key in ("vq.beta", "vq.dead_code_threshold"):
        with pytest.raises(CommandError, match=f"{key} must be >= 0"):
            command.quantizer_kwargs(RunConfig().with_overrides({key: -1.0}))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder from a 24-s cut of the real Subject00_1 recording."""
    try:
        files = {p.name: p for p in sample(download=False)}
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")
    raw = mne.io.read_raw_edf(files["Subject00_1.edf"], preload=True, verbose="error")
    raw.crop(0, 24.0, include_tmax=False)
    root = tmp_path_factory.mktemp("tok")
    fif = root / "Subject00_1_cut.fif"
    raw.save(fif, verbose="error")
    out = root / "prepared"
    assert cli(["prepare", f"rest={fif}", "--out", str(out), "--window", "4", "--no-progress"]) == 0
    return out


def run_tokenizer(prepared, out, *sets):
    argv = ["tokenizer", "--data", str(prepared), "--out", str(out), "--model", "vqnsp_tiny"]
    for item in ("train.max_steps=3", "train.batch_size=2", "train.log_every=1", *sets):
        argv += ["--set", item]
    return cli([*argv, "--no-progress"])


def test_vq_settings_reach_the_checkpoint_and_spread_is_logged(prepared, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run_tokenizer(prepared, out, "vq.beta=0.25", "vq.dead_code_threshold=0") == 0
    printed = capsys.readouterr().out
    assert "encoder collapse" not in printed
    assert re.search(r"codebook: \d+ of 256 codes active .*, EMA perplexity \d+\.\d", printed)
    meta = json.loads(next(out.glob("checkpoints/*/meta.json")).read_text())
    assert meta["arch"]["kwargs"] == {"beta": 0.25, "dead_code_threshold": None}
    model, _ = load_trained(out, prefer="latest")
    assert model.quantize.beta == 0.25 and model.quantize.dead_code_threshold is None
    spread = read_metrics(out / "metrics.csv")["train/feature_spread"]
    assert [step for step, _ in spread] == [1, 2, 3]
    assert all(0.0 <= value <= 1.0 for _, value in spread)


def test_each_collapse_warning_is_printed_once(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "COLLAPSED_SPREAD", 2.0)  # any spread counts as collapsed
    assert run_tokenizer(prepared, tmp_path / "tok", "train.checkpoint_every=2") == 0
    printed = capsys.readouterr().out
    # at the first checkpoint (step 2), once, though a second checkpoint follows at step 3
    assert "warning: encoder collapse: at step 2" in printed
    assert printed.count("encoder collapse") == 1
    assert len(list((tmp_path / "tok" / "checkpoints").iterdir())) == 2
    # a kind that shows up later is printed when it does
    monkeypatch.setattr(command, "COLLAPSED_SPREAD", 0.0)
    watch_file = tmp_path / "metrics.csv"
    watch = command.collapse_watch(None, watch_file)
    rows = ["step,tag,value", "5,train/perplexity,30.0"]
    watch_file.write_text("\n".join(rows) + "\n")
    watch(tmp_path)
    assert capsys.readouterr().out == ""
    for step in (6, 7):
        rows.append(f"{step},train/perplexity,1.1")
        watch_file.write_text("\n".join(rows) + "\n")
        watch(tmp_path)
    assert capsys.readouterr().out.count("codebook collapse: at step 6") == 1
