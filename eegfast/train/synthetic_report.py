"""How good and how useful is synthetic EEG from the hybrid model? A measured report.

    python -m eegfast.train.synthetic_report --out DIR [--quick] [--data DIR] [--device cpu]

On the bundled real recordings (PhysioNet eegmat and eegmmidb, ODC-By 1.0), per task and per
cross-validation fold (folds from :func:`eegfast.train.metrics.group_folds`, grouped by subject
or run so no source is on both sides):

1. train a VQ-NSP tokenizer and a hybrid model (``λ·masked + (1 − λ)·forecast``, through the
   registered ``hybrid`` objective) on the fold's training windows only;
2. generate one synthetic window per training window: the real window is the prompt, the model
   continues it by as many patches (codes drawn with temperature/top-k, then the code-conditioned
   signal head); the synthetic window gets the prompt's label (for eegmmidb, whose cues last
   4.1 s, most of the time it continues into was rest: the report says so);
3. fine-tune a LaBraM classifier initialised from that hybrid checkpoint with and without the
   synthetic windows (same initialisation, seed, number of steps and batch size), and fit the
   band-power logistic-regression baseline with and without them; score the fold's test windows.

Quality of the synthetic windows (all folds pooled, against the real windows of the task):
Welch power spectra per electrode (PNG), band-power ratios synthetic/real (absolute and
relative power, delta..gamma), and a real-vs-synthetic classifier (logistic regression on log
band power, 5-fold cross-validated AUROC: 0.5 = indistinguishable, 1.0 = trivially told apart;
each real window in the same fold as the synthetic windows that continue it).

Outputs (written atomically): ``report.md``, ``results.json``, ``spectra_<task>.png``,
``band_ratios.png``. ``--quick`` uses few windows, 19 electrodes and few training steps so the
whole report runs in minutes on a CPU; its numbers show the pipeline works, not what a
properly trained model reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eegfast.progress import progress_bar
from eegfast.train.baseline import BANDS_HZ, band_power_features, fit_predict_band_power
from eegfast.train.metrics import classification_metrics, group_folds, mean_std

BAND_NAMES = ("delta", "theta", "alpha", "beta", "gamma")
SFREQ = 200.0
PATCH = 200
TEN_TWENTY = (
    "FP1", "FP2", "F7", "F3", "FZ", "F4", "F8", "T7", "C3", "CZ",
    "C4", "T8", "P7", "P3", "PZ", "P4", "P8", "O1", "O2",
)  # fmt: skip


@dataclass(frozen=True)
class ReportSettings:
    """Every knob of the report (the defaults are the full run; :meth:`quick` the CPU one)."""

    window_seconds: int = 4
    max_windows_per_recording: int | None = None
    eegmmidb_channels: tuple[str, ...] | None = None  # None = all 64
    batch_size: int = 16
    tokenizer_steps: int = 400
    hybrid_steps: int = 800
    finetune_steps: int = 300
    mask_weight: float = 0.5
    temperature: float = 1.0
    top_k: int | None = 32
    lr: float = 1e-3
    folds: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> ReportSettings:
        return cls(
            max_windows_per_recording=12,
            eegmmidb_channels=TEN_TWENTY,
            batch_size=8,
            tokenizer_steps=30,
            hybrid_steps=60,
            finetune_steps=30,
        )


@dataclass
class TaskData:
    """Windows of one task: x (N, C, A, 200) float32 (100 µV), labels (N,), groups (N,)."""

    name: str
    x: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    names: tuple[str, ...]
    class_names: tuple[str, ...]
    description: str
    # where the time a synthetic window continues into had another label in the recording than
    # the prompt's, which the window carries: what the report says beside the augmentation
    continuation_note: str = ""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _read(path: Path, notch: float, channels=None):
    from eegfast.data.preprocess import PreprocessConfig, preprocess_signal
    from eegfast.data.reading import map_channels, read_recording

    raw = read_recording(path)
    mapped = map_channels(raw.ch_names, raw.get_channel_types(), channels=channels)
    config = PreprocessConfig(notch_freq=notch, window_seconds=1)
    data = raw.get_data(picks=list(mapped.picks))
    return preprocess_signal(data, raw.info["sfreq"], config), mapped.names, raw.annotations


def _spread(starts: list[int], limit: int | None) -> list[int]:
    if limit is None or len(starts) <= limit:
        return starts
    keep = np.linspace(0, len(starts) - 1, limit).round().astype(int)
    return [starts[i] for i in keep]


def _windows(signal: np.ndarray, starts: list[int], seconds: int) -> np.ndarray:
    n = seconds * PATCH
    return np.stack([signal[:, s : s + n].reshape(signal.shape[0], seconds, PATCH) for s in starts])


def _cue_continuation_note(cue_seconds: float, window_seconds: int) -> str:
    """What the report says of synthetic windows that continue cue-locked windows
    ``[onset, onset + window_seconds)`` over ``[onset + window_seconds, onset + 2 ·
    window_seconds)``, past a cue of ``cue_seconds`` (rest follows it), or "" if they stay
    within the cue."""
    after = min(max(2 * window_seconds - max(window_seconds, cue_seconds), 0.0), window_seconds)
    if after <= 0:
        return ""
    return (
        f"eegmmidb cues last {cue_seconds:.1f} s and rest (T0) follows them, so "
        f"{after / window_seconds:.0%} of each synthetic window (the {window_seconds} s after a "
        f"{window_seconds}-s cue window) continues past the end of its cue, yet carries the "
        "cue's label: a generator that forecast the recording faithfully would add rest EEG "
        "labelled as imagery, which this result measures, not imagery windows from the model."
    )


def load_tasks(files: dict[str, Path], settings: ReportSettings) -> list[TaskData]:
    """eegmat rest vs mental arithmetic (groups: subjects); eegmmidb imagined left vs right fist
    (T1 vs T2 cues of runs 4 and 8 of subject S001; groups: runs)."""
    A = settings.window_seconds
    tasks = []
    xs, ys, gs, names = [], [], [], None
    for subject in ("Subject00", "Subject01"):
        for label, suffix in ((0, "_1"), (1, "_2")):
            signal, names, _ = _read(files[f"{subject}{suffix}.edf"], 50.0)
            starts = list(range(PATCH, signal.shape[1] - A * PATCH - PATCH + 1, A * PATCH))
            starts = _spread(starts, settings.max_windows_per_recording)
            xs.append(_windows(signal, starts, A))
            ys += [label] * len(starts)
            gs += [subject] * len(starts)
    tasks.append(
        TaskData(
            "eegmat", np.concatenate(xs), np.array(ys), np.array(gs), tuple(names),
            ("rest", "arithmetic"), "eegmat: rest vs mental arithmetic, 2 subjects",
        )
    )  # fmt: skip
    xs, ys, gs, cues = [], [], [], []
    for run in ("S001R04", "S001R08"):
        signal, names, annotations = _read(files[f"{run}.edf"], 60.0, settings.eegmmidb_channels)
        starts, labels, durations = [], [], []
        for onset, duration, description in zip(
            annotations.onset, annotations.duration, annotations.description, strict=True
        ):
            start = int(round(onset * SFREQ))
            if description in ("T1", "T2") and start + A * PATCH <= signal.shape[1]:
                starts.append(start)
                labels.append(0 if description == "T1" else 1)
                durations.append(float(duration))
        chosen = _spread(list(range(len(starts))), settings.max_windows_per_recording)
        xs.append(_windows(signal, [starts[i] for i in chosen], A))
        ys += [labels[i] for i in chosen]
        gs += [run] * len(chosen)
        cues += [durations[i] for i in chosen]
    tasks.append(
        TaskData(
            "eegmmidb", np.concatenate(xs), np.array(ys), np.array(gs), tuple(names),
            ("left fist", "right fist"), "eegmmidb: imagined left vs right fist, S001 runs 4+8",
            continuation_note=_cue_continuation_note(min(cues), A),
        )
    )  # fmt: skip
    return tasks


# --------------------------------------------------------------------------------------------
# Training pieces (plain loops: a handful of steps on tiny models)
# --------------------------------------------------------------------------------------------


def _batches(n: int, steps: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch_size, n),), generator=g)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98)):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)


def train_tokenizer(x: torch.Tensor, chans: torch.Tensor, settings: ReportSettings, seed: int):
    from eegfast.models import create_model

    torch.manual_seed(seed)
    tokenizer = create_model("vqnsp_tiny", device=x.device)
    opt = _optimizer(tokenizer, settings.lr, 1e-4, (0.9, 0.99))
    losses = []
    for idx in _batches(len(x), settings.tokenizer_steps, settings.batch_size, seed):
        out = tokenizer(x[idx], chans)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return tokenizer.eval().requires_grad_(False), losses


def train_hybrid(x, chans, tokenizer, settings: ReportSettings, seed: int):
    from eegfast.train.hybrid import create_hybrid_pretrain_model
    from eegfast.train.objectives import StepContext, get_objective

    torch.manual_seed(seed)
    model = create_hybrid_pretrain_model(
        "labram_tiny_pretrain", hybrid={"mask_weight": settings.mask_weight}, device=x.device
    )
    step = get_objective("hybrid")
    opt = _optimizer(model, settings.lr, 0.05)
    ctx = StepContext(device=x.device, seed=seed, tokenizer=tokenizer)
    history: list[dict[str, float]] = []
    for i, idx in enumerate(_batches(len(x), settings.hybrid_steps, settings.batch_size, seed)):
        # the masks are seeded by (seed, epoch, window), and windows are drawn with
        # replacement: a new "epoch" each step, or a window kept one mask for the whole run
        ctx.step = ctx.epoch = i
        out = step(model, {"x": x[idx], "input_chans": chans, "index": idx}, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        metrics = {k: float(v) for k, v in out.metrics.items()}
        history.append({"loss": float(out.loss.detach()), **metrics})
    return model.eval(), history


def synthesize(model, x: torch.Tensor, chans: torch.Tensor, settings: ReportSettings, seed: int):
    """One synthetic window per real window x (N, C, A, 200): the real window is the prompt,
    and the model continues it by A patches -> (N, C, A, 200).

    The model was trained on A-patch windows only: rows A and later of its time embedding never
    had a gradient. The context therefore slides over the last A patches (each step re-encodes
    them at time rows 0..A-1) instead of growing into those untrained rows.
    """
    from eegfast.models.hybrid import generate

    g = torch.Generator(device=x.device).manual_seed(seed)
    A, out = x.shape[2], []
    for chunk in torch.split(x, 32):
        out.append(
            generate(
                model, chunk, chans, A, temperature=settings.temperature, top_k=settings.top_k,
                generator=g, max_context=A, keep=A,
            )
        )  # fmt: skip
    return torch.cat(out)


def finetune_and_predict(
    init_state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    test_x: torch.Tensor,
    chans: torch.Tensor,
    num_classes: int,
    settings: ReportSettings,
    seed: int,
) -> np.ndarray:
    """LaBraM-tiny classifier from the hybrid checkpoint (backbone keys), fine-tuned on (x, y);
    returns test probabilities (N_test, num_classes)."""
    from eegfast.models import create_model
    from eegfast.models.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    model = create_model("labram_tiny", n_outputs=num_classes, device=x.device)
    load_checkpoint(model, init_state)
    opt = _optimizer(model, settings.lr * 0.5, 0.05)
    model.train()
    for idx in _batches(len(x), settings.finetune_steps, settings.batch_size, seed + 1):
        loss = torch.nn.functional.cross_entropy(model(x[idx], chans), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(chunk, chans) for chunk in torch.split(test_x, 64)])
    return logits.softmax(-1).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Quality measures
# --------------------------------------------------------------------------------------------


def welch_psd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows (N, C, A, 200) -> freqs (F,), PSD (N, C, F) (Welch, 1-s Hann segments)."""
    from scipy.signal import welch

    signal = np.asarray(x, dtype=np.float64).reshape(x.shape[0], x.shape[1], -1)
    return welch(signal, fs=SFREQ, nperseg=PATCH, axis=-1)


