"""The `fna` mask builder for Transformers' `AttentionMaskInterface`: no mask, or a key mask, where nothing varies
across queries.

Models build their attention masks through the builder registered for their attention implementation. SDPA's
(`transformers.masking_utils.sdpa_mask`) materialises a full `[B, 1, N, N]` mask whenever it cannot prove that
there is no padding, which it cannot while `torch.export` traces (it would have to read the mask's values). The
Nyström path then had to check, by reading the mask in Python, that every query row is the same: a data-dependent
branch that `torch.export` refuses.

For plain bidirectional attention (what vision towers and bidirectional text towers ask for) this builder returns
what the attention needs and nothing more: None without a padding mask, else the padding mask as a `[B, 1, 1, N]`
boolean key mask (True = attend), which SDPA and the eager path broadcast like the full mask. Every other pattern
(causal, sliding window, block-diagonal, or/and overlays) and any caller that asks for a materialised mask
(`allow_is_bidirectional_skip=False`) gets exactly what `sdpa_mask` builds.
"""

from __future__ import annotations

from typing import Any

import torch


def fna_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    allow_is_bidirectional_skip: bool = False,
    **kwargs: Any,
) -> torch.Tensor | None:
    """`AttentionMaskInterface` builder of the `fna` backend (see the module docstring); the arguments are those
    of `transformers.masking_utils.sdpa_mask`."""
    from transformers.masking_utils import bidirectional_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is bidirectional_mask_function and allow_is_bidirectional_skip:
        padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding_mask is None:
            return None
        if not is_traced(padding_mask) and bool(padding_mask.all()):
            return None  # as sdpa_mask does outside tracing: no padding, no mask
        return padding_mask[:, None, None, :].to(torch.bool)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=bidirectional_mask_function if mask_function is None else mask_function,
        attention_mask=attention_mask,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip,
        **kwargs,
    )


def is_traced(tensor: torch.Tensor | None = None) -> bool:
    """Whether values cannot be read in Python: `torch.export` or `torch.compile` is tracing, or `tensor` is a fake
    tensor or an FX proxy (Transformers' own test, plus `torch.compiler.is_exporting()`)."""
    from transformers.utils.import_utils import is_tracing

    return bool(is_tracing(tensor) or torch.compiler.is_exporting())
