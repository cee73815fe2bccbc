"""The training loop on resume with other settings, its logs on resume, the logged lr, and the
best checkpoint's choice."""

from __future__ import annotations

import csv
import math
import shutil
import time
import warnings

import pytest
import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train import engine
from eegfast.train.objectives import StepContext, StepOutput
from eegfast.train.optim import cosine_with_warmup
from eegfast.train.runlog import read_metrics
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4


def logsumexp_step(model, batch, ctx):
    return StepOutput(model(batch["x"]).logsumexp(-1).mean())


def cpu() -> StepContext:
    return StepContext(torch.device("cpu"))


def test_resume_with_a_lower_lr_and_no_weight_decay_trains_with_them(tmp_path, optimizers):
    """The non-finite-loss advice: a lower optim.lr, then --resume auto. The resumed steps use
    the new lr's schedule and the new weight decay, not the checkpoint's."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 4, "train.checkpoint_every": 2, "optim.warmup_fraction": 0.0,
                 "optim.min_lr": 0.0}  # fmt: skip
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")  # as if it had died after step 2
    used = {}

    def step(model, batch, ctx):
        groups = optimizers[-1].param_groups
        used[ctx.step] = [(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in groups]
        return logsumexp_step(model, batch, ctx)

    changed = {**overrides, "optim.lr": 1e-5, "optim.weight_decay": 0.0, "optim.betas": (0.8, 0.9)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning naming the changed settings
        fit_batches_of_4(TinyClassifier(), step, data, cpu(), tmp_path, changed, resume="auto")
    for s in (2, 3):
        lr = cosine_with_warmup(s, total_steps=4, warmup_steps=0, base_lr=1e-5, min_lr=0.0)
        assert used[s] == [(pytest.approx(lr), 0.0, (0.8, 0.9))] * len(used[s]), s


def test_resume_with_other_grad_accum_continues_after_the_same_global_batches(tmp_path):
    """The position in the epoch counts micro-batches: a run checkpointed after 2 steps without
    accumulation and resumed with train.grad_accum=2 goes on with the 3rd global batch."""
    data = SyntheticEEG(24)  # 6 global batches of 4 an epoch

    def recording(seen):
        def step(model, batch, ctx):
            seen.append(sorted(batch["index"].tolist()))
            return logsumexp_step(model, batch, ctx)

        return step

    full, resumed = [], []
    overrides = {"train.max_steps": 6, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), recording(full), data, cpu(), tmp_path / "full", overrides)
    run = tmp_path / "resumed"
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), run,
                     {**overrides, "train.max_steps": 2})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_batches_of_4(TinyClassifier(), recording(resumed), data, cpu(), run,
                         {**overrides, "train.grad_accum": 2}, resume="auto")  # fmt: skip
    joined = [sorted(a + b) for a, b in zip(resumed[::2], resumed[1::2], strict=True)]
    assert joined == full[2:]


def test_resume_keeps_each_logged_step_once_in_metrics_csv_and_tensorboard(tmp_path):
    """A run that logged steps 5 and 6 after its last checkpoint (step 4) and is resumed from it
    logs them again: metrics.csv and TensorBoard hold each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 6, "train.checkpoint_every": 4, "train.log_every": 1}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")  # killed before that checkpoint
    # TensorBoard orders event files by name, whose time stamp has whole seconds: a resume in
    # the same second as the first run (only in a test) could be read first, before the purge
    time.sleep(1.1)
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides,
                     resume="auto")  # fmt: skip
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = [(int(r["step"]), r["tag"]) for r in csv.DictReader(f)]
    assert sorted(s for s, tag in rows if tag == "train/loss") == [1, 2, 3, 4, 5, 6]
    assert len(rows) == len(set(rows))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_logged_lr_is_the_lr_each_step_used_under_layer_decay(tmp_path, optimizers):
    """train/lr is the schedule's lr of the logged step (the head's, layer scale 1), not the
    patch embedding's layer-decayed one, nor the next step's."""
    used = []

    def step(model, batch, ctx):
        used.append(max(g["lr"] for g in optimizers[-1].param_groups))
        return logsumexp_step(model, batch, ctx)

    overrides = {"train.max_steps": 4, "train.log_every": 1, "optim.layer_decay": 0.5,
                 "optim.warmup_steps": 2}  # fmt: skip
    fit_batches_of_4(TinyClassifier(), step, SyntheticEEG(24), cpu(), tmp_path, overrides)
    logged = [v for _, v in read_metrics(tmp_path / "metrics.csv")["train/lr"]]
    assert logged == pytest.approx(used, rel=1e-6)
    assert max(logged) == pytest.approx(5e-4)  # optim.lr, reached at the warm-up's end


