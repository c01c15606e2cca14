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
fallback for the autograd thread that recomputes checkpointed layers. Packed sequences (block-diagonal masks) get
landmarks per block.

Every layer records what its last call ran (FNA or exact, and why) for `hf_fna.explain`; a layer configured for FNA
that falls back to exact attention logs the reason once per model through Transformers' logging.
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
from transformers.utils import logging as hf_logging

from ..config import FNAConfig, LayerGroup, resolve_layers
from ..errors import ReferenceModeError
from ..ops.blocks import diagonal_blocks
from ..ops.landmarks import select_landmarks
from ..ops.nystrom import (
    additive_mask,
    exact_attention,
    key_bias_from_mask,
    nystrom_attention,
    valid_keys,
)
from ..ops.sinks import attention_probabilities, detect_attention_sinks, detect_massive_tokens
from .families import SpecialTokens, is_known_family, special_tokens

ATTENTION_NAME = "fna"

# Through Transformers' logger hierarchy, so that `transformers.logging.set_verbosity_*` governs these warnings too.
logger = hf_logging.get_logger("transformers.hf_fna")


def num_special_tokens(tower_config: Any) -> int:
    """Leading always-landmark tokens (CLS, distillation, registers) of a tower, per family (`.families`)."""
    return special_tokens(tower_config).leading


# Why a layer configured for FNA ran exact attention; each is warned once per tower (model) and reason.
REASON_SHORT = "short sequence"
REASON_MASK = "per-query mask"
REASON_PADDING = "too few unpadded tokens"
FALLBACK_HINTS = {
    REASON_SHORT: "FNA only pays off on long sequences; lower FNAConfig.min_tokens (or num_landmarks) or raise the "
    "input resolution to run it (the break-even was measured on CPU only; on CUDA it is unmeasured).",
    REASON_MASK: "the attention mask differs between queries (e.g. BEiT's relative position bias, or a causal or "
    "structured mask); FNA supports masks that are the same for every query (padding) and block-diagonal masks "
    "(several images packed in one sequence).",
    REASON_PADDING: "a padded sample has fewer real tokens than num_landmarks.",
}


@dataclass
class TowerPlan:
    """FNA settings of one tower, resolved against its depth, plus its per-forward-pass landmark state."""

    settings: FNAConfig
    source: Any  # a copy of the `fna_config` value the plan was built from, to notice later changes, in place too
    num_layers: int
    groups: dict[int, LayerGroup]  # FNA layer -> its selection group
    special: SpecialTokens
    detect_layer: int  # masking: where tokens are flagged (resolved, non-negative)
    from_layer: int  # masking: first layer of the intervention; num_layers when masking is off
    local: threading.local = field(default_factory=threading.local, repr=False)
    last_landmarks: tuple | None = field(default=None, repr=False)
    last_group_landmarks: dict = field(default_factory=dict, repr=False)  # (group, block) -> (key, landmarks)
    last_flagged: tuple | None = field(default=None, repr=False)
    hooks: list = field(default_factory=list, repr=False)
    name: str = "model"  # the sub-config holding the tower ("vision_config"...), "model" for the model config
    warned: set = field(default_factory=set, repr=False)

    @property
    def num_special_tokens(self) -> int:
        return self.special.leading

    def warn_once(self, reason: str, detail: str) -> None:
        """Log why FNA fell back to exact attention, once per tower and reason."""
        if reason in self.warned:
            return
        self.warned.add(reason)
        logger.warning(
            f"hf_fna: FNA is configured for {self.name} (layers {self.settings.layers!r}) but ran exact attention: "
            f"{detail}; {FALLBACK_HINTS[reason]} `hf_fna.explain(model)` lists what ran in each layer."
        )

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
    # What the last forward pass ran here: ("fna" | "exact", why, tokens); None before the first pass.
    last: tuple[str, str, int] | None = None

    @property
    def group(self) -> LayerGroup | None:
        """The selection group of this layer; None where it runs exact attention."""
        return self.tower.groups.get(self.index)

    @property
    def runs_fna(self) -> bool:
        return self.group is not None


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


