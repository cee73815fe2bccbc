"""EMA codebook update and k-means initialisation built on the VQ kernels."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from eegfast.ops import vq_ema_update, vq_kmeans, vq_nearest
from eegfast.ops.vq import labram_recipe_ema
from tests._gloo import free_port


def state(k=64, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebook = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    cluster_size = torch.rand(k, generator=gen) + 0.5
    embed_sum = codebook * cluster_size[:, None]
    z = F.normalize(torch.randn(500, d, generator=gen), dim=1)
    return z, codebook, cluster_size, embed_sum


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ema_update_matches_one_hot_recipe(backend):
    z, codebook, cluster_size, embed_sum = state()
    indices = vq_nearest(z, codebook)
    expected = [t.clone() for t in (codebook, cluster_size, embed_sum)]
    labram_recipe_ema(z, indices, *expected, decay=0.9, eps=1e-5)
    stats = vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, decay=0.9, eps=1e-5, backend=backend
    )
    for actual, reference in zip((codebook, cluster_size, embed_sum), expected, strict=True):
        torch.testing.assert_close(actual, reference)
    assert stats["counts"].sum() == z.shape[0] and not stats["dead"].any()


def test_ema_update_skips_non_finite_rows_and_unused_codes():
    z, codebook, cluster_size, embed_sum = state()
    cluster_size[5] = 0  # never used: keeps its value
    embed_sum[5] = 0
    z[0, 0] = float("nan")
    indices = vq_nearest(z, codebook)
    assert indices[0] == -1
    keep_5 = codebook[5].clone()
    indices[indices == 5] = 6
    vq_ema_update(z, indices, codebook, cluster_size, embed_sum)
    assert torch.isfinite(codebook).all()
    torch.testing.assert_close(codebook[5], keep_5)
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(64))


def test_dead_code_restart_reseeds_from_batch():
    z, codebook, cluster_size, embed_sum = state()
    cluster_size[:4] = 1e-4
    indices = vq_nearest(z, codebook)
    indices[indices < 4] = 10  # make sure codes 0..3 get nothing from this batch either
    gen = torch.Generator().manual_seed(1)
    stats = vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, dead_code_threshold=0.01, generator=gen
    )
    assert stats["dead"][:4].all() and not stats["dead"][4:].any()
    for code in codebook[:4]:  # every restarted code is one of the batch rows
        assert (z @ code).max() > 1 - 1e-5
    # EMA state reset to one row, the seed: the sum left as it was would turn the code back
    # towards its dead direction at the next step
    assert (cluster_size[:4] == 1).all()
    torch.testing.assert_close(embed_sum[:4], codebook[:4])


@pytest.mark.parametrize(("threshold", "dead"), [(0.0, []), (0.5, [0, 1])])
def test_dead_code_threshold_is_strict(threshold, dead):
    """Codes whose EMA count is below the threshold restart: a count equal to it does not, so
    at 0 no code ever does, not even one never used (count 0)."""
    z, codebook, cluster_size, embed_sum = state()
    cluster_size[:2] = 0.0
    cluster_size[2:4] = 1.0  # 0.5 after a step without rows at decay 0.5
    indices = vq_nearest(z, codebook)
    indices[indices < 4] = 10
    stats = vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, decay=0.5, dead_code_threshold=threshold
    )
    assert stats["dead"].nonzero().flatten().tolist() == dead


def test_restarted_codes_are_unit_vectors_when_normalising():
    """With normalize (the default) a restarted code is its seed row l2-normalised, as every
    other code, whatever the rows' norms."""
    z, codebook, cluster_size, embed_sum = state()
    z = 3 * z
    cluster_size[:4] = 1e-4
    indices = vq_nearest(z, codebook)
    indices[indices < 4] = 10
    gen = torch.Generator().manual_seed(1)
    stats = vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, dead_code_threshold=0.01, generator=gen
    )
    assert stats["dead"][:4].all()
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(64))


def test_dead_code_restart_draws_only_rows_with_a_code():
    """Rows a caller leaves out with index -1 (padding: finite, but not data) are never drawn
    as the seeds of restarted codes."""
    z, codebook, cluster_size, embed_sum = state()
    cluster_size[:4] = 1e-4
    indices = vq_nearest(z, codebook)
    indices[indices < 4] = 10
    left_out = torch.arange(z.shape[0]) % 4 != 0  # three rows in four left out
    indices[left_out] = -1
    gen = torch.Generator().manual_seed(2)
    vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, dead_code_threshold=0.01, generator=gen
    )
    similarity = codebook[:4] @ F.normalize(z, dim=1).T  # (4, N)
    best = similarity.argmax(dim=1)
    assert (similarity.amax(dim=1) > 1 - 1e-5).all() and not left_out[best].any()


