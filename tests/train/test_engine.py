"""The training loop: outputs, exact resume, SIGKILL during a checkpoint write, DDP equivalence,
gradient accumulation, non-finite loss."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from eegfast.testing import requires_cuda
from eegfast.train import checkpoint as ckpt
from eegfast.train.engine import NonFiniteLossError, fit
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.runlog import read_metrics
from tests._gloo import free_port
from tests.train import worker
from tests.train.fakes import HostReads, SyntheticEEG, TinyClassifier, collate

REPO = Path(__file__).resolve().parents[2]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir / "checkpoints").path / ckpt.WEIGHTS))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=atol, msg=key)


def fit_batches_of_4(model, step, data, ctx, run_dir, overrides, resume=None):
    """``fit`` over ``data`` in batches of 4, no progress bar, with ``overrides``."""
    from eegfast.train.config import RunConfig

    config = RunConfig().with_overrides(
        {"train.batch_size": 4, "train.progress": False, **overrides}
    )
    return fit(
        model,
        step,
        data,
        config,
        run_dir,
        group_keys=data.group_keys(),
        collate_fn=collate,
        ctx=ctx,
        resume=resume,
    )


def test_fit_learns_and_writes_run_outputs(tmp_path):
    result = worker.run("finetune", str(tmp_path), {"train.epochs": 3})
    assert result.step == 3 * 8  # 4 (task, electrode set) groups of 12 items -> 8 batches of 6
    assert sum(result.losses[-4:]) < sum(result.losses[:4])
    assert (tmp_path / "config.yaml").read_text().count("batch_size: 6") == 1
    series = read_metrics(tmp_path / "metrics.csv")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/accuracy"} <= series.keys()
    lrs = [v for _, v in series["train/lr"]]
    assert max(lrs) == pytest.approx(3e-3, rel=1e-6) and lrs[-1] < lrs[2]  # warm-up then decay
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    steps = [c.step for c in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [8, 16, 24]  # once per epoch


def test_resume_from_an_intermediate_checkpoint_is_exact(tmp_path):
    full, partial = tmp_path / "full", tmp_path / "partial"
    worker.run("finetune", str(full), {"train.checkpoint_every": 4})
    worker.run("finetune", str(partial), {"train.checkpoint_every": 4})
    for info in ckpt.list_checkpoints(partial / "checkpoints"):
        if info.step > 4:  # as if the run had died after step 4 (mid-epoch: 6 steps/epoch)
            import shutil

            shutil.rmtree(info.path)
    state = ckpt.load_training_state(partial / "checkpoints" / "step-00000004")
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 4)
    resumed = worker.run("finetune", str(partial), {"train.checkpoint_every": 4}, resume="auto")
    assert resumed.step == 16
    assert_same_weights(final_weights(full), final_weights(partial))


def dropout_step(model, batch, ctx):
    """A step with a stochastic op that draws from the global torch RNG, as drop-path does."""
    features = torch.nn.functional.dropout(model(batch["x"]), p=0.5, training=True)
    return StepOutput(features.logsumexp(-1).mean())


def test_resume_with_other_settings_warns_naming_them(tmp_path):
    """Resuming with settings other than the checkpoint's (a larger max_steps, another lr) says
    which, old -> new; the same settings, or only progress / workers / how it is executed
    (activation checkpointing, and likewise strategy and compilation), say nothing."""
    import warnings

    data = SyntheticEEG(24)
    ctx = StepContext(torch.device("cpu"))
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), dropout_step, data, ctx, tmp_path, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_batches_of_4(TinyClassifier(), dropout_step, data, ctx, tmp_path,
                         {**overrides, "data.num_workers": 0,
                          "train.activation_checkpointing": True}, resume="auto")  # fmt: skip
    changed = {**overrides, "train.max_steps": 4, "optim.lr": 1e-2}
    with pytest.warns(UserWarning, match=r"optim.lr: 0.0005 -> 0.01; train.max_steps: 2 -> 4"):
        result = fit_batches_of_4(TinyClassifier(), dropout_step, data, ctx, tmp_path, changed,
                                  resume="auto")  # fmt: skip
    assert result.step == 4


@pytest.mark.parametrize("resume_at", [4, 8])
def test_mid_epoch_resume_keeps_the_global_rng_stream_of_a_stochastic_model(tmp_path, resume_at):
    """Dropout/drop-path draw from the global RNG: a run resumed mid-epoch (6 steps an epoch)
    gets the uninterrupted run's losses and weights bit for bit, so nothing else (such as the
    resumed epoch's DataLoader) draws from that RNG after its state is restored."""
    from eegfast.train.engine import seed_everything

    overrides = {"train.checkpoint_every": 4, "train.epochs": 2, "train.keep_last": 100}
    data = SyntheticEEG(24)

    def run(run_dir, resume=None):
        seed_everything(0)
        ctx = StepContext(torch.device("cpu"))
        return fit_batches_of_4(
            TinyClassifier(), dropout_step, data, ctx, run_dir, overrides, resume=resume
        )

    full = run(tmp_path / "full")
    run(tmp_path / "partial")
    for info in ckpt.list_checkpoints(tmp_path / "partial" / "checkpoints"):
        if info.step > resume_at:  # as if the run had been killed after that step
            import shutil

            shutil.rmtree(info.path)
    state = ckpt.load_training_state(tmp_path / "partial" / "checkpoints" / f"step-{resume_at:08d}")
    assert 0 < state["batch_in_epoch"] < 6  # mid-epoch
    resumed = run(tmp_path / "partial", resume="auto")
    assert full.step == resumed.step == 12
    assert resumed.losses == full.losses[resume_at:]  # bit for bit
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "partial"))