def _tower_plan(tower_config: Any, name: str = "model") -> TowerPlan:
    """Resolve a tower config's `fna_config` against its depth; raises `ValueError` naming the config."""
    try:
        settings = FNAConfig.from_model_config(tower_config)
        num_layers = int(tower_config.num_hidden_layers)
        groups = {layer: group for group in settings.groups(num_layers) for layer in group.layers}
        detect_layer, from_layer = _masking_layers(settings, num_layers)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{type(tower_config).__name__}.fna_config is invalid: {error}") from error
    special = special_tokens(tower_config, settings.num_special_tokens)
    if settings.num_special_tokens is None and not is_known_family(tower_config):
        logger.warning_once(
            f"hf_fna: the always-landmark tokens of model_type {getattr(tower_config, 'model_type', '?')!r} are not "
            f"known; assuming {special.leading} leading token(s) (a CLS token and its registers). Set "
            "FNAConfig.num_special_tokens if that is wrong."
        )
    return TowerPlan(
        settings=settings,
        source=copy.deepcopy(getattr(tower_config, "fna_config", None)),
        num_layers=num_layers,
        groups=groups,
        special=special,
        detect_layer=detect_layer,
        from_layer=from_layer,
        name=name,
    )


def _config_name(model_config: Any, tower_config: Any) -> str:
    """The attribute of `model_config` holding `tower_config` ("vision_config"...), or "model" for itself."""
    if tower_config is model_config:
        return "model"
    for name in (*TOWER_CONFIG_NAMES, *getattr(model_config, "sub_configs", {})):
        if getattr(model_config, name, None) is tower_config:
            return name
    return getattr(tower_config, "model_type", None) or type(tower_config).__name__


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
            towers[id(config)] = _tower_plan(config, _config_name(getattr(root, "config", None), config))
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
    flagged: torch.Tensor | None,
    block: int | None = None,
) -> torch.Tensor:
    """Landmarks `[B, m]` of this layer: chosen at the first layer of its group in a pass, reused by the later ones.

    `block` tells apart the images of a packed sequence (one cache entry per group and block). Landmarks are reused
    within a group and pass while the shape, the block and the flagged tokens stay the same.
    """
    tower, settings = plan.tower, plan.tower.settings
    shape = (query.shape[0], query.shape[2], query.device, None if flagged is None else id(flagged))
    if not hasattr(tower.local, "landmarks"):
        tower.local.landmarks = {}
    slot = (group, block)
    if plan.index != group.first_layer:
        cached = tower.local.landmarks.get(slot)
        if cached is None:
            cached = tower.last_group_landmarks.get(slot)  # e.g. the autograd thread recomputing a checkpointed layer
        if cached is not None and cached[0] == shape:
            return cached[1]
    guaranteed = tower.special.mask(query.shape[0], query.shape[2], query.device)
    if flagged is not None:
        guaranteed = flagged if guaranteed is None else guaranteed | flagged
    with torch.no_grad():
        features = _selection_features(module, query, key, value, settings.sampling_features)
        landmarks = select_landmarks(
            features,
            min(group.num_landmarks, query.shape[2]),
            method=settings.sampling,
            guaranteed=guaranteed,
            valid=valid,
            seed=settings.seed,
        )
    tower.local.landmarks[slot] = tower.last_group_landmarks[slot] = (shape, landmarks)
    if block is None:
        tower.last_landmarks = (shape, landmarks)
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
    plan = _plan_for(module)
    output_attentions = bool(kwargs.get("output_attentions", False))
    if plan.tower.settings.pinv == "exact" and module.training:
        raise ReferenceModeError(
            "pinv='exact' is the reference mode and cannot be trained through (its gradients explode); call "
            "model.eval(), or use pinv='newton' for training."
        )
    # The shape expands a mask shared by the batch (e.g. BEiT's position bias) to one row per sample for landmarks.
    key_bias, per_key = key_bias_from_mask(attention_mask, query.dtype, (*query.shape[:3], key.shape[2]))
    valid = valid_keys(key_bias)
    flagged = _flags_for(plan, query, key, scaling, key_bias, valid)
    blocks = None
    if plan.runs_fna and not per_key and not output_attentions:
        blocks = diagonal_blocks(_batch_mask(attention_mask, query))
    if blocks is not None:
        packed = _packed_attention(plan, module, query, key, value, attention_mask, blocks, dropout, scaling, flagged)
        if packed is not None:
            return packed.transpose(1, 2).contiguous(), None
        use_fna, reason = False, _short_packed_images(plan, blocks)
    else:
        use_fna, reason = _decide(plan, query.shape[2], per_key, valid)
    if not use_fna and plan.group is not None and plan.index == plan.group.first_layer:
        # This group selects no landmarks in this pass: `last_landmarks` must not report an earlier pass's.
        getattr(plan.tower.local, "landmarks", {}).pop((plan.group, None), None)
        plan.tower.last_group_landmarks.pop((plan.group, None), None)
        plan.tower.last_landmarks = None
    plan.last = ("fna" if use_fna else "exact", reason, query.shape[2])
    output, weights = _attend(
        plan,
        module,
        (query, key, value),
        key_bias if per_key else None,
        valid,
        use_fna,
        dropout,
        scaling,
        flagged,
        output_attentions,
        full_mask=None if per_key else attention_mask,
    )
    return output.transpose(1, 2).contiguous(), weights


