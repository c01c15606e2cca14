"""The `fna` attention backend for Transformers: the attention function and its registration.

`import hf_fna` registers `fna_attention_forward` in `AttentionInterface` and its mask builder (`masks.fna_mask`: no
mask or a key mask for bidirectional attention, SDPA's masks otherwise) in `AttentionMaskInterface` (without one,
models would receive no padding or causal mask at all). The function looks up
the plan of the calling module (`plans`: its tower, layer and settings) and runs FNA or exact attention there.

Landmarks are chosen at the first layer of each selection group (by default one group: the first FNA layer of a
forward pass) and reused by the later layers of that group in the same pass. That per-pass state is thread-local,
with the tower's last selection of each group as a fallback for the autograd thread that recomputes checkpointed
layers. Packed sequences (block-diagonal masks) get landmarks per block.

Every layer records what its last call ran (FNA or exact, and why) for `hf_fna.explain`; a layer configured for FNA
that falls back to exact attention logs the reason once per model through Transformers' logging.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import FNAConfig
from ..errors import InputError, ReferenceModeError
from ..ops.blocks import diagonal_blocks
from ..ops.landmarks import select_landmarks
from ..ops.nystrom import (
    additive_mask,
    exact_attention,
    key_bias_from_mask,
    nystrom_attention,
    valid_keys,
)
from ..ops.sinks import attention_probabilities, detect_attention_sinks, strongest_tokens
from .masks import fna_mask, is_traced
from .plans import (
    ATTENTION_NAME,
    REASON_MASK,
    REASON_PADDING,
    REASON_SHORT,
    LastRun,
    LayerPlan,
    PassTensor,
    TowerPlan,
    plan_for,
)

# --- one call of the attention function ----------------------------------------------------------------------------


@dataclass
class AttentionCall:
    """One call of the attention function in a layer, or one packed image of it: what every step reads."""

    plan: LayerPlan
    module: nn.Module
    query: torch.Tensor  # [B, H, N, d]
    key: torch.Tensor
    value: torch.Tensor
    dropout: float
    scaling: float | None
    output_attentions: bool = False
    flagged: torch.Tensor | None = None  # [B, N] tokens flagged by masking, where its intervention applies
    block: int | None = None  # which image of a packed sequence (each selects its own landmarks); None for all

    @property
    def tower(self) -> TowerPlan:
        return self.plan.tower_plan

    @property
    def fna_config(self) -> FNAConfig:
        return self.plan.tower_plan.fna_config


# --- landmark selection per forward pass ---------------------------------------------------------------------------


def _selection_features(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kind: str
) -> torch.Tensor:
    """The per-token features `[B, N, C]` farthest point sampling measures distances on (`sampling_features`)."""
    if kind == "q":
        return query.mean(dim=1)
    if kind == "k":
        return key.mean(dim=1)
    # "hidden": the normalised layer input x, recovered exactly from the values v = W_v x + b (W_v square).
    projection = getattr(module, "v_proj", None)
    if not isinstance(projection, nn.Linear) or projection.weight.shape[0] != projection.weight.shape[1]:
        raise InputError(
            f"sampling_features='hidden' needs a square `v_proj` linear layer, which {type(module).__name__} lacks; "
            "use 'q' or 'k'."
        )
    batch, heads, tokens, head_dim = value.shape
    v = value.transpose(1, 2).reshape(batch, tokens, heads * head_dim).float()
    if projection.bias is not None:
        v = v - projection.bias.float()
    return torch.linalg.solve(projection.weight.float(), v.transpose(1, 2)).transpose(1, 2)


def _landmarks_for(call: AttentionCall, valid: torch.Tensor | None) -> torch.Tensor:
    """Landmarks `[B, m]` of this layer: chosen at the first layer of its group in a pass, reused by the later ones.

    Each packed image (`call.block`) has its own cache entry per group. Landmarks are reused within a group and pass
    while the shape, the block and the flagged tokens stay the same.
    """
    plan, tower, group, query = call.plan, call.tower, call.plan.group, call.query
    flagged = call.flagged
    key = (query.shape[0], query.shape[2], query.device, None if flagged is None else id(flagged))
    if not hasattr(tower.local, "landmarks"):
        tower.local.landmarks = {}
    slot = (group, call.block)
    if plan.index != group.first_layer:
        cached = tower.local.landmarks.get(slot)
        if cached is None:  # e.g. the autograd thread recomputing a checkpointed layer
            cached = tower.last_group_landmarks.get(slot)
        if cached is not None and cached.key == key:
            return cached.tensor
    guaranteed = tower.special.mask(query.shape[0], query.shape[2], query.device)
    with torch.no_grad():
        features = _selection_features(call.module, query, call.key, call.value, call.fna_config.sampling_features)
        if flagged is not None:
            # Flagged tokens are landmarks, so that the columns the intervention acts on are exact, up to half of
            # the landmarks (the most outlying first): massive tokens grow with the resolution, and a selection
            # made of them alone would leave the rest of the image without landmarks.
            special = tower.special.leading + tower.special.trailing
            budget = max(min(group.num_landmarks, query.shape[2]) - special, 0) // 2
            outlying = (features - features.mean(dim=1, keepdim=True)).float().square().sum(dim=-1)
            flagged = strongest_tokens(flagged, outlying, budget)
            guaranteed = flagged if guaranteed is None else guaranteed | flagged
        fna_config = call.fna_config
        landmarks = select_landmarks(
            features,
            min(group.num_landmarks, query.shape[2]),
            method=fna_config.sampling,
            start=fna_config.fps_start,
            guaranteed=guaranteed,
            valid=valid,
            seed=fna_config.seed,
        )
    tower.local.landmarks[slot] = tower.last_group_landmarks[slot] = PassTensor(key, landmarks)
    if call.block is None:
        tower.last_landmarks = PassTensor(key, landmarks)
    return landmarks


# --- the attention function ----------------------------------------------------------------------------------------


def fna_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`AttentionInterface` entry point: FNA in the configured layers, exact attention elsewhere.

    Exact attention runs for causal attention (text towers), layers outside `FNAConfig.layers`, sequences shorter
    than `min_tokens` or `num_landmarks`, and masks that differ between queries; each such fallback in an FNA layer
    is logged once per model and reason, and `hf_fna.explain(model)` reports it per layer. A block-diagonal mask
    (several images packed in one sequence) runs FNA per block. Returns `([B, N, H, d], weights)`; weights are
    returned only with `output_attentions=True` and are then the (quadratic) approximate matrix (None for packed
    sequences).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    plan = plan_for(module)
    output_attentions = bool(kwargs.get("output_attentions", False))
    call = AttentionCall(plan, module, query, key, value, dropout, scaling, output_attentions)
    if call.fna_config.pinv == "exact" and module.training:
        raise ReferenceModeError(
            "pinv='exact' is the reference mode and cannot be trained through (its gradients explode); call "
            "model.eval(), or use pinv='newton' for training."
        )
    # The shape expands a mask shared by the batch (e.g. BEiT's position bias) to one row per sample for landmarks.
    key_bias, per_key = key_bias_from_mask(attention_mask, query.dtype, (*query.shape[:3], key.shape[2]))
    valid = valid_keys(key_bias)
    call.flagged = _flags_for(call, key_bias, valid)
    blocks = None
    if plan.runs_fna and not per_key and not output_attentions:
        blocks = diagonal_blocks(_batch_mask(attention_mask, query))
    if blocks is not None:
        packed = _packed_attention(call, attention_mask, blocks)
        if packed is not None:
            return packed.transpose(1, 2).contiguous(), None
        use_fna, reason = False, _short_packed_images(plan, blocks)
    else:
        use_fna, reason = _decide(plan, query.shape[2], per_key, valid)
    if not use_fna and plan.group is not None and plan.index == plan.group.first_layer:
        # This group selects no landmarks in this pass: `last_landmarks` must not report an earlier pass's.
        getattr(call.tower.local, "landmarks", {}).pop((plan.group, None), None)
        call.tower.last_group_landmarks.pop((plan.group, None), None)
        call.tower.last_landmarks = None
    plan.last = LastRun("fna" if use_fna else "exact", reason, query.shape[2])
    key_bias_used = key_bias if per_key else None
    output, weights = _attend(call, key_bias_used, valid, use_fna, full_mask=None if per_key else attention_mask)
    return output.transpose(1, 2).contiguous(), weights


def _decide(plan: LayerPlan, tokens: int, per_key: bool, valid: torch.Tensor | None) -> tuple[bool, str]:
    """Whether this layer runs FNA on a sequence of `tokens`, and why (warning once when FNA was configured)."""
    fna_config, group = plan.tower_plan.fna_config, plan.group
    if group is None:
        return False, f"layer not in FNAConfig.layers={fna_config.layers!r}"
    threshold = max(fna_config.min_tokens, group.num_landmarks)
    if not per_key:
        plan.tower_plan.warn_once(REASON_MASK, f"{tokens} tokens with a mask that varies across queries")
        return False, "mask varies across queries"
    if tokens < threshold:
        plan.tower_plan.warn_once(
            REASON_SHORT,
            f"{tokens} tokens < {threshold} (min_tokens={fna_config.min_tokens}, num_landmarks={group.num_landmarks})",
        )
        return False, f"{tokens} tokens < min_tokens={fna_config.min_tokens}" + (
            f" / num_landmarks={group.num_landmarks}" if group.num_landmarks > fna_config.min_tokens else ""
        )
    # Under torch.export the count cannot be read; Nyström attention then handles such a sample itself (its masked
    # and repeated landmarks take no part, so every real token is a landmark).
    if valid is not None and not is_traced(valid) and int(valid.sum(dim=-1).min()) < group.num_landmarks:
        # A padded sample with fewer real tokens than landmarks would need duplicate landmarks.
        plan.tower_plan.warn_once(REASON_PADDING, f"fewer unpadded tokens than num_landmarks={group.num_landmarks}")
        return False, f"fewer unpadded tokens than num_landmarks={group.num_landmarks}"
    return True, f"FNA, m={group.num_landmarks}"


def _short_packed_images(plan: LayerPlan, blocks: tuple) -> str:
    """The reason (warned once) why no image of a packed sequence ran FNA: each is shorter than the threshold."""
    fna_config = plan.tower_plan.fna_config
    threshold = max(fna_config.min_tokens, plan.group.num_landmarks)
    longest = max(stop - start for _, start, stop in blocks)
    detail = f"{len(blocks)} packed images of at most {longest} tokens each, fewer than {threshold}"
    plan.tower_plan.warn_once(REASON_SHORT, f"{detail} (min_tokens={fna_config.min_tokens})")
    return f"packed images of <= {longest} tokens < min_tokens={fna_config.min_tokens}"


def _attend(
    call: AttentionCall,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    use_fna: bool,
    full_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FNA (Nyström) or exact attention `[B, H, N, d]` on one sequence (or one block of a packed one)."""
    query, key, value, flagged = call.query, call.key, call.value, call.flagged
    fna_config = call.fna_config
    intervention = fna_config.masking.intervention if flagged is not None else "none"
    if use_fna:
        landmarks = _landmarks_for(call, valid)
        return nystrom_attention(
            query,
            key,
            value,
            landmarks,
            key_bias=key_bias,
            scale=call.scaling,
            dropout_p=call.dropout,
            pinv=fna_config.pinv,
            pinv_iterations=fna_config.pinv_iterations,
            flagged=flagged,
            intervention=intervention,
            return_weights=call.output_attentions,
            valid=valid,
            # CLS and registers are landmarks: their exact attention is at hand, and it keeps the pooled output exact.
            exact_rows=call.tower.special.mask(query.shape[0], query.shape[2], query.device),
        )
    bias = key_bias if full_mask is None else additive_mask(full_mask, query.dtype)
    return exact_attention(
        query,
        key,
        value,
        bias,
        call.scaling,
        call.dropout,
        flagged=flagged,
        intervention=intervention,
        return_weights=call.output_attentions,
    )


