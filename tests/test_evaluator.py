"""`evaluate.evaluator` on a model running FNA, in the form that works with the project's dependencies: the model
instance (evaluate 0.4.6 builds the pipeline itself; a ready `pipeline` object fails inside evaluate, which looks up
`transformers.TFPreTrainedModel`, gone in Transformers 5)."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor

import hf_fna
from hf_fna import FNAConfig


def test_image_classification_evaluator_with_the_model_instance_runs_fna(tmp_path, fna_calls):
    labels = ["cat", "dog", "bird"]
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=4,
        image_size=32,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation="fna").eval()
    FNAConfig(layers="all", num_landmarks=16, min_tokens=0).apply(model)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    data = Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]})
    result = evaluate.evaluator("image-classification").compute(
        model_or_pipeline=model,
        data=data,
        metric=hf_fna.metrics.load("accuracy"),
        feature_extractor=processor,  # a model instance carries no processor: evaluate passes this one to pipeline()
        label_mapping=model.config.label2id,
        device=-1,
    )
    assert fna_calls and set(fna_calls) == {65}  # FNA ran on the 64 patches + CLS of every image

    with torch.no_grad():
        logits = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).logits
    expected = (logits.argmax(-1) == torch.tensor(data["label"])).double().mean().item()
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12)
