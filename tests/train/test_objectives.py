"""Pretraining objectives: the tokenizer's codes served from the per-window cache."""

import math

import numpy as np
import pytest
import torch

from eegfast.models import create_model
from eegfast.train.hybrid import create_hybrid_pretrain_model, hybrid_step
from eegfast.train.objectives import StepContext, TargetCache, masked_step
from tests.train.fakes import HostReads


def test_target_cache_keeps_codes_by_window():
    cache = TargetCache()
    assert cache.get([0, 1], 4) is None and len(cache) == 0
    codes = torch.tensor([[3, 255, -1, 0], [7, 7, 7, 7]])
    cache.put([5, 9], codes)
    assert len(cache) == 2 and cache.nbytes == 16  # int16
    got = cache.get([9, 5, 9], 4)
    assert got.dtype == torch.int64 and torch.equal(got, codes[[1, 0, 1]])
    assert cache.get([5, 6], 4) is None  # one window missing
    assert cache.get([5], 3) is None  # another token count: not this window's codes
    cache.put([1], torch.tensor([[40000, 2]]))  # past int16
    assert torch.equal(cache.get([1], 2), torch.tensor([[40000, 2]]))
    with pytest.raises(ValueError, match=r"codes must have shape \(len\(indices\), T\)"):
        cache.put([1, 2], torch.zeros(3, 2, dtype=torch.long))


def test_target_cache_row_dtype_follows_the_codebook_size():
    """Given the codebook size, rows are int16 up to 32768 codes, int32 past it, and ``put``
    never reads the codes (on a GPU that would wait for the device)."""
    codes = torch.tensor([[3, 8191, -1]])
    small, large = TargetCache(num_codes=32768), TargetCache(num_codes=32769)
    with HostReads() as reads:
        small.put([0], codes)
        large.put([0], codes)
    assert reads.count == 0
    assert (small.nbytes, large.nbytes) == (6, 12)
    assert torch.equal(small.get([0], 3), codes) and torch.equal(large.get([0], 3), codes)
    with pytest.raises(ValueError, match="num_codes must be >= 1"):
        TargetCache(num_codes=0)


