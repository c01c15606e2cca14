"""`--task classification`: a checkpoint with an image-classification head, accuracy, exact vs FNA attention.

A plain batched loop rather than `evaluate`'s image-classification evaluator: the evaluator runs a pipeline per
model and returns only the metric, whereas the comparison needs both variants' logits on the same batches (for the
agreement), timing of the forward passes alone, and `accelerate` data parallelism. The metric is the bundled
`accuracy` module. Dataset labels are taken as the model's class ids, or mapped by name when the label column is a
`ClassLabel` whose names are the model's `id2label` names in another order.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import metrics
from ...errors import InputError
from ...integration.towers import interpolation_kwargs
from ...tools.pipeline import EXACT, FNA, VARIANTS
from ..data import LABEL_COLUMNS, TaskData, class_names, task_data
from ..inputs import ImageLabelCollate
from ..report import TaskOutcome, mean_cosine, top1_agreement
from ..runner import Runner
from ..settings import EvalSettings

MODEL_KIND = "classifier"


def logits(model: Any, inputs: dict) -> dict:
    return {"logits": model(pixel_values=inputs["pixel_values"], **interpolation_kwargs(model)).logits}


def label_mapping(dataset_names: list[str] | None, id2label: dict[int, str]) -> list[int] | None:
    """Model class id of each dataset label when both name the same classes in different orders, else None."""
    model_names = [id2label[i] for i in sorted(id2label)]
    if not dataset_names or dataset_names == model_names:
        return None
    by_name = {name.lower(): index for index, name in enumerate(model_names)}
    if sorted(by_name) != sorted(name.lower() for name in dataset_names):
        return None
    return [by_name[name.lower()] for name in dataset_names]


def load_data(settings: EvalSettings) -> TaskData:
    return task_data(
        settings, {"image": settings.image_column or "image", "label": settings.label_column or LABEL_COLUMNS}
    )


def run_task(runner: Runner, data: TaskData) -> TaskOutcome:
    """Accuracy of both variants, with the dataset labels mapped to the model's class ids by name when needed."""
    settings, columns, test = runner.settings, data.columns, data.test
    collate = ImageLabelCollate(runner.processor, columns["image"], columns["label"], settings.image_size)
    comparison = runner.compare(test, collate, logits, description="classification")
    outputs = comparison.outputs
    labels = outputs["label"]
    mapping = label_mapping(class_names(test, columns["label"]), runner.model.config.id2label)
    if mapping is not None:
        labels = torch.tensor(mapping)[labels]
    num_classes = outputs[f"{EXACT}.logits"].shape[-1]
    if int(labels.max()) >= num_classes:
        raise InputError(
            f"dataset labels go up to {int(labels.max())} but the model has {num_classes} classes; the "
            "dataset does not match the model's classification head"
        )
    accuracy = metrics.load("accuracy")
    scores = {v: accuracy.compute(predictions=outputs[f"{v}.logits"].argmax(-1), references=labels) for v in VARIANTS}
    agreement = {
        "top1_agreement": top1_agreement(outputs[f"{EXACT}.logits"], outputs[f"{FNA}.logits"]),
        "logit_cosine": mean_cosine(outputs[f"{EXACT}.logits"], outputs[f"{FNA}.logits"]),
    }
    return TaskOutcome(scores, agreement, comparison, {"label_mapping": "by name" if mapping else "by id"})
