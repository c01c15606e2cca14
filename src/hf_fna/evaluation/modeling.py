"""Loading the evaluated model and checking it fits the task, and the features the vision tasks read from it.

One model is loaded (with exact `sdpa` attention); the runner switches its vision tower to `fna` and back around each
forward pass (`tools.pipeline.AttentionSwitch`), so both variants run on the same weights and batches without
doubling memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import FNAConfig
from ..errors import InputError, first_line
from ..integration.towers import (
    interpolation_kwargs,
    patch_size,
    special_tokens,
    tower_config,
    vision_tower,
)
from ..locations import check_local_path
from ..tools import pipeline

# What a task needs from the model, and the Auto class that loads it.
MODEL_KINDS = {
    "backbone": "AutoModel",  # a vision transformer (or the vision tower of CLIP/SigLIP/LLaVA)
    "classifier": "AutoModelForImageClassification",  # a checkpoint with a trained classification head
    "dual_encoder": "AutoModel",  # CLIP/SigLIP: image and text embeddings in one space
    "generator": "AutoModelForImageTextToText",  # LLaVA-style: answers questions about images
}


def load_config(path: str) -> Any:
    from transformers import AutoConfig

    try:
        check_local_path(path)
    except OSError as error:
        raise InputError(f"could not load the config of {path!r}: {error}") from None
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as error:
        raise InputError(f"could not load the config of {path!r}: {first_line(error, with_type=True)}") from error


def check_model_kind(config: Any, kind: str, task: str) -> None:
    """Raise `InputError` when a model with this config cannot do `task` (which needs a model of `kind`)."""
    model_type = getattr(config, "model_type", "?")
    has_towers = getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
    if kind == "classifier":
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(name.endswith("ForImageClassification") for name in architectures):
            raise InputError(
                f"task {task!r} needs a checkpoint with an image-classification head; {model_type!r} has architectures "
                f"{architectures or 'none'} (use --task probe to probe a backbone)"
            )
    elif kind in ("dual_encoder", "generator") and not has_towers:
        needs = "an image and a text tower (CLIP, SigLIP)" if kind == "dual_encoder" else "a LLaVA-style model"
        raise InputError(f"task {task!r} needs {needs}; {model_type!r} is a vision-only model")
    elif kind == "backbone" and patch_size(tower_config(config)) is None:
        raise InputError(
            f"task {task!r} needs a vision transformer (ViT, DINOv2, CLIP, SigLIP); {model_type!r} is not one"
        )


def load_model(path: str, kind: str, task: str) -> tuple[Any, Any]:
    """The model (exact `sdpa` attention, eval mode) and its processor, after checking that they fit `task`."""
    config = load_config(path)
    check_model_kind(config, kind, task)
    loaded = pipeline.load_model(path, MODEL_KINDS[kind], processor="AutoProcessor")
    model, processor = loaded.model, loaded.processor
    if kind == "dual_encoder" and not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise InputError(
            f"task {task!r} needs image and text embeddings (CLIP, SigLIP); {type(model).__name__} has none"
        )
    if kind in ("dual_encoder", "generator") and getattr(processor, "tokenizer", None) is None:
        raise InputError(f"task {task!r} needs a processor with a tokenizer; {path!r} has none")
    return model.eval(), processor


def image_processor(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


@dataclass
class VisionFeatures:
    """Per image: a global feature (pooled or CLS token, concatenated with the mean patch token) and the patch tokens
    as a grid `[B, h, w, D]`."""

    pooled: torch.Tensor
    patches: torch.Tensor


def vision_features(model: Any, pixel_values: torch.Tensor) -> VisionFeatures:
    """Run the vision tower of `model` and return its `VisionFeatures`.

    The global feature is the standard linear-probe input of DINOv2: the pooled output (the CLS token for DINOv2, the
    post-layernorm CLS for CLIP, the attention-pool output for SigLIP) concatenated with the mean of the patch tokens.
    """
    tower = vision_tower(model)
    config = tower_config(model.config)
    outputs = tower(pixel_values=pixel_values, **interpolation_kwargs(tower))
    tokens = outputs.last_hidden_state
    special = special_tokens(config).leading
    patches = tokens[:, special:]
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        pooled = tokens[:, 0] if special else patches.mean(dim=1)
    height, width = (size // config.patch_size for size in pixel_values.shape[-2:])
    grid = patches.reshape(patches.shape[0], height, width, patches.shape[-1])
    return VisionFeatures(pooled=torch.cat([pooled, patches.mean(dim=1)], dim=-1), patches=grid)


def fna_config_for(config: Any, overrides: dict[str, Any]) -> FNAConfig:
    """The model's own `fna_config` (or the defaults) with the given fields replaced."""
    return FNAConfig.from_model_config(tower_config(config)).update(
        **{k: v for k, v in overrides.items() if v is not None}
    )
