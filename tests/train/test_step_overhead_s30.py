"""Host work of a training step that does not depend on the batch's values: what the engine
and the loader do per step beyond the model's forward, backward and optimiser step. Counted,
not timed (a training step at 2,500 samples/s, batch 64, has 25 ms in all)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eegfast.data import ShardDataset, collate_padded
from eegfast.train.config import RunConfig
from eegfast.train.engine import fit
from eegfast.train.objectives import StepContext, StepOutput
from tests.train._sample import two_prepared_folders
from tests.train.fakes import SyntheticEEG, TinyClassifier, collate


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folder ``a`` (float32, 19 and 64 electrodes), ``b`` (float16, 19): 4-s windows every
    2 s of 16-s cuts."""
    return two_prepared_folders(tmp_path_factory.mktemp("overhead"), 16.0, 2)


def _fit_counting_parameter_walks(tmp_path, steps: int) -> int:
    """How often ``fit`` over ``steps`` optimiser steps walks the model for its parameters."""
    model = TinyClassifier()
    walks = {"n": 0}
    named_parameters = model.named_parameters

    def counted(*args, **kwargs):  # model.parameters() goes through it too
        walks["n"] += 1
        return named_parameters(*args, **kwargs)

    model.named_parameters = counted
    data = SyntheticEEG(24, channels=(3,))

    def step(model, batch, ctx):
        return StepOutput(model(batch["x"]).logsumexp(-1).mean())

    config = RunConfig().with_overrides(
        {
            "train.batch_size": 4,
            "train.progress": False,
            "train.max_steps": steps,
            "train.log_every": 1000,
            "train.checkpoint_every": 1000,
        }
    )
    result = fit(
        model,
        step,
        data,
        config,
        tmp_path / str(steps),
        group_keys=data.group_keys(),
        collate_fn=collate,
        ctx=StepContext(torch.device("cpu")),
    )
    assert result.step == steps
    return walks["n"]


def test_a_step_does_not_walk_the_model_for_its_parameters(tmp_path):
    """The gradients clipped at each optimiser step are those of the parameters the optimiser
    steps, listed once: each step walked the module tree for them (``model.parameters()``),
    ~0.5 ms of host time a step for LaBraM-Base's 228 parameters under 197 modules."""
    assert _fit_counting_parameter_walks(tmp_path, 2) == _fit_counting_parameter_walks(tmp_path, 5)


def test_clipping_still_sees_every_trained_gradient(tmp_path):
    """The gradient norm logged (and clipped to) is that of every parameter with a gradient,
    as before: a model whose gradients are known gives their norm."""

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(3))
            self.b = torch.nn.Parameter(torch.zeros(4))
            self.frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)

        def forward(self, x):
            return x[:, 0, 0, :3] @ torch.ones(3) * 0 + self.a.sum() * 1.0 + 2.0 * self.b.sum()

    data = SyntheticEEG(8, channels=(3,))
    norms = []
    config = RunConfig().with_overrides(
        {
            "train.batch_size": 4,
            "train.progress": False,
            "train.max_steps": 1,
            "train.log_every": 1,
            "optim.clip_grad": 0.0,
        }
    )
    fit(
        Linear(),
        lambda model, batch, ctx: StepOutput(model(batch["x"]).mean()),
        data,
        config,
        tmp_path,
        group_keys=data.group_keys(),
        collate_fn=collate,
        ctx=StepContext(torch.device("cpu")),
        on_log=lambda step, scalars: norms.append(scalars["train/grad_norm"]),
    )
    # d/da = 1 (3 entries), d/db = 2 (4 entries): sqrt(3 + 16)
    assert norms == [pytest.approx(19**0.5, rel=1e-6)]


class _HalfCasts(TorchDispatchMode):
    """Counts the float16 -> float32 copies (casts) torch runs."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if isinstance(source, torch.Tensor) and source.dtype == torch.float16:
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_float16_batch_is_cast_in_one_call_not_one_per_window(folders):
    """A batch of a float16 folder is read into float16 memory and cast into the float32 batch
    in one call: a cast per window was a parallel region of torch's thread pool each, 50-400
    us a window on a loaded 2-core machine (5-10x the read), where one call for the batch
    costs a few us a window. The batch is the per-item path's, bit for bit."""
    _, b = folders
    ds = ShardDataset(b)
    assert ds.recordings[0]["dtype"] == "float16" and len(ds) >= 5
    indices = np.random.default_rng(0).permutation(len(ds))[:5]
    with _HalfCasts() as casts:
        batch = ds.get_batch(indices, keep_order=True)
    assert casts.count == 1
    expected = collate_padded([ds[int(i)] for i in indices])
    for key in ("x", "input_chans", "channel_padding_mask", "label"):
        assert torch.equal(batch[key], expected[key]), key


def test_a_batch_of_float16_and_float32_shards_is_the_per_item_batch(folders, tmp_path):
    """A folder whose recordings were written with other dtypes (one of them float16) gives,
    in one batch with padding, the windows the per-item path gives."""
    a, _ = folders
    root = tmp_path / "mixed"
    shutil.copytree(a, root)
    index = json.loads((root / "index.json").read_text())
    first = index["recordings"][0]
    shard = root / first["shard"]
    rows = np.load(shard)
    np.save(shard, rows.astype(np.float16))  # (np.save keeps the name: it ends in .npy)
    first["dtype"] = "float16"
    (root / "index.json").write_text(json.dumps(index))
    ds = ShardDataset(root)
    assert len({len(r["input_chans"]) for r in ds.recordings}) == 2  # two electrode sets
    per_recording = [np.flatnonzero(ds._rec == r)[:3] for r in range(len(ds.recordings))]
    indices = np.concatenate(per_recording)[::-1].copy()
    for keep_order in (True, False):
        batch = ds.get_batch(indices, keep_order=keep_order)
        expected = collate_padded([ds[int(i)] for i in batch["index"]])
        for key in ("x", "input_chans", "channel_padding_mask", "label"):
            assert torch.equal(batch[key], expected[key]), key
        assert batch["channel_padding_mask"].any()
    assert torch.equal(ds[0]["x"], torch.from_numpy(rows[0].astype(np.float16).astype(np.float32)))
