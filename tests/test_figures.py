"""Figures a user reads: per-layer colour scales of `inspect`, readable `calibrate` frontiers, honest `compare`
plots."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text

from hf_fna import FNAConfig
from hf_fna.tools.calibration import CalibrationReport
from hf_fna.tools.compare import plot_figure
from hf_fna.tools.inspection import InspectedLayer, Inspection, norm_maps_figure


def test_norm_maps_use_one_colour_scale_per_layer():
    rng = np.random.default_rng(0)
    # Layers whose norms differ by orders of magnitude, as in real towers (late layers far larger).
    maps = [rng.uniform(1, 2, (6, 6)) * 10**layer for layer in range(3)]
    layers = [InspectedLayer(i, {"max_over_median": 1.5}, [], []) for i in range(3)]
    result = Inspection("model", "image", 48, (48, 48), 8, (6, 6), ["CLS"], layers, [1, 2], 8, [], [0])
    fig = norm_maps_figure(result, maps)
    try:
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == 3
        for image, norms in zip(images, maps, strict=True):
            assert image.norm.vmin == pytest.approx(norms.min()) and image.norm.vmax == pytest.approx(norms.max())
        assert "own log colour scale" in fig._suptitle.get_text()
        assert f"{maps[2].min():.3g} to {maps[2].max():.3g}" in fig.axes[2].get_title()
    finally:
        plt.close(fig)


def _report(rows: list[tuple[str, float, float]]) -> CalibrationReport:
    frontier = [
        {"schedule": name, "predicted_speedup": speed, "predicted_fidelity": fidelity - 0.01, "fidelity": fidelity,
         "worst_image_fidelity": fidelity - 0.02}
        for name, speed, fidelity in rows
    ]  # fmt: skip
    frontier[0]["chosen"] = True
    return CalibrationReport(
        config=FNAConfig(layers=frontier[0]["schedule"]),
        target=0.97,
        metric="patch_cosine",
        tokens=1370,
        num_layers=12,
        resolution=518,
        candidates=(64, 128),
        calibration_images=4,
        sensitivity={},
        frontier=frontier,
        heldout={"fidelity": 0.975, "worst_image_fidelity": 0.95, "images": 9},
        forward_passes=40,
        seconds=1.0,
        met_target=True,
    )


def test_frontier_labels_do_not_overlap_and_exact_attention_is_marked():
    # Twelve schedules crowded around the same point, as real frontiers are.
    crowded = itertools.product(range(6), (64, 128))
    rows = [(f"{i}:12@{m}", 1.1 + 0.002 * (i % 4), 0.98 + 0.0005 * i) for i, m in crowded]
    fig = _report(rows).figure()
    try:
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        boxes = [Text.get_window_extent(text, renderer) for text in ax.texts]  # the labels, without leader lines
        assert len(boxes) == len(rows)
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        verticals = [line for line in ax.lines if list(line.get_xdata()) == [1.0, 1.0]]
        assert verticals and "exact attention" in verticals[0].get_label()
        listing = "\n".join(text.get_text() for text in fig.texts)
        assert all(name in listing for name, _, _ in rows) and "(chosen)" in listing
    finally:
        plt.close(fig)


def _row(resolution: int, speedup: float, fna_layers: list[int]) -> dict:
    return {
        "resolution": resolution,
        "speedup": speedup,
        "flop_bound": 1.0 if not fna_layers else 1.3,
        "fna_layers": fna_layers,
        "cls_cosine": 1.0,
        "patch_cosine": 1.0,
    }


def test_compare_plot_shows_no_fna_speed_up_for_a_run_that_fell_back():
    fig = plot_figure([_row(224, 1.09, [])], "one resolution")
    try:
        speed = fig.axes[0]
        labels = {line.get_label(): line for line in speed.lines}
        assert not any(label.startswith("measured") for label in labels)  # no "1.09x measured" point
        fallback = labels["fell back to exact attention (no FNA layer)"]
        assert list(fallback.get_xdata()) == [224] and list(fallback.get_ydata()) == [1.0]
    finally:
        plt.close(fig)
    fig = plot_figure([_row(224, 1.09, []), _row(518, 1.2, [6, 7]), _row(896, 1.4, [6, 7])], "three")
    try:
        measured = next(line for line in fig.axes[0].lines if line.get_label().startswith("measured"))
        assert list(measured.get_xdata()) == [518, 896]
    finally:
        plt.close(fig)
