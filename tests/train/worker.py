"""Training runs used by the engine tests, callable in-process, from torch.multiprocessing.spawn
(distributed) or as ``python -m tests.train.worker`` (the SIGKILL test)."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import MultiTaskClassifier
from eegfast.train.config import RunConfig
from eegfast.train.distributed import init_distributed, shutdown
from eegfast.train.engine import FitResult, fit, seed_everything
from eegfast.train.objectives import StepContext, classification_step, masked_step
from tests.train.fakes import (
    SyntheticEEG,
    TinyClassifier,
    TinyPretrain,
    TinyTokenizer,
    collate,
)

BASE = {
    "train.epochs": 2,
    "train.batch_size": 6,
    "train.log_every": 1,
    "train.keep_last": 100,
    "train.progress": False,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 2,
}


def run(
    kind: str, run_dir: str, overrides: dict | None = None, resume: str | None = None
) -> FitResult:
    """kind: ``finetune`` (two tasks, two electrode sets) or ``pretrain`` (masked modelling)."""
    config = RunConfig().with_overrides({**BASE, **(overrides or {})})
    device = torch.device("cpu")
    info = init_distributed(device)
    seed_everything(config.train.seed)
    if kind == "finetune":
        data = SyntheticEEG(48, tasks=("a", "b"))
        model = MultiTaskClassifier(TinyClassifier(0), {"a": 2, "b": 2}, 16)
        step, ctx = classification_step, StepContext(device, task_ids={"a": 0, "b": 1})
    elif kind == "pretrain":
        data = SyntheticEEG(48)
        model = TinyPretrain()
        tokenizer = TinyTokenizer().eval()
        step = masked_step
        ctx = StepContext(device, seed=config.train.seed, tokenizer=tokenizer, mask_ratio=0.5)
    else:
        raise ValueError(kind)
    try:
        return fit(
            model,
            step,
            data,
            config,
            run_dir,
            group_keys=data.group_keys(),
            collate_fn=collate,
            ctx=ctx,
            dist_info=info,
            resume=resume,
            find_unused_parameters=kind == "finetune",  # as the commands: heads per task
        )
    finally:
        shutdown(info)


def set_rendezvous(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a worker: its rank among world_size on a local port."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )


def spawned(
    rank: int,
    world_size: int,
    port: int,
    kind: str,
    run_dir: str,
    overrides: dict,
    resume: str | None = None,
) -> None:
    set_rendezvous(rank, world_size, port)
    torch.set_num_threads(1)
    # Only shutdown()'s collection may free the DDP wrapper (which the cyclic collector frees
    # at moments of its own), so the check below holds or fails every time.
    gc.disable()
    try:
        run(kind, run_dir, overrides, resume)
        from torch.nn.parallel import DistributedDataParallel

        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        assert not alive, f"rank {rank}: {alive} DDP wrapper(s) outlived destroy_process_group"
    finally:
        gc.enable()


def hang_in_checkpoint_save(nth: int, run_dir: str) -> None:
    """Make the ``nth`` checkpoint state save of this process write a partial file, mark
    ``run_dir/HANGING`` and hang there (for a test to SIGKILL it mid-write)."""
    calls = {"n": 0}
    real_save = torch.save

    def save_then_hang(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            Path(path).write_bytes(b"partial")  # a half-written state file
            (Path(run_dir) / "HANGING").write_text(str(path))
            time.sleep(600)
        return real_save(obj, path, *a, **k)

    ckpt.torch.save = save_then_hang  # only this (child) process is affected


def kill_during_checkpoint_save(
    command: list[str], run_dir: Path, *, env: dict, cwd: Path, nth: int = 3
) -> None:
    """Start ``command`` (a training process writing to ``run_dir`` that takes
    ``--hang-at-save``) so that it hangs inside its ``nth`` checkpoint save (see
    :func:`hang_in_checkpoint_save`), then SIGKILL it there."""
    child = subprocess.Popen([*command, "--hang-at-save", str(nth)], env=env, cwd=cwd)
    marker = Path(run_dir) / "HANGING"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, f"the training process ended before checkpoint {nth}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", default=None)
    parser.add_argument(
        "--hang-at-save",
        type=int,
        default=0,
        help="stop inside the N-th checkpoint write (after its weights file)",
    )
    args = parser.parse_args()
    if args.hang_at_save:
        hang_in_checkpoint_save(args.hang_at_save, args.run_dir)
    result = run("finetune", args.run_dir, {"train.checkpoint_every": 2}, resume=args.resume)
    print(f"finished at step {result.step}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
