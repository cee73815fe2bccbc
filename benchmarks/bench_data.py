"""Data pipeline benchmarks: ``eegfast prepare`` against the reference recipe, and the loader.

Run from the repository root::

    python -m benchmarks.bench_data [--out bench-results] [--copies 4]   # writes cpu_data.md/json
    pytest benchmarks/bench_data.py --benchmark-only                     # pytest-benchmark view

1. Preparation throughput, in hours of EEG per minute, on the bundled recordings (6 PhysioNet
   files, 0.205 h; ``--copies`` copies of them in a temporary folder so the run is long enough to
   time):
   - ``eegfast``: ``eegfast.data.prepare.prepare`` (one FFT per channel, one memory-mapped shard
     per recording, worker processes);
   - ``reference recipe``: what the LaBraM preprocessing scripts do, rebuilt here: per recording
     ``mne.io.read_raw`` (preloaded), ``raw.filter(0.1, 75)``, ``raw.notch_filter(50)``,
     ``raw.resample(200)`` with MNE's defaults, units of 100 µV, then one pickle file per 4-s
     window; run over the same worker-process pool size, so the ratio measures the work per
     recording, not the parallelism.
   Both write the same windows (same channels, 4-s windows every 4 s).
2. Loader throughput, samples per second of (32 electrodes, 8 patches, 200) windows read from
   the page cache (shards prepared from the motor-imagery recordings with ``--channels`` of 32
   electrodes, 8-s windows every 0.5 s), shuffled batches of 256:
   - ``eegfast``: ``make_loader(ShardDataset)`` (batch-level reads from the memory maps);
   - ``per-item``: a DataLoader over the same ``ShardDataset`` items with ``collate_padded``
     (the usual per-item ``__getitem__`` + collate pattern).
3. Training loader, batches per second of the loader ``eegfast.train.engine.fit`` builds for the
   training commands (``EpochBatchSampler``, batches of 64, ``data.num_workers=0``), same shards
   and same batches on both rows:
   - ``whole batches``: ``eegfast.train.data.ShardBatches`` (``ShardDataset.get_batch``, rows in
     the sampler's order), what ``fit`` uses for prepared folders;
   - ``per-item``: ``IndexedDataset`` + ``indexed_collate(collate_padded)``, what it used before.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from eegfast.data.labels import LabelRules
from eegfast.data.prepare import Settings, prepare
from eegfast.data.preprocess import PreprocessConfig
from eegfast.data.reading import map_channels
from eegfast.datasets import ATTRIBUTION, sample
from eegfast.fileio import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
SAMPLE_RULES = LabelRules(use_annotations=False, filename_rules=(("_1$", "rest"), ("_2$", "task")))
LOADER_CHANNELS = (
    "FC5,FC3,FC1,FCZ,FC2,FC4,FC6,C5,C3,C1,CZ,C2,C4,C6,CP5,CP3,CP1,CPZ,CP2,CP4,CP6,"
    "FP1,FPZ,FP2,AF7,AF3,AFZ,AF4,AF8,F7,F5,F3"
).split(",")


# --------------------------------------------------------------------------------------------
# The reference recipe, rebuilt (MNE per recording, one pickle per window).


def reference_recording(path: str, out: str) -> float:
    """Preprocess one recording the reference way; returns its duration in seconds."""
    import mne

    raw = mne.io.read_raw(path, preload=True, verbose="error")
    chmap = map_channels(raw.ch_names, raw.get_channel_types())
    raw.pick([raw.ch_names[i] for i in chmap.picks])
    raw.filter(0.1, 75.0, verbose="error")
    raw.notch_filter(50.0, verbose="error")
    raw.resample(200, verbose="error")
    data = raw.get_data(units="uV") / 100.0
    stem = Path(path).stem
    window = 4 * 200
    label = 1 if stem.endswith("_2") else 0
    for i, start in enumerate(range(0, data.shape[1] - window + 1, window)):
        x = data[:, start : start + window].reshape(data.shape[0], 4, 200).astype(np.float32)
        with open(os.path.join(out, f"{stem}_{i}.pkl"), "wb") as f:
            pickle.dump({"X": x, "y": label}, f)
    return raw.n_times / raw.info["sfreq"]


def _reference_job(args: tuple[str, str]) -> float:
    return reference_recording(*args)


def reference_recipe(files: list[str], out: Path, workers: int) -> float:
    """Run the reference recipe over ``files``; returns hours of EEG processed."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f, str(out)) for f in files]
    if workers <= 1:
        seconds = sum(_reference_job(j) for j in jobs)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            seconds = sum(pool.map(_reference_job, jobs, chunksize=1))
    return seconds / 3600


