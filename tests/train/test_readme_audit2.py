"""What the README says a user gets, checked against what the code does (the README read as a
user manual after the day's changes): each test runs the behaviour and then looks for the
README's statement of it, so a stale sentence fails here."""

from __future__ import annotations

import math
import re
from pathlib import Path

import mne
import numpy as np
import pytest
import torch

from eegfast import ops
from eegfast.cli import main as cli
from eegfast.data import prepare
from eegfast.data.prepare import _companions
from eegfast.nn import NormEMAVectorQuantizer
from eegfast.ops._backend import resolve_backend
from eegfast.train.commands import doctor, evaluate
from eegfast.train.config import RunConfig, resolve_config
from eegfast.train.data import load_data
from eegfast.train.finetune import _json_numbers
from eegfast.train.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GENERATE_HELP = ROOT / "eegfast" / "train" / "commands" / "options" / "generate.py"  # its --help


def _readme() -> str:
    """The README with its line breaks as spaces, so that a phrase can span two lines."""
    return " ".join(README.read_text().split())


def _sentence(text: str, start: str) -> str:
    """The README's text from ``start`` to the end of its sentence (the next ". " outside
    backticks is close enough here)."""
    at = text.index(start)
    return text[at : text.index(". ", at) + 1]


def _recording(path: Path, seconds: float = 12.0, *, stim_events: int = 0) -> Path:
    """A FIF recording of six scalp electrodes at 200 Hz (noise of ~20 µV); with
    ``stim_events`` a ``STI 014`` channel holding that many events and no annotations."""
    rng = np.random.default_rng(0)
    names = ["Fp1", "Fp2", "C3", "C4", "O1", "O2"]
    data = 20e-6 * rng.standard_normal((len(names), int(seconds * 200)))
    types = ["eeg"] * len(names)
    if stim_events:
        stim = np.zeros((1, data.shape[1]))
        for i in range(stim_events):
            stim[0, 200 + 400 * i : 210 + 400 * i] = 1
        data, names, types = np.vstack([data, stim]), [*names, "STI 014"], [*types, "stim"]
    raw = mne.io.RawArray(data, mne.create_info(names, 200.0, types), verbose="error")
    raw.save(path, verbose="error")
    return path


