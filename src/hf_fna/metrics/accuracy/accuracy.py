"""Accuracy: the fraction of predictions equal to their reference label."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predicted labels equal to the reference labels, in [0, 1]."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): reference labels.
    normalize (bool): return the fraction (default) or the number of correct predictions.
Returns:
    accuracy (float): the fraction (or count) of correct predictions.
Example:
    >>> metric = evaluate.load("path/to/hf_fna/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize: bool = True) -> dict:
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one prediction.")
        correct = np.asarray(predictions) == np.asarray(references)
        return {"accuracy": float(correct.mean()) if normalize else float(correct.sum())}