def eegfast_prepare(files: list[str], out: Path, workers: int) -> float:
    settings = Settings(preprocess=PreprocessConfig(window_seconds=4), labels=SAMPLE_RULES)
    report = prepare(files, out, settings, workers=workers, progress=False)
    return report["hours"]


def corpus(folder: Path, copies: int) -> list[str]:
    """``copies`` real copies of the sample recordings (copies, not links: each is its own
    recording to both pipelines)."""
    files = []
    for k in range(copies):
        sub = folder / f"copy{k}"
        sub.mkdir(parents=True, exist_ok=True)
        for p in sample(download=False):
            target = sub / p.name
            if not target.exists():
                shutil.copy(p, target)
            files.append(str(target))
    return files


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the worker pools)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(files: list[str], work: Path, workers: int, repeats: int) -> dict:
    """Median wall seconds and CPU seconds of both pipelines (fresh output folder per run)."""
    results = {}
    for name, fn in (("eegfast", eegfast_prepare), ("reference recipe", reference_recipe)):
        times, cpu, hours = [], [], 0.0
        for r in range(repeats + 1):  # the first run warms caches and imports, untimed
            out = work / f"{name.replace(' ', '_')}-{workers}-{r}"
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            hours = fn(files, out, workers)
            if r:
                times.append(time.perf_counter() - start)
                cpu.append(_cpu_seconds() - start_cpu)
            shutil.rmtree(out)
        seconds = statistics.median(times)
        cpu_seconds = statistics.median(cpu)
        results[name] = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "hours": hours,
            "hours_per_minute": hours / seconds * 60,
            "hours_per_cpu_minute": hours / cpu_seconds * 60,
        }
    return results


# --------------------------------------------------------------------------------------------
# Loader.


def loader_dataset(work: Path, dtype: str) -> Path:
    out = work / f"loader-{dtype}"
    if not (out / "index.json").exists():
        mi = [p for p in sample(download=False) if p.name.startswith("S001")]
        settings = Settings(
            preprocess=PreprocessConfig(window_seconds=8, stride_seconds=0.5, dtype=dtype),
            labels=LabelRules(use_annotations=False),
            channels=tuple(LOADER_CHANNELS),
        )
        prepare([str(p) for p in mi], out, settings, progress=False)
    return out


def loader_rate(loader, min_samples: int = 8000) -> dict:
    """Samples per wall second and per CPU second of this process (whole epochs after one
    warm-up epoch). CPU time excludes worker processes, so it is reported for 0 workers only."""
    for _ in loader:
        pass
    n, start, start_cpu = 0, time.perf_counter(), time.process_time()
    while n < min_samples:
        for batch in loader:
            n += batch["x"].shape[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"wall": n / wall, "cpu": n / cpu}


def time_loaders(root: Path, batch_size: int = 256) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from eegfast.data import ShardDataset, collate_padded, make_loader

    ds = ShardDataset(root)
    assert ds[0]["x"].shape == (32, 8, 200)
    rates = {}
    for workers in (0, WORKERS):
        loader = make_loader(ds, batch_size, shuffle=True, num_workers=workers, pin_memory=False)
        rates[f"eegfast, {workers} workers"] = loader_rate(loader)
        del loader
        per_item = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=collate_padded,
            persistent_workers=workers > 0,
        )
        rates[f"per-item, {workers} workers"] = loader_rate(per_item)
        del per_item
    return {"torch_threads": torch.get_num_threads(), "rates": rates}


