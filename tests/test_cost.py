"""The FLOP cost model (`hf_fna.ops.cost`): the speed-up bounds that measured speed-ups are read against."""

from __future__ import annotations

import pytest

from hf_fna.ops.cost import flop_bound, schedule_flop_bound


def test_flop_bound_of_dinov2_small_at_896_px() -> None:
    # DINOv2-small (D = 384, 12 layers) at 896 px (N = 4097), m = 64: 40.3 GFLOP per exact layer, 15.3 with FNA.
    assert flop_bound(4097, 384, 12, 6, 64) == pytest.approx(1.45, abs=0.005)
    assert flop_bound(4097, 384, 12, 12, 64) == pytest.approx(2.63, abs=0.005)
    assert flop_bound(16385, 384, 12, 12, 64) == pytest.approx(7.7, abs=0.05)
    assert flop_bound(4097, 384, 12, 0, 64) == 1.0


def test_schedule_flop_bound_counts_each_layers_landmarks_and_the_pseudo_inverse() -> None:
    exact4 = [None] * 4
    # At m=64 the landmark kernel and Newton-Schulz terms are small: within 0.3% of the plain bound.
    assert schedule_flop_bound(4097, 384, 6, [None] * 6 + [64] * 6) == pytest.approx(
        flop_bound(4097, 384, 12, 6, 64), rel=3e-3
    )
    assert schedule_flop_bound(4097, 384, 6, exact4 + [256] * 2 + [64] * 6) == pytest.approx(1.619, abs=0.001)
    assert schedule_flop_bound(4097, 384, 6, exact4 + [128] * 2 + [64] * 6) == pytest.approx(1.685, abs=0.001)
    assert schedule_flop_bound(4097, 384, 6, [None] * 2 + [256] * 2 + [128] * 2 + [64] * 6) == pytest.approx(
        1.92, abs=0.005
    )
    # At m=256 the 48 m^3 per head of the pseudo-inverse outweighs the Nyström products: 8 layers at 256 gain less
    # than 6 layers at 64.
    assert schedule_flop_bound(4097, 384, 6, exact4 + [256] * 8) < schedule_flop_bound(
        4097, 384, 6, [None] * 6 + [64] * 6
    )
    assert schedule_flop_bound(4097, 384, 6, [None] * 12) == 1.0
