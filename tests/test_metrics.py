"""The bundled `evaluate` metric modules against hand-computed values (all offline)."""

from __future__ import annotations

import math
import subprocess
import sys

import evaluate
import numpy as np
import pytest

from hf_fna import metrics


@pytest.fixture(scope="module")
def loaded():
    return {name: metrics.load(name) for name in metrics.METRIC_NAMES}


def test_every_metric_loads_with_evaluate_load_from_its_folder():
    for name in metrics.METRIC_NAMES:
        module = evaluate.load(metrics.metric_path(name))
        assert isinstance(module, evaluate.Metric)


def test_metrics_load_after_a_bare_import_hf_fna():
    # As the README writes it, in a fresh interpreter (here, other tests have imported hf_fna.metrics already).
    code = "import hf_fna; print(hf_fna.metrics.load('accuracy').compute(predictions=[1, 0], references=[1, 1]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "{'accuracy': 0.5}" in result.stdout


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(ValueError, match="available: accuracy, recall_at_k, mean_iou, vqa_accuracy"):
        metrics.load("bleu")


def test_accuracy(loaded):
    # 3 of 4 correct.
    assert loaded["accuracy"].compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert loaded["accuracy"].compute(predictions=[5, 5], references=[5, 4], normalize=False) == {"accuracy": 1.0}


def test_recall_at_k_with_several_relevant_candidates(loaded):
    # Query 0: relevant {3, 4}; its first relevant candidate (4) is ranked 2nd -> counts from K=2 on.
    # Query 1: relevant {0}; ranked 1st -> counts from K=1.
    # Query 2: relevant {1}; ranked 4th -> counts from K=4.
    ranked = [[2, 4, 3, 0, 1], [0, 2, 1, 3, 4], [0, 2, 3, 1, 4]]
    relevant = [[3, 4], [0], [1]]
    result = loaded["recall_at_k"].compute(predictions=ranked, references=relevant, k=[1, 2, 3, 4])
    assert result == {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3, "recall@4": 1.0}


def test_recall_at_k_rejects_queries_without_relevant_candidates(loaded):
    with pytest.raises(ValueError, match="at least one relevant"):
        loaded["recall_at_k"].compute(predictions=[[0, 1]], references=[[]], k=[1])


def test_mean_iou_by_hand(loaded):
    # Image 1: reference [[0, 0], [1, 1]], prediction [[0, 1], [1, 1]].
    # Image 2: reference [[2, 255], [0, 2]] (255 ignored), prediction [[2, 0], [0, 1]].
    # Totals over both images (ignored pixel left out):
    #   class 0: intersection 1 + 1 = 2; predicted 1 + 1 = 2, reference 2 + 1 = 3 -> union 3 -> IoU 2/3
    #   class 1: intersection 2 + 0 = 2; predicted 3 + 1 = 4, reference 2 + 0 = 2 -> union 4 -> IoU 1/2
    #   class 2: intersection 0 + 1 = 1; predicted 0 + 1 = 1, reference 0 + 2 = 2 -> union 2 -> IoU 1/2
    #   class 3: absent everywhere -> NaN, left out of the mean
    predictions = [np.array([[0, 1], [1, 1]]), np.array([[2, 0], [0, 1]])]
    references = [np.array([[0, 0], [1, 1]]), np.array([[2, 255], [0, 2]])]
    result = loaded["mean_iou"].compute(predictions=predictions, references=references, num_labels=4, ignore_index=255)
    assert result["mean_iou"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert result["per_category_iou"][:3] == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert math.isnan(result["per_category_iou"][3])
    assert result["overall_accuracy"] == pytest.approx(5 / 7)  # 5 of the 7 counted pixels are right
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 2 / 2 + 1 / 2) / 3)  # per-class recall


def test_mean_iou_rejects_labels_out_of_range(loaded):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        loaded["mean_iou"].compute(predictions=[[[0, 2]]], references=[[[0, 1]]], num_labels=2)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs!", "2 dogs"),  # number word, punctuation next to nothing -> removed at the end
        ("The red one.", "red 1"),  # article dropped, period removed, "one" -> "1"
        ("black/white", "black white"),  # a glued mark becomes a space
        ("yes, it is", "yes it is"),  # a mark followed by a space is removed
        ("3.5", "3.5"),  # decimal point kept
        ("1,000", "1000"),  # digit-comma-digit: commas removed
        ("  An\tapple\n", "apple"),
    ],
)
def test_vqa_answer_normalisation(raw, normalized):
    from hf_fna.metrics.vqa_accuracy.vqa_accuracy import normalize_answer

    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_by_hand(loaded):
    # Ten human answers: "2" x 3 (one spelled "two"), "3" x 7.
    answers = ["2", "two", "2", "3", "3", "3", "3", "3", "3", "3"]
    # Prediction "2": leaving out one of the three "2" answers leaves 2 matches -> 2/3 (3 subsets); leaving out a
    # "3" answer leaves 3 matches -> 1 (7 subsets): (3 * 2/3 + 7 * 1) / 10 = 0.9.
    # Prediction "3": 7 matches, always >= 3 left -> 1.  Prediction "4": 0.
    # Exact match is against the most frequent answer ("3").
    result = loaded["vqa_accuracy"].compute(predictions=["Two", "three.", "4"], references=[answers] * 3)
    assert result["vqa_accuracy"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert result["exact_match"] == pytest.approx(1 / 3)


def test_vqa_accuracy_with_one_or_two_matching_answers(loaded):
    # One matching answer of ten: 9 subsets keep it (1/3), 1 drops it (0) -> 0.3. Two: 8 * 2/3 + 2 * 1/3 = 6/10.
    one = ["cat"] + ["dog"] * 9
    two = ["cat", "cat"] + ["dog"] * 8
    assert loaded["vqa_accuracy"].compute(predictions=["cat"], references=[one])["vqa_accuracy"] == pytest.approx(0.3)
    assert loaded["vqa_accuracy"].compute(predictions=["cat"], references=[two])["vqa_accuracy"] == pytest.approx(0.6)


def test_exact_match_for_single_answer_datasets(loaded):
    references = [["circle"], ["red"], ["No"]]
    result = loaded["vqa_accuracy"].compute(predictions=["A circle", "blue", "no"], references=references)
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["vqa_accuracy"] == 0.0  # undefined with a single reference: documented, use exact_match