def _decide(plan: LayerPlan, tokens: int, per_key: bool, valid: torch.Tensor | None) -> tuple[bool, str]:
    """Whether this layer runs FNA on a sequence of `tokens`, and why (warning once when FNA was configured)."""
    settings, group = plan.tower.settings, plan.group
    if group is None:
        return False, f"layer not in FNAConfig.layers={settings.layers!r}"
    threshold = max(settings.min_tokens, group.num_landmarks)
    if not per_key:
        plan.tower.warn_once(REASON_MASK, f"{tokens} tokens with a mask that varies across queries")
        return False, "mask varies across queries"
    if tokens < threshold:
        plan.tower.warn_once(
            REASON_SHORT,
            f"{tokens} tokens < {threshold} (min_tokens={settings.min_tokens}, num_landmarks={group.num_landmarks})",
        )
        return False, f"{tokens} tokens < min_tokens={settings.min_tokens}" + (
            f" / num_landmarks={group.num_landmarks}" if group.num_landmarks > settings.min_tokens else ""
        )
    if valid is not None and int(valid.sum(dim=-1).min()) < group.num_landmarks:
        # A padded sample with fewer real tokens than landmarks would need duplicate landmarks.
        plan.tower.warn_once(REASON_PADDING, f"fewer unpadded tokens than num_landmarks={group.num_landmarks}")
        return False, f"fewer unpadded tokens than num_landmarks={group.num_landmarks}"
    return True, f"FNA, m={group.num_landmarks}"


def _short_packed_images(plan: LayerPlan, blocks: tuple) -> str:
    """The reason (warned once) why no image of a packed sequence ran FNA: each is shorter than the threshold."""
    settings = plan.tower.settings
    threshold = max(settings.min_tokens, plan.group.num_landmarks)
    longest = max(stop - start for _, start, stop in blocks)
    detail = f"{len(blocks)} packed images of at most {longest} tokens each, fewer than {threshold}"
    plan.tower.warn_once(REASON_SHORT, f"{detail} (min_tokens={settings.min_tokens})")
    return f"packed images of <= {longest} tokens < min_tokens={settings.min_tokens}"


