"""The VQ-NSP tokenizer's codebook state (``quantize.embedding.initted``) is known on the host
from construction and from every load, so that a compiled training step reads nothing back
(``Tensor.item`` breaks dynamo's graph) and a loaded uninitialised codebook is still
k-means-initialised at its first training call."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch._dynamo.utils import counters

from eegfast.models import create_model, load_checkpoint
from eegfast.nn import NormEMAVectorQuantizer
from eegfast.train.objectives import StepContext, tokenizer_step
from tests.train.fakes import HostReads


def _batch(B: int = 2, C: int = 3, A: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    padding = torch.zeros(B, C, dtype=torch.bool)
    padding[1, -1] = True
    return {
        "x": torch.randn(B, C, A, 200, generator=g),
        "input_chans": torch.arange(C + 1).expand(B, C + 1).clone(),
        "channel_padding_mask": padding,
    }


def _trained_state() -> dict[str, torch.Tensor]:
    """A tiny tokenizer's state dict with its codebook initialised (``initted`` 1)."""
    torch.manual_seed(1)
    source = create_model("vqnsp_tiny").train()
    with torch.no_grad():
        batch = _batch()
        source(batch["x"], batch["input_chans"])
    state = source.state_dict()
    assert state["quantize.embedding.initted"].item() == 1
    return state


def _loaded_then_moved():
    tokenizer = create_model("vqnsp_tiny").train()  # kmeans_init: initted 0 until the load
    tokenizer.load_state_dict(_trained_state())
    return tokenizer.to("cpu", torch.float32)


def _constructed():
    torch.manual_seed(2)
    return create_model("vqnsp_tiny", kmeans_init=False).train()


@pytest.mark.parametrize("make", [_loaded_then_moved, _constructed])
def test_first_compiled_tokenizer_step_has_no_graph_break(make):
    """Read lazily at the first training call, ``initted.item()`` broke the graph of the first
    compiled step after every ``load_state_dict`` (and construction): one graph now."""
    tokenizer = make()
    ctx = StepContext(torch.device("cpu"), seed=0)
    torch._dynamo.reset()
    counters.clear()
    frames = torch._dynamo.testing.CompileCounter()
    try:
        out = tokenizer_step(torch.compile(tokenizer, backend=frames), _batch(), ctx)
        out.loss.backward()
        broken = {**counters["graph_break"], **counters["unimplemented"]}
    finally:
        torch._dynamo.reset()
    assert not broken, broken
    assert frames.frame_count == 1
    assert torch.isfinite(out.loss)


def _load_plain(quantizer, state):
    quantizer.load_state_dict(state)


def _load_without_the_key(quantizer, state):
    # strict=False, no initted in the file: the buffer as it is decides (here set by another
    # path before the load, so that what the quantizer last saw of it is stale)
    state = dict(state)
    quantizer.embedding.initted.copy_(state.pop("embedding.initted"))
    quantizer.load_state_dict(state, strict=False)


def _load_prefixed(quantizer, state):
    # as DDP (module.) or a model holding it (quantize.): the quantizer's own hook runs
    wrapper = nn.Module()
    wrapper.module = nn.Module()
    wrapper.module.quantize = quantizer
    wrapper.load_state_dict({f"module.quantize.{k}": v for k, v in state.items()})


def _load_checkpoint(quantizer, state):
    holder = nn.Module()
    holder.quantize = quantizer
    assert load_checkpoint(holder, {f"quantize.{k}": v for k, v in state.items()}).ok


@pytest.mark.parametrize("initted", [0.0, 1.0])
@pytest.mark.parametrize(
    "load", [_load_plain, _load_without_the_key, _load_prefixed, _load_checkpoint]
)
@pytest.mark.parametrize("copied", [False, True])
def test_a_loaded_initted_decides_the_first_training_call(initted, load, copied, monkeypatch):
    """After any load (with or without the key, under a prefix, through load_checkpoint; and
    in a deep copy of the loaded quantizer) ``initted`` 0 k-means-initialises the codebook at
    the first training call and 1 keeps the loaded one; neither reads a value back then."""
    torch.manual_seed(0)
    source = NormEMAVectorQuantizer(16, 8, kmeans_init=False)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["embedding.initted"] = torch.tensor([initted])
    # the target starts in the other state, so that the load has to change it
    quantizer = NormEMAVectorQuantizer(16, 8, kmeans_init=bool(initted), check_finite=False)
    quantizer.train()
    load(quantizer, state)
    if copied:
        quantizer = copy.deepcopy(quantizer)
    calls = []
    initialise = NormEMAVectorQuantizer._initialise
    monkeypatch.setattr(
        NormEMAVectorQuantizer,
        "_initialise",
        lambda self, flat: (calls.append(self), initialise(self, flat)),
    )
    z = torch.randn(4, 32, 8)
    with HostReads() as reads:
        if initted:
            quantizer(z)
    if initted:
        assert reads.count == 0 and not calls
    else:
        quantizer(z)
        assert calls == [quantizer] and quantizer.embedding.initted.item() == 1
        quantizer(z)  # once
        assert len(calls) == 1


def test_a_meta_device_load_leaves_the_state_to_be_read_later():
    """A load into a quantizer on the meta device (no values) leaves initted unknown, as a
    shape-only model (infer_architecture) needs: no error from the load."""
    quantizer = NormEMAVectorQuantizer(16, 8, device="meta")
    quantizer.load_state_dict(quantizer.state_dict())
    assert quantizer._initialised is None
