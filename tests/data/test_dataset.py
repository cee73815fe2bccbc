import json

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from eegfast.data import ShardDataset, collate_padded, make_loader
from eegfast.data.dataset import ElectrodeSetBatchSampler
from eegfast.data.labels import LabelRules
from eegfast.data.prepare import Settings, prepare
from eegfast.data.preprocess import PreprocessConfig
from eegfast.electrodes import labram_input_chans
from eegfast.testing import requires_cuda


@pytest.fixture(scope="module", params=["float32", "float16"])
def prepared(sample_files, tmp_path_factory, request):
    """64-channel motor imagery + 19-channel arithmetic recordings, two electrode sets."""
    out = tmp_path_factory.mktemp(f"prepared-{request.param}")
    srcs = [f"mi={sample_files['S001R04.edf']}", f"arith={sample_files['Subject00_2.edf']}"]
    srcs.append(f"arith={sample_files['Subject01_2.edf']}")
    settings = Settings(
        preprocess=PreprocessConfig(window_seconds=2, dtype=request.param),
        labels=LabelRules(filename_rules=(("_2$", "task"),)),
    )
    prepare(srcs, out, settings, progress=False)
    return out


def test_items(prepared):
    ds = ShardDataset(prepared)
    assert len(ds) == 60 + 2 * 31  # 30 events x 2 windows; 62 s / 2 s
    assert ds.label_names == {"mi": ["T0", "T1", "T2"], "arith": ["task"]}
    item = ds[0]
    assert item["x"].dtype == torch.float32 and item["x"].shape == (64, 2, 200)
    assert item["input_chans"].tolist() == labram_input_chans(ds.recordings[0]["electrodes"])
    assert item["task"] == "mi" and item["subject"] == "S001" and item["label"] in (0, 1, 2)
    last = ds[-1]
    assert last["x"].shape == (19, 2, 200) and last["subject"] == "Subject01"
    assert last["label"] == 0 and last["window"] == 30
    shard = np.load(prepared / ds.recordings[-1]["shard"])
    np.testing.assert_array_equal(last["x"].numpy(), shard[30].astype(np.float32))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_filters(prepared):
    assert len(ShardDataset(prepared, subjects=["Subject00"])) == 31
    assert len(ShardDataset(prepared, tasks=["mi"])) == 60
    with pytest.raises(ValueError, match="tasks: \\['nope'\\]"):
        ShardDataset(prepared, tasks=["nope"])
    with pytest.raises(TypeError, match="subjects"):
        ShardDataset(prepared, subjects="S001")
    with pytest.raises(ValueError, match="not a prepared folder"):
        ShardDataset(prepared / "shards")


def test_get_batch_equals_collated_items(prepared):
    ds = ShardDataset(prepared)
    rng = np.random.default_rng(0)
    for indices in (rng.choice(len(ds), 17, replace=False), np.arange(60, 75), [3, 1, 2]):
        batch = ds.get_batch(indices)
        expected = collate_padded([ds[int(i)] for i in batch["index"]])
        assert sorted(batch["index"].tolist()) == sorted(int(i) for i in indices)
        for key in ("x", "input_chans", "channel_padding_mask", "label"):
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
        assert batch["subject"] == expected["subject"] and batch["task"] == expected["task"]


def test_padding(prepared):
    ds = ShardDataset(prepared)
    batch = collate_padded([ds[0], ds[len(ds) - 1]])
    assert batch["x"].shape == (2, 64, 2, 200)
    assert batch["channel_padding_mask"].sum(1).tolist() == [0, 64 - 19]
    assert batch["input_chans"][1, 20:].eq(0).all() and batch["input_chans"][1, :20].gt(0)[1:].all()
    assert batch["x"][1, 19:].eq(0).all()


