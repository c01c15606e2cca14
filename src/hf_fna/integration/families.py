"""Which tokens of a vision tower are always landmarks (CLS, registers, distillation and detection tokens).

These tokens carry the global state of the tower, so the Nyström approximation keeps them exactly. Where they sit
differs by family: ViT puts one CLS token first, DeiT a CLS and a distillation token, DINOv2 with registers a CLS and
its register tokens, YOLOS a CLS first and `num_detection_tokens` detection tokens *last*; SigLIP, I-JEPA,
VideoMAE, AIMv2, Pixtral and the Idefics3 / SmolVLM vision towers have no such token at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
