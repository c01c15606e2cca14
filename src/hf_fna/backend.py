"""The `fna` attention backend for Transformers: registration, per-layer dispatch and applying an `FNAConfig`.

`import hf_fna` registers `fna_attention_forward` in `AttentionInterface` and the SDPA mask builder in
`AttentionMaskInterface` (without it, models would receive no padding or causal mask at all).

Attention modules of Transformers carry no layer index, so each model is *planned* once: every attention module
that dispatches through `AttentionInterface` is mapped to its tower (the modules sharing one config) and to its
layer index (its position in the tower's layer list). `FNAConfig.apply` plans explicitly; a model loaded with
`from_pretrained(..., attn_implementation="fna")` is planned on its first forward pass, from the outermost module
found on the call stack. Each attention module holds its own plan (an attribute, not a global table keyed by module:
`torch.compile` guards on what the traced code reads, and guards into a global weak mapping break when another model
is garbage-collected). Copies and pickles of a model carry no plan, so two models never share state, and a
deep-copied or reloaded model is planned anew.

Landmarks are chosen at the first layer of each selection group (by default one group: the first FNA layer of a
forward pass) and reused by the later layers of that group in the same pass. That per-pass state is thread-local,
with the tower's last selection of each group as a
fallback for the autograd thread that recomputes checkpointed layers.
"""

from __future__ import annotations

import copy
import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import FNAConfig, LayerGroup, resolve_layers
from .landmarks import select_landmarks
from .nystrom import (
    ReferenceModeError,
    additive_mask,
    exact_attention,
    key_bias_from_mask,
    nystrom_attention,
    valid_keys,
)
from .sinks import attention_probabilities, detect_attention_sinks, detect_massive_tokens

ATTENTION_NAME = "fna"

# Leading tokens that are always landmarks, by `model_type` of the tower config (default: one CLS token).
_SPECIAL_TOKENS_BY_MODEL_TYPE = {
    "siglip_vision_model": 0,
    "siglip2_vision_model": 0,
    "siglip_text_model": 0,
    "deit": 2,  # CLS and distillation token
}


def num_special_tokens(tower_config: Any) -> int:
    """Leading tokens (CLS, distillation, registers) of a tower, read from its config."""
    model_type = getattr(tower_config, "model_type", "")
    if model_type in _SPECIAL_TOKENS_BY_MODEL_TYPE:
        return _SPECIAL_TOKENS_BY_MODEL_TYPE[model_type]
    return 1 + int(getattr(tower_config, "num_register_tokens", 0) or 0)


@dataclass
class TowerPlan:
    """FNA settings of one tower, resolved against its depth, plus its per-forward-pass landmark state."""

    settings: FNAConfig
    source: Any  # a copy of the `fna_config` value the plan was built from, to notice later changes, in place too
    num_layers: int
    groups: dict[int, LayerGroup]  # FNA layer -> its selection group
    num_special_tokens: int
    detect_layer: int  # masking: where tokens are flagged (resolved, non-negative)
    from_layer: int  # masking: first layer of the intervention; num_layers when masking is off
    local: threading.local = field(default_factory=threading.local, repr=False)
    last_landmarks: tuple | None = field(default=None, repr=False)
    last_group_landmarks: dict = field(default_factory=dict, repr=False)
    last_flagged: tuple | None = field(default=None, repr=False)
    hooks: list = field(default_factory=list, repr=False)

    def store_flags(self, flagged: torch.Tensor) -> None:
        self.local.flagged = self.last_flagged = (_shape_key(flagged), flagged)

    def current_flags(self, shape: tuple) -> torch.Tensor | None:
        """Tokens flagged earlier in this forward pass (the autograd thread falls back to the tower's last)."""
        entry = getattr(self.local, "flagged", None) or self.last_flagged
        return entry[1] if entry is not None and entry[0] == shape else None


def _shape_key(tokens: torch.Tensor) -> tuple:
    """(batch, tokens, device) of a `[B, N, ...]` tensor: the key under which per-pass state is reused."""
    return (tokens.shape[0], tokens.shape[1], tokens.device)


@dataclass
class LayerPlan:
    tower: TowerPlan
    index: int

    @property
    def group(self) -> LayerGroup | None:
        """The selection group of this layer; None where it runs exact attention."""
        return self.tower.groups.get(self.index)


_PLAN_ATTRIBUTE = "_hf_fna_plan"