def training_loader(root: Path, path: str, batch_size: int = 64):
    """(the DataLoader ``fit`` builds over ``root``, its sampler): ``path`` "whole batches"
    (ShardBatches) or "per-item" (items + collate_padded); no workers, no pinning."""
    from torch.utils.data import DataLoader

    from eegfast.data import collate_padded
    from eegfast.train.data import load_data, passthrough, shard_batches
    from eegfast.train.engine import IndexedDataset, indexed_collate
    from eegfast.train.sampler import EpochBatchSampler

    data = load_data([root])
    sampler = EpochBatchSampler(data.group_keys, batch_size, seed=0)
    if path == "whole batches":
        batches = shard_batches(data.dataset, collate_padded)
        loader = DataLoader(batches, batch_size=None, sampler=sampler, collate_fn=passthrough)
    else:
        collate = indexed_collate(collate_padded)
        loader = DataLoader(IndexedDataset(data.dataset), batch_sampler=sampler, collate_fn=collate)
    return loader, sampler


def time_training_loaders(root: Path, batch_size: int = 64, min_batches: int = 300) -> dict:
    """Batches per wall second of both training-loader paths (whole epochs, new order each
    epoch, after one warm-up epoch), measured in turn twice and the better kept of each."""
    rates: dict[str, float] = {}
    for path in ("per-item", "whole batches") * 2:
        loader, sampler = training_loader(root, path, batch_size)
        for _ in loader:  # warm-up epoch
            pass
        n, epoch, start = 0, 1, time.perf_counter()
        while n < min_batches:
            sampler.set_epoch(epoch)
            n += sum(1 for _ in loader)
            epoch += 1
        rates[path] = max(rates.get(path, 0.0), n / (time.perf_counter() - start))
    return {"batch_size": batch_size, "batches_per_s": rates}


def _torch_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------
# Report.


