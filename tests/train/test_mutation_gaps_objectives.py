"""Training-objective and fine-tuning-metric checks that a mutation audit found missing: each
test fails on a one-line change of the code it names (the masks' epoch seed, the class
weights' inverse frequency, the multi-class F1's averaging)."""

import numpy as np
import pytest
import torch

from eegfast.train.finetune import class_weights
from eegfast.train.metrics import classification_metrics
from eegfast.train.objectives import sample_masks


def test_sample_masks_are_redrawn_every_epoch():
    """A window's mask depends on the epoch (the reference draws a new mask each time a
    window is seen): the same windows under the same seed get other masks in epoch 1 than in
    epoch 0, and the same masks again for the same epoch."""
    indices = torch.arange(8)
    first = sample_masks(indices, 40, 0.5, seed=3, epoch=0)
    second = sample_masks(indices, 40, 0.5, seed=3, epoch=1)
    assert torch.equal(first, sample_masks(indices, 40, 0.5, seed=3, epoch=0))
    assert first.sum(1).tolist() == second.sum(1).tolist() == [20] * 8
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other_seed = sample_masks(indices, 40, 0.5, seed=4, epoch=0)
    assert all(not torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))


def test_class_weights_are_the_inverse_class_frequency_with_mean_1_over_windows():
    """3 windows of class 0, 1 of class 1, none of class 2: weights N / (K · count) (a class
    without windows counts as 1), so the rare class weighs 3 times the common one and the
    weights average 1 over the training windows."""
    labels = np.array([0, 0, 0, 1])
    weights = class_weights(labels, 3)
    assert weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), [4 / 9, 4 / 3, 4 / 3], rtol=1e-6)
    two = class_weights(labels, 2).numpy()
    np.testing.assert_allclose(two, [2 / 3, 2.0], rtol=1e-6)
    assert two[labels].mean() == pytest.approx(1.0)


def test_multiclass_f1_is_weighted_by_class_support_and_kappa_is_cohens():
    """y = [0, 1, 2, 2], predicted [0, 1, 2, 1]: per-class F1 1, 2/3, 2/3; weighted by the
    classes' 1, 1, 2 windows that is 0.75 (the macro mean would be 7/9). Cohen's κ:
    observed agreement 3/4, chance (1·1 + 1·2 + 2·1) / 16 = 5/16, κ = (3/4 - 5/16) / (11/16)."""
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, probs, 3)
    assert m["f1_weighted"] == pytest.approx(0.75)
    assert m["cohen_kappa"] == pytest.approx((3 / 4 - 5 / 16) / (11 / 16))


def test_host_token_padding_marks_each_padded_electrodes_own_patches():
    """Tokens are electrode-major (token c·A + a): the host-side token padding that keeps the
    masks off padded patches is the model's own token padding (a tiling of the electrodes
    instead marked real patches as padded and masked padded ones)."""
    from eegfast.models.labram import token_padding_mask
    from eegfast.train.objectives import host_token_padding

    B, C, A = 3, 4, 3
    padding = torch.tensor([[False] * 4, [False, False, True, True], [False, True, True, True]])
    tokens = host_token_padding({"x": torch.zeros(B, C, A, 200), "channel_padding_mask": padding})
    assert torch.equal(tokens, token_padding_mask(padding, A)[:, 1:])
    assert tokens[1].tolist() == [False] * 6 + [True] * 6
    masks = sample_masks(torch.arange(B), C * A, 0.5, seed=0, epoch=0, padding=tokens)
    assert masks.sum(1).tolist() == [6, 3, 2] and not (masks & tokens).any()


def test_a_partly_cached_batch_encodes_its_new_windows_with_their_own_electrodes():
    """Once the target cache is full, the windows it does not hold are encoded on their own,
    each with its own row of per-sample electrodes (B, C + 1): the codes equal those of each
    window encoded alone, wherever it sits in the batch."""
    from eegfast.models import create_model
    from eegfast.train.objectives import StepContext, TargetCache, tokenizer_codes

    torch.manual_seed(0)
    tokenizer = create_model("vqnsp_tiny").eval()
    with torch.no_grad():  # electrode rows that matter to the codes (init is N(0, 0.02))
        tokenizer.encoder.pos_embed.normal_(0, 1.0)
    C, A = 3, 2
    x = torch.randn(6, C, A, 200)
    rows = torch.tensor([[0, 1 + 7 * i, 2 + 7 * i, 3 + 7 * i] for i in range(6)])  # (6, C + 1)
    T = C * A
    cache = TargetCache(num_codes=256, max_bytes=3 * (2 * T + TargetCache.ROW_OVERHEAD_BYTES))
    ctx = StepContext(torch.device("cpu"), tokenizer=tokenizer, target_cache=cache)

    def codes_of(order):
        index = torch.tensor(order)
        batch = {"x": x[index], "input_chans": rows[index], "index": index}
        return tokenizer_codes(ctx, batch, batch["x"], batch["input_chans"])

    with torch.no_grad():
        alone = torch.cat([tokenizer.get_codebook_indices(x[i : i + 1], rows[i]) for i in range(6)])
    order = [3, 0, 4, 1, 5, 2]  # new windows before, between and after cached ones
    with pytest.warns(UserWarning, match="cache is full"):  # (said as rows are filed)
        codes_of([0, 1, 2, 3, 4, 5])  # files windows 0..2, leaves 3..5 out
        got = codes_of(order)
    assert len(cache) == 3 and cache.left_out == 3
    assert torch.equal(got, alone[order])
    assert cache.misses == 2  # the second batch was a partial miss
