"""The FLOP cost model of FNA: the end-to-end speed-up a layer schedule could reach if every FLOP ran equally fast.

A transformer layer of width D on N tokens costs 8 N D^2 in its projections, 4 r N D^2 in an MLP of ratio r and
4 N^2 D in exact attention; FNA with m landmarks replaces the last by 8 N m D (plus, counted by
`schedule_flop_bound`, the landmark kernel and its Newton-Schulz pseudo-inverse). Measured speed-ups
(`hf-fna compare`, `benchmarks/bench_model.py`) are read against these bounds.
"""

from __future__ import annotations

from collections.abc import Sequence


def flop_bound(
    tokens: int, width: int, num_layers: int, fna_layers: int, landmarks: int, mlp_ratio: float = 4.0
) -> float:
    """End-to-end speed-up bound of FNA in `fna_layers` of `num_layers` layers.

    A layer costs 8 N D^2 (projections) + 4 r N D^2 (MLP of ratio r: 16 N D^2 at r = 4) + 4 N^2 D (exact attention)
    or 8 N m D (FNA); the bound is the FLOP ratio, i.e. the speed-up if every FLOP ran equally fast.
    """
    dense, exact = _dense_and_exact_flops(tokens, width, mlp_ratio)
    fna = dense + 8 * tokens * min(landmarks, tokens) * width
    return num_layers * exact / ((num_layers - fna_layers) * exact + fna_layers * fna)


def schedule_flop_bound(
    tokens: int,
    width: int,
    heads: int,
    landmarks_per_layer: Sequence[int | None],
    mlp_ratio: float = 4.0,
    pinv_iterations: int = 6,
) -> float:
    """End-to-end speed-up bound of a schedule: `landmarks_per_layer[i]` is the m of layer i, None for exact attention.

    As `flop_bound`, plus what grows with m: the landmark kernel (2 m^2 D) and the Newton-Schulz pseudo-inverse
    (4 products of m x m matrices per iteration and head: 8 m^3 each), which outweighs the Nyström products at m=256
    on a 384-wide model.
    """
    dense, exact = _dense_and_exact_flops(tokens, width, mlp_ratio)

    def layer(landmarks: int | None) -> float:
        if landmarks is None:
            return exact
        m = min(landmarks, tokens)
        return dense + 8 * tokens * m * width + 2 * m * m * width + 8 * pinv_iterations * heads * m**3

    return len(landmarks_per_layer) * exact / sum(layer(m) for m in landmarks_per_layer)


def _dense_and_exact_flops(tokens: int, width: int, mlp_ratio: float) -> tuple[float, float]:
    """FLOPs of one layer's projections and MLP, and of the whole layer with exact attention."""
    dense = (8 + 4 * mlp_ratio) * tokens * width**2
    return dense, dense + 4 * tokens**2 * width
