"""What ran where: `hf_fna.explain(model)` (per tower and layer, FNA or exact attention, and why), and the landmarks
and flagged tokens of the last forward pass (`last_landmarks`, `last_flagged_tokens`).

Before any forward pass it reports the plan (which layers are configured for FNA, from which sequence length);
after one it reports what the last pass actually ran, e.g. exact attention because 257 tokens are fewer than
`min_tokens=512`, or FNA per image in a packed (block-diagonal) sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .plans import ATTENTION_NAME, LayerPlan, layer_plan, plan_model, tower_plans


@dataclass(frozen=True)
class LayerReport:
    """What one attention layer does under the `fna` backend.

    Attributes:
        tower: the sub-config holding the tower ("vision_config"...), or "model" when it is the model config.
        layer: layer index within the tower.
        configured: whether the layer is in `FNAConfig.layers`.
        ran: "fna" or "exact" in the last forward pass; None before the first pass.
        reason: why (the plan before the first pass).
        tokens: sequence length of the last forward pass (None before the first pass).
    """

    tower: str
    layer: int
    configured: bool
    ran: str | None
    reason: str
    tokens: int | None


@dataclass(frozen=True)
class Explanation:
    """The `LayerReport` of every attention layer that runs the `fna` backend, in tower and layer order."""

    layers: tuple[LayerReport, ...]

    def ran_fna(self, tower: str | None = None) -> list[int]:
        """Layers (of `tower`, or of every tower) that ran FNA in the last forward pass."""
        return [r.layer for r in self.layers if r.ran == "fna" and tower in (None, r.tower)]

    def __str__(self) -> str:
        if not self.layers:
            return "hf_fna: no attention layer of this model runs the `fna` backend."
        lines = ["| tower | layer | configured | last pass | tokens | why |", "|---|---:|---|---|---:|---|"]
        for r in self.layers:
            ran = "not run yet" if r.ran is None else r.ran
            tokens = "" if r.tokens is None else str(r.tokens)
            configured = "FNA" if r.configured else "exact"
            lines.append(f"| {r.tower} | {r.layer} | {configured} | {ran} | {tokens} | {r.reason} |")
        return "\n".join(lines)


def explain(model: nn.Module) -> Explanation:
    """Per tower and layer: FNA or exact attention, and why (see the module docstring).

    A model loaded with `attn_implementation="fna"` that has not run yet is planned here, as its first forward
    pass would plan it. Towers that run another attention implementation (a CLIP text tower, a language model, a
    model switched with `set_attn_implementation("sdpa")` or inside `hf_fna.exact(model)`) are not listed.
    """
    plans = _layer_plans(model)
    if not plans and not any(layer_plan(module) is not None for module in model.modules()):
        plan_model(model)  # never planned; a model switched away from fna keeps its plans for when it comes back
        plans = _layer_plans(model)
    reports = []
    for plan in sorted(plans, key=lambda p: (p.tower_plan.name, p.index)):
        fna_config = plan.tower_plan.fna_config
        if plan.last is not None:
            ran, reason, tokens = plan.last.ran, plan.last.reason, plan.last.tokens
        elif plan.group is not None:
            ran, tokens = None, None
            threshold = max(fna_config.min_tokens, plan.group.num_landmarks)
            reason = f"FNA (m={plan.group.num_landmarks}) on sequences of {threshold} tokens or more, exact below"
        else:
            ran, tokens = None, None
            reason = f"layer not in FNAConfig.layers={fna_config.layers!r}"
        reports.append(LayerReport(plan.tower_plan.name, plan.index, plan.runs_fna, ran, reason, tokens))
    return Explanation(tuple(reports))


def _layer_plans(model: nn.Module) -> list[LayerPlan]:
    """The plans of the attention modules that run `fna` now (a module switched to another implementation, e.g. by
    `set_attn_implementation("sdpa")` or `hf_fna.exact`, keeps its plan but is not listed)."""
    plans = []
    for module in model.modules():
        plan = layer_plan(module)
        if plan is not None and getattr(module.config, "_attn_implementation", None) == ATTENTION_NAME:
            plans.append(plan)
    return plans


def last_landmarks(model: nn.Module) -> torch.Tensor | None:
    """Landmark indices `[B, m]` chosen in the most recent forward pass of `model` (None if FNA never ran).

    Sequences packed with a block-diagonal mask are not covered: their landmarks are chosen per block.
    """
    entries = [plan.last_landmarks for plan in tower_plans(model) if plan.last_landmarks is not None]
    return entries[-1].tensor if entries else None


def last_flagged_tokens(model: nn.Module) -> torch.Tensor | None:
    """`[B, N]` bool of the tokens flagged by masking in the most recent forward pass (None if none ran)."""
    entries = [plan.last_flagged for plan in tower_plans(model) if plan.last_flagged is not None]
    return entries[-1].tensor if entries else None
