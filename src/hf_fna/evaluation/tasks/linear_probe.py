"""Linear probe on frozen features: logistic regression fit on a train split, accuracy on a test split.

`probe_accuracy` is the plain helper (shared with `hf-fna compare`). `run_task` is the `hf-fna eval --task probe`
task: the probe is fit once, on features computed with exact attention (the head a user already has), then applied
to the test features of both variants; so it measures how far FNA moves a pretrained model's features for a
downstream head, and the agreement is the share of test images on which both variants get the same prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import metrics
from ...errors import InputError
from ..data import TaskData, task_data
from ..inputs import ImageLabelCollate
from ..modeling import EXACT, FNA, VARIANTS, vision_features
from ..runner import Runner, TaskOutcome, mean_cosine
from ..settings import EvalSettings

LABEL_COLUMNS = ("label", "labels", "fine_label")
MODEL_KIND = "backbone"


def fit_probe(
    train_features: np.ndarray, train_labels: np.ndarray, max_iter: int = 1000, regularization: float = 1.0
) -> Any:
    """A fitted scikit-learn pipeline: standardisation with the train statistics, then multinomial logistic
    regression (lbfgs, deterministic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_features) == 0:
        raise ValueError("fit_probe needs a non-empty train split.")
    if len(np.unique(train_labels)) < 2:
        raise ValueError("fit_probe needs at least two classes in the train split.")
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
        raise ValueError(
            f"probe_accuracy needs non-empty splits; got {len(train_features)} train, {len(test_features)} test rows."
        )
    model = fit_probe(train_features, train_labels, max_iter, regularization)
    return float((model.predict(np.asarray(test_features, dtype=np.float64)) == np.asarray(test_labels)).mean())


def pooled_features(model: Any, inputs: dict) -> dict:
    """The probe input: the global feature of `modeling.vision_features`."""
    return {"features": vision_features(model, inputs["pixel_values"]).pooled}


def load_data(settings: EvalSettings) -> TaskData:
    roles = {"image": settings.image_column or "image", "label": settings.label_column or LABEL_COLUMNS}
    return task_data(settings, roles, with_train=True)


def run_task(runner: Runner, data: TaskData) -> TaskOutcome:
    """`--task probe`: fit on `train_split` (exact features), accuracy on `split` for exact and FNA features."""
    settings, columns, train, test = runner.settings, data.columns, data.train, data.test
    collate = ImageLabelCollate(runner.processor, columns["image"], columns["label"], settings.image_size)

    fit = runner.extract(train, collate, pooled_features, description="probe: train features (exact)")
    try:
        probe = fit_probe(fit["features"].numpy(), fit["label"].numpy())
    except ValueError as error:
        raise InputError(f"cannot fit the probe on split {settings.train_split!r}: {error}") from error
    comparison = runner.compare(test, collate, pooled_features, description="probe: test features")
    outputs = comparison.outputs
    predictions = {v: probe.predict(outputs[f"{v}.features"].numpy().astype(np.float64)) for v in VARIANTS}
    accuracy = metrics.load("accuracy")
    scores = {v: accuracy.compute(predictions=predictions[v], references=outputs["label"]) for v in VARIANTS}
    agreement = {
        "top1_agreement": float((predictions[EXACT] == predictions[FNA]).mean()),
        "feature_cosine": mean_cosine(outputs[f"{EXACT}.features"], outputs[f"{FNA}.features"]),
    }
    details = {"train_samples": len(fit["label"]), "feature_dim": int(outputs[f"{EXACT}.features"].shape[-1])}
    return TaskOutcome(scores, agreement, comparison, details)
