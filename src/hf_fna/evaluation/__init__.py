"""Task evaluation of models with exact and FNA attention side by side (`hf-fna eval` and its Python API).

    from hf_fna.evaluation import EvalSettings, run_evaluation
    result = run_evaluation(EvalSettings(task="probe", model="facebook/dinov2-small", dataset="hf_fna:fashion_mnist",
                                         limit=1000, train_limit=5000, image_size=448,
                                         fna_overrides={"layers": "6:", "num_landmarks": 64, "min_tokens": 0}))
    result.metrics["fna"]["accuracy"], result.agreement, result.throughput["speedup"]

Tasks, one module each in `tasks/`: classification, probe (`linear_probe`), zero-shot, retrieval, segmentation, vqa.
"""

from .report import EvalResult
from .runner import run_evaluation
from .settings import TASKS, EvalSettings

__all__ = ["TASKS", "EvalResult", "EvalSettings", "run_evaluation"]
