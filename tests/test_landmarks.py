"""Landmark selection: FPS picks outliers, honours guaranteed and invalid tokens, is batched and deterministic."""

from __future__ import annotations

import pytest
import torch

from hf_fna.ops import farthest_point_sampling, random_sampling, select_landmarks

IMPLEMENTATIONS = ["numpy", "torch"]


def points(batch=2, tokens=50, dim=8, seed=0):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


def textbook_fps(features, num_landmarks, guaranteed=None, valid=None, seed_with_guaranteed=True, start="first"):
    """Greedy k-centre written plainly, one sample and one pick at a time, with `torch.cdist` (O(N m))."""
    batch, num_tokens, _ = features.shape
    guaranteed = torch.zeros(batch, num_tokens, dtype=torch.bool) if guaranteed is None else guaranteed
    valid = torch.ones(batch, num_tokens, dtype=torch.bool) if valid is None else valid
    result = []
    for x, forced_mask, valid_mask in zip(features.double(), guaranteed, valid, strict=True):
        picks = torch.nonzero(forced_mask & valid_mask).flatten().tolist()
        free = valid_mask & ~forced_mask
        landmarks = list(picks) if seed_with_guaranteed else []
        while len(picks) < num_landmarks:
            if landmarks:
                nearest = torch.cdist(x, x[landmarks]).min(dim=1).values
                pick = int(torch.where(free, nearest, -1.0).argmax())
            elif start == "first":
                pick = int(torch.nonzero(free)[0])
            else:  # farthest from the centroid of the valid tokens
                centroid = x[valid_mask].mean(dim=0)
                pick = int(torch.where(free, (x - centroid).norm(dim=1), -1.0).argmax())
            picks.append(pick)
            landmarks.append(pick)
            free[pick] = False
        result.append(picks)
    return torch.tensor(result)


