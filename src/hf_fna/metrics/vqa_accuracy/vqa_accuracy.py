"""VQA accuracy and exact match, after the standard VQA answer normalisation."""

import re
from collections import Counter

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
VQA accuracy (Antol et al. 2015; the official VQA evaluation script): a predicted answer scores
min(#human answers equal to it / 3, 1), averaged over the leave-one-out subsets of the human answers (10 subsets of
9 answers for VQAv2), then averaged over questions. exact_match: the prediction equals the reference answer (with
several references, the most frequent one). Predictions and references are normalised first as the official script
does: lowercase, punctuation removed or turned into spaces, number words turned into digits ("two" -> "2"), articles
(a, an, the) dropped. Unlike the official script, references are normalised even when all of them agree, and the
official list of about 100 apostrophe-less contractions ("dont" -> "don't") is not applied.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one generated answer per question.
    references (list of list of str): the human answers of each question (10 for VQAv2, 1 for single-answer sets).
Returns:
    vqa_accuracy (float): in [0, 1]; always 0 for a question with a single reference (no leave-one-out subset holds
        an answer), so use exact_match for single-answer datasets.
    exact_match (float): in [0, 1].
Example:
    >>> metric = evaluate.load("path/to/hf_fna/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["Two."], references=[["2", "2", "two", "3"]])
    {'vqa_accuracy': 0.75, 'exact_match': 1.0}
"""

_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # what the official `(?!<=\d)(\.)(?!\d)` pattern matches


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation: `normalize_answer("Two dogs!") == "2 dogs"`."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark next to a space (or any mark in a text with a digit-comma-digit) is removed, else it
    # becomes a space: "black/white" -> "black white", "yes, it is" -> "yes it is".
    glued = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        removed = glued or f"{mark} " in text or f" {mark}" in text
        text = text.replace(mark, "" if removed else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(word for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list) -> float:
    """min(#matches / 3, 1) averaged over the leave-one-out subsets of `references` (all normalised)."""
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(r) == prediction for r in references]
    total = sum(matches)
    return float(np.mean([min((total - hit) / 3, 1.0) for hit in matches]))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        if len(predictions) == 0:
            raise ValueError("vqa_accuracy needs at least one question.")
        if any(len(answers) == 0 for answers in references):
            raise ValueError("vqa_accuracy: every question needs at least one reference answer.")
        accuracies, exact = [], []
        for prediction, answers in zip(predictions, references, strict=True):
            accuracies.append(vqa_accuracy(prediction, answers))
            majority = Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]
            exact.append(normalize_answer(prediction) == majority)
        return {"vqa_accuracy": float(np.mean(accuracies)), "exact_match": float(np.mean(exact))}
