"""`--task probe`: a linear probe on frozen global features, accuracy, exact vs FNA attention.

The probe (`hf_fna.tools.probe`) is fit once, on features computed with exact attention (the head a user already
has), then applied to the test features of both variants; so it measures how far FNA moves a pretrained model's
features for a downstream head, and the agreement is the share of test images on which both variants get the same
prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import metrics
from ...errors import InputError
from ...tools.pipeline import EXACT, FNA, VARIANTS
from ...tools.probe import fit_probe
from ..data import LABEL_COLUMNS, TaskData, task_data
from ..inputs import ImageLabelCollate
from ..modeling import vision_features
from ..report import TaskOutcome, mean_cosine
from ..runner import Runner
from ..settings import EvalSettings

MODEL_KIND = "backbone"


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
