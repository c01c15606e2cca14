"""Retrieval and zero-shot end to end on a tiny random CLIP (built offline) with local datasets."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fna import assets
from hf_fna.cli import main
from hf_fna.evaluation import EvalSettings, run_evaluation
from hf_fna.evaluation.tasks.retrieval import retrieval_recalls
from hf_fna.evaluation.tiny_models import build_tiny_clip, vocabulary

FNA_OPTIONS = ["--layers", "all", "--num-landmarks", "16", "--min-tokens", "0"]


@pytest.fixture(scope="module")
def photos_with_captions(tmp_path_factory):
    """The scikit-image photos with three captions each, saved with `save_to_disk` (a local dataset folder)."""
    photos = assets.photos()
    captions = [[f"a photo of {name}", name, f"the {name} picture"] for name in photos["name"]]
    folder = str(tmp_path_factory.mktemp("photos"))
    photos.add_column("captions", captions).save_to_disk(folder)
    return folder, captions


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, photos_with_captions):
    _, captions = photos_with_captions
    prompts = [f"a photo of a {name}." for name in assets.FASHION_MNIST_LABELS]
    words = vocabulary([*prompts, *(c for per_image in captions for c in per_image)])
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip")), words)


def test_recall_at_k_on_a_fixed_similarity_matrix():
    # 3 images, 5 texts; texts 0-1 describe image 0, text 2 image 1, texts 3-4 image 2.
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.3, 0.2],  # ranks t0 t2 t3 t4 t1: t0 (own) first -> hit at K=1
            [0.5, 0.4, 0.3, 0.6, 0.7],  # ranks t4 t3 t0 t1 t2: own t2 fifth -> hit at K=5 only
            [0.2, 0.6, 0.1, 0.5, 0.4],  # ranks t1 t3 t4 t0 t2: own t3 second -> hit from K=2
        ]
    )
    # Text to image, own image rank: t0 1st (0.9), t1 3rd (0.1 < 0.4 < 0.6), t2 2nd (0.3 < 0.8),
    # t3 2nd (0.5 < 0.6), t4 2nd (0.4 < 0.7).
    recalls = retrieval_recalls(similarity, [0, 0, 1, 2, 2], k=(1, 2, 5))
    assert recalls == pytest.approx(
        {
            "i2t_recall@1": 1 / 3,
            "i2t_recall@2": 2 / 3,
            "i2t_recall@5": 1.0,
            "t2i_recall@1": 1 / 5,
            "t2i_recall@2": 4 / 5,
            "t2i_recall@5": 1.0,
        }
    )


def test_retrieval_end_to_end_from_a_saved_dataset(tiny_clip, photos_with_captions, tmp_path, fna_calls):
    folder, captions = photos_with_captions
    output = tmp_path / "retrieval.json"
    argv = [
        *(
            f"eval --task retrieval --model {tiny_clip} --dataset {folder} --image-size 64 --batch-size "
            f"8 --no-progress --output {output}"
        ).split(),
        *FNA_OPTIONS,
    ]
    assert main(argv) == 0
    report = json.loads(output.read_text())
    assert report["complete"] and report["num_samples"] == len(captions) == 18
    assert report["details"] == {"images": 18, "captions": 54}
    assert fna_calls and set(fna_calls) == {(64 // 4) ** 2 + 1}  # vision tower only; the text tower stays exact

    # The exact column equals recall computed by hand from a freshly loaded exact model.
    from transformers import CLIPModel, CLIPProcessor

    from hf_fna.evaluation.data import load_split

    model = CLIPModel.from_pretrained(tiny_clip, attn_implementation="sdpa").eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    images = [image.convert("RGB") for image in load_split(folder, "test")["image"]]
    texts = [c for per_image in captions for c in per_image]
    with torch.inference_mode():
        pixels = processor.image_processor(
            images=images, size={"height": 64, "width": 64}, do_center_crop=False, return_tensors="pt"
        )["pixel_values"]
        image_embeds = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        text_embeds = model.get_text_features(**processor.tokenizer(texts, padding=True, return_tensors="pt"))
        text_embeds = text_embeds.pooler_output
    normalize = torch.nn.functional.normalize
    similarity = normalize(image_embeds, dim=-1) @ normalize(text_embeds, dim=-1).T
    expected = retrieval_recalls(similarity, [i for i in range(18) for _ in range(3)])
    assert report["metrics"]["exact"] == pytest.approx(expected)
    assert set(report["metrics"]["fna"]) == set(expected)
    assert set(report["agreement"]) == {"embedding_cosine", "i2t_top1_agreement", "t2i_top1_agreement"}
    assert report["agreement"]["embedding_cosine"] > 0.9


def test_zero_shot_end_to_end_with_the_python_api(tiny_clip, fna_calls):
    settings = EvalSettings(
        task="zero-shot",
        model=tiny_clip,
        dataset="hf_fna:fashion_mnist",
        limit=24,
        batch_size=8,
        image_size=64,
        fna_overrides={"layers": "all", "num_landmarks": 16, "min_tokens": 0},
        show_progress=False,
    )
    result = run_evaluation(settings)
    assert fna_calls
    assert result.num_samples == 24
    assert result.details["class_names"][0] == "T-shirt/top"
    for variant in ("exact", "fna"):
        assert 0.0 <= result.metrics[variant]["accuracy"] <= 1.0
    assert 0.0 <= result.agreement["top1_agreement"] <= 1.0
    assert result.throughput["exact"]["samples"] > 0 and result.throughput["speedup"] > 0
    table = result.to_markdown()
    assert "| accuracy |" in table and "| top1_agreement |" in table and "samples/s" in table


def test_retrieval_offline_on_easy_vqa_captions(tmp_path, fna_calls):
    from hf_fna.evaluation.data import easy_vqa_captions

    test = easy_vqa_captions()["test"]
    assert len(test) > 500 and set(test.column_names) == {"image", "image_id", "caption"}
    # Captions come from each image's own questions: "what is the color of the <shape>?" agrees with it.
    questions = assets.easy_vqa("test").filter(lambda row: row["question"].startswith("what is the color of the "))
    caption_of = dict(zip(test["image_id"], test["caption"], strict=True))
    checked = 0
    rows = zip(questions["question"], questions["answer"], questions["image_id"], strict=True)
    for question, answer, image_id in rows:
        shape = question.removeprefix("what is the color of the ").removesuffix("?")
        if image_id in caption_of and shape != "shape":
            assert caption_of[image_id] == f"a {answer} {shape}"
            checked += 1
    assert checked > 100

    model = build_tiny_clip(str(tmp_path / "clip"), vocabulary(set(test["caption"])))
    output = tmp_path / "retrieval.json"
    argv = [
        *f"eval --task retrieval --model {model} --dataset hf_fna:easy_vqa_captions --limit 12 --image-size 64 "
        f"--batch-size 6 --no-progress --output {output}".split(),
        *FNA_OPTIONS,
    ]
    assert main(argv) == 0
    report = json.loads(output.read_text())
    assert report["num_samples"] == 12 and report["details"] == {"images": 12, "captions": 12}
    assert fna_calls and "i2t_recall@1" in report["metrics"]["fna"]
