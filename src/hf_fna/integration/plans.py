"""Plans: which tower and layer each attention module of a model belongs to, with the settings it runs.

Attention modules of Transformers carry no layer index, so each model is *planned* once: every attention module
that dispatches through `AttentionInterface` is mapped to its tower (the modules sharing one config) and to its
layer index (its position in the tower's layer list). `FNAConfig.apply` plans explicitly; a model loaded with
`from_pretrained(..., attn_implementation="fna")` is planned on its first forward pass, from the outermost module
found on the call stack. Each attention module holds its own plan (an attribute, not a global table keyed by module:
`torch.compile` guards on what the traced code reads, and guards into a global weak mapping break when another model
is garbage-collected). Copies and pickles of a model carry no plan, so two models never share state, and a
deep-copied or reloaded model is planned anew.

A tower plan also holds the tower's per-forward-pass state (landmarks of each selection group, flagged tokens) and
warns, once per model and reason, when a layer configured for FNA falls back to exact attention.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..config import FNA_CONFIG_NAME, FNAConfig, ResolvedFNAConfig
from ..errors import InputError
from ..ops.sinks import detect_high_norm_tokens, detect_massive_tokens
from ..schedules import LayerGroup
from .towers import (
    TOWER_CONFIG_NAMES,
    SpecialTokens,
    dispatches_through_interface,
    is_known_family,
    layer_index,
    special_tokens,
    supports_fna,
    tower_config_name,
)

ATTENTION_NAME = "fna"
NORM_DETECTORS = ("norm_ratio", "norm_gap")  # detection from the residual stream entering the detection layer

# Through Transformers' logger hierarchy, so that `transformers.logging.set_verbosity_*` governs these warnings too.
logger = hf_logging.get_logger("transformers.hf_fna")

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


class PassTensor(NamedTuple):
    """A tensor of one forward pass (landmarks, flagged tokens) with the key under which later layers of the same
    pass may reuse it: (batch, tokens, device), plus what else it depends on."""

    key: tuple
    tensor: torch.Tensor


class LastRun(NamedTuple):
    """What the last forward pass ran in a layer."""

    ran: str  # "fna" or "exact"
    reason: str
    tokens: int


@dataclass
class TowerPlan:
    """FNA settings of one tower, resolved against its depth, plus its per-forward-pass landmark state."""

    resolved: ResolvedFNAConfig
    source: Any  # a copy of the `fna_config` value the plan was built from, to notice later changes, in place too
    special: SpecialTokens
    local: threading.local = field(default_factory=threading.local, repr=False)
    last_landmarks: PassTensor | None = field(default=None, repr=False)
    last_group_landmarks: dict[tuple, PassTensor] = field(default_factory=dict, repr=False)  # key: (group, block)
    last_flagged: PassTensor | None = field(default=None, repr=False)
    hooks: list = field(default_factory=list, repr=False)
    name: str = "model"  # the sub-config holding the tower ("vision_config"...), "model" for the model config
    warned: set = field(default_factory=set, repr=False)

    @property
    def fna_config(self) -> FNAConfig:
        return self.resolved.config

    @property
    def detect_layer(self) -> int:
        """Masking: where tokens are flagged (non-negative)."""
        return self.resolved.detect_layer

    @property
    def from_layer(self) -> int:
        """Masking: the first layer of the intervention; the tower's depth when masking is off."""
        return self.resolved.from_layer

    @property
    def num_special_tokens(self) -> int:
        return self.special.leading

    def warn_once(self, reason: str, detail: str) -> None:
        """Log why FNA fell back to exact attention, once per tower and reason."""
        if reason in self.warned:
            return
        self.warned.add(reason)
        logger.warning(
            f"hf_fna: FNA is configured for {self.name} (layers {self.fna_config.layers!r}) but ran exact attention: "
            f"{detail}; {FALLBACK_HINTS[reason]} `hf_fna.explain(model)` lists what ran in each layer."
        )

    def store_flags(self, flagged: torch.Tensor) -> None:
        self.local.flagged = self.last_flagged = PassTensor(_shape_key(flagged), flagged)
        if "no flags" not in self.warned:  # checked on the first detection only: `.any()` waits for the device
            self.warned.add("no flags")
            if not bool(flagged.any()):
                masking = self.fna_config.masking
                logger.warning(
                    f"hf_fna: masking ({masking.intervention}) is on for {self.name}, but detection "
                    f"({masking.detect}) flagged no token at layer {self.detect_layer} in the first forward pass, so "
                    "it changes nothing there. `hf-fna inspect` shows in which layers a model has massive tokens; set "
                    "FNAConfig.masking.detect_layer accordingly."
                )

    def current_flags(self, shape: tuple) -> torch.Tensor | None:
        """Tokens flagged earlier in this forward pass (the autograd thread falls back to the tower's last)."""
        entry = getattr(self.local, "flagged", None) or self.last_flagged
        return entry.tensor if entry is not None and entry.key == shape else None