def band_powers(freqs: np.ndarray, psd: np.ndarray) -> np.ndarray:
    """(N, C, F) PSD -> (N, C, 5) mean power per band (BANDS_HZ)."""
    return np.stack([psd[..., (freqs >= lo) & (freqs < hi)].mean(-1) for lo, hi in BANDS_HZ], -1)


def band_power_ratios(real: np.ndarray, synthetic: np.ndarray) -> dict[str, dict[str, float]]:
    """Synthetic/real ratios of mean band power (median over electrodes): absolute power and
    relative power (share of the 1-45 Hz total, which ignores an overall gain error)."""
    freqs, p_real = welch_psd(real)
    _, p_syn = welch_psd(synthetic)
    b_real, b_syn = band_powers(freqs, p_real), band_powers(freqs, p_syn)
    # Shares of the total need each band's power (mean density x width), not its mean density:
    # the bands are 3 to 17 Hz wide.
    bins = np.array([((freqs >= lo) & (freqs < hi)).sum() for lo, hi in BANDS_HZ])
    rel_real = b_real * bins / (b_real * bins).sum(-1, keepdims=True)
    rel_syn = b_syn * bins / (b_syn * bins).sum(-1, keepdims=True)
    absolute = np.median(b_syn.mean(0) / b_real.mean(0), axis=0)  # (5,)
    relative = np.median(rel_syn.mean(0) / rel_real.mean(0), axis=0)
    return {
        "absolute": dict(zip(BAND_NAMES, absolute.tolist(), strict=True)),
        "relative": dict(zip(BAND_NAMES, relative.tolist(), strict=True)),
    }


