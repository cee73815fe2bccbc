"""PNG plots for run reports (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# numpy is imported where a plot is drawn: `eegfast <command> --help` reads REPORT_PLOTS
# (through eegfast.train.commands.common) without loading it
if TYPE_CHECKING:
    import numpy as np

# Every plot a fine-tuning or evaluation report may show (eegfast.train.finetune.write_outputs).
REPORT_PLOTS = ("loss_curves.png", "confusion_matrices.png", "roc_curves.png", "expert_load.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from eegfast.fileio import write_atomic

    try:  # (write_atomic makes the folder)
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        # also when the write fails (a full disk): pyplot holds every figure until it is
        # closed, so a process that goes on (a notebook, a sweep) kept each failed plot
        _pyplot().close(fig)
    return path


def loss_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    title: str,
    *,
    separate: bool = False,
) -> Path:
    """{label: [(step, loss), ...]} -> one line per label; ``separate``: one panel (and
    y axis) per label, for losses of different kinds (a tokenizer's regression loss of ~1 on
    the axis of a cross-entropy of ~10 is a flat line)."""
    plt = _pyplot()
    if separate:
        fig, axes = plt.subplots(
            1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False, layout="constrained"
        )
        for ax, (label, points) in zip(axes[0], curves.items(), strict=True):
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, linewidth=1.2)
            ax.set_xlabel("optimiser step")
            ax.set_ylabel("training loss")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        return _save(fig, path)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, linewidth=1.2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion_matrices(
    matrices: Mapping[str, np.ndarray], class_names: Mapping[str, Sequence[str]], path: Path
) -> Path:
    """One panel per task: counts summed over folds, rows = true class."""
    import numpy as np

    plt = _pyplot()
    # constrained: a panel's "true" label ran into the tick labels of the panel beside it
    fig, axes = plt.subplots(
        1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (task, matrix) in zip(axes[0], matrices.items(), strict=True):
        names = list(class_names[task])
        ax.imshow(matrix, cmap="Blues")
        # white on the dark half of the colour scale: black counts on its darkest blue (the
        # largest, most read cells) could hardly be read
        middle = (np.max(matrix) + np.min(matrix)) / 2
        for (i, j), value in np.ndenumerate(matrix):
            color = "white" if value > middle else "black"
            ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=9, color=color)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(task, fontsize=10)
    return _save(fig, path)


def roc_curves(
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: Path,
    positive: Mapping[str, str] | None = None,
    *,
    pooled: bool = True,
) -> Path:
    """{task: {label: (y_true, p_positive)}} for binary tasks -> one panel per task;
    ``positive``: {task: name of the positive class (label 1)}, shown in the panel's title
    (a true positive rate of an unnamed class cannot be read); ``pooled``: the scores are
    cross-validation folds' pooled (said in the titles), not one model's."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.8), squeeze=False)
    for ax, (task, per_label) in zip(axes[0], curves.items(), strict=True):
        for label, (y, p) in per_label.items():
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, p):.2f})", linewidth=1.2)
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        name = (positive or {}).get(task)
        title = task if name is None else f"{task}, positive class: {name}"
        ax.set_title(f"{title}\n(pooled over folds)" if pooled else title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def expert_load(loads: Mapping[str, np.ndarray], path: Path) -> Path:
    """{task: (num_experts,) mean fraction of routed slots} -> grouped bars.

    A slot is one of a token's top-k expert choices, so the fractions sum to 1 over experts
    (uniform: 1 / num_experts); the fraction of *tokens* an expert sees is k times its bar."""
    import numpy as np

    plt = _pyplot()
    tasks = list(loads)
    num_experts = len(next(iter(loads.values())))
    width = 0.8 / max(len(tasks), 1)
    fig, ax = plt.subplots(figsize=(max(5, num_experts * 0.8), 3.6))
    for i, task in enumerate(tasks):
        ax.bar(np.arange(num_experts) + i * width, loads[task], width, label=task)
    ax.axhline(1.0 / num_experts, color="k", linestyle=":", linewidth=0.8, label="uniform")
    ax.set_xticks(np.arange(num_experts) + width * (len(tasks) - 1) / 2, range(num_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("share of routing slots\n(top-k: k slots per token)")
    ax.set_title("expert load per task (mean over MoE layers and folds)")
    # beside the axes: inside, "best" put it over the bars of the first experts
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
