"""`hf-fna inspect`: the per-layer table, the figures, flagged tokens at the right place, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from hf_fna.cli import main
from hf_fna.tools import inspection

PATCH = 8
LAYERS = 4
VISION = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
VISION_KW = dict(VISION, image_size=32, patch_size=PATCH)
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
ROW = re.compile(r"^\s*(\d+)\s+\S+\s+\S+\s+\S+\s+\d+\.\d\d\s")


def _save(model, processor, folder: Path) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    torch.manual_seed(0)
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(Dinov2Model(Dinov2Config(**VISION_KW)).eval(), processor, tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 80, 3), generator=generator, dtype=torch.uint8).numpy()
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def _table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if ROW.match(line)]


def _assert_png(path: str | Path) -> None:
    path = Path(path)
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def _inspect(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (save_pretrained progress bars)
    code = main(["inspect", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tiny_dinov2_table_figures_and_json(tiny_dinov2, image_file, tmp_path, capsys):
    out, report = tmp_path / "figures", tmp_path / "report.json"
    code, stdout, stderr = _inspect(
        capsys, "--model", tiny_dinov2, "--image", image_file, "--resolution", "64", "--out", str(out),
        "--json", str(report), "--layers", "2", "3", "--landmarks", "9",
    )  # fmt: skip
    assert code == 0, stderr
    assert [int(ROW.match(line).group(1)) for line in _table_rows(stdout)] == list(range(LAYERS))
    assert "exact forward pass" in stderr and "FNA forward pass" in stderr  # progress of the long steps
    result = json.loads(report.read_text())
    assert result["grid"] == [8, 8] and result["input_size"] == [64, 64]
    assert result["fna_layers"] == [2, 3] and result["special_landmarks"] == [0]
    assert len(result["landmarks"]) == 8 and len({tuple(p) for p in result["landmarks"]}) == 8
    assert all(0 <= r < 8 and 0 <= c < 8 for r, c in result["landmarks"])
    assert len(result["layers"]) == LAYERS
    for name in ("norm maps", "landmarks"):
        _assert_png(result["figures"][name])
    assert sorted(p.name for p in out.iterdir()) == ["noise_64_landmarks.png", "noise_64_norms.png"]


def test_massive_tokens_flagged_at_their_patch(tiny_dinov2, image_file, tmp_path, capsys, monkeypatch):
    """A token scaled up from layer 1 on is flagged by norm_ratio in layers 1-3 at its (row, col), nowhere else."""
    row, col, grid = 2, 5, 8
    token = 1 + row * grid + col  # after CLS
    load = inspection.load_vision_model

    def load_with_massive_token(*args, **kwargs):
        model, processor = load(*args, **kwargs)

        def scale(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[:, token] *= 50.0
            return output

        model.encoder.layer[1].register_forward_hook(scale)
        return model, processor

    monkeypatch.setattr(inspection, "load_vision_model", load_with_massive_token)
    report = tmp_path / "report.json"
    code, stdout, stderr = _inspect(
        capsys, "--model", tiny_dinov2, "--image", image_file, "--resolution", "64", "--out", str(tmp_path),
        "--json", str(report), "--landmarks", "8",
    )  # fmt: skip
    assert code == 0, stderr
    layers = json.loads(report.read_text())["layers"]
    assert [layer["massive"] for layer in layers] == [[], [[row, col]], [[row, col]], [[row, col]]]
    assert all(layer["norms"]["max_over_median"] > 10 for layer in layers[1:])
    rows = _table_rows(stdout)
    assert "(2, 5)" not in rows[0] and all("(2, 5)" in line for line in rows[1:])


def test_recorded_attention_matches_eager(tiny_dinov2):
    """The probabilities the inspection attention computes from q/k equal eager attention's, head-averaged."""
    model, _ = inspection.load_vision_model(tiny_dinov2)
    recorded = {}
    modules = inspection.attention_layers(model)
    for index, module in modules.items():
        inspection._RECORDERS[module] = lambda probs, index=index: recorded.__setitem__(index, probs)
    pixel_values = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        inspected = model(pixel_values=pixel_values).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(pixel_values=pixel_values, output_attentions=True)
    for module in modules.values():
        inspection._RECORDERS.pop(module)
    assert sorted(recorded) == list(range(LAYERS))
    for index, attentions in enumerate(eager.attentions):
        torch.testing.assert_close(recorded[index], attentions.mean(dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inspected, eager.last_hidden_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["vit", "clip", "siglip"])
def test_other_vision_towers_at_a_new_resolution(family, image_file, tmp_path, capsys):
    """ViT and the vision towers of full CLIP/SigLIP checkpoints, with position embeddings interpolated."""
    torch.manual_seed(0)
    if family == "vit":
        model, processor, special = ViTModel(ViTConfig(**VISION_KW)), ViTImageProcessor(size=32), 1
    elif family == "clip":
        model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION_KW, projection_dim=16))
        processor, special = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), 1
    else:
        model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION_KW))
        processor, special = SiglipImageProcessor(size={"height": 32, "width": 32}), 0
    folder = _save(model, processor, tmp_path / family)
    report = tmp_path / "report.json"
    code, stdout, stderr = _inspect(
        capsys, "--model", folder, "--image", image_file, "--resolution", "48", "--out", str(tmp_path),
        "--json", str(report), "--layers", "all", "--landmarks", "6",
    )  # fmt: skip
    assert code == 0, stderr
    result = json.loads(report.read_text())
    assert result["grid"] == [6, 6] and len(result["special_tokens"]) == special
    assert len(result["landmarks"]) == 6 - special and len(_table_rows(stdout)) == LAYERS


