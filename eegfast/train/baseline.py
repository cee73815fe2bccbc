"""The classic baseline: log band power per electrode + logistic regression."""

from __future__ import annotations

import numpy as np

# scipy.signal and sklearn are imported where used: eegfast.train.finetune imports this module,
# and the ~0.9 s they take was paid by every command that imports it, `--help` included.

BANDS_HZ = ((1, 4), (4, 8), (8, 13), (13, 30), (30, 45))  # delta, theta, alpha, beta, gamma
SFREQ = 200.0


def band_power_features(x: np.ndarray) -> np.ndarray:
    """(C, A, 200) patches of one window -> (C * 5,) log band powers (Welch, 1-s segments)."""
    from scipy.signal import welch

    signal = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    freqs, psd = welch(signal, fs=SFREQ, nperseg=min(200, signal.shape[1]), axis=-1)
    powers = [psd[:, (freqs >= lo) & (freqs < hi)].mean(-1) for lo, hi in BANDS_HZ]
    return np.log(np.stack(powers, axis=-1) + 1e-12).reshape(-1)


def fit_predict_logistic(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Standardised features (N, F) -> class-weighted L2 logistic regression; returns test
    probabilities (N_test, num_classes). The band-power baseline and the linear probe.

    The classes are weighted by inverse frequency, as the fine-tuned models' cross-entropy is:
    scored by balanced accuracy, an unweighted classifier would lean to the majority class and
    lose for that reason alone.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed),
    )
    probabilities = np.zeros((len(test_x), num_classes))
    if len(np.unique(train_y)) < 2:
        # One class to train on (a fold whose other classes are all held out; the fine-tuning
        # report warns): the only fit is that class, where logistic regression raises.
        probabilities[:, int(train_y[0])] = 1.0
        return probabilities
    model.fit(train_x, train_y)
    probabilities[:, model.classes_] = model.predict_proba(test_x)
    return probabilities


# The band-power baseline: standardised log band powers (:func:`band_power_features`) ->
# class-weighted L2 logistic regression, test probabilities (N_test, num_classes).
fit_predict_band_power = fit_predict_logistic