def real_vs_synthetic_auroc(
    real: np.ndarray,
    synthetic: np.ndarray,
    seed: int = 0,
    *,
    prompts: np.ndarray | None = None,
) -> tuple[float, float]:
    """5-fold CV AUROC of logistic regression on log band power telling real from synthetic.

    real (N, C, A, 200), synthetic (M, C, A, 200). ``prompts`` (M,): the index in ``real`` of
    each synthetic window's prompt. A real window and its continuations then fall in the same
    fold: tested on a real window whose own continuation (alike, labelled synthetic) it was
    fitted on, the classifier called it synthetic, which pulled the AUROC down (a generator
    that copies its prompt scored ~0.07 instead of 0.5). Without ``prompts`` every window is
    taken as independent. Returns (mean, std) over the folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_real, n_syn = len(real), len(synthetic)
    if prompts is None:
        groups = np.arange(n_real + n_syn)
    else:
        prompts = np.asarray(prompts)
        if prompts.shape != (n_syn,) or not np.isin(prompts, np.arange(n_real)).all():
            raise ValueError(
                f"prompts must hold one index into real (0..{n_real - 1}) per synthetic window "
                f"({n_syn}), got shape {prompts.shape}"
            )
        groups = np.r_[np.arange(n_real), prompts]
    features = np.stack([band_power_features(w) for w in np.concatenate((real, synthetic))])
    labels = np.r_[np.zeros(n_real), np.ones(n_syn)]
    folds = min(5, n_real, n_syn)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, features, labels, groups=groups, cv=cv, scoring="roc_auc")
    return float(scores.mean()), float(scores.std())


def _save_png(fig, path: Path) -> None:
    from eegfast.fileio import write_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def plot_spectra(task: TaskData, synthetic: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freqs, p_real = welch_psd(task.x)
    _, p_syn = welch_psd(synthetic)
    C = len(task.names)
    cols = 5
    rows = math.ceil(C / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), sharex=True)
    for c, ax in enumerate(np.ravel(axes)):
        if c >= C:
            ax.axis("off")
            continue
        keep = (freqs >= 0.5) & (freqs <= 80)
        # PSD of signals in 100 µV units -> µV²/Hz: x 1e4
        ax.semilogy(freqs[keep], 1e4 * p_real[:, c, keep].mean(0), label="real", lw=1.2)
        ax.semilogy(freqs[keep], 1e4 * p_syn[:, c, keep].mean(0), label="synthetic", lw=1.2)
        ax.set_title(task.names[c], fontsize=9)
        ax.tick_params(labelsize=7)
    np.ravel(axes)[0].legend(fontsize=7)
    fig.supxlabel("Hz")
    fig.supylabel("PSD (µV²/Hz)")
    fig.suptitle(f"{task.description}: Welch PSD per electrode, mean over windows", fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def plot_band_ratios(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=False)
    width = 0.8 / max(len(tasks), 1)
    for ax, kind in zip(axes, ("absolute", "relative"), strict=True):
        for i, name in enumerate(tasks):
            ratios = results["tasks"][name]["quality"]["band_ratio"][kind]
            ax.bar(np.arange(5) + i * width, [ratios[b] for b in BAND_NAMES], width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(5) + width * (len(tasks) - 1) / 2, BAND_NAMES)
        ax.set_yscale("log")
        ax.set_title(f"{kind} band power, synthetic / real")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

ARMS = ("labram_real", "labram_real+synthetic", "bandpower_real", "bandpower_real+synthetic")


def run_task(task: TaskData, settings: ReportSettings, device: torch.device, bar) -> dict:
    from eegfast.electrodes import labram_input_chans

    chans = torch.tensor(labram_input_chans(task.names), device=device)
    x_all = torch.from_numpy(task.x).to(device)
    y_all = torch.from_numpy(task.labels).long().to(device)
    num_classes = len(task.class_names)
    folds = group_folds(task.labels, task.groups, settings.folds, seed=settings.seed)
    per_fold, synthetic_all, prompts_all, training = [], [], [], []
    correct: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    for f, (train, test) in enumerate(folds):
        seed = settings.seed + 1000 * f
        started = time.perf_counter()
        x_tr, y_tr = x_all[train], y_all[train]
        tokenizer, tok_losses = train_tokenizer(x_tr, chans, settings, seed)
        with torch.no_grad():
            codes = torch.cat(
                [tokenizer.get_codebook_indices(c, chans) for c in torch.split(x_tr, 32)]
            )
        bar.update(1)
        model, history = train_hybrid(x_tr, chans, tokenizer, settings, seed)
        bar.update(1)
        gen_start = time.perf_counter()
        x_syn = synthesize(model, x_tr, chans, settings, seed)
        gen_seconds = time.perf_counter() - gen_start
        bar.update(1)
        synthetic_all.append(x_syn.cpu().numpy())
        prompts_all.append(train)  # x_syn[i] continues task.x[train[i]]
        state = {k: v.detach() for k, v in model.state_dict().items()}
        x_aug = torch.cat((x_tr, x_syn))
        y_aug = torch.cat((y_tr, y_tr))
        scores = {}
        for arm, (xs, ys) in (
            ("labram_real", (x_tr, y_tr)),
            ("labram_real+synthetic", (x_aug, y_aug)),
        ):
            probs = finetune_and_predict(
                state, xs, ys, x_all[test], chans, num_classes, settings, seed
            )
            scores[arm] = classification_metrics(task.labels[test], probs, num_classes)
            correct[arm].append(probs.argmax(1) == task.labels[test])
        bar.update(1)
        feats = np.stack([band_power_features(w) for w in task.x])
        syn_feats = np.stack([band_power_features(w) for w in x_syn.cpu().numpy()])
        for arm, (fx, fy) in (
            ("bandpower_real", (feats[train], task.labels[train])),
            (
                "bandpower_real+synthetic",
                (
                    np.concatenate((feats[train], syn_feats)),
                    np.r_[task.labels[train], task.labels[train]],
                ),
            ),
        ):
            probs = fit_predict_band_power(fx, fy, feats[test], num_classes, seed=settings.seed)
            scores[arm] = classification_metrics(task.labels[test], probs, num_classes)
            correct[arm].append(probs.argmax(1) == task.labels[test])
        per_fold.append(
            {
                "fold": f,
                "train_groups": sorted(set(task.groups[train].tolist())),
                "test_groups": sorted(set(task.groups[test].tolist())),
                "n_train": len(train),
                "n_test": len(test),
                "scores": scores,
                "generation_patches_per_s": float(x_syn.shape[0] * x_syn.shape[2] / gen_seconds),
                "seconds": time.perf_counter() - started,
            }
        )
        training.append(
            {
                "tokenizer_loss_first_last": [tok_losses[0], tok_losses[-1]],
                "codes_used": int(codes.unique().numel()),
                "codebook_size": int(tokenizer.config.num_codes),
                "hybrid_first": history[0],
                "hybrid_last": _mean_last(history, 10),
            }
        )
    synthetic = np.concatenate(synthetic_all)
    auroc = real_vs_synthetic_auroc(
        task.x, synthetic, seed=settings.seed, prompts=np.concatenate(prompts_all)
    )
    summary = {}
    for arm in ARMS:
        metrics = per_fold[0]["scores"][arm].keys()
        summary[arm] = {m: mean_std([fold["scores"][arm][m] for fold in per_fold]) for m in metrics}
    paired = {
        model: mcnemar(
            np.concatenate(correct[f"{model}_real"]),
            np.concatenate(correct[f"{model}_real+synthetic"]),
        )
        for model in ("labram", "bandpower")
    }
    return {
        "description": task.description,
        "paired_test": paired,
        "n_windows": int(len(task.x)),
        "electrodes": list(task.names),
        "classes": list(task.class_names),
        "continuation_note": task.continuation_note,
        "class_counts": np.bincount(task.labels, minlength=num_classes).tolist(),
        "folds": per_fold,
        "training": training,
        "summary": summary,
        "quality": {
            "real_vs_synthetic_auroc": auroc,
            "band_ratio": band_power_ratios(task.x, synthetic),
            "rms_uv": {
                "real": float(np.sqrt((task.x.astype(np.float64) ** 2).mean()) * 100),
                "synthetic": float(np.sqrt((synthetic.astype(np.float64) ** 2).mean()) * 100),
            },
        },
        "_synthetic": synthetic,
    }


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of two classifiers on the same test windows (two-sided p-value):
    b = only A right, c = only B right; under "no difference" c ~ Binomial(b + c, 1/2)."""
    from scipy.stats import binomtest

    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    p = binomtest(c, b + c, 0.5).pvalue if b + c else 1.0
    return {"only_without": b, "only_with": c, "n": int(len(correct_a)), "p_value": float(p)}