@pytest.mark.real_weights
def test_real_dinov2_small_shows_no_massive_tokens(tmp_path, capsys):
    report = tmp_path / "report.json"
    code, stdout, stderr = _inspect(
        capsys, "--image", "chelsea", "--resolution", "224", "--out", str(tmp_path), "--json", str(report)
    )
    assert code == 0, stderr
    assert len(_table_rows(stdout)) == 12
    result = json.loads(report.read_text())
    assert result["grid"] == [16, 16] and result["special_landmarks"] == [0] and len(result["landmarks"]) == 63
    assert all(layer["massive"] == [] for layer in result["layers"])
    assert max(layer["norms"]["max_over_median"] for layer in result["layers"]) < 3
    for name in ("norm maps", "landmarks"):
        _assert_png(result["figures"][name])


def _one_line_error(capsys, args: list[str], expected: str) -> None:
    code, _stdout, stderr = _inspect(capsys, *args)
    *progress, message = stderr.splitlines()
    assert code == 2 and "Traceback" not in stderr
    assert message.startswith("hf-fna inspect: error: ") and expected in message, stderr
    assert all(line.startswith("[hf-fna inspect] ") for line in progress), stderr  # progress lines only


def test_missing_image_file(tiny_dinov2, tmp_path, capsys):
    _one_line_error(capsys, ["--model", tiny_dinov2, "--image", str(tmp_path / "missing.jpg")], "not found")


def test_unknown_photo_name(tiny_dinov2, capsys):
    _one_line_error(capsys, ["--model", tiny_dinov2, "--image", "astronot"], "neither an image file nor a bundled")


def test_unreadable_image_file(tiny_dinov2, tmp_path, capsys):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    _one_line_error(capsys, ["--model", tiny_dinov2, "--image", str(path)], "cannot read image")


def test_non_vit_model(image_file, tmp_path, capsys):
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    ConvNextModel(config).save_pretrained(tmp_path / "convnext")
    _one_line_error(capsys, ["--model", str(tmp_path / "convnext"), "--image", image_file], "not a vision transformer")


def test_missing_model(image_file, tmp_path, capsys):
    _one_line_error(capsys, ["--model", str(tmp_path / "nothing"), "--image", image_file], "cannot load model")


def test_too_many_landmarks(tiny_dinov2, image_file, tmp_path, capsys):
    args = ["--model", tiny_dinov2, "--image", image_file, "--resolution", "32", "--out", str(tmp_path)]
    args += ["--landmarks", "500"]
    _one_line_error(capsys, args, "exceeds the 17 tokens")