def test_resume_with_other_layer_decay_says_so(tmp_path):
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"step-00000002.*optim.layer_decay"):
            changed = {"train.max_steps": 4, "optim.layer_decay": 0.5}
            fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, changed,
                             resume="auto")  # fmt: skip


def test_resume_of_an_fp32_checkpoint_with_fp16_starts_a_fresh_loss_scale(tmp_path):
    """The checkpoint's scaler state is empty without fp16; an fp16 resume scales afresh."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 2, "train.checkpoint_every": 2}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path,
                                  {**overrides, "train.max_steps": 4, "train.precision": "fp16"},
                                  resume="auto")  # fmt: skip
    assert result.step == 4 and all(map(math.isfinite, result.losses))
    assert ckpt.load_training_state(tmp_path / "checkpoints" / "step-00000004")["scaler"]


def test_a_non_finite_metric_never_makes_the_best_checkpoint(tmp_path):
    """A failed evaluation (NaN) at the newest checkpoint: the best stays the lowest finite
    metric, and pruning keeps it."""
    for step, metric in [(1, 0.5), (2, 0.1), (3, 0.9), (4, math.nan)]:
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"metric": metric})
        ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert ckpt.best_checkpoint(tmp_path).step == 2
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4]


# --- re-saving a step, resuming from an older checkpoint, fp16 skipped steps, FSDP2 accumulation


KILL_IN_RESAVE = """
import os, shutil, sys, torch
from pathlib import Path
from eegfast.train import checkpoint as ckpt
folder, at = Path(sys.argv[1]), sys.argv[2]
real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst):  # killed as the new folder is renamed into place
    if at == "rename" and Path(src).name.startswith(".tmp-"):
        os._exit(9)
    return real_replace(src, dst)
def rmtree(path, *args, **kwargs):  # killed as the old folder is deleted
    if at == "delete" and Path(path).name.startswith(".old-"):
        os._exit(9)
    return real_rmtree(path, *args, **kwargs)
