"""MoEFFN: routing, auxiliary losses, capacity, task-aware routing, against hand-written math."""

import math

import pytest
import torch
import torch.nn.functional as F

from eegfast.nn import MoEFFN, moe_aux_losses
from eegfast.ops.moe import moe_ffn_per_token_reference


def make_moe(**kwargs):
    torch.manual_seed(0)
    options = {"dim": 12, "hidden": 24, "num_experts": 5, "top_k": 2, "dtype": torch.float64}
    options.update(kwargs)
    moe = MoEFFN(**options)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)  # routing that actually differs between tokens
    return moe


def expected_forward(moe, x, task_ids=None, keep=None):
    """Router math written out, then the per-token loop over the chosen experts."""
    flat = x.reshape(-1, moe.dim)
    router_in = flat
    if task_ids is not None and moe.task_routing == "embedding":
        router_in = flat + moe.task_embed[task_ids]
    logits = router_in @ moe.router.weight.T
    if task_ids is not None and moe.task_routing == "bias":
        logits = logits + moe.task_bias[task_ids]
    probs = torch.softmax(logits, -1)
    top_p, idx = probs.topk(moe.top_k, -1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    if keep is not None:
        gates = gates * keep
    out = moe_ffn_per_token_reference(
        flat, idx, gates, moe.fc1_weight, moe.fc1_bias, moe.fc2_weight, moe.fc2_bias
    )
    return out.reshape(*x.shape[:-1], moe.out_dim), logits, probs, idx


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_forward_and_grads_match_router_math(backend):
    moe = make_moe(backend=backend)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    expected, *_ = expected_forward(moe, x)
    torch.testing.assert_close(out, expected)
    params = [x, moe.router.weight, moe.fc1_weight, moe.fc1_bias, moe.fc2_weight, moe.fc2_bias]
    grads = torch.autograd.grad(out.sin().sum(), params)
    expected_grads = torch.autograd.grad(expected.sin().sum(), params)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert grads[1].abs().sum() > 0  # the router learns through the gates


def test_aux_losses_and_logging():
    moe = make_moe()
    x = torch.randn(40, 12, dtype=torch.float64)
    moe(x)
    aux = moe.last_aux
    _, logits, probs, idx = expected_forward(moe, x)
    load = torch.bincount(idx.reshape(-1), minlength=5).double() / idx.numel()
    torch.testing.assert_close(aux.expert_load.double(), load)
    torch.testing.assert_close(aux.load_balance_loss, 5 * (load * probs.mean(0)).sum())
    torch.testing.assert_close(aux.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(aux.router_entropy, entropy)
    assert int(aux.dropped) == 0 and aux["z_loss"] is aux.z_loss
    assert aux.load_balance_loss.requires_grad and aux.z_loss.requires_grad
    second = make_moe()
    model = torch.nn.Sequential(moe, second)
    model(x)
    totals = moe_aux_losses(model)
    torch.testing.assert_close(totals["z_loss"], moe.last_aux.z_loss + second.last_aux.z_loss)
    assert float(moe_aux_losses(torch.nn.Linear(2, 2))["z_loss"]) == 0.0


def test_empty_input():
    moe = make_moe()
    x = torch.randn(0, 12, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    assert out.shape == (0, 12)
    (out.sum() + moe.last_aux.load_balance_loss).backward()
    assert moe.last_aux.expert_load.eq(0).all()


def test_capacity_drops_latest_slots():
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(30, 12, dtype=torch.float64)
    _, _, _, idx = expected_forward(moe, x)
    capacity = math.ceil(0.5 * 30 * 2 / 5)
    seen = [0] * 5
    keep = torch.zeros(30, 2, dtype=torch.bool)
    for t in range(30):  # earliest slots first, in slot order t * k + i
        for i in range(2):
            e = int(idx[t, i])
            keep[t, i] = seen[e] < capacity
            seen[e] += 1
    assert not keep.all()
    out = moe(x)
    expected, *_ = expected_forward(moe, x, keep=keep)
    torch.testing.assert_close(out, expected)
    assert int(moe.last_aux.dropped) == int((~keep).sum())


def test_argument_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoEFFN(8, 16, num_experts=2, top_k=3)  # k > E
    with pytest.raises(ValueError, match="num_experts"):
        MoEFFN(8, 16, num_experts=65, top_k=2)
    with pytest.raises(ValueError, match="task_routing"):
        MoEFFN(8, 16, 4, 2, num_tasks=2, task_routing="film")
    moe = make_moe(num_tasks=3)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"task_id values must be in \[0, num_tasks=3\)"):
        moe(x, task_id=3)
    with pytest.raises(ValueError, match="task_id values"):
        moe(x, task_id=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="shape"):
        moe(x, task_id=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_tasks=0"):
        make_moe()(x, task_id=0)
    with pytest.raises(ValueError, match="last dim"):
        moe(torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("routing", ["bias", "embedding"])
def test_task_routing(routing):
    moe = make_moe(num_tasks=3, task_routing=routing)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    torch.testing.assert_close(moe(x, task_id=1), moe(x))  # zero-initialised task terms
    with torch.no_grad():
        getattr(moe, "task_bias" if routing == "bias" else "task_embed").normal_(0, 3.0)
    task_ids = torch.tensor([2, 0])  # per sample
    out = moe(x, task_id=task_ids)
    per_token = task_ids[:, None].expand(2, 6).reshape(-1)
    expected, *_ = expected_forward(moe, x, task_ids=per_token)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(moe(x, task_id=0), moe(x, task_id=2))
    out.sum().backward()
    param = moe.task_bias if routing == "bias" else moe.task_embed
    assert param.grad is not None and param.grad[[0, 2]].abs().sum() > 0
    assert param.grad[1].abs().sum() == 0  # task 1 unused in this batch


def test_jitter_only_in_training():
    moe = make_moe(jitter_eps=0.5)
    x = torch.randn(50, 12, dtype=torch.float64)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    moe.train()
    assert not torch.allclose(moe(x), moe(x))


def test_output_dropout_only_in_training():
    """``drop`` is the dense Mlp's dropout on the output: in training every output element is
    zeroed with probability p and the others scaled by 1 / (1 - p); in eval the layer is the
    router math exactly."""
    moe = make_moe(drop=0.5)
    x = torch.randn(40, 12, dtype=torch.float64)
    moe.eval()
    clean = moe(x)
    torch.testing.assert_close(clean, expected_forward(moe, x)[0])
    moe.train()
    torch.manual_seed(1)
    noisy = moe(x)
    kept = noisy != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(noisy[kept], 2 * clean[kept])


def test_state_dict_layout():
    moe = MoEFFN(8, 32, 4, 2, out_dim=6, num_tasks=2)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {
        "router.weight": (4, 8),
        "fc1_weight": (4, 32, 8),
        "fc1_bias": (4, 32),
        "fc2_weight": (4, 6, 32),
        "fc2_bias": (4, 6),
        "task_bias": (2, 4),
    }
    assert "num_experts=4" in repr(moe)


def test_bf16_autocast_matches_fp32():
    moe = make_moe(dtype=torch.float32)
    x = torch.randn(33, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = moe(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), moe(x), atol=5e-2, rtol=5e-2)


def test_dense_equivalent_when_experts_are_copies():
    """Sanity for upcycling: identical experts + renormalised gates = the dense MLP."""
    dense_fc1, dense_fc2 = torch.nn.Linear(12, 24), torch.nn.Linear(24, 12)
    moe = MoEFFN.from_dense(dense_fc1, dense_fc2, num_experts=4, top_k=2)
    x = torch.randn(2, 9, 12)
    torch.testing.assert_close(moe(x), dense_fc2(F.gelu(dense_fc1(x))), atol=1e-6, rtol=1e-6)


def test_torch_compile_module():
    moe = make_moe(dtype=torch.float32)
    x = torch.randn(2, 9, 12, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    expected = moe(x)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (x, moe.fc1_weight, moe.router.weight))
    expected_grads = torch.autograd.grad(expected.sum(), (x, moe.fc1_weight, moe.router.weight))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_task_ids_on_the_device_are_checked_there():
    """Ids that are not host tensors (on a GPU; here, traced by torch.compile, which takes the
    same path) are checked by a device-side assertion instead of being read back to the host:
    no wait for the GPU in every MoE layer, no graph break. Out-of-range ids still fail."""
    moe = make_moe(num_tasks=3)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    expected = moe(x, task_id=torch.tensor([2, 0]))

    def forward(x, ids):
        return moe(x, task_id=ids)

    compiled = torch.compile(forward, backend="eager", fullgraph=True)  # a host read would break
    torch.testing.assert_close(compiled(x, torch.tensor([2, 0])), expected)
    with pytest.raises(RuntimeError, match=r"task_id values must be in \[0, num_tasks=3\)"):
        compiled(x, torch.tensor([2, 3]))


@pytest.mark.parametrize("routing", ["bias", "embedding"])
def test_top1_router_and_task_terms_learn_from_the_output(routing):
    """top_k=1: the renormalised gate is exactly 1 in the forward (outputs = the chosen expert's,
    as upcycling needs), but the router and the task term still get the straight-through
    gradient (d loss / d gate) * d log p, not the 0 of a constant gate."""
    moe = make_moe(top_k=1, num_tasks=2, task_routing=routing)
    with torch.no_grad():
        getattr(moe, "task_bias" if routing == "bias" else "task_embed").normal_(0, 1.0)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    task_ids = torch.tensor([1, 0])
    out = moe(x, task_id=task_ids)
    per_token = task_ids[:, None].expand(2, 6).reshape(-1)
    expected, logits, probs, idx = expected_forward(moe, x, task_ids=per_token)
    torch.testing.assert_close(out, expected)  # gate 1: the chosen expert's output
    weights = torch.randn_like(out)
    term = moe.task_bias if routing == "bias" else moe.task_embed
    params = (moe.router.weight, term)
    grads = torch.autograd.grad((out * weights).sum(), params)
    # d loss / d gate of each token is <weights, chosen expert's output>; times d log p.
    dgate = (expected * weights).sum(-1).reshape(-1).detach()
    log_p = probs.gather(1, idx).squeeze(1).log()
    straight_through = torch.autograd.grad((dgate * log_p).sum(), params)
    for g, e in zip(grads, straight_through, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e)


def padded_batch(fill=0.0):
    """x (3, 7, 12) whose padding tokens (mask True, scattered over the batch) hold ``fill``."""
    torch.manual_seed(5)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True  # trailing padding
    padding[1, [1, 4]] = True  # scattered
    padding[2, :3] = True  # leading
    return x.masked_fill(padding[..., None], fill), padding


AUX_NAMES = ("load_balance_loss", "z_loss", "expert_load", "router_entropy", "dropped", "tokens")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("capacity", [None, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_tokens_are_not_routed(backend, capacity, top_k):
    """A padded batch's real tokens get the outputs and aux losses of the batch without the
    padding tokens: the padding takes no expert slot (with a capacity factor it would push real
    tokens out) and counts in no statistic. The padding's output is 0."""
    moe = make_moe(backend=backend, capacity_factor=capacity, top_k=top_k)
    x, padding = padded_batch(fill=3.0)
    out = moe(x, padding_mask=padding)
    aux = moe.last_aux
    expected = moe(x[~padding])  # (T_real, dim): the real tokens alone, in the same order
    expected_aux = moe.last_aux
    torch.testing.assert_close(out[~padding], expected)
    assert out[padding].eq(0).all()
    for name in AUX_NAMES:
        torch.testing.assert_close(aux[name], expected_aux[name], msg=name)
    if capacity == 0.5:
        assert int(aux.dropped) > 0  # the capacity binds: the slots the padding would take count
    # the padding's values do not matter
    torch.testing.assert_close(
        moe(x.masked_fill(padding[..., None], -50.0), padding_mask=padding), out
    )


def test_padding_aux_losses_are_means_over_real_tokens():
    moe = make_moe(capacity_factor=0.75)
    x, padding = padded_batch()
    out = moe(x, padding_mask=padding)
    aux = moe.last_aux
    _, logits, probs, idx = expected_forward(moe, x)
    real = ~padding.reshape(-1)
    logits, probs, idx = logits[real], probs[real], idx[real]
    T, k, E = int(real.sum()), 2, 5
    load = torch.bincount(idx.reshape(-1), minlength=E).double() / (T * k)
    torch.testing.assert_close(aux.expert_load.double(), load)
    torch.testing.assert_close(aux.load_balance_loss, E * (load * probs.mean(0)).sum())
    torch.testing.assert_close(aux.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    torch.testing.assert_close(aux.router_entropy, -(probs * probs.log()).sum(-1).mean())
    # capacity over the real tokens, earliest real tokens first
    capacity = math.ceil(0.75 * T * k / E)
    seen, keep = [0] * E, torch.zeros(T, k, dtype=torch.bool)
    for t in range(T):
        for i in range(k):
            keep[t, i] = seen[int(idx[t, i])] < capacity
            seen[int(idx[t, i])] += 1
    assert int(aux.dropped) == int((~keep).sum()) > 0
    gates = probs.gather(1, idx)
    gates = gates / gates.sum(-1, keepdim=True) * keep
    flat = x.reshape(-1, 12)[real]
    expected = moe_ffn_per_token_reference(
        flat, idx, gates, moe.fc1_weight, moe.fc1_bias, moe.fc2_weight, moe.fc2_bias
    )
    torch.testing.assert_close(out[~padding], expected)
    totals = moe_aux_losses(moe)
    torch.testing.assert_close(totals["z_loss"], aux.z_loss)


@pytest.mark.parametrize("fill", [0.0, math.inf, math.nan])
@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_gives_finite_outputs_and_gradients(fill, top_k):
    """Whatever the padding tokens hold, outputs are NaN-free (padding: 0), and the gradients
    (through the outputs and the aux losses) are finite, 0 for the padding's inputs."""
    moe = make_moe(top_k=top_k, capacity_factor=0.5, num_tasks=2)
    x, padding = padded_batch(fill=fill)
    x.requires_grad_(True)
    out = moe(x, task_id=torch.tensor([0, 1, 1]), padding_mask=padding)
    assert torch.isfinite(out).all() and out[padding].eq(0).all()
    aux = moe.last_aux
    for name in AUX_NAMES:
        assert torch.isfinite(aux[name]).all(), name
    loss = out.sin().sum() + aux.load_balance_loss + aux.z_loss
    params = [x, moe.router.weight, moe.task_bias, moe.fc1_weight, moe.fc2_bias]
    grads = torch.autograd.grad(loss, params)
    for g in grads:
        assert torch.isfinite(g).all()
    assert grads[0][padding].eq(0).all() and grads[0][~padding].abs().sum() > 0
    assert grads[1].abs().sum() > 0


def test_all_padding_and_mask_errors():
    moe = make_moe(capacity_factor=1.0)
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    out = moe(x, padding_mask=torch.ones(2, 4, dtype=torch.bool))
    assert out.eq(0).all()
    aux = moe.last_aux
    assert aux.expert_load.eq(0).all() and int(aux.dropped) == 0
    assert all(
        float(aux[n].detach()) == 0 for n in ("load_balance_loss", "z_loss", "router_entropy")
    )
    (out.sum() + aux.load_balance_loss + aux.z_loss).backward()
    assert torch.isfinite(moe.router.weight.grad).all()
    # an all-False mask is the unmasked forward
    torch.testing.assert_close(moe(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool)), moe(x))
    with pytest.raises(ValueError, match="padding_mask must have x's leading shape"):
        moe(x, padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        moe(x, padding_mask=torch.zeros(2, 4))


def test_torch_compile_with_padding_mask():
    moe = make_moe(dtype=torch.float32, capacity_factor=0.5)
    x, padding = padded_batch()
    x = x.float().requires_grad_(True)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    out = compiled(x, padding_mask=padding)
    got_aux = moe.last_aux
    expected = moe(x, padding_mask=padding)
    torch.testing.assert_close(out, expected)
    for name in AUX_NAMES:
        torch.testing.assert_close(got_aux[name], moe.last_aux[name], msg=name)
    grads = torch.autograd.grad(out.sum() + got_aux.z_loss, (x, moe.router.weight))
    expected_grads = torch.autograd.grad(
        expected.sum() + moe.last_aux.z_loss, (x, moe.router.weight)
    )
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_from_dense_takes_a_device_and_dtype():
    """device= / dtype= had collided with the ones from_dense takes from fc1 ("multiple values
    for keyword argument 'dtype'"); the experts are built from the dense layers, then moved."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    moe = MoEFFN.from_dense(fc1, fc2, num_experts=2, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in moe.parameters()} == {torch.float64}
    torch.testing.assert_close(moe.fc1_weight[1], fc1.weight.detach().double(), rtol=0, atol=0)


def test_from_dense_with_noise_builds_on_the_meta_device():
    """A model built for its shapes only (on the meta device: eegfast's checks of a checkpoint's
    arch record and of the electrode table) upcycles with noise_std > 0 too: the noise is
    scaled by the dense weights' std, which meta tensors cannot give ("Tensor.item() cannot
    be called on meta tensors"); they hold no values to add noise to, and the shapes are
    those of a real build."""
    with torch.device("meta"):
        fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        moe = MoEFFN.from_dense(fc1, fc2, num_experts=3, noise_std=0.1)
    real = MoEFFN.from_dense(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), 3, noise_std=0.1)
    assert all(p.is_meta for p in moe.parameters())
    assert {k: v.shape for k, v in moe.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }
