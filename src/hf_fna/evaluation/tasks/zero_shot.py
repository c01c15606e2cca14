"""`--task zero-shot`: CLIP/SigLIP classification from class-name prompts, exact vs FNA attention in the vision tower.

Each class name fills the prompt template ("a photo of a {}."); the text tower (always exact) embeds the prompts
once, and an image is assigned the class whose prompt embedding is most similar to its image embedding.
Agreement: the share of images assigned the same class by both variants, and the mean cosine between their image
embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
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

MODEL_KIND = "dual_encoder"


def _pooled(outputs: Any) -> torch.Tensor:
    """`get_*_features` return a tensor in older Transformers, a model output with `pooler_output` in newer ones."""
    return outputs if torch.is_tensor(outputs) else outputs.pooler_output


def text_embeddings(runner: Runner, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings `[len(texts), E]` (the text tower always runs exact attention)."""
    tokenizer = runner.processor.tokenizer
    # SigLIP was trained on texts padded to 64 tokens; its text embeddings depend on that padding.
    siglip = runner.model.config.model_type.startswith("siglip")
    padding: dict[str, Any] = {"padding": "max_length", "max_length": 64} if siglip else {"padding": True}
    runner.switch.use(EXACT)
    chunks = []
    for start in range(0, len(texts), runner.settings.batch_size):
        tokens = tokenizer(
            texts[start : start + runner.settings.batch_size], truncation=True, return_tensors="pt", **padding
        ).to(runner.device)
        with torch.inference_mode(), runner.accelerator.autocast():
            chunks.append(_pooled(runner.model.get_text_features(**tokens)).float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def image_embeddings(model: Any, inputs: dict) -> dict:
    """L2-normalised image embeddings (`get_image_features`, resized position embeddings when the model allows)."""
    features = model.get_image_features(
        pixel_values=inputs["pixel_values"], **interpolation_kwargs(model.get_image_features)
    )
    embeddings = _pooled(features)
    return {"embeddings": torch.nn.functional.normalize(embeddings.float(), dim=-1)}


@dataclass
class ZeroShotStep:
    """Image embeddings and their similarities to the class prompt embeddings."""

    class_embeddings: torch.Tensor  # [C, E], normalised

    def __call__(self, model: Any, inputs: dict) -> dict:
        embeddings = image_embeddings(model, inputs)["embeddings"]
        return {"embeddings": embeddings, "scores": embeddings @ self.class_embeddings.to(embeddings.device).T}


def load_data(settings: EvalSettings) -> TaskData:
    """The evaluated split, its image and label columns, and the class names (`extra["class_names"]`)."""
    data = task_data(
        settings, {"image": settings.image_column or "image", "label": settings.label_column or LABEL_COLUMNS}
    )
    names = settings.class_names or class_names(data.test, data.columns["label"])
    if not names:
        raise InputError(
            f"zero-shot needs class names: column {data.columns['label']!r} is not a ClassLabel; pass "
            "--class-names name0,name1,..."
        )
    highest = max(data.test[data.columns["label"]])
    if highest >= len(names):
        raise InputError(f"labels go up to {highest} but only {len(names)} class names are known: {', '.join(names)}")
    data.extra["class_names"] = names
    return data


def run_task(runner: Runner, data: TaskData) -> TaskOutcome:
    """Accuracy of both variants; the class prompts are embedded once, with exact attention."""
    settings, columns, test, names = runner.settings, data.columns, data.test, data.extra["class_names"]
    prompts = [settings.prompt.format(name) for name in names]
    step = ZeroShotStep(text_embeddings(runner, prompts))
    collate = ImageLabelCollate(runner.processor, columns["image"], columns["label"], settings.image_size)
    comparison = runner.compare(test, collate, step, description="zero-shot")
    outputs = comparison.outputs
    accuracy = metrics.load("accuracy")
    scores = {
        v: accuracy.compute(predictions=outputs[f"{v}.scores"].argmax(-1), references=outputs["label"])
        for v in VARIANTS
    }
    agreement = {
        "top1_agreement": top1_agreement(outputs[f"{EXACT}.scores"], outputs[f"{FNA}.scores"]),
        "embedding_cosine": mean_cosine(outputs[f"{EXACT}.embeddings"], outputs[f"{FNA}.embeddings"]),
    }
    return TaskOutcome(scores, agreement, comparison, {"class_names": names, "prompt": settings.prompt})
