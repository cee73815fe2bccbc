"""The compiled training step of every command's model has no graph break: with activation
checkpointing, over batches whose electrode count and patch count change (as training on mixed
folders does), and with eager's losses. A graph break splits the step into graphs run with
Python between them, at every step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from eegfast.models import create_model
from eegfast.nn.vq import NormEMAVectorQuantizer
from eegfast.train import engine
from eegfast.train.arch import build_model
from eegfast.train.objectives import (
    StepContext,
    StepOutput,
    classification_step,
    masked_step,
    tokenizer_step,
)
from tests.train.fakes import SyntheticEEG, TinyClassifier
from tests.train.test_engine import fit_batches_of_4

# read with a default: torch 2.8's dynamo has no such setting (fit then leaves it unset)
CHECKPOINT_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"

# (B, C, A) of the 3 steps: the electrodes change, then the patches
SHAPES = [(2, 3, 2), (2, 4, 2), (2, 3, 3)]


def recording(graphs: list, traced_backward: bool = False):
    """A torch.compile backend recording each dynamo graph and running it as traced
    (``traced_backward``: through aot_eager, the backward traced too; slower)."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs) if traced_backward else gm.forward

    return backend


def breaks() -> dict:
    return {**counters["graph_break"], **counters["unimplemented"]}


def _batch(i: int, B: int, C: int, A: int, *, padded: bool) -> dict:
    g = torch.Generator().manual_seed(i)
    padding = torch.zeros(B, C, dtype=torch.bool)
    if padded:
        padding[1, -1] = True  # the last electrode of window 1
    return {
        "x": torch.randn(B, C, A, 200, generator=g),
        "input_chans": torch.arange(C + 1).expand(B, C + 1).clone(),
        "channel_padding_mask": padding,
        "index": torch.arange(B) + 10 * i,
        "label": torch.tensor([0, 1] * (B // 2)),
        "task": ["mi"] * B,
    }


def _tokenizer():
    """A tiny tokenizer whose codebook k-means has run (eagerly, as it does at the first
    training step even in a compiled model): frozen for targets, or trained on."""
    torch.manual_seed(1)
    tokenizer = create_model("vqnsp_tiny")
    tokenizer.train()
    batch = _batch(99, 2, 3, 2, padded=False)
    with torch.no_grad():
        tokenizer(batch["x"], batch["input_chans"])
    return tokenizer


def _command_case(command: str):
    """(model, step function, context, whether batches pad electrodes) as the command trains."""
    ctx = StepContext(torch.device("cpu"), seed=0)
    if command == "tokenizer":
        return _tokenizer(), tokenizer_step, ctx, True
    if command in ("pretrain", "hybrid"):
        from eegfast.train.hybrid import create_hybrid_pretrain_model, hybrid_step

        ctx.tokenizer = _tokenizer().eval().requires_grad_(False)
        torch.manual_seed(0)
        if command == "pretrain":
            return create_model("labram_tiny_pretrain", depth=1), masked_step, ctx, False
        return (
            create_hybrid_pretrain_model("labram_tiny_pretrain", depth=1),
            hybrid_step,
            ctx,
            False,
        )
    torch.manual_seed(0)
    arch = {"name": "labram_tiny", "kwargs": {"depth": 1, "num_classes": 0}, "heads": {"mi": 2}}
    ctx.task_ids = {"mi": 0}
    if command == "finetune_moe":  # an upcycled model, routed by task, with the aux losses
        arch["upcycle"] = {"num_experts": 4, "top_k": 2, "num_tasks": 1}
        ctx.route_by_task = True
        ctx.aux_weights = {"load_balance_loss": 0.01, "z_loss": 0.001}
    return build_model(arch), classification_step, ctx, True


def _steps(model, step, ctx, padded: bool) -> list[list[torch.Tensor]]:
    """The 3 steps' loss, metrics and gradients (no optimiser step: the weights stay)."""
    results = []
    for i, shape in enumerate(SHAPES):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + i)
        out = step(model, _batch(i, *shape, padded=padded), ctx)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        metrics = [torch.as_tensor(out.metrics[k]).float() for k in sorted(out.metrics)]
        results.append([out.loss.detach(), *metrics, *grads])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tokenizer", "pretrain", "hybrid", "finetune", "finetune_moe"])
def test_compiled_training_step_of_each_command_has_no_graph_break(command):
    """With activation checkpointing and the settings fit compiles under, over 3 batches of
    other electrode and patch counts: no graph break, a graph for the first shape and one
    each for C and A made dynamic, and eager's losses, metrics and gradients. The tokenizer's
    finite check (a host read of the codes) broke its graph at every step; the upcycled
    model's MoE layers broke it in every checkpointed block (they store their aux losses on
    the module, which dynamo's checkpoint operator refused)."""
    model, step, ctx, padded = _command_case(command)
    model.train()
    eager_model = copy.deepcopy(model)  # (the tokenizer's EMA codebook moves at each step)
    for each in (model, eager_model):
        engine.enable_activation_checkpointing(each)
    want = _steps(eager_model, step, ctx, padded)
    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    # the MoE's aux losses leave the checkpointed blocks as their outputs: their gradients
    # checked through the traced backward (the other models' steps through dynamo's graphs)
    model.compile(backend=recording(graphs, traced_backward=command == "finetune_moe"))
    try:
        with engine.recompile_allowance(1):
            got = _steps(model, step, ctx, padded)
    finally:
        torch._dynamo.reset()
    assert not breaks(), breaks()
    assert len(graphs) <= len(SHAPES), f"{len(graphs)} graphs for {len(SHAPES)} batch shapes"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert len(a) == len(b), f"step {i}: {len(a)} values compiled, {len(b)} eager"
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"{command} step {i}")


