"""Two gloo processes train the REAL tiny models to the single-process result, and the
``train.compile`` / ``train.deterministic`` flags take effect.

The runs are built the way the commands build them: ``eegfast pretrain`` (``build_model`` of
``labram_tiny_pretrain`` with the tokenizer's vocabulary, unused heads frozen, the ``masked``
objective against a frozen ``vqnsp_tiny``; with ``--objective hybrid`` the hybrid model and its
masked + forecasting loss), ``eegfast finetune`` (``labram_tiny`` with one head per task,
optionally upcycled to MoE with task routing, ``classification_step``) and ``eegfast
tokenizer`` (``vqnsp_tiny`` with the ``vq`` section's quantizer settings, ``tokenizer_step``: its
k-means codebook init, EMA updates and dead-code restarts span the ranks), on tiny synthetic EEG
through the commands' collate function.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model
from eegfast.train.commands.common import start
from eegfast.train.commands.pretrain import freeze_unused_heads
from eegfast.train.commands.tokenizer import DEFAULTS as TOKENIZER_DEFAULTS
from eegfast.train.commands.tokenizer import quantizer_kwargs
from eegfast.train.config import RunConfig
from eegfast.train.data import collate_fn
from eegfast.train.distributed import init_distributed, shutdown
from eegfast.train.engine import FitResult, fit, seed_everything
from eegfast.train.objectives import (
    StepContext,
    classification_step,
    get_objective,
    tokenizer_step,
)
from eegfast.train.runlog import read_metrics
from tests._gloo import free_port
from tests.train.fakes import SyntheticEEG
from tests.train.worker import (
    hang_in_checkpoint_save,
    kill_during_checkpoint_save,
    set_rendezvous,
)

BASE = {
    "train.epochs": 1,
    "train.batch_size": 6,
    "train.log_every": 1,
    "train.keep_last": 100,
    "train.progress": False,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 2,
}
TASKS = ("a", "b")
UPCYCLE = {"num_experts": 4, "top_k": 2, "num_tasks": len(TASKS)}
# The tokenizer's run on top of the command's defaults (its AdamW recipe) and BASE. beta 1 (the
# reference's; vqnsp_tiny has 0) puts the commitment loss into the gradients too. A code whose EMA
# count falls below 0.995 is re-seeded: after the k-means init (every count 1) any code left
# unused by a step (0.99 after decay 0.99) is, so every step restarts codes (of 256, a batch's
# 36-48 rows use at most 48), drawn among both ranks' rows.
TOKENIZER = {"vq.beta": 1.0, "vq.dead_code_threshold": 0.995}
# `eegfast pretrain --objective hybrid`: the masked loss on the masked objective's per-window
# masks (drawn from (seed, epoch, dataset index)) plus the block-causal forecasting loss (every
# patch predicts the next one's code and samples: nothing drawn). mask_weight 0.3, not the
# default 0.5, so that a part weighted wrongly would show in the loss.
HYBRID = {"pretrain.objective": "hybrid", "pretrain.hybrid_mask_weight": 0.3}


def make_tokenizer() -> torch.nn.Module:
    """A frozen vqnsp_tiny with fixed random weights (the same in every process)."""
    from eegfast.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(1234)
        tokenizer = create_model("vqnsp_tiny")
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


def run(
    kind: str, run_dir: str, overrides: dict | None = None, resume: str | None = None
) -> FitResult:
    """kind: ``pretrain`` (masked), ``hybrid`` (masked + forecasting), ``finetune`` (2 task
    heads), ``moe`` (upcycled, routed) or ``tokenizer`` (VQ-NSP)."""
    if kind == "tokenizer":
        config = TOKENIZER_DEFAULTS.with_overrides({**BASE, **TOKENIZER, **(overrides or {})})
    elif kind == "hybrid":
        config = RunConfig().with_overrides({**BASE, **HYBRID, **(overrides or {})})
    else:
        config = RunConfig().with_overrides({**BASE, **(overrides or {})})
    device = torch.device("cpu")
    info = init_distributed(device)
    seed_everything(config.train.seed)
    if kind in ("pretrain", "hybrid"):
        data = SyntheticEEG(24)
        tokenizer = make_tokenizer()
        kwargs: dict = {
            "mask_ratio": config.pretrain.mask_ratio,
            "drop_path_rate": config.model.drop_path,
            "vocab_size": int(tokenizer.config.num_codes),
        }
        if kind == "hybrid":
            kwargs["hybrid"] = {"mask_weight": config.pretrain.hybrid_mask_weight}
        model = build_model({"kind": kind, "name": "labram_tiny_pretrain", "kwargs": kwargs})
        freeze_unused_heads(model)
        step = get_objective(config.pretrain.objective)
        ctx = StepContext(
            device,
            seed=config.train.seed,
            tokenizer=tokenizer,
            mask_ratio=config.pretrain.mask_ratio,
        )
        # as `eegfast pretrain`: the unused-parameter search for any objective but masked
        find_unused = kind != "pretrain"
    elif kind in ("finetune", "moe"):
        data = SyntheticEEG(48, tasks=TASKS)
        arch = {"kind": "classifier", "name": "labram_tiny", "kwargs": {"num_classes": 0}}
        if kind == "moe":
            arch["upcycle"] = UPCYCLE
        model = build_model({**arch, "heads": {t: 2 for t in TASKS}})
        step = classification_step
        ctx = StepContext(
            device,
            seed=config.train.seed,
            task_ids={t: i for i, t in enumerate(TASKS)},
            route_by_task=kind == "moe",
            # as `eegfast finetune`'s defaults: both are of every rank's tokens together
            aux_weights={"load_balance_loss": 1e-2, "z_loss": 1e-3} if kind == "moe" else {},
        )
        find_unused = True  # as `eegfast finetune`: heads per task
    elif kind == "tokenizer":
        data = SyntheticEEG(24)
        arch = {"kind": "tokenizer", "name": "vqnsp_tiny", "kwargs": quantizer_kwargs(config)}
        model = build_model(arch)
        step = tokenizer_step
        ctx = StepContext(device, seed=config.train.seed)
        find_unused = False  # as `eegfast tokenizer`
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
            collate_fn=collate_fn(),
            ctx=ctx,
            dist_info=info,
            resume=resume,
            find_unused_parameters=find_unused,
        )
    finally:
        shutdown(info)


def job_port(rank: int, port_file: Path, timeout_s: float = 300.0) -> int:
    """The rendezvous port of one job: rank 0 picks a free one as the job starts and writes it
    to ``port_file`` (atomically); the other ranks wait for it. Picked then, a port is unbound
    for milliseconds before rank 0's store takes it; picked for every job before the spawn, the
    last jobs' ports had sat unbound for minutes, for another process to take."""
    if rank == 0:
        port = free_port()
        partial = port_file.with_suffix(".partial")
        partial.write_text(str(port))
        os.replace(partial, port_file)
        return port
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: no port from rank 0 in {port_file} after {timeout_s} s"
            )
        time.sleep(0.05)
    return int(port_file.read_text())


