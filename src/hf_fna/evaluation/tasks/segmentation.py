"""`--task segmentation`: a linear probe on frozen patch tokens, mean IoU, exact vs FNA attention.

Images are resized to a square `image_size` (no crop). The probe (standardisation + logistic regression) is fit on
the patch tokens of `train_split`, computed with exact attention, against the mask resized to the patch grid
(nearest). On the evaluated split each variant's patch tokens go through that probe; the class scores are upsampled
bilinearly to the mask's own resolution and the arg-max is compared with the mask. Agreement: the share of pixels
that get the same class under both variants, and the mean cosine between their patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ... import metrics
from ...errors import InputError
from ...integration.towers import tower_config
from ...tools.pipeline import EXACT, FNA, VARIANTS
from ...tools.probe import fit_probe
from ..data import TaskData, task_data
from ..inputs import pixel_values
from ..modeling import image_processor, vision_features
from ..report import TaskOutcome
from ..runner import Runner
from ..settings import EvalSettings

MODEL_KIND = "backbone"
MASK_COLUMNS = ("annotation", "mask", "segmentation", "semantic_segmentation")
MAX_TRAIN_PATCHES = 200_000  # patch tokens the probe is fit on at most (a random subset beyond that)


@dataclass
class MaskCollate:
    """Rows with an image and a mask -> (`{"pixel_values"}`, `{"mask": full-resolution arrays, "patch_label"}`)."""

    processor: Any
    image_column: str
    mask_column: str
    image_size: int
    patch_size: int

    def __call__(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from PIL import Image

        grid = self.image_size // self.patch_size
        masks = [np.asarray(row[self.mask_column]) for row in rows]
        if any(mask.ndim != 2 for mask in masks):
            raise InputError(f"column {self.mask_column!r} must hold single-channel masks (class index per pixel)")
        patch_labels = [
            np.asarray(Image.fromarray(m.astype(np.int32)).resize((grid, grid), Image.NEAREST)) for m in masks
        ]
        inputs = {
            "pixel_values": pixel_values(self.processor, [row[self.image_column] for row in rows], self.image_size)
        }
        return inputs, {"mask": masks, "patch_label": torch.from_numpy(np.stack(patch_labels)).long()}


def patch_tokens(model: Any, inputs: dict) -> dict:
    return {"patches": vision_features(model, inputs["pixel_values"]).patches}


@dataclass
class PatchProbe:
    """The fitted probe as a torch linear map on patch tokens: `[B, h, w, D]` -> class scores `[B, h, w, C]`."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    classes: np.ndarray  # label id of each output column

    @classmethod
    def from_sklearn(cls, pipeline: Any) -> PatchProbe:
        scaler, logistic = pipeline[0], pipeline[-1]
        coef = logistic.coef_ / scaler.scale_  # fold the standardisation into the linear map
        intercept = logistic.intercept_ - coef @ scaler.mean_
        if coef.shape[0] == 1:  # binary: sklearn keeps only the score of the second class
            coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        return cls(torch.from_numpy(coef).float(), torch.from_numpy(intercept).float(), logistic.classes_)

    def __call__(self, model: Any, inputs: dict) -> dict:
        patches = patch_tokens(model, inputs)["patches"]
        scores = patches.float() @ self.weight.to(patches.device).T + self.bias.to(patches.device)
        return {"scores": scores, "patches": patches}

    def summarize(self, exact: dict, fna: dict, targets: dict) -> dict[str, Any]:
        """Per image: each variant's predicted mask at the mask's resolution, and the exact-vs-FNA patch cosine."""
        out: dict[str, Any] = {"mask": targets["mask"]}
        for variant, outputs in (("exact", exact), ("fna", fna)):
            out[f"{variant}.prediction"] = [
                self._upsampled_prediction(s, m.shape) for s, m in zip(outputs["scores"], targets["mask"], strict=True)
            ]
        cosine = torch.nn.functional.cosine_similarity(exact["patches"].float(), fna["patches"].float(), dim=-1)
        out["patch_cosine"] = cosine.flatten(1).mean(dim=1)
        return out

    def _upsampled_prediction(self, scores: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
        scores = scores.float().permute(2, 0, 1)[None]  # [1, C, h, w]
        upsampled = torch.nn.functional.interpolate(scores, size=tuple(shape), mode="bilinear", align_corners=False)
        return self.classes[upsampled[0].argmax(dim=0).cpu().numpy()]


def load_data(settings: EvalSettings) -> TaskData:
    roles = {"image": settings.image_column or "image", "mask": settings.mask_column or MASK_COLUMNS}
    data = task_data(settings, roles, with_train=True)
    mask = np.asarray(data.test[0][data.columns["mask"]])
    if mask.ndim != 2:
        raise InputError(
            f"column {data.columns['mask']!r} must hold single-channel masks (a class index per pixel); "
            f"its first entry has shape {mask.shape}"
        )
    return data


def run_task(runner: Runner, data: TaskData) -> TaskOutcome:
    """Fit the patch probe on the train split (exact tokens), then mean IoU of both variants on the test split."""
    settings, columns, train, test = runner.settings, data.columns, data.train, data.test
    patch_size = tower_config(runner.model.config).patch_size
    size = settings.image_size or _default_size(image_processor(runner.processor), runner.model.config)
    collate = MaskCollate(runner.processor, columns["image"], columns["mask"], size, patch_size)

    fit = runner.extract(train, collate, patch_tokens, description="segmentation: train patch tokens (exact)")
    features = fit["patches"].flatten(0, 2).numpy()
    labels = fit["patch_label"].flatten().numpy()
    keep = np.flatnonzero(labels != settings.ignore_index)
    if len(keep) > MAX_TRAIN_PATCHES:
        keep = np.sort(np.random.default_rng(settings.seed).choice(keep, MAX_TRAIN_PATCHES, replace=False))
    try:
        probe = PatchProbe.from_sklearn(fit_probe(features[keep], labels[keep]))
    except ValueError as error:
        raise InputError(f"cannot fit the segmentation probe on split {settings.train_split!r}: {error}") from error

    comparison = runner.compare(test, collate, probe, probe.summarize, description="segmentation: test")
    outputs = comparison.outputs
    observed = [int(m[m != settings.ignore_index].max(initial=0)) for m in outputs["mask"]]
    num_labels = int(max(max(observed), labels[keep].max(), probe.classes.max())) + 1
    mean_iou = metrics.load("mean_iou")
    scores = {}
    for variant in VARIANTS:
        result = mean_iou.compute(
            predictions=outputs[f"{variant}.prediction"],
            references=outputs["mask"],
            num_labels=num_labels,
            ignore_index=settings.ignore_index,
        )
        scores[variant] = {k: result[k] for k in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    same = sum(
        int((e == f).sum()) for e, f in zip(outputs[f"{EXACT}.prediction"], outputs[f"{FNA}.prediction"], strict=True)
    )
    agreement = {
        "pixel_agreement": same / sum(m.size for m in outputs["mask"]),
        "patch_cosine": float(outputs["patch_cosine"].mean()),
    }
    details = {"image_size": size, "num_labels": num_labels, "train_patches": len(keep)}
    return TaskOutcome(scores, agreement, comparison, details)


def _default_size(processor: Any, config: Any) -> int:
    """The processor's crop (or resize) height, else the model's `image_size`."""
    for name in ("crop_size", "size"):
        value = getattr(processor, name, None)
        if isinstance(value, dict) and value.get("height"):
            return int(value["height"])

    return int(tower_config(config).image_size)