def test_checkpoint_files_load_safely(tmp_path):
    worker.run("finetune", str(tmp_path), {"train.epochs": 1})
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    state = torch.load(latest.path / ckpt.STATE, weights_only=True)  # no pickled code objects
    assert {"optimizer", "scheduler", "scaler", "rng", "step", "epoch", "batch_in_epoch"} <= set(
        state
    )
    assert latest.meta["step"] == 8 and "config" in latest.meta
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_and_resumes_exactly(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.train.worker", str(killed)]
    # The uninterrupted run, in a process like the others (same thread count -> same floats).
    subprocess.run(command[:-1] + [str(reference)], env=env, cwd=REPO, timeout=120, check=True)
    worker.kill_during_checkpoint_save(command, killed, env=env, cwd=REPO)
    # The 3rd checkpoint (step 6) was half written: only its temporary folder exists.
    assert list((killed / "checkpoints").glob(".tmp-step-00000006-*"))
    assert [c.step for c in ckpt.list_checkpoints(killed / "checkpoints")] == [2, 4]
    weights = ckpt.load_weights(killed / "checkpoints" / "step-00000004")
    assert (
        weights and ckpt.load_training_state(killed / "checkpoints" / "step-00000004")["step"] == 4
    )
    resumed = subprocess.run([*command, "--resume", "auto"], env=env, cwd=REPO, timeout=120)
    assert resumed.returncode == 0
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    assert_same_weights(final_weights(reference), final_weights(killed))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, strategy", [("finetune", "ddp"), ("pretrain", "ddp"), ("finetune", "fsdp")]
)
def test_two_process_gloo_run_matches_one_process(tmp_path, kind, strategy):
    """2 processes (each half of every batch) give the 1-process result: DDP and FSDP2."""
    single, double = tmp_path / "single", tmp_path / "double"
    overrides = {"train.epochs": 1, "train.strategy": strategy}
    one = worker.run(kind, str(single), overrides)
    args = (2, free_port(), kind, str(double), overrides)
    mp.spawn(worker.spawned, args=args, nprocs=2, join=True)
    assert_same_weights(final_weights(single), final_weights(double), atol=2e-5)
    two = read_metrics(double / "metrics.csv")["train/loss"]
    assert [s for s, _ in two] == list(range(1, one.step + 1))
    torch.testing.assert_close(
        torch.tensor([v for _, v in two]), torch.tensor(one.losses), atol=2e-5, rtol=2e-5
    )