@pytest.mark.slow
def test_fit_compiles_an_upcycled_model_with_activation_checkpointing_without_graph_breaks(
    tmp_path, monkeypatch
):
    """train.compile with train.activation_checkpointing on an upcycled model: the MoE layers'
    write of their aux losses in each checkpointed block was a graph break at every step
    (dynamo's checkpoint operator refuses side effects unless told they need no replay in
    the backward); they now leave the checkpointed region as its outputs, and fit leaves
    that dynamo setting as it was."""
    graphs: list = []
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, **kw: compile_module(self, backend=recording(graphs)),
    )
    torch.manual_seed(0)
    arch = {"name": "labram_tiny", "kwargs": {"depth": 1, "num_classes": 0}, "heads": {"mi": 2},
            "upcycle": {"num_experts": 4, "top_k": 2}}  # fmt: skip
    ctx = StepContext(torch.device("cpu"), aux_weights={"load_balance_loss": 0.01, "z_loss": 0.001})
    before = getattr(torch._dynamo.config, CHECKPOINT_FLAG, None)
    torch._dynamo.reset()
    counters.clear()
    try:
        result = fit_batches_of_4(
            build_model(arch),
            classification_step,
            SyntheticEEG(8, channels=(4, 3)),  # a batch of 4 electrodes, one of 3
            ctx,
            tmp_path,
            {"train.max_steps": 2, "train.compile": True, "train.activation_checkpointing": True},
        )
    finally:
        torch._dynamo.reset()
    assert not breaks(), breaks()
    assert graphs, "nothing was compiled"
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert getattr(torch._dynamo.config, CHECKPOINT_FLAG, None) == before