ckpt.os.replace, ckpt.shutil.rmtree = replace, rmtree
ckpt.save_checkpoint(folder, 4, {"w": torch.ones(2)}, {"step": 4}, {"metric": 0.5})
"""


@pytest.mark.parametrize("at, kept", [("rename", 1.0), ("delete", 0.5)])
def test_a_kill_while_a_step_is_saved_again_keeps_that_step(tmp_path, at, kept):
    """A process killed while it replaces step-4 with a new save of step 4: between the two
    renames the old step 4 is still listed (and resumable); after them, the new one. The next
    save leaves one complete step-00000004 and nothing hidden."""
    import os
    import subprocess
    import sys

    from tests.train.test_engine import REPO

    ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {"step": 4}, {"metric": 1.0})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", KILL_IN_RESAVE, str(tmp_path), at], env=env)
    assert child.returncode == 9
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [4]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.meta["metric"] == kept
    assert ckpt.load_training_state(latest.path) == {"step": 4}
    assert ckpt.load_weights(tmp_path)["w"].tolist() == [kept == 0.5] * 2
    ckpt.save_checkpoint(tmp_path, 5, {"w": torch.zeros(2)}, {"step": 5}, {"metric": 2.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    assert ckpt.checkpoint_meta(tmp_path / "step-00000004")["metric"] == kept


def test_a_failed_rename_while_a_step_is_saved_again_keeps_the_old_one(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {"step": 4}, {"metric": 1.0})
    real_replace = ckpt.os.replace

    def replace(src, dst):
        if str(src).endswith(f"-{ckpt.os.getpid()}") and ".tmp-" in str(src):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        ckpt.save_checkpoint(tmp_path, 4, {"w": torch.ones(2)}, {"step": 4}, {"metric": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    assert ckpt.checkpoint_meta(tmp_path / "step-00000004")["metric"] == 1.0


def test_resume_from_an_older_checkpoint_sets_the_abandoned_later_ones_aside(tmp_path):
    """Checkpoints 4 and 6, then a resume from step 4 (by path) that goes to step 5 with
    keep_last=2: the abandoned run's step 6 is moved aside with a warning naming it, so the
    newest checkpoint (--resume auto) is step 5 and retention keeps 4 and 5."""
    data = SyntheticEEG(24)
    overrides = {"train.max_steps": 6, "train.checkpoint_every": 2, "train.keep_last": 2}
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, overrides)
    folder = tmp_path / "checkpoints"
    assert [c.step for c in ckpt.list_checkpoints(folder)] == [4, 6]
    branch = {**overrides, "train.max_steps": 5, "train.checkpoint_every": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, branch,
                         resume=str(folder / "step-00000004"))  # fmt: skip
    said = [str(w.message) for w in caught if "abandons" in str(w.message)]
    aside = folder / "abandoned-after-step-00000004"
    assert len(said) == 1 and "step-00000006" in said[0] and str(aside) in said[0]
    assert [c.step for c in ckpt.list_checkpoints(folder)] == [4, 5]
    assert ckpt.latest_checkpoint(folder).step == 5
    assert ckpt.load_training_state(aside / "step-00000006")["step"] == 6
    # the same again from step 4: a second folder, the first one untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_batches_of_4(TinyClassifier(), logsumexp_step, data, cpu(), tmp_path, branch,
                         resume=str(folder / "step-00000004"))  # fmt: skip
    assert (folder / "abandoned-after-step-00000004-2" / "step-00000005").is_dir()
    assert (aside / "step-00000006").is_dir()


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward gives infinite gradients: a finite loss the fp16 scaler
    skips every step for."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def infinite_gradients_for(calls: int):
    count = {"n": 0}

    def step(model, batch, ctx):
        count["n"] += 1
        logits = model(batch["x"])
        if count["n"] <= calls:
            logits = InfiniteGradient.apply(logits)
        return StepOutput(logits.logsumexp(-1).mean())

    return step


def test_fp16_steps_skipped_again_and_again_stop_the_run(tmp_path):
    """Non-finite gradients at every step under fp16 (the loss finite): the scaler skips each
    step; after MAX_SKIPPED_STEPS in a row the run stops, saying so, instead of finishing 40
    steps that learned nothing. Fewer in a row (the scaler finding its scale) train on."""
    data = SyntheticEEG(96)
    overrides = {"train.max_steps": 40, "train.precision": "fp16", "train.log_every": 5,
                 "train.checkpoint_every": 1000}  # fmt: skip
    n = engine.MAX_SKIPPED_STEPS
    with pytest.raises(engine.NonFiniteLossError) as stopped:
        fit_batches_of_4(TinyClassifier(), infinite_gradients_for(10**9), data, cpu(),
                         tmp_path / "stuck", overrides)  # fmt: skip
    message = str(stopped.value)
    assert f"skipped {n} optimiser steps in a row (steps 1 to {n}, epoch 0" in message
    assert "train.precision=bf16" in message and "--resume auto" in message
    assert not ckpt.list_checkpoints(tmp_path / "stuck" / "checkpoints")
    result = fit_batches_of_4(TinyClassifier(), infinite_gradients_for(n - 1), data, cpu(),
                              tmp_path / "recovers", overrides)  # fmt: skip
    assert result.step == 40 and all(map(math.isfinite, result.losses))


def _two_process_jobs(rank: int, world_size: int, jobs: list[tuple[str, int, dict]]) -> None:
    """Each job a 2-process gloo run of tests.train.worker's finetuning, with an eval_fn; rank
    0 writes how many gradient reductions FSDP2 ran (``reductions``), each rank a marker of
    its eval_fn calls."""
    import functools
    import os
    from pathlib import Path

    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from tests.train import worker

    reductions = {"n": 0}
    real_reduce = _fsdp_param_group.foreach_reduce

    def counting_reduce(*args, **kwargs):
        reductions["n"] += 1
        return real_reduce(*args, **kwargs)

    def eval_fn(model):  # a forward pass of the wrapped model, on every rank
        item = SyntheticEEG(2, tasks=("a",))[0]
        with torch.no_grad():
            model(item["x"][None], item["input_chans"][None], task="a")
        with (Path(os.environ["EVAL_DIR"]) / f"eval-rank{rank}").open("a") as f:
            f.write("x")
        return {"val_loss": float(rank + 1)}

    _fsdp_param_group.foreach_reduce = counting_reduce
    worker.fit = functools.partial(engine.fit, eval_fn=eval_fn)
    torch.set_num_threads(1)
    for run_dir, port, overrides in jobs:
        worker.set_rendezvous(rank, world_size, port)
        os.environ["EVAL_DIR"] = run_dir
        reductions["n"] = 0
        worker.run("finetune", run_dir, overrides)
        if rank == 0:
            (Path(run_dir) / "reductions").write_text(str(reductions["n"]))


@pytest.mark.slow
def test_fsdp_gradient_accumulation_reduces_once_per_step_and_evaluates_on_every_rank(tmp_path):
    """train.strategy=fsdp with train.grad_accum=2 on 2 gloo processes: gradients are reduced
    once per optimiser step (as without accumulation), not once per micro-batch, and the run
    ends on the 1-process weights. eval_fn runs on both ranks at each checkpoint; rank 0's
    val_loss is the checkpoint's metric."""
    import torch.multiprocessing as mp

    from tests._gloo import free_port
    from tests.train import worker
    from tests.train.test_engine import assert_same_weights, final_weights

    base = {"train.strategy": "fsdp", "train.batch_size": 4, "train.max_steps": 3,
            "train.checkpoint_every": 3}  # fmt: skip
    accum = {**base, "train.grad_accum": 2}
    ports = [free_port(), free_port()]
    jobs = [(str(tmp_path / "plain"), ports[0], base), (str(tmp_path / "accum"), ports[1], accum)]
    mp.spawn(_two_process_jobs, args=(2, jobs), nprocs=2, join=True)
    worker.run("finetune", str(tmp_path / "single"), accum)
    plain = int((tmp_path / "plain" / "reductions").read_text())
    assert plain > 0
    assert int((tmp_path / "accum" / "reductions").read_text()) == plain
    assert_same_weights(final_weights(tmp_path / "single"), final_weights(tmp_path / "accum"), 2e-5)
    for run in ("plain", "accum"):
        assert (tmp_path / run / "eval-rank0").read_text() == "x"
        assert (tmp_path / run / "eval-rank1").read_text() == "x"
        assert ckpt.latest_checkpoint(tmp_path / run / "checkpoints").meta["metric"] == 1.0