def _augmentation_verdict(test: dict[str, float], delta: float, sources: int) -> str:
    """The verdict on the synthetic windows from McNemar's test (``test``, :func:`mcnemar`),
    the balanced-accuracy change ``delta`` and the number of subjects/runs tested.

    McNemar's test compares how many windows each arm gets right (accuracy, not balanced
    accuracy): its direction is that of the discordant counts, and where balanced accuracy
    moved the other way (more windows of the common class right, fewer of the rare one) there
    is no consistent gain or loss. Windows of one recording are correlated, so with fewer
    than ``MIN_VERDICT_UNITS`` subjects/runs tested no p-value over windows is a verdict."""
    from eegfast.train.finetune import MIN_VERDICT_UNITS

    if sources < MIN_VERDICT_UNITS:
        return (
            f"no verdict (the test windows come from {sources} subjects/runs; a verdict needs "
            f"{MIN_VERDICT_UNITS}, since the p-value treats correlated windows as independent)"
        )
    if test["p_value"] >= 0.05:
        return "no significant difference"
    more_right = test["only_with"] > test["only_without"]
    if delta == 0 or (delta > 0) != more_right:
        return (
            "no consistent difference (McNemar counts windows right, and balanced accuracy "
            "moved the other way)"
        )
    return "a significant gain" if more_right else "a significant loss"


