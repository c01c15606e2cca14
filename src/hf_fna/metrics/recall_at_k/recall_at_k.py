"""Recall@K for retrieval: the fraction of queries with at least one relevant candidate among the top K."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Recall@K for retrieval (image-to-text, text-to-image): the fraction of queries for which at least one relevant "
    "candidate is ranked among the first K. This is the recall reported for COCO and Flickr30k retrieval, where an "
    "image has several relevant captions."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): per query, candidate indices ranked best first. Each list must hold at least
        max(k) candidates, or the whole gallery when it is smaller.
    references (list of list of int): per query, the indices of its relevant candidates (at least one).
    k (list of int): the cut-offs, default [1, 5, 10].
Returns:
    recall@K (float) for each K, in [0, 1].
Example:
    >>> metric = evaluate.load("path/to/hf_fna/metrics/recall_at_k")
    >>> metric.compute(predictions=[[2, 0, 1], [0, 1, 2]], references=[[0], [2]], k=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10)) -> dict:
        if len(predictions) == 0:
            raise ValueError("recall_at_k needs at least one query.")
        if any(len(relevant) == 0 for relevant in references):
            raise ValueError("recall_at_k: every query needs at least one relevant candidate in `references`.")
        # Rank (0-based) of the best-ranked relevant candidate of each query; inf when none was retrieved.
        first_hit = np.array(
            [
                min((rank for rank, c in enumerate(ranked) if c in set(relevant)), default=np.inf)
                for ranked, relevant in zip(predictions, references, strict=True)
            ]
        )
        return {f"recall@{cutoff}": float((first_hit < cutoff).mean()) for cutoff in k}