class CountingTokenizer(torch.nn.Module):
    """Counts the batches the wrapped tokenizer encodes."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.calls = tokenizer, 0

    def get_codebook_indices(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer.get_codebook_indices(*args, **kwargs)


def batch_of(indices, x):
    C = x.shape[1]
    return {"x": x[indices], "input_chans": torch.arange(C + 1), "index": torch.tensor(indices)}


@pytest.mark.parametrize("objective", ["masked", "hybrid"])
def test_pretraining_step_reuses_the_codes_of_seen_windows(objective):
    """The second epoch's step takes the codes from the cache (the tokenizer does not run) and
    gives the same loss as without a cache; a batch holding an unseen window runs it again."""
    torch.manual_seed(0)
    if objective == "masked":
        model, step = create_model("labram_tiny_pretrain"), masked_step
    else:
        model, step = create_hybrid_pretrain_model("labram_tiny_pretrain"), hybrid_step
    tokenizer = CountingTokenizer(create_model("vqnsp_tiny").eval())
    x = torch.randn(6, 3, 2, 200)
    cached = StepContext(torch.device("cpu"), tokenizer=tokenizer, target_cache=TargetCache())
    plain = StepContext(torch.device("cpu"), tokenizer=tokenizer)
    first = step(model, batch_of([0, 2, 4], x), cached)
    assert tokenizer.calls == 1 and len(cached.target_cache) == 3
    second = step(model, batch_of([4, 0, 2], x), cached)  # another order, the same windows
    assert tokenizer.calls == 1 and cached.target_cache.hits == 1
    uncached = step(model, batch_of([4, 0, 2], x), plain)
    assert tokenizer.calls == 2
    torch.testing.assert_close(second.loss, uncached.loss, rtol=0, atol=0)
    assert first.loss.isfinite()
    step(model, batch_of([0, 1, 2], x), cached)  # window 1 unseen
    assert tokenizer.calls == 3 and len(cached.target_cache) == 4


def test_target_cache_counts_codes_and_the_pretrain_summary_reads_them():
    from eegfast.train.commands.pretrain import target_summary

    cache = TargetCache(num_codes=8)
    cache.put([0, 1], torch.tensor([[1, 1, 3, -1], [1, 5, 5, 1]]))
    counts = cache.code_counts()
    assert counts.tolist() == [0, 4, 0, 1, 0, 2, 0, 0]
    summary = target_summary(counts)
    assert "3 of 8 codes in use" in summary and "57.1% of the patches" in summary
    assert "warning" not in summary
    assert TargetCache().code_counts().tolist() == []
    assert target_summary(np.zeros(4, np.int64)) == "targets: no codes cached"
    collapsed = np.array([1000, 1, 0, 0])
    assert "perplexity 1.0" in target_summary(collapsed)
    assert "warning: the targets are nearly one code" in target_summary(collapsed)


class LinearClassifier(torch.nn.Module):
    """forward(x, input_chans, *, channel_padding_mask=None, task=None, task_id=None), with a
    MoE layer whose aux losses the step adds."""

    def __init__(self):
        super().__init__()
        from eegfast.nn import MoEFFN

        self.moe = MoEFFN(8, 16, num_experts=4, top_k=2, num_tasks=2)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, input_chans, *, channel_padding_mask=None, task=None, task_id=None):
        return self.head(self.moe(x.flatten(1)[:, None, :8], task_id=task_id).mean(1))


def classification_batch(labels):
    torch.manual_seed(1)
    n = len(labels)
    return {
        "x": torch.randn(n, 2, 1, 4),
        "input_chans": torch.arange(3),
        "task": ["a"] * n,
        "label": torch.tensor(labels),
    }


@pytest.mark.parametrize("weighted", [False, True])
def test_classification_step_leaves_out_unlabelled_windows(weighted):
    """Label -1 (unlabelled, as the datasets store it) is left out of the loss and the accuracy
    instead of failing in the cross-entropy; a batch with no labelled window gives 0, not NaN."""
    from eegfast.train.objectives import classification_step

    torch.manual_seed(0)
    model = LinearClassifier()
    weights = {"a": torch.tensor([0.5, 2.0, 1.0])} if weighted else {}
    ctx = StepContext(torch.device("cpu"), class_weights=weights)
    batch = classification_batch([0, -1, 2, 1, -1, 2])
    out = classification_step(model, batch, ctx)
    logits = out.extras["logits"]
    keep = batch["label"] >= 0
    expected = torch.nn.functional.cross_entropy(
        logits[keep], batch["label"][keep], weight=weights.get("a")
    )
    torch.testing.assert_close(out.loss, expected)
    hits = (logits[keep].argmax(-1) == batch["label"][keep]).float().mean()
    torch.testing.assert_close(out.metrics["accuracy"], hits)
    none = classification_step(model, classification_batch([-1, -1]), ctx)
    assert none.loss.requires_grad and float(none.loss.detach()) == 0.0
    assert float(none.metrics["accuracy"]) == 0.0


def test_classification_step_adds_weighted_moe_aux_losses_and_checks_names():
    from eegfast.nn import moe_aux_losses
    from eegfast.train.objectives import classification_step

    torch.manual_seed(0)
    model = LinearClassifier()
    batch = classification_batch([0, 1, 2, 1])
    plain = classification_step(model, batch, StepContext(torch.device("cpu")))
    weights = {"load_balance_loss": 0.5, "z_loss": 0.25}
    ctx = StepContext(
        torch.device("cpu"), task_ids={"a": 1}, route_by_task=True, aux_weights=weights
    )
    out = classification_step(model, batch, ctx)
    aux = moe_aux_losses(model)
    expected = plain.loss + 0.5 * aux["load_balance_loss"] + 0.25 * aux["z_loss"]
    torch.testing.assert_close(out.loss, expected)  # zero task bias: the same routing
    torch.testing.assert_close(out.metrics["z_loss"], aux["z_loss"])
    misspelled = StepContext(torch.device("cpu"), aux_weights={"load_balance": 0.01})
    with pytest.raises(ValueError, match=r"unknown MoE aux loss name.*load_balance_loss"):
        classification_step(model, batch, misspelled)
    unrouted = StepContext(torch.device("cpu"), task_ids={"b": 0}, route_by_task=True)
    with pytest.raises(ValueError, match="task 'a' has no router id"):
        classification_step(model, batch, unrouted)


def test_to_device_leaves_the_window_indices_on_the_host():
    """``index`` is read on the host (cache keys, mask seeds): moved to a GPU, each step read it
    back (a wait for the device). The meta device stands in for a GPU."""
    from eegfast.train.objectives import to_device

    batch = {"x": torch.randn(2, 3), "index": torch.tensor([4, 7]), "task": ["a", "a"]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta"
    assert moved["index"].device.type == "cpu" and moved["index"].tolist() == [4, 7]
    assert moved["task"] == ["a", "a"]


def test_hybrid_step_codes_padded_batches_as_the_masked_step():
    """The tokenizer gets the batch's channel padding mask in both objectives: without it the
    hybrid step coded the real electrodes of a padded window differently (and its padding)."""
    torch.manual_seed(0)
    tokenizer = create_model("vqnsp_tiny").eval()
    x = torch.randn(2, 4, 2, 200)
    x[0, 3] = 0.0
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[0, 3] = True
    chans = torch.arange(5).repeat(2, 1)
    chans[0, 4] = 0
    batch = {"x": x, "input_chans": chans, "channel_padding_mask": padding}
    batch["index"] = torch.arange(2)
    seen = {}

    def spy(name, model):
        def forward(x, input_chans, targets, *args, **kwargs):
            seen[name] = targets.clone()
            return model.__class__.forward(model, x, input_chans, targets, *args, **kwargs)

        model.forward = forward
        return model

    ctx = StepContext(torch.device("cpu"), tokenizer=tokenizer)
    masked_step(spy("masked", create_model("labram_tiny_pretrain")), batch, ctx)
    hybrid = spy("hybrid", create_hybrid_pretrain_model("labram_tiny_pretrain"))
    hybrid_step(hybrid, batch, ctx)
    with torch.no_grad():
        alone = tokenizer.get_codebook_indices(x[:1, :3], chans[:1, :4])
    assert torch.equal(seen["hybrid"], seen["masked"])
    assert torch.equal(seen["hybrid"][0, :6], alone[0]) and (seen["hybrid"][0, 6:] == -1).all()


@pytest.mark.parametrize("seed", [2**31 - 1, 2**62])
def test_sample_masks_take_any_training_seed(seed):
    """Large train.seed values overflowed torch's manual_seed (a crash at the first step)."""
    from eegfast.train.objectives import sample_masks

    mask = sample_masks(torch.tensor([0, 5]), 10, 0.3, seed=seed, epoch=2)
    assert mask.shape == (2, 10) and mask.sum(1).tolist() == [3, 3]
    again = sample_masks(torch.tensor([5]), 10, 0.3, seed=seed, epoch=2)
    assert torch.equal(again[0], mask[1])  # per window, not per batch


