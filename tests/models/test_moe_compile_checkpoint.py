"""Activation-checkpointed upcycled (MoE) LaBraM models under torch.compile without any dynamo
setting: the MoE layers' aux losses leave each checkpointed block as its outputs and are
stored on the layer (``MoEFFN.last_aux``) outside the checkpointed region, which dynamo's
checkpoint operator refused to trace a write in (a graph break in every block at every step,
unless ``skip_fwd_side_effects_in_bwd_under_checkpoint`` was set, as only ``fit`` did)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from eegfast.models import create_model, upcycle
from eegfast.nn import Block, MoEAux, MoEFFN, moe_aux_losses

FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def _upcycled(*, checkpointing: bool, drop_path: float = 0.0, tasks: int = 0):
    """labram_tiny (2 blocks, 3 classes) upcycled with distinct experts and a decisive router
    (the outputs depend on the routing), in training mode."""
    torch.manual_seed(0)
    model = create_model("labram_tiny", depth=2, num_classes=3, drop_path_rate=drop_path)
    upcycle(
        model,
        num_experts=4,
        top_k=2,
        noise_std=0.3,
        num_tasks=tasks,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.weight.normal_(0, 1.0)
            if tasks:
                block.mlp.task_bias.normal_(0, 1.0)
    model.set_grad_checkpointing(checkpointing)
    return model.train()


def _inputs():
    """x (3, 4, 2, 200), input_chans (5,) and a padded electrode in two samples."""
    g = torch.Generator().manual_seed(2)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    padding[1, -1] = padding[2, 0] = True
    return torch.randn(3, 4, 2, 200, generator=g), torch.arange(5), padding


def _step(model, forward=None, **kwargs) -> list[torch.Tensor]:
    """A training step's logits, every MoE layer's aux values and every gradient."""
    x, chans, padding = _inputs()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # (drop path)
    out = (model if forward is None else forward)(x, chans, channel_padding_mask=padding, **kwargs)
    reports = [m.last_aux for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(reports) == 2 and all(r is not None for r in reports)
    aux = [value.detach().clone() for r in reports for value in r.as_dict().values()]
    losses = moe_aux_losses(model)
    loss = out.square().sum() + 0.01 * losses["load_balance_loss"] + 0.001 * losses["z_loss"]
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads[:-2]), "a parameter got no gradient"
    return [out.detach(), loss.detach(), *aux, *[g for g in grads if g is not None]]


@pytest.mark.slow
def test_checkpointed_upcycled_model_compiles_without_graph_breaks_without_the_flag():
    """Forward and backward of a compiled, checkpointed, task-routed upcycled model over a
    padded batch with drop path: no graph break with dynamo's checkpoint side-effect setting
    off (one per block before), and eager's outputs, aux losses and gradients."""
    tasks = torch.tensor([0, 1, 1])
    want = _step(_upcycled(checkpointing=True, drop_path=0.3, tasks=2), task_id=tasks)
    model = _upcycled(checkpointing=True, drop_path=0.3, tasks=2)
    got = _compiled_without_the_flag(lambda compile: _step(model, compile(model), task_id=tasks))
    _assert_all_close(got, want)


def _compiled_without_the_flag(run):
    """``run(compile)`` (``compile(fn)``: ``fn`` compiled, traced through AOT autograd) with
    dynamo's checkpoint side-effect setting off; asserts one graph and no graph break."""
    if not hasattr(torch._dynamo.config, FLAG):  # torch 2.8: no such setting, off as here
        return _compiled_in(contextlib.nullcontext(), run)
    return _compiled_in(torch._dynamo.config.patch({FLAG: False}), run)


def _compiled_in(settings, run):
    """``run(compile)`` inside the context manager ``settings``, asserting one graph and no
    graph break."""
    graphs: list = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        # traced through AOT autograd, whose checkpoint recomputation replays the drop-path
        # draws as eager's does (the dynamo graph run as is draws new ones in the backward)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    try:
        with settings:
            got = run(lambda fn: torch.compile(fn, backend=backend))
        breaks = {**counters["graph_break"], **counters["unimplemented"]}
    finally:
        torch._dynamo.reset()
    assert not breaks, breaks
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    return got


def _assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"value {i}")