def spawned_resume_counting_weight_reads(
    rank: int, world_size: int, port: int, kind: str, run_dir: str, overrides: dict
) -> None:
    """worker.spawned resuming ``run_dir`` (``--resume auto``); writes how many times this
    rank read the checkpoint's weights to ``run_dir/weight-reads-<rank>``."""
    real, reads = ckpt.load_weights, []

    def counting(*args, **kwargs):
        reads.append(args)
        return real(*args, **kwargs)

    ckpt.load_weights = counting  # this (child) process only
    worker.spawned(rank, world_size, port, kind, run_dir, overrides, "auto")
    (Path(run_dir) / f"weight-reads-{rank}").write_text(str(len(reads)))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_reads_the_checkpoint_on_rank_0_only_and_is_exact(tmp_path, strategy):
    """Rank 0 reads the weights and optimiser state and broadcasts them (each FSDP rank keeps
    its shard); the resumed run ends on the uninterrupted run's weights."""
    import shutil

    full, partial = tmp_path / "full", tmp_path / "partial"
    overrides = {"train.epochs": 1, "train.strategy": strategy, "train.checkpoint_every": 2}
    args = (2, free_port(), "finetune", str(full), overrides)
    mp.spawn(worker.spawned, args=args, nprocs=2, join=True)
    shutil.copytree(full, partial)
    for info in ckpt.list_checkpoints(partial / "checkpoints"):
        if info.step > 2:  # as if the run had died after step 2 (mid-epoch)
            shutil.rmtree(info.path)
    args = (2, free_port(), "finetune", str(partial), overrides)
    mp.spawn(spawned_resume_counting_weight_reads, args=args, nprocs=2, join=True)
    assert [(partial / f"weight-reads-{rank}").read_text() for rank in (0, 1)] == ["1", "0"]
    assert ckpt.latest_checkpoint(partial / "checkpoints").step == 8
    assert_same_weights(final_weights(full), final_weights(partial))


def spawned_exit_check(rank: int, world_size: int, port: int, marker_dir: str) -> None:
    """A torchrun-like worker holding only an unreachable reference cycle (as an FSDP model
    is once its names are gone) at exit, the collector off: writes whether the cycle was freed
    by the time the exit handlers registered before eegfast's ran (they run after them)."""
    import atexit
    import gc
    import weakref

    from eegfast.train.distributed import init_distributed, shutdown

    gc.disable()
    marker, refs = Path(marker_dir) / f"rank{rank}", []
    # registered before eegfast's handler, so it runs after it (exit handlers run in reverse)
    atexit.register(lambda: marker.write_text("alive" if refs[0]() is not None else "freed"))
    worker.set_rendezvous(rank, world_size, port)
    info = init_distributed(torch.device("cpu"))
    held = _Cycle({})  # still named while the group is shut down, as a command's model
    refs.append(weakref.ref(held))
    shutdown(info)
    del held


class _Cycle:
    def __init__(self, node: dict) -> None:
        self.node = node
        node["owner"] = self  # a reference cycle: only the cyclic collector frees it


@pytest.mark.slow
def test_process_groups_holders_in_reference_cycles_are_freed_before_interpreter_shutdown(
    tmp_path,
):
    """Left to the interpreter's shutdown, an FSDP model's process group was freed while Python
    tore itself down, now and then aborting the worker (SIGABRT, "terminate called without an
    active exception"): eegfast's exit handler collects such cycles first."""
    mp.spawn(spawned_exit_check, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["freed", "freed"]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    worker.run("finetune", str(tmp_path / "full"), {"train.epochs": 1})
    worker.run("finetune", str(tmp_path / "accum"), {"train.epochs": 1, "train.grad_accum": 2})
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "accum"), 2e-6)