def test_batch_sampler_groups_and_covers():
    groups = np.array([0] * 10 + [1] * 7 + [2] * 3)
    sampler = ElectrodeSetBatchSampler(groups, 4, shuffle=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert list(sampler) != batches  # a new permutation each epoch
    dropped = ElectrodeSetBatchSampler(groups, 4, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 2 + 1
    plain = ElectrodeSetBatchSampler(None, 6, num_items=20)
    assert [len(b) for b in plain] == [6, 6, 6, 2]
    chosen = ElectrodeSetBatchSampler(groups, 2, sampler=[0, 10, 1, 11])
    assert list(chosen) == [[0, 1], [10, 11]]
    with pytest.raises(ValueError, match="batch_size"):
        ElectrodeSetBatchSampler(groups, 0)


@pytest.mark.parametrize("group", [True, False])
def test_make_loader_in_process(prepared, group):
    ds = ShardDataset(prepared)
    loader = make_loader(ds, 8, shuffle=True, num_workers=0, group_by_electrode_set=group)
    seen = []
    for batch in loader:
        seen += batch["index"].tolist()
        c = batch["x"].shape[1]
        assert batch["input_chans"].shape == (len(batch["index"]), c + 1)
        if group:
            assert not batch["channel_padding_mask"].any()
    assert sorted(seen) == list(range(len(ds)))


def test_make_loader_subset_and_generic(prepared):
    ds = ShardDataset(prepared)
    subset = Subset(ds, list(range(60, 80)))
    batches = list(make_loader(subset, 8, shuffle=False, num_workers=0))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(60, 80))
    items = [ds[i] for i in range(58, 64)]  # a plain list: generic path with collate_padded
    generic = list(make_loader(items, 3, shuffle=False, num_workers=0))
    assert [b["x"].shape[1] for b in generic] == [64, 19]
    assert generic[0]["channel_padding_mask"].sum(1).tolist() == [0, 0, 64 - 19]


def test_make_loader_workers(prepared):
    ds = ShardDataset(prepared)
    loader = make_loader(ds, 16, shuffle=True, num_workers=2, pin_memory=False)
    seen = []
    for _ in range(2):  # persistent workers, two epochs
        batches = list(loader)  # all kept alive: no worker memory may be reused under them
        seen = [i for batch in batches for i in batch["index"].tolist()]
        assert sorted(seen) == list(range(len(ds)))
        for batch in batches:
            expected = collate_padded([ds[i] for i in batch["index"].tolist()])
            torch.testing.assert_close(batch["x"], expected["x"], rtol=0, atol=0)


def test_batch_memory_is_reused_only_when_free(prepared):
    ds = ShardDataset(prepared)
    a_idx, b_idx = list(range(0, 8)), list(range(8, 16))
    a = ds.get_batch(a_idx)
    a_copy = a["x"].clone()
    view = a["x"][:, :3]  # a view keeps the memory in use too
    ptr = a["x"].data_ptr()
    del a
    b = ds.get_batch(b_idx)
    assert b["x"].data_ptr() != ptr  # still referenced by `view`
    torch.testing.assert_close(view, a_copy[:, :3], rtol=0, atol=0)
    del view, b
    c = ds.get_batch(a_idx)
    torch.testing.assert_close(c["x"], a_copy, rtol=0, atol=0)
    kept = [ds.get_batch(a_idx) for _ in range(10)]  # more live batches than pooled buffers
    assert len({k["x"].data_ptr() for k in kept}) == 10
    assert all(torch.equal(k["x"], a_copy) for k in kept)


def test_batch_memory_recycles(prepared):
    ds = ShardDataset(prepared)
    first = ds.get_batch([0, 1, 2, 3])["x"].data_ptr()  # batch dropped at once
    assert ds.get_batch([4, 5, 6, 7])["x"].data_ptr() == first


@pytest.mark.gpu
@requires_cuda
def test_pinned_batches_on_gpu_machines(prepared):
    ds = ShardDataset(prepared)
    batch = ds.get_batch(list(range(8)), pin_memory=True)
    assert batch["x"].is_pinned()
    loader = make_loader(ds, 8, shuffle=False, num_workers=0, pin_memory=True)
    first = next(iter(loader))
    assert first["x"].is_pinned()
    on_gpu = first["x"].to("cuda", non_blocking=True)
    torch.testing.assert_close(on_gpu.cpu(), first["x"], rtol=0, atol=0)


def test_shard_replaced_by_unfinished_prepare_is_an_error(sample_files, tmp_path):
    from eegfast.data.prepare import discover, process_file

    src = [str(sample_files["Subject00_2.edf"])]
    prepare(src, tmp_path, Settings(preprocess=PreprocessConfig(window_seconds=4)), progress=False)
    assert ShardDataset(tmp_path)[0]["x"].shape == (19, 4, 200)
    # a second run with other settings, stopped after its first shard: index.json is older
    other = Settings(preprocess=PreprocessConfig(window_seconds=2))
    process_file(discover(src)[0], other, str(tmp_path))
    ds = ShardDataset(tmp_path)
    with pytest.raises(ValueError, match=r"index.json says float32 \(15, 19, 4, 200\)"):
        ds[0]
    with pytest.raises(ValueError, match="did not finish"):
        ds.get_batch([0, 1])


def test_load_data_class_ids_agree_across_folders(sample_files, tmp_path):
    from eegfast.train.data import load_data

    rules = Settings(labels=LabelRules(filename_rules=(("_1$", "rest"), ("_2$", "task"))))
    both = [f"arith={sample_files[n]}" for n in ("Subject00_1.edf", "Subject00_2.edf")]
    prepare(both, tmp_path / "a", rules, progress=False)  # classes rest=0, task=1
    prepare([f"arith={sample_files['Subject01_2.edf']}"], tmp_path / "b", rules, progress=False)
    for roots in ([tmp_path / "a", tmp_path / "b"], [tmp_path / "b", tmp_path / "a"]):
        data = load_data(roots)
        names = data.label_names["arith"]
        assert sorted(names) == ["rest", "task"]
        for i, item in enumerate(data.items):
            expected = "rest" if item.recording.endswith("_1.edf") else "task"
            assert names[item.label] == expected
            assert data.dataset[i]["label"] == item.label


def test_make_loader_seed_decides_the_order(prepared):
    ds = ShardDataset(prepared)
    items = [ds[i] for i in range(58, 70)]

    def orders(dataset, seed):
        loader = make_loader(dataset, 4, shuffle=True, seed=seed, num_workers=0)
        return [[b["x"].abs().sum((1, 2, 3)).tolist() for b in loader] for _ in range(2)]

    for dataset in (ds, items):  # batch reads, and the generic path with collate_padded
        first = orders(dataset, 3)
        torch.manual_seed(123)  # torch's global generator has no say
        assert orders(dataset, 3) == first
        assert first[0] != first[1]  # a new permutation each epoch


def _copy_prepared(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_or_corrupt_shard_names_the_file(prepared, tmp_path):
    root = _copy_prepared(prepared, tmp_path / "copy")
    ds = ShardDataset(root)
    shard = root / ds.recordings[1]["shard"]
    with open(shard, "r+b") as f:  # a copy that stopped part-way
        f.truncate(shard.stat().st_size - 1000)
    first_of_1 = int(np.flatnonzero(ds._rec == 1)[0])
    for read in (lambda: ds[first_of_1], lambda: ds.get_batch([0, first_of_1])):
        with pytest.raises(ValueError, match=f"{shard.name}: shard is truncated"):
            read()
    other = root / ds.recordings[2]["shard"]
    other.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{other.name}: not a readable shard"):
        ShardDataset(root).get_batch([int(np.flatnonzero(ds._rec == 2)[0])])


def test_corrupt_index_names_the_file(prepared, tmp_path):
    root = _copy_prepared(prepared, tmp_path / "copy")
    text = (root / "index.json").read_text()
    (root / "index.json").write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(ValueError, match=r"index.json is not valid JSON"):
        ShardDataset(root)
    (root / "index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="format version None"):
        ShardDataset(root)


def many_recordings(prepared, root, n_recordings: int):
    """A folder of ``n_recordings`` recordings of 2 windows each (recording i: the windows of
    ``prepared``'s recording plus i), written directly: preparing hundreds would take minutes."""
    index = json.loads((prepared / "index.json").read_text())
    rec = index["recordings"][-1]
    rows = np.load(prepared / rec["shard"])[:2]
    folder = root / "many"
    (folder / "shards").mkdir(parents=True)
    recordings = []
    for i in range(n_recordings):
        np.save(folder / "shards" / f"r{i}.npy", rows + rows.dtype.type(i))
        recordings.append(
            dict(rec, file=f"r{i}.edf", shard=f"shards/r{i}.npy", n_windows=2)
            | {"starts": rec["starts"][:2], "labels": rec["labels"][:2]}
        )
    (folder / "index.json").write_text(json.dumps(index | {"recordings": recordings}))
    return folder, rows


def test_more_recordings_than_open_file_limit(prepared, tmp_path):
    """Recordings are read without holding a file (or a memory map, which holds one) open per
    recording: a folder of more recordings than the open-file limit loads whole epochs."""
    import resource

    n_recordings = 300
    folder, rows = many_recordings(prepared, tmp_path, n_recordings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 200), hard))
    try:
        ds = ShardDataset(folder)
        seen = []
        for batch in make_loader(ds, 16, shuffle=True, num_workers=0, pin_memory=False):
            seen += batch["index"].tolist()
            first = batch["x"][:, 0, 0, 0].numpy()  # row r, recording i: rows[r] + i
            expected = [
                rows[k % 2, 0, 0, 0] + rows.dtype.type(k // 2) for k in batch["index"].tolist()
            ]
            np.testing.assert_array_equal(first, np.asarray(expected, np.float32))
        assert sorted(seen) == list(range(2 * n_recordings))
        items = [ds[i]["x"] for i in range(len(ds))]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    last = rows[1] + rows.dtype.type(n_recordings - 1)  # what the last shard holds
    assert torch.equal(items[-1], torch.from_numpy(last.astype(np.float32)))


def test_reads_without_preadv(prepared, monkeypatch):
    ds = ShardDataset(prepared)
    expected = ds.get_batch([0, 5, 61, 100])
    monkeypatch.delattr("os.preadv", raising=False)  # platforms without it: lseek + readinto
    fallback = ShardDataset(prepared).get_batch([0, 5, 61, 100])
    torch.testing.assert_close(fallback["x"], expected["x"], rtol=0, atol=0)


def test_batch_sampler_len_matches_random_sampler_epochs():
    from torch.utils.data import WeightedRandomSampler

    groups = np.array([0] * 10 + [1] * 7 + [2] * 3)
    weighted = WeightedRandomSampler(
        torch.ones(20), 20, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    sampler = ElectrodeSetBatchSampler(groups, 4, sampler=weighted)
    counts = []
    for _ in range(20):
        expected = len(sampler)  # what DataLoader's len() says before the epoch
        batches = list(sampler)
        assert len(batches) == expected
        counts.append(len(batches))
    assert len(set(counts)) > 1  # the draws did differ in their number of batches


@pytest.mark.parametrize("world_size, micro_batches", [(1, 4), (2, 2), (2, 1), (3, 1)])
def test_epoch_sampler_keep_last_has_no_empty_batches(world_size, micro_batches):
    from eegfast.train.sampler import EpochBatchSampler

    keys = ["a"] * 13 + ["b"] * 3 + ["c"] * 1
    global_batch = 4 * micro_batches * world_size // (2 if world_size == 2 else 1)
    per_rank = []
    for rank in range(world_size):
        sampler = EpochBatchSampler(
            keys,
            global_batch,
            micro_batches=micro_batches,
            world_size=world_size,
            rank=rank,
            drop_last=False,
            seed=3,
        )
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    sizes = [[len(b) for b in batches] for batches in per_rank]
    assert all(s == sizes[0] for s in sizes)  # every rank steps the same number of times
    assert all(n > 0 for n in sizes[0])
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(keys)))  # nothing left out
    for batches in per_rank:
        assert all(len({keys[i] for i in b}) == 1 for b in batches)


def test_distributed_sampler_with_grouping_is_refused(prepared):
    """Grouped by electrode set, each rank's share split into its own number of batches (on the
    sample, [6, 7] for two ranks): a DDP loop over them hangs at the missing step."""
    from torch.utils.data import DistributedSampler

    ds = ShardDataset(prepared)
    counts = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=2)
        with pytest.raises(ValueError, match="different numbers of batches.*EpochBatchSampler"):
            make_loader(ds, 16, shuffle=False, sampler=sampler)
        loader = make_loader(ds, 16, shuffle=False, sampler=sampler, group_by_electrode_set=False)
        counts.append(len(list(loader)))
    assert counts[0] == counts[1]