def _mean_last(history: list[dict[str, float]], n: int) -> dict[str, float]:
    tail = history[-n:]
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in tail[-1]}


def _fmt(pair) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Synthetic EEG from the hybrid model: quality and usefulness",
        "",
        f"Settings: {'quick (CPU smoke run)' if results['quick'] else 'full'}; "
        + ", ".join(f"{k}={v}" for k, v in s.items() if k != "eegmmidb_channels")
        + f"; device {results['device']}; total {results['seconds']:.0f} s.",
        "",
        "Data: PhysioNet eegmat and eegmmidb (ODC-By 1.0; attribution in the data folder's "
        "README). Windows of "
        f"{s['window_seconds']} s. The generator, tokenizer and classifiers of each fold are "
        "trained on that fold's training windows only.",
        "",
        "## Quality of the synthetic windows",
        "",
        "| task | windows | RMS real / synthetic (µV) | real-vs-synthetic AUROC | "
        "abs. band ratio δ θ α β γ | rel. band ratio δ θ α β γ |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, t in results["tasks"].items():
        q = t["quality"]
        ratios = q["band_ratio"]
        lines.append(
            f"| {name} | {t['n_windows']} | {q['rms_uv']['real']:.1f} / "
            f"{q['rms_uv']['synthetic']:.1f} | {_fmt(q['real_vs_synthetic_auroc'])} | "
            + " ".join(f"{ratios['absolute'][b]:.2f}" for b in BAND_NAMES)
            + " | "
            + " ".join(f"{ratios['relative'][b]:.2f}" for b in BAND_NAMES)
            + " |"
        )
    lines += [
        "",
        "AUROC (logistic regression on log band power, 5-fold cross-validated, each real "
        "window in the same fold as its continuations): 0.5 means the classifier cannot tell "
        "synthetic from real windows; 1.0 means it always can. Ratios are synthetic/real mean "
        "band power, median over electrodes (1.0 = same). Spectra: `spectra_<task>.png`; "
        "ratios: `band_ratios.png`.",
        "",
        "## Augmentation: fine-tuning with and without synthetic windows (same folds)",
        "",
        "Each synthetic window continues a real training window and carries its label.",
    ]
    for t in results["tasks"].values():
        if t.get("continuation_note"):
            lines.append(f"Note: {t['continuation_note']}")
    lines += [
        "",
        "| task | model | training data | balanced accuracy | AUROC |",
        "|---|---|---|---:|---:|",
    ]
    for name, t in results["tasks"].items():
        for arm in ARMS:
            model, data = arm.split("_", 1)
            row = t["summary"][arm]
            model = (
                "LaBraM-tiny (from the hybrid checkpoint)"
                if model == "labram"
                else ("band power + logistic regression")
            )
            lines.append(
                f"| {name} | {model} | {data} | {_fmt(row['balanced_accuracy'])} | "
                f"{_fmt(row.get('auroc', (math.nan, math.nan)))} |"
            )
    lines += ["", "Mean ± standard deviation over folds. Per fold:", ""]
    for name, t in results["tasks"].items():
        for fold in t["folds"]:
            parts = ", ".join(
                f"{arm} {fold['scores'][arm]['balanced_accuracy']:.3f}" for arm in ARMS
            )
            lines.append(
                f"- {name} fold {fold['fold']} (train {fold['train_groups']}, test "
                f"{fold['test_groups']}, {fold['n_train']}/{fold['n_test']} windows): "
                f"balanced accuracy {parts}; generation "
                f"{fold['generation_patches_per_s']:.0f} patches/s"
            )
    lines += ["", "## Training (per fold)", ""]
    for name, t in results["tasks"].items():
        for f, tr in enumerate(t["training"]):
            last = tr["hybrid_last"]
            lines.append(
                f"- {name} fold {f}: tokenizer uses {tr['codes_used']} of {tr['codebook_size']} "
                f"codes on the training windows; hybrid loss {tr['hybrid_first']['loss']:.3f} -> "
                f"{last['loss']:.3f} (masked {last['masked_loss']:.3f}, forecast codes "
                f"{last.get('ar_token_loss', math.nan):.3f}, forecast signal MSE "
                f"{last.get('ar_signal_loss', math.nan):.4f} (100 µV)²; mean of the last 10 steps)"
            )
    lines += [
        "",
        "A tokenizer that uses very few codes makes the code targets (masked and forecast) "
        "trivial; the signal head then carries the generation.",
    ]
    lines += ["", "## Verdict", ""]
    for name, t in results["tasks"].items():
        # windows of one subject/run are correlated: McNemar's p, which counts windows as
        # independent, is only read as a verdict with as many tested sources as the
        # fine-tuning report's verdicts need
        sources = sorted({g for fold in t["folds"] for g in fold["test_groups"]})
        for model in ("labram", "bandpower"):
            base = t["summary"][f"{model}_real"]["balanced_accuracy"]
            aug = t["summary"][f"{model}_real+synthetic"]["balanced_accuracy"]
            delta = aug[0] - base[0]
            test = t["paired_test"][model]
            verdict = _augmentation_verdict(test, delta, len(sources))
            lines.append(
                f"- {name}, {model}: synthetic windows changed balanced accuracy by "
                f"{delta:+.3f} ({base[0]:.3f} -> {aug[0]:.3f}); on the {test['n']} pooled test "
                f"windows {test['only_with']} became right and {test['only_without']} wrong "
                f"(exact McNemar p = {test['p_value']:.3g}): {verdict}."
            )
    lines += [
        "",
        "With two folds and tens of windows per task these estimates are coarse; the quick "
        "settings train each model for a few dozen steps, so they test the pipeline, not the "
        "method's ceiling.",
        "",
    ]
    return "\n".join(lines)


