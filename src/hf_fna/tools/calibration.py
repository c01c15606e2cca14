"""`hf_fna.calibrate`: measure which layers of *your* model tolerate FNA, with how many landmarks, on *your* images.

Fidelity and speed trade off differently per model, resolution and layer, so one `num_landmarks` for a fixed set of
layers leaves speed where layers are easy and loses fidelity where they are hard. `calibrate` runs exact attention once
on the calibration images (the reference), then takes five steps, one function each:

1. `_layer_sensitivities`: each layer's sensitivity, FNA in that layer alone for every candidate landmark count m,
   compared with the reference on the *final* features (at most L x |candidates| forward passes; a larger m is
   skipped where a smaller one is already lossless);
2. `_knapsack_proposals`: a knapsack over layers (`cheapest_schedule`) predicts a schedule's loss as the sum of its
   layers' losses and its speed-up with the FLOP model (`schedule_flop_bound`), and proposes the cheapest schedule
   for a few loss budgets around the target;
3. `_suffix_search`: for each m, a binary search finds the earliest layer from which one group to the end meets the
   target (layers sharing one selection lose less together than their single-layer losses add up to);
4. `_greedy_extension`: the fastest schedule that meets the target is extended greedily: the two layers before it
   become a group of their own with more landmarks, while the target holds;
5. `_choose`: the fastest measured schedule whose fidelity meets the target (FLOP bound, or measured speed when
   asked), and exact attention when none of those is faster than exact attention (a speed-up of 1.0x or less).

Steps 2-4 measure every schedule they propose once on the calibration images (`_Frontier.measure`, optionally timing
it); consecutive layers with the same m form one selection group. The report gives the chosen schedule's fidelity on
images held out from calibration.

For a 12-layer model and 3 candidates that is about 1 + 36 + 4 + 12 + 4 + 2 forward passes of the calibration batch;
the report counts them. Everything is deterministic given `seed` (landmark selection is deterministic; the seed only
splits images when no held-out set is given).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any

import torch
from torch import nn

from ..config import FNAConfig
from ..errors import InputError, first_line
from ..integration.switches import EXACT_IMPLEMENTATION
from ..integration.towers import (
    interpolation_kwargs,
    mlp_ratio_of,
    patch_size,
    special_tokens,
    tower_config,
    vision_tower,
)
from ..ops.cost import schedule_flop_bound
from ..schedules import schedule_from_landmarks
from .measure import (
    device_from_option,
    machine_info,
    machine_line,
    model_description,
    model_folder,
    progress_bar,
    resolution_problem,
)
from .pipeline import EXACT, AttentionSwitch, ImagePreprocessing, LoadedModel, load_model, timed_forward

__all__ = ["METRICS", "CalibrateSettings", "CalibrationReport", "calibrate", "cheapest_schedule", "run_calibration"]

METRICS = ("patch_cosine", "token_cosine", "cls_cosine")
# Loss budgets tried around the target, as multiples of (1 - target): the additive loss model is approximate, so a
# few schedules on either side of the budget are measured.
BUDGET_SCALES = (2.0, 1.0, 0.5, 0.25)
EXTENSION_LAYERS = 2  # layers a greedy extension step prepends as a new selection group
_BINS = 4000  # resolution of the loss budget in the dynamic programme


@dataclass
class CalibrationReport:
    """What `calibrate` measured and chose.

    Attributes:
        config: the chosen settings (`layers` is a schedule string such as "4:6@128;6:12@64", or "none").
        target, metric: the fidelity asked for and how it is measured.
        tokens, num_layers, resolution: the input the schedule was calibrated for.
        sensitivity: `{layer: {m: fidelity with FNA in that layer alone}}` on the calibration images.
        frontier: every schedule measured: `schedule`, `predicted_speedup` (FLOP bound), `predicted_fidelity`,
            `fidelity` (measured on the calibration images), `worst_image_fidelity`, and `measured_speedup` when
            timed; the chosen one has `chosen: True`.
        heldout: fidelity of the chosen schedule on the held-out images (`fidelity`, `worst_image_fidelity`,
            `images`).
        forward_passes: forward passes run (calibration batch counted once per pass).
    """

    config: FNAConfig
    target: float
    metric: str
    tokens: int
    num_layers: int
    resolution: int | None
    candidates: tuple[int, ...]
    calibration_images: int
    sensitivity: dict[int, dict[int, float]]
    frontier: list[dict[str, Any]]
    heldout: dict[str, Any]
    forward_passes: int
    seconds: float
    met_target: bool
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> dict[str, Any]:
        return next(row for row in self.frontier if row.get("chosen"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["sensitivity"] = {str(k): {str(m): v for m, v in row.items()} for k, row in self.sensitivity.items()}
        return out

    def markdown(self) -> str:
        """The frontier as a Markdown table (calibration-image fidelity; held-out fidelity of the chosen row)."""
        timed = any("measured_speedup" in row for row in self.frontier)
        header = "| schedule | FLOP bound | predicted fidelity | fidelity | worst image |"
        header += " measured speed-up |" if timed else ""
        lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
        for row in sorted(self.frontier, key=lambda r: -r["predicted_speedup"]):
            name = f"**{row['schedule']}** (chosen)" if row.get("chosen") else row["schedule"]
            line = (
                f"| {name} | {row['predicted_speedup']:.2f}x | {row['predicted_fidelity']:.4f} | {row['fidelity']:.4f} "
                f"| {row['worst_image_fidelity']:.4f} |"
            )
            if timed:
                line += f" {row['measured_speedup']:.2f}x |" if "measured_speedup" in row else " |"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path: str | IO[bytes]) -> None:
        """Write a PNG (to a path or a binary file) of `figure()`."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        try:
            fig.savefig(path, dpi=120, format="png")
        finally:
            plt.close(fig)

    def figure(self) -> Any:
        """Fidelity against predicted speed-up for every measured schedule: each point numbered (labels placed so
        that none overlaps another), the schedules listed by number beside the plot, the chosen one marked, a
        dashed line at the target and a dotted one at exact attention (1.0x)."""
        try:
            import matplotlib
        except ImportError as error:
            raise ImportError(
                "CalibrationReport.plot needs matplotlib: pip install 'hf-fna[plots]'", name="matplotlib"
            ) from error

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = sorted(self.frontier, key=lambda r: (-r["predicted_speedup"], -r["fidelity"]))
        fig = plt.figure(figsize=(10, 5))
        ax = fig.add_axes((0.08, 0.11, 0.52, 0.8))
        xs, ys = [r["predicted_speedup"] for r in rows], [r["fidelity"] for r in rows]
        ax.scatter(xs, ys, label="measured", zorder=3)
        ax.scatter(
            xs,
            [r["predicted_fidelity"] for r in rows],
            facecolors="none",
            edgecolors="gray",
            label="predicted (sum of layer losses)",
        )
        chosen = self.chosen
        ax.scatter([chosen["predicted_speedup"]], [chosen["fidelity"]], s=160, marker="*", color="red", label="chosen")
        if self.heldout:
            heldout = self.heldout["fidelity"]
            ax.scatter([chosen["predicted_speedup"]], [heldout], marker="x", color="red", label="chosen, held out")
        ax.axhline(self.target, color="red", lw=0.8, ls="--", label=f"target {self.target:g}")
        ax.axvline(1.0, color="black", lw=0.8, ls=":", label="exact attention (1.0x)")
        ax.set(
            xlabel="speed-up bound (FLOP model)",
            ylabel=f"{self.metric} to exact attention",
            title=f"FNA calibration frontier: {self.tokens} tokens, {self.calibration_images} images",
        )
        low, high = ax.get_xlim()
        ax.set_xlim(min(low, 0.95), max(high, 1.05))
        ax.set_ylim(*ax.get_ylim())  # fixed before the labels are placed in display coordinates
        ax.legend(fontsize=7, loc="lower left")
        _place_labels(ax, list(zip(xs, ys, strict=True)), [str(i) for i in range(1, len(rows) + 1)])
        listing = [
            f"{i:>2}  {r['schedule']}" + ("  (chosen)" if r.get("chosen") else "") for i, r in enumerate(rows, 1)
        ]
        size = 7 if len(listing) <= 30 else max(4, 7 * 30 / len(listing))
        fig.text(0.62, 0.91, "schedules (point number, FNAConfig.layers)", fontsize=8, va="top", weight="bold")
        fig.text(0.62, 0.87, "\n".join(listing), fontsize=size, va="top", family="monospace")
        return fig