def _prepare(out: Path, *argv: str) -> Path:
    assert cli(["prepare", *argv, "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> Path:
    """A prepared folder with two tasks, ``a`` and ``b``, one short recording each."""
    root = tmp_path_factory.mktemp("readme2")
    a, b = _recording(root / "a_raw.fif", 8.0), _recording(root / "b_raw.fif", 8.0)
    return _prepare(root / "prepared", f"a={a}", f"b={b}", "--window", "4")


def test_an_empty_data_tasks_takes_every_task_as_the_readme_says(two_tasks):
    # the README said "`--set data.tasks=` is no tasks": it is no filter, every task
    config = resolve_config(RunConfig(), None, ["data.tasks="])
    assert config.data.tasks == ()
    assert load_data([two_tasks], config.data.tasks).tasks == ["a", "b"]
    assert "`--set data.tasks=` is an empty list: every task of the data" in _readme()


@pytest.mark.filterwarnings("ignore:A single label was found")  # (sklearn, one class)
def test_the_readme_names_the_metrics_a_one_class_fold_leaves_undefined():
    one_class = [0, 0, 0]
    undefined = {
        name
        for classes in (2, 3)
        for name, value in classification_metrics(
            one_class, np.full((3, classes), 1.0 / classes), classes
        ).items()
        if math.isnan(value)
    }
    assert undefined == {"auroc", "auc_pr", "cohen_kappa"}
    sentence = _sentence(_readme(), "A metric undefined in some folds")
    for shown in ("AUROC", "AUC-PR", "κ"):
        assert shown in sentence, (shown, sentence)
    # summary.json is strict JSON: a metric undefined in every fold is null there
    assert _json_numbers({"mean": math.nan}) == {"mean": None}
    assert "in `summary.json` one undefined in every fold is `null`" in sentence


def test_the_readme_lists_the_companion_files_prepare_reuse_checks(tmp_path):
    mff = tmp_path / "rec.mff"
    mff.mkdir()
    (mff / "signal1.bin").write_bytes(b"\0")
    (mff / "info.xml").write_text("<info/>")
    assert {p.name for p in _companions(mff, False)} == {"signal1.bin", "info.xml"}
    vhdr = tmp_path / "rec.vhdr"
    vhdr.write_text("DataFile=rec.eeg\nMarkerFile=rec.vmrk\n")
    assert [p.name for p in _companions(vhdr, False)] == ["rec.eeg", "rec.vmrk"]
    (tmp_path / "rec.fdt").write_bytes(b"\0")
    assert [p.name for p in _companions(tmp_path / "rec.set", False)] == ["rec.fdt"]
    reuse = _sentence(_readme(), "`eegfast prepare` reuses a recording's output")
    for named in ("`.vmrk`/`.eeg`", "`.fdt`", "`.mff`"):
        assert named in reuse, (named, reuse)
    assert "for an EGI .mff folder every file in it" in " ".join(prepare.__doc__.split())


def test_evaluate_predictions_csv_columns_and_out_as_the_readme_says(two_tasks, tmp_path):
    path = evaluate.write_predictions(tmp_path / "predictions.csv", load_data([two_tasks]), [])
    header = path.read_text().splitlines()[0].split(",")
    assert header[-2:] == ["probabilities", "classes"]
    text = _readme()
    assert "one `probabilities` column, in the model's class order, which its `classes` column" in (
        text
    )
    # an --out holding a training run (its metrics.csv) is refused before the model is read
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,tag,value\n")
    argv = ["evaluate", "--model", str(tmp_path / "none"), "--data", str(two_tasks)]
    assert cli([*argv, "--out", str(run), "--no-progress"]) == 2
    assert "an `--out` holding a training run is refused" in text


def test_a_generated_marker_labels_windows_only_with_event_duration(tmp_path):
    # generate's EDF marks the generated part's start with a zero-duration `generated`
    # annotation; the README and generate's --help said it labels nothing in prepare
    path = tmp_path / "synthetic_raw.fif"
    raw = mne.io.read_raw_fif(_recording(path), preload=True, verbose="error")
    raw.set_annotations(mne.Annotations([0.0], [0.0], ["generated"]))
    raw.save(path, overwrite=True, verbose="error")
    plain = _prepare(tmp_path / "plain", str(path))
    assert "generated:" not in (plain / "report.md").read_text()
    timed = _prepare(tmp_path / "timed", str(path), "--event-duration", "4")
    assert "generated: 1" in (timed / "report.md").read_text()
    assert "with `--event-duration` it labels a class `generated`" in _readme()
    help_text = " ".join(GENERATE_HELP.read_text().split())
    assert "given ``--event-duration``, ``prepare`` labels windows after it ``generated``" in (
        help_text
    )


def test_stim_channel_events_label_windows_as_the_readme_says(tmp_path):
    path = str(_recording(tmp_path / "stim_raw.fif", stim_events=3))
    out = _prepare(tmp_path / "out", path, "--event-duration", "4", "--event-map", "1=pulse")
    assert "pulse: 3" in (out / "report.md").read_text()
    readme = " ".join(_readme().split())
    assert (
        "a recording whose annotations give no event is labelled from its stim channel's events"
        in readme
    )
    assert "is labelled from the events of its stim channel" in " ".join(prepare.__doc__.split())


def test_non_finite_rows_raise_in_the_quantizer_on_cpu_only_as_the_readme_says():
    vq = NormEMAVectorQuantizer(8, 4)
    assert vq.check_finite is None  # the default: check CPU tensors only (no GPU wait)
    z = torch.randn(2, 3, 4)
    z[0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError):
        vq(z)
    sentence = _sentence(_readme(), "Rows with NaN/inf get index -1")
    assert "raises on them on CPU" in sentence and "on a GPU" in sentence


def test_a_restarted_code_starts_from_a_count_of_one_as_the_readme_says():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16, 3, generator=g), dim=1)
    codebook = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    counts = torch.tensor([1.0, 0.01, 0.01, 0.01])
    ops.vq_ema_update(
        z,
        torch.zeros(16, dtype=torch.long),
        codebook,
        counts,
        codebook.clone(),
        dead_code_threshold=0.5,
        generator=g,
    )
    assert counts[1:].tolist() == [1.0, 1.0, 1.0]  # the three dead codes, re-seeded
    assert "(in [0, 1]: a restarted code starts from an EMA count of 1; 0: never)" in _readme()


def test_backend_auto_and_doctor_exit_status_as_the_readme_says(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("EEGFAST_BACKEND", raising=False)  # None is the automatic choice then
    automatic = resolve_backend(None, cpu, ())
    monkeypatch.setenv("EEGFAST_BACKEND", "reference")
    assert resolve_backend(None, cpu, ()) == "reference"
    assert resolve_backend("auto", cpu, ()) == automatic
    assert "Exit status 0; 1 when it is required and missing" in " ".join(doctor.__doc__.split())
    text = _readme()
    assert '(`backend="auto"`: the automatic choice whatever `EEGFAST_BACKEND` says)' in text
    assert "turns that into an error (and `eegfast doctor` exits 1)" in text


def test_every_environment_variable_eegfast_reads_is_in_the_readme():
    sources = [*(ROOT / "eegfast").rglob("*.py"), ROOT / "setup.py"]
    read = set()
    for source in sources:
        read |= set(re.findall(r"\bEEGFAST_[A-Z][A-Z0-9_]*\b", source.read_text()))
    assert read, "no EEGFAST_ variable found: the pattern no longer matches"
    read.discard("EEGFAST_WITH_CUDA")  # setup.py's C macro, not a variable a user sets
    text = README.read_text()
    assert sorted(v for v in read if v not in text) == []