def clustered_with_outliers(seed=0):
    """Four tight clusters, a few far outliers (massive-token-like) and a CLS-like token far from all of them."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]])
    x = centres.repeat_interleave(40, 0) + 0.5 * torch.randn(160, 3, generator=generator)
    x[[17, 90, 151]] += torch.tensor([[30.0, 0.0, 0.0], [0.0, -25.0, 0.0], [0.0, 0.0, 40.0]])
    x[0] = torch.tensor([-50.0, -50.0, -50.0])
    return torch.stack([x, x.flip(0)])


SCENARIOS = {
    "random": lambda: (points(batch=3, tokens=300, dim=16), None, None),
    "clusters and outliers": lambda: (clustered_with_outliers(), None, None),
    "guaranteed CLS": lambda: (clustered_with_outliers(), _first_tokens(2, 160, 1), None),
    "guaranteed and padding": lambda: (points(batch=3, tokens=200, dim=6), _guaranteed_mix(), _padding()),
}


def _first_tokens(batch, tokens, count):
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[:, :count] = True
    return mask


def _guaranteed_mix():
    mask = _first_tokens(3, 200, 1)
    mask[1, [50, 120]] = True  # flagged tokens besides CLS
    mask[2, 199] = True  # a trailing special token
    mask[0, 150] = True  # guaranteed but padded: never picked
    return mask


def _padding():
    valid = torch.ones(3, 200, dtype=torch.bool)
    valid[0, 140:] = False
    valid[2, 100:150] = False
    return valid


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("start", ["first", "centroid"])
@pytest.mark.parametrize("seed_with_guaranteed", [False, True])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fps_equals_the_textbook_greedy_k_centre(scenario, seed_with_guaranteed, start, implementation):
    features, guaranteed, valid = SCENARIOS[scenario]()
    expected = textbook_fps(features, 40, guaranteed, valid, seed_with_guaranteed, start)
    got = farthest_point_sampling(
        features, 40, guaranteed, valid, seed_with_guaranteed=seed_with_guaranteed, start=start,
        implementation=implementation,
    )  # fmt: skip
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_tensor_loop_equals_the_numpy_loop(scenario):
    # The tensor loop is the one that runs on CUDA and under torch.compile; here it is forced on CPU.
    features, guaranteed, valid = SCENARIOS[scenario]()
    numpy_picks = farthest_point_sampling(features, 64, guaranteed, valid, implementation="numpy")
    assert torch.equal(farthest_point_sampling(features, 64, guaranteed, valid, implementation="torch"), numpy_picks)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fps_equals_the_sampler_of_the_papers_code(scenario):
    # torch_quickfps is what the reference implementation calls: unseeded FPS from the first eligible token.
    pytest.importorskip("torch_quickfps")
    features, guaranteed, valid = SCENARIOS[scenario]()
    expected = farthest_point_sampling(features, 40, guaranteed, valid, seed_with_guaranteed=False)
    got = farthest_point_sampling(
        features, 40, guaranteed, valid, seed_with_guaranteed=False, implementation="quickfps"
    )
    assert torch.equal(got, expected)


def test_coverage_radius_is_at_most_the_smallest_landmark_spacing():
    # The defect this guards against: a phantom landmark at the centroid, so that no central token was ever picked.
    # With a correct FPS, the coverage radius (largest distance of any token to its nearest landmark) is at most the
    # distance between any two landmarks picked after the first (the greedy k-centre property).
    x = points(batch=1, tokens=400, dim=8)
    picks = farthest_point_sampling(x, 32)[0]
    landmarks = x[0, picks]
    radius = torch.cdist(x[0], landmarks).min(dim=1).values.max()
    pairwise = torch.cdist(landmarks, landmarks) + torch.eye(32) * 1e9
    assert radius <= pairwise.min() + 1e-5


@pytest.mark.parametrize("method", ["fps", "random"])
def test_no_duplicates_and_guaranteed_first(method):
    x = points()
    picks = select_landmarks(x, 20, method=method, num_special_tokens=2)
    assert picks.shape == (2, 20)
    assert (picks[:, :2] == torch.tensor([0, 1])).all()
    for row in picks:
        assert row.unique().numel() == 20


def test_injected_outlier_is_among_first_picks():
    x = points()
    x[0, 37] += 40.0
    x[1, 5] -= 40.0
    picks = farthest_point_sampling(x, 8, start="centroid")
    assert picks[0, 0] == 37 and picks[1, 0] == 5
    picks = farthest_point_sampling(x, 8)  # starts at token 0, then the outlier
    assert picks[0, :2].tolist() == [0, 37] and picks[1, :2].tolist() == [0, 5]
    picks = select_landmarks(x, 8, num_special_tokens=1, start="special")  # CLS first, then the token farthest from it
    assert picks[0, 1] == 37 and picks[1, 1] == 5
    picks = select_landmarks(x, 8, num_special_tokens=1)  # the paper's order: CLS, the first other token, the outlier
    assert picks[0, :3].tolist() == [0, 1, 37] and picks[1, :3].tolist() == [0, 1, 5]


def test_fps_spreads_over_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres.repeat_interleave(10, 0) + 0.1 * torch.randn(40, 2)).unsqueeze(0)
    picks = farthest_point_sampling(x, 4)[0]
    assert sorted((picks // 10).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["fps", "random"])
def test_batch_of_two_equals_two_single_runs(method):
    x = points()
    both = select_landmarks(x, 10, method=method, num_special_tokens=1, seed=4)
    first = select_landmarks(x[:1], 10, method=method, num_special_tokens=1, seed=4)
    # Random sampling draws per-sample noise from one seeded stream, so compare FPS exactly and random by rule.
    if method == "fps":
        second = select_landmarks(x[1:], 10, method=method, num_special_tokens=1)
        assert torch.equal(both, torch.cat([first, second]))
    else:
        assert torch.equal(both[:1], first)
    assert torch.equal(both, select_landmarks(x, 10, method=method, num_special_tokens=1, seed=4))


def test_invalid_tokens_never_picked_and_guaranteed_mask_honoured():
    x = points()
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[0, 30:] = False
    x[0, 45] += 100.0  # a padded outlier
    guaranteed = torch.zeros(2, 50, dtype=torch.bool)
    guaranteed[1, [7, 9]] = True
    for method in ("fps", "random"):
        picks = select_landmarks(x, 30, method=method, guaranteed=guaranteed, valid=valid)
        assert (picks[0] < 30).all() and picks[0].unique().numel() == 30
        assert picks[1, :2].tolist() == [7, 9]


def test_identical_tokens_still_give_distinct_landmarks():
    x = torch.zeros(1, 20, 4)
    picks = farthest_point_sampling(x, 20)
    assert picks[0].unique().numel() == 20


def test_random_sampling_is_seeded():
    a = random_sampling(100, 10, 2, seed=1)
    assert torch.equal(a, random_sampling(100, 10, 2, seed=1))
    assert not torch.equal(a, random_sampling(100, 10, 2, seed=2))


def test_bad_counts():
    with pytest.raises(ValueError, match=r"num_landmarks=51 must lie in \[1, 50\]"):
        farthest_point_sampling(points(), 51)
    with pytest.raises(ValueError, match="method 'grid' is not supported; accepted values: fps, random"):
        select_landmarks(points(), 5, method="grid")
    with pytest.raises(ValueError, match="start='median' is not supported; accepted values: first, centroid"):
        farthest_point_sampling(points(), 5, start="median")
    with pytest.raises(ValueError, match="implementation='cuda' is not supported; accepted values: auto, numpy"):
        farthest_point_sampling(points(), 5, implementation="cuda")


def test_fps_restores_the_blas_thread_count_of_the_process():
    # FPS limits NumPy's BLAS to one thread while it runs (its pool would otherwise spin against PyTorch's threads);
    # the user's setting must come back afterwards, also when two threads run FPS at once.
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    features = torch.randn(2, 300, 16)
    with ThreadPoolExecutor(2) as pool:
        picks = list(pool.map(lambda _: farthest_point_sampling(features, 32), range(8)))
    assert blas_threads() == before
    assert all(torch.equal(p, picks[0]) for p in picks)