def nan_at_call(n: int):
    """A step function whose n-th call returns a NaN loss, and the count of its calls."""
    calls = {"n": 0}

    def step(model, batch, ctx):
        calls["n"] += 1
        loss = model(batch["x"]).logsumexp(-1).mean()
        if calls["n"] == n:
            loss = loss * float("nan")
        return StepOutput(loss)

    return step, calls


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = SyntheticEEG(24)
    step, _ = nan_at_call(5)
    with pytest.raises(NonFiniteLossError, match="step 5.*step-00000004.*resume"):
        fit_batches_of_4(
            TinyClassifier(),
            step,
            data,
            StepContext(torch.device("cpu")),
            tmp_path,
            {"train.checkpoint_every": 2},
        )
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_non_finite_loss_stops_the_run_before_the_next_log_point(tmp_path):
    """Logging and checkpoints far away: the step's non-finite flag, copied to the host as it
    goes (at once on CPU), stops the run at that step, not at the epoch's end (24 steps)."""
    data = SyntheticEEG(96)
    step, calls = nan_at_call(5)
    overrides = {"train.max_steps": 40, "train.log_every": 1000, "train.checkpoint_every": 1000}
    with pytest.raises(NonFiniteLossError, match=r"step 5, epoch 0 \(seen at step 5\)"):
        fit_batches_of_4(
            TinyClassifier(), step, data, StepContext(torch.device("cpu")), tmp_path, overrides
        )
    assert calls["n"] == 5
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


def test_retention_keeps_last_n_and_the_best(tmp_path):
    weights = {"w": torch.zeros(2)}
    for step, metric in [(1, 0.5), (2, 0.1), (3, 0.9), (4, 0.8), (5, 0.7)]:
        ckpt.save_checkpoint(tmp_path, step, weights, {"step": step}, {"metric": metric})
        ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]
    assert ckpt.best_checkpoint(tmp_path).step == 2
    assert ckpt.resolve_weights_path(tmp_path).parent.name == "step-00000002"
    assert ckpt.resolve_weights_path(tmp_path, prefer="latest").parent.name == "step-00000005"
    with pytest.raises(FileNotFoundError, match="no weights at"):
        ckpt.resolve_weights_path(tmp_path / "nothing")


def test_activation_checkpointing_recomputes_to_the_same_result(tmp_path):
    worker.run("finetune", str(tmp_path / "plain"), {"train.epochs": 1})
    worker.run(
        "finetune",
        str(tmp_path / "ckpt"),
        {"train.epochs": 1, "train.activation_checkpointing": True},
    )
    assert_same_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt"), 1e-6)


def test_bf16_autocast_trains(tmp_path):
    result = worker.run(
        "finetune", str(tmp_path / "bf16"), {"train.epochs": 1, "train.precision": "bf16"}
    )
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_fp16_loss_scaling_checkpoints_the_scaler_and_resumes_exactly(tmp_path):
    """fp16 autocast with a GradScaler (on CPU here): the scaler's state is checkpointed and
    a resumed run ends with the uninterrupted run's weights."""
    overrides = {"train.precision": "fp16", "train.checkpoint_every": 4, "train.epochs": 2}
    full, partial = tmp_path / "full", tmp_path / "partial"
    result = worker.run("finetune", str(full), overrides)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    worker.run("finetune", str(partial), overrides)
    state = ckpt.load_training_state(partial / "checkpoints" / "step-00000004")
    assert state["scaler"]["scale"] > 1  # loss scaling was on (an empty dict when disabled)
    for info in ckpt.list_checkpoints(partial / "checkpoints"):
        if info.step > 4:
            import shutil

            shutil.rmtree(info.path)
    worker.run("finetune", str(partial), overrides, resume="auto")
    assert_same_weights(final_weights(full), final_weights(partial))


def objective_run(objective: str):
    """(model, step function, context) of a pretraining objective as the commands set it up,
    with tiny models: masked and hybrid with the tokenizer's codes cached, or the tokenizer's
    own training (the quantizers' finiteness checks off, as they are on a GPU)."""
    from eegfast.models import create_model
    from eegfast.train.hybrid import create_hybrid_pretrain_model, hybrid_step
    from eegfast.train.objectives import TargetCache, masked_step, tokenizer_step

    torch.manual_seed(0)
    if objective == "tokenizer":
        model = create_model("vqnsp_tiny")
        model.quantize.check_finite = False
        return model, tokenizer_step, StepContext(torch.device("cpu"))
    tokenizer = create_model("vqnsp_tiny").eval().requires_grad_(False)
    tokenizer.quantize.check_finite = False  # get_codebook_indices checks as forward does
    cache = TargetCache(tokenizer.config.num_codes)
    ctx = StepContext(torch.device("cpu"), tokenizer=tokenizer, target_cache=cache)
    if objective == "masked":
        return create_model("labram_tiny_pretrain"), masked_step, ctx
    return create_hybrid_pretrain_model("labram_tiny_pretrain"), hybrid_step, ctx