def _cluster_jobs(rank: int, world_size: int, ports: list[int], root: str) -> None:
    """Two 2-process gloo jobs: (1) the real pretraining model and tokenizer wrapped with
    train.strategy=fsdp, rank 0 writing which modules became FSDP units (``units.json``);
    (2) ``--resume auto`` where only rank 0's run folder holds a checkpoint (a machine whose
    run folder is not the shared one), each rank writing the error it raised (``error<rank>``)."""
    import faulthandler
    import json
    import os
    import sys
    from pathlib import Path

    from torch.distributed.fsdp import FSDPModule

    from eegfast.models import create_model
    from eegfast.train.arch import build_model
    from eegfast.train.distributed import init_distributed, shutdown, wrap_model
    from tests.train import worker

    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails, with the stacks
    torch.set_num_threads(1)
    worker.set_rendezvous(rank, world_size, ports[0])
    info = init_distributed(torch.device("cpu"))
    models = {
        "labram_tiny_pretrain": build_model(
            {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}
        ),
        "vqnsp_tiny": create_model("vqnsp_tiny"),
    }
    blocks = {
        "labram_tiny_pretrain": [f"student.blocks.{i}" for i in range(len(models[
            "labram_tiny_pretrain"].student.blocks))],
        "vqnsp_tiny": [f"{part}.blocks.{i}" for part in ("encoder", "decoder")
                       for i in range(len(getattr(models["vqnsp_tiny"], part).blocks))],
    }  # fmt: skip
    units = {}
    for name, model in models.items():
        wrapped = wrap_model(model, info, torch.device("cpu"), strategy="fsdp")
        units[name] = [n for n, m in wrapped.named_modules() if isinstance(m, FSDPModule)]
    shutdown(info)
    if rank == 0:
        (Path(root) / "units.json").write_text(json.dumps({"units": units, "blocks": blocks}))

    worker.set_rendezvous(rank, world_size, ports[1])
    try:
        worker.run("finetune", str(Path(root) / f"rank{rank}"), RESUME_RUN, resume="auto")
    except RuntimeError as error:
        (Path(root) / f"error{rank}").write_text(str(error))
    sys.stdout.flush()
    os._exit(0)  # as test_distributed_real's workers: no interpreter teardown


RESUME_RUN = {"train.max_steps": 4, "train.checkpoint_every": 2}


@pytest.mark.slow
def test_fsdp_shards_nested_blocks_and_ranks_must_resume_from_the_same_checkpoint(tmp_path):
    """(1) FSDP2 makes each transformer block its own unit also where the blocks sit one level
    down (the pretraining model's ``student.blocks``, the tokenizer's ``encoder.blocks`` and
    ``decoder.blocks``): with the root as the only unit every step gathers the whole model at
    once. (2) A resume where one process finds a checkpoint and another none stops on every
    rank, naming each rank's checkpoint, before anything trains or is saved: DDP would have
    averaged the gradients of two different models into the next checkpoints."""
    import json

    import torch.multiprocessing as mp

    from tests._gloo import free_port
    from tests.train import worker

    worker.run("finetune", str(tmp_path / "rank0"), RESUME_RUN)
    shutil.rmtree(tmp_path / "rank0" / "checkpoints" / "step-00000004")
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    mp.spawn(_cluster_jobs, args=(2, ports, str(tmp_path)), nprocs=2, join=True)

    found = json.loads((tmp_path / "units.json").read_text())
    for name, blocks in found["blocks"].items():
        assert len(blocks) >= 2, name
        assert set(found["units"][name]) == {"", *blocks}, name  # "": the root
    for rank in (0, 1):
        message = (tmp_path / f"error{rank}").read_text()
        assert "rank 0: step 2" in message and "rank 1: no checkpoint" in message
        assert "shared" in message
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "rank0" / "checkpoints")] == [2]


