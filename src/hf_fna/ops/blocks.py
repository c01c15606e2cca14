"""Block-diagonal attention masks: several images packed into one sequence (Pixtral, NaViT-style packing).

Within a block every query sees the same keys (its own image's tokens), so FNA runs per block, with landmarks
chosen per block, exactly as it would on each image alone.
"""

from __future__ import annotations

import itertools

import torch

Block = tuple[int, int, int]  # (sample, start, stop): queries and keys start..stop-1 of one sample


def diagonal_blocks(mask: torch.Tensor | None) -> tuple[Block, ...] | None:
    """The blocks of a block-diagonal additive mask `[B, 1|H, N, N]`, or None when the mask is not block-diagonal.

    Block-diagonal means: the queries split into contiguous runs whose rows of the mask are identical (the same for
    every head), and the keys a run may attend to lie inside the run itself. Keys masked out inside a run (padding)
    are allowed. A mask that is the same for every query is one block per sample.
    """
    if mask is None or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return None
    if not mask.is_floating_point():
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask.bool(), torch.finfo(torch.float32).min)
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        return None
    mask = mask[:, 0]
    allowed = mask > torch.finfo(mask.dtype).min / 2
    num_tokens = mask.shape[-1]
    position = torch.arange(num_tokens, device=mask.device)
    blocks: list[Block] = []
    for sample, rows in enumerate(mask):
        # Runs of identical rows (values, not only the allowed keys: a relative position bias differs per query).
        changes = (rows[1:] != rows[:-1]).any(dim=-1).nonzero().flatten() + 1
        bounds = [0, *changes.tolist(), num_tokens]
        starts = torch.tensor(bounds[:-1], device=mask.device)
        stops = torch.tensor(bounds[1:], device=mask.device)
        inside = (position >= starts[:, None]) & (position < stops[:, None])
        if bool((allowed[sample][starts] & ~inside).any()):
            return None  # a run attends outside itself: causal or structured, not block-diagonal
        blocks += [(sample, start, stop) for start, stop in itertools.pairwise(bounds)]
    return tuple(blocks)
