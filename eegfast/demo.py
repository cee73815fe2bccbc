"""End-to-end demo of the VQ ops on real EEG: ``python -m eegfast.demo [--data DIR] [--out DIR]``.

1. Prints which eegfast backends are usable here.
2. Reads the bundled EDF recordings (PhysioNet eegmmidb and eegmat, ODC-By 1.0; attribution in
   the data folder's README.md) and preprocesses them as LaBraM does: EEG channels only,
   0.1-75 Hz band-pass, mains notch, resampling to 200 Hz, units of 100 µV, 1-second patches
   of 200 samples per channel.
3. Turns every patch into a D=32 feature: the log amplitude spectrum (rfft, 101 bins of 1 Hz)
   averaged over 32 contiguous frequency bands, standardised per band (a fixed, training-free
   feature, so the demo exercises the VQ ops alone; the VQ-NSP tokenizer, trained by
   ``eegfast tokenizer``, learns its features).
4. Fits a K=512 cosine codebook with ``vq_kmeans``, looks up every patch with the C++ ``cpu``
   backend and checks the indices equal ``vq_nearest_reference`` (float64), runs EMA updates in
   mini-batches, and prints per-file codebook usage and perplexity and the lookup timings.
5. Writes a summary JSON (``demo_summary.json``) into ``--out``.

Data folder: ``--data``, else the ``EEGFAST_DATA`` environment variable, else the sample
recordings' folder as :func:`eegfast.datasets.sample` finds it (its cache, ``../shared/data``
beside the repository root, else downloaded), as ``eegfast quickstart`` uses.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eegfast.fileio import write_json_atomic
from eegfast.nn.vq import code_perplexity
from eegfast.ops import (
    available_backends,
    vq_ema_update,
    vq_kmeans,
    vq_nearest,
    vq_nearest_reference,
)
from eegfast.progress import progress_bar

REPO_ROOT = Path(__file__).resolve().parents[1]
SFREQ = 200.0  # LaBraM's sampling rate: one patch = 1 s = 200 samples
PATCH = 200
UNITS_PER_VOLT = 1e4  # MNE gives volts; LaBraM wants units of 100 µV: V * 1e6 / 100
BAND_HZ = (0.1, 75.0)
NUM_BANDS = 32  # feature dim D
NUM_CODES = 512  # codebook size K
KMEANS_PATCHES = 8192  # patches the codebook is fitted on
EMA_BATCH = 2048
EMA_STEPS = 8
LICENSE_NOTE = (
    "EEG data: PhysioNet EEG Motor Movement/Imagery (eegmmidb) and EEG During Mental Arithmetic "
    "Tasks (eegmat), ODC-By 1.0; attribution and citations in {readme}"
)


def license_note(data_dir: Path) -> str:
    """The data's ODC-By attribution: a pointer to ``data_dir``'s README.md where there is one
    (the bundled folder's), else the attribution itself (a cache or ``EEGFAST_DATA`` folder
    holds no README.md, and a pointer to a missing file attributes nothing)."""
    from eegfast.datasets import ATTRIBUTION

    readme = data_dir / "README.md"
    return LICENSE_NOTE.format(readme=readme) if readme.is_file() else ATTRIBUTION


def default_data_dir() -> Path:
    """``EEGFAST_DATA`` if set (any folder of EDF files), else the folder of the sample
    recordings as :func:`eegfast.datasets.sample` finds or downloads them (SampleDataError when
    it cannot)."""
    env = os.environ.get("EEGFAST_DATA")
    if env:
        return Path(env)
    from eegfast.datasets import sample

    return sample()[0].parent


def mains_hz(path: Path) -> float:
    """Power-line frequency of a recording: 60 Hz for eegmmidb (``S###R##.edf``, recorded in
    the USA), else 50 Hz (eegmat was recorded in Ukraine)."""
    return 60.0 if re.fullmatch(r"S\d{3}R\d{2}", path.stem) else 50.0


@dataclass
class Recording:
    name: str
    sfreq_in: float
    notch_hz: float | None
    patches: torch.Tensor  # (C, A, 200) float32, units of 100 µV


def load_recording(path: Path) -> Recording:
    """EEG channels of one EDF file, filtered, at 200 Hz, cut into (C, A, 200) patches."""
    import mne

    raw = mne.io.read_raw_edf(path, preload=True, verbose="error")
    # eegmat files type every channel as EEG: the ECG and the ear-difference channel are not.
    if "ECG ECG" in raw.ch_names:
        raw.set_channel_types({"ECG ECG": "ecg"}, verbose="error")
    if "EEG A2-A1" in raw.ch_names:
        raw.drop_channels(["EEG A2-A1"])
    raw.pick("eeg")
    sfreq_in = raw.info["sfreq"]
    nyquist = sfreq_in / 2
    raw.filter(BAND_HZ[0], min(BAND_HZ[1], nyquist - 1.0), verbose="error")
    notch = mains_hz(path)
    if notch < nyquist - 1.0:
        raw.notch_filter(notch, verbose="error")
    else:
        notch = None
    raw.resample(SFREQ, verbose="error")
    data = torch.from_numpy(raw.get_data() * UNITS_PER_VOLT).float()  # (C, T)
    count = data.shape[1] // PATCH
    patches = data[:, : count * PATCH].reshape(data.shape[0], count, PATCH)
    return Recording(path.name, sfreq_in, notch, patches)


def band_features(patches: torch.Tensor) -> torch.Tensor:
    """(..., 200) patches -> (..., 32) log amplitude in 32 frequency bands.

    rfft of 200 samples at 200 Hz gives 101 bins of 1 Hz (0-100 Hz). ``torch.tensor_split``
    cuts them into 32 contiguous bands of 3 or 4 bins; each feature is the mean of the log
    amplitudes in its band.
    """
    log_amp = torch.fft.rfft(patches, dim=-1).abs().clamp_min(1e-8).log()
    bands = torch.tensor_split(log_amp, NUM_BANDS, dim=-1)
    return torch.stack([band.mean(-1) for band in bands], dim=-1)


def code_usage(indices: torch.Tensor) -> dict[str, float]:
    """Codes used, their fraction of the codebook, and perplexity (exp of the code entropy)."""
    counts = torch.bincount(indices, minlength=NUM_CODES).double()
    return {
        "codes_used": int((counts > 0).sum()),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(code_perplexity(counts)),
    }


def reference_mismatches(features: torch.Tensor, codebook: torch.Tensor) -> int:
    """Rows where the C++ ``cpu`` lookup differs from the float64 reference."""
    indices = vq_nearest(features, codebook, backend="cpu")
    expected, _ = vq_nearest_reference(features, codebook)
    return int((indices != expected).sum())


def median_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def backends_table() -> str:
    rows = [("backend", "available", "detail"), ("-------", "---------", "------")]
    rows += [
        (name, "yes" if status.available else "no", status.reason)
        for name, status in available_backends().items()
    ]
    return "\n".join(f"{a:9s} {b:9s} {c}" for a, b, c in rows)


def find_edf_files(data_dir: Path) -> list[Path] | str:
    """The EDF files in ``data_dir``, or an error message naming the folder."""
    how = "Pass --data DIR or set EEGFAST_DATA=DIR to a folder of EDF files."
    if not data_dir.is_dir():
        return f"EEG data folder not found: {data_dir}. {how}"
    files = sorted(p for p in data_dir.iterdir() if p.suffix.lower() == ".edf")
    if not files:
        return f"No EDF files (*.edf) in the EEG data folder {data_dir}. {how}"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eegfast.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None, help="folder of EDF files")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print("eegfast backends:")
    print(backends_table())
    print()

    from eegfast.datasets import SampleDataError

    try:
        data_dir = args.data if args.data is not None else default_data_dir()
    except SampleDataError as err:  # not found and not downloadable: one line, status 2
        print(f"python -m eegfast.demo: {err}", file=sys.stderr)
        return 2
    files = find_edf_files(data_dir)
    if isinstance(files, str):
        print(files, file=sys.stderr)
        return 2
    print(license_note(data_dir))

    start = time.perf_counter()
    recordings = [load_recording(path) for path in files]
    features = [band_features(r.patches).reshape(-1, NUM_BANDS) for r in recordings]
    all_features = torch.cat(features)
    mean, std = all_features.mean(0), all_features.std(0).clamp_min(1e-6)
    all_features = (all_features - mean) / std
    print(
        f"read {len(files)} files from {data_dir} in {time.perf_counter() - start:.1f} s: "
        f"{all_features.shape[0]} patches, features (N, D) = {tuple(all_features.shape)}"
    )

    generator = torch.Generator().manual_seed(args.seed)
    fit_rows = torch.randperm(all_features.shape[0], generator=generator)[:KMEANS_PATCHES]
    codebook = vq_kmeans(
        all_features[fit_rows],
        NUM_CODES,
        iters=10,
        metric="cosine",
        generator=generator,
        backend="cpu",
    )

    # Exactness and speed of the C++ lookup against the float64 reference.
    mismatches = {"kmeans_codebook": reference_mismatches(all_features, codebook)}
    cpu_ms = median_ms(lambda: vq_nearest(all_features, codebook, backend="cpu"))
    reference_ms = median_ms(lambda: vq_nearest_reference(all_features, codebook))

    # EMA codebook updates in mini-batches, started from the k-means fit.
    counts = torch.bincount(
        vq_nearest(all_features[fit_rows], codebook, backend="cpu"), minlength=NUM_CODES
    ).float()
    cluster_size, embed_sum = counts, codebook * counts[:, None]
    order = torch.randperm(all_features.shape[0], generator=generator)
    batches = order[: EMA_STEPS * EMA_BATCH].split(EMA_BATCH)
    for batch in progress_bar(iterable=batches, desc="EMA updates", unit="batch"):
        z = all_features[batch]
        vq_ema_update(
            z,
            vq_nearest(z, codebook, backend="cpu"),
            codebook,
            cluster_size,
            embed_sum,
            backend="cpu",
        )

    mismatches["ema_codebook"] = reference_mismatches(all_features, codebook)
    final = vq_nearest(all_features, codebook, backend="cpu")

    per_file = []
    print(f"\n{'file':18s} {'ch':>3s} {'patches':>8s} {'codes used':>11s} {'perplexity':>10s}")
    for recording, file_codes in zip(
        recordings, final.split([f.shape[0] for f in features]), strict=True
    ):
        channels, seconds, _ = recording.patches.shape
        usage = code_usage(file_codes)
        per_file.append(
            {
                "file": recording.name,
                "channels": channels,
                "seconds": seconds,
                "patches": channels * seconds,
                "sfreq_in": recording.sfreq_in,
                "notch_hz": recording.notch_hz,
                **usage,
            }
        )
        print(
            f"{recording.name:18s} {channels:3d} {channels * seconds:8d} "
            f"{usage['codes_used']:5d} / {NUM_CODES} {usage['perplexity']:10.1f}"
        )
    overall = code_usage(final)
    print(
        f"{'all':18s} {'':3s} {final.shape[0]:8d} {overall['codes_used']:5d} / {NUM_CODES} "
        f"{overall['perplexity']:10.1f}"
    )

    matched = not any(mismatches.values())
    print(
        f"\nlookup of {final.shape[0]} patches against K={NUM_CODES}: cpu backend {cpu_ms:.2f} ms, "
        f"float64 reference {reference_ms:.2f} ms ({reference_ms / cpu_ms:.1f}x); indices "
        + ("equal the reference" if matched else f"DIFFER from the reference: {mismatches}")
    )

    summary = {
        "data_dir": str(data_dir),
        "data_license": license_note(data_dir),
        "num_files": len(files),
        "num_patches": int(final.shape[0]),
        "num_codes": NUM_CODES,
        "dim": NUM_BANDS,
        "kmeans_patches": int(fit_rows.numel()),
        "ema_steps": len(batches),
        "ema_batch": EMA_BATCH,
        "lookup_matches_reference": matched,
        "lookup_mismatches": mismatches,  # rows != reference, per codebook checked
        "timing_ms": {"cpu": cpu_ms, "reference": reference_ms},
        "overall": overall,
        "files": per_file,
        "backends": {name: asdict(status) for name, status in available_backends().items()},
        "seconds": time.perf_counter() - start,
    }
    out_path = args.out / "demo_summary.json"
    write_json_atomic(out_path, summary)
    print(f"wrote {out_path}")
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