def spawned(rank: int, world_size: int, jobs: list[tuple[str, str, str, dict]]) -> None:
    """Every job in turn, each with its own process group (one spawn: imports paid once)."""
    # A worker that dies of a signal prints every thread's Python stack to stderr first.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    for kind, run_dir, port_file, overrides in jobs:
        set_rendezvous(rank, world_size, job_port(rank, Path(port_file)))
        run(kind, run_dir, overrides)
    # Every job done (a failure raised above, and the parent compares the checkpoints they
    # wrote): leave without the interpreter's teardown. In about one fresh-clone `make test` in
    # ten a worker died there, after its four gloo process groups had been created and
    # destroyed in turn: SIGABRT from glibc's heap checks ("malloc(): unaligned tcache chunk
    # detected"), and once faulthandler was on, "terminate called without an active exception"
    # with no Python frame on any thread (a joinable std::thread destroyed at exit; eegfast's
    # C++ starts no threads, and its kernels are clean under `make asan`).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir / "checkpoints").path / ckpt.WEIGHTS))


def assert_close_weights(a: dict, b: dict, atol: float, skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith(skip):
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=atol, msg=key)


# In the tiny models each GroupNorm group of the patch embedding holds ONE channel, so the bias of
# the conv before it cancels out: its gradient is 0 up to rounding, and AdamW turns that rounding
# noise (which differs between 1 and 2 processes) into lr-sized steps. Those biases are inert
# (test_inert_patch_embedding_biases) and are left out of the weight comparison.
INERT = tuple(f"patch_embed.conv{i}.bias" for i in (1, 2, 3))


