"""The shared runner: attention switching, classification, mixed precision, data parallel, atomic reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_fna import assets
from hf_fna.cli import main
from hf_fna.evaluation import EvalSettings, run_evaluation
from hf_fna.evaluation.data import fashion_mnist_segmentation
from hf_fna.evaluation.report import write_json_atomically
from hf_fna.evaluation.tiny_models import build_tiny_clip, vocabulary
from hf_fna.tools.pipeline import EXACT, FNA, AttentionSwitch

FNA_SETTINGS = {"layers": "all", "num_landmarks": 16, "min_tokens": 0}


@pytest.fixture(scope="module")
def tiny_vit_classifier(tmp_path_factory):
    """A random ViT classifier whose classes are the Fashion-MNIST names in reverse order."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    names = list(reversed(assets.FASHION_MNIST_LABELS))
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=4,
        image_size=32,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("vit"))
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    words = vocabulary(f"a photo of a {name}." for name in assets.FASHION_MNIST_LABELS)
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip")), words)


def test_switching_back_to_exact_reproduces_the_exact_model(tiny_clip):
    from transformers import CLIPModel

    from hf_fna import FNAConfig

    reference = CLIPModel.from_pretrained(tiny_clip, attn_implementation="sdpa").eval()
    model = CLIPModel.from_pretrained(tiny_clip, attn_implementation="sdpa").eval()
    switch = AttentionSwitch(model, FNAConfig(**FNA_SETTINGS))
    pixels = torch.randn(2, 3, 64, 64)
    tokens = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}

    def images(m):
        return m.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output

    with torch.inference_mode():
        expected = images(reference)
        switch.use(FNA)
        assert model.config.vision_config._attn_implementation == "fna"
        assert model.config.text_config._attn_implementation == "sdpa"
        approximate = images(model)
        switch.use(EXACT)
        torch.testing.assert_close(images(model), expected)
        torch.testing.assert_close(
            model.get_text_features(**tokens).pooler_output, reference.get_text_features(**tokens).pooler_output
        )
    assert not torch.allclose(approximate, expected)  # FNA really changed the vision tower's output


def test_classification_maps_labels_by_name_and_matches_a_direct_computation(tiny_vit_classifier):
    from transformers import ViTForImageClassification, ViTImageProcessor

    from hf_fna.evaluation.data import load_split

    settings = EvalSettings(
        task="classification",
        model=tiny_vit_classifier,
        dataset="hf_fna:fashion_mnist",
        limit=40,
        batch_size=16,
        image_size=64,
        fna_overrides=FNA_SETTINGS,
        show_progress=False,
    )
    result = run_evaluation(settings)
    assert result.details["label_mapping"] == "by name"
    assert set(result.agreement) == {"top1_agreement", "logit_cosine"}

    model = ViTForImageClassification.from_pretrained(tiny_vit_classifier, attn_implementation="sdpa").eval()
    processor = ViTImageProcessor.from_pretrained(tiny_vit_classifier)
    test = load_split("hf_fna:fashion_mnist", "test", limit=40)
    pixels = processor(
        images=[im.convert("RGB") for im in test["image"]], size={"height": 64, "width": 64}, return_tensors="pt"
    )["pixel_values"]
    with torch.inference_mode():
        predicted = model(pixel_values=pixels, interpolate_pos_encoding=True).logits.argmax(-1)
    model_labels = 9 - torch.tensor(test["label"])  # reverse order of the class names
    assert result.metrics["exact"]["accuracy"] == pytest.approx(float((predicted == model_labels).float().mean()))


def test_bf16_mixed_precision_run(tiny_clip, tmp_path):
    output = tmp_path / "bf16.json"
    argv = (
        f"eval --task probe --model {tiny_clip} --dataset hf_fna:fashion_mnist --limit 16 "
        "--train-limit 32 --image-size 64 --mixed-precision bf16 --layers all --num-landmarks 16 "
        f"--min-tokens 0 --no-progress --output {output}"
    ).split()
    assert main(argv) == 0
    report = json.loads(output.read_text())
    assert report["settings"]["mixed_precision"] == "bf16"
    assert report["agreement"]["feature_cosine"] > 0.9