def test_sample_masks_take_the_ratio_of_real_tokens_and_never_padding():
    """Padded positions were counted and could be masked: a window padded from 2 to 5 electrodes
    had round(0.5 · 5A) of its tokens masked, anywhere, so the share of its real patches masked
    varied from window to window. Now ceil(ratio · real) real tokens, none padded; unpadded
    rows are the same masks as before."""
    from eegfast.train.objectives import host_token_padding, sample_masks

    A, C = 3, 5
    padding = torch.zeros(4, C, dtype=torch.bool)
    padding[1, 2:] = True  # 2 real electrodes: 6 real tokens
    padding[3, 1:] = True  # 1 real electrode: 3 real tokens
    batch = {"x": torch.zeros(4, C, A, 200), "channel_padding_mask": padding}
    tokens = host_token_padding(batch)
    assert tokens.shape == (4, C * A) and tokens[1].sum() == 3 * A
    indices = torch.tensor([7, 8, 9, 10])
    masks = sample_masks(indices, C * A, 0.5, seed=1, epoch=0, padding=tokens)
    assert not (masks & tokens).any()
    real = (~tokens).sum(1)
    assert masks.sum(1).tolist() == [math.ceil(0.5 * n) for n in real.tolist()] == [8, 3, 8, 2]
    plain = sample_masks(indices, C * A, 0.5, seed=1, epoch=0)
    assert torch.equal(plain[[0, 2]], masks[[0, 2]])
    assert host_token_padding({"x": batch["x"], "channel_padding_mask": padding & False}) is None