def run_report(
    out: str | Path,
    settings: ReportSettings,
    *,
    data: str | Path | None = None,
    device: str = "cpu",
    quick: bool = False,
    tasks: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Run everything and write the report into ``out``; returns the results dict."""
    from eegfast.datasets import sample
    from eegfast.fileio import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch_device = torch.device(device)
    files = {p.name: p for p in sample(data)}
    all_tasks = load_tasks(files, settings)
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.name for t in all_tasks})
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; available: eegmat, eegmmidb")
        all_tasks = [t for t in all_tasks if t.name in tasks]
    results: dict[str, Any] = {
        "settings": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(settings).items()
        },
        "quick": quick,
        "device": str(torch_device),
        "torch_threads": torch.get_num_threads(),
        "tasks": {},
    }
    steps = sum(min(settings.folds, len(set(t.groups.tolist()))) * 4 for t in all_tasks)
    with progress_bar(total=steps, desc="synthetic report", unit="stage") as bar:
        for task in all_tasks:
            result = run_task(task, settings, torch_device, bar)
            plot_spectra(task, result.pop("_synthetic"), out / f"spectra_{task.name}.png")
            results["tasks"][task.name] = result
    results["seconds"] = time.perf_counter() - started
    plot_band_ratios(results, out / "band_ratios.png")
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "report.md", markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eegfast.train.synthetic_report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="folder for report.md, PNGs, results.json")
    parser.add_argument("--quick", action="store_true", help="small CPU run (a few minutes)")
    parser.add_argument("--data", default=None, help="folder with the six sample recordings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=None, help="eegmat and/or eegmmidb")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ReportSettings.quick() if args.quick else ReportSettings()
    settings = dataclasses.replace(settings, seed=args.seed)
    run_report(
        args.out, settings, data=args.data, device=args.device, quick=args.quick,
        tasks=tuple(args.tasks) if args.tasks else None,
    )  # fmt: skip
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