def write_report(out_dir: Path, results: dict) -> None:
    from benchmarks._report import environment

    env = environment()
    results = {"environment": env, **results}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "cpu_data.json", json.dumps(results, indent=1) + "\n")
    lines = ["# eegfast data pipeline on CPU", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## prepare: hours of EEG per minute", ""]
    lines += [
        f"Corpus: {results['corpus']['files']} recordings ({results['corpus']['hours']:.3f} h of "
        "EEG; copies of the bundled PhysioNet sample), 4-s windows. Median of "
        f"{results['repeats']} runs after a warm-up run. CPU s = user + system time of the "
        "process and its worker processes: it does not depend on other load on the machine, "
        "wall time does. Ratios = eegfast's rate / this row's (wall, CPU).",
        "",
        "| pipeline | worker processes | wall s | CPU s | h of EEG / min (wall) "
        "| h of EEG / CPU-min | ratio wall | ratio CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workers, res in results["prepare"].items():
        best = res["eegfast"]
        for name, r in res.items():
            lines.append(
                f"| {name} | {workers} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                f"{r['hours_per_minute']:.2f} | {r['hours_per_cpu_minute']:.2f} | "
                f"{best['hours_per_minute'] / r['hours_per_minute']:.2f}× | "
                f"{best['hours_per_cpu_minute'] / r['hours_per_cpu_minute']:.2f}× |"
            )
    lines += ["", "## Loader: samples/s, (32, 8, 200) float32 windows from the page cache", ""]
    lines += [
        "Shuffled batches of 256, whole epochs after a warm-up epoch; pin_memory off (no GPU). "
        "Wall: samples per second of elapsed time. CPU (0 workers only): samples per CPU "
        "second of the loading process, i.e. what one otherwise idle core delivers. "
        "Ratio = wall rate / the per-item DataLoader's with the same storage and workers.",
        "",
        "| storage | loader | samples/s (wall) | samples/CPU-s | ratio vs per-item (wall) |",
        "|---|---|---:|---:|---:|",
    ]
    for dtype, res in results["loader"].items():
        rates = res["rates"]
        for name, rate in rates.items():
            workers = name.split(", ")[1]
            base = rates[f"per-item, {workers}"]["wall"]
            cpu = f"{rate['cpu']:,.0f}" if workers.startswith("0") else "-"
            lines.append(
                f"| {dtype} | {name} | {rate['wall']:,.0f} | {cpu} | {rate['wall'] / base:.2f}× |"
            )
    lines += ["", "## Training loader: batches/s of `fit`'s loader, batches of 64", ""]
    lines += [
        "The loader the training commands get (EpochBatchSampler, data.num_workers=0, the same "
        "batches on both rows), over the shards above; better of two runs each. Ratio = rate "
        "/ the per-item path's.",
        "",
        "| storage | path | batches/s | ratio vs per-item |",
        "|---|---|---:|---:|",
    ]
    for dtype, res in results.get("training_loader", {}).items():
        rates = res["batches_per_s"]
        for name, rate in rates.items():
            lines.append(f"| {dtype} | {name} | {rate:,.1f} | {rate / rates['per-item']:.2f}× |")
    lines += ["", "Data: " + ATTRIBUTION, ""]
    write_text_atomic(out_dir / "cpu_data.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads while timing the loader (1: the process copies; the other core "
        "is left to the consumer)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eegfast-bench-data-") as tmp:
        work = Path(tmp)
        files = corpus(work / "corpus", args.copies)
        prep = {w: time_prepare(files, work, w, args.repeats) for w in (1, WORKERS)}
        torch_threads = _torch_threads(args.torch_threads)
        hours = prep[1]["eegfast"]["hours"]
        loader = {d: time_loaders(loader_dataset(work, d)) for d in ("float32", "float16")}
        training = {
            d: time_training_loaders(loader_dataset(work, d)) for d in ("float32", "float16")
        }
    results = {
        "corpus": {"files": len(files), "hours": hours},
        "repeats": args.repeats,
        "prepare": prep,
        "loader": loader,
        "training_loader": training,
        "loader_torch_threads": torch_threads,
    }
    write_report(args.out, results)
    print((args.out / "cpu_data.md").read_text())
    return 0


# --------------------------------------------------------------------------------------------
# pytest-benchmark view (fewer, shorter runs).


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-data")


@pytest.mark.parametrize("pipeline", ["eegfast", "reference recipe"])
def test_prepare(benchmark, work, pipeline):
    files = corpus(work / "corpus", 1)
    fn = eegfast_prepare if pipeline == "eegfast" else reference_recipe
    runs = iter(range(100))

    def run():
        out = work / f"{pipeline.replace(' ', '_')}-{next(runs)}"
        return fn(files, out, WORKERS)

    benchmark.group = "prepare: 6 sample recordings, 2 workers"
    hours = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(pipeline=pipeline, hours=hours)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_loader_batch(benchmark, work, dtype):
    from eegfast.data import ShardDataset

    ds = ShardDataset(loader_dataset(work, dtype))
    rng = np.random.default_rng(0)
    benchmark.group = "loader batch of 256: (32, 8, 200) windows"
    benchmark.extra_info.update(dtype=dtype, batch=256)
    benchmark(lambda: ds.get_batch(rng.choice(len(ds), 256, replace=False)))


@pytest.mark.parametrize("path", ["per-item", "whole batches"])
def test_training_loader(benchmark, work, path):
    loader, sampler = training_loader(loader_dataset(work, "float32"), path)
    epochs = iter(range(1, 10_000))

    def epoch():
        sampler.set_epoch(next(epochs))
        return sum(1 for _ in loader)

    benchmark.group = "training loader (fit): one epoch, batches of 64, (32, 8, 200) windows"
    batches = benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(path=path, batches=batches)


if __name__ == "__main__":
    raise SystemExit(main())
