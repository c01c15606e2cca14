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

# Distances that order the picks: picked tokens below any real distance, invalid tokens below everything.
_PICKED = torch.finfo(torch.float32).min
_INVALID = float("-inf")


@torch.no_grad()
def farthest_point_sampling(
    features: torch.Tensor,
    num_landmarks: int,
    guaranteed: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick `num_landmarks` tokens per sample by farthest point sampling.

    The first pick is the guaranteed token of lowest index or, without one, the token farthest from the centroid;
    each further pick is the token farthest (squared L2) from all tokens picked so far. Outliers, such as massive
    and artifact tokens, are therefore among the first picks.

    Args:
        features: `[B, N, C]` per-token features (any float dtype; distances are computed in float32).
        num_landmarks: `m`, at most `N`.
        guaranteed: optional `[B, N]` bool, tokens picked before any other (in index order).
        valid: optional `[B, N]` bool, tokens that may be picked (False for padding).

    Returns:
        `[B, m]` int64 token indices; guaranteed tokens come first.
    """
    batch, num_tokens, channels = features.shape
    _check_count(num_landmarks, num_tokens)
    x = features.float()
    if valid is None:
        centroid = x.mean(dim=1, keepdim=True)
    else:
        weights = valid.unsqueeze(-1).float()
        centroid = (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    # Distances are translation invariant: centring keeps the norms (and the rounding of the expansion below) small.
    x = x - centroid
    norms = x.square().sum(-1)  # squared distance to the centroid: the first pick's criterion
    distance = norms.clone() if valid is None else norms.masked_fill(~valid, _INVALID)
    # |x_i - x_j|^2 = <[-2 x_j, |x_j|^2, 1], [x_i, 1, |x_i|^2]>: one [1, C+2] x [C+2, N] product per pick instead of a
    # [B, N, C] difference, square and sum (the transposed layout streams over N; [N, C+2] x [C+2, 1] is far slower).
    ones = torch.ones_like(norms).unsqueeze(-1)
    points = torch.cat([x, ones, norms.unsqueeze(-1)], dim=-1).transpose(1, 2).contiguous()  # [B, C + 2, N]
    centres = torch.cat([-2.0 * x, norms.unsqueeze(-1), ones], dim=-1)  # [B, N, C + 2]

    forced, forced_count = _forced_order(guaranteed, valid, num_landmarks)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _fps_loop_cpu(distance, points, centres, forced, forced_count, num_landmarks)
    picks = torch.empty(num_landmarks, batch, dtype=torch.long, device=features.device)
    for i in range(num_landmarks):
        pick = picks[i]
        torch.argmax(distance, dim=-1, out=pick)
        if forced is not None:
            # Guaranteed tokens go first, lowest index first.
            torch.where(forced_count > i, forced[:, i], pick, out=pick)
        centre = centres.gather(1, pick.view(batch, 1, 1).expand(batch, 1, channels + 2))
        torch.minimum(distance, torch.bmm(centre, points).view(batch, num_tokens), out=distance)
        distance.scatter_(1, pick.view(batch, 1), _PICKED)
    return picks.t().contiguous()


_BLAS_LIMIT_LOCK = threading.Lock()


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _fps_loop_cpu(
    distance: torch.Tensor,
    points: torch.Tensor,
    centres: torch.Tensor,
    forced: torch.Tensor | None,
    forced_count: torch.Tensor | None,
    num_landmarks: int,
) -> torch.Tensor:
    """The FPS loop of `farthest_point_sampling` on CPU, in NumPy on the same buffers (no copies).

    The same steps as the tensor loop, one sample at a time: NumPy's per-call overhead is a fraction of a PyTorch
    op's, which dominates FPS at these sizes (64 steps of a few microseconds of arithmetic each).
    """
    batch, num_tokens = distance.shape
    picks = np.empty((batch, num_landmarks), dtype=np.int64)
    forced_lists = (
        [[]] * batch
        if forced is None
        else [forced[b, : int(count)].tolist() for b, count in enumerate(forced_count.tolist())]
    )
    new_distance = np.empty(num_tokens, dtype=np.float32)
    # One BLAS thread: NumPy's OpenBLAS threads spin after each product and then steal the cores from PyTorch's
    # OpenMP threads (measured: H=6, N=8193, 2 threads, FNA 36 ms -> 22 ms), and these products are small anyway.
    # The limit is process-wide and restored on exit: the lock keeps two threads from restoring each other's value.
    with _BLAS_LIMIT_LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        for b in range(batch):
            dist, rows, cols, first = distance[b].numpy(), centres[b].numpy(), points[b].numpy(), forced_lists[b]
            for i in range(num_landmarks):
                pick = first[i] if i < len(first) else int(dist.argmax())
                picks[b, i] = pick
                np.dot(rows[pick], cols, out=new_distance)
                np.minimum(dist, new_distance, out=dist)
                dist[pick] = _PICKED
    return torch.from_numpy(picks)


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

    A fixed `seed` makes the choice deterministic for a given input shape. Guaranteed tokens come first, in index
    order; invalid tokens are never picked.

    Returns:
        `[B, m]` int64 token indices.
    """
    _check_count(num_landmarks, num_tokens)
    if valid is not None:
        device = valid.device
    elif guaranteed is not None:
        device = guaranteed.device
    device = torch.device(device or "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(batch_size, num_tokens, generator=generator, device=device)
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
) -> torch.Tensor:
    """Choose landmark indices `[B, m]` from per-token `features` `[B, N, C]`.

    Args:
        method: "fps" or "random".
        num_special_tokens: the first tokens of every sample are always landmarks (CLS, registers).
        guaranteed: optional `[B, N]` bool of further tokens that must be landmarks (e.g. flagged massive tokens).
        valid: optional `[B, N]` bool, False for tokens that must never be landmarks (padding).
        seed: seed of random sampling.
    """
    batch, num_tokens, _ = features.shape
    if num_special_tokens > 0:
        special = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
        special[:, :num_special_tokens] = True
        guaranteed = special if guaranteed is None else guaranteed | special
    if method == "fps":
        return farthest_point_sampling(features, num_landmarks, guaranteed=guaranteed, valid=valid)
    if method == "random":
        return random_sampling(
            num_tokens, num_landmarks, batch, guaranteed=guaranteed, valid=valid, seed=seed, device=features.device
        )
    raise ValueError(f"Landmark sampling method {method!r} is not supported; accepted values: fps, random.")


def _check_count(num_landmarks: int, num_tokens: int) -> None:
    if not 1 <= num_landmarks <= num_tokens:
        raise ValueError(f"num_landmarks={num_landmarks} must lie in [1, {num_tokens}] for {num_tokens} tokens.")