def test_checkpointed_eager_step_is_bitwise_the_unchecked_one():
    """Eager, checkpointing changes nothing: outputs, aux losses and statistics, gradients
    (drop path, padding and task routing included); in eval mode (no checkpointing) the
    layers report."""
    tasks = torch.tensor([1, 0, 1])
    checkpointed = _upcycled(checkpointing=True, drop_path=0.3, tasks=2)
    plain = _upcycled(checkpointing=False, drop_path=0.3, tasks=2)
    got, want = _step(checkpointed, task_id=tasks), _step(plain, task_id=tasks)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"value {i} differs"
    x, chans, padding = _inputs()
    checkpointed.eval()
    with torch.no_grad():
        checkpointed(x, chans, channel_padding_mask=padding, task_id=tasks)
    real = 3 * (1 + 4 * 2) - 2 * 2  # cls and patch tokens, less 2 padded electrodes' patches
    assert all(int(block.mlp.last_aux.tokens) == real for block in checkpointed.blocks)


def test_hooked_moe_layers_and_blocks_still_report_when_checkpointed():
    """A forward hook on an MoE layer or on a block sees a tensor output (the aux stays the
    layer's own write there), and every layer reports; a dense block's ``return_aux`` is None."""
    model = _upcycled(checkpointing=True)
    seen: list = []
    model.blocks[0].mlp.register_forward_hook(lambda m, a, out: seen.append(type(out)))
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.append(type(out)))
    _step(model)
    assert seen and all(kind is torch.Tensor for kind in seen), seen
    torch.manual_seed(0)
    dense = Block(16, 2)
    x = torch.randn(2, 5, 16)
    y, aux = dense(x, return_aux=True)
    assert aux is None and torch.equal(y, dense(x))


@pytest.mark.slow
def test_checkpointed_moe_hybrid_forecast_pass_compiles_without_graph_breaks():
    """The hybrid's block-causal pass (``forecast_features``) goes through the trunk's own
    block loop: with MoE layers and checkpointing it compiles into one graph without the
    dynamo setting (its own ``checkpoint(block, ...)`` loop broke once), and gives eager's
    features, aux values and gradients."""
    from eegfast.models.hybrid import create_hybrid_model, forecast_features

    def build():
        torch.manual_seed(0)
        model = create_hybrid_model("labram_tiny_pretrain")
        upcycle(
            model.student,
            num_experts=4,
            top_k=2,
            noise_std=0.3,
            generator=torch.Generator().manual_seed(1),
        )
        model.set_grad_checkpointing(True)
        return model.train()

    x = torch.randn(2, 3, 4, 200, generator=torch.Generator().manual_seed(3))
    chans = torch.tensor([0, 1, 20, 42])

    def run(model, fn):
        model.zero_grad(set_to_none=True)
        h = fn(model.student, x, chans)
        aux = moe_aux_losses(model.student)
        (h.square().sum() + aux["load_balance_loss"]).backward()
        grads = [p.grad for p in model.student.parameters() if p.grad is not None]
        return [h.detach(), *[v.detach() for v in aux.values()], *grads]

    want = run(build(), forecast_features)
    model = build()
    _assert_all_close(
        _compiled_without_the_flag(lambda compile: run(model, compile(forecast_features))), want
    )


@pytest.mark.slow
def test_fit_compiles_hooked_checkpointed_moe_blocks_without_graph_breaks():
    """Blocks with hooks (FSDP2's fully_shard gives each block some) keep their plain output:
    their MoE layers store the aux values inside the checkpointed region. fit's compiled
    training settings trace that write (dynamo's side-effect setting): one graph, no break
    (a break in every block when fit set only the recompile limit)."""
    from eegfast.train import engine

    if not hasattr(torch._dynamo.config, FLAG):
        pytest.skip(f"this torch's dynamo has no {FLAG} (torch 2.8: a graph break per block)")
    model = _upcycled(checkpointing=True)
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: None)
    assert getattr(torch._dynamo.config, FLAG) is False  # (torch's default, as fit finds it)
    settings = contextlib.ExitStack()
    settings.callback(engine._compiled_training_settings(1, checkpointing=True))
    _compiled_in(settings, lambda compile: _step(model, compile(model)))


class _CustomMoEBlocks(torch.nn.Module):
    """A model of eegfast Blocks with task-routed MoE FFNs and no ``set_grad_checkpointing``
    of its own (the engine's generic checkpointing wraps each block's forward):
    (B, N, 8) -> (B, 3)."""

    def __init__(self, *, drop_path: float = 0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(Block(16, 2, drop_path=drop_path) for _ in range(2))
        for block in self.blocks:
            block.mlp = MoEFFN.from_dense(
                block.mlp.fc1, block.mlp.fc2, 4, 2, noise_std=0.3, num_tasks=2, generator=g
            )
            with torch.no_grad():  # a decisive router: the outputs depend on the routing
                block.mlp.router.weight.normal_(0, 1.0, generator=g)
                block.mlp.task_bias.normal_(0, 1.0, generator=g)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x, padding_mask=None, task_id=None) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, key_padding_mask=padding_mask, task_id=task_id)
        return self.head(h.mean(1))


