"""Detection of massive tokens (high-norm attention sinks) and artifact tokens, batched.

Three detectors:
- `detect_high_norm_tokens`: tokens whose L2 norm (the residual stream entering a layer) exceeds `min_ratio` times
  the median token norm, the usual definition of massive activations. On the CLIP ViT-B/16 of `hf_fna.assets` the
  tokens above 10x the median receive a median 9-12x the uniform share of attention and those at 5-10x about 1x
  (benchmarks/massive_tokens.py), so the ratio separates the sinks from a tail of merely large tokens.
- `detect_massive_tokens` (the paper's rule): sort the log norms and cut at the largest gap; tokens above the cut
  are massive when the gap is wide enough. It needs a clear gap: on that CLIP above 224 px the norms of the sinks
  run into their tail without one.
- `detect_attention_sinks` (the paper's rule): average the attention over heads, drop the CLS column and the
  diagonal, renormalise the rows, take each token's mean incoming attention, then flag outliers iteratively: the
  strongest unflagged token is flagged while its log incoming attention exceeds mean + `std_threshold` std of the
  unflagged ones. It needs one exact attention matrix.
"""

from __future__ import annotations

import torch


def token_norms(hidden_states: torch.Tensor) -> torch.Tensor:
    """`[B, N]` L2 norm of every token of `[B, N, D]` hidden states (float32)."""
    return hidden_states.float().norm(dim=-1)


def norm_statistics(hidden_states: torch.Tensor, num_special_tokens: int = 1) -> dict[str, float]:
    """Summary of patch-token norms of one layer: min, median, mean, max and the max/median ratio.

    Special tokens (CLS, registers) are left out: the statistics describe the patch tokens.
    """
    norms = token_norms(hidden_states)[:, num_special_tokens:].flatten()
    median = norms.median()
    return {
        "min": norms.min().item(),
        "median": median.item(),
        "mean": norms.mean().item(),
        "max": norms.max().item(),
        "max_over_median": (norms.max() / median.clamp_min(1e-12)).item(),
    }


def _exclusion(batch: int, tokens: int, num_special_tokens: int, valid: torch.Tensor | None, device) -> torch.Tensor:
    excluded = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    excluded[:, :num_special_tokens] = True
    if valid is not None:
        excluded |= ~valid
    return excluded