def test_dead_code_restart_seeds_from_the_one_row_with_a_code():
    """With a single row that has a code (the last; the rows before it left out), every
    restarted code is that row: the draw picks the first row whose running count of drawable
    rows passes the drawn position, not a left-out row before it."""
    z, codebook, cluster_size, embed_sum = state()
    cluster_size[:4] = 1e-4
    indices = torch.full((z.shape[0],), -1)
    indices[-1] = 10
    gen = torch.Generator().manual_seed(3)
    stats = vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, dead_code_threshold=0.01, generator=gen
    )
    assert stats["dead"][:4].all()
    torch.testing.assert_close(codebook[:4], z[-1].expand(4, -1))


def test_ema_update_bad_shapes():
    z, codebook, cluster_size, embed_sum = state()
    indices = vq_nearest(z, codebook)
    with pytest.raises(ValueError, match="cluster_size must have shape"):
        vq_ema_update(z, indices, codebook, cluster_size[:3], embed_sum)
    with pytest.raises(ValueError, match="embed_sum must have shape"):
        vq_ema_update(z, indices, codebook, cluster_size, embed_sum[:, :3])
    with pytest.raises(ValueError, match="decay must be in"):
        vq_ema_update(z, indices, codebook, cluster_size, embed_sum, decay=1.0)


def test_ema_update_refuses_a_negative_eps_before_touching_the_state():
    """eps < 0 was taken: a code whose EMA count is below -eps got a negative smoothed count,
    and the division turned it to point the opposite way (normalisation keeps the sign)."""
    gen = torch.Generator().manual_seed(0)
    codebook = F.normalize(torch.randn(2, 4, generator=gen), dim=1)
    cluster_size = torch.tensor([5.0, 0.5])
    embed_sum = codebook * cluster_size[:, None]
    z, indices = codebook[[1, 1, 1]].clone(), torch.tensor([1, 1, 1])
    state = [t.clone() for t in (codebook, cluster_size, embed_sum)]
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"eps must be a finite number >= 0, got {eps}"):
            vq_ema_update(z, indices, *state, eps=eps)
        before = (codebook, cluster_size, embed_sum)
        assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
    vq_ema_update(z, indices, *state, eps=0.0)  # rows on code 1 keep it where it was
    torch.testing.assert_close(state[0][1], codebook[1])


def _distributed_worker(rank, world, port, z, codebook, cluster_size, embed_sum, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        part = z.chunk(world)[rank]
        codebook, cluster_size, embed_sum = (
            codebook.clone(),
            cluster_size.clone(),
            embed_sum.clone(),
        )
        indices = vq_nearest(part, codebook)
        vq_ema_update(part, indices, codebook, cluster_size, embed_sum)
        out[rank] = torch.cat([codebook.flatten(), cluster_size, embed_sum.flatten()])
    finally:
        dist.destroy_process_group()


def test_ema_update_all_reduces_across_processes():
    z, codebook, cluster_size, embed_sum = state()
    out = torch.zeros(2, codebook.numel() * 2 + cluster_size.numel()).share_memory_()
    mp.spawn(
        _distributed_worker,
        args=(2, free_port(), z, codebook, cluster_size, embed_sum, out),
        nprocs=2,
    )
    indices = vq_nearest(z, codebook)
    vq_ema_update(z, indices, codebook, cluster_size, embed_sum)
    single = torch.cat([codebook.flatten(), cluster_size, embed_sum.flatten()])
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], single)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_finds_separated_clusters(metric):
    gen = torch.Generator().manual_seed(2)
    centers = F.normalize(torch.randn(6, 16, generator=gen), dim=1) * 3
    z = centers.repeat_interleave(200, 0) + 0.05 * torch.randn(1200, 16, generator=gen)
    codebook = vq_kmeans(z, 6, iters=15, metric=metric, generator=gen)
    if metric == "cosine":
        torch.testing.assert_close(codebook.norm(dim=1), torch.ones(6))
        similarity = F.normalize(centers, dim=1) @ codebook.T
        assert (similarity.max(dim=1).values > 0.99).all()
    else:
        assert (torch.cdist(centers, codebook).min(dim=1).values < 0.1).all()


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="N >= 1"):
        vq_kmeans(torch.zeros(0, 4), 3)
    with pytest.raises(ValueError, match="no finite rows"):
        vq_kmeans(torch.full((3, 4), float("nan")), 3)
    for iters in (0, 2):  # iters=0 never reached vq_nearest's own check
        with pytest.raises(ValueError, match="metric must be 'cosine' or 'l2', got 'dot'"):
            vq_kmeans(torch.randn(5, 4), 3, iters=iters, metric="dot")