def _custom(*, checkpointing: bool) -> _CustomMoEBlocks:
    from eegfast.train.engine import enable_activation_checkpointing

    torch.manual_seed(0)
    model = _CustomMoEBlocks().train()
    if checkpointing:
        assert enable_activation_checkpointing(model) == 2
    return model


def _custom_step(model, forward=None) -> list[torch.Tensor]:
    """A training step of :class:`_CustomMoEBlocks` over a padded, task-routed batch: its
    logits, every MoE layer's aux values and every gradient."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 8, generator=g)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, -1] = padding[2, :2] = True
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # (drop path)
    out = (model if forward is None else forward)(x, padding, torch.tensor([0, 1, 1]))
    reports = [block.mlp.last_aux for block in model.blocks]
    assert all(r is not None for r in reports)
    aux = [value.detach().clone() for r in reports for value in r.as_dict().values()]
    losses = moe_aux_losses(model)
    loss = out.square().sum() + 0.01 * losses["load_balance_loss"] + 0.001 * losses["z_loss"]
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "a parameter got no gradient"
    return [out.detach(), loss.detach(), *aux, *grads]


@pytest.mark.slow
def test_generically_checkpointed_moe_blocks_compile_without_graph_breaks_without_the_flag():
    """A custom model of eegfast MoE Blocks checkpointed by the engine's generic checkpointing
    (``enable_activation_checkpointing``: no ``set_grad_checkpointing`` of its own) compiles
    into one graph without dynamo's side-effect setting: its MoE layers wrote ``last_aux``
    inside each checkpointed block, a graph break per block at every step, outside fit (which
    sets the flag). Eager's outputs, aux values and gradients."""
    want = _custom_step(_custom(checkpointing=True))
    model = _custom(checkpointing=True)
    got = _compiled_without_the_flag(lambda compile: _custom_step(model, compile(model)))
    _assert_all_close(got, want)


def test_generically_checkpointed_moe_blocks_eager_step_is_bitwise_the_unchecked_one():
    """Eager, the generic checkpointing changes nothing: outputs, aux values, gradients; the
    blocks are still recomputed in the backward; a caller's own ``return_aux=True`` gets
    ``(x, aux)`` and the layer stores nothing, as without checkpointing; a hooked MoE layer
    sees its tensor output and reports (its own write)."""
    checkpointed, plain = _custom(checkpointing=True), _custom(checkpointing=False)
    got, want = _custom_step(checkpointed), _custom_step(plain)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"value {i} differs"

    runs = [0, 0]
    for i, block in enumerate(checkpointed.blocks):
        block.attn.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    _custom_step(checkpointed)
    assert runs == [2, 2]  # recomputed in the backward

    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3))
    for model in (checkpointed, plain):
        block = model.blocks[0]
        block.mlp.last_aux = None
        torch.manual_seed(7)
        y, aux = block(x, task_id=1, return_aux=True)
        assert block.mlp.last_aux is None and isinstance(aux, MoEAux)
        if model is checkpointed:
            y_ckpt, aux_ckpt = y, aux
    assert torch.equal(y_ckpt, y)
    assert all(torch.equal(aux_ckpt[k], v) for k, v in aux.as_dict().items())

    seen: list = []
    checkpointed.blocks[1].mlp.register_forward_hook(lambda m, a, out: seen.append(type(out)))
    checkpointed.blocks[1].mlp.last_aux = None
    checkpointed.blocks[0].register_forward_hook(lambda m, a, out: seen.append(type(out)))
    _custom_step(checkpointed)
    # layer 1's forward and recomputation; block 0's hook, outside the region, once
    assert seen == [torch.Tensor] * 3, seen


def test_generically_checkpointed_moe_block_takes_an_explicit_return_aux_false():
    """``block(x, return_aux=False)`` (the default, spelled out) on a block the generic
    checkpointing wraps returns the tensor and stores the aux values, as unchecked: the
    region passed ``return_aux=True`` beside the caller's, a TypeError (keyword twice)."""
    checkpointed, plain = _custom(checkpointing=True), _custom(checkpointing=False)
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(4))
    got = []
    for model in (checkpointed, plain):
        block = model.blocks[0]
        block.mlp.last_aux = None
        torch.manual_seed(7)  # (drop path)
        y = block(x, task_id=1, return_aux=False)
        assert isinstance(y, torch.Tensor) and isinstance(block.mlp.last_aux, MoEAux)
        got.append((y, block.mlp.last_aux))
    (y_ckpt, aux_ckpt), (y, aux) = got
    assert torch.equal(y_ckpt, y)
    assert all(torch.equal(aux_ckpt[k], v) for k, v in aux.as_dict().items())