@pytest.mark.parametrize("objective", ["masked", "hybrid", "tokenizer"])
def test_steps_between_log_points_never_read_values_back(objective, tmp_path, monkeypatch):
    """Pretraining as the commands run it: the host reads no value between log points, so a
    GPU's queue is never drained there. Runs logging only at the end read as many values for 2
    steps as for 5 (the first epoch: the tokenizer runs, or trains from its k-means start), and
    for 7 as for 12 (the second epoch: the codes come from the cache); each step's loss,
    gradient norm and metrics are read back once per checkpoint (at each epoch's end), all
    logged."""
    from eegfast.train import engine

    data = SyntheticEEG(24, channels=(3,), patches=2)  # 6 steps an epoch
    read_backs = []
    original = engine._read_back
    monkeypatch.setattr(
        engine, "_read_back", lambda values: read_backs.append(len(values)) or original(values)
    )
    reads = HostReads.on_device(monkeypatch)
    counts, per_step = {}, set()
    for steps in (2, 5, 7, 12):
        model, step, ctx = objective_run(objective)
        read_backs.clear()
        reads.count = 0
        with reads:
            result = fit_batches_of_4(
                model, step, data, ctx, tmp_path / str(steps),
                {"train.max_steps": steps, "train.log_every": 1000},
            )  # fmt: skip
        counts[steps] = reads.count
        assert len(result.losses) == steps and all(map(math.isfinite, result.losses))
        if ctx.target_cache is not None:
            assert ctx.target_cache.hits == max(0, steps - 6)
        # read back before each checkpoint: the first epoch's end and the last step
        assert len(read_backs) == (1 if steps <= 6 else 2)
        assert sum(read_backs) % steps == 0
        per_step.add(sum(read_backs) // steps)
        if objective == "masked":  # the loss, the gradient norm and five metrics
            assert per_step == {7}
        logged = read_metrics(tmp_path / str(steps) / "metrics.csv")
        assert {"train/loss", "train/grad_norm"} <= logged.keys() and len(logged) >= 4
    assert len(per_step) == 1
    assert counts[2] == counts[5] and counts[7] == counts[12]


@pytest.mark.gpu
@requires_cuda
def test_gpu_training_loop_never_waits_for_the_gpu_between_log_points(tmp_path, monkeypatch):
    """`fit` with masked pretraining and the target cache on a GPU: from the third step (the
    first two compile, autotune and time launch choices) until the loop reads its scalars
    back at the end, CUDA raises on any call that makes the host wait for the device — data
    copies, the objective, backward, clipping, the optimiser, the cache's copies back."""
    from eegfast.models import create_model
    from eegfast.train import engine
    from eegfast.train.objectives import TargetCache, masked_step

    device = torch.device("cuda")
    data = SyntheticEEG(24, channels=(3,), patches=2)  # 6 steps an epoch, the cache's hits after
    original = engine._read_back

    def read_back(values):
        torch.cuda.set_sync_debug_mode("default")
        return original(values)

    def step(model, batch, ctx):
        if ctx.step >= 2:  # again after each read-back (which turns it off)
            torch.cuda.set_sync_debug_mode("error")
        return masked_step(model, batch, ctx)

    monkeypatch.setattr(engine, "_read_back", read_back)
    model = create_model("labram_tiny_pretrain")
    tokenizer = create_model("vqnsp_tiny", device=device).eval().requires_grad_(False)
    cache = TargetCache(tokenizer.config.num_codes)
    ctx = StepContext(device, tokenizer=tokenizer, target_cache=cache)
    overrides = {"train.max_steps": 12, "train.log_every": 1000, "train.checkpoint_every": 1000}
    try:
        result = fit_batches_of_4(model, step, data, ctx, tmp_path, overrides)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(result.losses) == 12 and all(map(math.isfinite, result.losses))
    assert cache.hits == 6


def loss_rising_after(n: int):
    """A step function whose loss is the model's plus the call count past ``n`` (so the
    training loss is lowest early on)."""
    calls = {"n": 0}

    def step(model, batch, ctx):
        calls["n"] += 1
        return StepOutput(model(batch["x"]).logsumexp(-1).mean() + max(0, calls["n"] - n))

    return step


def test_a_run_without_held_out_data_stands_for_its_newest_checkpoint(tmp_path):
    """No eval_fn: the training loss since the checkpoint before ranks nothing, so a run
    folder resolves to its last checkpoint (it resolved to the one whose batches had the lowest
    loss), pruning keeps only the newest, and the loss is kept as ``train_loss``."""
    data = SyntheticEEG(24)
    result = fit_batches_of_4(
        TinyClassifier(),
        loss_rising_after(2),
        data,
        StepContext(torch.device("cpu")),
        tmp_path,
        {"train.checkpoint_every": 2, "train.keep_last": 1, "train.epochs": 1},
    )
    found = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [c.step for c in found] == [6]
    assert ckpt.best_checkpoint(tmp_path / "checkpoints") is None
    assert ckpt.resolve_weights_path(tmp_path).parent.name == "step-00000006"
    meta = found[-1].meta
    assert meta["metric"] is None and meta["metric_name"] is None
    # the mean loss of steps 5 and 6 (since the checkpoint at step 4), as the steps gave it:
    # an absolute bound is not safe, the model's part (a logsumexp the run drives down) goes
    # below -0.5 with some initialisations
    assert len(result.losses) == 6
    assert meta["train_loss"] == pytest.approx(sum(result.losses[4:]) / 2, rel=1e-6)


def test_checkpoints_written_before_metric_name_rank_only_by_validation(tmp_path):
    """Engine checkpoints from before ``metric_name`` was recorded: their metric is a held-out
    loss only when the run held data out (``validation`` in the meta)."""
    for step, metric in [(1, 0.1), (2, 0.5)]:
        ckpt.save_checkpoint(
            tmp_path / "train", step, {"w": torch.zeros(1)}, {}, {"metric": metric, "config": {}}
        )
        ckpt.save_checkpoint(
            tmp_path / "val",
            step,
            {"w": torch.zeros(1)},
            {},
            {"metric": metric, "config": {}, "validation": {}},
        )
    assert ckpt.best_checkpoint(tmp_path / "train") is None
    assert ckpt.resolve_weights_path(tmp_path / "train").parent.name == "step-00000002"
    assert ckpt.best_checkpoint(tmp_path / "val").step == 1


def test_an_engine_checkpoint_without_a_named_metric_is_not_ranked(tmp_path):
    """A metric put into a checkpoint of a run without held-out data (metric_name None) does
    not make it the best."""
    for step, metric in [(1, -1.0), (2, None)]:
        meta = {"metric": metric, "metric_name": None, "config": {}, "train_loss": 1.0}
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {}, meta)
    assert ckpt.best_checkpoint(tmp_path) is None