def _shape_key(tokens: torch.Tensor) -> tuple:
    """(batch, tokens, device) of a `[B, N, ...]` tensor: the key under which per-pass state is reused."""
    return (tokens.shape[0], tokens.shape[1], tokens.device)


@dataclass
class LayerPlan:
    tower_plan: TowerPlan
    index: int
    group: LayerGroup | None = None  # the layer's selection group; None where it runs exact attention
    last: LastRun | None = None  # what the last forward pass ran here; None before the first pass

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


def layer_plan(module: nn.Module) -> LayerPlan | None:
    """The plan of an attention module (its tower, layer index and last run), None when it has none."""
    return _PLANS.get(module)


def plan_tower(tower_config: Any, name: str = "model") -> TowerPlan:
    """Resolve a tower config's `fna_config` against its depth; raises `ValueError` naming the config."""
    try:
        fna_config = FNAConfig.from_model_config(tower_config)
        num_layers = int(tower_config.num_hidden_layers)
        resolved = fna_config.resolve(num_layers)
    except (ValueError, TypeError) as error:
        raise InputError(f"{type(tower_config).__name__}.fna_config is invalid: {error}") from error
    special = special_tokens(tower_config, fna_config.num_special_tokens)
    if fna_config.num_special_tokens is None and not is_known_family(tower_config):
        logger.warning_once(
            f"hf_fna: the always-landmark tokens of model_type {getattr(tower_config, 'model_type', '?')!r} are not "
            f"known; assuming {special.leading} leading token(s) (a CLS token and its registers). Set "
            "FNAConfig.num_special_tokens if that is wrong."
        )
    return TowerPlan(
        resolved=resolved,
        source=copy.deepcopy(getattr(tower_config, "fna_config", None)),
        special=special,
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


class NormDetector:
    """Forward pre-hook of the detection block: flags massive tokens from the residual stream entering it
    (`detect="norm_ratio"` or `"norm_gap"`).

    It holds no state: the tower plan is looked up on the block's attention module at call time, so the hook pickles
    with the model (`torch.save(model)`) and a deep copy's hook writes into the copy's plan, never the original's.
    """

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        plan = next((p for p in map(_PLANS.get, block.modules()) if p is not None), None)
        if plan is None:  # a copy not planned yet: its first attention call plans it, and this hook runs next pass
            return
        tower_plan = plan.tower_plan
        masking = tower_plan.fna_config.masking
        if not masking.enabled or masking.detect not in NORM_DETECTORS or plan.index != tower_plan.detect_layer:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        special = tower_plan.num_special_tokens
        if masking.detect == "norm_ratio":
            flags = detect_high_norm_tokens(hidden_states, masking.min_ratio, masking.max_tokens, special)
        else:
            flags = detect_massive_tokens(hidden_states, masking.min_gap, masking.max_tokens, special)
        tower_plan.store_flags(flags)


def _add_norm_hook(tower_plan: TowerPlan, block: nn.Module) -> None:
    """Register a `NormDetector` on `block` unless it has one (a copied or unpickled model keeps its own)."""
    if any(isinstance(hook, NormDetector) for hook in block._forward_pre_hooks.values()):
        return
    tower_plan.hooks.append(block.register_forward_pre_hook(NormDetector(), with_kwargs=True))


NormGapDetector = NormDetector  # its earlier name: models pickled with `torch.save(model)` before the rename load


def model_path(root: nn.Module) -> str | None:
    """The folder or Hub repo id the model under `root` was loaded from (`config.name_or_path` of its outermost
    `PreTrainedModel`), or None for a model built from a config."""
    from transformers import PreTrainedModel

    for module in root.modules():
        if isinstance(module, PreTrainedModel):
            path = getattr(module.config, "_name_or_path", "") or ""
            if path:
                return str(path)
    return None


def settings_file(path: str | None) -> tuple[FNAConfig, str] | None:
    """The `fna_config.json` beside a model's weights: in the local folder `path`, or in the Hub repo `path` (the
    Hub's cache first; nothing is fetched in offline mode). None when there is none or it cannot be fetched.

    Raises:
        ValueError: the file exists but is not a valid `fna_config.json` (named).
    """
    if not path:
        return None
    if os.path.isdir(path):
        candidate = os.path.join(path, FNA_CONFIG_NAME)
        return (FNAConfig.from_json_file(candidate), candidate) if os.path.isfile(candidate) else None
    if os.path.exists(path) or os.path.isabs(path):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        candidate = hf_hub_download(path, FNA_CONFIG_NAME)
    except HFValidationError:
        return None  # not a repo id either
    except Exception as error:  # absent from the repo, offline, no network: the defaults apply
        logger.info(f"hf_fna: no {FNA_CONFIG_NAME} for {path!r} ({type(error).__name__}); using the defaults.")
        return None
    return FNAConfig.from_json_file(candidate), f"{path}/{FNA_CONFIG_NAME}"


def _settings_from_file(root: nn.Module) -> None:
    """Give the vision tower of `root` the settings of `fna_config.json` beside its weights when its config carries
    no `fna_config` (the lookup order: the config attribute, then that file, then the defaults). The settings are
    written onto the tower's config, so that `explain`, `save_pretrained` and later passes see them."""
    from transformers import PreTrainedModel

    model = next((m for m in root.modules() if isinstance(m, PreTrainedModel)), None)
    if model is None:
        return
    name = tower_config_name(model.config)
    config = model.config if name is None else getattr(model.config, name)
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME or getattr(config, "fna_config", None):
        return
    found = settings_file(model_path(root))
    if found is not None:
        fna_config, source = found
        config.fna_config = fna_config.to_dict()
        logger.info(f"hf_fna: {type(config).__name__} runs FNA with the settings of {source}.")


def plan_model(root: nn.Module) -> int:
    """Map every attention module under `root` whose tower runs `fna` to its tower plan and layer index.

    A vision tower whose config carries no `fna_config` first takes the settings of the `fna_config.json` beside the
    model's weights, if there is one (`settings_file`). Returns the number of attention modules planned. Raises
    `ValueError` naming the config for an invalid `fna_config` (out-of-range layers included), or the file for an
    invalid `fna_config.json`, before any plan of `root` changes.
    """
    _settings_from_file(root)
    tower_plans_by_config: dict[int, TowerPlan] = {}
    layers: list[tuple[str, nn.Module, TowerPlan, int]] = []
    for name, module in root.named_modules():  # resolve every tower first: a bad config changes nothing
        config = getattr(module, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
            continue
        if not dispatches_through_interface(module):
            continue
        index = layer_index(name)
        if index is None:
            continue
        if id(config) not in tower_plans_by_config:
            tower_plans_by_config[id(config)] = plan_tower(config, _config_name(getattr(root, "config", None), config))
        layers.append((name, module, tower_plans_by_config[id(config)], index))
    with _PLAN_LOCK:
        _drop_plans(root)
        for name, module, tower_plan, index in layers:
            _PLANS[module] = LayerPlan(tower_plan, index, tower_plan.resolved.group_of(index))
            masking = tower_plan.fna_config.masking
            if masking.enabled and masking.detect in NORM_DETECTORS and index == tower_plan.detect_layer:
                _add_norm_hook(tower_plan, root.get_submodule(_block_name(name)))
    return len(layers)


def drop_plans(root: nn.Module) -> None:
    """Remove the plans of the attention modules under `root` and the hooks they registered (`hf_fna.remove`)."""
    with _PLAN_LOCK:
        _drop_plans(root)


def _drop_plans(root: nn.Module) -> None:
    for module in root.modules():
        previous = _PLANS.pop(module, None)
        if previous is not None:
            for hook in previous.tower_plan.hooks:
                hook.remove()


def _block_name(attention_name: str) -> str:
    """`encoder.layer.3.attention.attention` -> `encoder.layer.3`: the transformer block holding the attention."""
    parts = attention_name.split(".")
    last_index = max(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[: last_index + 1])


def _current_plan(module: nn.Module) -> LayerPlan | None:
    plan = _PLANS.get(module)
    # By value: `config.fna_config["num_landmarks"] = 32` edits the dict in place, and must take effect too.
    if plan is not None and plan.tower_plan.source == getattr(module.config, "fna_config", None):
        return plan
    return None


def plan_for(module: nn.Module) -> LayerPlan:
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
    """The outermost `nn.Module` on the call stack that contains `module` (the model being run).

    Modules on the stack that do not contain it are skipped: a loss module that takes the model as an argument, or a
    wrapper holding it outside its registered submodules, calls the model without being part of it.
    """
    frame = sys._getframe(1)
    outermost = None
    checked: set[int] = set()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and candidate is not module and id(candidate) not in checked:
            checked.add(id(candidate))
            if any(m is module for m in candidate.modules()):
                outermost = candidate
        frame = frame.f_back
    return outermost


def tower_plans(model: nn.Module) -> list[TowerPlan]:
    """The plans of the towers of `model` that run the `fna` backend (empty before the model is planned)."""
    found: dict[int, TowerPlan] = {}
    for module in model.modules():
        plan = _PLANS.get(module)
        if plan is not None:
            found.setdefault(id(plan.tower_plan), plan.tower_plan)
    return list(found.values())


def apply_fna_config(model: nn.Module, fna_config: FNAConfig, tower: str | None = None) -> nn.Module:
    """Implementation of `FNAConfig.apply`: see there."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise InputError(f"FNAConfig.apply expects a Transformers PreTrainedModel; got {type(model).__name__}.")
    tower = tower if tower is not None else tower_config_name(model.config)
    tower_config = config if tower is None else getattr(config, tower, None)
    if tower_config is None:
        raise InputError(
            f"{type(model).__name__} has no sub-config {tower!r}; accepted: {', '.join(config.sub_configs) or 'none'}."
        )
    if not supports_fna(model, tower_config):
        raise InputError(
            f"{type(model).__name__} ({tower or 'model'}: {getattr(tower_config, 'model_type', '?')}) cannot run the "
            "`fna` backend: it does not declare `_supports_attention_backend` and its attention does not call "
            "`ALL_ATTENTION_FUNCTIONS.get_interface`; supported are models that dispatch through Transformers' "
            "AttentionInterface (ViT, DeiT, DINOv2, CLIP, SigLIP, SigLIP2, LLaVA-style vision towers...)."
        )
    # Everything is checked before the model changes: a failed apply leaves no half-applied model behind.
    num_layers = int(tower_config.num_hidden_layers)
    fna_config.resolve(num_layers)  # raises on out-of-range layers, overlapping groups and bad masking layers
    tower_config.fna_config = fna_config.to_dict()
    if tower is None:
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.set_attn_implementation({tower: ATTENTION_NAME})
    plan_model(model)
    return model
