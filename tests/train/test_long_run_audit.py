"""Long runs: what a run writes to a redirected stderr per step, what stays alive from step to
step and from one fine-tuned model to the next."""

from __future__ import annotations

import gc
import io
import weakref

import numpy as np
import torch
from torch import nn

from eegfast import progress
from eegfast.train import engine, finetune
from eegfast.train.config import RunConfig
from eegfast.train.objectives import StepContext, StepOutput
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4


def logits_step(model, batch, ctx):
    logits = model(batch["x"], batch["input_chans"])
    loss = torch.nn.functional.cross_entropy(logits, batch["label"])
    # a metric of the step's own, left in the graph: a branch the loss does not use, whose
    # backward node holds ``logits * 2`` (saved for the square's gradient)
    return StepOutput(loss, {"spread": (logits * 2.0).pow(2).mean()})


def fit_tiny(run_dir, step_fn=logits_step, **overrides):
    """40 steps of a TinyClassifier over 24 synthetic windows in batches of 4, with its bar."""
    settings = {"train.checkpoint_every": 1000, "train.max_steps": 40, "train.progress": True}
    ctx = StepContext(torch.device("cpu"))
    return fit_batches_of_4(
        TinyClassifier(), step_fn, SyntheticEEG(24), ctx, run_dir, {**settings, **overrides}
    )


def bar_refreshes(stderr: str) -> int:
    """How many times a bar of fit_tiny's run was drawn (tqdm: one ``\\r`` each)."""
    return sum("step" in part for part in stderr.split("\r"))


def test_a_redirected_progress_bar_is_not_redrawn_at_every_step(tmp_path, capsys, monkeypatch):
    """stderr to a file (Slurm, CI): the bar was redrawn up to 10 times a second and at every
    log point, a line's worth of log per step over a whole run. A clock 5 s a reading, so
    that tqdm's 0.1 s interval is past at every step: 40 steps redraw it a few times only."""
    clock = iter(range(10**6))
    monkeypatch.setattr("tqdm.std.time", lambda: 5.0 * next(clock))
    monkeypatch.setattr("tqdm.std.tqdm.monitor_interval", 0)  # no monitor thread
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    fit_tiny(tmp_path, **{"train.log_every": 1, "train.progress": True})
    err = capsys.readouterr().err
    assert "40/40" in err and "loss=" in err  # the bar and its loss are still shown
    assert bar_refreshes(err) <= 10


def test_a_progress_bar_on_a_terminal_keeps_refreshing(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    clock = iter(range(10**6))
    monkeypatch.setattr("tqdm.std.time", lambda: 5.0 * next(clock))
    monkeypatch.setattr("tqdm.std.tqdm.monitor_interval", 0)
    fit_tiny(tmp_path, **{"train.log_every": 1, "train.progress": True})
    assert bar_refreshes(terminal.getvalue()) >= 40


def test_progress_bar_interval_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with progress.progress_bar(total=3) as bar:
        assert bar.mininterval == bar.maxinterval == progress.UNATTENDED_REFRESH_S
    with progress.progress_bar(total=3, mininterval=2.0) as bar:
        assert bar.mininterval == bar.maxinterval == 2.0  # the caller's
    monkeypatch.setenv("TQDM_MININTERVAL", "0.5")
    with progress.progress_bar(total=3) as bar:
        assert bar.mininterval != progress.UNATTENDED_REFRESH_S  # tqdm's (it reads the variable)


def test_every_progress_bar_of_the_package_goes_through_progress_bar():
    """prepare (a bar update per file), predict (per batch), generate (per patch), the demo and
    the synthetic report drew plain tqdm bars: redrawn ten times a second into a redirected
    log. Any bar of the package is made by eegfast.progress.progress_bar."""
    import ast
    from pathlib import Path

    import eegfast

    root = Path(eegfast.__file__).parent
    raw = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tqdm"):
                raw.append(f"{path.relative_to(root)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(
                a.name.startswith("tqdm") for a in node.names
            ):
                raw.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not raw, f"tqdm used directly (use eegfast.progress.progress_bar): {raw}"


def test_step_metrics_in_the_graph_are_not_kept_until_the_log_point(tmp_path, monkeypatch):
    """A step function's metric still in the graph (StepOutput asks for detached ones, but a
    registered objective may not): fit kept it until the next log point, and with it that
    branch's saved activations, one graph per step (log_every steps of them)."""
    in_graph = []
    read_back = engine._read_back

    def counting(values):
        in_graph.append(sum(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in values))
        return read_back(values)

    monkeypatch.setattr(engine, "_read_back", counting)
    fit_tiny(tmp_path, **{"train.log_every": 40, "train.progress": False})
    assert in_graph and max(in_graph) == 0


def test_cross_validate_lets_a_tested_model_go_before_training_the_next(tmp_path, monkeypatch):
    """Each variant's model stayed alive (``model`` in the loop) while the next one was built
    and trained: on a GPU a model's worth of memory more from the second fold on."""
    from tests.train.test_finetune import make_data

    spec = [("mi", f"s{i % 4}", f"r{i % 4}", (i // 4) % 2) for i in range(32)]
    data = make_data(spec)
    built: list[weakref.ref] = []
    alive_at_training: list[int] = []

    def train_classifier(backbone, tasks, data, train_idx, config, run_dir, runtime, *, resume):
        gc.collect()
        alive_at_training.append(sum(ref() is not None for ref in built))
        model = nn.Linear(4, 2)
        built.append(weakref.ref(model))
        return model, {}

    def predict(model, data, indices, task, device, *, task_id):
        return np.full((len(indices), 2), 0.5), None

    monkeypatch.setattr(finetune, "train_classifier", train_classifier)
    monkeypatch.setattr(finetune, "predict", predict)
    config = RunConfig().with_overrides(
        {"finetune.folds": 3, "finetune.band_power_baseline": False}
    )
    backbone = finetune.Backbone({"kind": "classifier", "name": "labram_tiny"}, None, [])
    runtime = type("Runtime", (), {"device": torch.device("cpu")})()
    finetune.cross_validate(data, config, tmp_path, runtime, backbone)
    assert alive_at_training == [0, 0, 0]
