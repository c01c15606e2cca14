"""Linear probes on frozen features: logistic regression fit on train features, accuracy on test features.

Shared by `hf-fna compare` (a probe per variant on its own features) and the probe and segmentation tasks of
`hf-fna eval` (one probe fit on exact features, applied to both variants).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError


def fit_probe(
    train_features: np.ndarray, train_labels: np.ndarray, max_iter: int = 1000, regularization: float = 1.0
) -> Any:
    """A fitted scikit-learn pipeline: standardisation with the train statistics, then multinomial logistic
    regression (lbfgs, deterministic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_features) == 0:
        raise InputError("fit_probe needs a non-empty train split.")
    if len(np.unique(train_labels)) < 2:
        raise InputError("fit_probe needs at least two classes in the train split.")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=regularization))
    return model.fit(np.asarray(train_features, dtype=np.float64), np.asarray(train_labels))


def probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    max_iter: int = 1000,
    regularization: float = 1.0,
) -> float:
    """Fit a multinomial logistic regression on standardised `train_features` and return test accuracy in [0, 1].

    Deterministic (lbfgs solver). Features are standardised with the train statistics so that exact and FNA
    features are probed on equal terms.
    """
    if len(train_features) == 0 or len(test_features) == 0:
        raise InputError(
            f"probe_accuracy needs non-empty splits; got {len(train_features)} train, {len(test_features)} test rows."
        )
    model = fit_probe(train_features, train_labels, max_iter, regularization)
    return float((model.predict(np.asarray(test_features, dtype=np.float64)) == np.asarray(test_labels)).mean())