def _batch_mask(attention_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor | None:
    """The additive mask broadcast to the batch of `query` (`[B, 1|H, N, N]`), or None when it is not 4-D."""
    mask = additive_mask(attention_mask, query.dtype)
    if mask is None or mask.dim() != 4:
        return None
    return mask.expand(query.shape[0], *mask.shape[1:])


def _packed_attention(call: AttentionCall, attention_mask: torch.Tensor, blocks: tuple) -> torch.Tensor | None:
    """FNA per block of a block-diagonal mask, `[B, H, N, d]`; None when no block is long enough for FNA.

    Each block is attended as an image on its own: its key bias is its row of the mask, its landmarks are its own
    (special tokens counted per block), and blocks shorter than `min_tokens` run exact attention.
    """
    fna_config, landmarks = call.fna_config, call.plan.group.num_landmarks
    threshold = max(fna_config.min_tokens, landmarks)
    if not any(stop - start >= threshold for _, start, stop in blocks):
        return None  # one exact SDPA call on the whole mask beats a loop of small ones
    mask = _batch_mask(attention_mask, call.query)
    outputs: list[list[torch.Tensor]] = [[] for _ in range(call.query.shape[0])]
    ran = 0
    for block, (sample, start, stop) in enumerate(blocks):
        part = (slice(sample, sample + 1), slice(None), slice(start, stop))
        key_bias = mask[sample : sample + 1, :, start : start + 1, start:stop]
        valid = valid_keys(key_bias)
        tokens = stop - start
        use_fna = tokens >= threshold and int(valid.sum()) >= landmarks
        ran += use_fna
        image = replace(
            call,
            query=call.query[part],
            key=call.key[part],
            value=call.value[part],
            flagged=None if call.flagged is None else call.flagged[sample : sample + 1, start:stop],
            block=block,
        )
        output, _ = _attend(image, key_bias, valid, use_fna)
        outputs[sample].append(output)
    reason = f"FNA per image in {ran} of {len(blocks)} packed blocks, m={landmarks}"
    call.plan.last = LastRun("fna", reason, mask.shape[-1])
    return torch.cat([torch.cat(parts, dim=2) for parts in outputs], dim=0)


def _flags_for(call: AttentionCall, key_bias: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor | None:
    """Run attention-sink detection at the detection layer; return the flags the intervention uses here, if any."""
    plan, tower = call.plan, call.tower
    masking = tower.fna_config.masking
    if not masking.enabled:
        return None
    query = call.query
    if masking.detect == "attention" and plan.index == tower.detect_layer:
        scale = query.shape[-1] ** -0.5 if call.scaling is None else call.scaling
        with torch.no_grad():
            probabilities = attention_probabilities(query, call.key, scale, key_bias)
            tower.store_flags(
                detect_attention_sinks(
                    probabilities,
                    std_threshold=masking.std_threshold,
                    max_tokens=masking.max_tokens,
                    num_special_tokens=tower.num_special_tokens,
                    valid=valid,
                )
            )
    if plan.index < tower.from_layer:
        return None
    return tower.current_flags((query.shape[0], query.shape[2], query.device))


def register() -> None:
    """Register the `fna` backend in Transformers' `AttentionInterface` and its mask builder (`masks.fna_mask`) in
    `AttentionMaskInterface`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, fna_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, fna_mask)