def strongest_tokens(flagged: torch.Tensor, score: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """`flagged` `[B, N]` restricted to its `max_tokens` highest-`score` tokens per sample (None: no limit)."""
    if max_tokens is None or max_tokens >= flagged.shape[-1]:
        return flagged
    order = score.masked_fill(~flagged, float("-inf")).topk(max_tokens, dim=-1).indices
    return flagged & torch.zeros_like(flagged).scatter(1, order, True)


@torch.no_grad()
def detect_high_norm_tokens(
    hidden_states: torch.Tensor,
    min_ratio: float = 10.0,
    max_tokens: int | None = None,
    num_special_tokens: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flag tokens whose L2 norm exceeds `min_ratio` times the sample's median token norm.

    Args:
        hidden_states: `[B, N, D]`, the residual stream (not layer-normalised).
        min_ratio: the threshold, as a multiple of the median norm of the sample's (valid, non-special) tokens.
        max_tokens: keep at most this many flagged tokens per sample, the largest norms (default: no limit).
        num_special_tokens: leading tokens never flagged (CLS, registers), left out of the median.
        valid: optional `[B, N]` bool, False for padding (never flagged, left out of the median).

    Returns:
        `[B, N]` bool.
    """
    batch, tokens, _ = hidden_states.shape
    excluded = _exclusion(batch, tokens, num_special_tokens, valid, hidden_states.device)
    norms = token_norms(hidden_states)
    median = norms.masked_fill(excluded, float("nan")).nanmedian(dim=-1, keepdim=True).values
    flagged = (norms > min_ratio * median) & ~excluded  # a sample without eligible tokens has a NaN median: no flag
    return strongest_tokens(flagged, norms, max_tokens)


@torch.no_grad()
def detect_massive_tokens(
    hidden_states: torch.Tensor,
    min_gap: float = 1.0,
    max_tokens: int | None = None,
    num_special_tokens: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flag massive tokens by the largest gap in sorted log norms (the paper's rule).

    The cut is the largest gap between consecutive sorted log norms among cuts that leave at most half of the
    tokens above them (massive tokens are few; a gap among the smallest norms says nothing about them).

    Args:
        hidden_states: `[B, N, D]`, the residual stream (not layer-normalised).
        min_gap: flag nothing unless the largest gap exceeds this (natural log; 1.0 means the tokens above the cut
            are at least e times the norm of those below).
        max_tokens: keep at most this many of the tokens above the cut, the largest norms (default: no limit).
            The cut itself is found over all tokens.
        num_special_tokens: leading tokens never flagged (CLS, registers).
        valid: optional `[B, N]` bool, False for padding (never flagged).

    Returns:
        `[B, N]` bool.
    """
    batch, tokens, _ = hidden_states.shape
    excluded = _exclusion(batch, tokens, num_special_tokens, valid, hidden_states.device)
    log_norms = token_norms(hidden_states).clamp_min(1e-12).log().masked_fill(excluded, float("-inf"))
    ordered, order = log_norms.sort(dim=-1, descending=True)
    candidates = (tokens - num_special_tokens) // 2
    if candidates < 1:
        return torch.zeros(batch, tokens, dtype=torch.bool, device=hidden_states.device)
    # gap[k] separates the k + 1 largest tokens from the rest; -inf entries (excluded) yield no gap.
    gaps = (ordered[:, :candidates] - ordered[:, 1 : candidates + 1]).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    best_gap, cut = gaps.max(dim=-1)
    count = torch.where(best_gap > min_gap, cut + 1, torch.zeros_like(cut))
    if max_tokens is not None:
        count = count.clamp_max(max_tokens)
    flagged_sorted = torch.arange(tokens, device=hidden_states.device) < count[:, None]
    return torch.zeros_like(flagged_sorted).scatter(1, order, flagged_sorted)


def incoming_attention(attention_probs: torch.Tensor, num_special_tokens: int = 1) -> torch.Tensor:
    """Each token's mean incoming attention, with the CLS column and the diagonal dropped and rows renormalised.

    Args:
        attention_probs: `[B, H, N, N]` or head-averaged `[B, N, N]` attention probabilities.
        num_special_tokens: leading columns dropped (CLS; registers too if given).

    Returns:
        `[B, N]` float32; dropped columns are 0.
    """
    probs = attention_probs.float()
    if probs.dim() == 4:
        probs = probs.mean(dim=1)
    tokens = probs.shape[-1]
    keep = ~torch.eye(tokens, dtype=torch.bool, device=probs.device)
    keep[:, :num_special_tokens] = False
    probs = probs * keep
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return probs.mean(dim=-2)


@torch.no_grad()
def detect_attention_sinks(
    attention_probs: torch.Tensor,
    std_threshold: float = 3.0,
    max_tokens: int | None = None,
    num_special_tokens: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flag attention sinks as iterative outliers of mean incoming attention.

    Args:
        attention_probs: `[B, H, N, N]` or `[B, N, N]` attention probabilities.
        std_threshold: a token is flagged while its log incoming attention exceeds the mean of the unflagged
            tokens by more than this many standard deviations.
        max_tokens: at most this many flags per sample (default: until no outlier is left).
        num_special_tokens: leading tokens never flagged, whose columns are dropped (CLS).
        valid: optional `[B, N]` bool, False for padding.

    Returns:
        `[B, N]` bool.
    """
    incoming = incoming_attention(attention_probs, num_special_tokens)
    batch, tokens = incoming.shape
    excluded = _exclusion(batch, tokens, num_special_tokens, valid, incoming.device)
    log_incoming = incoming.clamp_min(1e-12).log()
    flagged = torch.zeros(batch, tokens, dtype=torch.bool, device=incoming.device)
    active = torch.ones(batch, dtype=torch.bool, device=incoming.device)
    rows = torch.arange(batch, device=incoming.device)
    limit = tokens - num_special_tokens - 1 if max_tokens is None else min(max_tokens, tokens - num_special_tokens - 1)
    for _ in range(max(limit, 0)):
        pool = ~(flagged | excluded)
        count = pool.sum(dim=-1).clamp_min(2)
        values = log_incoming.masked_fill(~pool, 0.0)
        mean = values.sum(dim=-1) / count
        std = ((values - mean[:, None]).square() * pool).sum(dim=-1).div(count - 1).sqrt()
        candidate = log_incoming.masked_fill(~pool, float("-inf")).argmax(dim=-1)
        is_outlier = log_incoming[rows, candidate] > mean + std_threshold * std
        active &= is_outlier
        flagged[rows, candidate] |= active
        # No host sync: a sample that stopped stays stopped; the loop is bounded by `limit`.
    return flagged


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Head-averaged exact attention probabilities `[B, N, N]` (float32), computed in query chunks.

    Detection needs the full matrix of one layer once per forward pass: O(N^2 d), like one exact attention layer.
    """
    batch, _, tokens, _ = query.shape
    probs = query.new_empty(batch, tokens, key.shape[2], dtype=torch.float32)
    keys = key.float().transpose(-1, -2)
    for start in range(0, tokens, chunk_size):
        logits = scale * query[:, :, start : start + chunk_size].float() @ keys
        if key_bias is not None:  # -inf raised to the minimum: a fully masked sample gets no NaN
            logits = logits + key_bias.float().clamp_min(torch.finfo(torch.float32).min)
        probs[:, start : start + chunk_size] = logits.softmax(dim=-1).mean(dim=1)
    return probs
