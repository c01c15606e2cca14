"""Bad input to `hf-fna eval`: exit status 2 and one line naming what is wrong (tiny random models, offline)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_fna.cli import main


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = str(tmp_path_factory.mktemp("dinov2"))
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4, image_size=32
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory):
    """A saved DatasetDict with one 4-row split, `train`: `picture` and `target` columns (not the usual names)."""
    images = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8)) for i in range(4)]
    features = datasets.Features({"picture": datasets.Image(), "target": datasets.Value("int64")})
    train = datasets.Dataset.from_dict({"picture": images, "target": [0, 1, 0, 1]}, features=features)
    folder = str(tmp_path_factory.mktemp("local"))
    datasets.DatasetDict({"train": train}).save_to_disk(folder)
    return folder


def _error(capsys, *argv: str) -> str:
    assert main(["eval", *argv, "--no-progress"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("hf-fna eval: error: ") and "\n" not in message, message
    return message


def test_missing_columns_are_named_with_the_available_ones(capsys, tiny_dinov2, local_dataset):
    message = _error(capsys, "--task", "probe", "--model", tiny_dinov2, "--dataset", local_dataset, "--split", "train")
    assert "image ('image')" in message and "label ('label' or 'labels' or 'fine_label')" in message
    assert "available columns: picture, target" in message


def test_a_column_option_fixes_only_what_it_names(capsys, tiny_dinov2, local_dataset):
    message = _error(
        capsys,
        *f"--task probe --model {tiny_dinov2} --dataset {local_dataset} --split train --image-column picture".split(),
    )
    assert "image (" not in message and "label ('label'" in message


def test_empty_split(tiny_dinov2):
    from hf_fna.errors import InputError
    from hf_fna.evaluation import EvalSettings, run_evaluation

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    settings = EvalSettings(
        task="probe", model=tiny_dinov2, dataset=datasets.DatasetDict({"train": empty, "test": empty})
    )
    with pytest.raises(InputError, match=r"^split 'test' of the dataset is empty$"):
        run_evaluation(settings)


def test_unknown_split_lists_the_available_ones(capsys, tiny_dinov2, local_dataset):
    message = _error(capsys, "--task", "probe", "--model", tiny_dinov2, "--dataset", local_dataset)
    assert message.endswith("the dataset has no split 'test'; available splits: train")


def test_zero_shot_on_a_vision_only_model(capsys, tiny_dinov2):
    message = _error(capsys, "--task", "zero-shot", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist")
    assert "needs an image and a text tower (CLIP, SigLIP); 'dinov2' is a vision-only model" in message


def test_vqa_on_a_vision_only_model(capsys, tiny_dinov2):
    message = _error(capsys, "--task", "vqa", "--model", tiny_dinov2, "--dataset", "hf_fna:easy_vqa")
    assert "needs a LLaVA-style model" in message


def test_classification_needs_a_classification_head(capsys, tiny_dinov2):
    message = _error(capsys, "--task", "classification", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist")
    assert "needs a checkpoint with an image-classification head" in message and "--task probe" in message


def test_unknown_builtin_dataset(capsys, tiny_dinov2):
    message = _error(capsys, "--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:mnist")
    assert "available: hf_fna:fashion_mnist, hf_fna:fashion_mnist_segmentation" in message


def test_missing_model_folder(capsys, tmp_path):
    message = _error(capsys, "--task", "probe", "--model", str(tmp_path / "nowhere"), "--dataset", "hf_fna:photos")
    assert "could not load the config" in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--layers", "six"], "layers 'six' is invalid; give layer indices"),
        (["--num-landmarks", "0"], "num_landmarks=0 is invalid"),
        (["--layers", "5:"], "out of range for a tower with 2 layers"),
        (["--limit", "0"], "limit must be a positive integer"),
        (["--prompt", "a photo"], "must contain '{}'"),
    ],
)
def test_bad_options(capsys, tiny_dinov2, options, expected):
    message = _error(capsys, "--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist", *options)
    assert expected in message
