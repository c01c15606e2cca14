"""What a run of `hf-fna eval` produces: the timing and outputs a comparison gathers, a task's outcome, the agreement
measures between the two variants, and `EvalResult`, the report as a markdown table and as JSON written atomically."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..tools import outputs
from ..tools.pipeline import EXACT, FNA, VARIANTS

if TYPE_CHECKING:
    from ..config import FNAConfig
    from .settings import EvalSettings


@dataclass
class Timing:
    """Seconds spent in the model forward passes (or generation) of one variant, and the samples they covered."""

    seconds: float = 0.0
    samples: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Comparison:
    """What `Runner.compare` gathered from all processes (tensors concatenated on CPU, lists flattened)."""

    outputs: dict[str, Any]
    timing: dict[str, Timing]
    num_samples: int
    tokens_per_image: int | None = None


@dataclass
class TaskOutcome:
    """A task's result: metrics per variant (`{"exact": {...}, "fna": {...}}`), agreement, and its comparison."""

    metrics: dict[str, dict[str, float]]
    agreement: dict[str, float]
    comparison: Comparison
    details: dict[str, Any] = field(default_factory=dict)


def top1_agreement(exact_scores: torch.Tensor, fna_scores: torch.Tensor) -> float:
    """Fraction of samples whose highest-scoring class (or candidate) is the same under both variants."""
    return float((exact_scores.argmax(-1) == fna_scores.argmax(-1)).float().mean())


def mean_cosine(exact: torch.Tensor, fna: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows (vectors along the last dimension)."""
    return float(torch.nn.functional.cosine_similarity(exact.double(), fna.double(), dim=-1).mean())


@dataclass
class EvalResult:
    """The report of one run; `to_dict()` is what the JSON file holds."""

    settings: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    agreement: dict[str, float]
    throughput: dict[str, Any]
    num_samples: int
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        """Exact and FNA metrics side by side, then throughput and agreement."""
        lines = [
            f"| {self.settings['task']} ({self.num_samples} samples) | exact | fna | fna - exact |",
            "|---|---:|---:|---:|",
        ]
        for name, exact in self.metrics[EXACT].items():
            fna = self.metrics[FNA][name]
            lines.append(f"| {name} | {exact:.4f} | {fna:.4f} | {fna - exact:+.4f} |")
        exact_rate, fna_rate = (self.throughput[v]["samples_per_second"] for v in VARIANTS)
        lines.append(f"| samples/s | {exact_rate:.2f} | {fna_rate:.2f} | {self.throughput['speedup']:.2f}x |")
        lines += ["", "| agreement (fna vs exact) | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.agreement.items()]
        lines += [f"\nnote: {note}" for note in self.notes]
        return "\n".join(lines)


def build_result(
    settings: EvalSettings, outcome: TaskOutcome, fna_config: FNAConfig, num_processes: int, device: torch.device
) -> EvalResult:
    """The report of a finished run: its settings and provenance, metrics, agreement, throughput and notes."""
    import accelerate
    import transformers

    from .. import __version__

    comparison = outcome.comparison
    timing = comparison.timing
    record = settings.to_dict()
    record.update(
        fna_config=fna_config.to_dict(),
        tokens_per_image=comparison.tokens_per_image,
        num_processes=num_processes,
        device=str(device),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        versions={
            "hf_fna": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    throughput = {v: {**asdict(timing[v]), "samples_per_second": timing[v].samples_per_second} for v in VARIANTS}
    throughput["speedup"] = timing[EXACT].seconds / timing[FNA].seconds if timing[FNA].seconds > 0 else float("nan")
    notes = []
    tokens = comparison.tokens_per_image
    if tokens is not None and tokens < max(fna_config.min_tokens, fna_config.num_landmarks):
        notes.append(
            f"{tokens} tokens per image is below min_tokens={fna_config.min_tokens} or num_landmarks="
            f"{fna_config.num_landmarks}: FNA fell back to exact attention; raise --image-size or lower --min-tokens"
        )
    if settings.mixed_precision == "fp16" and device.type == "cpu":
        notes.append("accelerate applies no fp16 autocast on CPU: this run computed in float32 (use bf16 on CPU)")
    return EvalResult(
        record, outcome.metrics, outcome.agreement, throughput, comparison.num_samples, notes, outcome.details
    )


def _without_nan(value: Any) -> Any:
    """`value` with NaN and infinite floats turned into None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON to `path` through a temporary file in the same folder and an atomic rename."""
    outputs.write_json_atomically(path, _without_nan(payload), allow_nan=False)