def test_a_failed_run_writes_no_report(tiny_clip, tmp_path, monkeypatch):
    import hf_fna.evaluation.tasks.linear_probe as probe

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted halfway")

    monkeypatch.setattr(probe, "fit_probe", broken)  # fails after the train features were computed
    settings = EvalSettings(
        task="probe",
        model=tiny_clip,
        dataset="hf_fna:fashion_mnist",
        limit=8,
        train_limit=8,
        image_size=32,
        output=str(tmp_path / "report.json"),
        show_progress=False,
    )
    with pytest.raises(RuntimeError, match="interrupted halfway"):
        run_evaluation(settings)
    assert os.listdir(tmp_path) == []


def test_reports_are_written_atomically_as_strict_json(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_json_atomically(str(path), {"speedup": float("nan"), "values": [1.0, float("inf")], "complete": True})
    assert json.loads(path.read_text()) == {"speedup": None, "values": [1.0, None], "complete": True}
    assert os.listdir(path.parent) == ["report.json"]


def test_derived_fashion_mnist_masks():
    dataset = fashion_mnist_segmentation(threshold=16)["test"].select(range(3))
    for row in dataset:
        image, mask = np.asarray(row["image"]), np.asarray(row["annotation"])
        assert mask.shape == image.shape == (28, 28)
        np.testing.assert_array_equal(mask, (image > 16).astype(np.uint8))


def test_two_processes_give_the_single_process_result(tiny_clip, tmp_path):
    """Data parallel on CPU (torchrun, gloo): 37 rows over 2 processes, the padded last batch dropped again."""
    common = (
        f"eval --task zero-shot --model {tiny_clip} --dataset hf_fna:fashion_mnist --limit 37 "
        "--batch-size 8 --image-size 64 --layers all --num-landmarks 16 --min-tokens 0 "
        "--no-progress"
    ).split()
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 -m hf_fna.cli".split()
    command = [*torchrun, *common, "--output", str(tmp_path / "two.json")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert main([*common, "--output", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert two["settings"]["num_processes"] == 2 and one["settings"]["num_processes"] == 1
    assert two["num_samples"] == one["num_samples"] == 37
    for variant in ("exact", "fna"):
        assert two["metrics"][variant] == pytest.approx(one["metrics"][variant])
    assert two["agreement"] == pytest.approx(one["agreement"], abs=1e-5)


def test_fna_only_run_against_a_saved_exact_reference(tiny_clip, tmp_path, monkeypatch, capsys):
    from hf_fna.evaluation.runner import Runner

    base = (
        f"eval --task probe --model {tiny_clip} --dataset hf_fna:digits --limit 12 --train-limit 24 "
        "--image-size 64 --batch-size 8 --min-tokens 0 --no-progress"
    ).split()
    saved, full, replayed = tmp_path / "exact.pt", tmp_path / "full.json", tmp_path / "replayed.json"
    assert main([*base, "--layers", "all", "--num-landmarks", "16", "--save-exact", str(saved)]) == 0
    assert saved.is_file()

    # A full run with other FNA settings, then the same settings against the saved exact reference.
    other = ["--layers", "1", "--num-landmarks", "8"]
    assert main([*base, *other, "--output", str(full)]) == 0
    variants = []
    forward = Runner._forward
    monkeypatch.setattr(Runner, "_forward", lambda self, v, *args: variants.append(v) or forward(self, v, *args))
    assert main([*base, *other, "--reference", str(saved), "--output", str(replayed)]) == 0
    assert variants and set(variants) == {"fna"}  # exact attention never ran (the probe's train features neither)
    full_report, replayed_report = (json.loads(path.read_text()) for path in (full, replayed))
    assert replayed_report["metrics"] == full_report["metrics"]
    assert replayed_report["agreement"] == pytest.approx(full_report["agreement"])
    assert replayed_report["throughput"]["exact"]["samples"] == full_report["throughput"]["exact"]["samples"]
    assert any("replayed from" in note for note in replayed_report["notes"])

    # Other data than the reference's: exit 2 with one line naming the difference.
    capsys.readouterr()
    changed = [*base, *other, "--reference", str(saved)]
    changed[changed.index("--limit") + 1] = "10"
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "limit=12 there, 10 here" in err