def test_load_data_items_index_the_folders_it_opened(sample_files, tmp_path):
    """A folder without the wanted tasks is not opened: ``TrainData.roots`` lists the opened
    folders only, and each item's ``root`` is its folder's position in that list (it had been
    the position among all folders given, one past the end here)."""
    from eegfast.train.data import load_data

    rules = Settings(labels=LabelRules(filename_rules=(("_1$", "rest"), ("_2$", "task"))))
    prepare([f"other={sample_files['Subject00_1.edf']}"], tmp_path / "a", rules, progress=False)
    prepare([f"arith={sample_files['Subject01_2.edf']}"], tmp_path / "b", rules, progress=False)
    data = load_data([tmp_path / "a", tmp_path / "b"], tasks=["arith"])
    assert data.roots == [tmp_path / "b"]
    assert {data.roots[item.root] for item in data.items} == {tmp_path / "b"}
    both = load_data([tmp_path / "a", tmp_path / "b"])
    for item in both.items:
        assert both.roots[item.root].name == ("b" if item.task == "arith" else "a")


def test_shard_replaced_while_reading_is_an_error_not_garbage(prepared, tmp_path):
    """A shard swapped on disk after its header was checked (a `prepare` of another dtype into
    the folder while a run reads it) is checked again; its rows were read with the old
    header's dtype and offset, as garbage of the right shape."""
    root = _copy_prepared(prepared, tmp_path / "copy")
    ds = ShardDataset(root)
    first = ds.get_batch([0, 1])["x"].clone()  # header checked and remembered
    shard = root / ds.recordings[0]["shard"]
    rows = np.load(shard)
    other = rows.astype(np.float16 if rows.dtype == np.float32 else np.float32)
    tmp = shard.parent / "new.npy"
    np.save(tmp, other)
    tmp.replace(shard)  # an atomic rename, as prepare writes
    for read in (lambda: ds.get_batch([0, 1]), lambda: ds[0]):
        with pytest.raises(ValueError, match=f"{shard.name}: shard holds {other.dtype}"):
            read()
    np.save(tmp, rows)  # the same rows again (under a new inode): read as before
    tmp.replace(shard)
    torch.testing.assert_close(ds.get_batch([0, 1])["x"], first, rtol=0, atol=0)


