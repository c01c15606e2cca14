"""`hf_fna.calibrate` and `hf-fna calibrate`: layer sensitivities, a schedule that meets the target, honest reports."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, Dinov2Config, Dinov2Model

import hf_fna
from hf_fna.cli import main
from hf_fna.schedules import schedule_from_landmarks
from hf_fna.tools.calibration import cheapest_schedule


@pytest.fixture(scope="module")
def tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=64, patch_size=4
    )
    return Dinov2Model(config).eval()


def pixels(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_knapsack_picks_the_cheapest_schedule_within_the_loss_budget():
    # Layer 0 is hard, layers 1-3 easy at m=64 and lossless at m=128; each larger m costs more FLOPs.
    sensitivity = {
        0: {64: 0.90, 128: 0.95},
        1: {64: 0.995, 128: 1.0},
        2: {64: 0.995, 128: 1.0},
        3: {64: 0.999, 128: 1.0},
    }
    args = (4097, 384, 6, 4.0)
    assert cheapest_schedule(sensitivity, (64, 128), 0.02, *args) == [None, 64, 64, 64]
    # A tighter budget: the lossless m=128 in layers 1-2 still beats exact attention on cost.
    assert cheapest_schedule(sensitivity, (64, 128), 0.005, *args) == [None, 128, 128, 64]
    assert cheapest_schedule(sensitivity, (64, 128), 0.2, *args) == [64, 64, 64, 64]
    assert cheapest_schedule(sensitivity, (64, 128), 0.0001, *args) == [None, 128, 128, 128]
    lossy = {layer: {64: 0.9} for layer in range(3)}
    assert cheapest_schedule(lossy, (64,), 0.05, *args) == [None] * 3
    assert schedule_from_landmarks([None, 64, 64, 128, 64]) == "1:3@64;3:4@128;4:5@64"
    assert schedule_from_landmarks([None, None]) == "none"


def test_calibrate_reaches_a_loose_target_with_every_layer_and_reports_held_out_fidelity(tiny_dinov2):
    report = hf_fna.calibrate(tiny_dinov2, pixels(), target=0.5, candidates=(8, 32), batch_size=2, progress=False)
    assert report.met_target and report.config.layers == "0:4@8"  # the cheapest schedule of all
    assert report.chosen["fidelity"] >= 0.5 and report.heldout["images"] == 2
    assert set(report.sensitivity) == {0, 1, 2, 3} and set(report.sensitivity[0]) == {8, 32}
    # 1 reference + sensitivity passes (skipped where a smaller m is already lossless) + schedules + held-out pair.
    sensitivity_passes = report.forward_passes - 1 - len(report.frontier) - 2
    assert 4 <= sensitivity_passes <= 8
    assert hf_fna.FNAConfig.from_model_config(tiny_dinov2.config).layers == "0:4@8"  # left applied
    again = hf_fna.calibrate(tiny_dinov2, pixels(), target=0.5, candidates=(8, 32), batch_size=2, progress=False)
    assert again.frontier == report.frontier and again.heldout == report.heldout  # deterministic


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "l2"}, r"metric='l2'\) is not supported; accepted values: patch_cosine, token_cosine, cls_cosine"),
        ({"target": 1.5}, r"target=1.5\) is invalid; expected a number in \(0, 1\]"),
        ({"candidates": (0,)}, r"candidates=\(0,\)\) is invalid; expected positive integers"),
        ({"candidates": (4096,)}, r"holds no count below the 257 tokens"),
        ({"images": torch.zeros(2, 64, 64)}, r"shape \(2, 64, 64\); expected \[B, 3, H, W\]"),
        ({"images": torch.zeros(1, 3, 64, 64)}, r"at least 2 images to hold some out"),
    ],
)
def test_bad_arguments_name_the_value(tiny_dinov2, kwargs, message):
    arguments = {"images": pixels(), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        hf_fna.calibrate(tiny_dinov2, **arguments)


def test_cli_writes_config_card_report_and_plot(tiny_dinov2, tmp_path, capsys):
    from PIL import Image

    model_dir, image_dir, out = tmp_path / "model", tmp_path / "images", tmp_path / "out"
    tiny_dinov2.save_pretrained(model_dir)
    image_dir.mkdir()
    for i in range(4):
        array = (torch.rand(80, 96, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(array).save(image_dir / f"{i}.png")
    argv = ["calibrate", "--model", str(model_dir), "--images", str(image_dir), "--resolution", "64"]
    code = main([*argv, "--target", "0.5", "--candidates", "8", "--base-model", "someone/tiny", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen: layers='0:4@8'" in printed and "held-out images" in printed
    assert hf_fna.FNAConfig.from_pretrained(str(out)).layers == "0:4@8"
    report = json.loads((out / "calibration.json").read_text())
    assert report["heldout"]["images"] == 2 and report["calibration_images"] == 2 and report["command"]
    card = (out / "README.md").read_text()
    assert "base_model: someone/tiny" in card and "![frontier](frontier.png)" in card and "not measured" not in card
    assert (out / "frontier.png").stat().st_size > 1000
    loaded = AutoModel.from_pretrained(model_dir, attn_implementation="fna")
    hf_fna.FNAConfig.from_pretrained(str(out)).apply(loaded)  # ready to use


def test_cli_refuses_an_unwritable_output_before_computing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["calibrate", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_dinov2():
    from hf_fna import assets

    torch.set_num_threads(2)
    return AutoModel.from_pretrained(assets.dinov2_small(), attn_implementation="fna").eval()


@pytest.mark.real_weights
def test_calibration_on_the_bundled_dinov2_meets_its_target_on_held_out_photos(real_dinov2):
    from hf_fna import assets

    tune, report_photos = assets.photos("tune")["image"][:4], assets.photos("report")["image"][:4]
    report = hf_fna.calibrate(
        real_dinov2, tune, target=0.98, resolution=224, heldout=report_photos, candidates=(32, 64, 128), progress=False
    )
    assert report.tokens == 257 and report.met_target
    assert report.chosen["fidelity"] >= 0.98 and report.chosen["predicted_speedup"] > 1.0
    assert report.heldout["fidelity"] >= 0.95, report.heldout
    # Real layers differ: some tolerate FNA far better than others.
    losses = [1 - row[32] for row in report.sensitivity.values()]
    assert max(losses) > 3 * min(losses)
    # Every measured schedule is on the frontier with its measured fidelity; far fewer passes than a grid search
    # over 4 choices per layer (4^12 schedules).
    assert all(0 < row["fidelity"] <= 1 + 1e-6 for row in report.frontier)
    assert report.forward_passes <= 1 + 12 * 3 + len(report.frontier) + 2


@pytest.mark.real_weights
def test_an_unreachable_target_chooses_exact_attention_and_says_why(real_dinov2):
    from hf_fna import assets

    photos = assets.photos("tune")["image"][:2]
    report = hf_fna.calibrate(real_dinov2, photos, target=0.99999, resolution=224, candidates=(16,), progress=False)
    assert not report.met_target and report.config.layers == "none" and report.chosen["schedule"] == "none"
    assert "No measured schedule reached patch_cosine >= 0.99999" in report.notes[0] and "layer" in report.notes[0]


def test_an_unreachable_target_names_the_most_faithful_measured_schedule_not_exact_attention():
    """The note reports the best fidelity among the measured schedules, not the 1.0 of the exact-attention row that
    the frontier lists once exact attention is chosen."""
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=64, patch_size=4,
        layerscale_value=1.0,
    )  # fmt: skip
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # sharper attention than at initialisation, so that 2 landmarks lose something everywhere
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(8)
    report = hf_fna.calibrate(model, pixels(), target=0.9999, candidates=(2,), batch_size=2, progress=False)
    assert not report.met_target and report.config.layers == "none" and report.chosen["fidelity"] == 1.0
    measured = [row for row in report.frontier if not row.get("chosen")]
    best = max(row["fidelity"] for row in measured)
    assert measured and f"{best:.4f}" != "1.0000"
    assert f"No measured schedule reached patch_cosine >= 0.9999; the most faithful reached {best:.4f}." in (
        report.notes[0]
    )


def test_no_schedule_faster_than_exact_chooses_exact_attention_with_the_default_min_tokens(tiny_dinov2):
    # 16 px inputs: 17 tokens, where every schedule's FLOP bound is below 1 although the loose target is met.
    small = pixels()[:, :, :16, :16]
    report = hf_fna.calibrate(tiny_dinov2, small, target=0.5, candidates=(8,), batch_size=2, progress=False)
    assert report.tokens == 17 and report.met_target
    assert all(row["predicted_speedup"] < 1.0 for row in report.frontier if row["schedule"] != "none")
    assert report.config.layers == "none" and report.chosen["schedule"] == "none"
    assert report.config.min_tokens == hf_fna.FNAConfig().min_tokens  # FNA is not forced below its break-even
    assert "none is faster than exact attention at 17 tokens" in report.notes[0]


def test_a_full_clip_model_calibrates_its_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=64)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = CLIPModel(CLIPConfig(vision_config=dict(vision, patch_size=4), text_config=text, projection_dim=16)).eval()
    report = hf_fna.calibrate(model, pixels(), target=0.5, candidates=(8, 32), batch_size=2, progress=False)
    assert report.tokens == 257 and report.config.layers == "0:4@8"
    assert hf_fna.FNAConfig.from_model_config(model.config.vision_config).layers == "0:4@8"
    assert model.config.vision_config._attn_implementation == "fna"
    assert model.config.text_config._attn_implementation != "fna"


def test_progress_bar_honours_tqdm_disable_and_transformers_switch(tiny_dinov2, monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    small = pixels()[:, :, :16, :16]

    def bar_drawn() -> bool:
        hf_fna.calibrate(tiny_dinov2, small, target=0.5, candidates=(8,), batch_size=4)
        return "calibrating" in capsys.readouterr().err

    assert bar_drawn()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not bar_drawn()
    monkeypatch.delenv("TQDM_DISABLE")
    hf_logging.disable_progress_bar()
    try:
        assert not bar_drawn()
    finally:
        hf_logging.enable_progress_bar()


def test_cli_calibrates_a_local_clip_with_its_processor_statistics_and_invents_no_base_model(
    tmp_path, capsys, monkeypatch
):
    """`hf-fna calibrate` on a tiny CLIPModel folder with a CLIPImageProcessor: the vision tower receives pixels
    normalised with CLIP's mean and std (not ImageNet's); 17 tokens make exact attention the choice; the card of a
    local model names no base model."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model_dir, image_dir, out = tmp_path / "clip", tmp_path / "images", tmp_path / "out"
    config = CLIPConfig(vision_config=dict(vision, patch_size=8), text_config=text, projection_dim=16)
    CLIPModel(config).save_pretrained(model_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(model_dir)
    image_dir.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 32), (128, 64, 200)).save(image_dir / f"{i}.png")

    seen = []
    from transformers.models.clip import modeling_clip

    original = modeling_clip.CLIPVisionEmbeddings.forward

    def recording(self, pixel_values, *args, **kwargs):  # the pixels that reach the vision tower
        seen.append(pixel_values.detach().clone())
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(modeling_clip.CLIPVisionEmbeddings, "forward", recording)
    argv = ["calibrate", "--model", str(model_dir), "--images", str(image_dir), "--resolution", "32", "--target", "0.5"]
    code = main([*argv, "--candidates", "8", "--device", "cpu", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    expected = (torch.tensor([128, 64, 200]) / 255 - mean) / std
    torch.testing.assert_close(seen[0][0, :, 5, 5], expected, atol=1e-5, rtol=0)
    assert "calibrating" not in captured.err  # --no-progress
    assert "chosen: layers='none'" in captured.out
    assert hf_fna.FNAConfig.from_pretrained(str(out)).layers == "none"
    card = (out / "README.md").read_text()
    assert "base_model" not in card and "huggingface.co/" not in card
    assert str(model_dir) in card and "its Hub id is unknown" in card
    assert main(["calibrate", "--model", str(model_dir), "--device", "tpu:9"]) == 2
    assert "--device 'tpu:9'" in capsys.readouterr().err

    # The Python API defaults to the same statistics, found from the model's name_or_path.
    seen.clear()
    photos = [Image.open(image_dir / f"{i}.png") for i in range(4)]
    model = AutoModel.from_pretrained(model_dir)
    hf_fna.calibrate(model, photos, target=0.5, resolution=32, candidates=(8,), progress=False)
    torch.testing.assert_close(seen[0][0, :, 5, 5], expected, atol=1e-5, rtol=0)
