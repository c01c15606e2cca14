"""Landmark selection: batched farthest point sampling (FPS) and seeded random sampling.

Both work on a whole batch at once, in plain PyTorch, on any device, without host synchronisation: FPS loops over
the `m` landmarks, never over the batch (on CPU, where there is no device to wait for, the FPS loop runs in NumPy
per sample: its per-call overhead is far lower). Guaranteed tokens (CLS, registers, flagged massive tokens) are picked
first; invalid tokens (padding) are never picked; no token is picked twice as long as a sample has at least `m`
valid tokens.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from ..errors import InputError
from .checks import check_choice, check_features, check_int, check_seed, check_token_mask

# Distances that order the picks: picked tokens below any real distance, invalid tokens below everything.
_PICKED = torch.finfo(torch.float32).min
_INVALID = float("-inf")
_UNSEEN = float("inf")  # no landmark has set the token's distance yet

SAMPLING_METHODS = ("fps", "random", "quickfps")
FPS_STARTS = ("first", "centroid")
# Where `select_landmarks(method="fps")` starts: "special" seeds the distances with the always-landmark tokens,
# "first" runs FPS over the other tokens from the first of them (the paper's order), "centroid" from the token
# farthest from their centroid.
SELECTION_STARTS = ("special", "first", "centroid")
FPS_IMPLEMENTATIONS = ("auto", "numpy", "torch", "quickfps")


@torch.no_grad()
def farthest_point_sampling(
    features: torch.Tensor,
    num_landmarks: int,
    guaranteed: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    *,
    seed_with_guaranteed: bool = False,
    start: str = "first",
    implementation: str = "auto",
) -> torch.Tensor:
    """Pick `num_landmarks` tokens per sample by farthest point sampling (greedy k-centre).

    Guaranteed tokens come first, in index order. Every later pick is the valid, unpicked token whose squared L2
    distance to its *nearest* landmark is largest; nothing else enters that minimum. Outliers, such as massive and
    artifact tokens, are therefore among the first picks.

    Args:
        features: `[B, N, C]` per-token features (any float dtype; distances are computed in float32).
        num_landmarks: `m`, at most `N`.
        guaranteed: optional `[B, N]` bool, tokens picked before any other (in index order).
        valid: optional `[B, N]` bool, tokens that may be picked (False for padding).
        seed_with_guaranteed: whether the guaranteed tokens count as landmarks in the distances: the first free pick
            is then the token farthest from CLS and registers. False (the default) runs FPS over the other tokens
            alone and prepends the guaranteed ones, as the paper's code does; the two were indistinguishable on both
            real models here (README, "Landmark sampler").
        start: the first pick when nothing seeds the distances (no guaranteed token, or `seed_with_guaranteed=False`):
            `"first"`, the lowest-index eligible token (the paper's sampler; deterministic and cheap), or
            `"centroid"`, the token farthest from the centroid (it did no better on the tuning photos).
        implementation: `"numpy"` (a per-sample loop, fastest on CPU), `"torch"` (a batched loop of tensor ops on
            the features' device, no host synchronisation), `"quickfps"` (the `torch-quickfps` package, if
            installed), or `"auto"`: NumPy on CPU, torch elsewhere and under `torch.compile`. All give the same
            indices, ties aside.

    Returns:
        `[B, m]` int64 token indices; guaranteed tokens come first.
    """
    check_features("features", features)
    batch, num_tokens, channels = features.shape
    _check_count(num_landmarks, num_tokens)
    check_token_mask("guaranteed", guaranteed, batch, num_tokens)
    check_token_mask("valid", valid, batch, num_tokens)
    check_choice("FPS start", start, FPS_STARTS)
    check_choice("FPS implementation", implementation, FPS_IMPLEMENTATIONS)
    if implementation == "auto":
        on_cpu = features.device.type == "cpu" and not torch.compiler.is_compiling()
        implementation = "numpy" if on_cpu else "torch"
    forced, forced_count = _forced_order(guaranteed, valid, num_landmarks)
    x = features.float()
    eligible = valid
    if forced is not None:
        eligible = ~guaranteed if valid is None else valid & ~guaranteed
    if implementation == "quickfps":
        return _fps_quickfps(x, num_landmarks, forced, forced_count, eligible, seed_with_guaranteed, start)

    if valid is None:
        centroid = x.mean(dim=1, keepdim=True)
    else:
        weights = valid.unsqueeze(-1).float()
        centroid = (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    # Distances are translation invariant: centring keeps the norms (and the rounding of the expansion below) small.
    x = x - centroid
    norms = x.square().sum(-1)
    start_index = _start_index(norms, eligible, start)
    # The pick at which the start token is taken: right after the guaranteed tokens when they do not seed the
    # distances; first (only without guaranteed tokens) when they do. -1: never.
    if forced is None:
        start_step = torch.zeros(batch, dtype=torch.long, device=x.device)
    elif seed_with_guaranteed:
        start_step = torch.where(forced_count == 0, 0, -1)
    else:
        start_step = forced_count
    distance = torch.full_like(norms, _UNSEEN)
    if valid is not None:
        distance.masked_fill_(~valid, _INVALID)
    # |x_i - x_j|^2 = <[-2 x_j, |x_j|^2, 1], [x_i, 1, |x_i|^2]>: one [1, C+2] x [C+2, N] product per pick instead of a
    # [B, N, C] difference, square and sum (the transposed layout streams over N; [N, C+2] x [C+2, 1] is far slower).
    ones = torch.ones_like(norms).unsqueeze(-1)
    points = torch.cat([x, ones, norms.unsqueeze(-1)], dim=-1).transpose(1, 2).contiguous()  # [B, C + 2, N]
    centres = torch.cat([-2.0 * x, norms.unsqueeze(-1), ones], dim=-1)  # [B, N, C + 2]

    if implementation == "numpy":
        return _fps_loop_numpy(
            distance,
            points,
            centres,
            forced,
            forced_count,
            start_index,
            start_step,
            num_landmarks,
            seed_with_guaranteed,
        )
    # Functional ops, no `out=`: `torch.export` with a dynamic batch would otherwise specialise the batch size.
    picks = []
    for i in range(num_landmarks):
        pick = torch.argmax(distance, dim=-1)
        if forced is not None:
            pick = torch.where(forced_count > i, forced[:, i], pick)
        pick = torch.where(start_step == i, start_index, pick)
        centre = centres.gather(1, pick.view(batch, 1, 1).expand(batch, 1, channels + 2))
        new_distance = torch.bmm(centre, points).view(batch, num_tokens)
        if forced is not None and not seed_with_guaranteed:
            new_distance = new_distance.masked_fill((forced_count > i).unsqueeze(-1), _UNSEEN)
        distance = torch.minimum(distance, new_distance).scatter(1, pick.view(batch, 1), _PICKED)
        picks.append(pick)
    return torch.stack(picks, dim=1)


def _start_index(norms: torch.Tensor, eligible: torch.Tensor | None, start: str) -> torch.Tensor:
    """`[B]` the first FPS pick among the eligible tokens (valid, not guaranteed)."""
    if start == "centroid":
        score = norms
    else:  # "first": the lowest index scores highest
        score = -torch.arange(norms.shape[-1], device=norms.device, dtype=norms.dtype).expand_as(norms)
    if eligible is not None:
        score = score.masked_fill(~eligible, _INVALID)
    return score.argmax(dim=-1)


_BLAS_LIMIT_LOCK = threading.Lock()


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _fps_loop_numpy(
    distance: torch.Tensor,
    points: torch.Tensor,
    centres: torch.Tensor,
    forced: torch.Tensor | None,
    forced_count: torch.Tensor | None,
    start_index: torch.Tensor,
    start_step: torch.Tensor,
    num_landmarks: int,
    seed_with_guaranteed: bool,
) -> torch.Tensor:
    """The FPS loop of `farthest_point_sampling` in NumPy on the same CPU buffers (no copies), one sample at a time.

    The same steps as the tensor loop: NumPy's per-call overhead is a fraction of a PyTorch op's, which dominates FPS
    at these sizes (64 steps of a few microseconds of arithmetic each).
    """
    batch, num_tokens = distance.shape
    picks = np.empty((batch, num_landmarks), dtype=np.int64)
    counts = [0] * batch if forced_count is None else forced_count.tolist()
    forced_lists = [[] if forced is None else forced[b, :count].tolist() for b, count in enumerate(counts)]
    starts, start_steps = start_index.tolist(), start_step.tolist()
    new_distance = np.empty(num_tokens, dtype=np.float32)
    # One BLAS thread: NumPy's OpenBLAS threads spin after each product and then steal the cores from PyTorch's
    # OpenMP threads (measured: H=6, N=8193, 2 threads, FNA 36 ms -> 22 ms), and these products are small anyway.
    # The limit is process-wide and restored on exit: the lock keeps two threads from restoring each other's value.
    with _BLAS_LIMIT_LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        for b in range(batch):
            dist, rows, cols, first = distance[b].numpy(), centres[b].numpy(), points[b].numpy(), forced_lists[b]
            for i in range(num_landmarks):
                forced_pick = i < len(first)
                if forced_pick:
                    pick = first[i]
                elif i == start_steps[b]:
                    pick = starts[b]
                else:
                    pick = int(dist.argmax())
                picks[b, i] = pick
                if seed_with_guaranteed or not forced_pick:
                    np.dot(rows[pick], cols, out=new_distance)
                    np.minimum(dist, new_distance, out=dist)
                dist[pick] = _PICKED
    return torch.from_numpy(picks)


def _fps_quickfps(
    x: torch.Tensor,
    num_landmarks: int,
    forced: torch.Tensor | None,
    forced_count: torch.Tensor | None,
    eligible: torch.Tensor | None,
    seed_with_guaranteed: bool,
    start: str,
) -> torch.Tensor:
    """FPS by `torch_quickfps.sample` (bucket FPS, CPU and CUDA kernels), the sampler of the paper's code.

    It runs over the eligible tokens only and starts at the first of them: `seed_with_guaranteed=False, start="first"`.
    """
    try:
        import torch_quickfps
    except ImportError as error:
        raise ImportError(
            "implementation='quickfps' needs the torch-quickfps package: pip install torch-quickfps "
            "(or torch-quickfps-cu128 / -cu130 for CUDA builds of torch)."
        ) from error
    if (seed_with_guaranteed and forced is not None) or start != "first":
        raise InputError(
            "implementation='quickfps' supports only seed_with_guaranteed=False and start='first' (what "
            f"torch_quickfps does); got seed_with_guaranteed={seed_with_guaranteed}, start={start!r}."
        )
    batch, num_tokens, _ = x.shape
    if eligible is None:
        eligible = torch.ones(batch, num_tokens, dtype=torch.bool, device=x.device)
    counts = torch.zeros(batch, dtype=torch.long, device=x.device) if forced_count is None else forced_count
    free = num_landmarks - int(counts.min())
    if free == 0:
        return forced
    sampled = torch_quickfps.sample(x, free, mask=eligible, h=8, low_d=8, return_points=False)
    if forced is None:
        return sampled
    # Guaranteed tokens first, then the FPS picks; a sample with more guaranteed tokens keeps fewer picks.
    position = torch.arange(num_landmarks, device=x.device)
    fill = sampled.gather(1, (position - counts.unsqueeze(-1)).clamp(0, free - 1))
    return torch.where(position < counts.unsqueeze(-1), forced, fill)


def _forced_order(
    guaranteed: torch.Tensor | None, valid: torch.Tensor | None, num_landmarks: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Guaranteed (and valid) token indices in index order, `[B, m]`, and how many there are per sample, `[B]`."""
    if guaranteed is None:
        return None, None
    pending = guaranteed if valid is None else guaranteed & valid
    num_tokens = pending.shape[-1]
    position = torch.arange(num_tokens, device=pending.device)
    order = torch.where(pending, position, position + num_tokens)  # guaranteed tokens sort first, in index order
    forced = order.topk(num_landmarks, dim=-1, largest=False, sorted=True).values % num_tokens
    return forced, pending.sum(dim=-1)


@torch.no_grad()
def random_sampling(
    num_tokens: int,
    num_landmarks: int,
    batch_size: int,
    guaranteed: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pick `num_landmarks` tokens per sample uniformly at random (the ablation baseline of the paper).

    Every sample draws from its own generator seeded with `seed`, so a sample's landmarks depend on `seed`, the
    sequence length and its own guaranteed and valid tokens only, never on its batch neighbours or its position in
    the batch. Guaranteed tokens come first, in index order; invalid tokens are never picked.

    Returns:
        `[B, m]` int64 token indices.
    """
    check_int("num_tokens", num_tokens, 1)
    _check_count(num_landmarks, num_tokens)
    check_int("batch_size", batch_size, 1)
    check_seed(seed)
    check_token_mask("guaranteed", guaranteed, batch_size, num_tokens)
    check_token_mask("valid", valid, batch_size, num_tokens)
    if valid is not None:
        device = valid.device
    elif guaranteed is not None:
        device = guaranteed.device
    device = torch.device(device or "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    # One draw, shared by every row: each row is what a batch of one would draw (`torch.rand(B, N)` would give
    # row i the i-th draw, so the landmarks of a sample would change with its position in the batch).
    score = torch.rand(1, num_tokens, generator=generator, device=device).expand(batch_size, num_tokens)
    if guaranteed is not None:
        # Guaranteed tokens score above 1, the lowest index highest.
        order = torch.arange(num_tokens, 0, -1, device=device, dtype=score.dtype) / num_tokens
        score = torch.where(guaranteed, 2.0 + order, score)
    if valid is not None:
        score = score.masked_fill(~valid, _INVALID)
    return score.topk(num_landmarks, dim=-1, sorted=True).indices


def select_landmarks(
    features: torch.Tensor,
    num_landmarks: int,
    method: str = "fps",
    num_special_tokens: int = 0,
    guaranteed: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    seed: int = 0,
    start: str = "first",
) -> torch.Tensor:
    """Choose landmark indices `[B, m]` from per-token `features` `[B, N, C]`.

    Args:
        method: "fps", "random" or "quickfps" (FPS by the `torch-quickfps` package as the paper's code calls it: the
            special and guaranteed tokens do not seed the distances, FPS starts at the first other token).
        num_special_tokens: the first tokens of every sample are always landmarks (CLS, registers).
        guaranteed: optional `[B, N]` bool of further tokens that must be landmarks (e.g. flagged massive tokens).
        valid: optional `[B, N]` bool, False for tokens that must never be landmarks (padding).
        seed: seed of random sampling.
        start: where "fps" starts (`SELECTION_STARTS`): "first" (FPS over the other tokens from the first of them,
            as "quickfps" does; the default), "special" (the guaranteed tokens seed the distances) or "centroid".

    Raises:
        TypeError, ValueError: an argument of the wrong kind or value, named with what is accepted.
    """
    check_features("features", features)
    batch, num_tokens, _ = features.shape
    if method not in SAMPLING_METHODS:
        raise InputError(
            f"Landmark sampling method {method!r} is not supported; accepted values: {', '.join(SAMPLING_METHODS)}."
        )
    check_int("num_special_tokens", num_special_tokens, 0)
    check_seed(seed)
    if num_special_tokens > 0:
        special = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
        special[:, :num_special_tokens] = True
        guaranteed = special if guaranteed is None else guaranteed | special
    if method == "fps":
        check_choice("start", start, SELECTION_STARTS)
        return farthest_point_sampling(
            features,
            num_landmarks,
            guaranteed=guaranteed,
            valid=valid,
            seed_with_guaranteed=start == "special",
            start="first" if start == "special" else start,
        )
    if method == "quickfps":
        return farthest_point_sampling(
            features, num_landmarks, guaranteed=guaranteed, valid=valid, seed_with_guaranteed=False,
            implementation="quickfps",
        )  # fmt: skip
    return random_sampling(
        num_tokens, num_landmarks, batch, guaranteed=guaranteed, valid=valid, seed=seed, device=features.device
    )


def _check_count(num_landmarks: int, num_tokens: int) -> None:
    check_int("num_landmarks", num_landmarks, 1)
    if num_landmarks > num_tokens:
        raise InputError(f"num_landmarks={num_landmarks} must lie in [1, {num_tokens}] for {num_tokens} tokens.")
