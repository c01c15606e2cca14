"""Facts about vision towers, in one place: where the tower sits in a model and its config, which of its modules
attend and at which layer, how to feed it larger images, and which of its tokens are always landmarks.

Special tokens (CLS, registers, distillation and detection tokens) carry the global state of the tower, so the
Nyström approximation keeps them exactly. Where they sit differs by family: ViT puts one CLS token first, DeiT a
CLS and a distillation token, DINOv2 with registers a CLS and its register tokens, YOLOS a CLS first and
`num_detection_tokens` detection tokens *last*; SigLIP, I-JEPA, VideoMAE, AIMv2, Pixtral and the Idefics3 / SmolVLM
vision towers have no such token at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Families whose sequence is patches only (no CLS): `model_type` of the tower config.
_NO_CLS_MODEL_TYPES = frozenset(
    {
        "siglip_vision_model",
        "siglip2_vision_model",
        "siglip_text_model",
        "ijepa",
        "videomae",
        "aimv2_vision_model",
        "pixtral",
        "idefics3_vision",
        "smolvlm_vision",
    }
)
# Families with one CLS token plus the leading tokens named here (DeiT: the distillation token).
_EXTRA_LEADING_BY_MODEL_TYPE = {"deit": 1}
# Model types checked to put one CLS token first (plus `num_register_tokens`, if the config has any).
_ONE_CLS_MODEL_TYPES = frozenset(
    {
        "vit",
        "vit_mae",
        "vit_msn",
        "dinov2",
        "dinov2_with_registers",
        "dinov3_vit",
        "clip_vision_model",
        "metaclip_2_vision_model",
        "mlcd_vision_model",
        "owlvit_vision_model",
        "owlv2_vision_model",
        "beit",
        "data2vec-vision",
        "dpt",
        "internvl_vision",
        "yolos",
    }
)


@dataclass(frozen=True)
class SpecialTokens:
    """How many always-landmark tokens open (`leading`) and close (`trailing`) each image's sequence."""

    leading: int = 0
    trailing: int = 0

    def mask(self, batch: int, num_tokens: int, device: torch.device | str) -> torch.Tensor | None:
        """`[batch, num_tokens]` bool, True on the special tokens; None when there are none."""
        if self.leading <= 0 and self.trailing <= 0:
            return None
        mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
        mask[:, : min(self.leading, num_tokens)] = True
        if self.trailing > 0:
            mask[:, max(num_tokens - self.trailing, 0) :] = True
        return mask


def special_tokens(tower_config: Any, leading: int | None = None) -> SpecialTokens:
    """The always-landmark tokens of a tower, read from its config.

    Args:
        tower_config: the config of the tower that runs attention (e.g. `model.config.vision_config`).
        leading: an explicit count of leading tokens (`FNAConfig.num_special_tokens`); None derives it per family.
            Trailing tokens (YOLOS' detection tokens) always come from the config.

    Families not listed in this module are assumed to put one CLS token first, plus `num_register_tokens` when their
    config has that attribute; set `FNAConfig.num_special_tokens` when that is wrong.
    """
    model_type = getattr(tower_config, "model_type", "")
    registers = int(getattr(tower_config, "num_register_tokens", 0) or 0)
    if leading is None:
        if model_type in _NO_CLS_MODEL_TYPES:
            leading = registers
        else:
            leading = 1 + _EXTRA_LEADING_BY_MODEL_TYPE.get(model_type, 0) + registers
    trailing = int(getattr(tower_config, "num_detection_tokens", 0) or 0) if model_type == "yolos" else 0
    return SpecialTokens(leading=leading, trailing=trailing)


def is_known_family(tower_config: Any) -> bool:
    """Whether the special tokens of this tower's family were checked against its modelling code."""
    model_type = getattr(tower_config, "model_type", "")
    return model_type in _NO_CLS_MODEL_TYPES or model_type in _ONE_CLS_MODEL_TYPES or model_type == "deit"


def special_token_names(tower_config: Any) -> list[str]:
    """Names of the leading special tokens of a tower: CLS, then the distillation token (DeiT) or registers."""
    count = special_tokens(tower_config).leading
    if getattr(tower_config, "model_type", "") == "deit":
        return ["CLS", "distillation"][:count]
    names = ["CLS"] + [f"register {i}" for i in range(1, count)]
    return names[:count]