def max_change(start: dict, end: dict) -> float:
    return max(float((end[k] - start[k]).abs().max()) for k in start)


# ("pretrain", "fsdp"): the pretraining model's blocks sit one level down (student.blocks),
# each its own FSDP2 unit (distributed.transformer_blocks); so do the tokenizer's
# (encoder.blocks, decoder.blocks), whose codebook and EMA state are buffers FSDP leaves whole.
# ("hybrid", "fsdp"): the hybrid model runs each of student.blocks twice a step (the masked pass,
# then the block-causal forecasting pass calling the blocks itself), each call gathering it.
CASES = [
    ("pretrain", "ddp"),
    ("finetune", "ddp"),
    ("moe", "ddp"),
    ("finetune", "fsdp"),
    ("pretrain", "fsdp"),
    ("tokenizer", "ddp"),
    ("tokenizer", "fsdp"),
    ("hybrid", "ddp"),
    ("hybrid", "fsdp"),
]

# The tokenizer's codebook and EMA state, compared with the weights (they are in the checkpoint's
# weights file): written by the k-means init and every EMA step and restart, not by the optimiser.
QUANTIZER_STATE = (
    "quantize.embedding.weight",
    "quantize.embedding.embed_avg",
    "quantize.embedding.cluster_size",
    "quantize.embedding.initted",
    "quantize.cluster_size",
)


def check_codebook_trained(first: dict, end: dict) -> None:
    """The tokenizer run did what its comparison is meant to cover: a k-means init, EMA steps
    between the first checkpoint (step 2) and the last (step 4), and dead-code restarts at the
    last step (TOKENIZER's threshold: every code its batch of at most 48 rows left unused is
    re-seeded with its count reset to 1; without a restart it would be 0.99 x its count)."""
    assert set(QUANTIZER_STATE) <= end.keys(), sorted(k for k in end if "quantize" in k)
    assert float(end["quantize.embedding.initted"]) == 1.0
    for key in (
        "quantize.embedding.weight",
        "quantize.embedding.embed_avg",
        "quantize.cluster_size",
    ):
        assert float((end[key] - first[key]).abs().max()) > 1e-3, key
    num_codes = end["quantize.cluster_size"].shape[0]
    assert int((end["quantize.cluster_size"] == 1.0).sum()) >= num_codes - 48
    torch.testing.assert_close(
        end["quantize.embedding.cluster_size"], end["quantize.cluster_size"], atol=0, rtol=0
    )


