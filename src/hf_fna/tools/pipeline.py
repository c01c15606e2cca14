"""The measurement pipeline under every tool (`compare`, `calibrate`, `inspect`, `eval`): one model, its images, and
its exact and FNA variants.

    loaded = load_model(model_folder("hf_fna:clip-b16"))   # the model and its image processor
    pixels = loaded.preprocessing.pixels(photos, 448)       # the processor's mean, std and interpolation
    switch = AttentionSwitch(loaded.model, FNAConfig(layers="6:"))
    switch.use(FNA)                                         # or EXACT: the same weights, one copy in memory
    hidden, seconds = timed_forward(loaded.encoder, pixels, loaded.forward_kwargs)

Images are resized (shorter side to the resolution, the processor's interpolation), centre-cropped and normalised
with the mean and std of the model's image processor, ImageNet's only when the model has none; `hf-fna eval` feeds
its tasks through the processor itself, with the same statistics. Timings synchronise with the device before and
after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ..config import FNAConfig
from ..errors import InputError, first_line
from ..extras import missing_extra
from ..integration.plans import ATTENTION_NAME
from ..integration.switches import EXACT_IMPLEMENTATION
from ..integration.towers import interpolation_kwargs, patch_size, tower_config, tower_config_name, vision_tower
from ..locations import check_local_path
from .measure import synchronize

EXACT, FNA = "exact", "fna"
VARIANTS = (EXACT, FNA)

# Normalisation of models whose image processor cannot be loaded.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL's resampling filter number, as image processors store it

Result = TypeVar("Result")


# --- images -------------------------------------------------------------------------------------------------------


def photo_tensor(
    image: Any, size: int, mean: torch.Tensor, std: torch.Tensor, resample: int = BICUBIC
) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic unless `resample` names another PIL filter), centre-crop `size` x
    `size`, normalise."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - mean) / std


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images become a model's pixel values: the mean, std and interpolation of its image processor."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resample: int = BICUBIC

    @classmethod
    def from_processor(cls, processor: Any) -> ImagePreprocessing:
        """The statistics of an image processor (or of the image processor inside a multimodal processor); ImageNet's
        and bicubic for None or a processor without them."""
        processor = getattr(processor, "image_processor", processor)
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is None or std is None:
            return cls()
        resample = getattr(processor, "resample", BICUBIC)
        return cls(
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
            int(resample) if isinstance(resample, int) else BICUBIC,
        )

    @classmethod
    def from_pretrained(cls, model_path: str) -> ImagePreprocessing:
        """The statistics of the image processor saved with a model (`AutoImageProcessor`); ImageNet's without one."""
        return cls.from_processor(image_processor_of(model_path))

    def tensor(self, image: Any, size: int) -> torch.Tensor:
        """`[3, size, size]` pixel values of one PIL image."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return photo_tensor(image, size, mean, std, self.resample)

    def pixels(self, images: Sequence[Any], size: int) -> torch.Tensor:
        """`[B, 3, size, size]` pixel values of PIL images."""
        return torch.stack([self.tensor(image, size) for image in images])

    def display(self, pixel_values: torch.Tensor) -> np.ndarray:
        """The first image of `pixel_values` as an `[H, W, 3]` float array in [0, 1] (normalisation undone)."""
        array = pixel_values[0].permute(1, 2, 0).float().cpu().numpy()
        return (array * np.asarray(self.std) + np.asarray(self.mean)).clip(0.0, 1.0)


def image_processor_of(model_path: str) -> Any | None:
    """The image processor saved with a model (`AutoImageProcessor`), None when it has none or it cannot be loaded."""
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(model_path)
    except Exception:  # no processor, or one this installation cannot build: the statistics fall back to ImageNet's
        return None


# --- the model ----------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model loaded for measuring, its processor (None when it has none) and the folder or Hub id it came from."""

    path: str
    model: nn.Module
    processor: Any | None

    @property
    def tower_config(self) -> Any:
        """The config of the vision tower (the model config for ViT/DINOv2)."""
        return tower_config(self.model.config)

    @property
    def encoder(self) -> nn.Module:
        """The module that maps `pixel_values` to `last_hidden_state`: the model, or its vision tower."""
        return vision_tower(self.model)

    @property
    def patch_size(self) -> int | None:
        return patch_size(self.tower_config)

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """What the encoder needs besides the pixels at any resolution (`interpolate_pos_encoding=True`)."""
        return interpolation_kwargs(self.encoder)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.from_processor(self.processor)