def _attend(
    plan: LayerPlan,
    module: nn.Module,
    states: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    key_bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    use_fna: bool,
    dropout: float,
    scaling: float | None,
    flagged: torch.Tensor | None,
    output_attentions: bool = False,
    full_mask: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FNA (Nyström) or exact attention `[B, H, N, d]` on one sequence (or one block of a packed one)."""
    query, key, value = states
    settings = plan.tower.settings
    intervention = settings.masking.mode if flagged is not None else "none"
    if use_fna:
        landmarks = _landmarks_for(plan, plan.group, module, query, key, value, valid, flagged, block)
        return nystrom_attention(
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
    bias = key_bias if full_mask is None else additive_mask(full_mask, query.dtype)
    return exact_attention(
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


def _batch_mask(attention_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor | None:
    """The additive mask broadcast to the batch of `query` (`[B, 1|H, N, N]`), or None when it is not 4-D."""
    mask = additive_mask(attention_mask, query.dtype)
    if mask is None or mask.dim() != 4:
        return None
    return mask.expand(query.shape[0], *mask.shape[1:])


def _packed_attention(
    plan: LayerPlan,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    blocks: tuple,
    dropout: float,
    scaling: float | None,
    flagged: torch.Tensor | None,
) -> torch.Tensor | None:
    """FNA per block of a block-diagonal mask, `[B, H, N, d]`; None when no block is long enough for FNA.

    Each block is attended as an image on its own: its key bias is its row of the mask, its landmarks are its own
    (special tokens counted per block), and blocks shorter than `min_tokens` run exact attention.
    """
    settings, landmarks = plan.tower.settings, plan.group.num_landmarks
    threshold = max(settings.min_tokens, landmarks)
    if not any(stop - start >= threshold for _, start, stop in blocks):
        return None  # one exact SDPA call on the whole mask beats a loop of small ones
    mask = _batch_mask(attention_mask, query)
    outputs: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    ran = 0
    for block, (sample, start, stop) in enumerate(blocks):
        part = (slice(sample, sample + 1), slice(None), slice(start, stop))
        key_bias = mask[sample : sample + 1, :, start : start + 1, start:stop]
        valid = valid_keys(key_bias)
        tokens = stop - start
        use_fna = tokens >= threshold and int(valid.sum()) >= landmarks
        ran += use_fna
        block_flags = None if flagged is None else flagged[sample : sample + 1, start:stop]
        states = (query[part], key[part], value[part])
        output, _ = _attend(plan, module, states, key_bias, valid, use_fna, dropout, scaling, block_flags, block=block)
        outputs[sample].append(output)
    reason = f"FNA per image in {ran} of {len(blocks)} packed blocks, m={landmarks}"
    plan.last = ("fna", reason, mask.shape[-1])
    return torch.cat([torch.cat(parts, dim=2) for parts in outputs], dim=0)


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
    """Landmark indices `[B, m]` chosen in the most recent forward pass of `model` (None if FNA never ran).

    Sequences packed with a block-diagonal mask are not covered: their landmarks are chosen per block.
    """
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
    if not supports_fna(model, tower_config):
        raise ValueError(
            f"{type(model).__name__} ({tower or 'model'}: {getattr(tower_config, 'model_type', '?')}) cannot run the "
            "`fna` backend: it does not declare `_supports_attention_backend` and its attention does not call "
            "`ALL_ATTENTION_FUNCTIONS.get_interface`; supported are models that dispatch through Transformers' "
            "AttentionInterface (ViT, DeiT, DINOv2, CLIP, SigLIP, SigLIP2, LLaVA-style vision towers...)."
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


def supports_fna(model: nn.Module, tower_config: Any) -> bool:
    """Whether the tower of `model` configured by `tower_config` dispatches its attention through AttentionInterface.

    Transformers' declared capability decides first: `_supports_attention_backend` on the `PreTrainedModel` that
    owns the tower (the tower itself for LLaVA-style models, else `model`). Models that dispatch without declaring
    it (AIMv2) are recognised from their attention modules' code.
    """
    owners = [m for m in model.modules() if getattr(m, "config", None) is tower_config and _is_pretrained_model(m)]
    if any(getattr(type(owner), "_supports_attention_backend", False) for owner in owners or [model]):
        return True
    return any(dispatches_through_interface(m) for m in model.modules() if getattr(m, "config", None) is tower_config)


def _is_pretrained_model(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def register() -> None:
    """Register the `fna` backend in Transformers' `AttentionInterface` and `AttentionMaskInterface`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, fna_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
