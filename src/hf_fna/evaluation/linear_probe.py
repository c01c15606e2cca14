"""Linear probe on frozen features: logistic regression fit on a train split, accuracy on a test split."""

from __future__ import annotations

import numpy as np


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
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError(
            f"probe_accuracy needs non-empty splits; got {len(train_features)} train, {len(test_features)} test rows."
        )
    if len(np.unique(train_labels)) < 2:
        raise ValueError("probe_accuracy needs at least two classes in the train split.")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=regularization))
    model.fit(np.asarray(train_features, dtype=np.float64), np.asarray(train_labels))
    return float((model.predict(np.asarray(test_features, dtype=np.float64)) == np.asarray(test_labels)).mean())