def test_a_refused_resume_leaves_dynamos_settings_as_they_were(tmp_path):
    """fit with train.compile raised dynamo's recompile limit right after compiling: a
    resume refused after that (here a model of another width) left it changed for the rest
    of the process (and the checkpoint side-effect setting, which fit then also set)."""
    data, ctx = SyntheticEEG(8), StepContext(torch.device("cpu"))
    fit_batches_of_4(TinyClassifier(), logsumexp_step, data, ctx, tmp_path, {"train.max_steps": 1})
    config = torch._dynamo.config
    before = (config.recompile_limit, getattr(config, CHECKPOINT_FLAG, None))
    settings = {"train.max_steps": 2, "train.compile": True, "train.activation_checkpointing": True}
    with pytest.raises(ValueError, match="step-00000001"):
        narrower = TinyClassifier(dim=8)
        fit_batches_of_4(narrower, logsumexp_step, data, ctx, tmp_path, settings, resume="auto")
    assert (config.recompile_limit, getattr(config, CHECKPOINT_FLAG, None)) == before


def logsumexp_step(model, batch, ctx) -> StepOutput:
    return StepOutput(model(batch["x"]).logsumexp(-1).mean())


@pytest.mark.parametrize("training", [False, True])
def test_quantizer_checks_non_finite_inputs_inside_a_compiled_graph(training):
    """Compiled on CPU, the quantizer's finite check (a host read of the codes, a graph break
    at every step) runs in the graph: one graph, and a NaN input still raises, naming it."""
    torch.manual_seed(0)
    vq = NormEMAVectorQuantizer(16, 8, kmeans_init=False).train(training)
    torch._dynamo.reset()
    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)
    z = torch.randn(2, 5, 8)
    torch.testing.assert_close(compiled(z).indices, vq(z).indices)
    z[1, 2, 3] = math.nan
    with pytest.raises(RuntimeError, match="NaN or inf; the encoder output is not finite"):
        compiled(z)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_tokenizer_codes_check_non_finite_features_in_the_graph():
    """get_codebook_indices compiled on CPU: no graph break for its finite check, eager's
    codes (-1 on padded electrodes), and a NaN window still raises."""
    tokenizer = _tokenizer().eval()
    batch = _batch(0, 2, 3, 2, padded=True)
    args = (batch["x"], batch["input_chans"])
    padding = batch["channel_padding_mask"]
    want = tokenizer.get_codebook_indices(*args, channel_padding_mask=padding)
    torch._dynamo.reset()
    compiled = torch.compile(tokenizer.get_codebook_indices, backend="aot_eager", fullgraph=True)
    try:
        torch.testing.assert_close(compiled(*args, channel_padding_mask=padding), want)
        assert (want[1].view(3, 2)[-1] == -1).all()
        x = batch["x"].clone()
        x[0, 0, 0, 5] = math.nan
        with pytest.raises(RuntimeError, match="non-finite encoder features"):
            compiled(x, batch["input_chans"], channel_padding_mask=padding)
    finally:
        torch._dynamo.reset()


def test_tokenizer_checkpointing_keeps_a_copy_of_the_model_its_own():
    """train.activation_checkpointing on the tokenizer: without set_grad_checkpointing the
    engine replaced each block's forward by a closure over that block, so a deep copy (an EMA
    model, AveragedModel) ran the original's blocks: its own block weights got no gradient
    and did not shape its output. Now it recomputes its own blocks, as the LaBraM models."""
    torch.manual_seed(0)
    tokenizer = create_model("vqnsp_tiny", kmeans_init=False).train()
    engine.enable_activation_checkpointing(tokenizer)
    copied = copy.deepcopy(tokenizer)
    with torch.no_grad():  # the copy's blocks are its own: changing them changes its loss
        for p in copied.encoder.blocks.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = _batch(0, 2, 3, 2, padded=False)
    loss = copied(batch["x"], batch["input_chans"]).loss
    loss.backward()
    assert all(p.grad is not None for p in copied.encoder.blocks.parameters())
    assert all(p.grad is None for p in tokenizer.parameters())
    tokenizer.eval(), copied.eval()
    with torch.no_grad():
        assert not torch.equal(
            tokenizer(batch["x"], batch["input_chans"]).loss,
            copied(batch["x"], batch["input_chans"]).loss,
        )