def spawned_recording_draws(
    rank: int, world_size: int, port: int, run_dir: str, steps: int = 3, resume: str | None = None
) -> None:
    """worker.run's finetune under torchrun's environment, its steps drawing from the global
    torch generator (as stochastic depth and dropout do); writes the draws of each step to
    ``run_dir/draws-<rank>``."""
    worker.set_rendezvous(rank, world_size, port)
    torch.set_num_threads(1)
    _run_recording_draws(run_dir, rank, steps, resume)


def _run_recording_draws(
    run_dir: str, rank: int = 0, steps: int = 3, resume: str | None = None
) -> None:
    from eegfast.train.arch import MultiTaskClassifier
    from eegfast.train.config import RunConfig
    from eegfast.train.distributed import init_distributed, shutdown
    from eegfast.train.engine import seed_everything
    from eegfast.train.objectives import classification_step

    draws = []

    def step(model, batch, ctx):
        draws.append(torch.rand(()).item())
        return classification_step(model, batch, ctx)

    config = RunConfig().with_overrides({**worker.BASE, "train.max_steps": steps})
    info = init_distributed(torch.device("cpu"))
    seed_everything(config.train.seed)
    data = SyntheticEEG(48, tasks=("a", "b"))
    model = MultiTaskClassifier(TinyClassifier(0), {"a": 2, "b": 2}, 16)
    ctx = StepContext(torch.device("cpu"), task_ids={"a": 0, "b": 1})
    try:
        fit(
            model, step, data, config, run_dir, group_keys=data.group_keys(),
            collate_fn=collate, ctx=ctx, dist_info=info, find_unused_parameters=True,
            resume=resume,
        )  # fmt: skip
    finally:
        del model
        shutdown(info)
    (Path(run_dir) / f"draws-{rank}").write_text(" ".join(map(str, draws)))