class _PlanSlot:
    """Holds the `LayerPlan` of one attention module; a copied or unpickled module gets an empty slot.

    The plan holds thread-local state and hook handles that cannot be copied, and a copy must not write into the
    original's state: it is planned anew on its first forward pass.
    """

    __slots__ = ("plan",)

    def __init__(self, plan: LayerPlan | None = None) -> None:
        self.plan = plan

    def __deepcopy__(self, memo: dict) -> _PlanSlot:
        return _PlanSlot()

    def __copy__(self) -> _PlanSlot:
        return _PlanSlot()

    def __reduce__(self) -> tuple:
        return (_PlanSlot, ())


class _ModulePlans:
    """The plans of attention modules, stored on the modules themselves (see the module docstring)."""

    def get(self, module: nn.Module) -> LayerPlan | None:
        slot = module.__dict__.get(_PLAN_ATTRIBUTE)
        return None if slot is None else slot.plan

    def __contains__(self, module: nn.Module) -> bool:
        return self.get(module) is not None

    def __getitem__(self, module: nn.Module) -> LayerPlan:
        plan = self.get(module)
        if plan is None:
            raise KeyError(module)
        return plan

    def __setitem__(self, module: nn.Module, plan: LayerPlan) -> None:
        setattr(module, _PLAN_ATTRIBUTE, _PlanSlot(plan))

    def pop(self, module: nn.Module, default: Any = None) -> LayerPlan | None:
        plan = self.get(module)
        if plan is None:
            return default
        module.__dict__[_PLAN_ATTRIBUTE].plan = None
        return plan


_PLANS = _ModulePlans()
_PLAN_LOCK = threading.Lock()
_DISPATCHING_CLASSES: dict[type, bool] = {}


def dispatches_through_interface(module: nn.Module) -> bool:
    """Whether a module's forward looks its attention function up in `AttentionInterface` (as Transformers does)."""
    cls = type(module)
    if cls not in _DISPATCHING_CLASSES:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _DISPATCHING_CLASSES[cls] = "ALL_ATTENTION_FUNCTIONS" in source and hasattr(module, "config")
    return _DISPATCHING_CLASSES[cls]


def _layer_index(name: str) -> int | None:
    """The layer index in a module path such as `encoder.layer.3.attention` (its last integer component)."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def _tower_plan(tower_config: Any) -> TowerPlan:
    """Resolve a tower config's `fna_config` against its depth; raises `ValueError` naming the config."""
    try:
        settings = FNAConfig.from_model_config(tower_config)
        num_layers = int(tower_config.num_hidden_layers)
        groups = {layer: group for group in settings.groups(num_layers) for layer in group.layers}
        detect_layer, from_layer = _masking_layers(settings, num_layers)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{type(tower_config).__name__}.fna_config is invalid: {error}") from error
    special = settings.num_special_tokens
    return TowerPlan(
        settings=settings,
        source=copy.deepcopy(getattr(tower_config, "fna_config", None)),
        num_layers=num_layers,
        groups=groups,
        num_special_tokens=num_special_tokens(tower_config) if special is None else special,
        detect_layer=detect_layer,
        from_layer=from_layer,
    )


def _masking_layers(settings: FNAConfig, num_layers: int) -> tuple[int, int]:
    """Resolve and check `masking.detect_layer` / `masking.from_layer` against the tower depth."""
    masking = settings.masking
    if not masking.enabled:
        return num_layers, num_layers
    detect = num_layers // 2 if masking.detect_layer is None else masking.detect_layer
    (detect_layer,) = resolve_layers([detect], num_layers, "masking.detect_layer")
    if masking.from_layer is None:
        from_layer = detect_layer
    else:
        (from_layer,) = resolve_layers([masking.from_layer], num_layers, "masking.from_layer")
    if from_layer < detect_layer:
        raise ValueError(
            f"FNAConfig.masking.from_layer={masking.from_layer} precedes detect_layer={masking.detect_layer}: tokens "
            "are flagged once per forward pass at detect_layer, so the intervention can start there at the earliest."
        )
    if masking.detect == "norm_gap" and detect_layer == 0:
        raise ValueError(
            "FNAConfig.masking.detect_layer=0 with detect='norm_gap' would read the patch embeddings, which carry no "
            "massive tokens; use a layer >= 1 (massive tokens appear in middle layers)."
        )
    return detect_layer, from_layer