def test_compile_without_a_cpp_compiler_fails_before_the_run_starts(tmp_path):
    """train.compile=true on a CPU without a C++ compiler: a ValueError naming the setting
    before the run folder is written, not torch's InductorError inside the first step."""
    import torch._inductor.config as inductor_config

    run_dir = tmp_path / "run"
    no_compiler = inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)})
    with no_compiler, pytest.raises(ValueError, match=r"train\.compile=true: .*C\+\+ compiler"):
        fit_batches_of_4(
            TinyClassifier(), logsumexp_step, SyntheticEEG(8), cpu(), run_dir,
            {"train.max_steps": 1, "train.compile": True},
        )  # fmt: skip
    assert not run_dir.exists()


def test_compiled_multitask_training_compiles_every_task_instead_of_falling_back(
    tmp_path, monkeypatch
):
    """Each task's head is a graph of its own: with 9 tasks dynamo's limit of 8 graphs sent the
    9th task's steps to eager mode (torch's log line its only trace). fit raises the limit to
    cover its batch groups, in training and in eval mode (validation at checkpoints), while it
    trains, and puts it back afterwards."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from eegfast.train.arch import MultiTaskClassifier
    from eegfast.train.config import RunConfig
    from eegfast.train.objectives import classification_step
    from tests.train.fakes import collate

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend=counting)
    )
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    tasks = tuple(f"t{i}" for i in range(9))
    data = SyntheticEEG(8 * len(tasks), channels=(4,), tasks=tasks)
    torch.manual_seed(0)
    model = MultiTaskClassifier(TinyClassifier(num_classes=0), {t: 2 for t in tasks}, 16)
    ctx = StepContext(torch.device("cpu"), task_ids={t: i for i, t in enumerate(tasks)})
    batch = collate([data[i] for i in range(4)])

    def eval_every_task(compiled) -> dict[str, float]:
        """As finetune's validation at checkpoints: each head in eval mode (graphs of their
        own: the training flag is guarded)."""
        with torch.no_grad():
            for task in tasks:
                compiled(batch["x"], batch["input_chans"], task=task)
        return {}

    config = RunConfig().with_overrides(
        {"train.batch_size": 4, "train.progress": False, "train.compile": True,
         "train.epochs": 1, "train.checkpoint_every": len(tasks)}
    )  # fmt: skip
    result = engine.fit(model, classification_step, data, config, tmp_path,
                 group_keys=data.group_keys(), collate_fn=collate, ctx=ctx,
                 eval_fn=eval_every_task)  # fmt: skip
    assert result.step == 2 * len(tasks)
    assert not counters["unimplemented"], "dynamo gave up compiling some steps"
    assert len(graphs) >= len(tasks)
    assert torch._dynamo.config.recompile_limit == limit


def test_recompile_allowance_covers_each_task_in_both_modes_after_fit(monkeypatch):
    """After fit the limit is torch's 8 again; a compiled 5-task model's predictions (eval
    mode: a graph per task beside the training ones) ran eager from the limit on. Inside
    recompile_allowance every task compiles."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from eegfast.train.arch import MultiTaskClassifier
    from tests.train.fakes import collate

    tasks = tuple(f"t{i}" for i in range(5))
    data = SyntheticEEG(4, channels=(4,), tasks=("t0",))
    batch = collate([data[i] for i in range(4)])

    def run_every_task(model) -> None:
        """Each task as training runs it, then as predictions do (eval mode, no grad)."""
        for training in (True, False):
            model.train(training)
            with torch.set_grad_enabled(training):
                for task in tasks:
                    model(batch["x"], batch["input_chans"], task=task)

    for allowed in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = MultiTaskClassifier(TinyClassifier(num_classes=0), {t: 2 for t in tasks}, 16)
        model.compile(backend=lambda gm, example_inputs: gm.forward)
        if allowed:
            with engine.recompile_allowance(len(tasks)):
                run_every_task(model)
        else:
            run_every_task(model)
        assert bool(counters["unimplemented"]) is not allowed
    torch._dynamo.reset()