@pytest.mark.slow
def test_ranks_draw_their_own_random_numbers_and_rank_0_those_of_one_process(tmp_path):
    """After the model is built (from one seed on every rank), each rank's global generator
    is its own: stochastic depth and dropout differ between ranks' windows (every rank drew
    the same numbers); rank 0 draws what one process draws."""
    _run_recording_draws(str(tmp_path / "single"))
    mp.spawn(spawned_recording_draws, args=(2, free_port(), str(tmp_path / "double")), nprocs=2)
    one = (tmp_path / "single" / "draws-0").read_text().split()
    rank0, rank1 = ((tmp_path / "double" / f"draws-{r}").read_text().split() for r in (0, 1))
    assert len(one) == len(rank0) == len(rank1) == 3
    assert rank0 == one
    assert not set(rank0) & set(rank1)


@pytest.mark.slow
@pytest.mark.parametrize("saved_states", [1, 2])
def test_ranks_resumed_from_fewer_processes_draw_their_own_random_numbers(tmp_path, saved_states):
    """A one-process checkpoint resumed by two processes: the checkpoint holds one rank's
    random state, which rank 0 takes; rank 1 draws its own numbers, not a copy of rank 0's
    (it took the same saved state: stochastic depth and dropout alike on both ranks again).
    saved_states=2: the checkpoint holds that state twice, as two processes saved theirs before
    each rank seeded its own streams; rank 1 draws its own numbers then too."""
    run_dir = tmp_path / "run"
    _run_recording_draws(str(run_dir), steps=2)
    assert [c.step for c in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2]
    state_file = run_dir / "checkpoints" / "step-00000002" / ckpt.STATE
    state = torch.load(state_file, weights_only=True)
    state["rng"] = state["rng"] * saved_states
    torch.save(state, state_file)
    (run_dir / "draws-0").unlink()  # (the one process's; each resumed rank writes its own)
    args = (2, free_port(), str(run_dir), 4, "auto")
    mp.spawn(spawned_recording_draws, args=args, nprocs=2)
    rank0, rank1 = ((run_dir / f"draws-{r}").read_text().split() for r in (0, 1))
    assert len(rank0) == len(rank1) == 2
    assert not set(rank0) & set(rank1)


class PlainBlocks(torch.nn.Module):
    """Two Linear blocks in ``blocks``, without ``set_grad_checkpointing`` (picklable: at
    module level)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_checkpointing_a_model_of_plain_blocks_keeps_copies_their_own():
    """A model without ``set_grad_checkpointing`` gets each block's forward replaced on the
    instance. A closure over the block's bound forward made a copy (``copy.deepcopy``: an EMA,
    ``AveragedModel``) run the original's blocks with the original's weights, and the model
    could not be pickled."""
    import copy
    import io

    from eegfast.train.engine import enable_activation_checkpointing

    model = PlainBlocks()
    assert enable_activation_checkpointing(model) == 2
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    x = torch.randn(3, 4, requires_grad=True)
    out = twin(x)
    assert torch.count_nonzero(out) == 0  # the copy's own (zero) weights
    out.sum().backward()
    assert all(p.grad is not None for p in twin.parameters())
    assert all(p.grad is None for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))