class NormGapDetector:
    """Forward pre-hook of the detection block: flags massive tokens from the residual stream entering it.

    It holds no state: the tower plan is looked up on the block's attention module at call time, so the hook pickles
    with the model (`torch.save(model)`) and a deep copy's hook writes into the copy's plan, never the original's.
    """

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        plan = next((p for p in map(_PLANS.get, block.modules()) if p is not None), None)
        if plan is None:  # a copy not planned yet: its first attention call plans it, and this hook runs next pass
            return
        tower = plan.tower
        masking = tower.settings.masking
        if not masking.enabled or masking.detect != "norm_gap" or plan.index != tower.detect_layer:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        tower.store_flags(
            detect_massive_tokens(
                hidden_states,
                min_gap=masking.min_gap,
                max_tokens=masking.max_tokens,
                num_special_tokens=tower.num_special_tokens,
            )
        )


def _add_norm_gap_hook(tower: TowerPlan, block: nn.Module) -> None:
    """Register a `NormGapDetector` on `block` unless it has one (a copied or unpickled model keeps its own)."""
    if any(isinstance(hook, NormGapDetector) for hook in block._forward_pre_hooks.values()):
        return
    tower.hooks.append(block.register_forward_pre_hook(NormGapDetector(), with_kwargs=True))


