"""Argument checks of the public ops (`fna_attention`, `nystrom_attention`, `select_landmarks`, FPS).

Without them a bad argument fails deep inside torch (`gather`, `topk`, `manual_seed`) or is silently ignored. Each
check raises `TypeError` (wrong kind of value) or `InputError` (a `ValueError`: wrong value) naming the argument,
the bad value and what would be accepted. None of them synchronises with the device except `check_indices`, which
skips its range check while `torch.compile` traces (a data-dependent branch would break the graph).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError

# The largest seed `torch.Generator.manual_seed` accepts.
MAX_SEED = 2**64 - 1


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """`value` must be a Python integer (not a bool) in `[minimum, maximum]`."""
    accepted = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; expected {accepted}.")
    if value < minimum or (maximum is not None and value > maximum):
        raise InputError(f"{name}={value!r} is out of range; expected {accepted}.")


def check_seed(value: Any) -> None:
    check_int("seed", value, 0, MAX_SEED)


def check_features(name: str, features: Any) -> None:
    """Per-token features: a floating `[B, N, C]` tensor."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        kind = f"a {features.dtype} tensor" if isinstance(features, torch.Tensor) else f"a {type(features).__name__}"
        raise TypeError(f"{name} is {kind}; expected a floating-point tensor [B, N, C].")
    if features.dim() != 3:
        raise InputError(
            f"{name} has shape {tuple(features.shape)}; expected [B, N, C] (batch, tokens, channels): add the batch "
            "dimension with features[None] for one sample."
        )


def check_token_mask(name: str, mask: Any, batch: int, num_tokens: int, per_head: bool = False) -> None:
    """A bool mask over the tokens of each sample: `[B, N]` (or `[B, H|1, N]` with `per_head`); None passes."""
    if mask is None:
        return
    expected = f"[B, N] = [{batch}, {num_tokens}]" + (f" or [{batch}, H|1, {num_tokens}]" if per_head else "")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise TypeError(f"{name} is {kind}; expected a bool tensor {expected} (convert with .bool()).")
    shapes_ok = mask.shape == (batch, num_tokens) or (
        per_head and mask.dim() == 3 and mask.shape[0] == batch and mask.shape[2] == num_tokens
    )
    if not shapes_ok:
        raise InputError(f"{name} has shape {tuple(mask.shape)}; expected {expected}.")


def check_indices(name: str, indices: Any, batch: int, num_tokens: int) -> torch.Tensor:
    """Landmark indices: an integer `[B, m]` tensor with `m >= 1` and every value in `[0, N)`; returned as int64."""
    if not isinstance(indices, torch.Tensor) or indices.dtype == torch.bool or indices.is_floating_point():
        kind = f"a {indices.dtype} tensor" if isinstance(indices, torch.Tensor) else f"a {type(indices).__name__}"
        raise TypeError(f"{name} is {kind}; expected an integer tensor [B, m] of token indices.")
    if indices.is_complex() or indices.dim() != 2 or indices.shape[0] != batch or indices.shape[1] < 1:
        raise InputError(
            f"{name} has shape {tuple(indices.shape)}; expected [B, m] = [{batch}, m] with m >= 1 (one row of token "
            "indices per sample)."
        )
    if not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= num_tokens:
            bad = low if low < 0 else high
            raise InputError(f"{name} holds index {bad}; token indices must lie in [0, {num_tokens - 1}].")
    return indices.long()


def check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise InputError(f"{name}={value!r} is not supported; accepted values: {', '.join(accepted)}.")
