"""Landmark selection: batched farthest point sampling (FPS) and seeded random sampling.

Both work on a whole batch at once, in plain PyTorch, on any device, without host synchronisation: FPS loops over
the `m` landmarks, never over the batch. Guaranteed tokens (CLS, registers, flagged massive tokens) are picked
first; invalid tokens (padding) are never picked; no token is picked twice as long as a sample has at least `m`
valid tokens.
"""

from __future__ import annotations

import torch

# Distances that order the picks: picked tokens below any real distance, invalid tokens below everything.
_PICKED = -1.0
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
    batch, num_tokens, _ = features.shape
    _check_count(num_landmarks, num_tokens)
    x = features.float()
    if valid is None:
        centroid = x.mean(dim=1, keepdim=True)
    else:
        weights = valid.unsqueeze(-1).float()
        centroid = (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    distance = (x - centroid).square().sum(-1)
    if valid is not None:
        distance = distance.masked_fill(~valid, _INVALID)
    pending = None if guaranteed is None else guaranteed.clone() if valid is None else guaranteed & valid

    rows = torch.arange(batch, device=features.device)
    index_bias = torch.arange(num_tokens, 0, -1, device=features.device, dtype=torch.float32)
    picks = torch.empty(batch, num_landmarks, dtype=torch.long, device=features.device)
    for i in range(num_landmarks):
        pick = distance.argmax(dim=-1)
        if pending is not None:
            # Pending guaranteed tokens go first, lowest index first.
            first_pending = (pending * index_bias).argmax(dim=-1)
            pick = torch.where(pending.any(dim=-1), first_pending, pick)
        picks[:, i] = pick
        if pending is not None:
            pending[rows, pick] = False
        new_distance = (x - x[rows, pick].unsqueeze(1)).square().sum(-1)
        distance = torch.minimum(distance, new_distance)
        distance[rows, pick] = _PICKED
    return picks


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
