"""VQA end to end on a tiny random LLaVA (built offline) with easy-vqa, FNA in the vision tower."""

from __future__ import annotations

import json

import datasets
import easy_vqa
import pytest

from hf_fna.cli import main
from hf_fna.evaluation import EvalSettings, run_evaluation
from hf_fna.evaluation.tasks import vqa as vqa_task
from hf_fna.evaluation.tiny_models import build_tiny_llava, vocabulary

IMAGE_TOKENS = (32 // 4) ** 2 + 1  # the tiny vision tower: 32 px, patch 4, plus CLS


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    questions, _, _ = easy_vqa.get_train_questions()
    words = vocabulary(questions + easy_vqa.get_answers())
    return build_tiny_llava(str(tmp_path_factory.mktemp("llava")), words)


def test_answer_layouts():
    assert vqa_task.answer_list("circle") == ["circle"]
    assert vqa_task.answer_list(["2", "two"]) == ["2", "two"]
    assert vqa_task.answer_list([{"answer": "yes", "answer_id": 1}, {"answer": "no", "answer_id": 2}]) == ["yes", "no"]
    assert vqa_task.answer_list({"answer": ["red", "blue"], "answer_id": [1, 2]}) == ["red", "blue"]


def test_vqa_end_to_end_on_easy_vqa_with_fna_in_the_vision_tower(tiny_llava, tmp_path, fna_calls):
    output = tmp_path / "vqa.json"
    argv = (
        f"eval --task vqa --model {tiny_llava} --dataset hf_fna:easy_vqa --limit 12 --batch-size 6 "
        "--max-new-tokens 3 --layers all --num-landmarks 16 --min-tokens 0 --no-progress --output "
        f"{output}"
    ).split()
    assert main(argv) == 0
    report = json.loads(output.read_text())
    # FNA ran, and only on sequences of image tokens: the vision tower; the language model stayed exact.
    assert fna_calls and set(fna_calls) == {IMAGE_TOKENS}
    assert report["settings"]["tokens_per_image"] == IMAGE_TOKENS
    assert report["num_samples"] == 12
    # easy-vqa has one answer per question: exact match is the metric.
    assert report["details"]["single_answer_dataset"] is True
    assert set(report["metrics"]["exact"]) == set(report["metrics"]["fna"]) == {"exact_match"}
    assert 0.0 <= report["agreement"]["answer_agreement"] <= 1.0
    example = report["details"]["examples"][0]
    assert isinstance(example["exact"], str) and isinstance(example["fna"], str) and example["answers"]


def test_vqa_accuracy_through_the_task_on_vqav2_style_fixtures(tiny_llava, monkeypatch):
    # Three questions with ten human answers in the VQAv2 layout; the model is replaced by fixed answers.
    image = easy_vqa.get_test_image_paths()[0]
    answers = [["2"] * 3 + ["3"] * 7, ["two"] * 10, ["cat"] + ["dog"] * 9]
    rows = {
        "image": [image] * 3,
        "question": ["how many?", "how many?", "what animal?"],
        "answers": [[{"answer": a, "answer_id": i} for i, a in enumerate(per_question)] for per_question in answers],
    }
    fixtures = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    monkeypatch.setattr(
        vqa_task.GenerateAnswers,
        "__call__",
        lambda self, model, inputs: {"answer": ["Two"] * inputs["input_ids"].shape[0]},
    )
    result = run_evaluation(
        EvalSettings(task="vqa", model=tiny_llava, dataset=fixtures, batch_size=2, show_progress=False)
    )
    # "Two" -> "2". Question 1: 3 of 10 answers match: 3 subsets of 9 keep 2 matches (2/3), 7 keep 3 (1) -> 0.9.
    # Question 2: all ten match -> 1. Question 3: none -> 0. Exact match (most frequent answer): only question 2.
    for variant in ("exact", "fna"):
        assert result.metrics[variant]["vqa_accuracy"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
        assert result.metrics[variant]["exact_match"] == pytest.approx(1 / 3)
    assert result.agreement["answer_agreement"] == 1.0
    assert result.details["single_answer_dataset"] is False