# --- where the tower is ------------------------------------------------------------------------------------------

# Sub-configs holding a vision tower: CLIP/SigLIP/LLaVA (`vision_config`), UperNet/DPT heads (`backbone_config`).
TOWER_CONFIG_NAMES = ("vision_config", "backbone_config")


def tower_config_name(config: Any) -> str | None:
    """The sub-config of a model config that holds the vision tower, or None when the model config is the tower."""
    for name in TOWER_CONFIG_NAMES:
        if getattr(config, name, None) is not None:
            return name
    return None


def tower_config(config: Any) -> Any:
    """The config of the vision tower of a model config (the model config itself for ViT/DINOv2)."""
    name = tower_config_name(config)
    return config if name is None else getattr(config, name)


def vision_tower(model: nn.Module) -> nn.Module:
    """The module that maps `pixel_values` to tokens: CLIP/SigLIP `vision_model`, LLaVA `vision_tower`, or the
    model itself."""
    for name in ("vision_model", "vision_tower"):
        tower = getattr(model, name, None)
        if isinstance(tower, nn.Module):
            return tower
    return model


def patch_size(tower_config: Any) -> int | None:
    """The (square) patch size of a vision tower, None for a config without one."""
    patch = getattr(tower_config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(patch) if patch is not None else None


def mlp_ratio_of(tower_config: Any) -> float:
    """The MLP width over the model width: `mlp_ratio` (DINOv2) or `intermediate_size / hidden_size` (ViT, CLIP)."""
    return float(getattr(tower_config, "mlp_ratio", None) or tower_config.intermediate_size / tower_config.hidden_size)


def interpolation_kwargs(function: Any) -> dict[str, bool]:
    """`{"interpolate_pos_encoding": True}` when `function` (or a module's forward) takes that argument (ViT, CLIP,
    SigLIP: position embeddings resized to the input size; DINOv2 always resizes them)."""
    function = getattr(function, "forward", function)
    return (
        {"interpolate_pos_encoding": True}
        if "interpolate_pos_encoding" in inspect.signature(function).parameters
        else {}
    )


# --- its attention modules ---------------------------------------------------------------------------------------

_DISPATCHING_CLASSES: dict[type, bool] = {}


def dispatches_through_interface(module: nn.Module) -> bool:
    """Whether a module's forward looks its attention function up in `AttentionInterface` (as Transformers does)."""
    cls = type(module)
    if cls not in _DISPATCHING_CLASSES:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _DISPATCHING_CLASSES[cls] = "ALL_ATTENTION_FUNCTIONS" in source and hasattr(module, "config")
    return _DISPATCHING_CLASSES[cls]


def layer_index(module_name: str) -> int | None:
    """The layer index in a module path such as `encoder.layer.3.attention` (its last integer component)."""
    numbers = [int(part) for part in module_name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> attention module, for the attention modules of `model`'s own tower."""
    layers = {}
    for name, module in model.named_modules():
        if getattr(module, "config", None) is model.config and dispatches_through_interface(module):
            index = layer_index(name)
            if index is not None and "attention" in type(module).__name__.lower():
                layers.setdefault(index, module)
    return layers


def supports_fna(model: nn.Module, tower_config: Any) -> bool:
    """Whether the tower of `model` configured by `tower_config` dispatches its attention through AttentionInterface.

    Transformers' declared capability decides first: `_supports_attention_backend` on the `PreTrainedModel` that
    owns the tower (the tower itself for LLaVA-style models, else `model`). Models that dispatch without declaring
    it (AIMv2) are recognised from their attention modules' code.
    """
    from transformers import PreTrainedModel

    owners = [
        m for m in model.modules() if getattr(m, "config", None) is tower_config and isinstance(m, PreTrainedModel)
    ]
    if any(getattr(type(owner), "_supports_attention_backend", False) for owner in owners or [model]):
        return True
    return any(dispatches_through_interface(m) for m in model.modules() if getattr(m, "config", None) is tower_config)