def plan_model(root: nn.Module) -> int:
    """Map every attention module under `root` whose tower runs `fna` to its tower plan and layer index.

    Returns the number of attention modules planned. Raises `ValueError` naming the config for an invalid
    `fna_config` (out-of-range layers included), before any plan of `root` changes.
    """
    towers: dict[int, TowerPlan] = {}
    layers: list[tuple[str, nn.Module, TowerPlan, int]] = []
    for name, module in root.named_modules():  # resolve every tower first: a bad config changes nothing
        config = getattr(module, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
            continue
        if not dispatches_through_interface(module):
            continue
        index = _layer_index(name)
        if index is None:
            continue
        if id(config) not in towers:
            towers[id(config)] = _tower_plan(config)
        layers.append((name, module, towers[id(config)], index))
    with _PLAN_LOCK:
        for module in root.modules():
            previous = _PLANS.pop(module, None)
            if previous is not None:
                for hook in previous.tower.hooks:
                    hook.remove()
        for name, module, tower, index in layers:
            _PLANS[module] = LayerPlan(tower, index)
            masking = tower.settings.masking
            if masking.enabled and masking.detect == "norm_gap" and index == tower.detect_layer:
                _add_norm_gap_hook(tower, root.get_submodule(_block_name(name)))
    return len(layers)


def _block_name(attention_name: str) -> str:
    """`encoder.layer.3.attention.attention` -> `encoder.layer.3`: the transformer block holding the attention."""
    parts = attention_name.split(".")
    last_index = max(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[: last_index + 1])


def _current_plan(module: nn.Module) -> LayerPlan | None:
    plan = _PLANS.get(module)
    # By value: `config.fna_config["num_landmarks"] = 32` edits the dict in place, and must take effect too.
    if plan is not None and plan.tower.source == getattr(module.config, "fna_config", None):
        return plan
    return None


def _plan_for(module: nn.Module) -> LayerPlan:
    plan = _current_plan(module)
    return plan if plan is not None else _plan_from_call_stack(module)


@torch.compiler.disable
def _plan_from_call_stack(module: nn.Module) -> LayerPlan:
    """Plan the model running `module` (found on the call stack).

    Run eagerly: Dynamo cannot trace the frame walk, and a graph traced before the model was planned calls this for
    every layer, so a plan made by an earlier layer of the same pass is reused, not rebuilt.
    """
    plan = _current_plan(module)
    if plan is not None:
        return plan
    root = _outermost_caller_module(module)
    if root is None or plan_model(root) == 0 or module not in _PLANS:
        raise RuntimeError(
            f"hf_fna could not find the layer index of {type(module).__name__}: call "
            "`hf_fna.FNAConfig.from_model_config(model.config).apply(model)` (or `FNAConfig(...).apply(model)`) "
            "before running it outside a Transformers model forward."
        )
    return _PLANS[module]


def _outermost_caller_module(module: nn.Module) -> nn.Module | None:
    """The outermost `nn.Module` on the call stack that contains `module` (the model being run)."""
    frame = sys._getframe(1)
    outermost = None
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and candidate is not module:
            outermost = candidate
        frame = frame.f_back
    if outermost is None or not any(m is module for m in outermost.modules()):
        return None
    return outermost


# --- landmark selection per forward pass ---------------------------------------------------------------------------


def _selection_features(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kind: str):
    if kind == "q":
        return query.mean(dim=1)
    if kind == "k":
        return key.mean(dim=1)
    # "hidden": the normalised layer input x, recovered exactly from the values v = W_v x + b (W_v square).
    projection = getattr(module, "v_proj", None)
    if not isinstance(projection, nn.Linear) or projection.weight.shape[0] != projection.weight.shape[1]:
        raise ValueError(
            f"sampling_features='hidden' needs a square `v_proj` linear layer, which {type(module).__name__} lacks; "
            "use 'q' or 'k'."
        )
    batch, heads, tokens, head_dim = value.shape
    v = value.transpose(1, 2).reshape(batch, tokens, heads * head_dim).float()
    if projection.bias is not None:
        v = v - projection.bias.float()
    return torch.linalg.solve(projection.weight.float(), v.transpose(1, 2)).transpose(1, 2)


def _landmarks_for(
    plan: LayerPlan,
    group: LayerGroup,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    guaranteed: torch.Tensor | None,
) -> torch.Tensor:
    tower, settings = plan.tower, plan.tower.settings
    # Landmarks are reused within a group and pass while the shape and the guaranteed (flagged) tokens stay the same.
    shape = (query.shape[0], query.shape[2], query.device, None if guaranteed is None else id(guaranteed))
    if not hasattr(tower.local, "landmarks"):
        tower.local.landmarks = {}
    if plan.index != group.first_layer:
        cached = tower.local.landmarks.get(group)
        if cached is None:
            cached = tower.last_group_landmarks.get(group)  # e.g. the autograd thread recomputing a checkpointed layer
        if cached is not None and cached[0] == shape:
            return cached[1]
    with torch.no_grad():
        features = _selection_features(module, query, key, value, settings.sampling_features)
        landmarks = select_landmarks(
            features,
            min(group.num_landmarks, query.shape[2]),
            method=settings.sampling,
            num_special_tokens=tower.num_special_tokens,
            guaranteed=guaranteed,
            valid=valid,
            seed=settings.seed,
        )
    tower.local.landmarks[group] = tower.last_group_landmarks[group] = tower.last_landmarks = (shape, landmarks)
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
    than `min_tokens` or `num_landmarks`, and masks that differ between queries. Returns `([B, N, H, d], weights)`;
    weights are returned only with `output_attentions=True` and are then the (quadratic) approximate matrix.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    plan = _plan_for(module)
    settings = plan.tower.settings
    output_attentions = bool(kwargs.get("output_attentions", False))
    if settings.pinv == "exact" and module.training:
        raise ReferenceModeError(
            "pinv='exact' is the reference mode and cannot be trained through (its gradients explode); call "
            "model.eval(), or use pinv='newton' for training."
        )
    shape = (*query.shape[:3], key.shape[2])
    key_bias, per_key = key_bias_from_mask(attention_mask, query.dtype, shape)
    group = plan.group
    use_fna = group is not None and per_key and query.shape[2] >= max(settings.min_tokens, group.num_landmarks)
    valid = valid_keys(key_bias)
    if use_fna and valid is not None:
        # A padded sample with fewer real tokens than landmarks would need duplicate landmarks: run exact attention.
        use_fna = int(valid.sum(dim=-1).min()) >= group.num_landmarks
    if group is not None and not use_fna and plan.index == group.first_layer:
        # This group selects no landmarks in this pass: `last_landmarks` must not report an earlier pass's.
        getattr(plan.tower.local, "landmarks", {}).pop(group, None)
        plan.tower.last_group_landmarks.pop(group, None)
        plan.tower.last_landmarks = None

    flagged = _flags_for(plan, query, key, scaling, key_bias, valid)
    intervention = settings.masking.mode if flagged is not None else "none"
    if use_fna:
        landmarks = _landmarks_for(plan, group, module, query, key, value, valid, guaranteed=flagged)
        output, weights = nystrom_attention(
            query,
            key,
            value,
            landmarks,
            key_bias=key_bias,
            scale=scaling,
            dropout_p=dropout,
            pinv=settings.pinv,
            pinv_iterations=settings.pinv_iterations,
            flagged=flagged,
            intervention=intervention,
            return_weights=output_attentions,
            valid=valid,
        )
    else:
        bias = key_bias if per_key else additive_mask(attention_mask, query.dtype, shape)
        output, weights = exact_attention(
            query,
            key,
            value,
            bias,
            scaling,
            dropout,
            flagged=flagged,
            intervention=intervention,
            return_weights=output_attentions,
        )
    return output.transpose(1, 2).contiguous(), weights


def _flags_for(
    plan: LayerPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float | None,
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
) -> torch.Tensor | None:
    """Run attention-sink detection at the detection layer; return the flags the intervention uses here, if any."""
    tower = plan.tower
    masking = tower.settings.masking
    if not masking.enabled:
        return None
    if masking.detect == "attention" and plan.index == tower.detect_layer:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        with torch.no_grad():
            probabilities = attention_probabilities(query, key, scale, key_bias)
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


def _tower_plans(model: nn.Module) -> list[TowerPlan]:
    towers: dict[int, TowerPlan] = {}
    for module in model.modules():
        plan = _PLANS.get(module)
        if plan is not None:
            towers.setdefault(id(plan.tower), plan.tower)
    return list(towers.values())


def last_landmarks(model: nn.Module) -> torch.Tensor | None:
    """Landmark indices `[B, m]` chosen in the most recent forward pass of `model` (None if FNA never ran)."""
    entries = [tower.last_landmarks for tower in _tower_plans(model) if tower.last_landmarks is not None]
    return entries[-1][1] if entries else None


def last_flagged_tokens(model: nn.Module) -> torch.Tensor | None:
    """`[B, N]` bool of the tokens flagged by masking in the most recent forward pass (None if none ran)."""
    entries = [tower.last_flagged for tower in _tower_plans(model) if tower.last_flagged is not None]
    return entries[-1][1] if entries else None


# --- applying a config -------------------------------------------------------------------------------------------


# Sub-configs holding a vision tower: CLIP/SigLIP/LLaVA (`vision_config`), UperNet/DPT heads (`backbone_config`).
TOWER_CONFIG_NAMES = ("vision_config", "backbone_config")


def find_tower_config_name(model: nn.Module) -> str | None:
    """The sub-config that holds the vision tower, or None when the model config is the tower itself."""
    for name in TOWER_CONFIG_NAMES:
        if getattr(model.config, name, None) is not None:
            return name
    return None


def apply_fna_config(model: nn.Module, settings: FNAConfig, tower: str | None = None) -> nn.Module:
    """Implementation of `FNAConfig.apply`: see there."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"FNAConfig.apply expects a Transformers PreTrainedModel; got {type(model).__name__}.")
    tower = tower if tower is not None else find_tower_config_name(model)
    tower_config = config if tower is None else getattr(config, tower, None)
    if tower_config is None:
        raise ValueError(
            f"{type(model).__name__} has no sub-config {tower!r}; accepted: {', '.join(config.sub_configs) or 'none'}."
        )
    attention_modules = [m for m in model.modules() if getattr(m, "config", None) is tower_config]
    attention_modules = [m for m in attention_modules if _is_attention_module(m)]
    if not attention_modules or not all(dispatches_through_interface(m) for m in attention_modules):
        raise ValueError(
            f"{type(model).__name__} does not dispatch its attention through transformers' AttentionInterface, so the "
            "`fna` backend cannot run in it; supported: ViT, DeiT, DINOv2 (with registers), CLIP, SigLIP, LLaVA-style "
            "vision towers and other models whose attention calls `ALL_ATTENTION_FUNCTIONS.get_interface`."
        )
    # Everything is checked before the model changes: a failed apply leaves no half-applied model behind.
    num_layers = int(tower_config.num_hidden_layers)
    settings.groups(num_layers)  # raises on out-of-range indices and overlapping groups
    _masking_layers(settings, num_layers)
    tower_config.fna_config = settings.to_dict()
    if tower is None:
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.set_attn_implementation({tower: ATTENTION_NAME})
    plan_model(model)
    return model


def _is_attention_module(module: nn.Module) -> bool:
    return (
        "Attention" in type(module).__name__
        and hasattr(module, "config")
        and not isinstance(module, nn.MultiheadAttention)
    )


def register() -> None:
    """Register the `fna` backend in Transformers' `AttentionInterface` and `AttentionMaskInterface`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, fna_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