def _restart_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # ranks without a row to draw from: all left out (padding), or an empty batch
        for case, (empty_ranks, rows) in enumerate(_RESTART_CASES):
            _, codebook, cluster_size, embed_sum = state(k=16, d=8)
            cluster_size[:4] = 1e-4
            z = _restart_rows(rank)
            indices = vq_nearest(z, codebook)
            indices[indices < 4] = 5
            if rank in empty_ranks:
                z, indices = z[:rows], indices[:rows]
                indices[:] = -1
            stats = vq_ema_update(
                z, indices, codebook, cluster_size, embed_sum, dead_code_threshold=0.01
            )
            out[case, rank] = torch.cat([codebook.flatten(), stats["dead"].float()])
    finally:
        dist.destroy_process_group()


# (ranks whose rows are all left out, how many rows they keep)
_RESTART_CASES = (((1,), 40), ((0,), 40), ((1,), 0), ((0, 1), 40))


def _restart_rows(rank: int) -> torch.Tensor:
    return F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(rank)), dim=1)


def test_dead_code_restart_is_identical_across_processes():
    """Restarts under all-reduce stay identical on every rank when a rank has no row to draw
    from (all its rows left out as padding, or none): the seeds come from the rows of the
    ranks that have some (rank 1's where rank 0 has none: rank 0's rows alone were drawn
    from, and nothing was restarted), never from left-out rows; with no row on any rank,
    nothing is restarted."""
    out = torch.zeros(len(_RESTART_CASES), 2, 16 * 8 + 16).share_memory_()
    mp.spawn(_restart_worker, args=(2, free_port(), out), nprocs=2)
    for case in range(len(_RESTART_CASES)):
        torch.testing.assert_close(out[case, 0], out[case, 1], rtol=0, atol=0)
    dead = out[:, 0, -16:].bool()
    for case, drawn_from in ((0, 0), (1, 1), (2, 0)):
        assert dead[case, :4].all() and not dead[case, 4:].any()
        codes = out[case, 0, :-16].view(16, 8)[:4]
        assert ((codes @ _restart_rows(drawn_from).T).amax(dim=1) > 1 - 1e-5).all()
    assert not dead[3].any()


def _seed_worker(rank, world, port, z, indices, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven parts: rank 0 the first 7 rows, rank 1 the rest
        part = slice(0, 7) if rank == 0 else slice(7, None)
        _, codebook, cluster_size, embed_sum = state(k=16, d=8)
        cluster_size[:8] = 1e-4
        gen = torch.Generator().manual_seed(3)
        vq_ema_update(
            z[part], indices[part], codebook, cluster_size, embed_sum,
            dead_code_threshold=0.01, generator=gen,
        )  # fmt: skip
        out[rank] = codebook.flatten()
    finally:
        dist.destroy_process_group()


def test_dead_code_restart_draws_as_one_process_on_the_concatenated_rows():
    """The restart seeds N processes draw are those one process draws from their rows
    concatenated (same generator): drawn among the rows of every rank, not of rank 0 alone."""
    z = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    _, codebook, cluster_size, embed_sum = state(k=16, d=8)
    indices = vq_nearest(z, codebook)
    indices[indices < 8] = 9
    indices[torch.arange(30) % 3 == 0] = -1  # padding: never drawn
    out = torch.zeros(2, 16 * 8).share_memory_()
    mp.spawn(_seed_worker, args=(2, free_port(), z, indices, out), nprocs=2)
    cluster_size[:8] = 1e-4
    gen = torch.Generator().manual_seed(3)
    vq_ema_update(
        z, indices, codebook, cluster_size, embed_sum, dead_code_threshold=0.01, generator=gen
    )
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], codebook.flatten(), rtol=1e-6, atol=1e-6)