def overrides_for(strategy: str) -> dict:
    return {"train.strategy": strategy, "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> dict[tuple[str, str], tuple[FitResult, Path, Path]]:
    """Each case run in this process, and all cases run by one pair of gloo processes."""
    root = tmp_path_factory.mktemp("two_process")
    results = {}
    for kind, strategy in CASES:
        single, double = root / f"{kind}-{strategy}-1", root / f"{kind}-{strategy}-2"
        one = run(kind, str(single), overrides_for(strategy))
        results[kind, strategy] = (one, single, double)
    ports = root / "ports"  # each job's rendezvous port, picked by rank 0 as the job starts
    ports.mkdir()
    jobs = [
        (
            kind,
            str(results[kind, strategy][2]),
            str(ports / f"{kind}-{strategy}"),
            overrides_for(strategy),
        )
        for kind, strategy in CASES
    ]
    mp.spawn(spawned, args=(2, jobs), nprocs=2, join=True)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("kind, strategy", CASES)
def test_two_gloo_processes_train_the_real_models_like_one(two_process_runs, kind, strategy):
    """2 processes (each half of every batch) reach the 1-process weights and losses."""
    one, single, double = two_process_runs[kind, strategy]
    assert one.step == (4 if kind in ("pretrain", "tokenizer", "hybrid") else 8)
    first = load_file(str(ckpt.list_checkpoints(single / "checkpoints")[0].path / ckpt.WEIGHTS))
    a, b = final_weights(single), final_weights(double)
    trained = {k: v for k, v in first.items() if not k.startswith("quantize.")}
    assert max_change(trained, a) > 1e-4  # training moves the weights: the comparison means much
    if kind == "tokenizer":
        check_codebook_trained(first, a)
    # Codebook and EMA state included (every key of the weights file). Measured, 1 against 2
    # processes: weights within 3e-7 (but INERT), the tokenizer's codebook and EMA sums within
    # 8e-7 (DDP and FSDP), losses within 3e-7. A k-means init, an EMA sum or a restart draw on
    # one rank's rows only (each tried in turn) moved codes by 1.0-1.2 and codes' counts by 0.05.
    assert_close_weights(a, b, atol=1e-4, skip=INERT)
    if kind == "moe":
        assert any(".mlp.router" in k or ".mlp.gate" in k for k in a), sorted(a)[:20]
    two = read_metrics(double / "metrics.csv")["train/loss"]
    assert [s for s, _ in two] == list(range(1, one.step + 1))
    torch.testing.assert_close(
        torch.tensor([v for _, v in two]), torch.tensor(one.losses), atol=1e-4, rtol=1e-4
    )
    if kind == "tokenizer":
        # Every logged scalar too: the codebook's perplexity and usage, and the encoder's
        # feature_spread and feature_dims that the collapse warnings read (these were each
        # rank's own rows', then averaged over the ranks: 0.92 and 8.2 here against one
        # process's 0.96 and 9.3 at step 1).
        assert_same_logged_scalars(single, double, skip=("train/samples_per_s",))
    if kind == "hybrid":
        # Both parts ran and trained: the forecasting head moved, and each part is logged (all
        # of them compared, the masked accuracy over each rank's masked patches included).
        # Measured, 1 against 2 processes (DDP and FSDP): weights within 1.3e-6, every logged
        # scalar within 1e-6. Masks drawn by a window's place in its rank's batch instead of its
        # dataset index moved the weights by 5.7e-3 and train/loss by 1.2e-3.
        assert max_change({k: v for k, v in first.items() if k.startswith("forecast_head.")}, a)
        logged = read_metrics(single / "metrics.csv")
        assert {f"train/{name}" for name in HYBRID_METRICS} <= logged.keys(), sorted(logged)
        assert_same_logged_scalars(single, double, skip=("train/samples_per_s",))


# What hybrid_step logs besides the loss (HybridOutput.scalar_tensors).
HYBRID_METRICS = (
    "masked_loss",
    "masked_accuracy",
    "ar_loss",
    "ar_token_loss",
    "ar_signal_loss",
    "ar_token_accuracy",
)


def assert_same_logged_scalars(single: Path, double: Path, skip: tuple[str, ...]) -> None:
    a, b = read_metrics(single / "metrics.csv"), read_metrics(double / "metrics.csv")
    names = sorted(k for k in a if k.startswith("train/") and k not in skip)
    assert names == sorted(k for k in b if k.startswith("train/") and k not in skip)
    for name in names:
        assert [s for s, _ in a[name]] == [s for s, _ in b[name]], name
        torch.testing.assert_close(
            torch.tensor([v for _, v in b[name]]),
            torch.tensor([v for _, v in a[name]]),
            atol=1e-4,
            rtol=1e-4,
            msg=name,
        )


def test_inert_patch_embedding_biases():
    """Why INERT may be skipped: shifting those biases leaves the tiny model's output as is."""
    from eegfast.models import create_model

    torch.manual_seed(0)
    model = create_model("labram_tiny").eval()
    x = torch.randn(2, 3, 2, 200)
    chans = torch.arange(4).expand(2, 4)
    before = model(x, chans)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(INERT):
                param.add_(torch.randn_like(param))
    torch.testing.assert_close(model(x, chans), before, atol=1e-5, rtol=1e-5)
    assert len([n for n, _ in model.named_parameters() if n.endswith(INERT)]) == 3


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_flag_enables_deterministic_algorithms_and_repeats_exactly(
    tmp_path, restore_determinism
):
    config = RunConfig().with_overrides({**BASE, "train.deterministic": True})
    torch.use_deterministic_algorithms(False)
    start(config)  # what every command calls first
    assert torch.are_deterministic_algorithms_enabled()
    overrides = {"train.deterministic": True, "train.max_steps": 2}
    first = run("moe", str(tmp_path / "first"), overrides)
    second = run("moe", str(tmp_path / "second"), overrides)
    assert torch.are_deterministic_algorithms_enabled()
    assert first.losses == second.losses
    assert_close_weights(final_weights(tmp_path / "first"), final_weights(tmp_path / "second"), 0)
    torch.use_deterministic_algorithms(False)
    run("moe", str(tmp_path / "third"), {**overrides, "train.max_steps": 1})
    assert torch.are_deterministic_algorithms_enabled(), "fit() alone must honour the flag"
    torch.use_deterministic_algorithms(False)
    start(RunConfig().with_overrides(BASE))
    assert not torch.are_deterministic_algorithms_enabled()


def test_compile_flag_compiles_the_model_and_trains_to_the_eager_result(tmp_path, monkeypatch):
    """train.compile=True goes through torch.compile (here with the cheap aot_eager backend
    instead of inductor) and the compiled graphs really run."""
    import torch._dynamo

    calls = []
    real_compile = torch.compile

    def compile_with_aot_eager(model=None, **kwargs):
        calls.append(kwargs)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    overrides = {"train.max_steps": 1}
    eager = run("finetune", str(tmp_path / "eager"), overrides)
    assert not calls
    compiled = run("finetune", str(tmp_path / "compiled"), {**overrides, "train.compile": True})
    frames = sum(torch._dynamo.utils.counters["frames"].values())
    torch._dynamo.reset()
    assert calls, "train.compile=True did not call torch.compile"
    assert frames > 0, "torch.compile was called but no frame was compiled"
    torch.testing.assert_close(
        torch.tensor(compiled.losses), torch.tensor(eager.losses), atol=1e-5, rtol=1e-5
    )
    # The temporal convolutions' biases feed GroupNorms of one channel per group (labram_tiny):
    # their gradients are rounding noise (~1e-8, 0 in exact arithmetic), and AdamW's first
    # step moves each by +-lr by the noise's sign, which the compiled graph's other (equally
    # exact) order of sums may flip.
    assert_close_weights(
        final_weights(tmp_path / "eager"),
        final_weights(tmp_path / "compiled"),
        1e-5,
        skip=(".conv1.bias", ".conv2.bias", ".conv3.bias"),
    )


REPO = Path(__file__).resolve().parents[2]
SIGKILL_RUN = {"train.checkpoint_every": 2}  # checkpoints at steps 2, 4, 6, 8


@pytest.mark.slow
def test_sigkill_during_a_real_model_checkpoint_keeps_the_previous_and_resumes_exactly(tmp_path):
    """labram_tiny with task heads: killed inside its 3rd checkpoint write (step 6), the step-4
    checkpoint loads and ``--resume auto`` ends on the uninterrupted run's weights."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.train.test_distributed_real"]
    subprocess.run([*command, str(reference)], env=env, cwd=REPO, timeout=120, check=True)
    kill_during_checkpoint_save([*command, str(killed)], killed, env=env, cwd=REPO)
    assert list((killed / "checkpoints").glob(".tmp-step-00000006-*"))
    assert [c.step for c in ckpt.list_checkpoints(killed / "checkpoints")] == [2, 4]
    assert ckpt.load_training_state(killed / "checkpoints" / "step-00000004")["step"] == 4
    assert ckpt.load_weights(killed / "checkpoints" / "step-00000004").keys() == (
        final_weights(reference).keys()
    )
    resumed = subprocess.run(
        [*command, str(killed), "--resume", "auto"], env=env, cwd=REPO, timeout=120
    )
    assert resumed.returncode == 0
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    assert [c.step for c in ckpt.list_checkpoints(killed / "checkpoints")] == [2, 4, 6, 8]
    assert_close_weights(final_weights(reference), final_weights(killed), atol=0.0)


def main() -> int:
    """``python -m tests.train.test_distributed_real RUN_DIR``: the SIGKILL test's training."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--hang-at-save", type=int, default=0, help="hang in the N-th state save")
    args = parser.parse_args()
    if args.hang_at_save:
        hang_in_checkpoint_save(args.hang_at_save, args.run_dir)
    run("finetune", args.run_dir, SIGKILL_RUN, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
