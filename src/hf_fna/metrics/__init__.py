"""`evaluate` metric modules shipped with hf-fna, so that evaluation works offline.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub, which fails without a network. Each metric
here is a local module, `metrics/<name>/<name>.py`, loadable with `evaluate.load(<that folder>)` or with
`hf_fna.metrics.load(name)`:

- `accuracy`: fraction of predicted labels equal to the reference labels.
- `recall_at_k`: retrieval recall@K from ranked candidate lists (several relevant candidates per query allowed).
- `mean_iou`: semantic segmentation IoU per class and its mean, accumulated over the whole dataset.
- `vqa_accuracy`: VQA accuracy (min(#matching human answers / 3, 1), averaged over the leave-one-out subsets of the
  reference answers) and exact match, after the standard VQA answer normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError

METRIC_NAMES = ("accuracy", "recall_at_k", "mean_iou", "vqa_accuracy")


def metric_path(name: str) -> str:
    """Folder of the metric module `name`, as `evaluate.load` accepts it."""
    if name not in METRIC_NAMES:
        raise InputError(f"Unknown hf_fna metric {name!r}; available: {', '.join(METRIC_NAMES)}.")
    return str(Path(__file__).resolve().parent / name)


def load(name: str, **kwargs: Any) -> Any:
    """`evaluate.load` of the bundled metric `name` (kept in memory unless `keep_in_memory=False` is passed)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)
