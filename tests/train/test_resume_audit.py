"""Resuming a run: random streams saved on one machine and restored on another, and a resume
whose newest checkpoint cannot be read."""

from __future__ import annotations

import pytest
import torch

from eegfast.train import checkpoint as ckpt


def test_gpu_random_states_of_more_devices_than_there_are_restore_the_ones_there_are(
    monkeypatch,
):
    """A checkpoint holds the CUDA random state of every GPU the saving process saw (all of a
    node's 8 under torchrun, or without CUDA_VISIBLE_DEVICES). Resumed where fewer GPUs are
    visible, set_rng_state_all stopped the resume with "tuple index out of range" at the first
    missing device; the states of the devices there are are restored, the others ignored."""
    restored: dict[int, torch.Tensor] = {}

    def set_state(state: torch.Tensor, device: int | str = "cuda") -> None:
        if not isinstance(device, int) or device >= 1:  # as torch on a one-GPU machine
            raise IndexError("tuple index out of range")
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)  # set_rng_state_all's
    state = ckpt.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    ckpt.set_rng_state(state)
    assert list(restored) == [0]
    assert torch.equal(restored[0], state["cuda"][0])


def test_a_tokenizer_resumed_mid_epoch_with_accumulation_trains_the_uninterrupted_codebook(
    tmp_path,
):
    """The tokenizer's state besides its weights: the codebook's EMA sums and counts, its
    k-means ``initted`` flag and the dead-code restarts' draws (from the global RNG; threshold
    1: codes re-seeded at most steps). Resumed from step 2 (mid-epoch, two micro-batches a
    step), the run ends with the uninterrupted run's weights and buffers, optimiser state and
    metrics.csv rows, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from eegfast.models.labram import LaBraMConfig
    from eegfast.models.vqnsp import VQNSP, VQNSPConfig
    from eegfast.train.config import RunConfig
    from eegfast.train.engine import fit, seed_everything
    from eegfast.train.objectives import StepContext, tokenizer_step
    from eegfast.train.runlog import read_metrics
    from tests.train.fakes import SyntheticEEG, collate

    data = SyntheticEEG(24, channels=(4,), patches=2)
    config = RunConfig().with_overrides(
        {
            "train.batch_size": 4,
            "train.grad_accum": 2,
            "train.max_steps": 3,  # 6 steps an epoch
            "train.checkpoint_every": 2,
            "train.log_every": 3,  # the resume (step 2) falls between log points
            "train.progress": False,
        }
    )
    # vqnsp_tiny's layout, smaller (one block each side, 32 codes of 8 dims)
    layers = {"embed_dim": 100, "depth": 1, "num_heads": 2, "qkv_bias": True, "qk_norm": False}
    tokenizer = VQNSPConfig(
        encoder=LaBraMConfig(**layers, conv_channels=4, init_values=0.0),
        decoder=LaBraMConfig(**layers, patch_embed="code", code_dim=8, init_values=0.0),
        code_dim=8,
        num_codes=32,
        dead_code_threshold=1.0,
    )

    def run(out, resume=None):
        seed_everything(0)
        model = VQNSP(tokenizer)
        ctx = StepContext(torch.device("cpu"))
        return fit(model, tokenizer_step, data, config, out, group_keys=data.group_keys(),
                   collate_fn=collate, ctx=ctx, resume=resume)  # fmt: skip

    full, part = tmp_path / "full", tmp_path / "part"
    run(full)
    shutil.copytree(full, part)
    with pytest.warns(UserWarning, match="are of the run it abandons"):  # step 3, set aside
        resumed = run(part, resume=str(part / "checkpoints" / "step-00000002"))
    assert resumed.step == 3 and resumed.resumed_from is not None
    end = "checkpoints/step-00000003"
    want, got = load_file(str(full / end / ckpt.WEIGHTS)), load_file(str(part / end / ckpt.WEIGHTS))
    assert want["quantize.embedding.initted"].item() == 1
    for key in ("quantize.embedding.embed_avg", "quantize.cluster_size"):
        assert key in want  # the EMA state is among the weights compared
    for key in want:
        assert torch.equal(want[key], got[key]), key
    saved, loaded = ckpt.load_training_state(full / end), ckpt.load_training_state(part / end)
    for key, value in saved["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, loaded["optimizer"]["state"][key][name]), (key, name)
    assert saved["scheduler"] == loaded["scheduler"]
    assert torch.equal(saved["rng"][0]["torch"], loaded["rng"][0]["torch"])
    metrics = [read_metrics(run_dir / "metrics.csv") for run_dir in (full, part)]
    for series in metrics:
        series.pop("train/samples_per_s")  # a rate of wall-clock time
    assert metrics[0] == metrics[1]
