"""Turning dataset rows into model inputs: pixel values at the requested size, and collate functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import to_rgb
from .modeling import image_processor


def pixel_values(processor: Any, images: list[Any], image_size: int | None) -> torch.Tensor:
    """`pixel_values` of RGB `images`: the processor's own resizing and cropping, or a plain resize to
    `image_size` x `image_size` (no crop, so every pixel keeps a known place, as segmentation needs)."""
    resize = {"size": {"height": image_size, "width": image_size}, "do_center_crop": False} if image_size else {}
    processed = image_processor(processor)(images=[to_rgb(image) for image in images], return_tensors="pt", **resize)
    return processed["pixel_values"]


@dataclass
class ImageLabelCollate:
    """Rows with an image and an integer label -> (`{"pixel_values"}`, `{"label"}`)."""

    processor: Any
    image_column: str
    label_column: str
    image_size: int | None = None

    def __call__(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        images = [row[self.image_column] for row in rows]
        labels = torch.tensor([int(row[self.label_column]) for row in rows])
        return {"pixel_values": pixel_values(self.processor, images, self.image_size)}, {"label": labels}


@dataclass
class ImageCollate:
    """Rows with an image -> (`{"pixel_values"}`, no targets)."""

    processor: Any
    image_column: str
    image_size: int | None = None

    def __call__(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {
            "pixel_values": pixel_values(self.processor, [row[self.image_column] for row in rows], self.image_size)
        }, {}