# Where a point's label may go, in points from the point: beside it first, then on rings further out (with a leader
# line back to the point).
_NEAR_OFFSETS = ((3, 3), (3, -9), (-9, 3), (-9, -9))
_RING_OFFSETS = tuple(
    (radius * dx, radius * dy)
    for radius in (12, 18, 24, 30, 36)
    for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))
)


def _place_labels(ax: Any, points: list[tuple[float, float]], labels: list[str]) -> list[Any]:
    """Annotate each point with its label at the first offset where the label overlaps neither a label placed before
    nor another point (the last offset is taken when none is free); returns the annotations."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    half = 4.0 * ax.figure.dpi / 72  # a marker's half width, in pixels
    centres = [ax.transData.transform(point) for point in points]
    markers = [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in centres]
    placed: list[Any] = []
    annotations = []
    for index, (point, label) in enumerate(zip(points, labels, strict=True)):
        obstacles = placed + [box for j, box in enumerate(markers) if j != index]
        for offset in (*_NEAR_OFFSETS, *_RING_OFFSETS):
            leader = {"arrowstyle": "-", "lw": 0.4, "color": "gray"} if offset in _RING_OFFSETS else None
            annotation = ax.annotate(
                label, point, xytext=offset, textcoords="offset points", fontsize=7, arrowprops=leader
            )
            box = Text.get_window_extent(annotation, renderer)  # the text alone, without its leader line
            if not any(box.overlaps(other) for other in obstacles) or offset == _RING_OFFSETS[-1]:
                break
            annotation.remove()
        placed.append(box)
        annotations.append(annotation)
    return annotations


def calibrate(
    model: nn.Module,
    images: torch.Tensor | Sequence[Any],
    target: float = 0.97,
    metric: str = "patch_cosine",
    resolution: int | None = None,
    heldout: torch.Tensor | Sequence[Any] | None = None,
    candidates: Sequence[int] = (64, 128, 256),
    max_schedules: int = len(BUDGET_SCALES),
    measure_speed: bool = False,
    batch_size: int = 4,
    num_special_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> CalibrationReport:
    """Find the fastest FNA schedule of `model` whose fidelity to exact attention meets `target` on `images`.

    Exact attention (`layers="none"`) is chosen when no measured schedule meets the target, and when none that meets
    it is faster than exact attention (FLOP bound, or measured speed-up with `measure_speed`, of 1.0x or less, as at
    224 px on small models). The model is left with the chosen settings applied (`report.config.apply(model)` on a
    fresh copy does the same).

    Args:
        model: a vision model loaded with Transformers whose attention dispatches through `AttentionInterface`: a
            vision transformer (ViT, DINOv2, CLIPVisionModel, ...) or a model with a vision tower (a full
            `CLIPModel`, SigLIP, LLaVA), whose tower is calibrated, as `FNAConfig.apply` targets it. It runs on
            the device it is on.
        images: `[B, 3, H, W]` pixel values, or PIL images (resized to `resolution`, shorter side then centre crop,
            and normalised with `image_mean`/`image_std`; by default those of the image processor saved with the
            model, `AutoImageProcessor` of `model.name_or_path`, and ImageNet's when it has none).
        target: the fidelity to reach, in `metric` units (mean over images).
        metric: "patch_cosine" (mean cosine of the non-special output tokens), "token_cosine" (all tokens) or
            "cls_cosine" (the first token).
        resolution: side of the square input when `images` are PIL images.
        heldout: images kept out of calibration, on which the chosen schedule's fidelity is reported; by default
            half of `images` (a seeded split).
        candidates: landmark counts tried per layer.
        max_schedules: at most this many schedules are measured after the sensitivity pass.
        measure_speed: also time exact attention and every measured schedule (one warm-up and two timed passes of
            a batch each) and choose by measured speed-up instead of the FLOP bound.
        batch_size: images per forward pass.
        num_special_tokens: leading tokens left out of "patch_cosine"; by default read from the model config.
        seed: seed of the default held-out split.
        progress: show a progress bar (also hidden by `TQDM_DISABLE=1` and
            `transformers.utils.logging.disable_progress_bar()`).
        image_mean, image_std: normalisation of PIL images (default: see `images`).

    Returns:
        A `CalibrationReport` (`report.config` is the chosen `FNAConfig`).

    Raises:
        ValueError: bad `target`, `metric`, `candidates`, or images that do not make a batch.
    """
    candidates = _checked_arguments(target, metric, candidates)
    began = time.perf_counter()
    # The images: PIL ones resized, cropped and normalised as the model's image processor says.
    source = getattr(model.config, "_name_or_path", "") or ""
    preprocessing = ImagePreprocessing.from_pretrained(source) if source else ImagePreprocessing()
    if image_mean is not None:
        preprocessing = replace(preprocessing, mean=tuple(image_mean))
    if image_std is not None:
        preprocessing = replace(preprocessing, std=tuple(image_std))
    pixels = _as_pixels(images, resolution, preprocessing, "images")
    if heldout is None:
        if len(pixels) < 2:
            raise InputError("calibrate needs at least 2 images to hold some out; pass `heldout=` otherwise.")
        order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
        half = len(pixels) // 2
        pixels, heldout_pixels = pixels[order[half:]], pixels[order[:half]]
    else:
        heldout_pixels = _as_pixels(heldout, resolution, preprocessing, "heldout")
    config = tower_config(model.config)
    for name, batch in (("images", pixels), ("heldout", heldout_pixels)):
        for side in dict.fromkeys(int(s) for s in batch.shape[-2:]):
            problem = resolution_problem(side, patch_size(config))
            if problem:  # the patch embedding would crop silently (or fail below one patch)
                raise InputError(f"calibrate({name}=...) got {side} px images: {side} {problem}.")
    num_layers = int(config.num_hidden_layers)
    model.eval()

    # The reference: exact attention (SDPA, whatever attention the model was loaded with) on the calibration images.
    passes = _Passes(AttentionSwitch(model, FNAConfig(layers="none"), exact_implementation=EXACT_IMPLEMENTATION))
    reference = passes.hidden(None, pixels, batch_size)
    measurement = _Measurement(
        passes, pixels, reference, metric, special_tokens(config, num_special_tokens).leading, batch_size
    )
    tokens = reference.shape[1]
    tried = [m for m in candidates if m < tokens]
    if not tried:
        raise InputError(f"calibrate(candidates={candidates}) holds no count below the {tokens} tokens of the input.")
    # Passes: the reference (done), the sensitivities, the knapsack's schedules, about log2(L) suffixes per m, a few
    # extensions and the held-out pair; the total is corrected once the search ends.
    planned = 2 + num_layers * len(tried) + max_schedules + len(tried) * math.ceil(math.log2(num_layers + 1)) + 4
    bar = progress_bar(total=planned, initial=1, desc="calibrating", show=progress)

    sensitivity = _layer_sensitivities(measurement, num_layers, tried, target, bar)
    flops = _FlopModel(tokens, int(config.hidden_size), int(config.num_attention_heads), mlp_ratio_of(config))
    exact_seconds = passes.seconds(None, pixels[:batch_size]) if measure_speed else None
    frontier = _Frontier(measurement, sensitivity, flops, exact_seconds, bar)
    _knapsack_proposals(frontier, tried, target, max_schedules)
    _suffix_search(frontier, tried, num_layers, target)
    _greedy_extension(frontier, tried, num_layers, target)
    bar.total = bar.n + 1
    met_target = any(row["fidelity"] >= target for row in frontier.rows)
    best, notes = _choose(frontier.rows, target, metric, tokens, sensitivity, measure_speed)
    if not any(row is best for row in frontier.rows):  # exact attention: listed after the measured schedules
        frontier.rows.append(best)
    best["chosen"] = True
    # FNA runs from the calibrated length on, and never below the default break-even unless a schedule faster than
    # exact attention was calibrated there; exact attention keeps the default.
    min_tokens = FNAConfig().min_tokens if best["schedule"] == "none" else min(FNAConfig().min_tokens, tokens)
    chosen = FNAConfig(layers=best["schedule"], min_tokens=min_tokens)

    # The report: the chosen schedule on the held-out images (the model is left running it).
    heldout_reference = passes.hidden(None, heldout_pixels, batch_size)
    heldout_hidden = passes.hidden(chosen, heldout_pixels, batch_size)
    heldout_scores = _fidelity(heldout_hidden, heldout_reference, metric, measurement.special)
    bar.update(1)
    bar.close()
    return CalibrationReport(
        config=chosen,
        target=float(target),
        metric=metric,
        tokens=int(tokens),
        num_layers=num_layers,
        resolution=resolution if resolution is not None else int(pixels.shape[-1]),
        candidates=tuple(tried),
        calibration_images=len(pixels),
        sensitivity=sensitivity,
        frontier=frontier.rows,
        heldout={
            "fidelity": float(heldout_scores.mean()),
            "worst_image_fidelity": float(heldout_scores.min()),
            "images": len(heldout_pixels),
        },
        forward_passes=passes.count,
        seconds=time.perf_counter() - began,
        met_target=met_target,
        notes=notes,
    )


def _checked_arguments(target: Any, metric: Any, candidates: Sequence[int]) -> tuple[int, ...]:
    """The candidate landmark counts, sorted and unique, once `target`, `metric` and `candidates` are valid."""
    if metric not in METRICS:
        raise InputError(f"calibrate(metric={metric!r}) is not supported; accepted values: {', '.join(METRICS)}.")
    if not (isinstance(target, (int, float)) and 0.0 < target <= 1.0):
        raise InputError(f"calibrate(target={target!r}) is invalid; expected a number in (0, 1].")
    candidates = tuple(sorted(set(candidates)))
    if not candidates or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in candidates):
        raise InputError(f"calibrate(candidates={candidates!r}) is invalid; expected positive integers.")
    return candidates


# --- what the steps share: counted passes, the measurement, the frontier -------------------------------------------


class _Passes:
    """Forward passes of a model's vision tower over images, with exact attention or FNA, counted; the model's tower
    is switched between the two by one `AttentionSwitch`."""

    def __init__(self, switch: AttentionSwitch) -> None:
        self.switch = switch
        self.encoder = vision_tower(switch.model)  # a full CLIPModel takes input_ids too: its tower maps pixels
        self.kwargs = interpolation_kwargs(self.encoder)
        self.count = 0

    def _use(self, fna_config: FNAConfig | None) -> torch.device:
        if fna_config is None:
            self.switch.use(EXACT)
        else:
            self.switch.configure(fna_config)
        return next(self.switch.model.parameters()).device

    def hidden(self, fna_config: FNAConfig | None, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Last hidden states `[B, N, D]` (float32, on the CPU) of `pixels`: exact attention (None) or FNA with
        `fna_config`; one pass."""
        device = self._use(fna_config)
        self.count += 1
        with torch.inference_mode():
            return torch.cat(
                [
                    self.encoder(pixel_values=batch.to(device), **self.kwargs).last_hidden_state.float().cpu()
                    for batch in pixels.split(batch_size)
                ]
            )

    def seconds(self, fna_config: FNAConfig | None, batch: torch.Tensor) -> float:
        """The faster of two timed passes of `batch` after a warm-up (not counted)."""
        batch = batch.to(self._use(fna_config))
        with torch.inference_mode():
            timed_forward(self.encoder, batch, self.kwargs)  # warm-up
            return min(timed_forward(self.encoder, batch, self.kwargs)[1] for _ in range(2))


def _fidelity(hidden: torch.Tensor, reference: torch.Tensor, metric: str, special: int) -> torch.Tensor:
    """Per image, `metric` of `hidden` against exact attention's `reference`."""
    cosine = torch.nn.functional.cosine_similarity(hidden, reference, dim=-1)
    if metric == "cls_cosine":
        return cosine[:, 0]
    return cosine[:, special:].mean(dim=1) if metric == "patch_cosine" else cosine.mean(dim=1)


@dataclass
class _Measurement:
    """What every schedule is measured with: the calibration images and exact attention's outputs on them."""

    passes: _Passes
    pixels: torch.Tensor
    reference: torch.Tensor  # last hidden states of `pixels` with exact attention
    metric: str
    special: int  # leading tokens left out of "patch_cosine"
    batch_size: int

    def fidelity(self, fna_config: FNAConfig) -> torch.Tensor:
        """Per calibration image, the fidelity of FNA with `fna_config` (one pass)."""
        hidden = self.passes.hidden(fna_config, self.pixels, self.batch_size)
        return _fidelity(hidden, self.reference, self.metric, self.special)


@dataclass
class _FlopModel:
    """The FLOP bound of a schedule's speed-up on this model and input (`schedule_flop_bound`)."""

    tokens: int
    width: int
    heads: int
    mlp_ratio: float

    def speedup(self, per_layer: list[int | None]) -> float:
        return schedule_flop_bound(self.tokens, self.width, self.heads, per_layer, self.mlp_ratio)


class _Frontier:
    """Every schedule measured on the calibration images, in the order measured (`rows`); each is measured once."""

    def __init__(
        self,
        measurement: _Measurement,
        sensitivity: dict[int, dict[int, float]],
        flops: _FlopModel,
        exact_seconds: float | None,
        bar: Any,
    ) -> None:
        self.measurement, self.sensitivity, self.flops = measurement, sensitivity, flops
        self.exact_seconds = exact_seconds  # set: every schedule is timed too
        self.bar = bar
        self.rows: list[dict[str, Any]] = []
        self._by_schedule: dict[str, dict[str, Any]] = {}

    def measure(self, per_layer: list[int | None], found_by: str) -> dict[str, Any]:
        """The row of the schedule with these per-layer landmark counts (None: exact), measured if it is new."""
        name = schedule_from_landmarks(per_layer)
        if name in self._by_schedule:
            return self._by_schedule[name]
        fna_config = FNAConfig(layers=name, min_tokens=0)
        scores = self.measurement.fidelity(fna_config)
        row = {
            "schedule": name,
            "found_by": found_by,
            "landmarks_per_layer": list(per_layer),
            "predicted_speedup": self.flops.speedup(per_layer),
            "predicted_fidelity": 1.0
            - sum(1.0 - self.sensitivity[i][m] for i, m in enumerate(per_layer) if m is not None),
            "fidelity": float(scores.mean()),
            "worst_image_fidelity": float(scores.min()),
        }
        if self.exact_seconds is not None:
            batch = self.measurement.pixels[: self.measurement.batch_size]
            row["measured_speedup"] = self.exact_seconds / self.measurement.passes.seconds(fna_config, batch)
        self._by_schedule[name] = row
        self.rows.append(row)
        self.bar.update(1)
        return row

    def fastest_meeting(self, target: float) -> dict[str, Any] | None:
        """The measured schedule of the highest FLOP bound among those that meet `target`."""
        rows = [row for row in self.rows if row["fidelity"] >= target]
        return max(rows, key=lambda row: row["predicted_speedup"]) if rows else None


# --- the steps -----------------------------------------------------------------------------------------------------


def _layer_sensitivities(
    measurement: _Measurement, num_layers: int, candidates: Sequence[int], target: float, bar: Any
) -> dict[int, dict[int, float]]:
    """Step 1: `{layer: {m: fidelity}}` with FNA in that layer alone, for every candidate m, compared with exact
    attention on the final features. A larger m is skipped (its fidelity taken as the best so far) where a smaller one
    is already nearly lossless: within 1% of the loss the target allows."""
    sensitivity: dict[int, dict[int, float]] = {}
    slack = 1.0 - target
    for layer in range(num_layers):
        sensitivity[layer] = {}
        for m in candidates:
            if sensitivity[layer] and 1.0 - min(sensitivity[layer].values()) < 0.01 * slack:
                sensitivity[layer][m] = max(sensitivity[layer].values())
            else:
                alone = FNAConfig(layers=f"{layer}@{m}", min_tokens=0)
                sensitivity[layer][m] = float(measurement.fidelity(alone).mean())
            bar.update(1)
    return sensitivity


def _knapsack_proposals(frontier: _Frontier, candidates: Sequence[int], target: float, max_schedules: int) -> None:
    """Step 2: measure the knapsack's cheapest schedules (`cheapest_schedule`) for loss budgets around the target
    (`BUDGET_SCALES` x (1 - target)), the `max_schedules` of the highest FLOP bound; exact attention is not measured."""
    flops = frontier.flops
    budgets: dict[str, list[int | None]] = {}
    for scale in BUDGET_SCALES:
        budget = (1.0 - target) * scale
        per_layer = cheapest_schedule(
            frontier.sensitivity, candidates, budget, flops.tokens, flops.width, flops.heads, flops.mlp_ratio
        )
        if any(m is not None for m in per_layer):
            budgets.setdefault(schedule_from_landmarks(per_layer), per_layer)
    for _, per_layer in sorted(budgets.items(), key=lambda item: -flops.speedup(item[1]))[:max_schedules]:
        frontier.measure(per_layer, "sensitivity")


def _suffix_search(frontier: _Frontier, candidates: Sequence[int], num_layers: int, target: float) -> None:
    """Step 3: for each m, a binary search for the earliest layer k from which one group `k:@m` to the end meets the
    target. Layers sharing one selection lose less together than their single-layer losses add up to, which the
    knapsack cannot see."""
    for m in candidates:
        low, high = 0, num_layers
        while low < high:
            middle = (low + high) // 2
            if frontier.measure([None] * middle + [m] * (num_layers - middle), "suffix")["fidelity"] >= target:
                high = middle
            else:
                low = middle + 1


def _greedy_extension(frontier: _Frontier, candidates: Sequence[int], num_layers: int, target: float) -> None:
    """Step 4: extend the fastest schedule that meets the target: the `EXTENSION_LAYERS` layers before its first FNA
    layer become a group of their own with more landmarks than the group after them, while the target holds."""
    current = frontier.fastest_meeting(target)
    while current is not None:
        per_layer = current["landmarks_per_layer"]
        first = next((i for i, m in enumerate(per_layer) if m is not None), num_layers)
        if first in (0, num_layers):
            break
        start = max(0, first - EXTENSION_LAYERS)
        prefix, rest = per_layer[:start], per_layer[first:]
        extended = [
            frontier.measure([*prefix, *[m] * (first - start), *rest], "extension") for m in candidates if m > rest[0]
        ]
        better = [row for row in extended if row["fidelity"] >= target]
        current = max(better, key=lambda row: row["predicted_speedup"]) if better else None


def _choose(
    frontier: list[dict[str, Any]],
    target: float,
    metric: str,
    tokens: int,
    sensitivity: dict[int, dict[int, float]],
    measure_speed: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Step 5: the fastest measured schedule that meets the target (FLOP bound, or measured speed-up with
    `measure_speed`), or a row for exact attention (`"none"`) when none of those is faster than exact attention; and
    the notes that explain the choice."""
    notes: list[str] = []
    speed_key = "measured_speedup" if measure_speed else "predicted_speedup"
    meeting = [row for row in frontier if row["fidelity"] >= target]
    faster = [row for row in meeting if row[speed_key] > 1.0]
    if faster:
        best = max(faster, key=lambda row: row[speed_key])
    else:
        num_layers = len(sensitivity)
        best = {
            "schedule": "none",
            "landmarks_per_layer": [None] * num_layers,
            "predicted_speedup": 1.0,
            "predicted_fidelity": 1.0,
            "fidelity": 1.0,
            "worst_image_fidelity": 1.0,
        }
        if meeting:
            bound = max(row[speed_key] for row in meeting)
            kind = "measured speed-up" if measure_speed else "FLOP bound"
            notes.append(
                f"{len(meeting)} measured schedule(s) reached {metric} >= {target}, but none is faster than exact "
                f"attention at {tokens} tokens (best {kind} {bound:.2f}x). Exact attention is chosen."
            )
        else:
            notes.append(
                f"No measured schedule reached {metric} >= {target}; the most faithful reached "
                f"{max(row['fidelity'] for row in frontier):.4f}. Exact attention is chosen. The layers it could not "
                f"afford are those with the largest single-layer loss: {_hardest_layers(sensitivity)}."
            )
    if tokens < FNAConfig().min_tokens and best["schedule"] != "none":
        notes.append(
            f"{tokens} tokens is below the default min_tokens={FNAConfig().min_tokens}, where FNA measured slower than "
            "exact attention on CPU; check with measure_speed=True before relying on the FLOP bound."
        )
    return best, notes


def cheapest_schedule(
    sensitivity: dict[int, dict[int, float]],
    candidates: Sequence[int],
    budget: float,
    tokens: int,
    width: int,
    heads: int,
    mlp_ratio: float,
) -> list[int | None]:
    """The per-layer landmark counts (None: exact) of least FLOPs whose summed single-layer losses fit `budget`.

    A knapsack over layers: each layer takes exact attention (no loss) or one candidate m (its measured loss, its
    FLOPs); losses are discretised into `_BINS` steps of the budget.
    """

    def cost(m: int | None) -> float:  # relative FLOPs of one layer: the bound's reciprocal for a 1-layer model
        return 1.0 / schedule_flop_bound(tokens, width, heads, [m], mlp_ratio)

    step = max(budget, 1e-9) / _BINS
    options = [(None, 0, cost(None))]
    layers = sorted(sensitivity)
    best = [0.0] + [math.inf] * _BINS  # least cost so far for each used budget
    choices: list[list[int | None]] = []
    for layer in layers:
        layer_options = options + [
            (m, math.ceil(max(0.0, 1.0 - sensitivity[layer][m]) / step), cost(m))
            for m in candidates
            if (1.0 - sensitivity[layer][m]) <= budget
        ]
        new = [math.inf] * (_BINS + 1)
        pick: list[tuple[int | None, int]] = [(None, 0)] * (_BINS + 1)
        for used, value in enumerate(best):
            if value == math.inf:
                continue
            for m, loss_bins, layer_cost in layer_options:
                total = used + loss_bins
                if total <= _BINS and value + layer_cost < new[total]:
                    new[total] = value + layer_cost
                    pick[total] = (m, used)
        best = new
        choices.append(pick)
    # Walk back from the cheapest end state.
    end = min(range(_BINS + 1), key=lambda b: best[b])
    per_layer: list[int | None] = [None] * len(layers)
    for position in range(len(layers) - 1, -1, -1):
        m, previous = choices[position][end]
        per_layer[layers[position]] = m
        end = previous
    return per_layer


def _hardest_layers(sensitivity: dict[int, dict[int, float]], count: int = 3) -> str:
    loss = {layer: 1.0 - max(row.values()) for layer, row in sensitivity.items()}
    hardest = sorted(loss, key=lambda layer: -loss[layer])[:count]
    return ", ".join(f"layer {layer} (loss {loss[layer]:.3f} at best)" for layer in hardest)


def _as_pixels(
    images: torch.Tensor | Sequence[Any], resolution: int | None, preprocessing: ImagePreprocessing, name: str
) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape)
            raise InputError(f"calibrate({name}=...) got a tensor of shape {shape}; expected [B, 3, H, W].")
        return images.float()
    images = list(images)
    if not images:
        raise InputError(f"calibrate({name}=...) got no images.")
    if resolution is None:
        raise InputError(f"calibrate({name}=...) got PIL images; pass `resolution=` to size them.")
    return preprocessing.pixels(images, resolution)


# --- command line: `hf-fna calibrate` ----------------------------------------------------------------------------

BUNDLED_PHOTOS = ("photos", "photos:tune", "photos:report")
# What `--out` holds, written as one set.
OUT_FILES = ("fna_config.json", "calibration.json", "measured.json", "README.md", "frontier.png")


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--model",
        help="model folder or Hub id, or hf_fna:dinov2-small (the default; fine-tuned for saliency) or hf_fna:clip-b16",
    )
    parser.add_argument(
        "--images",
        default="photos:tune",
        help="calibration images: a folder, a `datasets` id, or the bundled photos "
        f"({', '.join(BUNDLED_PHOTOS)}; default: %(default)s)",
    )
    parser.add_argument(
        "--heldout-images",
        help="images held out for the fidelity report, same forms as --images (default: photos:report with the "
        "bundled tuning photos, else half of --images)",
    )
    parser.add_argument("--split", default="train", help="split of a `datasets` id (default: %(default)s)")
    parser.add_argument("--image-column", default="image", help="image column of a `datasets` id")
    parser.add_argument("--limit", type=int, default=4, help="calibration images used (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=518, help="square input side in px (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.97, help="fidelity to reach (default: %(default)s)")
    parser.add_argument("--metric", choices=METRICS, default="patch_cosine")
    parser.add_argument("--candidates", type=int, nargs="+", default=[64, 128, 256], help="landmark counts to try")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--measure-speed", action="store_true", help="time the schedules and choose by measured speed")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", help="torch device to calibrate on (default: cuda when available, else cpu)")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (TQDM_DISABLE=1 also hides it)"
    )
    parser.add_argument(
        "--base-model",
        help="Hub id of the model, named in the model card (default: --model when it is a Hub id; the card of a "
        "local model names no base model)",
    )
    parser.add_argument(
        "--out",
        help="folder to write fna_config.json, calibration.json, measured.json, frontier.png and a model card "
        "(README.md)",
    )


@dataclass
class CalibrateSettings:
    """What one `hf-fna calibrate` run calibrates (the command-line options of the same names); `check()` refuses bad
    values before anything is loaded or computed.

    Args:
        model: a folder, a Hub id or a bundled model (`hf_fna:dinov2-small`, the default, or `hf_fna:clip-b16`).
        images, heldout_images: a folder of image files, a `datasets` id (`split`, `image_column`) or bundled photos
            (`BUNDLED_PHOTOS`); held out by default: the "report" photos with the "tune" ones, else half of `images`.
        limit: calibration images used (the first ones).
        base_model: the Hub id the model card names (default: `model` when it is a Hub id).
        out: folder for `OUT_FILES`, checked before any compute and written as one set.
        command: the command line, recorded in the reports (default: this call).
    """

    model: str | None = None
    images: str = "photos:tune"
    heldout_images: str | None = None
    split: str = "train"
    image_column: str = "image"
    limit: int = 4
    resolution: int = 518
    target: float = 0.97
    metric: str = "patch_cosine"
    candidates: Sequence[int] = (64, 128, 256)
    batch_size: int = 4
    measure_speed: bool = False
    threads: int | None = None
    device: str | None = None
    show_progress: bool = True
    base_model: str | None = None
    out: str | None = None
    command: str | None = None

    def check(self) -> None:
        """Raise `InputError` naming the first bad value (counts, then the `--out` folder)."""
        from .outputs import check_output_set

        for option in ("limit", "batch_size", "resolution", "threads"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise InputError(f"--{option.replace('_', '-')} must be a positive integer; got {value}")
        if self.out:
            try:  # before any compute: a folder or a file that cannot be written fails now, not after minutes of passes
                check_output_set(self.out, OUT_FILES)
            except OSError as error:
                raise InputError(f"cannot write to --out {self.out}: {error}") from error


def settings_from_args(args: Any) -> CalibrateSettings:
    """The `CalibrateSettings` an `hf-fna calibrate` command line describes."""
    import sys

    return CalibrateSettings(
        model=args.model,
        images=args.images,
        heldout_images=args.heldout_images,
        split=args.split,
        image_column=args.image_column,
        limit=args.limit,
        resolution=args.resolution,
        target=args.target,
        metric=args.metric,
        candidates=args.candidates,
        batch_size=args.batch_size,
        measure_speed=args.measure_speed,
        threads=args.threads,
        device=args.device,
        show_progress=not args.no_progress,
        base_model=args.base_model,
        out=args.out,
        command="hf-fna calibrate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["calibrate"] else sys.argv[1:]),
    )


def run(args: Any) -> int:
    run_calibration(settings_from_args(args))
    return 0


def run_calibration(settings: CalibrateSettings) -> CalibrationReport:
    """Calibrate as `settings` say: load the model and images, run `calibrate`, print the frontier and write `out`.

    Raises:
        InputError: a bad setting, a model or images that cannot be loaded, or an `out` folder that cannot be
            written (after the report is printed).
    """
    import io
    import json

    from .outputs import write_files_atomically

    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    base_model = _base_model(settings)
    device = device_from_option(settings.device)
    loaded, model_name = _load_model(settings.model)
    problem = resolution_problem(settings.resolution, loaded.patch_size)
    if problem:  # the patch embedding would crop the image silently, or fail below one patch
        raise InputError(f"--resolution {settings.resolution} {problem}")
    model = loaded.model.to(device)
    mean, std = loaded.preprocessing.mean, loaded.preprocessing.std
    images = _load_images(settings.images, settings)[: settings.limit]
    heldout_source = settings.heldout_images or ("photos:report" if settings.images == "photos:tune" else None)
    heldout = _load_images(heldout_source, settings) if heldout_source else None
    report = calibrate(
        model,
        images,
        target=settings.target,
        metric=settings.metric,
        resolution=settings.resolution,
        heldout=heldout,
        candidates=settings.candidates,
        measure_speed=settings.measure_speed,
        batch_size=settings.batch_size,
        progress=settings.show_progress,
        image_mean=mean,
        image_std=std,
    )

    machine = machine_info(device)
    command = settings.command or f"hf_fna.tools.calibration.run_calibration({settings!r})"
    chosen = report.chosen
    print(machine_line(machine))
    print(
        f"{model_name}: {report.tokens} tokens at {report.resolution} px, {report.calibration_images} calibration "
        f"images, {report.forward_passes} forward passes in {report.seconds:.0f} s\n"
    )
    print(report.markdown())
    print(
        f"\nchosen: layers={report.config.layers!r} (FLOP bound {chosen['predicted_speedup']:.2f}x); "
        f"{settings.metric} {chosen['fidelity']:.4f} on the calibration images, {report.heldout['fidelity']:.4f} "
        f"(worst image {report.heldout['worst_image_fidelity']:.4f}) on {report.heldout['images']} held-out images"
    )
    for note in report.notes:
        print(f"note: {note}")
    if not settings.out:
        return report

    from .publish import model_card

    measured = {
        "command": command,
        "machine": machine_line(machine),
        "model": model_name,
        "input": f"{report.resolution} x {report.resolution} px ({report.tokens} tokens)",
        "calibration images": (
            f"{report.calibration_images} ({settings.images}), normalised with mean {mean}, std {std}"
        ),
        f"{settings.metric} on the calibration images": f"{chosen['fidelity']:.4f}",
        f"{settings.metric} on {report.heldout['images']} held-out images": (
            f"{report.heldout['fidelity']:.4f} (worst image {report.heldout['worst_image_fidelity']:.4f})"
        ),
        "speed-up bound (FLOP model)": f"{chosen['predicted_speedup']:.2f}x",
    }
    if "measured_speedup" in chosen:
        measured["measured speed-up (calibration batch)"] = f"{chosen['measured_speedup']:.2f}x"
    card = model_card(report.config, base_model, measured, model_name=model_name)
    card += (
        "\n## Calibration frontier\n\nEvery schedule `hf-fna calibrate` measured on the calibration images "
        "(fidelity to exact attention against the FLOP bound of the speed-up); the chosen one is marked.\n\n"
        f"![frontier](frontier.png)\n\n{report.markdown()}\n"
    )
    png = io.BytesIO()  # rendered in memory: PIL cannot save to a file opened from a descriptor
    report.plot(png)
    files: dict[str, str | bytes] = {
        "fna_config.json": report.config.to_json_string(),
        "calibration.json": json.dumps(
            {"command": command, "machine": machine, "images": settings.images, **report.to_dict()}, indent=2
        )
        + "\n",
        "measured.json": json.dumps(measured, indent=2) + "\n",
        "README.md": card,
        "frontier.png": png.getvalue(),
    }
    try:  # the set as one: a failure leaves the folder's earlier files, never a mix of old and new
        paths = write_files_atomically(settings.out, files)
    except OSError as error:
        raise InputError(
            f"the report above is complete, but nothing was written to --out {settings.out}: {first_line(error)}"
        ) from error
    for path in paths:
        print(f"wrote {path}")
    return report


def _base_model(settings: CalibrateSettings) -> str | None:
    """The Hub id the model card names: `--base-model`, else `--model` when it names a Hub repo rather than a folder,
    or the Hub model a bundled model's weights come from (`hf_fna:clip-b16`: openai/clip-vit-base-patch16); None for a
    local folder (the card then names no base model)."""
    import os

    from ..assets import MODEL_PREFIX, bundled_model_info
    from .publish import check_repo_id

    if settings.base_model is not None:
        check_repo_id("--base-model", settings.base_model)
        return settings.base_model
    if settings.model is None or settings.model.startswith(MODEL_PREFIX):
        try:
            return bundled_model_info(settings.model or f"{MODEL_PREFIX}dinov2-small").base_model
        except ValueError as error:
            raise InputError(f"--model: {error}") from None
    if os.path.exists(settings.model):
        return None
    check_repo_id("--model", settings.model)
    return settings.model


def _load_model(name: str | None) -> tuple[LoadedModel, str]:
    """The model `--model` names (with its image processor) and a name for reports."""
    return load_model(model_folder(name)), model_description(name)


def _open_image(path: str) -> Any:
    """An image file as RGB; one that cannot be decoded raises `InputError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise InputError(f"--images: cannot read {path}: {first_line(error, with_type=True)}") from error


def _load_images(source: str, settings: CalibrateSettings) -> list[Any]:
    import os

    from ..locations import check_local_path

    if source in BUNDLED_PHOTOS:
        from ..assets import photos

        split = source.partition(":")[2] or None
        return list(photos(split)["image"])
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")))
        if not names:
            raise InputError(f"--images {source}: the folder holds no .png/.jpg/.jpeg/.webp/.bmp file")
        return [_open_image(os.path.join(source, name)) for name in names]
    import datasets

    try:
        check_local_path(source, kind="dataset")
        data = datasets.load_dataset(source, split=settings.split)
    except Exception as error:  # the Hub and datasets raise many types; all mean the same to the user
        raise InputError(f"--images {source}: not a folder, a bundled set or a loadable dataset: {error}") from error
    if settings.image_column not in data.column_names:
        raise InputError(
            f"--images {source}: no column {settings.image_column!r}; columns: {', '.join(data.column_names)}"
        )
    return list(data[settings.image_column])