def test_target_cache_stops_filing_at_its_memory_limit():
    """Past ``max_bytes`` the cache keeps the rows it has, files no more (one warning), and the
    windows left out miss (the tokenizer runs for them); re-filing a held row costs nothing."""
    row_bytes = 4 * 2 + TargetCache.ROW_OVERHEAD_BYTES  # int16 codes of 4 tokens
    cache = TargetCache(num_codes=8, max_bytes=2 * row_bytes)
    cache.put([0, 1], torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]))
    assert len(cache) == 2 and cache.held_bytes == 2 * row_bytes and cache.left_out == 0
    cache.put([1], torch.tensor([[5, 6, 7, 1]]))  # replaces window 1's row: still fits
    assert cache.held_bytes == 2 * row_bytes and cache.get([1], 4).tolist() == [[5, 6, 7, 1]]
    with pytest.warns(UserWarning, match=r"cache is full .*pretrain.cache_targets_max_mb"):
        cache.put([2, 3], torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2]]))
        len(cache)
    assert len(cache) == 2 and cache.left_out == 2 and cache.held_bytes <= cache.max_bytes
    assert cache.get([2], 4) is None and cache.get([0], 4) is not None
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        TargetCache(max_bytes=-1)


def test_a_full_cache_encodes_only_the_windows_it_does_not_hold():
    """Once full, batches mixing cached and left-out windows run the tokenizer on the left-out
    ones alone (all-or-nothing lookups had made every such batch a full miss), their codes equal
    the tokenizer's, and left_out counts windows, not epochs."""
    torch.manual_seed(0)
    tokenizer = CountingTokenizer(create_model("vqnsp_tiny").eval())
    encoded = []
    tokenizer.get_codebook_indices = lambda x, *a, _f=tokenizer.get_codebook_indices, **k: (
        encoded.append(len(x)) or _f(x, *a, **k)
    )
    x = torch.randn(6, 3, 2, 200)
    T = 3 * 2
    cache = TargetCache(num_codes=256, max_bytes=3 * (2 * T + TargetCache.ROW_OVERHEAD_BYTES))
    ctx = StepContext(torch.device("cpu"), tokenizer=tokenizer, target_cache=cache)
    from eegfast.train.objectives import tokenizer_codes

    def codes_of(indices):
        batch = batch_of(indices, x)
        # per-sample electrode rows (B, C + 1), as collate_padded gives them: the encoded part
        # of a batch takes its own rows (it was given the whole batch's and refused)
        chans = batch["input_chans"].expand(len(indices), -1)
        return tokenizer_codes(ctx, batch, batch["x"], chans)

    with pytest.warns(UserWarning, match="cache is full"):
        for _epoch in range(3):
            got = codes_of([0, 1, 2, 3, 4, 5])
            assert cache.left_out == 3 and len(cache) == 3  # windows 3..5, whatever the epoch
    with torch.no_grad():
        expected = tokenizer.tokenizer.get_codebook_indices(x, torch.arange(4))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert encoded == [6, 3, 3]  # the first epoch all six, then only the three left out
    assert cache.misses == 3 and cache.hits == 0
    assert codes_of([2, 0, 1]).tolist() == expected[[2, 0, 1]].tolist() and cache.hits == 1


@pytest.mark.parametrize("cached", [False, True])
def test_a_batch_without_window_indices_is_named(cached):
    """A batch of one's own loop without 'index' failed with a bare KeyError: 'index'."""
    tokenizer = create_model("vqnsp_tiny").eval()
    cache = TargetCache() if cached else None
    ctx = StepContext(torch.device("cpu"), tokenizer=tokenizer, target_cache=cache)
    batch = {"x": torch.randn(2, 3, 2, 200), "input_chans": torch.arange(4)}
    with pytest.raises(ValueError, match="a pretraining batch needs 'index'"):
        masked_step(create_model("labram_tiny_pretrain"), batch, ctx)
