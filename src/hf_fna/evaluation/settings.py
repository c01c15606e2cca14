"""`EvalSettings`: what one `hf-fna eval` run evaluates, on which data, with which FNA settings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import FNAConfig
from ..errors import InputError
from ..ops.checks import MAX_SEED

# task -> module implementing it; each exposes MODEL_KIND, load_data(settings) -> TaskData and
# run_task(runner, data) -> TaskOutcome
TASKS = {
    "classification": "hf_fna.evaluation.tasks.classification",
    "probe": "hf_fna.evaluation.tasks.linear_probe",
    "zero-shot": "hf_fna.evaluation.tasks.zero_shot",
    "retrieval": "hf_fna.evaluation.tasks.retrieval",
    "segmentation": "hf_fna.evaluation.tasks.segmentation",
    "vqa": "hf_fna.evaluation.tasks.vqa",
}
MIXED_PRECISION = ("no", "fp16", "bf16")
_NOT_RECORDED = ("dataset", "fna_config", "show_progress")


@dataclass
class EvalSettings:
    """Everything one evaluation run needs. Column names left as None take the task's usual names.

    Args:
        task: one of `TASKS`.
        model: a Hub model id, a local folder, or a bundled model (`hf_fna:dinov2-small`, `hf_fna:clip-b16`).
        dataset: a Hub dataset name, a local folder, `hf_fna:<builtin>`, or a `datasets.Dataset`/`DatasetDict`.
        split: the evaluated split; `train_split` is where linear probes are fit (probe, segmentation).
        limit, train_limit: evaluate (fit) on this many rows, drawn with `seed`; None uses the whole split.
        image_size: resize images to this square size (no crop) instead of the processor's default; FNA pays off at
            high resolution (many tokens), so this is the main knob.
        fna_config: FNA settings; None takes the model's own `fna_config` (or the defaults) updated with
            `fna_overrides`.
        output: path of the JSON report (written by the main process at the end of a successful run).
        save_exact: write the exact variant's outputs and timing here (for later FNA-only runs).
        reference: a `save_exact` file of an earlier run on the same task, model and data: exact attention is not
            run again, its outputs are replayed (a sweep over FNA settings pays for exact attention once).
    """

    task: str
    model: str
    dataset: Any
    split: str = "test"
    train_split: str = "train"
    limit: int | None = None
    train_limit: int | None = None
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    image_size: int | None = None
    mixed_precision: str = "no"
    fna_config: FNAConfig | None = None
    fna_overrides: dict[str, Any] = field(default_factory=dict)
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    mask_column: str | None = None
    class_names: list[str] | None = None
    prompt: str = "a photo of a {}."
    ignore_index: int = 255
    max_new_tokens: int = 10
    output: str | None = None
    show_progress: bool = True
    save_exact: str | None = None
    reference: str | None = None

    def check(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; available: {', '.join(TASKS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}"
            )
        for name in ("limit", "train_limit", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be a positive integer, got {value}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.num_workers < 0:
            raise InputError(f"num_workers must be >= 0 (0 loads data in the main process), got {self.num_workers}")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed}")
        if self.save_exact and self.reference:
            raise InputError("--save-exact records exact outputs and --reference replays them: give one of them")
        if "{}" not in self.prompt:
            raise InputError(f"the zero-shot prompt must contain '{{}}' where the class name goes, got {self.prompt!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (a dataset object is recorded by its type name)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in _NOT_RECORDED}
        values["dataset"] = self.dataset if isinstance(self.dataset, str) else type(self.dataset).__name__
        values["fna_config"] = self.fna_config.to_dict() if self.fna_config is not None else None
        return values