def test_batch_sampler_follows_a_distributed_samplers_epoch():
    """len() draws the next epoch's order early (so that it and the epoch agree); with a
    DistributedSampler, whose order follows its own epoch, a len() after (or during) an epoch
    kept the old draw, and the next epoch repeated the last one's order after set_epoch."""
    from torch.utils.data import DistributedSampler

    def order(epoch):
        expected = DistributedSampler(range(40), num_replicas=2, rank=1, seed=4)
        expected.set_epoch(epoch)
        return list(expected)

    dist = DistributedSampler(range(40), num_replicas=2, rank=1, seed=4)
    batches = ElectrodeSetBatchSampler(None, 4, num_items=20, sampler=dist)
    for epoch in range(3):
        dist.set_epoch(epoch)  # the usual place: on the sampler passed in
        assert [i for b in batches for i in b] == order(epoch)
        assert len(batches) == 5  # e.g. a progress display
    for epoch in (3, 4):  # or on the batch sampler (loader.sampler), which passes it on
        batches.set_epoch(epoch)
        assert [i for b in batches for i in b] == order(epoch)


def test_make_loader_order_does_not_depend_on_workers(prepared):
    """Items of any dataset (here a plain list, collated with collate_padded): the epochs'
    orders of one seed are the same with and without (persistent) workers. The order's
    generator also drew the workers' base seed, once per iterator: once in all with persistent
    workers, once an epoch without, so from the second epoch on the orders differed."""
    ds = ShardDataset(prepared)
    items = [ds[i] for i in range(58, 70)]

    def epochs(num_workers):
        loader = make_loader(items, 4, shuffle=True, seed=3, num_workers=num_workers)
        return [[b["x"][:, 0, 0, 0].tolist() for b in loader] for _ in range(3)]

    assert epochs(2) == epochs(0)


def test_make_loader_leaves_the_global_rng_alone(prepared):
    """Creating a loader's iterator draws its workers' base seed; from torch's global generator
    (which dropout draws from) unless the loader has its own: batch reads of a ShardDataset
    then gave a run of 0 workers another dropout stream than one of persistent workers."""
    ds = ShardDataset(prepared)
    for dataset in (ds, [ds[i] for i in range(58, 70)]):
        loader = make_loader(dataset, 4, shuffle=True, seed=3, num_workers=0)
        state = torch.get_rng_state()
        for _ in range(2):
            list(loader)
        assert torch.equal(torch.get_rng_state(), state)
