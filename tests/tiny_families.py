"""Tiny randomly initialised models of every supported family, as the Transformers test suite builds them.

Each factory returns `(model_class, config, tower_config_name, make_inputs)`; `make_inputs(batch)` returns the
forward kwargs, and `tokens` is the vision tower's sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTModel,
)

IMAGE = 32
PATCH = 8
LAYERS = 4
VISION = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass
class Family:
    name: str
    model_class: type
    config: Any
    tower: str | None  # sub-config holding the vision tower, None when the model config is the tower
    tokens: int  # vision tower sequence length
    make_inputs: Callable[[int], dict[str, torch.Tensor]]

    def output(self, out: Any) -> torch.Tensor:
        """The tensor compared between backends."""
        if self.name == "llava":
            return out.logits
        if self.name in ("clip", "siglip"):
            return torch.cat([out.image_embeds, out.vision_model_output.last_hidden_state.flatten(1)], dim=-1)
        return out.last_hidden_state


def _pixels(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)


def _text(batch: int, length: int = 7, vocab: int = 99) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + batch)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def families() -> list[Family]:
    patches = (IMAGE // PATCH) ** 2
    vision_kw = dict(VISION, image_size=IMAGE, patch_size=PATCH)

    def images(batch):
        return {"pixel_values": _pixels(batch)}

    def clip_inputs(batch):
        return {"pixel_values": _pixels(batch), **_text(batch)}

    def siglip_inputs(batch):
        text = _text(batch)
        text.pop("attention_mask")  # SigLIP's text tower is trained without padding masks
        return {"pixel_values": _pixels(batch), **text}

    image_token = 98

    def llava_inputs(batch):
        generator = torch.Generator().manual_seed(7)
        prefix = torch.randint(3, 90, (batch, 3), generator=generator)
        ids = torch.cat([prefix, torch.full((batch, patches), image_token), prefix], dim=1)
        return {"pixel_values": _pixels(batch), "input_ids": ids, "attention_mask": torch.ones_like(ids)}

    llama = dict(TEXT, model_type="llama", num_key_value_heads=2, max_position_embeddings=128)
    return [
        Family("vit", ViTModel, ViTConfig(**vision_kw), None, patches + 1, images),
        Family("deit", DeiTModel, DeiTConfig(**vision_kw), None, patches + 2, images),
        Family("dinov2", Dinov2Model, Dinov2Config(**vision_kw), None, patches + 1, images),
        Family(
            "dinov2_registers",
            Dinov2WithRegistersModel,
            Dinov2WithRegistersConfig(**vision_kw, num_register_tokens=2),
            None,
            patches + 3,
            images,
        ),
        Family(
            "clip",
            CLIPModel,
            CLIPConfig(text_config=dict(TEXT), vision_config=vision_kw, projection_dim=16),
            "vision_config",
            patches + 1,
            clip_inputs,
        ),
        Family(
            "siglip",
            SiglipModel,
            SiglipConfig(text_config=dict(TEXT), vision_config=vision_kw),
            "vision_config",
            patches,
            siglip_inputs,
        ),
        Family(
            "llava",
            LlavaForConditionalGeneration,
            LlavaConfig(
                vision_config=dict(vision_kw, model_type="clip_vision_model", projection_dim=16),
                text_config=llama,
                image_token_index=image_token,
                vision_feature_layer=-1,
            ),
            "vision_config",
            patches + 1,
            llava_inputs,
        ),
    ]


def family(name: str) -> Family:
    return next(f for f in families() if f.name == name)
