"""Turning FNA off and on: exact attention for a block (`exact`), removing hf-fna from a model (`remove`), and
saving a model so that a plain `from_pretrained` runs FNA again (`save_pretrained`).

All three go through Transformers' public `set_attn_implementation` and config attributes; the attention modules
keep their plans while a model runs another implementation, so switching back costs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ..errors import InputError
from .plans import ATTENTION_NAME, drop_plans, plan_model

EXACT_IMPLEMENTATION = "sdpa"


def _check_model(model: Any, caller: str) -> None:
    if getattr(model, "config", None) is None or not hasattr(model, "set_attn_implementation"):
        raise InputError(f"hf_fna.{caller} expects a Transformers PreTrainedModel; got {type(model).__name__}.")


def implementations(model: Any) -> dict[str, str | None]:
    """The attention implementation of the model config (key `""`) and of each of its sub-configs, in the form
    `model.set_attn_implementation` accepts."""
    config = model.config
    found: dict[str, str | None] = {"": config._attn_implementation}
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if sub is not None:
            found[name] = sub._attn_implementation
    return found


@contextlib.contextmanager
def exact(model: Any) -> Iterator[Any]:
    """Run exact attention (`sdpa`) in every tower of `model` that runs FNA, inside the block; FNA comes back after it,
    also when the block raises. Nestable; settings, plans and `fna_config` are untouched.

        with hf_fna.exact(model):
            reference = model(pixel_values=pixels)  # exact attention, as attn_implementation="sdpa"

    The switch is the model's (its config), not the thread's: another thread running the same model inside the
    block runs exact attention too.

    Raises:
        ValueError: `model` is not a `PreTrainedModel`.
    """
    _check_model(model, "exact")
    before = implementations(model)
    switched = {name: EXACT_IMPLEMENTATION if value == ATTENTION_NAME else value for name, value in before.items()}
    if switched == before:  # nothing runs FNA (or an outer block switched it off already)
        yield model
        return
    model.set_attn_implementation(switched)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def remove(model: Any, attn_implementation: str = EXACT_IMPLEMENTATION) -> Any:
    """Remove hf-fna from `model`: every tower that runs FNA switches to `attn_implementation` (`"sdpa"` by
    default), every config drops its `fna_config` (so `save_pretrained` no longer writes it), and the attention
    modules drop their plans and hooks. Returns `model`; `FNAConfig(...).apply(model)` turns FNA on again.

    Raises:
        ValueError: `model` is not a `PreTrainedModel`, or `attn_implementation` is `"fna"`.
    """
    _check_model(model, "remove")
    if attn_implementation == ATTENTION_NAME:
        raise InputError(
            f"hf_fna.remove(attn_implementation={attn_implementation!r}) would keep FNA; pass another implementation "
            "('sdpa', 'eager', ...)."
        )
    before = implementations(model)
    switched = {name: attn_implementation if value == ATTENTION_NAME else value for name, value in before.items()}
    if switched != before:
        model.set_attn_implementation(switched)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "fna_config", None) is not None:
            del config.fna_config
    drop_plans(model)
    return model


def save_pretrained(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """`model.save_pretrained(save_directory, **kwargs)`, with the attention implementation recorded in
    `config.json`, so that a plain `AutoModel.from_pretrained(save_directory)` runs FNA again (after `import hf_fna`).

    Transformers does not save the attention implementation: after a plain `model.save_pretrained`, `config.json`
    keeps the settings (`fna_config`) but a plain reload runs `sdpa` until `attn_implementation="fna"` is passed.
    This function writes `"attn_implementation"` (`"fna"`, or `{"vision_config": "fna", ...}` for a vision tower)
    into `config.json`. Such a folder cannot be loaded without hf-fna installed and imported, except with an explicit
    `from_pretrained(..., attn_implementation="sdpa")`; share plain `save_pretrained` folders with users who may not
    have hf-fna.

    Raises:
        ValueError: `model` is not a `PreTrainedModel`, runs FNA nowhere, or `push_to_hub=True` is passed (upload the
            folder afterwards with `huggingface_hub.upload_folder`).
    """
    _check_model(model, "save_pretrained")
    if kwargs.get("push_to_hub"):
        raise InputError(
            "hf_fna.save_pretrained(push_to_hub=True) is not supported; save, then upload the folder with "
            "huggingface_hub.upload_folder."
        )
    current = implementations(model)
    if ATTENTION_NAME not in current.values():
        raise InputError(
            f"hf_fna.save_pretrained: {type(model).__name__} runs FNA in no tower (attention implementations: "
            f"{current}); apply FNA first (FNAConfig(...).apply(model)) or use model.save_pretrained."
        )
    plan_model(model)  # settings found in fna_config.json are written to the config, hence into config.json
    config = model.config
    recorded = ATTENTION_NAME if current[""] == ATTENTION_NAME else {k: v for k, v in current.items() if k}
    # A plain attribute of the config is written to config.json; `from_pretrained` reads it back as the requested
    # attention implementation (`PreTrainedConfig(attn_implementation=...)`).
    config.attn_implementation = recorded
    try:
        model.save_pretrained(save_directory, **kwargs)
    finally:
        del config.attn_implementation
