"""Cross-validation splits and classification metrics (scikit-learn)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

# scikit-learn is imported where used: it takes about a second (scipy.stats with it), and every
# command that imports eegfast.train.finetune paid it at start-up, `--help` included.

BINARY_METRICS = ("balanced_accuracy", "auroc", "auc_pr")
MULTICLASS_METRICS = ("balanced_accuracy", "cohen_kappa", "f1_weighted")


def group_folds(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    k: int,
    *,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``k`` (train, test) index splits; no group is in both halves of a split.

    Stratified (StratifiedGroupKFold) when every class occurs in at least as many groups as
    there are folds; plain GroupKFold otherwise. ``k`` is lowered to the number of groups;
    fewer than 2 groups is an error.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(
            f"cross-validation needs at least 2 groups, found {n_groups} "
            f"({sorted(set(groups.tolist()))}); use finetune.group_by=recording"
        )
    k = min(k, n_groups)
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    groups_per_class = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    if groups_per_class >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [(train, test) for train, test in splitter.split(labels, labels, groups)]


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Binary: balanced accuracy, AUROC, AUC-PR; multi-class: balanced accuracy, Cohen's κ
    (unweighted), weighted F1; ``probabilities`` (N, num_classes), columns in class order
    (balanced accuracy, κ and F1 score their argmax; AUROC and AUC-PR column 1, the positive
    class). Metrics that are undefined for this fold (one class only: AUROC, AUC-PR, κ) are
    NaN."""
    from sklearn.metrics import (
        average_precision_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        f1_score,
        roc_auc_score,
    )

    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(1)
    with warnings.catch_warnings():
        # A fold that tests some classes only: balanced accuracy is the mean recall over the
        # classes tested (scikit-learn warns so at every such fold; the reports say it in
        # words, next to the numbers)
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", "A single label was found in 'y_true' and 'y_pred'")
        out = {"balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}
    one_class = len(np.unique(y_true)) < 2
    if num_classes == 2:
        out["auroc"] = math.nan if one_class else float(roc_auc_score(y_true, probabilities[:, 1]))
        out["auc_pr"] = (
            math.nan if one_class else float(average_precision_score(y_true, probabilities[:, 1]))
        )
    else:
        # With one class tested, chance agreement equals the observed agreement (both are the
        # share predicted as that class): κ is 0 for any imperfect model and 0/0 for a perfect
        # one, whatever it learnt, and a 0 would pull the mean over folds down.
        out["cohen_kappa"] = math.nan if one_class else float(cohen_kappa_score(y_true, y_pred))
        out["f1_weighted"] = float(f1_score(y_true, y_pred, average="weighted"))
    return out


def confusion(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, num_classes: int
) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(
        y_true, np.asarray(probabilities).argmax(1), labels=list(range(num_classes))
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation over folds, ignoring NaN."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std())


def primary_metric(num_classes: int) -> str:
    return "balanced_accuracy"