def load_model(
    path: str,
    model_class: str | type = "AutoModel",
    attn_implementation: str = EXACT_IMPLEMENTATION,
    dtype: torch.dtype | None = None,
    processor: str | None = "AutoImageProcessor",
    strict: bool = False,
) -> LoadedModel:
    """Load a model (eval mode) with `attn_implementation` and its processor.

    Args:
        path: a folder or Hub id (`measure.model_folder` turns `hf_fna:` short names into folders).
        model_class: a Transformers Auto class name, or a model class.
        attn_implementation: the attention the model starts with; `AttentionSwitch` adds FNA.
        dtype: the model's dtype (default: as saved).
        processor: the Auto class of the processor: "AutoImageProcessor" (None when the model has none or it cannot
            be loaded) or "AutoProcessor" (required: tasks need its tokenizer); None loads none.
        strict: refuse a checkpoint that lacks weights of `model_class` (they would be random).

    Raises:
        InputError: the path names nothing loadable, the checkpoint cannot be loaded as `model_class`, or lacks
            weights with `strict`. A missing optional package propagates as its `ImportError`.
    """
    import transformers

    try:
        check_local_path(path)
    except OSError as error:
        raise InputError(f"cannot load model {path!r}: {error}") from None
    cls = getattr(transformers, model_class) if isinstance(model_class, str) else model_class
    options = {} if dtype is None else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(
            path, attn_implementation=attn_implementation, output_loading_info=True, **options
        )
    except Exception as error:  # OSError, ValueError, RecursionError, HTTP errors...: all mean "cannot load this"
        if missing_extra(error) is not None:
            raise
        raise InputError(f"cannot load model {path!r}: {first_line(error, with_type=True)}") from error
    if strict and info["missing_keys"]:
        raise InputError(
            f"{path}: {len(info['missing_keys'])} weights of {cls.__name__} are missing from the checkpoint (e.g. "
            f"{sorted(info['missing_keys'])[0]})"
        )
    loaded_processor = None
    if processor == "AutoImageProcessor":
        loaded_processor = image_processor_of(path)
    elif processor is not None:
        try:
            loaded_processor = getattr(transformers, processor).from_pretrained(path)
        except Exception as error:
            if missing_extra(error) is not None:
                raise
            raise InputError(f"cannot load the processor of {path!r}: {first_line(error, with_type=True)}") from error
    return LoadedModel(path, model.eval(), loaded_processor)


# --- the two variants ---------------------------------------------------------------------------------------------


class AttentionSwitch:
    """Switches the vision tower of one model between exact attention and FNA with `fna_config`, so that both
    variants run on the same weights and inputs without a second copy in memory.

    The exact variant is the tower's own attention implementation, or SDPA when it was loaded with `fna`; other
    towers (CLIP/SigLIP text, the LLaVA language model) keep their attention throughout. `FNAConfig.apply` runs when
    the settings change (it plans the layers); switching only changes the tower's attention implementation.
    """

    def __init__(self, model: Any, fna_config: FNAConfig, exact_implementation: str | None = None) -> None:
        self.model = model
        self.tower = tower_config_name(model.config)
        current = self._config()._attn_implementation
        if exact_implementation is None:
            exact_implementation = EXACT_IMPLEMENTATION if current == ATTENTION_NAME else current
        self.exact_implementation = exact_implementation
        self.configure(fna_config)
        self.use(EXACT)

    def _config(self) -> Any:
        return self.model.config if self.tower is None else getattr(self.model.config, self.tower)

    def configure(self, fna_config: FNAConfig) -> None:
        """Run FNA with `fna_config` from now on (the model is left on the FNA variant).

        Raises:
            InputError: the model cannot run FNA, or a layer is out of range for its tower.
        """
        fna_config.apply(self.model, self.tower)
        self.fna_config = fna_config
        self.current = FNA

    def use(self, variant: str) -> None:
        """Run `variant` ("exact" or "fna") from now on."""
        if variant == self.current:
            return
        implementation = ATTENTION_NAME if variant == FNA else self.exact_implementation
        self.model.set_attn_implementation(implementation if self.tower is None else {self.tower: implementation})
        self.current = variant


# --- timing -------------------------------------------------------------------------------------------------------


def timed(function: Callable[[], Result], device: torch.device) -> tuple[Result, float]:
    """`function()` and its wall time, with the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def timed_forward(model: nn.Module, pixels: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """`model(pixel_values=pixels, **kwargs).last_hidden_state` and its wall time, synchronised before and after."""
    return timed(lambda: model(pixel_values=pixels, **kwargs).last_hidden_state, pixels.device)
